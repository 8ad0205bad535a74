"""Device choice shared by extractors and training: CUDA when present, CPU otherwise."""

from __future__ import annotations

from contextlib import contextmanager


def resolve_device(name: str | None = "auto") -> str:
    """Map 'auto' | 'cpu' | 'cuda' | 'cuda:N' to a torch device string; fail clearly if CUDA is asked for but absent."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("imer: --device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise SystemExit(f"imer: unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return name


@contextmanager
def torch_threads(device: str, n: int | None):
    """Run torch with ``n`` intra-op threads while on CPU (the previous count is restored). Small
    nets are thousands of tiny ops: on a busy 2-core machine two threads ran face detection 5-15x
    and training 8x slower than one, waiting on each other; scale out with processes instead.
    ``n`` None, or a CUDA device: unchanged."""
    import torch

    old = torch.get_num_threads()
    if n is None or not str(device).startswith("cpu") or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- mixed precision: one decision for training and evaluation ----------------------------------

_AMP_WORDS = {"true": "auto", "auto": "auto", "on": "auto", "yes": "auto",
              "false": None, "off": None, "no": None, "none": None, "fp32": None, "float32": None,
              "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}


def autocast_dtype(device: str, amp=True):
    """The autocast dtype for ``device`` under the config value ``train.amp``: None (float32),
    torch.bfloat16, or torch.float16 (the trainer then adds a GradScaler: fp16's narrow range
    underflows small gradients; bf16 has float32's range and needs none).

    ``true`` / ``auto``: bf16 on a CUDA device that supports it, fp16 on an older one; float32 on
    CPU (tiny nets gain nothing there, and CPU results stay those of float32 runs).
    ``bf16``: bf16 on any device (the tests run CPU bf16 autocast); ``fp16``: fp16 on CUDA (the CPU's
    LSTM kernels have no fp16). ``false`` / ``fp32`` / null: float32."""
    import torch

    word = ("true" if amp else "false") if isinstance(amp, bool) or amp is None else str(amp).strip().lower()
    if word not in _AMP_WORDS:
        raise ValueError(f"train.amp {amp!r} unknown; use true (mixed precision where the device has it), "
                         "false (float32), bf16 or fp16")
    kind, cuda = _AMP_WORDS[word], str(device).startswith("cuda")
    if kind is None or (kind == "auto" and not cuda):
        return None
    if kind == "auto":
        # native bf16 only (Ampere on): older cards emulate it, slower than fp16 + a scaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if kind == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.amp: bf16, but {device} has no bfloat16 support; use train.amp: fp16 or true")
    if kind == "fp16" and not cuda:
        raise ValueError(f"train.amp: fp16 runs on CUDA only (CPU LSTMs have no fp16 kernel); on {device} "
                         "use train.amp: bf16 or false")
    return torch.bfloat16 if kind == "bf16" else torch.float16


def autocast(device: str, dtype):
    """``torch.autocast`` on ``device``'s type for a dtype from ``autocast_dtype`` (off for None)."""
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=dtype or torch.bfloat16,
                          enabled=dtype is not None)


def float32(fn):
    """Decorator for a numerically sensitive step (a loss, a log-density, a noise scale, a softmax
    target): ``fn`` runs with autocast off and its bf16 / fp16 tensor arguments cast to float32,
    whatever autocast its caller runs under. Outside autocast ``fn`` is called as it is, so the
    float32 path is untouched."""
    import functools

    import torch

    low = (torch.float16, torch.bfloat16)

    def up(v):
        return v.float() if isinstance(v, torch.Tensor) and v.dtype in low else v

    @functools.wraps(fn)
    def run(*args, **kw):
        on = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not on:
            return fn(*args, **kw)
        with torch.autocast(on[0], enabled=False), torch.autocast(on[-1], enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kw.items()})
    return run


# ---- GPUs for parallel jobs; extraction precision ------------------------------------------------

def no_gpu_here() -> bool:
    """True when torch certainly sees no GPU: Linux with none of the NVIDIA, AMD (ROCm) or WSL
    driver nodes. Lets ``auto`` resolve to the CPU without importing torch, so a no-op rerun stays
    quick; anywhere else this says False and torch decides."""
    import os
    import sys

    return sys.platform.startswith("linux") and not any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg"))


def concrete_device(name: str | None) -> str:
    """``resolve_device``, except that ``auto`` on a machine without GPU drivers is ``cpu`` at once."""
    return "cpu" if (name or "auto").lower() == "auto" and no_gpu_here() else resolve_device(name)


PRECISIONS = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


def precision_dtype(precision: str):
    """The torch dtype an extractor computes in under ``precision`` (fp16 / bf16), None for fp32."""
    import torch

    return None if PRECISIONS[precision] is None else getattr(torch, PRECISIONS[precision])


def gpu_count() -> int:
    """GPUs torch can use here (after CUDA_VISIBLE_DEVICES); the job layout follows it."""
    if no_gpu_here():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_memory(index: int = 0) -> int:
    """Total memory in bytes of visible GPU ``index``."""
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)


def gpu_ids(device: str, count: int) -> list[str]:
    """The GPUs jobs on ``device`` use, as values for a worker's CUDA_VISIBLE_DEVICES: every one of
    the ``count`` visible GPUs for ``cuda``, the K-th visible one for ``cuda:K``. A parent's own
    CUDA_VISIBLE_DEVICES is honoured (its entries are what the children see)."""
    import os

    visible = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    ids = (visible or [str(i) for i in range(count)])[:count]
    if not ids:
        raise ValueError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    if ":" in device:
        k = int(device.split(":", 1)[1])
        if not 0 <= k < len(ids):
            raise ValueError(f"--device {device}: there are {len(ids)} visible GPU(s), cuda:0..cuda:{len(ids) - 1}")
        return [ids[k]]
    return ids


def worker_device(device: str) -> str:
    """The device a job on ``device`` uses inside this process: ``cuda`` (the one GPU it sees) in a
    worker the scheduler pinned to a GPU (IMER_WORKER_GPU), else ``device`` unchanged."""
    import os

    return "cuda" if str(device).startswith("cuda") and os.environ.get("IMER_WORKER_GPU") else device
