"""The training step timed before vs after a change, on the same machine in the same run: two
worker processes, one importing the earlier code (``--before PATH``: a checkout of it, e.g.
``git worktree add /tmp/imer-before HEAD``) or, without it, this code with the unfused optimiser
(``IMER_UNFUSED_OPTIMIZER=1``), the other this code. The driver asks them in turn (before, after,
after, before, ...) to time each method's training steps through ``Trainer.train_epoch`` after one
warm-up step, so both see the same load; it reports the median ms per step over the rounds and
each side's training loss over the timed steps (the same computation gives the same loss up to
float rounding). Used by ``bench_train.py --steps``.

Data: the demo's fold 1 (one whole epoch per round, the config's batch size) and the IEMOCAP-sized
random set of ``bench_train.iemocap_like`` (``k`` batches of 128, length-bucketed as the
config says), both with each method's config for that data set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "@@step "  # result lines on the worker's stdout; anything else printed there is passed over


# ---- worker side ---------------------------------------------------------------------------------

def config_dataset(dataset: str) -> str:
    """The configs' data set: the demo's, or IEMOCAP's for the IEMOCAP-sized random set."""
    return "demo" if dataset == "demo" else "iemocap"


class Sets:
    """The data sets a worker times on, built once per feature set and shared by the methods."""

    def __init__(self, k: int):
        self.k, self.cache = k, {}

    def get(self, dataset: str, name: str):
        import bench_train as bt
        from train.config import load_config

        cfg = load_config(name, config_dataset(dataset))
        if dataset == "demo":
            from manifests.datasets import load_folds, load_manifest
            from train.run import build_data, ensure_stores

            key = ("demo", repr((cfg["features"], cfg.get("data", {}).get("max_len"))))
            if key not in self.cache:
                _, folds = load_folds("demo")
                d = build_data(load_manifest("demo"), ensure_stores("demo", cfg, "cpu"), cfg)
                self.cache[key] = (d, d.indices(folds[0].train), d.indices(folds[0].val))
            d, tr, va = self.cache[key]
        else:
            dims = bt.FEATURE_DIMS.get(name, bt.IEMOCAP["dims"])
            key = ("iemocap", tuple(sorted(dims.items())))
            n_train = 128 * (self.k + 1)
            if key not in self.cache:
                self.cache[key] = (bt.iemocap_like(n_train + 16, dims), np.arange(n_train), np.arange(n_train, n_train + 16))
            d, tr, va = self.cache[key]
            bt._with_lengths(d, name, "iemocap")
        d.resample_to = cfg.get("data", {}).get("resample_to") or None  # the method's data view
        return d, tr, va


def time_steps(sets: Sets, name: str, dataset: str) -> dict:
    """ms per training step of ``name`` (after one warm-up step), phases, the mean training loss."""
    import bench_train as bt
    from train.data import Normalizer
    from train.trainer import Trainer

    data, tr, va = sets.get(dataset, name)
    method, cfg = bt.build(name, config_dataset(dataset), data, "cpu")
    norm = Normalizer.fit(data, tr, cfg["data"].get("normalize", []))
    k = None if dataset == "demo" else sets.k  # the demo: a whole epoch
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(method, data, tr, va, cfg, tmp, device="cpu", normalizer=norm, progress=False)
        bs = int(cfg["train"]["batch_size"])
        opt, _, scaler, params = trainer.optimisation()
        trainer.train_epoch(0, opt, scaler, params, bs, max_batches=1)  # warm-up
        rec = trainer.train_epoch(1, opt, scaler, params, bs, max_batches=k)
    n = len(data.batch_rows(tr, bs, np.random.default_rng([0, 1]), bool(cfg["train"].get("drop_last")),
                            bool(cfg.get("data", {}).get("bucket", False)))[:k])
    return {"ms_per_step": 1000 * rec["train_time_s"] / n, "steps": n, "loss": rec["loss"],
            "phases_ms": {p: 1000 * v / n for p, v in rec["phases_s"].items()}}


def worker(code: str, k: int) -> None:
    """Answer one JSON request per stdin line ({"method", "dataset"}) with a MARK line."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_train  # noqa: F401  (puts this tree on sys.path; ``code`` goes before it)

    sys.path.insert(0, code)
    torch.set_num_threads(1)
    sets = Sets(k)
    for line in sys.stdin:
        req = json.loads(line)
        out = time_steps(sets, req["method"], req["dataset"])
        print(MARK + json.dumps(out), flush=True)


# ---- driver side ---------------------------------------------------------------------------------

class Worker:
    def __init__(self, code: Path, k: int, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--code", str(code),
                                      "--k", str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, cwd=str(code))

    def ask(self, name: str, dataset: str) -> dict:
        self.proc.stdin.write(json.dumps({"method": name, "dataset": dataset}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"the step worker ({' '.join(self.proc.args)}) stopped while timing {name} on {dataset}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare(methods, datasets, rounds: int = 3, k: int = 2, before: str | None = None, log=print) -> dict:
    """{dataset: {method: {"before_ms", "after_ms", "speedup", ...}}} (median over ``rounds``)."""
    code = Path(before).resolve() if before else ROOT
    if before and not (code / "train" / "trainer.py").is_file():
        raise SystemExit(f"--before {before}: no imer checkout there (train/trainer.py missing); "
                         "make one with `git worktree add /tmp/imer-before <commit>`")
    env = {} if before else {"IMER_UNFUSED_OPTIMIZER": "1"}
    sides = {"before": Worker(code, k, env), "after": Worker(ROOT, k, {"IMER_UNFUSED_OPTIMIZER": "0"})}
    out = {"before": str(code) if before else "this code, IMER_UNFUSED_OPTIMIZER=1", "rounds": rounds,
           "iemocap_batches": k}
    try:
        for ds in datasets:
            out[ds] = {}
            for name in methods:
                runs = {"before": [], "after": []}
                for r in range(rounds):
                    for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                        runs[side].append(sides[side].ask(name, ds))
                row = {}
                for side, rs in runs.items():
                    ms = [x["ms_per_step"] for x in rs]
                    mid = rs[int(np.argsort(ms)[len(ms) // 2])]
                    row[f"{side}_ms"] = round(float(np.median(ms)), 1)
                    row[f"{side}_ms_rounds"] = [round(x, 1) for x in ms]
                    row[f"{side}_phases_ms"] = {p: round(v, 1) for p, v in mid["phases_ms"].items()}
                    row[f"{side}_loss"] = rs[0]["loss"]
                row["steps"] = runs["after"][0]["steps"]
                row["speedup"] = round(row["before_ms"] / row["after_ms"], 2)
                row["loss_rel_diff"] = float(f"{abs(row['after_loss'] - row['before_loss']) / abs(row['before_loss']):.2e}")
                out[ds][name] = row
                log(f"  step {ds} {name}: {row['before_ms']} -> {row['after_ms']} ms/step (x{row['speedup']}), "
                    f"loss {row['before_loss']:.6f} vs {row['after_loss']:.6f}", flush=True)
    finally:
        for w in sides.values():
            w.close()
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--code", default=str(ROOT))
    ap.add_argument("--k", type=int, default=2)
    a = ap.parse_args()
    if not a.worker:
        raise SystemExit("run bench/bench_train.py --steps (this module is its step timer)")
    worker(a.code, a.k)
