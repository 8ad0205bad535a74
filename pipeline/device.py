"""Device choice shared by extractors and training: CUDA when present, CPU otherwise."""

from __future__ import annotations


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
