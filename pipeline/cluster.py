"""One way to get a dask.distributed client: a LocalCluster of single-threaded worker processes
(started on first use, so a run with nothing to do starts none), or an existing scheduler.
Extraction (``pipeline.runner``), training folds in parallel (``train.run``) and the comparison
sweep (``train.compare``) all take their workers from here.

Jobs on CUDA (``device`` cuda or cuda:K): one single-threaded worker process per GPU slot,
``jobs_per_gpu`` slots per GPU, each worker pinned to its GPU by CUDA_VISIBLE_DEVICES (the job
sees it as ``cuda``, ``pipeline.device.worker_device``) and holding the dask resource
``{"GPU": 1/N}``. Every job asks for that share (``task_resources``), so a worker never runs two
and a GPU never more than N, also on an existing scheduler whose workers declare ``GPU``
resources (``dask worker --nthreads N --resources GPU=1`` per GPU). Slots alternate between the
GPUs (gpu0, gpu1, gpu0, ...), so fewer workers than slots still spread over every GPU."""

from __future__ import annotations

import logging
import os


CONNECT_TIMEOUT_S = 5  # dask waits 30 s by default before it says a scheduler address is wrong


class ClusterError(RuntimeError):
    """The dask scheduler at the given address could not be reached (the message says what to do)."""


def default_workers(device: str = "cpu") -> int:
    """Worker processes when none are asked for: one per CPU core, at most 4 (these small models
    gain little from more), or 1 on CUDA (the jobs share one GPU)."""
    return 1 if str(device).startswith("cuda") else max(1, min(4, os.cpu_count() or 1))


class Cluster:
    def __init__(self, workers: int = 1, scheduler: str | None = None, processes: bool = True,
                 device: str = "cpu", jobs_per_gpu: int | None = None):
        self.workers, self.scheduler, self.processes = max(1, int(workers)), scheduler, processes
        self.device = str(device)  # cuda / cuda:K: lay the workers out over the GPUs
        self.jobs_per_gpu = jobs_per_gpu  # None: 1, unless the caller sets a measured default first
        self.client = self.cluster = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def slots(self) -> list[str]:
        """The GPU (CUDA_VISIBLE_DEVICES value) of each worker this cluster starts on CUDA: at
        most ``workers`` of the GPUs x ``jobs_per_gpu`` slots, alternating between the GPUs."""
        from pipeline.device import gpu_count, gpu_ids

        ids = gpu_ids(self.device, gpu_count())
        every = [g for _ in range(max(1, int(self.jobs_per_gpu or 1))) for g in ids]
        return every[:self.workers]

    def task_resources(self) -> dict | None:
        """The dask resources each job asks for: a 1/N share of a GPU on CUDA (a hair less, so N
        of them fit in a worker declaring GPU=1 despite float rounding), else none. On an existing
        scheduler only when its workers declare GPU resources (else no worker could run a job)."""
        if not self.on_gpu:
            return None
        if self.scheduler:
            info = self.get().scheduler_info().get("workers", {}).values()
            if not any("GPU" in (w.get("resources") or {}) for w in info):
                return None
        return {"GPU": (1.0 / max(1, int(self.jobs_per_gpu or 1))) * (1 - 1e-9)}

    def get(self):
        if self.client is None:
            import dask
            from distributed import Client, LocalCluster

            # dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then hands freed
            # memory back to the OS at once, and torch's many small allocations made a training fold
            # 1.8x slower in a worker than in the main process (measured on the demo); drop it
            env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
            env.pop("MALLOC_TRIM_THRESHOLD_", None)
            dask.config.set({"distributed.nanny.pre-spawn-environ": env})
            if self.scheduler:
                try:
                    self.client = Client(self.scheduler, timeout=CONNECT_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 - refused, timed out, bad scheme, not a scheduler
                    why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                    raise ClusterError(f"cannot reach the dask scheduler at {self.scheduler} ({why}); start one "
                                       "there (dask scheduler) or check --scheduler's address "
                                       "(tcp://host:8786), or leave --scheduler out to use local workers") from None
            elif self.on_gpu and self.processes:  # GPU slots: pinned workers (see the module doc)
                self.cluster = self._gpu_cluster()
                self.client = Client(self.cluster)
            else:
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=self.processes,
                                            dashboard_address=None, silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
        return self.client

    def _gpu_cluster(self):
        """One Nanny per GPU slot, each with its own CUDA_VISIBLE_DEVICES and a 1/N GPU share."""
        from distributed import Nanny, Scheduler, SpecCluster

        share = 1.0 / max(1, int(self.jobs_per_gpu or 1))
        spec = {f"gpu{g}-{k}": {"cls": Nanny, "options": {
                    "nthreads": 1, "resources": {"GPU": share}, "host": "127.0.0.1", "dashboard": False,
                    "silence_logs": logging.ERROR, "env": {"CUDA_VISIBLE_DEVICES": g, "IMER_WORKER_GPU": g}}}
                for k, g in enumerate(self.slots())}
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": ":0"}}
        return SpecCluster(workers=spec, scheduler=scheduler, silence_logs=logging.ERROR)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
