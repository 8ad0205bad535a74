"""The comparison's report (Markdown + PNG): per protocol a table of methods x columns (mean ± std
over folds x seeds) with a rank row; paired Wilcoxon signed-rank tests (scipy) of each method
against the augmented baseline and against MMIN over the (fold, seed) pairs; the score against
missing rate and missing ratio for every method in one figure; confusion matrices; a t-SNE of the
imagination methods' joint representations under full and under missing input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.stats import nct, rankdata, t as student_t, wilcoxon

from pipeline.fsutil import atomic_savefig, atomic_write_text, safe_name
from train import protocols
from train.metrics import NAMES
from train.report import ReportError, comparability, differences
from train.results import collect, differing_test_ids, finished, read_json, run_name, verified

REFERENCES = ("baseline-aug", "mmin")
ALPHA = 0.05
POWER = 0.8     # the power at which the report states the smallest detectable gap
TARGET = 0.02   # the gap (2 points) for which it states how many pairs would be needed


def scores(run_dir: Path, metric: str, columns) -> dict[tuple[str, int], dict[str, float]]:
    """{(fold, seed): {column: score}} with protocol averages taken per (fold, seed)."""
    out = {}
    for r in collect(run_dir):
        t = r["test"]
        row = {c: t[c][metric] for c in columns if c in t}
        for avg in protocols.AVERAGE.values():
            members = protocols.average_members(avg, columns)
            if members and all(c in row for c in members):
                row[avg] = float(np.mean([row[c] for c in members]))
        out[(r["fold"], int(r["seed"]))] = row
    return out


def paired_test(a: dict, b: dict, column: str) -> dict:
    """Wilcoxon signed-rank test of a vs b over their common (fold, seed) pairs on ``column``."""
    pairs = sorted(set(a) & set(b))
    x = np.array([a[k][column] for k in pairs if column in a[k] and column in b[k]])
    y = np.array([b[k][column] for k in pairs if column in a[k] and column in b[k]])
    out = {"n": int(len(x)), "mean_diff": float(np.mean(x - y)) if len(x) else float("nan")}
    if len(x) < 2 or not np.any(x != y):
        return {**out, "statistic": float("nan"), "p": 1.0 if len(x) else float("nan"), "sd_diff": float("nan")}
    res = wilcoxon(x, y)
    return {**out, "statistic": float(res.statistic), "p": float(res.pvalue), "sd_diff": float(np.std(x - y, ddof=1))}


def paired_power(gap: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test with n pairs to detect a true mean difference ``gap``
    when the paired differences have standard deviation ``sd`` (noncentral t, exact)."""
    if n < 2 or sd <= 0:
        return float("nan")
    df, crit, nc = n - 1, student_t.ppf(1 - alpha / 2, n - 1), gap * np.sqrt(n) / sd
    lower = nct.cdf(-crit, df, nc)  # the wrong-sign tail: negligible here, and scipy can return NaN for it
    return float(nct.sf(crit, df, nc) + (lower if np.isfinite(lower) else 0.0))


def detectable_gap(sd: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true mean difference that n pairs with paired spread ``sd`` detect with ``power``
    (paired t-test; the Wilcoxon test the report runs needs about 5% more pairs, its asymptotic
    relative efficiency being 3/pi = 0.955 for normal differences)."""
    if n < 2 or not sd > 0:
        return float("nan")
    hi = sd
    while paired_power(hi, sd, n, alpha) < power:  # bracket (nct turns NaN far out in the tail)
        hi *= 2
    return float(brentq(lambda g: paired_power(g, sd, n, alpha) - power, 1e-9 * sd, hi))


def pairs_needed(gap: float, sd: float, power: float = POWER, alpha: float = ALPHA, most: int = 100000) -> int | None:
    """The fewest pairs at which a paired t-test detects ``gap`` with ``power`` (None: over ``most``)."""
    if not sd > 0:
        return None
    hi = 2
    while paired_power(gap, sd, hi, alpha) < power:  # power grows with n: bracket, then bisect
        hi *= 2
        if hi > most:
            return None
    lo = max(2, hi // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if paired_power(gap, sd, mid, alpha) < power else (lo, mid)
    return hi


def _check_comparable(runs: dict[str, Path]) -> None:
    """A ReportError naming the first run that differs from the first method's, and in what."""
    keys = {m: comparability(read_json(d / "run.json"), d) for m, d in runs.items()}
    first = next(iter(keys))
    for m, k in keys.items():
        diff = differences(keys[first], k)
        if diff:
            ids = differing_test_ids(keys[first]["test ids"], k["test ids"], run_name(runs[first]), run_name(runs[m]))
            what = ", ".join(f"test ids ({ids})" if w == "test ids" else w for w in diff)
            raise ReportError(f"{m}'s run differs from {first}'s in {what}; a comparison needs "
                              "identical features, folds, test ids, seeds and task")


def write_report(out_dir: Path, runs: dict[str, Path], info: dict, data_for=None, device: str = "cpu") -> str:
    """Write report.md, curves.png, confusion.png and (given ``data_for(method)``, the data module a
    method was trained on) tsne.png into ``out_dir``; return the Markdown."""
    if not runs:
        text = "No method finished a job; see compare.json for the errors.\n"
        atomic_write_text(out_dir / "report.md", text)
        return text
    _check_comparable(runs)
    meta = read_json(next(iter(runs.values())) / "run.json")
    task = meta.get("task", "classification")
    metric = "ua" if task == "classification" else "acc2"
    columns = list(info["columns"])
    sc = {m: scores(d, metric, columns) for m, d in runs.items()}
    doc = [f"# Comparison on {info['dataset']} ({info['id']})", "",
           f"Features: {_features(meta)}. Folds: {', '.join(info['folds'])}. Seeds: "
           f"{', '.join(map(str, info['seeds']))}. Task: {task}. Every method, its prerequisites included, "
           f"read these features and was tested on the same test ids (checked fold by fold) and masks (protocol "
           f"masks depend on the split's ids and their natural presence, the protocol and the seed). "
           f"Test {NAMES[metric]}, mean ± std over {len(info['folds']) * len(info['seeds'])} fold × seed pairs. "
           f"This invocation: {info['wall_s']:.0f} s with {info['workers']} worker(s), "
           f"{info.get('reused_jobs', 0)} of {len(info.get('job_time_s', {}))} jobs already finished (reused).", ""]
    for kind, cols in protocols.groups(columns):
        doc += [f"## {kind}", "", _table(sc, cols, columns), ""]
        avg = protocols.AVERAGE[kind] if protocols.AVERAGE[kind] in cols else cols[-1]
        doc += [_tests(sc, avg, columns), ""]
    if info.get("failed"):
        doc += ["## Failed jobs", "", *[f"- `{k}`: {v}" for k, v in info["failed"].items()], ""]
    plot_curves(sc, columns, out_dir / "curves.png", f"{info['dataset']}: test {NAMES[metric]}")
    plot_confusions(runs, meta.get("labels"), out_dir / "confusion.png", task)
    doc += ["![score against missing rate and ratio](curves.png)", "", "![confusion matrices](confusion.png)", ""]
    tsne = plot_tsne(runs, data_for, info, out_dir / "tsne.png", device) if data_for is not None else None
    if tsne:
        doc += ["![t-SNE of the joint representations, full vs missing input](tsne.png)", "",
                f"t-SNE of the joint representation each imagination method's classifier reads "
                f"({', '.join(tsne['methods'])}; `Method.represent`), on the test split of fold {tsne['fold']} "
                f"({tsne['n']} utterances) with the seed-{tsne['seed']} model, under full input (avt) and under "
                f"{protocols.title(tsne['column'])} (its protocol masks for seed {tsne['seed']}: {tsne['lose']} of "
                f"{tsne['n']} utterances lose at least one modality; the others are unchanged, their two points coincide). "
                "Top: full vs missing; bottom: by label.", ""]
    else:
        (out_dir / "tsne.png").unlink(missing_ok=True)  # no stale figure from an earlier report
    text = "\n".join(doc)
    atomic_write_text(out_dir / "report.md", text)
    return text


def _features(meta: dict) -> str:
    f = meta.get("features") or {}
    return ", ".join(f"{m} `{(v or {}).get('key') or (v or {}).get('name')}`" for m, v in sorted(f.items())) or "?"


def _table(sc: dict, cols: list[str], columns) -> str:
    """Methods x columns (mean ± std) and a rank row: each method's rank (1 = best) per column."""
    head = ["Method", *[protocols.title(c, columns) for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = []
    for m, rows in sc.items():
        vals = [np.array([r[c] for r in rows.values() if c in r]) for c in cols]
        means.append([float(v.mean()) if len(v) else np.nan for v in vals])
        cells = [f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}" if len(v) else "–" for v in vals]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    mat = np.array(means)
    ranks = np.column_stack([rankdata(-mat[:, j]) for j in range(mat.shape[1])])
    order = list(sc)
    lines.append("| rank (1 = best) | " + " | ".join(
        ", ".join(f"{order[i]} {ranks[i, j]:g}" for i in np.argsort(ranks[:, j], kind="stable")) for j in range(len(cols))) + " |")
    return "\n".join(lines)


def _tests(sc: dict, column: str, columns) -> str:
    refs = [r for r in REFERENCES if r in sc]
    if not refs:
        return f"(No paired test: neither {' nor '.join(REFERENCES)} is in the comparison.)"
    title = protocols.title(column, columns)
    lines = [f"Paired Wilcoxon signed-rank tests on {title} over (fold, seed) pairs "
             f"(α = {ALPHA}):", "", "| Method | " + " | ".join(f"vs {r}: Δ, p" for r in refs) + " |",
             "|" + "---|" * (len(refs) + 1)]
    power = ["", f"What these pairs can detect: the smallest true gap found with {POWER:.0%} power by a paired "
             f"t-test at α = {ALPHA}, from the spread (sd) of the observed paired differences, and the pairs a "
             f"{TARGET * 100:g}-point gap would need at that spread:", "",
             "| Method | " + " | ".join(f"vs {r}: sd, detectable, pairs for {TARGET * 100:g} points" for r in refs) + " |",
             "|" + "---|" * (len(refs) + 1)]
    for m in sc:
        cells, pcells = [], []
        for r in refs:
            if m == r:
                cells.append("—")
                pcells.append("—")
                continue
            t = paired_test(sc[m], sc[r], column)
            verdict = "significant" if t["p"] < ALPHA else "not significant"
            cells.append(f"{t['mean_diff']:+.4f}, p = {t['p']:.3g} ({verdict}, n = {t['n']})")
            sd = t["sd_diff"]
            need = pairs_needed(TARGET, sd)
            pcells.append(f"{sd:.4f}, {detectable_gap(sd, t['n']):.4f}, {need if need else '–'}" if sd > 0 else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
        power.append(f"| {m} | " + " | ".join(pcells) + " |")
    return "\n".join(lines + power)


def plot_curves(sc: dict, columns, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k, _ in protocols.groups(columns) if k != protocols.FIXED]
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cols = [c for c in dict(protocols.groups(columns))[kind] if c not in protocols.AVERAGE.values()]
        xs = [protocols.parse(c)[1] for c in cols]
        for m, rows in sc.items():
            mean = [np.mean([r[c] for r in rows.values() if c in r]) for c in cols]
            ax.plot(xs, mean, marker="o", lw=1.2, label=m)
        ax.set(xlabel="missing rate MR" if kind == protocols.RATE else "missing ratio η", ylabel="score",
               title=f"{title} vs {kind}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def plot_confusions(runs: dict[str, Path], labels, path: Path, task: str) -> None:
    """Per method: confusion over all test predictions, full input and pooled missing conditions."""
    if task != "classification":
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    k = len(labels or [])
    fig, axes = plt.subplots(2, len(runs), figsize=(2.6 * len(runs), 5.2), squeeze=False)
    for j, (m, d) in enumerate(runs.items()):
        for i, (name, conds) in enumerate((("full", ["avt"]), ("missing", list(protocols.MISSING_CONDITIONS)))):
            ys, ps = [], []
            for f in [fd / "predictions.npz" for fd, _ in finished(d) if (fd / "predictions.npz").is_file()]:
                z = np.load(f, allow_pickle=False)  # verified by finished(): the file result.json vouches for
                for c in conds:
                    if f"{c}_y" in z:
                        ys.append(z[f"{c}_y"])
                        ps.append(z[f"{c}_out"].argmax(-1))
            ax = axes[i][j]
            if ys:
                cm = confusion_matrix(np.concatenate(ys), np.concatenate(ps), labels=list(range(k)), normalize="true")
                ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
                for (a, b), v in np.ndenumerate(cm):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(k), labels or [], fontsize=6)
            ax.set_yticks(range(k), labels or [], fontsize=6)
            ax.set_title(f"{m} ({name})", fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


# ---- t-SNE of the joint representations ----------------------------------------------------------

TSNE_COLUMN = "mr=0.5"  # the missing input of the t-SNE: MR 0.5's protocol masks


def representations(method, data, idx, columns, normalizer=None, seed: int = 0, device: str = "cpu",
                    batch_size: int = 256) -> dict | None:
    """{column: (N, d)} of ``method.represent`` on rows ``idx`` under each column's protocol masks,
    exactly as the evaluator tests (``train.trainer.evaluate``); None when the method has none."""
    from train.trainer import evaluate

    res = evaluate(method, data, idx, columns, normalizer, batch_size, device, seed=seed, output="represent")
    return None if res is None else {c: r["out"] for c, r in res.items()}


def plot_tsne(runs: dict[str, Path], data_for, info: dict, path: Path, device: str = "cpu",
              column: str = TSNE_COLUMN) -> dict | None:
    """t-SNE (scikit-learn) of each imagination method's joint representation (``Method.represent``)
    on the test split of the comparison's first fold, with its first seed's model, under full input
    (avt) and under ``column``'s masks: one panel per method coloured full vs missing, one below
    coloured by label. ``data_for(method)`` gives the data module the method was trained on.
    Returns what the figure shows (for the report), None when no method has a representation."""
    from sklearn.manifold import TSNE

    from pipeline.device import torch_threads
    from train.trainer import load_checkpoint

    fold, seed = info["folds"][0], int(info["seeds"][0])
    shown = {}
    for m, d in runs.items():
        job = d / "folds" / safe_name(fold) / f"seed{seed}"
        if not (job / "best.pt").is_file() or not (job / "predictions.npz").is_file():
            continue
        if (job / "result.json").is_file():
            verified(job)
        method, norm, _ = load_checkpoint(job / "best.pt", device)
        data = data_for(m)
        with np.load(job / "predictions.npz", allow_pickle=False) as z:
            ids = list(z["ids"])
        idx = data.indices(ids, f"fold {fold} test")
        with torch_threads(device, 1):  # small nets: one thread is faster on a busy CPU (pipeline.device)
            reps = representations(method, data, idx, ["avt", column], norm, seed, device)
        if reps is None or len(idx) < 4:
            continue
        seen = protocols.masks(column, [data.ids[i] for i in idx], seed, data.natural[idx]) & data.natural[idx]
        shown[m] = (reps, data.y[idx], seen)
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = read_json(next(iter(runs.values())) / "run.json").get("labels")
    fig, axes = plt.subplots(2, len(shown), figsize=(3.4 * len(shown), 6.4), squeeze=False)
    for j, (m, (reps, y, avail)) in enumerate(shown.items()):
        x = np.concatenate([reps["avt"], reps[column]])
        n = len(reps["avt"])
        pts = TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=0).fit_transform(x)
        full, miss = pts[:n], pts[n:]
        ax = axes[0][j]
        ax.scatter(*full.T, s=10, c="tab:blue", label="full (avt)")
        ax.scatter(*miss.T, s=10, c="tab:red", marker="x", label=f"missing ({protocols.title(column)})")
        ax.set_title(f"{m} (d = {x.shape[1]})", fontsize=8)
        ax.legend(fontsize=6)
        ax = axes[1][j]
        discrete = labels is not None
        kw = {"cmap": "tab10", "vmin": 0, "vmax": 9} if discrete else {"cmap": "viridis"}
        sc = ax.scatter(*full.T, s=10, c=y, marker="o", **kw)
        ax.scatter(*miss.T, s=14, c=y, marker="x", **kw)
        if discrete:
            handles = [plt.Line2D([], [], ls="", marker="o", color=plt.get_cmap("tab10")(k), label=str(name))
                       for k, name in enumerate(labels) if k in set(y.tolist())]
            ax.legend(handles=handles, fontsize=6)
        else:
            fig.colorbar(sc, ax=ax)
        ax.set_title(f"{m}: by label (o full, x missing)", fontsize=8)
        for a in axes[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    first = next(iter(shown.values()))
    return {"fold": fold, "seed": seed, "column": column, "n": len(first[2]),
            "lose": int((~first[2]).any(1).sum()), "methods": list(shown)}
