"""Integrity checks of a feature store: ``verify`` and ``damaged`` read every committed chunk
and compare every utterance with its checksum; ``damaged_changed`` (the planning scan of
``imer features`` / ``imer train``) reads only the chunks changed since they were last written or
verified (mixed into :class:`pipeline.store.FeatureStore`).

The chunk record (``imer_chunks.json`` in the store directory) holds the size and mtime of every
``data`` / ``mask`` chunk file as a commit wrote it or a full read found it intact. A chunk whose
file is missing, unrecorded or differs in size or mtime is read again (with the utterances over
it), so a no-op run costs one ``stat`` per chunk, not a read of the whole store. What the record
cannot see (a file rewritten with its old size and its mtime set back) is still caught when the
utterance is read for training: every read checks the utterance's CRC (``load``, ``store[id]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.store_format import _INDEX_V1, FAILED, FORMAT, OK, _crc, _damage_message, chunk_error

CHUNK_RECORD = "imer_chunks.json"
# File systems stamp mtimes with a coarse clock (ext4: a few ms, FAT: 2 s): a chunk whose mtime is
# this close to the record's own is read again, once (git's "racily clean" rule), so a change made
# in the same clock tick as the record is not taken for the recorded state.
RACY_NS = 2_000_000_000


def _windows(live: list, frames: int, step: int, everything: bool):
    """(start, stop) frame windows of at most ``step`` frames, in order: all committed frames, or
    (``everything`` False) only those of the ``live`` (offset, length, id) utterances, merged."""
    if everything:
        yield from ((s, min(frames, s + step)) for s in range(0, frames, step))
        return
    spans: list[list[int]] = []
    for o, n, _ in live:
        if spans and o <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], o + n)
        else:
            spans.append([o, o + n])
    for lo, hi in spans:
        yield from ((s, min(hi, s + step)) for s in range(lo, hi, step))


class StoreChecks:
    """verify / damaged for :class:`pipeline.store.FeatureStore` (uses its arrays and entries)."""

    def verify(self, check_values: bool = True) -> list[str]:
        """Problems found (empty = consistent): index/data agreement, shapes, dtypes, every chunk
        present and readable, every utterance equal to its checksum, and (``check_values``) NaN/Inf."""
        self.refresh()
        a, n, f, p = self._arrays, self._n, self._frames, []
        dim, dtype = self.attrs.get("dim"), self.attrs.get("dtype")
        if a["data"].ndim != 2 or a["data"].shape[1] != dim:
            p.append(f"data has shape {a['data'].shape}, attrs say dim={dim}")
        if str(a["data"].dtype) != dtype:
            p.append(f"data dtype {a['data'].dtype} != attrs dtype {dtype}")
        cols = {k: a[k][:n] for k in _INDEX_V1}
        offs, lens, status = cols["offsets"], cols["lengths"], cols["status"]
        expect = np.concatenate([[0], np.cumsum(lens)[:-1]]) if n else offs
        if n and (lens.min() < 0 or not np.array_equal(offs, expect)):
            p.append("index offsets are not the running sum of lengths")
        if int(lens.sum()) != f:
            p.append(f"index lengths sum to {int(lens.sum())} frames, commit point says {f}"
                     " (`imer store gc` rewrites the store without the frames no entry owns)")
        if n and not np.isin(status, (OK, FAILED)).all():
            p.append("index status holds values other than 0/1")
        if n and np.any(lens[status == FAILED] != 0):
            p.append("failed entries with frames")
        ids = cols["ids"].tolist()
        if any(not u for u in ids) or any(not x for x in cols["fingerprints"].tolist()):
            p.append("empty utterance id or fingerprint in the index")
        for j, note in enumerate(cols["notes"].tolist()):
            try:
                d = json.loads(note)
                if status[j] == FAILED and "reason" not in d:
                    raise ValueError
            except (ValueError, TypeError):
                p.append(f"entry {j} ({ids[j]!r}): bad note {note!r}")
                break
        damaged, nonfinite = self._scan(check_values)
        if damaged:
            p.append(_damage_message(self.path, damaged).split(": ", 1)[1])
        if nonfinite is not None:
            j = int(np.searchsorted(offs, nonfinite, side="right") - 1)
            p.append(f"NaN/Inf at frame {nonfinite} (utterance {ids[j]!r})")
        if self.format < FORMAT:
            p.append(f"format {self.format} store without checksums (could not be upgraded)")
        return p

    def damaged(self) -> dict[str, str]:
        """{utterance id: why} for every live utterance whose frames or mask are missing, unreadable
        or differ from their checksum (reads every chunk; an intact store's chunk record is renewed)."""
        self.refresh()
        now = self._chunk_stats()
        out = self._scan(False)[0]
        if not out:
            self._record_chunks(now)
        return out

    def damaged_changed(self, refresh: bool = True) -> dict[str, str]:
        """What :meth:`damaged` finds, reading only the chunks whose file changed since the chunk
        record (size, mtime; missing; unrecorded) and the utterances over them: the planning scan.
        ``refresh=False`` trusts the index read when the store was just opened."""
        if refresh:
            self.refresh()
        rec, now = self._read_record(), self._chunk_stats()
        try:  # a chunk written within RACY_NS of the record may have changed in the same mtime tick
            racy = os.stat(self._record_path()).st_mtime_ns - RACY_NS
        except OSError:
            racy = -1
        changed = {name: sorted(i for (n, i), st in now.items()
                                if n == name and (st is None or rec.get(f"{n}/{i}") != st or st[1] >= racy))
                   for name in ("data", "mask")}
        if not any(changed.values()):
            return {}
        live = [(u, e.offset, e.length) for u, e in self._entries.items() if e.status == OK and e.length > 0]
        first = np.array([o for _, o, _ in live], np.int64)
        last = first + np.array([n for _, _, n in live], np.int64) - 1
        hit = np.zeros(len(live), bool)
        for name, idx in changed.items():  # utterances with a frame in a changed chunk (prefix sums)
            c = int(self._arrays[name].chunks[0])
            flag = np.zeros(-(-self._frames // c) + 1, np.int64)
            flag[idx] = 1
            cs = np.concatenate([[0], np.cumsum(flag)])
            hit |= cs[last // c + 1] - cs[first // c] > 0
        out = self._scan(False, only={live[j][0] for j in np.flatnonzero(hit)})[0]
        if not out:
            self._record_chunks(now)
        return out

    # -- the chunk record -----------------------------------------------------------------------------
    def _record_path(self) -> Path:
        return self.path / CHUNK_RECORD

    def _read_record(self) -> dict:
        """{"data/i": [size, mtime_ns]} of this store generation ({} when absent, stale or unreadable)."""
        try:
            rec = json.loads(self._record_path().read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(rec, dict) or rec.get("generation") != self._generation:
            return {}
        return rec.get("chunks") if isinstance(rec.get("chunks"), dict) else {}

    def _chunk_stats(self, lo: int = 0, hi: int | None = None) -> dict[tuple[str, int], list | None]:
        """{(array, chunk index): [size, mtime_ns] or None (no file)} of the chunks holding
        committed frames [lo, hi)."""
        hi = self._frames if hi is None else hi
        out = {}
        for name in ("data", "mask"):
            c = int(self._arrays[name].chunks[0])
            for i in range(lo // c, -(-hi // c)):
                try:
                    st = os.stat(self._chunk_file(name, i))
                    out[(name, i)] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    out[(name, i)] = None
        return out

    def _record_chunks(self, stats: dict, writing: bool = False) -> None:
        """Add ``stats`` (from before the commit's lock was released or the verifying read began)
        to the chunk record. Best effort: a read-only cache or a busy lock leaves the record as it
        is (its chunks are then read again next time). ``writing``: the caller holds the lock."""
        from filelock import Timeout

        from pipeline.fsutil import atomic_write_json
        from pipeline.store_format import store_lock

        try:
            if writing:
                return self._write_record(stats, atomic_write_json)
            with store_lock(self.path, timeout=2):
                self._write_record(stats, atomic_write_json)
        except (OSError, Timeout):
            pass

    def _write_record(self, stats: dict, write) -> None:
        rec = self._read_record()
        rec.update({f"{n}/{i}": st for (n, i), st in stats.items() if st is not None})
        write(self._record_path(), {"generation": self._generation, "chunks": rec}, indent=None)

    def _chunk_file(self, name: str, i: int) -> Path:
        arr = self._arrays[name]
        key = arr.metadata.chunk_key_encoding.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        return self.path / name / key

    def _read_window(self, name: str, s: int, t: int, bad: list) -> np.ndarray:
        """Frames [s, t) of ``name``; unreadable or (format 2) missing chunks become zeros and a
        (start, stop, why) entry in ``bad``."""
        arr = self._arrays[name]
        c = int(arr.chunks[0])
        out = np.zeros((t - s,) + arr.shape[1:], dtype=arr.dtype)
        for cs in range(s - s % c, t, c):
            lo, hi = max(s, cs), min(t, cs + c)
            if self.format >= 2 and not self._chunk_file(name, cs // c).is_file():
                bad.append((lo, hi, f"{name} chunk {cs // c} missing"))
                continue
            try:
                out[lo - s:hi - s] = arr[lo:hi]
            except Exception as e:  # noqa: BLE001 - crc32c mismatch, undecodable chunk
                bad.append((lo, hi, f"{name} chunk {cs // c} {chunk_error(e)}"))
        return out

    def _scan(self, check_values: bool, only=None) -> tuple[dict[str, str], int | None]:
        """Read every committed frame once, in windows: (damaged {id: why}, first non-finite frame).
        ``only``: read just the frames of these utterances."""
        a, f = self._arrays, self._frames
        live = sorted((e.offset, e.length, u) for u, e in self._entries.items() if e.status == OK and e.length > 0
                      and (only is None or u in only))
        damaged: dict[str, str] = {}
        crc_d: dict[str, int] = {}
        crc_m: dict[str, int] = {}
        nonfinite = None
        step = int(a["mask"].chunks[0])
        step = step * max(1, (1 << 24) // max(1, step * int(a["data"].shape[1]) * a["data"].dtype.itemsize))
        j0 = 0
        for s, t in _windows(live, f, step, only is None):
            bad: list = []
            d, m = self._read_window("data", s, t, bad), self._read_window("mask", s, t, bad)
            if check_values and nonfinite is None:
                rows = ~np.isfinite(d).all(axis=1)
                if rows.any():
                    nonfinite = s + int(np.argmax(rows))
            while j0 < len(live) and live[j0][0] + live[j0][1] <= s:
                j0 += 1
            j = j0
            while j < len(live) and live[j][0] < t:
                o, n, u = live[j]
                lo, hi = max(o, s), min(o + n, t)
                for bs, bt, why in bad:
                    if bs < hi and lo < bt:
                        damaged.setdefault(u, why)
                crc_d[u] = _crc(d[lo - s:hi - s], crc_d.get(u, 0))
                crc_m[u] = _crc(m[lo - s:hi - s], crc_m.get(u, 0))
                j += 1
        for _, _, u in live:
            e = self._entries[u]
            if u in damaged or e.crc_data is None:
                continue
            if crc_d[u] != e.crc_data:
                damaged[u] = "frames differ from their checksum"
            elif crc_m[u] != e.crc_mask:
                damaged[u] = "frame mask differs from its checksum"
        return damaged, nonfinite

