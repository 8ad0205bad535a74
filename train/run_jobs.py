"""The whole run of an :class:`train.run.Experiment`: run.json (running, failed, complete), every
fold x seed job in sequence or as tasks on dask worker processes, one log line per finished job,
and the run's tables and figures at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from pipeline.device import torch_threads
from pipeline.fsutil import atomic_write_text, safe_name
from train import protocols
from train.results import write_run_outputs
from train.run_dirs import _write_json

if TYPE_CHECKING:
    from train.run import Experiment


def eval_columns(cfg: dict) -> list[str]:
    """The test columns of a config (``eval.conditions``), normalised (see train.protocols)."""
    return [protocols.normalise(c) for c in cfg.get("eval", {}).get("conditions", ["avt"])]


class RunJobs:
    """The whole-run part of :class:`train.run.Experiment` (a mixin: it uses the experiment's
    folds, config, run folder, workers, cluster and ``run_fold``)."""

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
