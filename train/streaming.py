"""Training on feature stores larger than the memory budget: per-batch reads, in chunk order, one
batch ahead.

``MultimodalData.from_stores`` keeps a store in memory when it fits the budget (``data.memory_budget``
in the method config, else ``IMER_DATA_MEMORY``, else half the available RAM; bytes, or with a
K/M/G suffix), and otherwise streams it through :class:`StreamedSequences`:

- what every batch needs is known up front (lengths, frame masks: one byte per frame, read once
  with their checksums), so batches, buckets and padding are the same as in memory;
- a batch's utterances are read together: sorted by their place in the store, the chunks they
  cover read once each, contiguous chunks in one call (the chunks of the previous read are kept,
  so reading the store in order decodes each chunk once);
- every utterance read is compared with its CRC-32 (damaged data never reaches a model);
- :func:`collated` reads and collates batch k+1 in a background thread while the caller trains
  on batch k (numpy, zlib and the zarr codecs release the GIL).

The batches equal the in-memory ones bit for bit (tests/test_streaming.py).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from train.data import Sequences

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(v) -> int:
    """``4e9``, ``"1G"``, ``"512M"`` -> bytes."""
    if isinstance(v, (int, float)):
        return int(v)
    s = str(v).strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1] if s and s[-1] in _UNITS else ""
    try:
        return int(float(s[: len(s) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"data.memory_budget / IMER_DATA_MEMORY: {v!r} is not a size (bytes, or e.g. 512M, 4G)") from None


def memory_budget(cfg_value=None) -> int:
    """Bytes of features held in memory: ``data.memory_budget``, else IMER_DATA_MEMORY, else half
    the currently available RAM."""
    if cfg_value is not None:
        return parse_bytes(cfg_value)
    env = os.environ.get("IMER_DATA_MEMORY")
    if env:
        return parse_bytes(env)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class StreamedSequences(Sequences):
    """One modality read from a :class:`pipeline.store.FeatureStore` when a batch needs it.
    ``invalid_frames``: "drop" (frames with mask False removed), "zero" (zeroed in place) or
    "keep" (zeroed in place, validity kept: an aligned source)."""

    def __init__(self, store, ids: list[str], invalid_frames: str, failed=frozenset()):
        from pipeline.store import StoreDamaged, _crc, _damage_message

        self.store, self.mode = store, invalid_frames
        self._arr = store._arrays["data"]
        self._cf = int(self._arr.chunks[0])
        self._damage = lambda u, why: StoreDamaged(_damage_message(store.path, {u: why}), {u: why})
        n = len(ids)
        self.src_off, self.src_len = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self._crc_data: list = [None] * n
        self._ids = list(ids)
        mask = store._arrays["mask"][: store.n_frames] if store.n_frames else np.zeros(0, bool)
        self._mask = np.asarray(mask, bool)
        lengths = np.zeros(n, np.int64)
        for i, u in enumerate(ids):
            e = store._entries.get(u)
            if e is None or e.status != 0 or u in failed or e.length == 0:
                continue
            m = self._mask[e.offset:e.offset + e.length]
            if e.crc_mask is not None and _crc(m) != e.crc_mask:
                raise self._damage(u, "frame mask differs from its checksum")
            self.src_off[i], self.src_len[i], self._crc_data[i] = e.offset, e.length, e.crc_data
            lengths[i] = int(m.sum()) if invalid_frames == "drop" else (e.length if m.any() else 0)
        self._crc = _crc
        self._local = threading.local()  # rows read ahead for the batch this thread collates
        self._lock = threading.Lock()
        self._chunks: dict[int, np.ndarray] = {}  # the chunks of the last read
        super().__init__(None, np.zeros(n, np.int64), lengths, int(store.dim), reader=self._row,
                         valid=self._row_valid if invalid_frames == "keep" else None)

    def nbytes(self) -> int:
        return 0  # nothing held in memory but the masks

    # -- reading -----------------------------------------------------------------------------------
    def _read_chunks(self, need: list[int]) -> dict[int, np.ndarray]:
        """{chunk: frames} for the sorted chunk indices ``need``: contiguous runs in one read each,
        chunks of the previous read reused."""
        out, todo = {}, []
        with self._lock:
            have = self._chunks
            for c in need:
                if c in have:
                    out[c] = have[c]
                else:
                    todo.append(c)
        runs: list[list[int]] = []
        for c in todo:
            if runs and c == runs[-1][1] + 1:
                runs[-1][1] = c
            else:
                runs.append([c, c])
        stop = self.store.n_frames
        for a, b in runs:
            try:
                x = self._arr[a * self._cf: min(stop, (b + 1) * self._cf)]
            except Exception as e:  # noqa: BLE001 - crc32c mismatch, undecodable chunk
                from pipeline.store import StoreDamaged, _damage_message, repair_hint

                raise StoreDamaged(f"{self.store.path}: damaged feature store: chunks {a}-{b} cannot be read "
                                   f"({type(e).__name__}: {str(e)[:80]}); `imer store verify {self.store.path}` names "
                                   f"the utterances; " + repair_hint(self.store.path)) from None
            for c in range(a, b + 1):
                out[c] = x[(c - a) * self._cf:(c - a + 1) * self._cf]
        with self._lock:
            self._chunks = out
        return out

    def read_rows(self, rows) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{row: (frames as the batch uses them, their validity)} of the present ``rows``, read
        in store order and checked against their checksums."""
        rows = [int(i) for i in np.unique(np.asarray(rows, np.int64)) if self.src_len[i] > 0]
        rows.sort(key=lambda i: self.src_off[i])
        cf = self._cf
        need = sorted({c for i in rows for c in range(self.src_off[i] // cf, (self.src_off[i] + self.src_len[i] - 1) // cf + 1)})
        chunks = self._read_chunks(need)
        out = {}
        for i in rows:
            o, n = int(self.src_off[i]), int(self.src_len[i])
            a, b = o // cf, (o + n - 1) // cf
            x = chunks[a][o - a * cf:o - a * cf + n] if a == b else \
                np.concatenate([chunks[c] for c in range(a, b + 1)])[o - a * cf:o - a * cf + n]
            checked = self._crc_data[i] is not None
            if checked and self._crc(x) != self._crc_data[i]:
                raise self._damage(self._ids[i], "frames differ from their checksum")
            out[i] = self._shape(x, self._mask[o:o + n], finite=checked)
        return out

    def _shape(self, x: np.ndarray, m: np.ndarray, finite: bool) -> tuple[np.ndarray, np.ndarray]:
        """Invalid frames dropped or zeroed as in memory. ``finite``: frames equal to their
        checksum are finite (commits refuse NaN/Inf); otherwise (a format-1 store) non-finite
        frames are zeroed and invalid."""
        x = np.asarray(x)
        ok = np.ones(len(x), bool) if finite else np.isfinite(x).all(1)
        if not ok.all():
            x, m = np.where(ok[:, None], x, 0), m & ok
        if self.mode == "drop":
            return (x if m.all() else x[m]), m[m]
        return (x if m.all() else np.where(m[:, None], x, 0).astype(x.dtype)), m

    def prefetch(self, rows) -> None:
        """Read ``rows`` for the next collate in this thread."""
        self._local.rows = self.read_rows(rows)

    def release(self) -> None:
        self._local.rows = {}

    def _get(self, i: int):
        got = getattr(self._local, "rows", {}).get(int(i))
        return got if got is not None else self.read_rows([i])[int(i)]

    def _row(self, i: int) -> np.ndarray:
        return self._get(i)[0]

    def _row_valid(self, i: int) -> np.ndarray:
        return self._get(i)[1]


def collated(data, rows: list, normalizer):
    """``data.collate(r, normalizer)`` for each r in ``rows``; with streamed modalities, batch k+1 is
    read and collated in a background thread while the caller uses batch k."""
    streamed = [s for s in data.seqs.values() if isinstance(s, StreamedSequences)]
    if not streamed:
        for r in rows:
            yield data.collate(r, normalizer)
        return

    def make(r):
        try:
            for s in streamed:
                s.prefetch(r)
            return data.collate(r, normalizer)
        finally:
            for s in streamed:
                s.release()

    pool = ThreadPoolExecutor(1, thread_name_prefix="imer-stream")
    try:
        nxt = pool.submit(make, rows[0]) if rows else None
        for k in range(len(rows)):
            batch = nxt.result()
            nxt = pool.submit(make, rows[k + 1]) if k + 1 < len(rows) else None
            yield batch
    finally:
        if nxt is not None:
            nxt.cancel()
        pool.shutdown(wait=True)
