"""Maintenance of feature stores: the format-1 upgrade, compaction (``imer store gc``), and
listing stores and the leftovers of crashed runs in the cache."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from pipeline.cache import CacheError, cache_root
from pipeline.store_format import FORMAT, OK, _create, store_lock


class StoreMaintenance:
    """upgrade / compact for :class:`pipeline.store.FeatureStore` (uses its arrays and entries)."""

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
        new = type(self)(tmp).refresh(write=True)
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



def _listing(d: Path) -> list[Path]:
    """``d``'s entries (not hidden ones), sorted; an unlistable folder is a CacheError (glob would
    just find nothing there, and the cache would look empty)."""
    try:
        return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []
    except OSError as e:
        raise CacheError(f"{d}: the feature cache cannot be listed ({e.strerror or e}); check its permissions, "
                         "or point IMER_CACHE at another cache") from None


def list_stores(dataset: str | None = None) -> list[Path]:
    """Store directories under ``<cache>/stores`` (one dataset or all)."""
    root = cache_root() / "stores"
    dirs = [root / dataset] if dataset else [p for p in _listing(root) if p.is_dir()]
    out = []
    for d in dirs:
        for p in _listing(d):
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
