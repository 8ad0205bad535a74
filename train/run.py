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

This module holds the fold x seed models (``Experiment``, ``fold_signature``) and ``run_experiment``;
the whole run's jobs live in :mod:`train.run_jobs`, run folders in :mod:`train.run_dirs`, the
dataset-level entry point (``train_method``, ``ensure_stores``, ``build_data``) in
:mod:`train.run_entry`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.cache import config_hash
from pipeline.device import torch_threads
from pipeline.fsutil import Busy, atomic_write_bytes, process_lock, safe_name
from train import metrics, protocols
from train.config import DESCRIPTIVE, ConfigError, check_chain, with_prerequisites
from train.data import MultimodalData, Normalizer
from train.results import ids_hash, seal, unsealed
from train.run_dirs import _damaged, _finished, _pick_run_dir, _write_json, read_predictions, results_root
from train.run_jobs import RunJobs, eval_columns
# public names of train.run that live in the modules below (callers and tests import them from here;
# ``imer train`` looks train_method up here at call time, so patching train.run.train_method works)
from train.run_dirs import find_run, newest_complete, read_runs  # noqa: F401
from train.run_entry import (build_data, cpu_threads, ensure_stores, prerequisite_overrides,  # noqa: F401
                             store_description, train_method)


def _ids_hash(ids) -> str:
    return config_hash(sorted(ids), 16)


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


class Experiment(RunJobs):
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
