"""Synthetic multimodal data with a known class signal, for tests and benchmarks.

Each class has a random mean direction per modality; an utterance's frames are that mean scaled
by the modality's ``strength`` plus unit Gaussian noise, so a model can learn the labels and the
modalities differ in how informative they are (like speech < face < text on IEMOCAP)."""

from __future__ import annotations

import numpy as np

from manifests.schema import Fold
from train.conditions import MODALITIES
from train.data import MultimodalData


def synthetic_data(n: int = 120, dims=None, lengths=None, n_classes: int = 4, seed: int = 0,
                   strength=None, absent: float = 0.0, task: str = "classification") -> MultimodalData:
    """``lengths[m]`` = (min, max) frames; ``absent`` = share of utterances missing each modality
    naturally (at most two per utterance)."""
    rng = np.random.default_rng(seed)
    dims = dims or {"a": 8, "v": 6, "t": 10}
    lengths = lengths or {"a": (12, 30), "v": (4, 10), "t": (3, 12)}
    strength = strength or {"a": 0.6, "v": 0.8, "t": 1.2}
    y = rng.integers(0, n_classes, size=n)
    seqs = {}
    for m in MODALITIES:
        centers = rng.normal(size=(n_classes, dims[m]))
        lo, hi = lengths[m]
        seqs[m] = [(strength[m] * centers[c] + rng.normal(size=(rng.integers(lo, hi + 1), dims[m]))).astype(np.float32)
                   for c in y]
    if absent:
        drop = rng.random((n, 3)) < absent
        drop[drop.all(1), rng.integers(0, 3)] = False  # keep at least one modality
        for j, m in enumerate(MODALITIES):
            seqs[m] = [None if drop[i, j] else s for i, s in enumerate(seqs[m])]
    ids = [f"utt{i:05d}" for i in range(n)]
    if task == "regression":
        values = (y - (n_classes - 1) / 2).astype(np.float32)
        return MultimodalData.from_arrays(ids, values, seqs, task="regression")
    return MultimodalData.from_arrays(ids, y, seqs, labels=[f"c{k}" for k in range(n_classes)])


def synthetic_folds(data: MultimodalData, n_folds: int = 2, seed: int = 0) -> list[Fold]:
    """Folds over ``n_folds`` groups: group k is the test split of fold k, group k+1 its validation split."""
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(len(data)), n_folds if n_folds > 2 else 3)
    folds = []
    for k in range(n_folds):
        te, va = groups[k % len(groups)], groups[(k + 1) % len(groups)]
        tr = np.concatenate([g for j, g in enumerate(groups) if j not in (k % len(groups), (k + 1) % len(groups))])
        folds.append(Fold(f"f{k + 1}", [data.ids[i] for i in tr], [data.ids[i] for i in va], [data.ids[i] for i in te]))
    return folds
