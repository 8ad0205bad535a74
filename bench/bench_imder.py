"""IMDer's samplers on the demo: test score and evaluation wall time against the number of
score-network evaluations, for Euler-Maruyama at 100 / 50 / 20 / 10 steps and the probability-flow
ODE samplers (DPM-Solver-2 and Heun at 5 steps = 10 evaluations), none retrained.

Each trained fold of the newest complete IMDer run on the demo (one per task: classification and
regression, whichever exist; `--run DIR` picks one) is evaluated on its test split under the
missing-rate columns MR 0.1 ... 0.7 with the run's masks and seed; only the test sampler changes.
The refinement decoder and the fusion were trained on the run's training-time draws (EM, few steps
on the demo), so a sampler is judged by what it does to the task score, not by sample quality.
"Evaluations" counts the score-network calls of one draw of one missing modality (the sampler's
cost); ``score_calls`` is every call measured over the whole test evaluation.
Without a complete run, fold 1 of the demo IMDer is trained first.

    .venv/bin/python bench/bench_imder.py [--run DIR] [--folds 1,2|all] [--samplers em-100,dpm2-5] [--results results]
Writes bench/results/imder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

SAMPLERS = {"em-100": {"kind": "em", "steps": 100}, "em-50": {"kind": "em", "steps": 50},
            "em-20": {"kind": "em", "steps": 20}, "em-10": {"kind": "em", "steps": 10},
            "dpm2-5": {"kind": "dpm2", "steps": 5}, "heun-5": {"kind": "heun", "steps": 5}}
COLUMNS = [f"mr={r / 10:g}" for r in range(1, 8)]
METRICS = {"classification": ("ua", "wa"), "regression": ("acc2", "mae")}


def runs(root: Path, wanted: str | None) -> list[Path]:
    """The newest complete imder run per task (or the one asked for)."""
    from train.run import read_runs

    if wanted:
        return [Path(wanted)]
    newest: dict[str, tuple] = {}
    for d, meta in read_runs(root / "demo" / "imder"):
        if meta.get("status") == "complete":
            key = (meta.get("finished") or "", d.name)
            if meta.get("task") not in newest or key > newest[meta["task"]][0]:
                newest[meta["task"]] = (key, d)
    return [v[1] for v in newest.values()]


def bench_run(run: Path, folds, threads: int, samplers=tuple(SAMPLERS)) -> dict:
    import numpy as np
    import torch
    import yaml

    from manifests.datasets import load_folds, load_manifest
    from pipeline.device import torch_threads
    from train import metrics
    from train.diffusion import sampler_evals
    from train.run import build_data, ensure_stores
    from train.trainer import evaluate, load_checkpoint

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    meta = json.loads((run / "run.json").read_text())
    data = build_data(load_manifest("demo"), ensure_stores("demo", cfg, "cpu"), cfg)
    _, fold_list = load_folds("demo", meta.get("protocol"))
    wanted = None if folds is None else {w.strip() for w in str(folds).split(",")}
    chosen = [f for f in fold_list if f.name in meta["folds"] and (wanted is None or f.name in wanted)]
    if not chosen:
        raise SystemExit(f"{run}: none of the folds {sorted(wanted)} was trained (it has {meta['folds']})")
    task, out = data.task, {}
    for name in samplers:
        scfg = SAMPLERS[name]
        scores = {k: [] for k in METRICS[task]}
        wall = calls = 0.0
        for fold in chosen:
            for seed in meta["seeds"]:
                model, norm, _ = load_checkpoint(run / "folds" / fold.name / f"seed{seed}" / "best.pt")
                model.samplers["test"] = dict(scfg)
                counter = [0]
                hooks = [net.register_forward_hook(lambda *a, c=counter: c.__setitem__(0, c[0] + 1))
                         for net in (model.score.values() if model.score is not None else [])]
                te = data.indices(fold.test)
                with torch_threads("cpu", threads):
                    t0 = time.perf_counter()
                    res = evaluate(model, data, te, COLUMNS, norm, 256, "cpu", seed=seed, phase="test")
                    wall += time.perf_counter() - t0
                for h in hooks:
                    h.remove()
                calls += counter[0]
                for k in scores:
                    scores[k].append(np.mean([metrics.compute(task, r["y"], r["out"])[k] for r in res.values()]))
        out[name] = {"evaluations": sampler_evals(scfg), "score_calls": int(calls), "eval_wall_s": round(wall, 2),
                     **{f"{k}_mr_avg": round(float(np.mean(v)), 4) for k, v in scores.items()},
                     **{f"{k}_fold_std": round(float(np.std(v)), 4) for k, v in scores.items()}}
        print(f"  {task} {name:7s} {out[name]['evaluations']:4d} evaluations  "
              + "  ".join(f"{k} {out[name][f'{k}_mr_avg']:.4f}" for k in scores)
              + f"  eval {wall:.1f} s", flush=True)
    return {"run": str(run), "task": task, "folds": [f.name for f in chosen], "seeds": meta["seeds"],
            "columns": COLUMNS, "samplers": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="an imder run directory (default: the newest complete demo run per task)")
    ap.add_argument("--folds", default="1,2", help="fold names, comma-separated (default 1,2, those the run has: "
                    "EM-100 on all six takes about 10 minutes per task on 2 busy cores); 'all' for the run's")
    ap.add_argument("--results", default=os.environ.get("IMER_RESULTS", "results"), help="results root")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated, of {', '.join(SAMPLERS)}")
    a = ap.parse_args()
    root = Path(a.results)
    found = runs(root, a.run)
    if not found:
        from train.run import train_method

        print("no complete imder demo run: training fold 1 first", flush=True)
        train_method("demo", "imder", folds="1", results_dir=root, progress=False, threads=a.threads)
        found = runs(root, None)
    figures = {}
    for run in found:
        r = bench_run(run, None if a.folds == "all" else a.folds, a.threads, [s for s in a.samplers.split(",") if s])
        figures[f"demo-{r['task']}"] = r
    write_result("imder", figures)


if __name__ == "__main__":
    main()
