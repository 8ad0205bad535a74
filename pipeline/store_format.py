"""Feature store format: one Zarr v3 group per (dataset, extractor configuration). This module holds
the layout, constants, errors, checksums, paths, locks and store creation.

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
codec, checked on every read) and every chunk is written even when it holds only the fill value
(asked again on every open for writing: zarr does not store that setting), so a missing chunk file
is damage, not zeros (stores written before that may lack all-zero ``index/status`` chunks, so
only the string columns of the index are checked for missing chunks). Each utterance's frames and mask also have their
CRC-32 in the index, checked whenever they are read (``load``, ``store[id]``) and by ``verify``:
this catches what the chunk checksums cannot (a chunk swapped for another valid one, a deleted
chunk read back as fill value). A damaged store raises :class:`StoreDamaged` naming the store and
``imer store repair``, which recomputes only the damaged utterances. A damaged index (a missing or
unreadable ``index/*`` chunk) cannot be repaired: the store has to be extracted again, and every
command says so. Format-1 stores (written before these checks) are rewritten once into format 2
on first open (one line says so).

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


def chunk_error(e: Exception) -> str:
    """Why a chunk could not be read, in words: zarr's crc32c mismatch ("Stored and computed checksum
    do not match. Stored: b'..'") says the file changed on disk; anything else is named by its first line."""
    text = str(e).splitlines()[0] if str(e) else ""
    if "checksum do not match" in text:
        return "fails its crc32c checksum (the file changed on disk)"
    return f"cannot be decoded ({type(e).__name__}: {text[:80]})" if text else f"cannot be decoded ({type(e).__name__})"


def index_damage_message(path, why: str, attrs: dict) -> str:
    """One line for an index that cannot be read: repair cannot help (the index is what names the
    utterances and where their frames are), so the store is extracted again."""
    ds, ext = attrs.get("dataset"), attrs.get("extractor")
    again = f"imer features --dataset {ds} --extractors {ext}" if ds and ext else "imer features"
    return (f"{path}: damaged feature store: its index cannot be read ({why}); `imer store repair` cannot rebuild "
            f"an index: remove the store (rm -r {path}) and run `{again}` again")


def _damage_message(path, damaged: dict) -> str:
    items = list(damaged.items())
    shown = ", ".join(f"{u!r} ({why})" for u, why in items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
    return f"{path}: damaged feature store: {len(items)} utterance(s) do not match what was written: {shown}; " + repair_hint(path)


def _crc(a: np.ndarray, start: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data, start)


def store_path(dataset: str, key: str, dtype: str = "float32", root: Path | None = None) -> Path:
    """``<cache>/stores/<dataset>/<key>`` (float16 stores get a ``-f16`` suffix: same config, other data);
    ``root`` replaces ``<cache>/stores`` (imer predict's throw-away stores)."""
    _check_dtype(dtype)
    root = cache_root() / "stores" if root is None else Path(root)
    return root / dataset / (key + ("-f16" if dtype == "float16" else ""))


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

