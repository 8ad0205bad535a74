"""The comparison benchmark: every method under identical features, folds, seeds and protocols.

``compare()`` plans one job per (method, fold, seed), plus the prerequisites the methods build on
(MMIN's baseline, IF-MMIN's pretraining), and runs them as tasks on dask.distributed: a
LocalCluster of ``workers`` processes by default, or an existing scheduler. A dependant's task
waits for its prerequisite's. A failed task is retried once, then reported; the others go on.

Every job is an ordinary fold x seed of an ordinary run, ``results/<dataset>/<method>/compare-<id>/``
(so ``imer report`` and the reuse of finished models work on it as on any run): a killed
comparison resumes where it stopped, and a rerun trains nothing that is finished. Each job is
evaluated under every protocol's columns (fixed conditions, MR 0 ... 0.7, eta 0 ... 0.5). The
comparison's own report goes to ``results/<dataset>/compare/<id>/`` (``train.compare_report``).
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache import config_hash
from pipeline.fsutil import Busy, atomic_write_json, atomic_write_text, process_lock, safe_name
from train import protocols
from train.config import everywhere, list_configs, load_config

DEFAULT_METHODS = ["baseline", "baseline-aug", "mmin", "if-mmin", "emmr", "cm-arr", "imder", "gcnet", "momke"]
COLUMNS = [*protocols.expand("conditions"), *protocols.expand("missing-rate"), *protocols.expand("missing-ratio")]


class CompareInProgress(ValueError):
    """Another process holds the comparison's runs (``process_lock``)."""


@dataclass(frozen=True)
class Job:
    method: str  # config name
    fold: str
    seed: int
    listed: bool = True  # False: a prerequisite that is not itself compared

    @property
    def key(self) -> str:
        return f"{self.method}/{self.fold}/s{self.seed}"


@dataclass
class Context:
    """What a worker needs to rebuild the data: a dataset name (stores read from the cache) or a
    ready MultimodalData (tests), the folds, and the overrides (a plain key reaches every config,
    prerequisites included; ``CONFIG:KEY`` the config named, train.config)."""

    dataset: str
    folds: list
    overrides: dict
    results_dir: str
    compare_id: str
    runs_id: str  # the method run folders' id: the same for every seed set, so more seeds reuse the first
    device: str = "cpu"
    data: object = None  # MultimodalData, else built from the dataset's manifest and stores
    data_root: str | None = None
    manifest: str | None = None
    progress: bool = False

    def config(self, name: str) -> dict:
        return load_config(name, self.dataset, {**everywhere(self.overrides), "eval.conditions": COLUMNS})

    def run_dir(self, method: str) -> Path:
        from train.run import results_root

        return results_root(self.results_dir) / safe_name(self.dataset) / safe_name(method) / f"compare-{self.runs_id}"

    def data_for(self, cfg: dict, workers: int = 1):
        """The data module ``cfg`` trains on (built once per process); missing stores are extracted
        first, on ``workers`` processes."""
        if self.data is not None:
            return self.data
        key = config_hash({"features": cfg["features"], "data": cfg.get("data")}, 16)
        if key not in _DATA:
            from manifests.datasets import load_manifest
            from train.run import build_data, ensure_stores

            from train.run import store_description

            man = load_manifest(self.dataset, data_root=self.data_root, manifest=self.manifest)
            stores = ensure_stores(self.dataset, cfg, self.device, self.data_root, self.manifest, workers)
            _DATA[key] = build_data(man, stores, cfg)
            _DATA[key].features = store_description(stores)  # what the run records and the report shows
        return _DATA[key]


_DATA: dict = {}  # per worker process: data modules already built


def plan(methods: list[str], folds: list, seeds: list[int], dataset: str) -> list[Job]:
    """Jobs in dependency order (every prerequisite before its dependants), seed by seed: ``sweep``
    keeps to this order, so an interrupted many-seed comparison leaves whole seeds done."""
    order: list[tuple[str, bool]] = []

    def visit(name: str, listed: bool, stack=()):
        if name in stack:
            raise ValueError(f"train/configs/{name}.yaml: 'requires' loops through {' -> '.join(stack + (name,))}")
        for req in (load_config(name, dataset).get("requires") or {}).values():
            visit(req, req in methods, stack + (name,))
        if name not in (n for n, _ in order):
            order.append((name, listed))

    for m in methods:
        visit(m, True)
    return [Job(name, f.name, s, listed) for s in seeds for name, listed in order for f in folds]


def run_job(job: Job, ctx: Context, *_deps) -> dict:
    """One fold x seed of one method, in a worker (``_deps``: finished prerequisite jobs); on a
    worker pinned to a GPU the job runs on that GPU (``pipeline.device.worker_device``)."""
    from pipeline.device import torch_threads, worker_device
    from train.run import Experiment, results_root

    cfg = ctx.config(job.method)
    data = ctx.data_for(cfg)
    fold = next(f for f in ctx.folds if f.name == job.fold)
    run_dir = ctx.run_dir(job.method)
    device = worker_device(ctx.device)
    exp = Experiment(data, ctx.folds, cfg, run_dir, dataset=ctx.dataset, device=device,
                     root=results_root(ctx.results_dir), progress=False, log=lambda *_: None)
    out = run_dir / "folds" / safe_name(job.fold) / f"seed{job.seed}"
    done_before = (out / "result.json").is_file()
    t0 = time.perf_counter()
    with torch_threads(device, 1):
        res = exp.run_fold(cfg, fold, job.seed, out)
    return {"job": job.key, "time_s": time.perf_counter() - t0, "signature": res["signature"], "reused": done_before}


def default_seeds(dataset: str, method: str, overrides: dict) -> list[int]:
    """The seeds of train/compare.yaml for ``dataset`` (the demo's 10: what a 2-point gap needs), else
    those of ``method``'s config."""
    import yaml

    defaults = yaml.safe_load((Path(__file__).parent / "compare.yaml").read_text()) or {}
    seeds = (defaults.get(dataset) or {}).get("seeds") or load_config(method, dataset, overrides).get("seeds", [0])
    return [int(s) for s in seeds]


def compare_id(dataset: str, methods: list[str], overrides: dict, folds: list, seeds: list[int]) -> str:
    """Same comparison, same id: a rerun resumes into the same folders."""
    return config_hash({"dataset": dataset, "methods": sorted(methods), "overrides": overrides,
                        "folds": [f.name for f in folds], "seeds": seeds, "columns": COLUMNS}, 10)


def runs_id(dataset: str, overrides: dict) -> str:
    """The id of the method run folders: what a fold x seed job computes depends on the dataset,
    the overrides (features) and the columns, not on the other methods, folds or seeds compared."""
    return config_hash({"dataset": dataset, "overrides": overrides, "columns": COLUMNS}, 10)


def sweep(jobs: list[Job], ctx: Context, workers: int = 1, scheduler: str | None = None, log=print,
          fn=run_job, jobs_per_gpu: int | None = None) -> dict:
    """Run ``jobs`` on dask.distributed (``fn(job, ctx, *prerequisite outcomes)`` each); {job key:
    outcome or error text}, in order of completion. On CUDA (``ctx.device``) the workers are GPU
    slots, ``jobs_per_gpu`` per GPU (``pipeline.cluster``), and every job asks for its share."""
    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    from pipeline.cluster import Cluster

    cluster = Cluster(workers, scheduler, device=getattr(ctx, "device", "cpu"), jobs_per_gpu=jobs_per_gpu)
    client = cluster.get()
    resources = cluster.task_resources()
    futures, outcomes, index = {}, {}, {}
    # Jobs go to dask in plan order, none more than a seed's worth ahead of the earliest unfinished
    # one: given all at once, dask runs them in an order of its own (dependants' chains first, queued
    # root tasks last), and a stopped sweep would leave every seed part-done. With the bound it
    # leaves whole seeds but for at most two.
    per_seed = len(jobs) // max(1, len({j.seed for j in jobs}))
    ahead = max(2 * sum(client.nthreads().values()), per_seed)
    finished, earliest, nxt = set(), 0, 0
    try:
        bar = tqdm(total=len(jobs), desc=f"compare {ctx.dataset}", disable=not ctx.progress)
        ac = as_completed()
        while nxt < len(jobs) or not ac.is_empty():
            while nxt < min(len(jobs), earliest + ahead):
                job = jobs[nxt]
                deps = [futures[d.key] for d in _requires(job, jobs, ctx.dataset)]
                # the priority orders the ready jobs inside the bound (earlier first); alone it did not
                fut = client.submit(fn, job, ctx, *deps, key=f"imer-{ctx.compare_id}-{job.key}",
                                    retries=1, pure=False, priority=len(jobs) - nxt, resources=resources)
                futures[job.key], index[fut.key] = fut, nxt
                ac.add(fut)
                nxt += 1
            fut = next(ac)
            i = index[fut.key]
            key = jobs[i].key
            try:
                outcomes[key] = fut.result()
            except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
                outcomes[key] = {"job": key, "error": f"{type(e).__name__}: {e}"}
                log(f"  {key} failed twice: {type(e).__name__}: {e}")
            bar.update(1)
            finished.add(i)
            while earliest in finished:
                earliest += 1
        bar.close()
    finally:
        cluster.close()
    return outcomes


def gpu_plan(ctx: Context, jobs: list[Job], workers: int | None, scheduler: str | None, jobs_per_gpu: int | None,
             log=print) -> tuple[int, int | None]:
    """(workers, jobs per GPU) of a sweep: on CUDA without a scheduler, jobs per GPU measured when
    not given (``train.job_memory.choose``) and every GPU slot a worker unless ``workers`` says
    fewer; elsewhere ``workers`` as given (default 1) and no GPU layout."""
    if not str(ctx.device).startswith("cuda") or scheduler:
        return max(1, int(workers or 1)), jobs_per_gpu
    from pipeline.device import gpu_count, gpu_ids

    gpus = len(gpu_ids(ctx.device, gpu_count()))
    if not jobs_per_gpu:
        from train import job_memory

        cfgs = [ctx.config(n) for n in dict.fromkeys(j.method for j in jobs)]
        jobs_per_gpu = job_memory.choose(cfgs, ctx.data_for, ctx.folds[0], gpus, log)
    return min(int(workers or gpus * jobs_per_gpu), gpus * jobs_per_gpu), int(jobs_per_gpu)


def _requires(job: Job, jobs: list[Job], dataset: str) -> list[Job]:
    names = (load_config(job.method, dataset).get("requires") or {}).values()
    return [j for j in jobs if j.method in names and j.fold == job.fold and j.seed == job.seed]


def finish_runs(ctx: Context, methods: list[str], seeds: list[int], meta: dict) -> dict[str, Path]:
    """Write run.json and the run outputs of every compared method's run folder; {method: run dir}."""
    from train.results import write_run_outputs
    from train.run import eval_columns

    out = {}
    for m in methods:
        cfg = ctx.config(m)
        run_dir = ctx.run_dir(m)
        if not any(run_dir.glob("folds/*/seed*/result.json")):
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", _yaml(cfg))
        data = ctx.data_for(cfg)
        m_meta = {**meta, "dataset": ctx.dataset, "method": m, "run_id": run_dir.name, "status": "complete",
                  "folds": [f.name for f in ctx.folds], "seeds": seeds, "task": data.task, "labels": data.labels,
                  "dims": data.spec.dims, "data_signature": data.signature, "columns": eval_columns(cfg),
                  "features": getattr(data, "features", meta.get("features_override")),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(run_dir / "run.json", m_meta, default=str)  # first: it says which seeds count
        write_run_outputs(run_dir, cfg, m_meta)
        out[m] = run_dir
    return out


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def compare(dataset: str, methods=None, *, features: dict | None = None, overrides: dict | None = None,
            folds=None, seeds=None, workers: int | None = 1, scheduler: str | None = None, device: str = "cpu",
            jobs_per_gpu: int | None = None,
            results_dir=None, data=None, fold_list=None, data_root=None, manifest=None, meta: dict | None = None,
            progress: bool = True, log=print) -> Path:
    """Train (or reuse) and evaluate every method on every fold x seed; write the comparison
    report; returns its folder ``results/<dataset>/compare/<id>/``. On CUDA ``workers`` None
    means every GPU slot, ``jobs_per_gpu`` None the default measured from the methods' sizes
    (``train.job_memory``)."""
    from train.compare_report import write_report
    from train.config import feature_set
    from train.run import parse_seeds, results_root, select_folds

    methods = list(methods or [m for m in DEFAULT_METHODS if m in list_configs()])
    unknown = [m for m in methods if m not in list_configs()]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(list_configs())}")
    over = copy.deepcopy(overrides or {})
    if features is None and data is None:  # one feature set for every method
        if dataset != "demo":
            raise ValueError(f"compare on {dataset!r} needs --features NAME (one of train/feature_sets.yaml: "
                             "mmin, emmr, cm-arr, gcnet, offline) so every method reads the same features")
        features = feature_set("demo")
    if features:
        over["features"] = features
    if fold_list is None:  # on a fresh cache the manifest is built here (the demo is generated)
        from manifests.datasets import manifest_and_folds

        _, _, fold_list = manifest_and_folds(dataset, data_root, manifest)
        if not scheduler:  # local workers share this cache: they read the manifest built just now
            data_root = None
    folds_sel = select_folds(fold_list, folds)
    seeds = parse_seeds(seeds) or default_seeds(dataset, methods[0], over)
    cid = compare_id(dataset, methods, over, folds_sel, seeds)
    ctx = Context(dataset, folds_sel, over, str(results_root(results_dir)), cid, runs_id(dataset, over), device, data,
                  data_root, manifest, progress)
    # two comparisons of the same runs (any method set: prerequisites are shared) would train the
    # same folds twice in the same folders: one at a time, the second says so in one line
    lock_path = results_root(results_dir) / safe_name(dataset) / "compare" / f".runs-{ctx.runs_id}.lock"
    held = ExitStack()
    try:
        held.enter_context(process_lock(lock_path))
    except Busy as e:
        raise CompareInProgress(f"another imer compare (pid {e.pid or '?'}) is training these runs "
                                f"({ctx.run_dir('<method>').name}); wait for it to finish, then run this command "
                                "again: it reuses every finished job") from None
    with held:
        if data is None:  # extract what is missing once, here, before any worker reads the stores
            for m in methods:
                ctx.data_for(ctx.config(m), workers if not scheduler else 1)
        jobs = plan(methods, folds_sel, seeds, dataset)
        workers, jobs_per_gpu = gpu_plan(ctx, jobs, workers, scheduler, jobs_per_gpu, log)
        t0 = time.perf_counter()
        log(f"compare {cid}: {len(methods)} methods x {len(folds_sel)} folds x {len(seeds)} seeds = "
            f"{sum(j.listed for j in jobs)} jobs (+{sum(not j.listed for j in jobs)} prerequisite jobs), "
            f"{workers if not scheduler else 'scheduler'} worker(s)")
        outcomes = sweep(jobs, ctx, workers, scheduler, log, jobs_per_gpu=jobs_per_gpu)
        wall = time.perf_counter() - t0
        failed = {k: o["error"] for k, o in outcomes.items() if "error" in o}
        runs = finish_runs(ctx, methods, seeds, {"features_override": features, **(meta or {})})
        out_dir = results_root(results_dir) / dataset / "compare" / cid
        out_dir.mkdir(parents=True, exist_ok=True)
        info = {"id": cid, "dataset": dataset, "methods": methods, "folds": [f.name for f in folds_sel], "seeds": seeds,
                "features": features, "overrides": overrides or {}, "columns": COLUMNS, "workers": workers,
                "jobs_per_gpu": jobs_per_gpu,
                "scheduler": scheduler, "wall_s": wall, "failed": failed,
                "reused_jobs": sum(bool(o.get("reused")) for o in outcomes.values()),
                "job_time_s": {k: o.get("time_s") for k, o in outcomes.items()}, "cpu_count": os.cpu_count()}
        atomic_write_json(out_dir / "compare.json", info, default=str)
        write_report(out_dir, runs, info, lambda m: ctx.data_for(ctx.config(m)), device)
        log(f"compare {cid}: {len(outcomes) - len(failed)} jobs done, {len(failed)} failed, {wall:.0f} s -> {out_dir}")
    return out_dir
