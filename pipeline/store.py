"""Feature stores: one Zarr v3 group per (dataset, extractor configuration).

Layout of ``<cache>/stores/<dataset>/<extractor.key>/``::

    zarr.json            group attributes: extractor, version, params, model, config, key, dim,
                         frame_rate, modality, dataset, dtype, imer_version, created, and
                         ``committed = {entries, frames}``: the commit point (written last)
    data                 (frames, dim) float32|float16, every utterance's frames concatenated,
                         chunked along frames, blosc-lz4 compressed (float features
                         barely compress: lz4 loads ~3x faster than zstd for ~10% more disk)
    mask                 (frames,) bool, False = frame not valid (e.g. no face)
    index/ids            (entries,) str   utterance id
    index/fingerprints   (entries,) str   hash of the source the entry was computed from
    index/offsets        (entries,) int64 first frame in ``data``
    index/lengths        (entries,) int64 number of frames (0 for a failure)
    index/status         (entries,) int8  0 = features, 1 = failed
    index/notes          (entries,) str   JSON: Output.info, or {"reason": ...} for a failure
    index/crc_data       (entries,) int64 CRC-32 of the utterance's data bytes (format 2)
    index/crc_mask       (entries,) int64 CRC-32 of its mask bytes (format 2)

Integrity (format 2): every chunk of every array carries a crc32c checksum (Zarr's ``crc32c``
codec, checked on every read) and every chunk is written even when it holds only the fill value,
so a missing chunk file is damage, not zeros. Each utterance's frames and mask also have their
CRC-32 in the index, checked whenever they are read (``load``, ``store[id]``) and by ``verify``:
this catches what the chunk checksums cannot (a chunk swapped for another valid one, a deleted
chunk read back as fill value). A damaged store raises :class:`StoreDamaged` naming the store and
``imer store repair``, which recomputes only the damaged utterances. Format-1 stores (written
before these checks) are rewritten once into format 2 on first open (one line says so).

The index is an append-only log: a recomputed utterance is appended and the last entry wins
(``imer store gc`` compacts). Writers append data and index rows past the commit point, then
rewrite the commit point; zarr's LocalStore writes every key atomically (temp file + rename), so
a reader that reads the commit point first sees only whole utterances, and a writer killed
mid-commit leaves rows past the commit point that the next commit overwrites. Commits from
several processes are serialised by a file lock next to the store (``<key>.lock``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.cache import cache_root

FORMAT = 2
OK, FAILED = 0, 1
DTYPES = ("float32", "float16")
_INDEX_V1 = ("ids", "fingerprints", "offsets", "lengths", "status", "notes")
_INDEX = _INDEX_V1 + ("crc_data", "crc_mask")
LOCK_TIMEOUT_S = 900  # a commit takes well under a second; waiting this long means a stuck process


class StoreError(RuntimeError):
    """A path that is not a usable imer store; the message names the path and what to do."""


class StoreDamaged(StoreError):
    """The store's files do not hold what was written (``.damaged``: {utterance id: why})."""

    def __init__(self, msg: str, damaged: dict | None = None):
        super().__init__(msg)
        self.damaged = dict(damaged or {})


def repair_hint(path) -> str:
    return f"repair it with `imer store repair {path}` (recomputes only the damaged utterances)"


def _damage_message(path, damaged: dict) -> str:
    items = list(damaged.items())
    shown = ", ".join(f"{u!r} ({why})" for u, why in items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
    return f"{path}: damaged feature store: {len(items)} utterance(s) do not match what was written: {shown}; " + repair_hint(path)


def _crc(a: np.ndarray, start: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data, start)


def store_path(dataset: str, key: str, dtype: str = "float32") -> Path:
    """``<cache>/stores/<dataset>/<key>`` (float16 stores get a ``-f16`` suffix: same config, other data)."""
    _check_dtype(dtype)
    return cache_root() / "stores" / dataset / (key + ("-f16" if dtype == "float16" else ""))


def lock_path(path: Path | str) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".lock")


def store_lock(path: Path | str, timeout: float = LOCK_TIMEOUT_S):
    import filelock

    return filelock.FileLock(str(lock_path(path)), timeout=timeout)


def _check_dtype(dtype: str) -> None:
    if str(dtype) not in DTYPES:
        raise ValueError(f"feature store dtype must be one of {DTYPES}, not {dtype!r}")


def _chunk_frames(dim: int, itemsize: int) -> int:
    """Frames per chunk: about 1 MiB uncompressed, a power of two in [1024, 262144]."""
    n = max(1, (1 << 20) // max(1, dim * itemsize))
    return int(min(262144, max(1024, 1 << (n.bit_length() - 1))))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class _Entry:
    pos: int
    status: int
    offset: int
    length: int
    fingerprint: str
    note: str
    crc_data: int | None = None  # None: a format-1 store (no content checks)
    crc_mask: int | None = None


@dataclass
class LoadedStore:
    """A whole store in memory: ``data[offsets[i]:offsets[i]+lengths[i]]`` are ``ids[i]``'s frames."""

    ids: list[str]
    data: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    attrs: dict
    _pos: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._pos = {u: i for i, u in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, utt_id) -> bool:
        return utt_id in self._pos

    def position(self, utt_id: str) -> int:
        try:
            return self._pos[utt_id]
        except KeyError:
            raise KeyError(f"utterance {utt_id!r} is not in this store") from None

    def get(self, utt_id: str) -> np.ndarray:
        i = self.position(utt_id)
        o = int(self.offsets[i])
        return self.data[o:o + int(self.lengths[i])]

    def get_mask(self, utt_id: str) -> np.ndarray:
        i = self.position(utt_id)
        o = int(self.offsets[i])
        return self.mask[o:o + int(self.lengths[i])]


class FeatureStore:
    """Read and append access to one store. Open with :meth:`open` or :meth:`open_or_create`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, _Entry] = {}
        self._n = 0  # entries read so far (== committed entries at the last refresh)
        self._frames = 0
        self._generation = None
        self.refresh()

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str) -> "FeatureStore":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: no feature store here; extract it with `imer features --dataset D "
                             f"--extractors NAME` (or list stores with `imer store ls`)")
        st = cls(path)
        if st.format < FORMAT:
            st._upgrade()
        return st

    @property
    def format(self) -> int:
        return int(self.attrs.get("imer_store", 1))

    def _upgrade(self) -> None:
        """Rewrite a format-1 store as format 2 (chunk and utterance checksums), once, in place."""
        try:
            with store_lock(self.path):
                self.refresh()
                if self.format >= FORMAT:
                    return
                self._rewrite()
            print(f"imer: upgraded feature store {self.path} to format {FORMAT} "
                  "(checksums on every chunk and utterance); this happens once", file=sys.stderr)
        except OSError as e:  # a read-only cache: keep reading it as it is, without content checks
            print(f"imer: cannot upgrade feature store {self.path} ({e}); reading it without checksums",
                  file=sys.stderr)

    @classmethod
    def open_or_create(cls, path: Path | str, *, dim: int, attrs: dict, dtype: str = "float32",
                       chunk_frames: int | None = None) -> "FeatureStore":
        """Open the store at ``path``, creating it (atomically, under the lock) if absent. An existing
        store must agree on ``dim``, ``dtype`` and, when given, ``attrs['key']``."""
        path = Path(path)
        _check_dtype(dtype)
        if not (path / "zarr.json").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with store_lock(path):
                if not (path / "zarr.json").is_file():
                    _create(path, int(dim), dict(attrs), str(dtype), chunk_frames)
        st = cls.open(path)
        want = {"dim": int(dim), "dtype": str(dtype)}
        if attrs.get("key") is not None:
            want["key"] = attrs["key"]
        for k, v in want.items():
            if st.attrs.get(k) != v:
                raise StoreError(f"{path}: existing store has {k}={st.attrs.get(k)!r}, this run wants {v!r}; "
                                 "remove the store directory or point IMER_CACHE elsewhere")
        return st

    def __reduce__(self):  # picklable by path (dask workers re-open it)
        return (FeatureStore.open, (str(self.path),))

    def refresh(self, write: bool = False) -> "FeatureStore":
        """Re-read the commit point and any index rows appended since the last read (all of it after gc).
        ``write`` opens the arrays for appending (callers hold the lock)."""
        import zarr

        for _ in range(20):
            try:
                g = zarr.open_group(str(self.path), mode="r+" if write else "r")
            except Exception as e:  # noqa: BLE001 - zarr raises several types for a non-store
                raise StoreError(f"{self.path}: not a readable zarr group ({type(e).__name__}: {e})") from None
            attrs = dict(g.attrs)
            if attrs.get("imer_store") not in (1, FORMAT):
                raise StoreError(f"{self.path}: not an imer feature store (no imer_store={FORMAT} attribute)")
            cols = _INDEX if attrs["imer_store"] >= 2 else _INDEX_V1
            try:
                com = attrs.get("committed", {})
                n, frames = int(com.get("entries", 0)), int(com.get("frames", 0))
                arrays = {"data": g["data"], "mask": g["mask"], **{k: g[f"index/{k}"] for k in cols}}
                dim = int(attrs["dim"])
            except Exception as e:  # noqa: BLE001 - a missing or damaged array / attribute
                raise StoreError(f"{self.path}: damaged feature store ({type(e).__name__}: {e}); remove it "
                                 f"(rm -r {self.path}) and run `imer features` again") from None
            if arrays["data"].ndim != 2 or arrays["data"].shape[1] != dim:
                raise StoreError(f"{self.path}: damaged feature store: zarr.json says dim={dim}, its data has shape "
                                 f"{arrays['data'].shape}; remove it (rm -r {self.path}) and run `imer features` again")
            # gc may swap the directory between reading the commit point and the arrays: retry then
            if all(a.shape[0] >= (frames if k in ("data", "mask") else n) for k, a in arrays.items()):
                break
            time.sleep(0.05)
        else:
            raise StoreError(f"{self.path}: damaged feature store: its arrays are shorter than its commit point "
                             f"(zarr.json 'committed'); remove it (rm -r {self.path}) and run `imer features` again")
        gen = attrs.get("generation")
        if gen != self._generation or n < self._n:
            self._entries, self._n = {}, 0
        self._group, self._arrays = g, arrays
        self.attrs = {k: v for k, v in attrs.items() if k != "committed"}
        self._generation = gen
        if n > self._n:
            self._read_entries(self._n, n)
        self._n, self._frames = n, frames
        return self

    def _read_entries(self, start: int, stop: int) -> None:
        a = self._arrays
        try:
            cols = {k: a[k][start:stop] for k in _INDEX if k in a}
        except Exception as e:  # noqa: BLE001 - crc32c mismatch or an undecodable index chunk
            raise StoreDamaged(f"{self.path}: damaged feature store: its index cannot be read ({type(e).__name__}: "
                               f"{e}); remove it (rm -r {self.path}) and run `imer features` again") from None
        ids, fps, notes = (cols[k].tolist() for k in ("ids", "fingerprints", "notes"))
        crc = "crc_data" in cols
        for j in range(stop - start):
            self._entries.pop(ids[j], None)  # re-insert: dict order = order of the live entries
            self._entries[ids[j]] = _Entry(start + j, int(cols["status"][j]), int(cols["offsets"][j]),
                                           int(cols["lengths"][j]), fps[j], notes[j],
                                           int(cols["crc_data"][j]) if crc else None,
                                           int(cols["crc_mask"][j]) if crc else None)

    # -- description -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def dtype(self) -> str:
        return str(self.attrs["dtype"])

    @property
    def modality(self) -> str | None:
        return self.attrs.get("modality")

    @property
    def frame_rate(self) -> float | None:
        return self.attrs.get("frame_rate")

    @property
    def key(self) -> str | None:
        return self.attrs.get("key")

    @property
    def n_entries(self) -> int:
        """Committed index rows, superseded ones included (``imer store gc`` drops those)."""
        return self._n

    @property
    def n_frames(self) -> int:
        return self._frames

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, utterances={len(self)}, dim={self.attrs.get('dim')})"

    # -- reading -----------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        return [u for u, e in self._entries.items() if e.status == OK]

    def __len__(self) -> int:
        return sum(e.status == OK for e in self._entries.values())

    def __contains__(self, utt_id) -> bool:
        e = self._entries.get(utt_id)
        return e is not None and e.status == OK

    def _ok(self, utt_id: str) -> _Entry:
        e = self._entries.get(utt_id)
        if e is None:
            raise KeyError(f"utterance {utt_id!r} is not in store {self.path}")
        if e.status != OK:
            raise KeyError(f"utterance {utt_id!r} failed extraction in {self.path}: {json.loads(e.note)['reason']}")
        return e

    def _read(self, utt_id: str, name: str) -> np.ndarray:
        """One utterance's frames (``data``) or mask, checked against its checksum."""
        e = self._ok(utt_id)
        try:
            x = self._arrays[name][e.offset:e.offset + e.length]
        except Exception as err:  # noqa: BLE001 - crc32c mismatch, undecodable chunk
            raise StoreDamaged(_damage_message(self.path, {utt_id: f"{name} unreadable: {err}"}), {utt_id: str(err)}) from None
        want = e.crc_data if name == "data" else e.crc_mask
        if want is not None and _crc(x) != want:
            why = f"{name} differs from its checksum"
            raise StoreDamaged(_damage_message(self.path, {utt_id: why}), {utt_id: why})
        return x

    def __getitem__(self, utt_id: str) -> np.ndarray:
        return self._read(utt_id, "data")

    def mask(self, utt_id: str) -> np.ndarray:
        return self._read(utt_id, "mask")

    def info(self, utt_id: str) -> dict:
        return json.loads(self._ok(utt_id).note or "{}")

    def fingerprint(self, utt_id: str) -> str:
        """Source fingerprint of the utterance's live entry (features or failure)."""
        e = self._entries.get(utt_id)
        if e is None:
            raise KeyError(f"utterance {utt_id!r} is not in store {self.path}")
        return e.fingerprint

    def state(self) -> dict[str, tuple[str, bool]]:
        """{id: (fingerprint, ok)} for every live entry; what the runner plans from."""
        return {u: (e.fingerprint, e.status == OK) for u, e in self._entries.items()}

    def failures(self) -> dict[str, dict]:
        return {u: {"reason": json.loads(e.note)["reason"], "fingerprint": e.fingerprint}
                for u, e in self._entries.items() if e.status == FAILED}

    def __iter__(self):
        for u in self.ids():
            yield u, self[u]

    def _live(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        ok = [(u, e) for u, e in self._entries.items() if e.status == OK]
        return ([u for u, _ in ok], np.array([e.offset for _, e in ok], dtype=np.int64),
                np.array([e.length for _, e in ok], dtype=np.int64))

    def load(self) -> LoadedStore:
        """Every utterance with features, in memory as one array (superseded frames left out).
        Raises StoreDamaged when a chunk cannot be read or an utterance differs from its checksum."""
        ids, offs, lens = self._live()
        try:
            data = self._arrays["data"][:self._frames]
            mask = self._arrays["mask"][:self._frames]
        except Exception as e:  # noqa: BLE001 - crc32c mismatch, undecodable chunk
            raise StoreDamaged(f"{self.path}: damaged feature store: a chunk cannot be read ({type(e).__name__}: {e}); "
                               f"`imer store verify {self.path}` names the utterances; " + repair_hint(self.path)) from None
        bad = {}
        for u, o, n in zip(ids, offs.tolist(), lens.tolist()):
            e = self._entries[u]
            if e.crc_data is not None and (_crc(data[o:o + n]) != e.crc_data or _crc(mask[o:o + n]) != e.crc_mask):
                bad[u] = "frames differ from their checksum"
        if bad:
            raise StoreDamaged(_damage_message(self.path, bad), bad)
        new_offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else offs
        if not np.array_equal(new_offs, offs) or int(lens.sum()) != self._frames:
            sel = np.concatenate([np.arange(o, o + n) for o, n in zip(offs, lens)]) if len(lens) else np.zeros(0, int)
            data, mask = data[sel], mask[sel]
        return LoadedStore(ids, np.ascontiguousarray(data), np.ascontiguousarray(mask), new_offs, lens, dict(self.attrs))

    def to_dask(self):
        """A lazy (frames, dim) dask array of the same frames, in the same order, as :meth:`load`."""
        import dask.array as da

        x = da.from_zarr(self._arrays["data"])[:self._frames]
        ids, offs, lens = self._live()
        if int(lens.sum()) == self._frames and np.array_equal(offs, np.concatenate([[0], np.cumsum(lens)[:-1]])):
            return x
        parts = [x[o:o + n] for o, n in zip(offs, lens) if n]
        return da.concatenate(parts) if parts else x[:0]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # -- writing -----------------------------------------------------------------------------------
    def commit(self, batch: dict, replace=()) -> list[str]:
        """Append ``{id: (Output | Failure, fingerprint)}`` under the store's lock; return the ids
        written. Ids another process already committed with the same fingerprint are skipped (a
        failure never replaces features of the same source), unless listed in ``replace`` (a
        repair of damaged entries). Outputs with the wrong shape or non-finite values are recorded
        as failures with the reason."""
        from extract.base import Failure

        if not batch:
            return []
        replace = set(replace)
        with store_lock(self.path):
            self.refresh(write=True)
            rows = []
            for uid, (res, fp) in batch.items():
                e = self._entries.get(uid)
                if (e is not None and e.fingerprint == fp and (e.status == OK or isinstance(res, Failure))
                        and uid not in replace):
                    continue
                rows.append((uid, self._checked(uid, res), str(fp)))
            if rows:
                self._append(rows)
            return [r[0] for r in rows]

    def _checked(self, uid: str, res):
        """(features, mask, note) or the failure reason (str) for one result."""
        from extract.base import Failure

        if isinstance(res, Failure):
            return str(res.reason)
        x = np.asarray(res.features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            return f"extractor returned features of shape {x.shape}, expected (frames, {self.dim})"
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
            y = x.astype(self.dtype)
        if not np.all(np.isfinite(y)):
            return f"non-finite values (NaN/Inf) in features{' after float16 conversion' if np.all(np.isfinite(x)) else ''}"
        m = np.ones(len(y), bool) if res.mask is None else np.asarray(res.mask, dtype=bool).reshape(-1)
        if len(m) != len(y):
            return f"mask has {len(m)} entries for {len(y)} frames"
        try:
            note = json.dumps(res.info or {})
        except TypeError as e:
            return f"Output.info is not JSON-serialisable ({e})"
        return y, m, note

    def _append(self, rows: list) -> None:
        n0, f0 = self._n, self._frames
        feats = [r[1] for r in rows if not isinstance(r[1], str)]
        lengths = np.array([0 if isinstance(r[1], str) else len(r[1][0]) for r in rows], dtype=np.int64)
        offsets = f0 + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        k, m = int(lengths.sum()), len(rows)
        a = self._arrays
        # data first, then the index, then the commit point: a crash before the last step leaves
        # rows past the commit point, which readers ignore and the next commit overwrites
        for name, arr in (("data", a["data"]), ("mask", a["mask"])):
            shape = (f0 + k,) + arr.shape[1:]
            if arr.shape != shape:
                arr.resize(shape)
            if k:
                vals = np.concatenate([f[0] if name == "data" else f[1] for f in feats])
                arr[f0:f0 + k] = vals
        crcs = [(0, 0) if isinstance(r[1], str) else (_crc(r[1][0]), _crc(r[1][1])) for r in rows]
        cols = {
            "crc_data": np.array([c[0] for c in crcs], dtype=np.int64),
            "crc_mask": np.array([c[1] for c in crcs], dtype=np.int64),
            "ids": np.array([r[0] for r in rows], dtype=object),
            "fingerprints": np.array([r[2] for r in rows], dtype=object),
            "offsets": offsets, "lengths": lengths,
            "status": np.array([FAILED if isinstance(r[1], str) else OK for r in rows], dtype=np.int8),
            "notes": np.array([json.dumps({"reason": r[1]}) if isinstance(r[1], str) else r[1][2] for r in rows],
                              dtype=object),
        }
        for name, vals in cols.items():
            if name not in a:  # a format-1 store read as it is (could not be upgraded)
                continue
            arr = a[name]
            if arr.shape != (n0 + m,):
                arr.resize((n0 + m,))
            arr[n0:n0 + m] = vals
        self._group.attrs.update({"committed": {"entries": n0 + m, "frames": f0 + k}, "updated": _now()})
        self.refresh(write=True)

    # -- maintenance -------------------------------------------------------------------------------
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

    def needs_rewrite(self) -> bool:
        """Superseded entries to drop, or committed frames no live entry owns (a lowered commit point)."""
        live = sum(e.length for e in self._entries.values())
        return len(self._entries) != self._n or live != self._frames

    def compact(self, drop=()) -> tuple[int, int]:
        """Rewrite the store without superseded entries (and without the live entries in ``drop``),
        same path, under the lock; returns (entries before, entries after). Readers that open while
        it swaps directories retry."""
        with store_lock(self.path):
            self.refresh()
            before = self._n
            if not self.needs_rewrite() and not (set(drop) & set(self._entries)):
                return before, before
            self._rewrite(drop)
            return before, self._n

    def _rewrite(self, drop=()) -> None:
        """Copy the live entries (minus ``drop``) into a fresh format-2 store and swap it in (caller holds the lock)."""
        drop = set(drop)
        tmp = self.path.with_name(f"{self.path.name}.gc-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        attrs = {k: v for k, v in self.attrs.items() if k not in ("imer_store", "committed")}
        _create(tmp, self.dim, attrs, self.dtype, int(self._arrays["data"].chunks[0]), keep_meta=True)
        new = FeatureStore(tmp).refresh(write=True)
        rows = []
        for uid, e in self._entries.items():
            if uid in drop:
                continue
            if e.status == OK:
                rows.append((uid, (self._read(uid, "data"), self._read(uid, "mask"), e.note), e.fingerprint))
            else:
                rows.append((uid, json.loads(e.note)["reason"], e.fingerprint))
            if len(rows) >= 512:
                new._append(rows)
                rows = []
        if rows:
            new._append(rows)
        old = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
        os.rename(self.path, old)
        os.rename(tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)
        self._generation = None  # force a full re-read
        self.refresh()


def _create(path: Path, dim: int, attrs: dict, dtype: str, chunk_frames: int | None, keep_meta: bool = False) -> None:
    """Build an empty store in a temp dir and rename it into place, so nobody sees half a store.
    Every array gets the crc32c codec and writes every chunk (a missing chunk is damage)."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    itemsize = np.dtype(dtype).itemsize
    cf = int(chunk_frames or _chunk_frames(dim, itemsize))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(str(tmp), mode="w")
    every = {"config": {"write_empty_chunks": True}}
    g.create_array("data", shape=(0, dim), chunks=(cf, dim), dtype=dtype, fill_value=0, **every,
                   compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize), Crc32cCodec()])
    g.create_array("mask", shape=(0,), chunks=(cf * 16,), dtype=bool, fill_value=False, **every,
                   compressors=[ZstdCodec(level=3), Crc32cCodec()])
    idx = g.create_group("index")
    for name, dt in (("ids", str), ("fingerprints", str), ("notes", str), ("offsets", "int64"),
                     ("lengths", "int64"), ("status", "int8"), ("crc_data", "int64"), ("crc_mask", "int64")):
        idx.create_array(name, shape=(0,), chunks=(4096,), dtype=dt, **every,
                         compressors=[ZstdCodec(level=3), Crc32cCodec()])
    meta = {} if keep_meta else {"imer_version": __version__, "created": _now()}
    g.attrs.update(json.loads(json.dumps({**attrs, **meta, "dim": dim, "dtype": dtype, "chunk_frames": cf,
                                          "imer_store": FORMAT, "generation": _now() + f"-{os.getpid()}",
                                          "committed": {"entries": 0, "frames": 0}}, default=str)))
    os.rename(tmp, path)


def list_stores(dataset: str | None = None) -> list[Path]:
    """Store directories under ``<cache>/stores`` (one dataset or all)."""
    root = cache_root() / "stores"
    dirs = [root / dataset] if dataset else sorted(p for p in root.glob("*") if p.is_dir())
    out = []
    for d in dirs:
        for p in sorted(d.glob("*")):
            if p.is_dir() and (p / "zarr.json").is_file() and "." not in p.name:
                out.append(p)
    return out


def stale_dirs(dataset: str | None = None) -> list[Path]:
    """Leftovers of crashed creations/compactions (``*.tmp-PID``, ``*.gc-PID``, ``*.old-PID``) and
    batch claims (``*.claims``) no run has touched for 10 minutes."""
    root = cache_root() / "stores"
    pats = ("*.tmp-*", "*.gc-*", "*.old-*", "*.claims")
    dirs = [root / dataset] if dataset else [p for p in root.glob("*") if p.is_dir()]
    out = []
    for p in sorted(p for d in dirs for pat in pats for p in d.glob(pat) if p.is_dir()):
        if p.suffix == ".claims":
            try:
                if time.time() - max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()]) > 600:
                    out.append(p)
            except OSError:  # a claim file came or went meanwhile: a run is active
                pass
            continue
        pid = p.name.rsplit("-", 1)[-1]
        # keep what a live process may still be writing (the pid test only holds on this host,
        # so also wait a while since the last change)
        if pid.isdigit() and (_alive(int(pid)) or time.time() - p.stat().st_mtime < 600):
            continue
        out.append(p)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
