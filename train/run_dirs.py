"""Run folders on disk: where results go (``results_root``), which run folder a command trains in
(resumed, complete, or new), whether a fold x seed folder holds a finished, intact result, and
reading runs and predictions back. Used by :mod:`train.run`.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline.fsutil import atomic_write_json, safe_name
from train.results import listed, unsealed


def results_root(root: str | Path | None = None) -> Path:
    """``root``, else ``$IMER_RESULTS``, else ``./results``."""
    return Path(root or os.environ.get("IMER_RESULTS") or "results").expanduser()


def read_predictions(path: Path) -> dict | None:
    """The arrays of a fold's ``predictions.npz``: {} when there is none, None when it is damaged
    (a truncated or foreign file: the fold's test columns are then computed again)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def _finished(d: Path, sig: str) -> bool:
    r = d / "result.json"
    if not (r.is_file() and (d / "best.pt").is_file()) or _damaged(d) not in (None, "predictions.npz"):
        return False
    return json.loads(r.read_text()).get("signature") == sig


def _damaged(d: Path) -> str | None:
    """The file of a fold folder's result that is truncated or differs from the checksums its
    result.json records (``train.results.seal``), None when all agree or there is no result."""
    r = d / "result.json"
    if not r.is_file():
        return None
    try:
        res = json.loads(r.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "result.json"
    return unsealed(d, res) if isinstance(res, dict) else "result.json"


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, default=str)


def read_runs(root: Path, pattern: str = "*/run.json"):
    """(run directory, its run.json) for every readable run under ``root``, in path order; a
    half-written or damaged run.json is skipped."""
    for p in sorted(Path(root).glob(pattern)):
        try:
            yield p.parent, json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue


def newest_complete(runs) -> Path | None:
    """The newest complete run of ``read_runs`` output, by finishing time then run id."""
    done = [(meta.get("finished") or "", d.name, d) for d, meta in runs if meta.get("status") == "complete"]
    return max(done)[2] if done else None


def find_run(method_dir: Path, match: dict, complete: bool = False) -> Path | None:
    """The newest unfinished (``complete``: complete) run in ``method_dir`` whose run.json agrees
    with ``match``."""
    for d, meta in reversed(list(read_runs(method_dir))):
        if (meta.get("status") == "complete") == complete and all(meta.get(k) == v for k, v in match.items()):
            return d
    return None


def _finished_table(run_dir: Path | None, n_pairs: int) -> str | None:
    """The table of a complete run whose ``n_pairs`` fold x seed results are all still there, else None."""
    if run_dir is None or not (run_dir / "table.md").is_file():
        return None
    jobs = listed(run_dir, "result.json")
    if len(jobs) != n_pairs or any(_damaged(d) for d in jobs):  # a damaged fold is recomputed
        return None
    text = (run_dir / "table.md").read_text()
    start = text.find("\n|")  # the tables close table.md (see write_run_outputs)
    return text[start + 1:].rstrip("\n") if start >= 0 else None


def _pick_run_dir(method_dir, match, cfg, folds, seeds, dataset, run_id, resume, log):
    """(run folder, line to log once it is locked): ``run_id``'s folder, else the unfinished one of
    the same command, else a complete one with a damaged fold (recomputed there), else a new one;
    the line is None when the same command's run is complete (its table logged)."""
    if run_id:
        return method_dir / safe_name(run_id), ""
    if resume:
        run_dir = find_run(method_dir, match)
        if run_dir is not None:
            return run_dir, f"resuming {run_dir}"
        # the same command after it finished: nothing to do, and no copy of the run folder
        done = find_run(method_dir, match, complete=True)
        table = _finished_table(done, len(folds) * len(seeds))
        if table is not None:
            log(f"{cfg['name']}: already complete in {done} (--fresh for a new run folder)")
            log(f"\n{cfg['name']} on {dataset} — {done}\n{table}")
            return done, None
        if done is not None and any(_damaged(d) for d in listed(done, "result.json")):
            return done, f"resuming {done}: a fold's output is damaged or was edited"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = method_dir / f"{stamp}-{match['config_hash'][:6]}"
    k = 1
    while run_dir.exists():
        k += 1
        run_dir = method_dir / f"{stamp}-{match['config_hash'][:6]}-{k}"
    return run_dir, ""
