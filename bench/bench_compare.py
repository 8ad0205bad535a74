"""Scale-out of `imer compare` on the demo: the sweep's wall time with 1 and with 2 dask workers.

The same small comparison (default: baseline and baseline-aug, speaker folds 1-3, seed 0: 6 jobs;
all 6 folds took 14 min on the busy 2-core machine, too long for `make bench`) runs
twice, each time into a fresh temporary results root so nothing is reused: once on a LocalCluster
of 1 worker, once on 2. Both must give identical numbers (every job's test metrics equal); the
bench fails otherwise. The demo features are read from the cache (extracted first if missing,
before either timing starts). The machine's load average is recorded with the times: on a shared
machine the ratio says as much about the other work as about dask.

    .venv/bin/python bench/bench_compare.py [--methods baseline,baseline-aug] [--folds 1,2,3|all]
                                            [--seeds 0] [--workers 1,2]
Writes bench/results/compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def job_metrics(root: Path) -> dict:
    """{method/fold/seed: test metrics of every column} of every job under a results root."""
    out = {}
    for p in sorted(root.glob("demo/*/compare-*/folds/*/seed*/result.json")):
        r = json.loads(p.read_text())
        out[f"{r['method']}/{r['fold']}/s{r['seed']}"] = r["test"]
    return out


def run(methods, folds, seeds, workers: int, root: Path) -> dict:
    from train.compare import compare

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    out = compare("demo", methods, folds=folds, seeds=seeds, workers=workers, results_dir=root,
                  progress=False, log=lambda *_: None)
    total = time.perf_counter() - t0
    info = json.loads((out / "compare.json").read_text())
    if info["failed"] or info["reused_jobs"]:
        raise SystemExit(f"bench compare: {workers} worker(s): failed {info['failed']}, "
                         f"reused {info['reused_jobs']} (expected none)")
    return {"sweep_s": round(info["wall_s"], 1), "total_s": round(total, 1), "jobs": len(info["job_time_s"]),
            "job_s_sum": round(sum(info["job_time_s"].values()), 1),
            "load_avg_before": [round(v, 2) for v in load0], "load_avg_after": [round(v, 2) for v in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="baseline,baseline-aug")
    ap.add_argument("--folds", default="1,2,3", help="fold names or 1-based positions, or all")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workers", default="1,2", help="the worker counts to time, in order")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    folds = None if args.folds == "all" else args.folds
    seeds = [int(s) for s in args.seeds.split(",")]
    counts = [int(w) for w in args.workers.split(",")]

    from train.config import feature_set, load_config
    from train.run import ensure_stores

    for m in methods:  # extract what is missing now, outside the timings
        ensure_stores("demo", load_config(m, "demo", {"features": feature_set("demo")}), "cpu")

    figures, numbers = {}, {}
    with tempfile.TemporaryDirectory(prefix="imer-bench-compare-") as tmp:
        for w in counts:
            root = Path(tmp) / f"w{w}"  # fresh: nothing to reuse
            figures[f"workers_{w}"] = run(methods, folds, seeds, w, root)
            numbers[w] = job_metrics(root)
            print(f"  {w} worker(s): sweep {figures[f'workers_{w}']['sweep_s']} s", flush=True)
    first = numbers[counts[0]]
    identical = all(numbers[w] == first for w in counts)
    doc = {"methods": methods, "folds": args.folds, "seeds": seeds, "jobs": len(first), "identical_numbers": identical,
           "cpu_count": os.cpu_count(), **figures}
    if len(counts) > 1:
        a, b = figures[f"workers_{counts[0]}"]["sweep_s"], figures[f"workers_{counts[-1]}"]["sweep_s"]
        doc[f"ratio_{counts[0]}_to_{counts[-1]}"] = round(a / b, 2)  # > 1: more workers are faster
    write_result("compare", {"demo": doc})
    if not identical:
        diff = [k for k in first if any(numbers[w].get(k) != first[k] for w in counts)]
        raise SystemExit(f"bench compare: the worker counts gave different numbers for {diff}")


if __name__ == "__main__":  # dask's worker processes re-import this file: run only in the parent
    main()
