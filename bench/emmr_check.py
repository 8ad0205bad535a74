"""EMMR's key-missing check on the test split: how often it fires, and whether the ensemble's output
(R = r, Eq. 13) beats the plain classifier's (R = F) on exactly the rows where it fires.

    PYTHONPATH=$PWD .venv/bin/python bench/emmr_check.py RUN_DIR [--columns a,v,t,...] [--json OUT.json]

RUN_DIR is a finished run folder of ``emmr`` (or an ablation with the ensemble), as ``imer train``
or ``imer compare`` wrote it: ``results/<dataset>/<method>/<run-id>/`` with
``folds/<fold>/seed<s>/best.pt`` for the folds and seeds its ``run.json`` lists. The data are
rebuilt from the run's ``config.yaml`` and ``run.json`` (dataset, manifest, fold protocol; the data
signature must match). Each fold x seed's ``best.pt`` is evaluated on its fold's test split
through ``train.trainer.evaluate``, the evaluator of the run itself: the same protocol masks
(utterance id, column, seed), normaliser, batch size and RNG. The model is wrapped so that its
``predict`` returns the ensemble output, the R = F output and the check's flag per row; the
ensemble output is compared with the run's ``predictions.npz`` (it must be the same numbers).

Columns: the config's test columns (``eval.conditions``), or ``--columns``. Printed: a Markdown
table pooled over folds x seeds (per column: test rows, rows the check runs on, rows where it
fires, accuracy of each output on the fired rows, and the paired counts where one is right and
the other wrong), one per fold (pooled over seeds), and the provenance (command, git commit, CPU
model, torch threads, date). Pooled over seeds, a test utterance counts once per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COUNTS = ("n", "checked", "fired", "ens_right", "f_right", "ens_only", "f_only")


class CheckView(torch.nn.Module):
    """An EMMR model whose ``predict`` returns [ensemble output | R = F output | checked | fired]
    per row (checked: the row misses one or two modalities, so the check runs on it)."""

    def __init__(self, emmr):
        super().__init__()
        self.emmr = emmr

    def predict(self, batch):
        p = self.emmr.forward_parts(batch)
        checked = torch.zeros_like(p["fire"])
        checked[p["check"]] = True
        flags = torch.stack([checked, p["fire"]], 1).to(p["out"].dtype)
        return torch.cat([p["out"], p["out_f"], flags], 1)


def check_outputs(model, data, idx, columns, normalizer, batch_size: int, seed: int) -> dict:
    """{column: {"y", "out", "out_f", "fired", "checked", "index"}} on rows ``idx``, from
    ``trainer.evaluate`` (the run's own masks and batches)."""
    from train.trainer import evaluate

    res = evaluate(CheckView(model), data, idx, columns, normalizer, batch_size, "cpu", False, seed=seed,
                   phase="test", share=False)
    out = {}
    for c, r in res.items():
        C = (r["out"].shape[1] - 2) // 2
        out[c] = {"y": r["y"], "index": r["index"], "out": r["out"][:, :C], "out_f": r["out"][:, C:2 * C],
                  "checked": r["out"][:, -2] > 0.5, "fired": r["out"][:, -1] > 0.5}
    return out


def counts(r: dict) -> dict:
    f = r["fired"]
    ens, plain = r["out"][f].argmax(1) == r["y"][f], r["out_f"][f].argmax(1) == r["y"][f]
    return {"n": len(r["y"]), "checked": int(r["checked"].sum()), "fired": int(f.sum()),
            "ens_right": int(ens.sum()), "f_right": int(plain.sum()),
            "ens_only": int((ens & ~plain).sum()), "f_only": int((plain & ~ens).sum())}


def run_check(run_dir, data=None, folds=None, columns=None, data_root=None, log=print) -> dict:
    """Counts per (fold, seed, column) of a finished EMMR run, and the largest difference between
    the recomputed ensemble outputs and the run's saved test predictions."""
    import yaml

    from train.results import finished
    from train.run import eval_columns
    from train.trainer import load_checkpoint

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    meta = json.loads((run_dir / "run.json").read_text())
    if data is None:
        data, folds = load_data(cfg, meta, data_root)
    columns = list(columns or eval_columns(cfg))
    bs = max(int(cfg["train"]["batch_size"]), 256)  # as the run's test (train.run)
    per, worst = [], 0.0
    for d, res in finished(run_dir):
        fold = next(f for f in folds if f.name == res["fold"])
        model, norm, _ = load_checkpoint(d / "best.pt")
        if not getattr(model, "ensemble", False):  # emmr-tf: R = F everywhere
            raise SystemExit(f"{d}: {model.name} runs no key-missing check (model.ensemble is false)")
        idx = data.indices(fold.test, f"fold {fold.name} test")
        with torch.no_grad():
            outs = check_outputs(model, data, idx, columns, norm, bs, int(res["seed"]))
        saved = dict(np.load(d / "predictions.npz")) if (d / "predictions.npz").is_file() else {}
        for c, r in outs.items():
            if f"{c}_out" in saved:
                if not np.array_equal(saved[f"{c}_index"], r["index"]):
                    raise SystemExit(f"{d}: the test rows of {c} differ from the run's predictions.npz")
                worst = max(worst, float(np.abs(saved[f"{c}_out"] - r["out"]).max(initial=0.0)))
            per.append({"fold": fold.name, "seed": int(res["seed"]), "column": c, **counts(r)})
        log(f"  fold {fold.name} seed {res['seed']}: {len(outs)} columns")
    if not per:
        raise SystemExit(f"{run_dir}: no finished fold x seed (folds/<fold>/seed<s>/result.json)")
    return {"run": str(run_dir), "method": meta.get("method"), "dataset": meta.get("dataset"),
            "columns": columns, "rows": per, "max_abs_diff_vs_predictions": worst}


def load_data(cfg: dict, meta: dict, data_root=None):
    """The run's data module and folds, rebuilt as ``imer train`` / ``imer compare`` built them."""
    from manifests.datasets import manifest_and_folds
    from train.run import build_data, ensure_stores

    dataset = meta["dataset"]
    man, _, folds = manifest_and_folds(dataset, data_root, meta.get("manifest"),
                                       meta.get("protocol") or cfg.get("fold_protocol"))
    data = build_data(man, ensure_stores(dataset, cfg, "cpu", None, meta.get("manifest")), cfg)
    if meta.get("data_signature") and data.signature != meta["data_signature"]:
        raise SystemExit(f"the data rebuilt for {dataset} differ from the run's (signature {data.signature} vs "
                         f"{meta['data_signature']}): features or manifest changed since")
    return data, folds


# ---- tables ----------------------------------------------------------------------------------------

def pool(rows, key=lambda r: r["column"]) -> dict:
    out: dict = {}
    for r in rows:
        acc = out.setdefault(key(r), dict.fromkeys(COUNTS, 0))
        for k in COUNTS:
            acc[k] += r[k]
    return out


def _acc(k: int, n: int) -> str:
    return f"{k / n:.3f}" if n else "–"


def markdown(result: dict) -> str:
    cols, rows = result["columns"], result["rows"]
    pairs = sorted({(r["fold"], r["seed"]) for r in rows})
    folds = sorted({f for f, _ in pairs})
    seeds = sorted({s for _, s in pairs})
    lines = [f"{result['method']} on {result['dataset']}: {len(folds)} folds x {len(seeds)} seeds "
             f"({len(pairs)} pairs), test split; pooled over folds x seeds.", "",
             "| column | test rows | checked | fired | fired / test rows | acc ensemble (fired) | "
             "acc R = F (fired) | ensemble − R = F | ens right, F wrong | F right, ens wrong |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    total = pool(rows)
    for c in cols:
        t = total[c]
        gap = f"{(t['ens_right'] - t['f_right']) / t['fired']:+.3f}" if t["fired"] else "–"
        lines.append(f"| {c} | {t['n']} | {t['checked']} | {t['fired']} | {t['fired'] / t['n']:.3f} | "
                     f"{_acc(t['ens_right'], t['fired'])} | {_acc(t['f_right'], t['fired'])} | {gap} | "
                     f"{t['ens_only']} | {t['f_only']} |")
    lines += ["", "Per fold (pooled over seeds): fired / test rows; accuracy on the fired rows, ensemble vs R = F.", "",
              "| column | " + " | ".join(folds) + " |", "|---|" + "---|" * len(folds)]
    by_fold = pool(rows, key=lambda r: (r["column"], r["fold"]))
    for c in cols:
        cells = []
        for f in folds:
            t = by_fold[(c, f)]
            ens, plain = _acc(t["ens_right"], t["fired"]), _acc(t["f_right"], t["fired"])
            cells.append(f"{t['fired']}/{t['n']}: {ens} vs {plain}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(argv) -> dict:
    """Where the counts came from (the shared ``pipeline.provenance``, as every pasted table)."""
    from pipeline.provenance import commit, machine

    return {"command": " ".join(argv), "commit": commit(), "machine": machine(),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="results/<dataset>/emmr/<run-id>/ of a finished run")
    ap.add_argument("--columns", default=None, help="comma-separated test columns (default: the config's)")
    ap.add_argument("--data-root", default=None, help="the corpus root, where the run needed one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the counts per fold x seed x column here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cols = [c.strip() for c in args.columns.split(",")] if args.columns else None
    result = run_check(args.run_dir, columns=cols, data_root=args.data_root)
    prov = {**provenance(sys.argv), "wall_s": round(time.perf_counter() - t0, 1)}
    print()
    print(markdown(result))
    print()
    print(f"The recomputed ensemble outputs differ from the run's predictions.npz by at most "
          f"{result['max_abs_diff_vs_predictions']:.2e}.")
    print(f"Command: `{prov['command']}`; commit {prov['commit']}; {prov['machine']}, "
          f"{prov['torch_threads']} torch thread(s); {prov['date']}; {prov['wall_s']} s.")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "provenance": prov}, indent=2))


if __name__ == "__main__":
    main()
