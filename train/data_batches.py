"""Batches of the data module: rows grouped (shuffled, length-bucketed), padded, resampled or kept
at their aligned positions, normalised and collated into the batch dict described in
:mod:`train.data`. :class:`Batching` is a mixin of :class:`train.data.MultimodalData`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from train.conditions import MODALITIES

if TYPE_CHECKING:
    from train.data import Normalizer
    from train.data_sequences import Sequences


class Batching:
    """Batch construction over the rows of a :class:`train.data.MultimodalData` (its ``seqs``,
    ``max_len``, ``fixed_len``, ``resample_to``, ``aligned`` and ``steps``)."""

    def collate(self, idx, normalizer: Normalizer | None = None) -> dict:
        """A padded batch (torch tensors on the CPU) of rows ``idx``; see the docstring of ``train.data``."""
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
