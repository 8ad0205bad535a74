"""One way to get a dask.distributed client: a LocalCluster of single-threaded worker processes
(started on first use, so a run with nothing to do starts none), or an existing scheduler.
Extraction (``pipeline.runner``), training folds in parallel (``train.run``) and the comparison
sweep (``train.compare``) all take their workers from here."""

from __future__ import annotations

import logging
import os


def default_workers(device: str = "cpu") -> int:
    """Worker processes when none are asked for: one per CPU core, at most 4 (these small models
    gain little from more), or 1 on CUDA (the jobs share one GPU)."""
    return 1 if str(device).startswith("cuda") else max(1, min(4, os.cpu_count() or 1))


class Cluster:
    def __init__(self, workers: int = 1, scheduler: str | None = None, processes: bool = True):
        self.workers, self.scheduler, self.processes = max(1, int(workers)), scheduler, processes
        self.client = self.cluster = None

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
                self.client = Client(self.scheduler)
            else:
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=self.processes,
                                            dashboard_address=None, silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
        return self.client

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
