"""Run every bench/bench_*.py in turn (or only those named: `python bench/run.py store train`); each prints its figures and writes bench/results/<name>.json."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

here = Path(__file__).parent
sys.path.insert(0, str(here))  # so benches can `from common import write_result`
only = set(sys.argv[1:])
for script in sorted(here.glob("bench_*.py")):
    name = script.stem.removeprefix("bench_")
    if only and name not in only:
        continue
    print(f"== bench {name}", flush=True)
    t = time.perf_counter()
    sys.argv = [str(script)]  # each bench parses its own (default) arguments, not the selection
    runpy.run_path(str(script), run_name="__main__")
    print(f"== bench {name} done in {time.perf_counter() - t:.1f} s", flush=True)
