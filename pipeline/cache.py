"""Where imer keeps shared state: the feature cache root and canonical config hashing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """`IMER_CACHE`, else `$XDG_CACHE_HOME/imer`, else `~/.cache/imer`. Several checkouts may share it."""
    env = os.environ.get("IMER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "imer"


def canonical_json(obj) -> str:
    """JSON with sorted keys and no whitespace, so equal configs hash equally in every checkout."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj, n: int = 12) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]
