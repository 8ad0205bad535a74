"""Atomic file writes: the one way imer replaces a file a reader or a rerun may look at.

Each writer goes to a temp file in the same folder (unique per process and thread, so two
writers never share one) and renames it over the target: a reader sees the old file or the new
one, never half of either, and a killed writer leaves only a ``.tmp`` file behind.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path


def safe_name(name: str) -> str:
    """A file-system-safe form of a dataset, method or fold name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, **dumps) -> Path:
    """``json.dumps(obj, **dumps)`` written atomically (``indent=1`` unless given)."""
    dumps.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(obj, **dumps))


def atomic_write_lines(path: str | Path, lines) -> Path:
    """Lines (an iterable of str, without newlines) written atomically; the iterable may raise
    (e.g. a validation error), which leaves the old file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` through a temp file: an interruption never leaves half a checkpoint."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        torch.save(plain(obj), tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def plain(obj):
    """``obj`` with numpy scalars and arrays turned into Python numbers and lists (tensors, dicts,
    lists and tuples kept): what ``torch.load(weights_only=True)`` accepts back."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    return obj


class UnsafeCheckpoint(ValueError):
    """A checkpoint that holds more than tensors and JSON-like values (it could run code on load)."""


def safe_torch_load(path: str | Path, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists and dicts only. A
    file that needs anything else (a pickled class, a function: the way a crafted checkpoint runs
    code) is refused with :class:`UnsafeCheckpoint`, naming the file; nothing in it is executed."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln), lines[0] if lines else type(e).__name__)
        raise UnsafeCheckpoint(f"{path}: refused to load: it holds objects other than tensors and plain values "
                               f"({first}); only load checkpoints written by imer, or retrain") from None


def atomic_savefig(fig, path: str | Path, **kw) -> Path:
    """``fig.savefig`` through a temp file (the format taken from ``path``'s suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        fig.savefig(tmp, format=kw.pop("format", None) or path.suffix.lstrip(".") or "png", **kw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def file_digest(path: str | Path, algorithm: str = "sha256", **params) -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (``params``: e.g. blake2b's digest_size)."""
    import hashlib

    h = hashlib.new(algorithm, **params)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Busy(RuntimeError):
    """A lock another process holds (``process_lock``); ``pid`` is that process's id, if known."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by process {pid if pid is not None else '?'}")
        self.path, self.pid = path, pid


class process_lock:
    """An exclusive lock on the file ``path`` (``filelock``'s flock, as the stores' locks), released
    by the OS when its holder dies; the holder's pid is kept in ``<path>.pid`` for the one line a
    second process prints. ``wait``: seconds to wait for it (0: raise :class:`Busy` at once)."""

    def __init__(self, path: str | Path, wait: float = 0):
        import filelock

        self.path = Path(path)
        self._lock = filelock.FileLock(str(self.path), timeout=wait)
        self._pid = self.path.with_name(self.path.name + ".pid")

    def __enter__(self):
        import filelock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            try:
                pid = int(self._pid.read_text().strip())
            except (OSError, ValueError):
                pid = None
            raise Busy(self.path, pid) from None
        atomic_write_text(self._pid, str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self._pid.unlink(missing_ok=True)
        self._lock.release()
        return False
