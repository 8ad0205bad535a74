"""Running a method on a dataset: every fold x seed, every test condition, results on disk.

``train_method(dataset, method)`` is what ``imer train`` and ``make train`` call: it loads the
config, the manifest and folds, makes sure the features exist (the stage runner extracts what is
missing), builds the data module and hands over to ``run_experiment``, which needs no extraction
stack (tests and benchmarks give it synthetic data).

Layout of ``results/<dataset>/<method>/<run-id>/``::

    config.yaml            the resolved config          run.json    status, data, features, timings
    metrics.json / .csv    per fold / seed / condition  table.md    Table-5 style, mean ± std
    curves.png             training curves              conditions.png  per-condition bars
    folds/<fold>/seed<s>/  best.pt, history.json, result.json, predictions.npz
    prereq/<config>/<fold>/seed<s>/   prerequisite models (MMIN's baseline), same layout

Rerunning the same command resumes an unfinished run with the same config and data: finished
fold x seed pairs are kept, an interrupted one continues from its last finished epoch. After the
run has finished, it returns that run (its table) and writes nothing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml

from pipeline.cache import config_hash
from pipeline.device import torch_threads
from pipeline.fsutil import Busy, atomic_write_bytes, atomic_write_json, atomic_write_text, process_lock, safe_name
from train import metrics, protocols
from train.config import DESCRIPTIVE, ConfigError, by_scope, check_chain, check_overrides, for_chain, load_config
from train.config import with_prerequisites
from train.data import MultimodalData, Normalizer
from train.results import ids_hash, listed, seal, unsealed, write_run_outputs


def results_root(root: str | Path | None = None) -> Path:
    """``root``, else ``$IMER_RESULTS``, else ``./results``."""
    return Path(root or os.environ.get("IMER_RESULTS") or "results").expanduser()


def _ids_hash(ids) -> str:
    return config_hash(sorted(ids), 16)


def eval_columns(cfg: dict) -> list[str]:
    """The test columns of a config (``eval.conditions``), normalised (see train.protocols)."""
    return [protocols.normalise(c) for c in cfg.get("eval", {}).get("conditions", ["avt"])]


# Bumped by any change that moves trained numbers, rounding-level ones included (a fused optimiser,
# another kernel): training is chaotic, so a 1e-7 change in one gradient moves a demo fold's UA by
# points, and a run or comparison must never mix models from before and after such a change.
# 2: fused optimisers and length-grouped encoders (commit 0093870).
NUMERICS = 2


def fold_signature(cfg: dict, data: MultimodalData, fold, seed: int) -> str:
    """What a fold x seed model depends on: config (minus descriptive keys), data, split, seed, and
    the version of the training numerics (``NUMERICS``)."""
    c = {k: v for k, v in cfg.items() if k not in DESCRIPTIVE}
    return config_hash({"cfg": c, "data": data.signature, "seed": int(seed), "numerics": NUMERICS,
                        "fold": [fold.name, _ids_hash(fold.train), _ids_hash(fold.val), _ids_hash(fold.test)]}, 20)


def select_folds(folds: list, wanted) -> list:
    """``wanted``: fold names or 1-based positions (a list or "1,2"); None = all folds."""
    if not wanted:
        return list(folds)
    if isinstance(wanted, str):
        wanted = [w for w in wanted.split(",") if w.strip()]
    by_name = {f.name: f for f in folds}
    out = []
    for w in wanted:
        w = str(w).strip()
        if w in by_name:
            out.append(by_name[w])
        elif w.isdigit() and 1 <= int(w) <= len(folds):
            out.append(folds[int(w) - 1])
        else:
            raise ConfigError(f"fold {w!r} not found; folds are {', '.join(by_name)} (or 1..{len(folds)})")
    return out


def parse_seeds(seeds) -> list[int] | None:
    if seeds is None or seeds == "":
        return None
    if isinstance(seeds, str):
        seeds = [s for s in seeds.split(",") if s.strip()]
    try:
        out = [int(s) for s in seeds]
    except ValueError:
        raise ConfigError(f"seeds must be integers, e.g. 0,1,2; got {seeds!r}") from None
    bad = [s for s in out if not 0 <= s < 2 ** 32]
    if bad:  # numpy's seeding refuses them, after the run was marked running
        raise ConfigError(f"seeds must be integers in [0, 2**32), e.g. 0,1,2; got {bad[0]}")
    return out


class Experiment:
    """One run directory: trains the selected folds x seeds of one config, with prerequisites."""

    def __init__(self, data: MultimodalData, folds: list, cfg: dict, run_dir: Path, *, dataset: str,
                 device: str = "cpu", root: Path | None = None, progress: bool = True, callbacks=(),
                 log=print, workers: int = 1, cluster=None, threads: int | None = None):
        self.data = data
        self.threads = threads
        self.folds = folds
        self.workers = max(1, int(workers))
        self.cluster = cluster  # a pipeline.cluster.Cluster to share (imer demo), else one per run
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dataset = dataset
        self._device = device  # "auto" is resolved (importing torch) only when a fold has work
        self.root = results_root(root)
        self.progress = progress
        self.callbacks = list(callbacks)
        self.log = log

    @property
    def device(self) -> str:
        if self._device == "auto":
            from pipeline.device import resolve_device

            self._device = resolve_device("auto")
        return self._device

    # -- one fold x seed ----------------------------------------------------------------------------
    def run_fold(self, cfg: dict, fold, seed: int, out_dir: Path) -> dict:
        """Train (or reuse) one fold x seed and evaluate it under every test column of
        ``cfg["eval"]``; a finished model is only evaluated on the columns it lacks (a fully
        finished one costs no torch import: a rerun of a finished run is quick)."""
        sig = fold_signature(cfg, self.data, fold, seed)
        cols = eval_columns(cfg)
        res = self.finished(cfg["name"], fold, seed, sig, out_dir)
        if res is not None and all(c in res["test"] for c in cols):
            return res
        with torch_threads(self.device, int(self.threads or 1)):  # 1 on CPU unless told (cpu_threads)
            return self._train_and_test(cfg, fold, seed, out_dir, sig, cols, res)

    def _train_and_test(self, cfg: dict, fold, seed: int, out_dir: Path, sig: str, cols: list, res) -> dict:
        import torch

        from train.methods import build
        from train.trainer import Trainer, evaluate, load_checkpoint

        t0 = time.perf_counter()
        tr = self.data.indices(fold.train, f"fold {fold.name} train")
        va = self.data.indices(fold.val, f"fold {fold.name} val")
        te = self.data.indices(fold.test, f"fold {fold.name} test")
        norm = Normalizer.fit(self.data, tr, cfg.get("data", {}).get("normalize", []))
        amp = cfg["train"].get("amp", True)  # evaluate() picks the dtype for the device, as training did
        if res is None:
            prereqs = {role: self.prerequisite(name, cfg, fold, seed) for role, name in (cfg.get("requires") or {}).items()}
            torch.manual_seed(seed)
            np.random.seed(seed)
            method = build(cfg, self.data.spec)
            method.attach(prereqs)
            trainer = Trainer(method, self.data, tr, va, cfg, out_dir, seed=seed, device=self.device, normalizer=norm,
                              signature=sig, progress=self.progress, callbacks=self.callbacks,
                              desc=f"{cfg['name']} {fold.name} s{seed}")
            summary = trainer.fit()
            res = {"fold": fold.name, "seed": int(seed), "method": cfg["name"], "signature": sig,
                   "best_epoch": summary["best_epoch"], "select_metric": summary["metric"],
                   "val_score": summary["best_score"], "epochs_run": summary["epochs_run"],
                   "stopped_early": summary["stopped_early"],
                   "n": {"train": len(tr), "val": len(va), "test": len(te)},
                   "test": {}, "val": {}, "history": summary["history"], "time_s": 0.0}
        # test with the weights chosen on validation, on the columns not evaluated yet
        best, _, _ = load_checkpoint(out_dir / "best.pt", self.device)
        todo = [c for c in cols if c not in res["test"]]
        bs = max(int(cfg["train"]["batch_size"]), 256)
        test = evaluate(best, self.data, te, todo, norm, bs, self.device, amp, seed=seed, phase="test")
        val = (evaluate(best, self.data, va, todo, norm, bs, self.device, amp, seed=seed, phase="val")
               if cfg.get("eval", {}).get("validation") else {})  # every column on val too: only when asked
        pred_path = out_dir / "predictions.npz"
        preds = read_predictions(pred_path) or {}
        preds.update({f"{c}_{k}": v for c, r in test.items() for k, v in r.items()})
        preds["ids"] = np.array([self.data.ids[i] for i in te])
        res["test_ids"] = ids_hash(preds["ids"])  # reports refuse to mix runs tested on other ids
        buf = io.BytesIO()  # written whole or not at all: a kill mid-write leaves the old file
        np.savez_compressed(buf, **preds)
        atomic_write_bytes(pred_path, buf.getvalue())
        task = self.data.task
        res["test"].update({c: metrics.compute(task, r["y"], r["out"]) for c, r in test.items()})
        # what the model saw per column (natural absence included): MR, eta, share with no input
        res.setdefault("realised", {}).update({c: protocols.realised(r["present"]) for c, r in test.items()})
        res.pop("realised_mr", None)  # older runs: replaced by realised[column]["mr"]
        res["val"].update({c: metrics.compute(task, r["y"], r["out"]) for c, r in val.items()})
        # the method's own figures of the selected model on the test split (CM-ARR's t-SNE)
        if "figures" not in res:  # they depend on the model only: drawn once, not per new column
            figs = best.figures(out_dir, self.data, te, norm, self.device)
            res["figures"] = sorted(os.path.relpath(f, self.run_dir) for f in figs)
        res["time_s"] = res.get("time_s", 0.0) + time.perf_counter() - t0
        res = seal(out_dir, res)  # written last: it vouches for best.pt and predictions.npz
        _write_json(out_dir / "result.json", res)
        (out_dir / "last.pt").unlink(missing_ok=True)  # optimiser state is only needed to resume
        return res

    def finished(self, name: str, fold, seed: int, sig: str, out_dir: Path) -> dict | None:
        """The result of a finished ``name`` model for this fold and seed: in ``out_dir``, else copied
        there from an earlier run of ``name`` (or another run's prerequisite) with the same
        signature; None when none exists."""
        bad = _damaged(out_dir)
        if bad and bad != "predictions.npz":
            self.log(f"  {name} {fold.name} seed {seed}: {bad} is damaged or was edited; training it again")
        if not _finished(out_dir, sig):
            ds, n, fd = safe_name(self.dataset), safe_name(name), safe_name(fold.name)
            earlier = [*sorted(self.root.glob(f"{ds}/{n}/*/folds/{fd}/seed{seed}"), reverse=True),
                       *sorted(self.root.glob(f"{ds}/*/*/prereq/{n}/{fd}/seed{seed}"), reverse=True)]
            src = next((d for d in earlier if d != out_dir and _finished(d, sig)), None)
            if src is None:
                return None
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in ("best.pt", "result.json", "history.json", "predictions.npz", *(p.name for p in src.glob("*.png"))):
                if (src / f).is_file():
                    shutil.copy2(src / f, out_dir / f)
            self.log(f"  {name} {fold.name} seed {seed}: reusing {src}")
        res = json.loads((out_dir / "result.json").read_text())
        if read_predictions(out_dir / "predictions.npz") is None or unsealed(out_dir, res) == "predictions.npz":
            self.log(f"  {name} {fold.name} seed {seed}: predictions.npz is damaged; testing the selected model again")
            (out_dir / "predictions.npz").unlink(missing_ok=True)
            res["test"], res["val"] = {}, {}
        return res

    # -- prerequisites (MMIN's pretrained baseline) -------------------------------------------------
    def prerequisite(self, name: str, cfg: dict, fold, seed: int):
        """The trained ``name`` model for this fold and seed: from this run's prereq/ folder, else
        copied from an earlier run of ``name`` (or another run's prerequisite) with the same config
        and data, else trained now. Its config is the one ``cfg`` records (``prerequisites``), so
        the method's signature covers what its prerequisite was trained with."""
        from train.methods import get

        pcfg = (cfg.get("prerequisites") or {}).get(name)
        if pcfg is None:
            raise ConfigError(f"{cfg['name']}: its config records no resolved prerequisite {name!r}; "
                              "resolve it with train.config.load_config (or with_prerequisites)")
        check_chain({**cfg, "prerequisites": {name: pcfg}})
        for part in get(pcfg["method"]).exports:  # the weights the method may load from its prerequisite
            mine, theirs = cfg.get("model", {}).get(part), pcfg.get("model", {}).get(part)
            if mine is not None and theirs is not None and mine != theirs:
                raise ConfigError(f"train/configs/{name}.yaml: model.{part} differs from {cfg['name']}'s, whose "
                                  f"weights it loads; set the same value for both (--set '*:model.{part}...', "
                                  f"or {name}:model.{part}... next to {cfg['name']}'s)")
        sig = fold_signature(pcfg, self.data, fold, seed)
        pdir = self.run_dir / "prereq" / safe_name(name) / safe_name(fold.name) / f"seed{seed}"
        if self.finished(name, fold, seed, sig, pdir) is None:
            self.log(f"  {name} {fold.name} seed {seed}: training the prerequisite")
            self.run_fold(pcfg, fold, seed, pdir)
        from train.trainer import load_checkpoint

        method, _, _ = load_checkpoint(pdir / "best.pt", self.device)
        return method

    # -- the whole run ------------------------------------------------------------------------------
    def start(self, seeds: list[int], meta: dict) -> dict:
        """Write config.yaml and run.json (status running); returns run.json's content."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))
        meta = {**meta, "status": "running", "started": meta.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
                "folds": [f.name for f in self.folds], "seeds": seeds, "device": self._device,
                "task": self.data.task, "labels": self.data.labels, "dims": self.data.spec.dims,
                "data_signature": self.data.signature, "n_utterances": len(self.data)}
        meta.pop("error", None)
        _write_json(self.run_dir / "run.json", meta)
        return meta

    def run(self, seeds: list[int], meta: dict, started: bool = False) -> str:
        """Train every fold x seed (``started``: ``meta`` is what ``start`` wrote); an error marks
        the run failed in run.json (a rerun resumes it), an interruption leaves it running."""
        meta = meta if started else self.start(seeds, meta)
        try:
            return self._run(seeds, meta)
        except Exception as e:
            meta.update(status="failed", error=f"{type(e).__name__}: {e}", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
            _write_json(self.run_dir / "run.json", meta)
            raise

    def _run(self, seeds: list[int], meta: dict) -> str:
        t0 = time.perf_counter()
        pairs = [(fold, seed) for fold in self.folds for seed in seeds]
        outs = {(f.name, s): self.run_dir / "folds" / safe_name(f.name) / f"seed{s}" for f, s in pairs}
        done = lambda fold, seed, res: self.log(  # noqa: E731
            f"{self.cfg['name']} fold {fold.name} seed {seed}: best epoch {res['best_epoch']} "
            f"(val {res['select_metric']} {res['val_score']:.4f}); {_test_line(res, self.cfg)}  [{res['time_s']:.0f} s]")
        if self.workers > 1 and len(pairs) > 1:
            self._run_parallel(pairs, outs, done)
        else:
            for fold, seed in pairs:
                done(fold, seed, self.run_fold(self.cfg, fold, seed, outs[fold.name, seed]))
        table = write_run_outputs(self.run_dir, self.cfg, meta)
        meta.update(device=self._device, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    wall_s=meta.get("wall_s", 0) + time.perf_counter() - t0)
        _write_json(self.run_dir / "run.json", meta)
        return table


    def _run_parallel(self, pairs, outs, done) -> None:
        """Every fold x seed as a task on dask worker processes (one torch thread each): the same
        computation as in sequence, so the same numbers, in about 1/workers of the wall time. On
        CUDA the workers are GPU slots (``pipeline.cluster``): jobs per GPU as the cluster says,
        else measured from this config's memory (``train.job_memory``)."""
        import copy

        from dask.distributed import as_completed
        from tqdm.auto import tqdm

        from pipeline.cluster import Cluster

        cluster = self.cluster or Cluster(min(self.workers, len(pairs)), device=self.device)
        try:
            if cluster.on_gpu and cluster.jobs_per_gpu is None and cluster.client is None:
                from pipeline.device import gpu_count, gpu_ids
                from train import job_memory

                gpus = len(gpu_ids(cluster.device, gpu_count()))
                cluster.jobs_per_gpu = job_memory.choose([self.cfg], lambda _cfg: self.data, pairs[0][0], gpus, self.log)
            client = cluster.get()
            resources = cluster.task_resources()
            worker = copy.copy(self)
            worker.progress, worker.log, worker.cluster, worker.workers, worker.threads = False, _quiet, None, 1, 1
            remote = client.scatter(worker, broadcast=True)  # the data travels once per worker
            futs = {client.submit(_fold_task, remote, f.name, s, outs[f.name, s], pure=False, resources=resources): (f, s)
                    for f, s in pairs}
            bar = tqdm(total=len(pairs), desc=f"{self.cfg['name']} folds x seeds", disable=not self.progress)
            for fut in as_completed(futs):
                done(*futs[fut], fut.result())
                bar.update(1)
            bar.close()
        finally:
            if cluster is not self.cluster:
                cluster.close()


def _quiet(*_a, **_k) -> None:
    pass


def _fold_task(exp: "Experiment", fold_name: str, seed: int, out: Path) -> dict:
    from pipeline.device import worker_device

    exp._device = worker_device(exp.device)  # a worker pinned to a GPU sees it as `cuda`
    fold = next(f for f in exp.folds if f.name == fold_name)
    with torch_threads(exp.device, 1):
        return exp.run_fold(exp.cfg, fold, seed, out)


def _test_line(res: dict, cfg: dict) -> str:
    """'test UA average 0.71, {a,v,t} 0.85' style summary of one fold x seed result."""
    cols = eval_columns(cfg)
    t = {c: res["test"][c] for c in cols if c in res["test"]}
    some = next(iter(t.values()), {})
    metric = res["select_metric"] if res["select_metric"] in some else ("ua" if "ua" in some else "mae")
    parts = []
    for _, group in protocols.groups(cols):
        for c in group:
            if c in protocols.AVERAGE.values():
                vals = [t[k][metric] for k in protocols.average_members(c, cols) if k in t]
                if vals:
                    parts.append(f"{protocols.title(c, cols)} {np.mean(vals):.4f}")
            elif c == "avt" or len(group) <= 2:
                parts.append(f"{protocols.title(c)} {t[c][metric]:.4f}")
    return f"test {metric} " + ", ".join(parts)


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


def run_experiment(data: MultimodalData, folds: list, cfg: dict, *, dataset: str, fold_select=None,
                   seeds=None, device: str = "cpu", results_dir: str | Path | None = None,
                   run_id: str | None = None, resume: bool = True, meta: dict | None = None,
                   prereq_overrides: dict | None = None, progress: bool = True, callbacks=(),
                   log=print, workers: int = 1, cluster=None, threads: int | None = None) -> Path:
    """Train ``cfg`` on every selected fold x seed of ``data`` (``workers`` > 1: in parallel worker
    processes; ``threads``: torch threads on CPU, default 1); returns the run directory.
    ``prereq_overrides`` ({config | "*": {key: value}}) change the prerequisites ``cfg`` records,
    before anything is hashed."""
    cfg = with_prerequisites(cfg, dataset, prereq_overrides)
    folds = select_folds(folds, fold_select)
    seeds = parse_seeds(seeds) or parse_seeds(cfg.get("seeds", [0]))
    root = results_root(results_dir)
    method_dir = root / safe_name(dataset) / safe_name(cfg["name"])
    cfg_hash = config_hash({k: v for k, v in cfg.items() if k not in ("seeds", "report")}, 12)
    match = {"config_hash": cfg_hash, "data_signature": data.signature,
             "folds": [f.name for f in folds], "seeds": seeds}
    # one process at a time picks (or makes) the run folder and locks it, so a second identical
    # command finds the first one's run and its lock, never a folder of its own to train again
    try:
        with process_lock(method_dir.parent / f".{method_dir.name}.lock", wait=120):
            run_dir, note = _pick_run_dir(method_dir, match, cfg, folds, seeds, dataset, run_id, resume, log)
            if note is None:  # already complete
                return run_dir
            lock = process_lock(run_dir / ".lock").__enter__()
            if note:
                log(note)
            meta = {"dataset": dataset, "method": cfg["name"], "run_id": run_dir.name, "config_hash": cfg_hash,
                    **(meta or {})}
            exp = Experiment(data, folds, cfg, run_dir, dataset=dataset, device=device, root=root,
                             progress=progress, callbacks=callbacks, log=log,
                             workers=workers, cluster=cluster, threads=threads)
            try:
                meta = exp.start(seeds, meta)
            except BaseException:
                lock.__exit__(None, None, None)
                raise
    except Busy as e:
        raise RunInProgress(f"{e.path.parent} is being trained by another imer train (pid {e.pid or '?'}); wait for it "
                            "to finish, then run this command again (it will print that run's table)") from None
    try:
        table = exp.run(seeds, meta, started=True)
    finally:
        lock.__exit__(None, None, None)
    log(f"\n{cfg['name']} on {dataset} — {run_dir}\n{table}")
    return run_dir


class RunInProgress(ConfigError):
    """The run folder a command would train in is locked by another process (``process_lock``)."""


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


# ---- the dataset-level entry point -----------------------------------------------------------------

def ensure_stores(dataset: str, cfg: dict, device: str, data_root=None, manifest=None, workers: int = 1) -> dict:
    """{modality: FeatureStore} for the config's features, extracting whatever is missing (on
    ``workers`` processes). A dataset made by `imer import-features` trains on its imported stores
    (no media, no extraction)."""
    from manifests.importers import open_imported

    imported = open_imported(dataset)
    if imported is not None:
        return imported
    try:
        from pipeline.runner import ensure_features
    except ImportError as e:
        raise SystemExit(f"imer train: the feature stage runner is not available ({e}); "
                         "run `imer features` first or install the full toolkit") from None
    kw = {"device": device, "data_root": data_root, "workers": workers}
    if cfg.get("data", {}).get("store_dtype", "float32") != "float32":  # float16: the -f16 stores
        kw["dtype"] = cfg["data"]["store_dtype"]
    if manifest:
        kw["manifest"] = manifest
    return ensure_features(dataset, cfg["features"], **kw)


def store_description(stores: dict) -> dict:
    """What the run records about each store: enough to rebuild its extractor for ``imer predict``."""
    out = {}
    for mod, s in stores.items():
        a = getattr(s, "attrs", None)
        a = dict(a() if callable(a) else a or {})
        out[mod] = {k: a.get(k) for k in ("name", "params", "key", "dim", "frame_rate", "modality", "version", "requires", "format")
                    if k in a}
        if getattr(s, "path", None) is not None:
            out[mod]["path"] = str(s.path)
    return out


def build_data(manifest, stores: dict, cfg: dict) -> MultimodalData:
    d = cfg.get("data", {})
    if d.get("invalid_frames", "drop") not in ("drop", "zero"):
        raise ConfigError(f"data.invalid_frames must be drop or zero, got {d['invalid_frames']!r}")
    from train.streaming import parse_bytes  # data.memory_budget: above it a store is streamed per batch

    budget = parse_bytes(d["memory_budget"]) if d.get("memory_budget") is not None else None
    return MultimodalData.from_stores(manifest, stores, invalid_frames=d.get("invalid_frames", "drop"), memory_budget=budget,
                                      max_len=d.get("max_len"), fixed_len=bool(d.get("fixed_len")),
                                      resample_to=d.get("resample_to"), target=d.get("target"))


def train_method(dataset: str, method: str, folds=None, seeds=None, device: str = "auto", *,
                 data_root=None, manifest=None, protocol: str | None = None, results_dir=None,
                 run_id: str | None = None, overrides: dict | None = None,
                 prereq_overrides: dict | None = None, resume: bool = True, progress: bool = True,
                 threads: int | None = None, log=print, workers: int = 1, cluster=None) -> Path:
    """Extract what is missing, train ``method`` on every fold x seed of ``dataset``, evaluate every
    condition and write ``results/<dataset>/<method>/<run-id>/``; returns that directory. On CPU,
    training uses ``threads`` torch threads (default 1, see ``cpu_threads``); ``workers`` > 1 trains
    the folds x seeds in that many worker processes of one thread each (``cluster``: one to share).
    ``overrides``: plain keys change ``method`` (``features.*``, ``data.*`` the whole chain),
    ``CONFIG:KEY`` the config of that name in its chain, ``*:KEY`` all (train.config);
    ``prereq_overrides`` ({config | "*": {key: value}}) change the prerequisites only ("*": every
    one). The command line also refuses plain keys a prerequisite reads (``check_overrides``)."""
    from manifests.datasets import manifest_and_folds
    from pipeline.device import resolve_device

    cfg = with_prerequisites(load_config(method, dataset, overrides), dataset, prereq_overrides)
    check_overrides([cfg], overrides, plain_everywhere=True)  # a CONFIG: outside the chain is a typo
    check_chain(cfg)  # before any feature is extracted
    dev = device if device == "auto" else resolve_device(device)  # auto: resolved when a fold has work
    man, proto, fold_list = manifest_and_folds(dataset, data_root, manifest,
                                               protocol or cfg.get("fold_protocol"))  # CLI, else the config's
    stores = ensure_stores(dataset, cfg, dev, None, manifest, workers=workers)  # the manifest built above
    data = build_data(man, stores, cfg)
    meta = {"protocol": proto, "features": store_description(stores),
            "manifest": str(man.path) if man.path else None, "argv": sys.argv, "overrides": for_chain(cfg, overrides)}
    if prereq_overrides:
        meta["prereq_overrides"] = prereq_overrides
    return run_experiment(data, fold_list, cfg, dataset=dataset, fold_select=folds, seeds=seeds, device=dev,
                          results_dir=results_dir, run_id=run_id, resume=resume, meta=meta, progress=progress,
                          log=log, workers=workers, cluster=cluster, threads=threads)


def prerequisite_overrides(overrides: dict | None, per_prereq: dict | None = None) -> dict:
    """What of flat ``--set`` ``overrides`` reaches the prerequisites, as {"*" | config: {key:
    value}}: ``features.*``, ``data.*`` and ``*:KEY`` reach every one ("*"), ``CONFIG:KEY`` the
    config named; other plain keys stay with the method. ``per_prereq`` is merged in."""
    scoped = by_scope(overrides)
    out = {"*": {**{k: v for k, v in scoped.get(None, {}).items() if k.split(".")[0] in ("features", "data")},
                 **scoped.get("*", {})}}
    for c, o in [*((c, o) for c, o in scoped.items() if c not in (None, "*")), *(per_prereq or {}).items()]:
        out[c] = {**out.get(c, {}), **o}
    return out


def cpu_threads(device: str, n: int | None = None):
    """Torch intra-op threads while training on CPU: ``n``, default 1 (restored afterwards); these
    small recurrent nets gain little from more threads (see pipeline.device.torch_threads)."""
    return torch_threads(device, int(n or 1))

