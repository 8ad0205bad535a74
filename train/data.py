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
place and False in ``frame_mask`` (see ``MultimodalData._aligned_steps``).

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

STORE_MODALITY = {"a": "audio", "v": "video", "t": "text"}


class DataError(ValueError):
    """Data that cannot be trained on; the message says which file or id and what to do."""


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


class Sequences:
    """One modality of N utterances: utterance i's frames are ``data[offsets[i]:offsets[i]+lengths[i]]``
    (length 0 = absent). In memory, or read through ``reader(i) -> (T, D)`` when lazy.
    ``valid``: where invalid frames keep their positions (an aligned source), their validity: an
    (F,) bool array along ``data``, or ``valid(i) -> (T,)`` when lazy; None = every frame valid."""

    def __init__(self, data: np.ndarray | None, offsets: np.ndarray, lengths: np.ndarray, dim: int,
                 reader=None, valid=None):
        self.data = data
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.dim = int(dim)
        self.reader = reader
        self.valid = valid
        if data is None and reader is None:
            raise ValueError("Sequences need in-memory data or a reader")

    @classmethod
    def from_list(cls, seqs: list, dim: int | None = None) -> "Sequences":
        """From a list of (T, D) arrays or None (absent)."""
        dims = {np.shape(s)[1] for s in seqs if s is not None and np.ndim(s) == 2}  # empty (0, D) counts too
        if dim is None:
            if len(dims) != 1:
                raise DataError(f"cannot infer the feature dim from sequences of dims {sorted(dims)}")
            dim = dims.pop()
        elif dims - {dim}:
            raise DataError(f"sequences of dims {sorted(dims)} given for a modality of dim {dim}")
        lengths = np.array([0 if s is None else len(s) for s in seqs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        parts = [np.asarray(s, dtype=np.float32) for s in seqs if s is not None and len(s)]
        data = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        return cls(data, offsets, lengths, dim)

    @property
    def in_memory(self) -> bool:
        return self.data is not None

    def seq(self, i: int) -> np.ndarray:
        if self.lengths[i] == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.data is not None:
            o = self.offsets[i]
            return self.data[o:o + self.lengths[i]]
        return self.reader(i)

    def frame_valid(self, i: int) -> np.ndarray:
        """(T,) validity of utterance i's frames."""
        n = int(self.lengths[i])
        if self.valid is None or n == 0:
            return np.ones(n, bool)
        if callable(self.valid):
            return np.asarray(self.valid(i), bool)[:n]
        o = self.offsets[i]
        return self.valid[o:o + n]

    def nbytes(self) -> int:
        return int(self.lengths.sum()) * self.dim * (self.data.dtype.itemsize if self.data is not None else 4)


def _compact(data: np.ndarray, mask: np.ndarray, offsets: np.ndarray, lengths: np.ndarray):
    """Drop invalid frames (mask False) and recompute offsets/lengths."""
    if mask is None or mask.all():
        return data, offsets, lengths
    cs = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    valid = cs[offsets + lengths] - cs[offsets]
    new_off = np.concatenate([[0], np.cumsum(valid)[:-1]]).astype(np.int64)
    return data[mask], new_off, valid


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


class MultimodalData:
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

    # ---- batches ---------------------------------------------------------------------------------
    def collate(self, idx, normalizer: Normalizer | None = None) -> dict:
        """A padded batch (torch tensors on the CPU) of rows ``idx``; see the module docstring."""
        import torch

        idx = np.asarray(idx, dtype=np.int64)
        if self.access_log is not None:
            self.access_log.append(idx.copy())
        x, lengths, fmask = {}, {}, {}
        for m in MODALITIES:
            s = self.seqs[m]
            ln, cap = self._capped(idx, m), self.max_len.get(m)
            if self.aligned:
                arr, valid = self._positions(s, idx, ln, cap)
            elif self.resample_to:
                arr, valid = self._resampled(s, idx, ln)
            else:
                arr, valid = self._padded(s, idx, ln, cap)
            eff = self.frames(idx, m)  # an absent modality is one zero frame
            if self.aligned and valid.shape[1]:  # trailing invalid positions (text padding) are not read
                eff = np.where(valid.any(1), valid.shape[1] - valid[:, ::-1].argmax(1), 1)
            if normalizer is not None and m in normalizer.mean:
                arr = (arr - normalizer.mean[m]) / normalizer.std[m]
            arr = np.where(valid[..., None], arr, 0)  # padding and absent frames exactly zero (selection)
            x[m] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            lengths[m] = torch.from_numpy(eff.astype(np.int64))
            fmask[m] = torch.from_numpy(valid)
        natural = torch.from_numpy(np.stack([self.seqs[m].lengths[idx] > 0 for m in MODALITIES], axis=1))
        return {"x": x, "lengths": lengths, "frame_mask": fmask, "natural": natural,
                "present": natural.clone(), "y": torch.from_numpy(self.y[idx]),
                "index": torch.from_numpy(idx), "ids": [self.ids[i] for i in idx]}

    def _padded(self, s: Sequences, idx, ln, cap, T: int | None = None):
        T = T or self.fixed_length(s, cap) or (int(np.maximum(ln, 1).max()) if len(idx) else 1)
        t = np.arange(T)
        valid = t[None, :] < ln[:, None]
        if s.in_memory and len(s.data):
            rows = np.where(valid, s.offsets[idx][:, None] + t[None, :], 0)
            return s.data[rows], valid  # (B, T, D) gather, no copy of the whole store
        arr = np.zeros((len(idx), T, s.dim), np.float32)
        for b, i in enumerate(idx):
            if ln[b]:
                arr[b, : ln[b]] = s.seq(i)[: ln[b]]
        return arr, valid

    def _positions(self, s: Sequences, idx, ln, cap):
        """An aligned source: step k of every modality is stored position k, invalid positions
        zero and False in the frame mask; every modality padded to the common step count (a
        ``max_len`` cut drops trailing steps only, so the kept ones stay in place)."""
        T = min(self.steps, cap) if cap else self.steps
        arr, valid = self._padded(s, idx, ln, cap, T)
        if s.valid is None or not valid.any():
            return arr, valid
        if not callable(s.valid):
            rows = np.where(valid, s.offsets[idx][:, None] + np.arange(T)[None, :], 0)
            return arr, valid & s.valid[rows]
        for b, i in enumerate(idx):
            valid[b, : ln[b]] &= s.frame_valid(i)[: ln[b]]
        return arr, valid

    def fixed_length(self, s: Sequences, cap: int | None) -> int | None:
        """With ``fixed_len``, the frames every sample is padded to: ``max_len``, or the corpus's
        longest sequence where all are shorter (padding past every sample's end adds no
        information, only attention cost: the demo's 27 ComParE frames would fill 150)."""
        if not (cap and self.fixed_len):
            return None
        return int(min(cap, max(1, int(s.lengths.max()) if len(s.lengths) else 1)))

    def _resampled(self, s: Sequences, idx, ln):
        """Every present sequence linearly interpolated to ``resample_to`` frames."""
        T = self.resample_to
        pos = np.maximum(ln - 1, 0)[:, None] * np.linspace(0.0, 1.0, T)[None, :]  # (B, T)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(ln - 1, 0)[:, None])
        w = (pos - lo)[..., None].astype(np.float32)
        valid = np.repeat((ln > 0)[:, None], T, axis=1)
        if s.in_memory and len(s.data):
            base = s.offsets[idx][:, None]
            lo_r, hi_r = np.where(valid, base + lo, 0), np.where(valid, base + hi, 0)
            return s.data[lo_r] * (1 - w) + s.data[hi_r] * w, valid
        arr = np.zeros((len(idx), T, s.dim), np.float32)
        for b, i in enumerate(idx):
            if ln[b]:
                x = s.seq(i)[: ln[b]]
                arr[b] = x[lo[b]] * (1 - w[b]) + x[hi[b]] * w[b]
        return arr, valid

    def _capped(self, idx, m: str) -> np.ndarray:
        """Stored lengths of modality ``m`` for rows ``idx``, cut at ``data.max_len``."""
        ln = self.seqs[m].lengths[np.asarray(idx, dtype=np.int64)]
        return np.minimum(ln, self.max_len[m]) if self.max_len.get(m) else ln

    def frames(self, idx, m: str) -> np.ndarray:
        """Frames modality ``m`` of rows ``idx`` takes in a batch (after max_len / resample_to;
        an absent modality is one frame; an aligned source: its stored steps, of which a batch's
        ``lengths`` count those up to the last valid one)."""
        ln = self._capped(idx, m)
        if self.resample_to and not self.aligned:  # an aligned source is never resampled
            ln = np.where(ln > 0, self.resample_to, 0)
        return np.maximum(ln, 1)

    def length_order(self, idx) -> np.ndarray:
        """Positions into ``idx`` sorted by the frames of the modality with the longest sequences
        (audio on every corpus: a recurrent encoder's time grows with its padded steps), then by
        total frames."""
        frames = {m: self.frames(idx, m) for m in MODALITIES}
        main = max(MODALITIES, key=lambda m: float(frames[m].sum()))
        return np.lexsort((sum(frames.values()), frames[main]))

    def batch_rows(self, idx, batch_size: int, rng: np.random.Generator | None = None,
                   drop_last: bool = False, bucket: bool = False) -> list[np.ndarray]:
        """The rows of each batch over ``idx``: shuffled when ``rng`` is given; with ``bucket``,
        shuffled into pools of 50 batches, each pool sorted by length and cut into batches, and
        the batch order shuffled (utterances of similar length share a batch: little padding)."""
        idx = np.asarray(idx, dtype=np.int64)
        if rng is not None:
            idx = idx[rng.permutation(len(idx))]
        stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
        if bucket:
            idx, pool = idx[:stop], 50 * batch_size
            idx = np.concatenate([idx[:0]] + [idx[s:s + pool][self.length_order(idx[s:s + pool])]
                                              for s in range(0, stop, pool)])
        rows = [idx[s:s + batch_size] for s in range(0, stop, batch_size)]
        rows = [r for r in rows if len(r)]
        if bucket and rng is not None:
            rows = [rows[k] for k in rng.permutation(len(rows))]
        return rows

    def padding_fraction(self, rows: list[np.ndarray], dims: dict | None = None) -> dict[str, float]:
        """Share of the batch tensors' frames that are padding, per modality and over all
        elements (frames x dims, ``dims`` defaulting to the data's) — what length bucketing cuts."""
        out, pad_el, tot_el = {}, 0.0, 0.0
        for m in MODALITIES:
            real = total = 0
            for r in rows:
                ln = self.frames(r, m)
                cap = self.max_len.get(m)
                T = ((min(self.steps, cap) if cap else self.steps) if self.aligned
                     else self.fixed_length(self.seqs[m], cap) or int(ln.max()))
                real, total = real + int(ln.sum()), total + T * len(r)
            out[m] = 1 - real / total if total else 0.0
            dim = (dims or {}).get(m, self.seqs[m].dim)
            pad_el += (total - real) * dim
            tot_el += total * dim
        out["all"] = pad_el / tot_el if tot_el else 0.0
        out["elements"] = tot_el  # padded frames x dims of all the batches: what the encoders process
        return out

    def batches(self, idx, batch_size: int, normalizer: Normalizer | None = None,
                rng: np.random.Generator | None = None, drop_last: bool = False, bucket: bool = False,
                unit: str = "utterance"):
        """Collated batches over rows ``idx`` (see ``batch_rows``); ``unit="conversation"``: batches
        of ``batch_size`` whole conversations (``train.conversations``)."""
        if unit == "conversation":
            from train import conversations

            yield from conversations.batches(self, idx, batch_size, normalizer, rng)
            return
        from train.streaming import collated  # a streamed store: batch k+1 is read while k trains

        yield from collated(self, self.batch_rows(idx, batch_size, rng, drop_last, bucket), normalizer)


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


# ---- helpers ---------------------------------------------------------------------------------------

def apply_mask(seq, mask, invalid_frames: str):
    """Frames of ``seq`` whose ``mask`` is False (no face; non-finite values) dropped or zeroed."""
    if seq is None:
        return seq
    finite = np.isfinite(seq).all(1) if len(seq) else np.ones(0, bool)
    mask = finite if mask is None else np.asarray(mask, dtype=bool) & finite
    if mask.all():
        return seq
    if invalid_frames == "drop":
        return seq[mask]
    if invalid_frames == "zero":
        return np.where(mask[:, None], seq, 0).astype(np.float32) if mask.any() else seq[:0]
    raise DataError(f"data.invalid_frames must be 'drop' or 'zero', got {invalid_frames!r}")


def _positions_kept(seq, mask):
    """(``seq`` with invalid frames (``mask`` False, non-finite) zeroed in place, its (T,) validity);
    (None, None) when absent or no frame is valid."""
    if seq is None:
        return None, None
    ok = np.isfinite(seq).all(1) if len(seq) else np.ones(0, bool)
    if mask is not None:
        ok = ok & np.asarray(mask, dtype=bool)
    if not ok.any():
        return None, None
    return np.where(ok[:, None], seq, 0).astype(np.float32), ok


def _finite_mask(data, mask, ids, offsets, lengths, store):
    """``mask`` with non-finite frames marked invalid (and zeroed in ``data``, so no gather ever
    reads them); the utterances concerned are named in a warning."""
    bad = ~np.isfinite(data).all(1)
    if not bad.any():
        return mask
    data[bad] = 0.0
    rows = np.flatnonzero(bad)
    utt = np.searchsorted(offsets + lengths, rows, side="right")
    names = sorted({ids[i] for i in utt if i < len(ids)})
    warnings.warn(f"{getattr(store, 'path', 'a feature store')}: {len(rows)} non-finite frame(s) in "
                  f"{len(names)} utterance(s) (first: {names[0]!r}) are treated as invalid frames "
                  "(data.invalid_frames); re-extract them to recover", stacklevel=3)
    return ~bad if mask is None else mask & ~bad


def _hash(obj) -> str:
    from pipeline.cache import config_hash

    return config_hash(obj, 16)


def _attrs(store) -> dict:
    a = getattr(store, "attrs", None)
    if callable(a):
        a = a()
    return dict(a or {})


def _default_budget() -> int:
    """Half the currently available RAM (IMER_DATA_MEMORY overrides: bytes, or 512M, 4G)."""
    from train.streaming import memory_budget

    return memory_budget()


def _failed_ids(store) -> set[str]:
    f = store.failures() if hasattr(store, "failures") else {}
    if isinstance(f, dict):
        return set(f)
    return {x if isinstance(x, str) else x[0] for x in f}


def _store_size(store) -> int | None:
    """Bytes the store's frames take in memory (float16 stay float16; None when the store cannot say)."""
    frames, dim = getattr(store, "n_frames", None), _attrs(store).get("dim")
    if isinstance(frames, (int, np.integer)) and dim:
        return int(frames) * int(dim) * (2 if _attrs(store).get("dtype") == "float16" else 4)
    return None


def _sequences_from_store(store, ids: list[str], invalid_frames: str, budget: int) -> Sequences:
    failed = _failed_ids(store)
    dim = int(_attrs(store).get("dim", 0))
    size = _store_size(store)
    if size is None or size <= budget:
        ld = store.load()
        dim = int(ld.attrs.get("dim", dim) if getattr(ld, "attrs", None) else dim) or ld.data.shape[1]
        # float16 stores stay float16 in memory (half the RAM): batches are cast to float32 exactly
        data = np.asarray(ld.data, np.float16 if getattr(ld.data, "dtype", None) == np.float16 else np.float32)
        offsets, lengths = np.asarray(ld.offsets), np.asarray(ld.lengths)
        if not data.flags.writeable:
            data = data.copy()
        mask = None if ld.mask is None else np.asarray(ld.mask, bool)
        mask = _finite_mask(data, mask, ld.ids, offsets, lengths, store)
        valid = None
        if invalid_frames == "keep" and mask is not None:  # aligned: zeroed in place, validity kept
            valid = mask
        if mask is not None and invalid_frames in ("zero", "keep"):
            data = np.where(mask[:, None], data, 0).astype(data.dtype)
            # keep the frames, but an utterance with no valid frame at all is absent
            cs = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            lengths = np.where(cs[offsets + lengths] - cs[offsets] > 0, lengths, 0)
        elif mask is not None:
            data, offsets, lengths = _compact(data, mask, offsets, lengths)
        row = {u: i for i, u in enumerate(ld.ids)}
        sel = np.array([row.get(u, -1) for u in ids])
        ok = (sel >= 0) & np.array([u not in failed for u in ids])
        off = np.where(ok, offsets[np.maximum(sel, 0)], 0) if len(offsets) else np.zeros(len(ids), np.int64)
        ln = np.where(ok, lengths[np.maximum(sel, 0)], 0) if len(lengths) else np.zeros(len(ids), np.int64)
        return Sequences(data, off, ln, dim, valid=valid)

    # too large for memory: read per batch, in store order, one batch ahead (train.streaming)
    from train.streaming import StreamedSequences

    return StreamedSequences(store, ids, invalid_frames, failed)
