"""Integrity checks of a feature store: ``verify`` and ``damaged`` read every committed chunk
and compare every utterance with its checksum (mixed into :class:`pipeline.store.FeatureStore`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.store_format import _INDEX_V1, FAILED, FORMAT, OK, _crc, _damage_message


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
        or differ from their checksum (reads every chunk)."""
        self.refresh()
        return self._scan(False)[0]

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
                bad.append((lo, hi, f"{name} chunk {cs // c} unreadable: {str(e).splitlines()[0][:80]}"))
        return out

    def _scan(self, check_values: bool) -> tuple[dict[str, str], int | None]:
        """Read every committed frame once, in windows: (damaged {id: why}, first non-finite frame)."""
        a, f = self._arrays, self._frames
        live = sorted((e.offset, e.length, u) for u, e in self._entries.items() if e.status == OK and e.length > 0)
        damaged: dict[str, str] = {}
        crc_d: dict[str, int] = {}
        crc_m: dict[str, int] = {}
        nonfinite = None
        step = int(a["mask"].chunks[0])
        step = step * max(1, (1 << 24) // max(1, step * int(a["data"].shape[1]) * a["data"].dtype.itemsize))
        j0 = 0
        for s in range(0, f, step):
            t = min(f, s + step)
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

