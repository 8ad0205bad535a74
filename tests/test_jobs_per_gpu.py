"""Several jobs per GPU (pipeline.cluster, train.compare.sweep, train.job_memory), on the CPU: the
GPU count is faked, the jobs record where and when they ran, and the test checks the layout of
workers over GPUs, the device each job gets and that no GPU ever runs more than N jobs at once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from train.compare import Context, Job, sweep

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes need not import this file


def _record_job(job, ctx, *_deps):
    """A stand-in for run_job: where it ran (the worker's GPU, the device it was given) and when."""
    from pipeline.device import worker_device

    t0 = time.time()
    time.sleep(ctx.overrides["sleep"])
    rec = {"job": job.key, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": worker_device(ctx.device),
           "pid": os.getpid(), "start": t0, "end": time.time()}
    Path(ctx.results_dir, f"{job.fold}.json").write_text(json.dumps(rec))
    return rec


def _ctx(tmp_path, device: str, sleep: float) -> Context:
    return Context("demo", [], {"sleep": sleep}, str(tmp_path), "t", "t", device)


def _jobs(n: int) -> list[Job]:
    return [Job("baseline", f"f{k:02d}", 0) for k in range(n)]  # a real config: sweep reads its `requires`


def _records(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(tmp_path).glob("f*.json"))]


def _most_at_once(recs: list[dict]) -> int:
    """The largest number of jobs whose [start, end) intervals overlap."""
    events = sorted([(r["start"], 1) for r in recs] + [(r["end"], -1) for r in recs], key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


@pytest.fixture
def two_gpus(monkeypatch):
    """Two visible GPUs, physical ids 5 and 7."""
    import pipeline.device

    monkeypatch.setattr(pipeline.device, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")


def test_slots_alternate_over_the_gpus_and_jobs_ask_for_their_share(two_gpus):
    from pipeline.cluster import Cluster

    assert Cluster(8, device="cuda", jobs_per_gpu=2).slots() == ["5", "7", "5", "7"]
    assert Cluster(3, device="cuda", jobs_per_gpu=2).slots() == ["5", "7", "5"]  # fewer workers: still both GPUs
    assert Cluster(8, device="cuda:1", jobs_per_gpu=3).slots() == ["7", "7", "7"]
    assert Cluster(8, device="cpu", jobs_per_gpu=3).task_resources() is None
    for n in (1, 2, 3, 5, 9, 11, 12):
        need = Cluster(8, device="cuda", jobs_per_gpu=n).task_resources()["GPU"]
        left = 1.0
        for _ in range(n):  # dask's bookkeeping: n jobs fit in a worker with GPU=1, n + 1 do not
            assert left >= need
            left -= need
        assert left < need
    with pytest.raises(ValueError, match="2 visible GPU"):
        Cluster(8, device="cuda:2").slots()


def test_sweep_places_n_jobs_per_gpu_on_pinned_workers(two_gpus, tmp_path):
    """2 GPUs x 2 jobs per GPU: four worker processes, two per GPU, each job on `cuda` inside a
    worker that sees only its GPU; never more than two jobs on one GPU at a time."""
    out = sweep(_jobs(8), _ctx(tmp_path, "cuda", 1.0), workers=99, jobs_per_gpu=2, fn=_record_job, log=lambda *a: None)
    assert not [o for o in out.values() if "error" in o], out
    recs = _records(tmp_path)
    assert len(recs) == 8 and {r["device"] for r in recs} == {"cuda"}
    by_gpu = {g: [r for r in recs if r["gpu"] == g] for g in ("5", "7")}
    assert all(by_gpu.values()) and sum(map(len, by_gpu.values())) == 8  # both GPUs, nothing elsewhere
    assert len({r["pid"] for r in recs}) <= 4
    assert all(len({r["pid"] for r in rs}) <= 2 for rs in by_gpu.values())  # a worker stays on its GPU
    assert all(_most_at_once(rs) <= 2 for rs in by_gpu.values())
    assert _most_at_once(recs) >= 2  # they did run side by side


def test_a_job_on_cuda_k_runs_on_the_k_th_gpu_seen_as_cuda(two_gpus, tmp_path):
    out = sweep(_jobs(3), _ctx(tmp_path, "cuda:1", 0.2), workers=99, jobs_per_gpu=2, fn=_record_job, log=lambda *a: None)
    assert not [o for o in out.values() if "error" in o], out
    assert {(r["gpu"], r["device"]) for r in _records(tmp_path)} == {("7", "cuda")}


def test_resources_cap_jobs_on_a_scheduler_whose_worker_has_more_threads(tmp_path):
    """An existing scheduler: one worker with 10 threads declaring GPU=1. With 9 jobs per GPU the
    jobs' resource requests let exactly 9 run at once (not 10, and not 8: 1 - 8 x (1/9) < 1/9 in
    floating point, so each job asks for a hair less than 1/9)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=10, processes=False, dashboard_address=":0",
                      resources={"GPU": 1}) as c:
        out = sweep(_jobs(18), _ctx(tmp_path, "cuda", 1.5), scheduler=c.scheduler_address, jobs_per_gpu=9,
                    fn=_record_job, log=lambda *a: None)
    assert not [o for o in out.values() if "error" in o], out
    recs = _records(tmp_path)
    assert len(recs) == 18 and _most_at_once(recs) == 9
    assert {r["device"] for r in recs} == {"cuda"}  # not pinned by imer: the device as given


def test_default_jobs_per_gpu_is_the_least_of_three_bounds():
    from train.job_memory import CUDA_CONTEXT, GPU_SHARE, HOST_SHARE, default_jobs_per_gpu

    gib = 2 ** 30
    cases = [  # job, gpu, gpus, cpus, data, host -> which bound binds
        (1 * gib, 80 * gib, 1, 16, 1 * gib, 128 * gib),     # cores
        (6 * gib, 80 * gib, 1, 64, 1 * gib, 512 * gib),     # GPU memory
        (1 * gib, 80 * gib, 2, 64, 8 * gib, 64 * gib),      # host memory
        (90 * gib, 80 * gib, 1, 16, 1 * gib, 128 * gib),    # nothing fits: still one
        (1 * gib, 80 * gib, 2, 16, 1 * gib, 512 * gib),     # cores, shared by two GPUs
    ]
    for job, gpu, gpus, cpus, data, host in cases:
        want = max(1, min(int(GPU_SHARE * gpu // (CUDA_CONTEXT + job)), max(1, cpus // gpus),
                          int(HOST_SHARE * host // data // gpus)))
        n, bounds = default_jobs_per_gpu(job, gpu, gpus, cpus, data, host)
        assert n == want and n == max(1, min(bounds.values()))
    assert [default_jobs_per_gpu(*c)[0] for c in cases] == [16, 9, 2, 1, 8]


def test_saved_bytes_counts_the_activations_autograd_keeps():
    """y = relu(x W^T + b): autograd keeps x (for W's gradient) and relu's output, not W."""
    import torch

    from train.job_memory import saved_bytes

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    got = saved_bytes(lambda: torch.relu(lin(x)).sum(), lin.parameters())
    assert got == x.numel() * 4 + 5 * 3 * 4
    x.requires_grad_(True)  # now W is saved too (for x's gradient): a parameter, left out
    assert saved_bytes(lambda: torch.relu(lin(x)).sum(), lin.parameters()) == got


def test_measure_counts_every_parameter_four_times_over(one_torch_thread):
    """A method's job memory: weights, gradients and Adam's two moments (16 bytes a parameter),
    prerequisites included, plus activations and the batch."""
    from train.config import load_config
    from train.job_memory import measure
    from train.methods import build
    from train.synthetic import synthetic_data

    data = synthetic_data(40)
    cfg = load_config("mmin", "demo")  # requires the baseline: its parameters are on the GPU too
    m = measure(cfg, data, np.arange(30))
    own = sum(p.numel() for p in build(cfg, data.spec).parameters())
    pre = sum(p.numel() for p in build(cfg["prerequisites"]["baseline"], data.spec).parameters())
    assert m["params"] == own + pre and m["state_bytes"] == 16 * (own + pre)
    assert m["job_bytes"] == m["state_bytes"] + m["activation_bytes"] + m["batch_bytes"] and m["activation_bytes"] > 0


def test_cli_refuses_jobs_per_gpu_without_a_gpu(capsys):
    from pipeline.cli import main

    assert main(["compare", "--dataset", "demo", "--jobs-per-gpu", "2"]) == 2
    assert "--device cuda" in capsys.readouterr().err
    assert main(["compare", "--dataset", "demo", "--device", "cuda", "--jobs-per-gpu", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["train", "--dataset", "demo", "--method", "baseline", "--device", "cpu", "--jobs-per-gpu", "2"]) == 2
    assert "--device cuda" in capsys.readouterr().err
