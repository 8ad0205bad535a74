"""Remembered file digests of the stage runner: content hashes of the manifest's media and of model
files, kept across runs by (path, size, mtime, ctime, inode) in ``<stores>/<dataset>/_digests.json``,
so a run with nothing to do hashes no file (:func:`pipeline.runner.run_features`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from extract import base
from manifests.schema import Manifest
from pipeline.cache import cache_root
from pipeline.fsutil import atomic_write_json


def _digest_file(dataset: str, stores: Path | None = None) -> Path:
    return (cache_root() / "stores" if stores is None else Path(stores)) / dataset / "_digests.json"


def _media_paths(manifest: Manifest) -> set[str]:
    return {m.path for u in manifest for m in (u.audio, u.video) if m is not None}


def _stat_key(st) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _prime_digests(manifest: Manifest, stores: Path | None = None) -> dict:
    """Feed remembered content hashes of unchanged files (same size, mtime, ctime and inode: a
    rewrite changes ctime) to extract.base's per-process memo, so a no-op run hashes nothing:
    neither the manifest's media nor the model files hashed for store keys."""
    try:
        saved = json.loads(_digest_file(manifest.dataset, stores).read_text())
    except (OSError, ValueError):
        saved = {}
    for p, rec in saved.items():
        try:
            st = os.stat(p)
        except OSError:
            continue
        if rec[:4] == _stat_key(st):
            base._DIGESTS.setdefault((p, st.st_size, st.st_mtime_ns), rec[4])
    return saved


def _save_digests(manifest: Manifest, saved: dict, extra: set[str] = frozenset(), stores: Path | None = None) -> None:
    """Remember the digests of the manifest's media and of ``extra`` files (model files)."""
    new = {p: rec for p, rec in saved.items() if os.path.exists(p)}
    for p in _media_paths(manifest) | set(extra):
        try:
            st = os.stat(p)
        except OSError:
            continue
        d = base._DIGESTS.get((p, st.st_size, st.st_mtime_ns))
        if d is not None:
            new[p] = _stat_key(st) + [d]
    if new == saved:
        return
    path = _digest_file(manifest.dataset, stores)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, new, indent=None)
    except OSError:
        pass  # only a speed-up: a read-only cache still works
