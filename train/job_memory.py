"""How many training jobs share one GPU by default: from the jobs' measured memory, not a guess.

A job is one fold x seed of one method in its own worker process. On the GPU it holds:
- a CUDA context (``CUDA_CONTEXT``: the driver's and cuBLAS/cuDNN's state of one process);
- the model's state: weights, gradients and Adam's two moments, 4 x 4 bytes per parameter
  (float32 master weights under autocast too; prerequisites attached to the method included);
- the activations of a training step: the bytes of every tensor autograd saves for the backward
  pass (``saved_bytes``), measured in one forward on the CPU in float32 for the config's batch
  size on the training split's longest utterances (autocast halves many of them: an overestimate);
- the batch itself.

``measure`` does that per method config on the real data; ``default_jobs_per_gpu`` divides
``GPU_SHARE`` of the GPU's memory by the largest job, and bounds the result by the CPU cores per
GPU (each job's process drives its kernels from one core) and by host memory (each worker
process holds its own copy of the data module). ``imer compare --device cuda`` and ``imer train
--device cuda --workers N`` print the figures they chose from.
"""

from __future__ import annotations

import os

import numpy as np

CUDA_CONTEXT = 512 * 2 ** 20  # per process; bench/gpu_check.py measures the real one on the card
GPU_SHARE = 0.8  # of the GPU's memory: the rest for the allocator's fragmentation and cuDNN workspaces
HOST_SHARE = 0.5  # of host memory for the workers' data modules


def saved_bytes(step, params=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step()`` runs; those of
    ``params`` are left out (the model's state, counted apart)."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return int(sum(seen.values()))


def measure(cfg: dict, data, train_idx) -> dict:
    """{params, state_bytes, activation_bytes, batch_bytes, job_bytes} of training ``cfg`` on
    ``data`` (one CPU forward, float32, the ``batch_size`` longest training utterances)."""
    import torch

    from train.conditions import apply_availability
    from train.data import Normalizer
    from train.methods import build

    torch.manual_seed(0)
    method = build(cfg, data.spec)
    done = cfg.get("prerequisites") or {}  # the resolved configs load_config records
    prereqs = {role: build(done[name], data.spec) for role, name in (cfg.get("requires") or {}).items()}
    if prereqs:
        method.attach(prereqs)
    bs = int(cfg["train"]["batch_size"])
    norm = Normalizer.fit(data, train_idx, cfg.get("data", {}).get("normalize", []))
    idx = np.asarray(train_idx)
    if getattr(method, "batching", "utterance") == "utterance":
        batch = data.collate(idx[data.length_order(idx)][-bs:], norm)
    else:  # whole conversations (train.conversations): the first batch
        batch = next(iter(data.batches(idx, bs, norm, unit=method.batching)))
    b = apply_availability(batch, np.ones((len(batch["y"]), 3), bool))
    b["phase"] = "train"
    method.train()
    params = {p.data_ptr(): p for p in [*method.parameters(), *(q for m in prereqs.values() for q in m.parameters())]}
    acts = saved_bytes(lambda: method.loss(b), params.values())
    n_params = int(sum(p.numel() for p in params.values()))
    batch_bytes = int(sum(v.numel() * v.element_size() for v in _tensors(b)))
    state = 16 * n_params
    return {"params": n_params, "state_bytes": state, "activation_bytes": acts, "batch_bytes": batch_bytes,
            "job_bytes": state + acts + batch_bytes}


def _tensors(batch: dict):
    import torch

    for v in batch.values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            yield from (t for t in v.values() if isinstance(t, torch.Tensor))


def data_bytes(data) -> int:
    """Host memory of a data module's features (what each worker process holds)."""
    return int(sum(s.nbytes() for s in data.seqs.values()))


def host_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_jobs_per_gpu(job_bytes: int, gpu_bytes: int, gpus: int, cpus: int, data_host_bytes: int,
                         host_bytes: int) -> tuple[int, dict]:
    """(jobs per GPU, the three bounds it is the least of): GPU memory, CPU cores per GPU, host memory."""
    bounds = {"gpu_memory": int(GPU_SHARE * gpu_bytes // (CUDA_CONTEXT + job_bytes)),
              "cpu_cores": max(1, cpus // max(1, gpus)),
              "host_memory": int(HOST_SHARE * host_bytes // max(1, data_host_bytes) // max(1, gpus))}
    return max(1, min(bounds.values())), bounds


def choose(cfgs: list[dict], data_for, fold, gpus: int, log=print) -> int:
    """The default jobs per GPU for training ``cfgs`` (each on ``data_for(cfg)``, ``fold``'s
    training split) on the GPUs here (GPU 0's memory); the figures are logged."""
    from pipeline.device import gpu_memory

    sizes, host = {}, 0
    for cfg in cfgs:
        try:
            data = data_for(cfg)
            host = max(host, data_bytes(data))
            sizes[cfg["name"]] = measure(cfg, data, data.indices(fold.train, f"fold {fold.name} train"))["job_bytes"]
        except Exception as e:  # noqa: BLE001 - the job itself will report it; the others still count
            log(f"  {cfg['name']}: could not measure its memory ({type(e).__name__}: {e})")
    if not sizes:
        return 1
    worst = max(sizes, key=sizes.get)
    n, bounds = default_jobs_per_gpu(sizes[worst], gpu_memory(0), gpus, os.cpu_count() or 1, host, host_memory())
    log(f"jobs per GPU: {n} (largest job {worst}: {sizes[worst] / 2 ** 20:.0f} MiB + a "
        f"{CUDA_CONTEXT / 2 ** 20:.0f} MiB CUDA context; bounds {bounds}); --jobs-per-gpu N sets it")
    return n
