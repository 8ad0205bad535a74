"""Helpers shared by the benchmarks: where results go, and how they are written."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, figures: dict) -> Path:
    """Merge ``figures`` into bench/results/<name>.json (several benches may add to one file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.update(figures)
    doc["_machine"] = {"python": platform.python_version(), "machine": platform.machine(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(doc, indent=2))
    print(json.dumps(figures, indent=2))
    return path
