"""GCNet's reconstruction term under natural absence (tests/test_gcnet.py has none): the authors'
MaskedReconLoss counts the modalities the *protocol* removed, those the utterance really has; a
modality the recording lacks (no face, an empty transcript) has no target and adds nothing, even
though the input shows it as missing too. The reference is computed here from the stored frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train import conversations as conv
from train.conditions import MODALITIES, apply_availability
from train.config import load_config
from train.data import MultimodalData
from train.methods import build

DIMS = {"a": 3, "v": 2, "t": 4}
CONV = {"c0": ["A", "B", "A", "B", "A"], "c1": ["C", "D", "C"]}
ABSENT = {(1, "v"), (4, "t"), (6, "a"), (2, "v")}  # (row, modality) the recording lacks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data():
    rng = np.random.default_rng(2)
    rows = [(c, t, s) for c, spk in CONV.items() for t, s in enumerate(spk)]
    n = len(rows)
    seqs = {m: [None if (k, m) in ABSENT else rng.normal(size=(int(rng.integers(2, 5)), d)).astype(np.float32)
                for k in range(n)] for m, d in DIMS.items()}
    d = MultimodalData.from_arrays([f"u{k}" for k in range(n)], rng.integers(0, 4, n), seqs, labels=list("abcd"))
    d.conversations = conv.ConversationIndex.from_lists(*zip(*rows))
    return d


def test_recon_counts_only_what_the_protocol_removed_from_what_exists():
    d = _data()
    cfg = load_config("gcnet", "demo")
    cfg["model"].update(hidden=6, graph_hidden=4)
    torch.manual_seed(0)
    m = build(cfg, d.spec).train()
    avail = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 0, 1]], bool)
    b = apply_availability(next(conv.batches(d, np.arange(len(d)), 8)), avail)
    natural = b["natural"].numpy()
    assert (~natural & ~avail).any() and (natural & ~avail).any()
    torch.manual_seed(1)
    recon = torch.randn(len(d), sum(DIMS.values()))
    want = 0.0
    for i in range(len(d)):
        row, off = int(b["index"][i]), 0
        for k, mm in enumerate(MODALITIES):
            if natural[i, k] and not avail[i, k]:  # removed by the protocol, present in the data
                target = torch.tensor(d.seqs[mm].seq(row).mean(0))
                want += float(((recon[i, off:off + DIMS[mm]] - target) ** 2).mean())
            off += DIMS[mm]
    want /= len(d)
    got = float(m.recon_loss(recon, b))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    # the naturally absent slots would have added this much (their "target" is zeros)
    extra = sum(float((recon[i, sum(list(DIMS.values())[:k]):sum(list(DIMS.values())[:k + 1])] ** 2).mean())
                for i in range(len(d)) for k in range(3) if not natural[i, k]) / len(d)
    assert extra > 1e-2
