"""Issue 13's one-at-a-time ablation: imer's defaults against the MMIN authors' code settings.

Variants (each applied to MMIN *and* to the baseline whose encoders it loads, so the prerequisite
is trained the same way): ``imer`` (PyTorch init, global gradient-norm clip, pooling that skips
the batch padding), then each authors' setting alone (``init``: kaiming_normal_ fan-in + zero
bias; ``clip``: each sub-network's gradient norm clipped separately; ``pool``: max-pool over the
padded steps too), then ``authors`` (all three). Every other setting is the config's for the
dataset (the demo's batch 16, lr 1e-3, 10 + 10 epochs).

    PYTHONPATH=$PWD .venv/bin/python bench/mmin_fidelity.py --dataset demo --seeds 0,1,2 [--folds 1,2,3] [--variants imer,init]

Trains through ``train.run.train_method`` (what ``imer train`` calls; finished runs are reused),
prints a Markdown table (test UA, mean ± std over folds x seeds: the missing-condition Average
and {a,v,t}) and writes bench/results/mmin_fidelity.json.
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

POOL = {f"model.encoders.{m}.pool_over_padding": True for m in "avt"}
IMER = {"model.init": {"kind": "default"}, "train.clip_grad_norm_per_module": False,
        **{k: False for k in POOL}}
VARIANTS = {
    "imer": {},
    "init": {"model.init": {"kind": "kaiming"}},
    "clip": {"train.clip_grad_norm_per_module": True},
    "pool": POOL,
    "authors": {"model.init": {"kind": "kaiming"}, "train.clip_grad_norm_per_module": True, **POOL},
}
LABELS = {"imer": "imer defaults (PyTorch init, global clip, masked pooling)",
          "init": "+ authors' init (kaiming, zero bias)", "clip": "+ authors' per-module clipping",
          "pool": "+ authors' pooling over padding", "authors": "all three (the authors' code)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--method", default="mmin", help="a method whose prerequisite is `baseline`")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--folds", default=None, help="e.g. 1,2,3 (default: all); a later call with more folds "
                    "extends the same runs (run id issue13-<variant>)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from train.config import load_config
    from train.results import AVERAGE, collect, summarize
    from train.run import train_method

    prereq = next(iter((load_config(args.method).get("requires") or {}).values()), None)
    out = {}
    for v in args.variants.split(","):
        ov = {**IMER, **VARIANTS[v]}
        t0 = time.perf_counter()
        run = train_method(args.dataset, args.method, folds=args.folds, seeds=args.seeds, overrides=ov,
                           run_id=f"issue13-{v}",
                           prereq_overrides={prereq: ov} if prereq else None, progress=False,
                           threads=args.threads)
        s = summarize(collect(run), "classification")["ua"]
        out[v] = {"run": str(run), "wall_s": time.perf_counter() - t0, "overrides": ov,
                  "average": s[AVERAGE], "avt": s["avt"]}
        print(f"{v}: Average {s[AVERAGE][0]:.3f} ± {s[AVERAGE][1]:.3f}, {{a,v,t}} {s['avt'][0]:.3f} ± "
              f"{s['avt'][1]:.3f} (n={s['avt'][2]}, {out[v]['wall_s']:.0f} s, {run})", flush=True)
    print(f"\n| {args.method} on {args.dataset} | Average | {{a,v,t}} |\n|---|---|---|")
    for v, r in out.items():
        print(f"| {LABELS[v]} | {r['average'][0]:.3f} ± {r['average'][1]:.3f} | {r['avt'][0]:.3f} ± {r['avt'][1]:.3f} |")
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    (res / "mmin_fidelity.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
