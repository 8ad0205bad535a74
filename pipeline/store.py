"""Feature stores: :class:`FeatureStore` reads and appends to one Zarr v3 group per (dataset,
extractor configuration). The on-disk format (layout, checksums, the append-only index and its
commit point, locks) is described in :mod:`pipeline.store_format`; integrity checks live in
:mod:`pipeline.store_integrity`, compaction and listing in :mod:`pipeline.store_maint`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

# every name below stays importable from pipeline.store (callers and tests use them from here)
from pipeline.store_format import (_INDEX, _INDEX_V1, DTYPES, FAILED, FORMAT, LOCK_TIMEOUT_S, OK,  # noqa: F401
                                   LoadedStore, StoreDamaged, StoreError, _check_dtype, _chunk_frames, _crc,
                                   _create, _damage_message, _Entry, _now, chunk_error, index_damage_message, lock_path,
                                   repair_hint, store_lock, store_path)
from pipeline.store_integrity import StoreChecks
from pipeline.store_maint import StoreMaintenance, _alive, list_stores, stale_dirs  # noqa: F401


class FeatureStore(StoreChecks, StoreMaintenance):
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
                    _create(path, int(dim), dict(attrs), str(dtype),
                            chunk_frames or _chunk_frames(int(dim), np.dtype(dtype).itemsize))
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
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                if isinstance(e, PermissionError):  # not damage: nothing to remove
                    raise StoreError(f"{self.path}: the store cannot be read ({why}); check its permissions") from None
                if not (self.path / "zarr.json").is_file():
                    raise StoreError(f"{self.path}: not a readable zarr group ({why})") from None
                # the store's own metadata is damaged: nothing left says what the store holds
                raise StoreError(f"{self.path}: damaged feature store: its zarr.json cannot be read ({why}); it cannot "
                                 f"be repaired: remove it (rm -r {self.path}) and run `imer features` again") from None
            attrs = dict(g.attrs)
            if attrs.get("imer_store") not in (1, FORMAT):
                raise StoreError(f"{self.path}: not an imer feature store (no imer_store={FORMAT} attribute)")
            cols = _INDEX if attrs["imer_store"] >= 2 else _INDEX_V1
            try:
                com = attrs.get("committed", {})
                n, frames = int(com.get("entries", 0)), int(com.get("frames", 0))
                arrays = {"data": g["data"], "mask": g["mask"], **{k: g[f"index/{k}"] for k in cols}}
                if write:  # the runtime config is not stored: ask again that every chunk be written
                    arrays = {k: v.with_config({"write_empty_chunks": True}) for k, v in arrays.items()}
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
        missing = self._missing_index_chunks(start, stop)
        if missing:  # zarr would read it back as empty ids and zero offsets
            raise StoreDamaged(index_damage_message(self.path, ", ".join(missing[:3]), self.attrs))
        cols = {}
        for k in (k for k in _INDEX if k in a):
            try:
                cols[k] = a[k][start:stop]
            except Exception as e:  # noqa: BLE001 - crc32c mismatch or an undecodable index chunk
                why = f"a chunk of index/{k} {chunk_error(e)}"
                raise StoreDamaged(index_damage_message(self.path, why, self.attrs)) from None
        ids, fps, notes = (cols[k].tolist() for k in ("ids", "fingerprints", "notes"))
        crc = "crc_data" in cols
        for j in range(stop - start):
            self._entries.pop(ids[j], None)  # re-insert: dict order = order of the live entries
            self._entries[ids[j]] = _Entry(start + j, int(cols["status"][j]), int(cols["offsets"][j]),
                                           int(cols["lengths"][j]), fps[j], notes[j],
                                           int(cols["crc_data"][j]) if crc else None,
                                           int(cols["crc_mask"][j]) if crc else None)

    def _missing_index_chunks(self, start: int, stop: int) -> list[str]:
        """Index chunk files covering rows [start, stop) that are gone. Only the string columns are
        checked: no valid row holds their fill value "", while an all-zero chunk of status (all OK)
        was not written by stores made before writes asked for every chunk."""
        if self.format < 2 or stop <= start:
            return []
        out = []
        for k in ("ids", "fingerprints", "notes"):
            arr = self._arrays.get(k)
            if arr is None:
                continue
            c = int(arr.chunks[0])
            for i in range(start // c, (stop - 1) // c + 1):
                if not (self.path / "index" / k / arr.metadata.chunk_key_encoding.encode_chunk_key((i,))).is_file():
                    out.append(f"index/{k} chunk {i} missing")
        return out

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
            why = f"a {name} chunk {chunk_error(err)}"
            raise StoreDamaged(_damage_message(self.path, {utt_id: why}), {utt_id: why}) from None
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
            raise StoreDamaged(f"{self.path}: damaged feature store: a chunk {chunk_error(e)}; "
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
            if np.all(np.isfinite(x)):  # the extractor's values, not one bad utterance: all would fail
                raise StoreError(f"{self.path}: float16 cannot hold this extractor's values (|x| reaches "
                                 f"{float(np.abs(x).max()):.3g}, float16 stops at 65504); extract it in "
                                 "float32 (leave out --dtype float16 / data.store_dtype)")
            return "non-finite values (NaN/Inf) in features"
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
        if k:  # the chunks just written, as written: the planning scan reads them only if they change
            self._record_chunks(self._chunk_stats(f0, f0 + k), writing=True)

