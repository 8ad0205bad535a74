"""Run outputs: per fold / seed / test column metrics (JSON, CSV), Markdown tables laid out like
MMIN's Table 5 (mean ± std over folds x seeds; one table per protocol, its columns and average
from ``train.protocols``), training curves and a per-column bar chart.

Which test ids a result was tested on is part of what its numbers mean: the protocols' masks are
allocated by rank over the split (``train.protocols``), so the same fold name over another set of
ids (another manifest or fold file, a subset) gives other masks as well as other utterances.
result.json records ``test_ids``, an order-free hash of the ids tested (``ids_hash``); for runs
written before it, the hash is taken from the ids predictions.npz saved, else only the count
``n.test`` is known. ``run_test_ids`` and ``differing_test_ids`` are how reports refuse to mix them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.cache import config_hash
from pipeline.fsutil import atomic_savefig, atomic_write_text, file_digest, safe_name
from train import protocols
from train.metrics import NAMES, table_metrics

AVERAGE = protocols.AVERAGE[protocols.FIXED]  # mean over the six missing conditions, per fold x seed first


class ReportError(ValueError):
    """Runs (or results) that cannot be put in one table; the message says what differs."""


def read_json(path: Path, what: str = "") -> dict:
    """A run's JSON file, or a ReportError naming it when it is truncated or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: damaged ({type(e).__name__}: {str(e).splitlines()[0]}); {what or AGAIN}") from None


AGAIN = "run the same imer train command again to recompute it"

# What result.json vouches for (``seal``): itself and the fold's files that a report, predict or
# compare reads. history.json and the figures are drawings of what result.json already holds.
SEALED = ("best.pt", "predictions.npz")


def _result_digest(res: dict) -> str:
    body = {k: v for k, v in res.items() if k != "checksums"}
    # through JSON first: the digest of what result.json holds, numpy values written as JSON writes them
    return config_hash(json.loads(json.dumps(body, default=str)), 64)


def seal(job: Path, res: dict) -> dict:
    """``res`` with ``checksums``: SHA-256 of itself (less this entry) and of the fold's SEALED files;
    called just before result.json is written, after the files it vouches for."""
    sums = {"result.json": _result_digest(res)}
    sums.update({f: file_digest(Path(job) / f) for f in SEALED if (Path(job) / f).is_file()})
    return {**res, "checksums": sums}


def unsealed(job: Path, res: dict) -> str | None:
    """The first file of a fold that differs from (or lacks) what its result.json's checksums record
    ("result.json" when the result itself was edited); None when all agree or none are recorded
    (results written before checksums)."""
    sums = res.get("checksums")
    if not isinstance(sums, dict):
        return None
    if sums.get("result.json") != _result_digest(res):
        return "result.json"
    for f in SEALED:
        if f in sums and (not (Path(job) / f).is_file() or file_digest(Path(job) / f) != sums[f]):
            return f
    return None


def verified(job: Path) -> dict:
    """A fold's result.json, checked against its checksums: a ReportError naming the damaged or
    edited file otherwise. What report, compare and predict read a fold through."""
    job = Path(job)
    res = read_json(job / "result.json")
    bad = unsealed(job, res)
    if bad:
        where = "its own checksum" if bad == "result.json" else "the checksum result.json records"
        raise ReportError(f"{job / bad}: edited or damaged since it was written (it differs from {where}); "
                          f"{AGAIN} (or delete {job})")
    return res


def listed(run_dir: Path, name: str) -> list[Path]:
    """The ``folds/<fold>/seed<s>/`` folders holding ``name`` among the folds and seeds the run's
    ``run.json`` lists (all, where it lists none): comparisons of different seed sets share a run
    folder, so one with seeds 0-9 reuses the fold x seed runs of one with seed 0, and each reads only
    its own."""
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    folds = {safe_name(f) for f in meta.get("folds") or []}
    seeds = {f"seed{int(s)}" for s in meta.get("seeds") or []}
    return [p.parent for p in sorted(run_dir.glob(f"folds/*/seed*/{name}"))
            if (not folds or p.parent.parent.name in folds) and (not seeds or p.parent.name in seeds)]


def finished(run_dir: Path) -> list[tuple[Path, dict]]:
    """(folder, result) of every finished fold x seed the run lists (see ``listed``)."""
    return [(d, verified(d)) for d in listed(run_dir, "result.json")]


def collect(run_dir: Path, columns=None) -> list[dict]:
    """Every finished fold x seed result a run lists (see ``finished``); with ``columns``, each
    result's test metrics are cut to those columns (a reused model may carry columns another run
    evaluated)."""
    out = [r for _, r in finished(run_dir)]
    if columns is not None:
        keep = set(columns)
        for r in out:
            r["test"] = {c: m for c, m in r["test"].items() if c in keep}
    return out


def ids_hash(ids) -> str:
    """Order-free hash of utterance ids: result.json's ``test_ids``."""
    return config_hash(sorted(str(u) for u in ids), 16)


def job_test_ids(job: Path, res: dict) -> dict:
    """{"n": number, "hash": ids_hash} of the test ids one fold x seed was tested on: from
    result.json's ``test_ids``, else from the ids its predictions.npz saved (older runs), else the
    count alone (hash None; both None when nothing says)."""
    n, h = (res.get("n") or {}).get("test"), res.get("test_ids")
    pred = Path(job) / "predictions.npz"
    if h is None and pred.is_file():
        try:
            with np.load(pred, allow_pickle=False) as z:
                if "ids" in z.files:
                    ids = z["ids"]
                    n, h = len(ids), ids_hash(ids)
        except (OSError, ValueError, EOFError, KeyError):  # unreadable: the count is all there is
            pass
    return {"n": n, "hash": h}


def _differ(a: dict, b: dict) -> bool:
    """Two ``job_test_ids`` records name different test ids (unknown parts are not compared)."""
    return (a["hash"] is not None and b["hash"] is not None and a["hash"] != b["hash"]) or \
        (a["n"] is not None and b["n"] is not None and a["n"] != b["n"])


def _ids_text(t: dict) -> str:
    return f"{'?' if t['n'] is None else t['n']} test ids (hash {t['hash'] or 'not recorded'})"


def run_test_ids(run_dir: Path) -> dict[str, dict]:
    """{fold: ``job_test_ids`` record} of the finished fold x seed results a run lists; a ReportError
    when two seeds of one fold were tested on different ids (a stale result left in the folder)."""
    out: dict[str, dict] = {}
    first: dict[str, int] = {}
    for d, r in finished(run_dir):
        t, f = job_test_ids(d, r), r["fold"]
        if f not in out:
            out[f], first[f] = t, r["seed"]
        elif _differ(out[f], t):
            raise ReportError(f"{run_name(run_dir)}: fold {f} seed {r['seed']} was tested on {_ids_text(t)}, "
                              f"seed {first[f]} on {_ids_text(out[f])}; rerun it (or remove {d})")
        else:
            out = merge_test_ids(out, {f: t})
    return out


def merge_test_ids(a: dict, b: dict) -> dict:
    """Two agreeing ``run_test_ids`` as one: every fold of either, with what either knows of it."""
    out = {f: dict(t) for f, t in a.items()}
    for f, t in b.items():
        out[f] = {k: v if out.get(f, {}).get(k) is None else out[f][k] for k, v in t.items()}
    return out


def run_name(run_dir: Path) -> str:
    return f"{Path(run_dir).parent.name}'s run {Path(run_dir).name}"


def differing_test_ids(a: dict, b: dict, name_a: str = "one run", name_b: str = "the other") -> str | None:
    """None when two runs' ``run_test_ids`` agree on every fold both have, else one line saying
    where they differ, e.g. "fold f1: 16 test ids (hash 1a2b...) in baseline's run vs 12 test ids
    (hash 9f8e...) in mmin's run". Unrecorded parts are not compared (a run with neither hash nor
    count passes)."""
    for f in a:
        if f in b and _differ(a[f], b[f]):
            return f"fold {f}: {_ids_text(a[f])} in {name_a} vs {_ids_text(b[f])} in {name_b}"
    return None


def table_columns(results: list[dict]) -> list[tuple[str, list[str]]]:
    """(protocol, columns) groups of the test columns every result has."""
    if not results:
        return []
    common = set(results[0]["test"]).intersection(*(r["test"] for r in results[1:]))
    return protocols.groups(sorted(common))


def flat_columns(groups) -> list[str]:
    return [c for _, cols in groups for c in cols]


def records(results: list[dict]) -> list[dict]:
    """Flat rows: fold, seed, condition, then every metric."""
    rows = []
    for r in results:
        for cond, m in r["test"].items():
            rows.append({"fold": r["fold"], "seed": r["seed"], "condition": cond, **m})
    return rows


def summarize(results: list[dict], task: str) -> dict:
    """{metric: {column: (mean, std, n)}} over fold x seed runs; std is the sample std (0 for one
    run). Averages (of the six missing conditions, or of the nonzero MR / eta) are taken per run."""
    out: dict = {}
    columns = flat_columns(table_columns(results))
    for metric in table_metrics(task):
        cols: dict = {}
        for c in columns:
            vals = []
            for r in results:
                t = r["test"]
                if c in protocols.AVERAGE.values():
                    members = protocols.average_members(c, columns)
                    if members and all(k in t for k in members):
                        vals.append(np.mean([t[k][metric] for k in members]))
                elif c in t:
                    vals.append(t[c][metric])
            vals = np.asarray(vals, float)
            if len(vals):
                cols[c] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
        out[metric] = cols
    return out


def _cell(v) -> str:
    return "–" if v is None else f"{v[0]:.4f} ± {v[1]:.4f}"


def summary_columns(rows: dict[str, dict]) -> list[str]:
    """Columns of summarize() output, in table order."""
    cols = {c for summ in rows.values() for m in summ.values() for c in m}
    return flat_columns(protocols.groups(sorted(cols)))


def markdown_table(rows: dict[str, dict], task: str) -> str:
    """``rows`` = {model name: summarize(...)} -> Table-5-style Markdown, one table per protocol."""
    columns = summary_columns(rows)
    tables = []
    for _, cols in protocols.groups(columns):
        head = ["Model", "Metric", *[protocols.title(c, columns) for c in cols]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for model, summ in rows.items():
            for metric in table_metrics(task):
                cells = [_cell(summ.get(metric, {}).get(c)) for c in cols]
                lines.append(f"| {model} | {NAMES[metric]} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def override_note(cfg: dict) -> str:
    o = cfg.get("dataset_override")
    if not o:
        return ""
    return (f"Per-dataset config override for `{o['dataset']}` (train/configs/{cfg['name']}.yaml and bases): "
            f"`{json.dumps(o['changes'], sort_keys=True)}`.")


def write_run_outputs(run_dir: Path, cfg: dict, meta: dict) -> str:
    """Write metrics.json / metrics.csv / table.md / curves.png / conditions.png; return the table."""
    import csv
    import io

    run_dir = Path(run_dir)
    from train.run import eval_columns

    results = collect(run_dir, eval_columns(cfg))
    task = meta.get("task", "classification")
    summ = summarize(results, task)
    rows = records(results)
    atomic_write_text(run_dir / "metrics.json", json.dumps(
        {"method": cfg["name"], "dataset": meta.get("dataset"), "task": task,
         "summary": {m: {c: {"mean": v[0], "std": v[1], "n": v[2]} for c, v in cols.items()} for m, cols in summ.items()},
         "runs": results}, indent=1, default=float))
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # every row's columns, first-seen order
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())
    n_runs = len(results)
    table = markdown_table({cfg["name"]: summ}, task)
    note = override_note(cfg)
    doc = [f"# {cfg['name']} on {meta.get('dataset')}", "",
           f"Test results, mean ± std over {n_runs} fold × seed run(s) "
           f"(folds: {', '.join(sorted({r['fold'] for r in results}))}; seeds: {', '.join(str(s) for s in sorted({r['seed'] for r in results}))}). "
           f"Model selection: validation {results[0]['select_metric'] if results else cfg.get('select', {}).get('metric')} pooled over "
           f"{{{', '.join(cfg.get('select', {}).get('conditions', []))}}}.", ""]
    if note:
        doc += [note, ""]
    doc += [table, ""]
    atomic_write_text(run_dir / "table.md", "\n".join(doc))
    # the figures are redrawn only when the results they show change (matplotlib costs a second to
    # load): a new or rewritten result, or another set of listed seeds in a shared compare folder
    drawn = "\n".join(f"{d.relative_to(run_dir)} {(d / 'result.json').stat().st_mtime_ns}"
                      for d in listed(run_dir, "result.json"))
    figs, marker = (run_dir / "curves.png", run_dir / "conditions.png"), run_dir / ".figures-drawn"
    if any(not f.is_file() for f in figs) or not marker.is_file() or marker.read_text() != drawn:
        plot_curves(results, figs[0], cfg["name"])
        plot_conditions({cfg["name"]: summ}, task, figs[1], f"{cfg['name']} on {meta.get('dataset')}")
        atomic_write_text(marker, drawn)
    return table


def plot_curves(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        h = r.get("history", [])
        if not h:
            continue
        ep = [e["epoch"] for e in h]
        label = f"{r['fold']}/s{r['seed']}"
        ax1.plot(ep, [e["loss"] for e in h], label=label, lw=1)
        ax2.plot(ep, [e["val_score"] for e in h], label=label, lw=1)
        if r.get("best_epoch"):
            ax2.axvline(r["best_epoch"], color=ax2.lines[-1].get_color(), ls=":", lw=0.8)
    metric = results[0].get("select_metric", "score") if results else "score"
    ax1.set(xlabel="epoch", ylabel="training loss", title=f"{title}: training loss")
    ax2.set(xlabel="epoch", ylabel=f"validation {NAMES.get(metric, metric)}",
            title="validation (dotted: selected epoch)")
    if len(results) <= 12:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def plot_conditions(rows: dict[str, dict], task: str, path: Path, title: str, metrics=None) -> None:
    """Grouped bars: one group per condition column, one bar per (model, metric), std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(metrics or table_metrics(task))
    series = [(model, m) for model in rows for m in metrics]
    columns = summary_columns(rows)
    x = np.arange(len(columns))
    w = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(columns) + 0.25 * len(series)), 4))
    for i, (model, m) in enumerate(series):
        cols = rows[model].get(m, {})
        mean = [cols.get(c, (np.nan, 0, 0))[0] for c in columns]
        std = [cols.get(c, (np.nan, 0, 0))[1] for c in columns]
        label = f"{model} {NAMES[m]}" if len(rows) > 1 else NAMES[m]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, mean, w, yerr=std, capsize=2, label=label)
    ax.set_xticks(x, [protocols.title(c, columns) for c in columns], rotation=45 if len(columns) > 10 else 0)
    ax.set(title=title, ylabel="score")
    ax.legend(fontsize=7, ncol=min(len(series), 4))
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)

