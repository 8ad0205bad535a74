"""Where imer keeps shared state: the feature cache root and canonical config hashing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class CacheError(RuntimeError):
    """IMER_CACHE names something that cannot hold a cache (a file, or a path below one)."""


def cache_root() -> Path:
    """`IMER_CACHE`, else `$XDG_CACHE_HOME/imer`, else `~/.cache/imer`. Several checkouts may share it."""
    env = os.environ.get("IMER_CACHE")
    if env:
        root = Path(env).expanduser()
        check_dir_env("IMER_CACHE", root, CacheError)
        return root
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "imer"


def check_dir_env(var: str, path: Path, error=RuntimeError) -> None:
    """Raise ``error`` when ``path`` (from environment variable ``var``) or the nearest part of it
    that exists is not a directory: nothing could be created under it."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        where = "is" if p == path else f"is below {p}, which is"
        raise error(f"{var}={path} {where} not a directory; point {var} at a directory (it is created if missing)")


def canonical_json(obj) -> str:
    """JSON with sorted keys and no whitespace, so equal configs hash equally in every checkout."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj, n: int = 12) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]
