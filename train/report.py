"""Every trained method of a dataset side by side: the latest complete run of each method in
Table-5-style Markdown tables (``results/<dataset>/report.md``) and bar charts (``report.png``).

Only comparable runs share a table: runs are grouped by what their numbers depend on besides the
method (features, fold protocol, folds, seeds, task and labels, and the test ids each fold was
tested on: ``train.results.run_test_ids``). ``methods=`` asks for one table of the named methods and
refuses, in one line, runs that differ.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from pipeline.fsutil import atomic_write_text, safe_name
from train.config import report_order
from train.metrics import NAMES
from train.results import (ReportError, collect, differing_test_ids, markdown_table, merge_test_ids, plot_conditions,
                           read_json, run_name, run_test_ids, summarize)
from train.run import eval_columns, newest_complete, read_runs, results_root


def latest_runs(dataset: str, results_dir=None, run_id: str | None = None) -> dict[str, Path]:
    """{method: run directory} of the newest complete run of every method trained on ``dataset``
    (``run_id``: only runs of that id, the ``imer train --run-id`` name)."""
    root = results_root(results_dir) / safe_name(dataset)
    by_method: dict[str, list] = {}
    for d, meta in read_runs(root, "*/*/run.json"):
        if run_id and d.name != safe_name(run_id):  # the folder name imer train gave it
            continue
        by_method.setdefault(meta.get("method") or d.parent.name, []).append((d, meta))
    runs = {m: newest_complete(rs) for m, rs in by_method.items()}
    return {m: runs[m] for m in report_order([m for m, d in runs.items() if d is not None])}


def run_unreadable(path: Path) -> bool:
    try:
        read_json(path)
        return False
    except (OSError, ReportError):
        return True


def comparability(meta: dict, run_dir: Path | None = None) -> dict:
    """What a run's numbers depend on besides the method: two runs share a table only if they do
    not differ (``differences``). Given the run's folder, the test ids of each fold too."""
    feats = meta.get("features") or {}
    key = {"features": {m: (f or {}).get("key") or (f or {}).get("name") for m, f in sorted(feats.items())},
           "fold protocol": meta.get("protocol"), "folds": meta.get("folds"), "seeds": meta.get("seeds"),
           "task": meta.get("task"), "labels": meta.get("labels")}
    if run_dir is not None:
        key["test ids"] = run_test_ids(run_dir)
    return key


def describe(key: dict, ids: bool = False) -> str:
    feats = ", ".join(f"{m} {k}" for m, k in key["features"].items())
    folds = key["folds"] or []
    text = (f"features {feats or '?'}; folds {key['fold protocol']} ({len(folds)}: {', '.join(map(str, folds))}); "
            f"seeds {', '.join(map(str, key['seeds'] or []))}; task {key['task']}")
    if ids:  # groups that differ in test ids alone
        sets = key["test ids"].items()
        text += "; test ids " + ", ".join(f"{f} {t['n']} ({(t['hash'] or '?')[:8]})" for f, t in sets)
    return text


def differences(a: dict, b: dict) -> list[str]:
    """The entries of two comparability keys that differ; test ids differ only where both runs
    record them and they disagree (``train.results.differing_test_ids``)."""
    return [k for k in a if (differing_test_ids(a[k], b.get(k, {})) is not None if k == "test ids"
                             else a[k] != b.get(k))]


def _load(run_dir: Path) -> tuple[dict, dict]:
    meta = read_json(run_dir / "run.json")
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    return meta, cfg or {}


def grouped(runs: dict[str, Path]) -> list[tuple[dict, dict[str, Path]]]:
    """[(comparability key, {method: run})] in order of first appearance; a group's "test ids" is
    what its members record of them together."""
    out: list[tuple[dict, dict[str, Path]]] = []
    for method, d in runs.items():
        key = comparability(_load(d)[0], d)
        for k, members in out:
            if not differences(k, key):
                members[method] = d
                k["test ids"] = merge_test_ids(k["test ids"], key["test ids"])
                break
        else:
            out.append((key, {method: d}))
    return out


def _refusal(groups) -> str:
    """One line: how the first two groups' runs differ, naming them."""
    (k0, g0), (k1, g1) = groups[0], groups[1]
    m0, m1 = next(iter(g0)), next(iter(g1))
    diff = differences(k0, k1)
    what = "; ".join(f"{w}: {k0[w]} ({m0}) vs {k1[w]} ({m1})" for w in diff if w != "test ids")
    if what:
        return (f"cannot put these runs in one table, they differ in {what}; retrain one of them with the "
                "other's settings (imer train ... --set / --folds / --seeds)")
    # the same settings, other test ids: name the two runs that disagree
    t1 = run_test_ids(g1[m1])
    for m, d in g0.items():
        line = differing_test_ids(run_test_ids(d), t1, run_name(d), run_name(g1[m1]))
        if line:
            break
    else:  # only the group's pooled record disagrees
        line = differing_test_ids(k0["test ids"], t1, "the runs of " + ", ".join(g0), run_name(g1[m1]))
    return (f"cannot put these runs in one table, they were tested on different test ids: {line}; retrain "
            "one of them on the other's manifest and folds (imer train ... --manifest / --protocol / --folds)")


def report(dataset: str, results_dir=None, write: bool = True, methods=None, run_id: str | None = None) -> str:
    """The side-by-side tables (Markdown) of every method's latest complete run on ``dataset``
    (of id ``run_id`` when given), one per group of comparable runs; also writes report.md and
    report[-N].png when ``write``."""
    runs = latest_runs(dataset, results_dir, run_id)
    root = results_root(results_dir) / safe_name(dataset)
    for p in sorted(root.glob("*/*/run.json")):  # latest_runs passes over them: say so
        if p.parent not in runs.values() and run_unreadable(p) and (not run_id or p.parent.name == safe_name(run_id)):
            print(f"imer report: skipping {p.parent}: its run.json is damaged; run its imer train command "
                  "again to redo it", file=sys.stderr)
    which = f"run {run_id!r}" if run_id else "run"
    again = f" --run-id {shlex.quote(run_id)}" if run_id else ""   # the train command that makes it
    if methods:
        from train.config import list_configs

        unknown = [m for m in methods if m not in list_configs() and m not in runs]
        if unknown:
            raise ReportError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(list_configs())}")
        missing = [m for m in methods if m not in runs]
        if missing:
            raise ReportError(f"no complete {which} of {', '.join(missing)} on {dataset!r} under {root}; "
                              f"train it first: imer train --dataset {dataset} --method {missing[0]}{again}")
        runs = {m: runs[m] for m in methods}
    if not runs:
        return (f"No complete training {which} for dataset {dataset!r} under {root}; "
                f"train one first: imer train --dataset {dataset} --method baseline{again}")
    groups = grouped(runs)
    if methods and len(groups) > 1:
        raise ReportError(_refusal(groups))
    out, doc = [], [f"# {dataset}: every method's {f'run {run_id}' if run_id else 'latest run'}", "",
                    "Test results, mean ± std over folds × seeds; each condition keeps the listed modalities; "
                    "Average = mean of the six missing-modality conditions (MR / η average: of the nonzero "
                    "rates / ratios). Only runs with the same features, folds, test ids, seeds and task share "
                    "a table.", ""]
    for gi, (key, members) in enumerate(groups):
        rows, notes, metric, task = _group_rows(members)
        table = markdown_table(rows, task)
        head = describe(key, ids=any(differences(k, key) == ["test ids"] for k, _ in groups if k is not key))
        out += ([f"## {head}", ""] if len(groups) > 1 else []) + [table, "", *notes, ""]
        doc += [f"## {head}", "", table, "", *notes, ""]
        if write:
            png = root / ("report.png" if gi == 0 else f"report-{gi + 1}.png")
            plot_conditions(rows, task, png,
                            f"{dataset}: test {NAMES.get(metric, '')} per condition", metrics=[metric] if metric else None)
    if write:
        atomic_write_text(root / "report.md", "\n".join(doc))
    return "\n".join(out).rstrip() + "\n"


def _group_rows(members: dict[str, Path]):
    """({method: summary}, notes, selection metric, task) of one group of comparable runs."""
    rows, notes, task, select = {}, [], "classification", None
    for method, d in members.items():
        meta, cfg = _load(d)
        task = meta.get("task", task)
        results = collect(d, eval_columns(cfg) if cfg else None)
        if not results:
            continue
        select = select or results[0].get("select_metric")
        rows[method] = summarize(results, task)
        notes.append(f"- `{method}`: run `{d.name}`, {len(results)} fold × seed run(s), "
                     f"selected on validation {results[0].get('select_metric')}")
    metric = select if select in ("ua", "wa", "f1", "acc2", "mae") else None
    return rows, notes, metric, task


def update_block(path, block: str, text: str) -> None:
    """Replace the lines between ``<!-- report:<block> -->`` and ``<!-- /report -->`` in the
    Markdown file ``path`` with ``text``: README tables are pasted by this, never by hand."""
    from pipeline.provenance import replace_block

    try:
        replace_block(path, block, text)
    except ValueError as e:
        raise ReportError(str(e)) from None
