"""Every trained method of a dataset side by side: the latest complete run of each method in one
Table-5-style Markdown table (``results/<dataset>/report.md``) and one bar chart (``report.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from train.metrics import NAMES
from train.results import collect, markdown_table, plot_conditions, summarize
from train.run import _safe, newest_complete, read_runs, results_root

# Report order: the paper's rows first, then anything else alphabetically.
ORDER = ["baseline", "baseline-aug", "mmin", "mmin-ae", "mmin-nocycle", "if-mmin"]


def latest_runs(dataset: str, results_dir=None) -> dict[str, Path]:
    """{method: run directory} of the newest complete run of every method trained on ``dataset``."""
    root = results_root(results_dir) / _safe(dataset)
    by_method: dict[str, list] = {}
    for d, meta in read_runs(root, "*/*/run.json"):
        by_method.setdefault(meta.get("method") or d.parent.name, []).append((d, meta))
    runs = {m: newest_complete(rs) for m, rs in by_method.items()}
    runs = {m: d for m, d in runs.items() if d is not None}
    order = {m: i for i, m in enumerate(ORDER)}
    return {m: runs[m] for m in sorted(runs, key=lambda m: (order.get(m, len(ORDER)), m))}


def report(dataset: str, results_dir=None, write: bool = True) -> str:
    """The side-by-side table (Markdown) of every method's latest complete run on ``dataset``;
    also writes report.md and report.png next to the method folders when ``write``."""
    runs = latest_runs(dataset, results_dir)
    root = results_root(results_dir) / _safe(dataset)
    if not runs:
        return (f"No complete training run for dataset {dataset!r} under {root}; "
                f"train one first: imer train --dataset {dataset} --method baseline")
    rows, notes, task, select = {}, [], "classification", None
    for method, run_dir in runs.items():
        meta = json.loads((run_dir / "run.json").read_text())
        task = meta.get("task", task)
        results = collect(run_dir)
        if not results:
            continue
        select = select or results[0].get("select_metric")
        rows[method] = summarize(results, task)
        folds = sorted({r["fold"] for r in results})
        seeds = sorted({r["seed"] for r in results})
        notes.append(f"- `{method}`: run `{run_dir.name}`, {len(results)} fold × seed run(s) "
                     f"({len(folds)} fold(s), seeds {', '.join(map(str, seeds))}), "
                     f"selected on validation {results[0].get('select_metric')}")
    table = markdown_table(rows, task)
    if write:
        doc = [f"# {dataset}: every method's latest run", "",
               "Test results, mean ± std over folds × seeds; each condition keeps the listed modalities; "
               "Average = mean of the six missing-modality conditions.", "", table, "", *notes, ""]
        (root / "report.md").write_text("\n".join(doc))
        metric = select if select in ("ua", "wa", "f1", "acc2", "mae") else None
        plot_conditions(rows, task, root / "report.png", f"{dataset}: test {NAMES.get(metric, '')} per condition",
                        metrics=[metric] if metric else None)
    return table + "\n\n" + "\n".join(notes)
