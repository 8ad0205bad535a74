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
