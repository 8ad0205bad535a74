"""Per-modality frame sequences (:class:`Sequences`) and how they are read from feature stores:
invalid frames (no face, non-finite values) dropped, zeroed or, for an aligned source, zeroed in
place with their validity kept; a store too large for the memory budget is streamed
(``train.streaming``). :mod:`train.data` builds the data module from them.
"""

from __future__ import annotations

import warnings

import numpy as np


class DataError(ValueError):
    """Data that cannot be trained on; the message says which file or id and what to do."""


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
