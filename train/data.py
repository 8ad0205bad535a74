"""The data module: per-utterance frame sequences of the three modalities, labels, padded batches.

Utterances keep their place even when a modality is missing (absent from its store, failed, or
with no valid frame: no face in the whole video, an empty transcript): that modality's length is 0
and its ``natural`` presence flag False; in a batch it becomes a single zero frame (MMIN's
Denseface convention), so every encoder sees at least one step.

Sequences are held in memory as one concatenated (F, D) array + offsets per modality (the
feature stores' own layout); a store too large for the memory budget is read per batch instead.
Normalisation statistics come from the training fold only (``Normalizer.fit(data, train_idx)``).
Non-finite frames (NaN/Inf in a store) are invalid frames, handled by ``data.invalid_frames``
like frames without a face, and the utterances are named in a warning: no NaN reaches a model.
``data.resample_to: T`` gives every modality T frames (linear interpolation), ``data.target``
the task (``train.targets``). An aligned source (store attr ``aligned``, MMSA's aligned_50) is
never stretched: step k of every modality is stored position k, invalid positions are zeroed in
place and False in ``frame_mask`` (see ``MultimodalData._aligned_steps``). The sequences and how
they are read from stores live in :mod:`train.data_sequences`, batching in :mod:`train.data_batches`.

A batch is a dict::

    x:          {m: (B, T_m, D_m) float32}   padded with zeros, normalised, m in ("a", "v", "t")
    lengths:    {m: (B,) int64}               frames the encoder reads (>= 1)
    frame_mask: {m: (B, T_m) bool}            True on real, valid frames
    natural:    (B, 3) bool                   the modality exists for this utterance
    present:    (B, 3) bool                   natural & kept by the missing condition
    y:          (B,) int64 class index | float32 regression value
    index:      (B,) int64 rows in the data module; ids: list[str]
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from train.conditions import MODALITIES
from train.data_batches import Batching
# DataError, Sequences and apply_mask stay importable from train.data (callers use them from here)
from train.data_sequences import (DataError, Sequences, _attrs, _default_budget, _positions_kept, _sequences_from_store,
                                  apply_mask)

STORE_MODALITY = {"a": "audio", "v": "video", "t": "text"}


@dataclass
class DataSpec:
    """What a method needs to know about the data to build itself."""

    dims: dict[str, int]
    task: str = "classification"  # or "regression"
    labels: list[str] | None = None

    @property
    def n_classes(self) -> int | None:
        return len(self.labels) if self.labels is not None else None

    @property
    def out_dim(self) -> int:
        return self.n_classes if self.task == "classification" else 1

    def to_json(self) -> dict:
        return {"dims": self.dims, "task": self.task, "labels": self.labels}



@dataclass
class Normalizer:
    """Per-modality frame mean/std, fitted on the training fold's frames only."""

    mean: dict[str, np.ndarray] = field(default_factory=dict)
    std: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(cls, data: "MultimodalData", train_idx, modalities=MODALITIES, chunk: int = 256) -> "Normalizer":
        """Statistics over every frame of the given training utterances (Chan's pairwise
        combination of chunk statistics, in float64, so large corpora need no full copy)."""
        norm = cls()
        train_idx = np.asarray(train_idx, dtype=np.int64)
        for m in modalities:
            s = data.seqs[m]
            n_tot, mean, m2 = 0, np.zeros(s.dim), np.zeros(s.dim)
            rows = train_idx[s.lengths[train_idx] > 0]
            for start in range(0, len(rows), chunk):
                block = [s.seq(i)[s.frame_valid(i)] if s.valid is not None else s.seq(i) for i in rows[start:start + chunk]]
                x = np.concatenate(block).astype(np.float64)
                n_b, mean_b = len(x), x.mean(0)
                m2_b = ((x - mean_b) ** 2).sum(0)
                delta = mean_b - mean
                tot = n_tot + n_b
                mean = mean + delta * n_b / tot
                m2 = m2 + m2_b + delta ** 2 * n_tot * n_b / tot
                n_tot = tot
            if n_tot == 0:
                continue  # no training frame: leave this modality unnormalised
            std = np.sqrt(m2 / n_tot)
            std[std < 1e-8] = 1.0  # constant features: avoid dividing by zero
            norm.mean[m] = mean.astype(np.float32)
            norm.std[m] = std.astype(np.float32)
        return norm

    def to_dict(self) -> dict:
        return {"mean": {m: v.tolist() for m, v in self.mean.items()},
                "std": {m: v.tolist() for m, v in self.std.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls({m: np.asarray(v, np.float32) for m, v in d.get("mean", {}).items()},
                   {m: np.asarray(v, np.float32) for m, v in d.get("std", {}).items()})



class MultimodalData(Batching):
    """N labelled utterances with up to three modalities. Build it with ``from_arrays`` (tests,
    synthetic data) or ``from_stores`` (feature stores + manifest)."""

    def __init__(self, ids: list[str], y, seqs: dict[str, Sequences], labels: list[str] | None = None,
                 task: str = "classification", signature: str | None = None, max_len: dict | None = None,
                 fixed_len: bool = False, resample_to: int | None = None, aligned: bool = False):
        self.ids = list(ids)
        self.index = {u: i for i, u in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise DataError("duplicate utterance ids in the data")
        self.task = task
        self.y = np.asarray(y, dtype=np.int64 if task == "classification" else np.float32)
        self.labels = labels
        missing = [m for m in MODALITIES if m not in seqs]
        if missing:
            raise DataError(f"modalities {missing} have no sequences; give every one of a, v, t")
        self.seqs = seqs
        for m, s in seqs.items():
            if len(s.lengths) != len(self.ids):
                raise DataError(f"modality {m}: {len(s.lengths)} sequences for {len(self.ids)} utterances")
        if task == "classification" and labels is not None and len(self.y) and (self.y.min() < 0 or self.y.max() >= len(labels)):
            raise DataError(f"class indices must lie in [0, {len(labels)}); got {self.y.min()}..{self.y.max()}")
        self.max_len = {m: int(v) for m, v in (max_len or {}).items() if v}
        self.fixed_len = fixed_len
        self.resample_to = int(resample_to) if resample_to else None
        self.aligned = bool(aligned)
        self.steps = self._aligned_steps() if self.aligned else None
        self.signature = signature or self._content_signature()
        self.access_log: list[np.ndarray] | None = None  # set to [] to record every collated row
        self.conversations = None  # train.conversations.ConversationIndex; not part of the signature

    def _aligned_steps(self) -> int:
        """An aligned source (``aligned``: every modality's step k is the same stored position k,
        e.g. MMSA's aligned_50) has one step count: each present modality of an utterance has as
        many steps (invalid ones keep their place, ``Sequences.valid``). A batch keeps those
        positions: nothing is stretched or dropped (``data.invalid_frames`` does not apply),
        every modality is padded to the common count, and ``resample_to`` must be that count."""
        ln = np.stack([self.seqs[m].lengths for m in MODALITIES], 1)
        steps = int(ln.max()) if ln.size else 1
        bad = ((ln > 0) & (ln != ln.max(1, keepdims=True))).any(1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.ids[i]!r}: an aligned source, yet its modalities have "
                            f"{dict(zip(MODALITIES, ln[i].tolist()))} steps; re-import it")
        if self.resample_to and self.resample_to != steps:
            raise DataError(f"data.resample_to {self.resample_to} would stretch an aligned source of {steps} steps, "
                            f"whose modalities already share one step axis: set it to {steps} or leave it unset")
        return steps

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, ids, y, seqs: dict[str, list], labels=None, task="classification",
                    masks: dict[str, list] | None = None, invalid_frames: str = "drop",
                    dims: dict[str, int] | None = None, aligned: bool = False, **kw) -> "MultimodalData":
        """``seqs[m]`` is a list of (T, D) arrays (or None = absent) per utterance; ``masks[m]`` an
        optional list of (T,) bool frame-validity masks (False = e.g. no face in that frame);
        ``dims[m]`` the feature width, needed only when every sequence of ``m`` is None.
        ``aligned``: the modalities share one step axis; invalid frames are zeroed in place."""
        out = {}
        for m in MODALITIES:
            lst = list(seqs[m])
            mk = (masks or {}).get(m)
            if aligned:
                kept = [_positions_kept(None if x is None else np.asarray(x, np.float32), None if mk is None else mk[j])
                        for j, x in enumerate(lst)]
                out[m] = Sequences.from_list([x for x, _ in kept], (dims or {}).get(m))
                parts = [ok for _, ok in kept if ok is not None]
                out[m].valid = np.concatenate(parts) if parts else None
                continue
            lst = [apply_mask(None if x is None else np.asarray(x, np.float32), None if mk is None else mk[j],
                              invalid_frames) for j, x in enumerate(lst)]
            out[m] = Sequences.from_list(lst, (dims or {}).get(m))
        return cls(ids, y, out, labels=labels, task=task, aligned=aligned, **kw)

    @classmethod
    def from_stores(cls, manifest, stores: dict, *, invalid_frames: str = "drop",
                    memory_budget: int | None = None, target: dict | None = None, **kw) -> "MultimodalData":
        """One row per manifest utterance that has a target (``target``: see ``train.targets``);
        ``stores`` maps "audio"/"video"/"text" (or "a"/"v"/"t") to feature stores (``.load() ->
        LoadedStore``, ``store[id]``, ``.mask(id)``, ``.failures()``). Utterances absent from a
        store, failed, or without a valid frame get that modality marked missing; never dropped."""
        from train.targets import derive

        utts, y, labels, task = derive(list(manifest), manifest.labels, target)
        skipped = len(manifest) - len(utts)
        if skipped:
            warnings.warn(f"{manifest.path or manifest.dataset}: {skipped} utterance(s) without a "
                          f"{'label' if task == 'classification' else 'value'} for this task are left out", stacklevel=2)
        if not utts:
            raise DataError(f"{manifest.path or manifest.dataset}: no labelled utterance to train on")
        ids = [u.id for u in utts]
        budget = memory_budget if memory_budget is not None else _default_budget()
        seqs, keys = {}, {}
        by_m = {m: stores.get(m, stores.get(STORE_MODALITY[m])) for m in MODALITIES}
        # an aligned source (MMSA aligned_50: the importer's store attr) keeps every step in place
        aligned = all(st is not None and _attrs(st).get("aligned") is True for st in by_m.values())
        for m in MODALITIES:
            store = by_m[m]
            if store is None:
                raise DataError(f"no feature store for modality {STORE_MODALITY[m]!r}; "
                                "extract it first (imer features) or name it in the method config's features")
            seqs[m] = _sequences_from_store(store, ids, "keep" if aligned else invalid_frames, budget)
            budget -= seqs[m].nbytes() if seqs[m].in_memory else 0
            attrs = _attrs(store)
            keys[m] = attrs.get("key") or attrs.get("name") or str(getattr(store, "path", ""))
            keys[m] += "-f16" if attrs.get("dtype") == "float16" else ""  # other values: never the fp32 run's data
        sig = _hash({"ids": ids, "features": keys, "invalid_frames": invalid_frames, "y": [float(v) for v in y],
                     "counts": {m: int(s.lengths.sum()) for m, s in seqs.items()}, **({"aligned": True} if aligned else {})})
        out = cls(ids, y, seqs, labels=labels, task=task, signature=sig, aligned=aligned, **kw)
        from train.conversations import from_manifest

        out.conversations = from_manifest(manifest, ids)
        return out

    def _content_signature(self) -> str:
        h = hashlib.blake2b(digest_size=12)
        h.update("\n".join(self.ids).encode())
        h.update(self.y.tobytes())
        for m in MODALITIES:
            s = self.seqs[m]
            h.update(s.lengths.tobytes())
            if s.in_memory:
                h.update(np.ascontiguousarray(s.data[: min(len(s.data), 4096)]).tobytes())
                h.update(repr(float(np.float64(s.data.sum()))).encode())
        return h.hexdigest()

    # ---- description -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def spec(self) -> DataSpec:
        return DataSpec({m: self.seqs[m].dim for m in MODALITIES}, self.task, self.labels)

    @property
    def natural(self) -> np.ndarray:
        """(N, 3) bool: the modality exists for this utterance."""
        return np.stack([self.seqs[m].lengths > 0 for m in MODALITIES], axis=1)

    def indices(self, ids, what: str = "fold") -> np.ndarray:
        """Rows of the given ids; ids not in the data (unlabelled, unknown) are left out with a warning."""
        rows = [self.index[u] for u in ids if u in self.index]
        if len(rows) != len(ids):
            unknown = [u for u in ids if u not in self.index]
            warnings.warn(f"{what}: {len(unknown)} id(s) not in the data are skipped (first: {unknown[0]!r})", stacklevel=2)
        return np.asarray(rows, dtype=np.int64)


def batch_to(batch: dict, device) -> dict:
    """Move every tensor of a batch (nested one level) to ``device``."""
    import torch

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=True) if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out


def _hash(obj) -> str:
    from pipeline.cache import config_hash

    return config_hash(obj, 16)
