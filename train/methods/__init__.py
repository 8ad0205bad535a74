"""Method registry. A method is one module ``train/methods/<name>.py`` defining a registered
``Method`` subclass, plus one config ``train/configs/<name>.yaml`` with the paper's
hyperparameters (``method: <registered name>`` when the config name differs, as for ablations)::

    @register
    class MyMethod(Method):
        name = "mymethod"

        def __init__(self, cfg, spec):
            super().__init__(cfg, spec)
            self.encoders = ModalityEncoders(spec.dims, cfg["model"]["encoders"])
            self.head = FcClassifier(self.encoders.out_dim, [128], spec.out_dim)

        def predict(self, batch):                    # masked inputs only; never batch["x_full"]
            h = self.encoders(batch["x"], batch["lengths"])
            return self.head(self.encoders.fuse(h))

        def loss(self, batch):                       # training batch, with x_full and avail
            out = self.predict(batch)
            ce = self.task_loss(out, batch["y"])
            return ce, {"ce": ce}

A method that builds on another trained model (MMIN's encoders come from the full-modality
baseline) names it in its config: ``requires: {encoders: baseline}``. The runner trains (or
reuses) that config for the same fold and seed and hands the loaded model to ``attach``.
The trainer owns everything else: missing-condition sampling (config ``train.missing``),
optimiser, schedule, clipping, AMP, checkpoints, early stopping and model selection.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

import torch
from torch import nn

from train.data import DataSpec

_REGISTRY: dict[str, type["Method"]] = {}
_DISCOVERED = False


class Method(nn.Module):
    name: ClassVar[str]

    def __init__(self, cfg: dict, spec: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec

    # -- what a method implements ------------------------------------------------------------------
    def predict(self, batch: dict) -> torch.Tensor:
        """Raw output for the batch's (masked) inputs ``x``: logits (B, C) or values (B, 1)."""
        raise NotImplementedError

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss and its named parts (already weighted, as they enter the sum)."""
        raise NotImplementedError

    def attach(self, prereqs: dict[str, "Method"]) -> None:
        """Receive the trained prerequisite models named in ``cfg["requires"]`` (role -> model)."""
        if prereqs:
            raise ValueError(f"method {self.name!r} takes no prerequisite models, got {sorted(prereqs)}")

    # -- shared helpers ------------------------------------------------------------------------------
    def task_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for classification; L1 (or MSE with ``loss.regression: mse``) for regression."""
        if self.spec.task == "classification":
            return nn.functional.cross_entropy(out.float(), y)
        if self.cfg.get("loss", {}).get("regression", "l1") == "mse":
            return nn.functional.mse_loss(out.float().view(-1), y.float())
        return nn.functional.l1_loss(out.float().view(-1), y.float())

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import train.methods as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"train.methods.{m.name}")


def available() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Method]:
    reg = available()
    if name not in reg:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(reg)}")
    return reg[name]


def build(cfg: dict, spec: DataSpec) -> Method:
    """The method a resolved config names (``cfg["method"]``), built for the data ``spec``."""
    return get(cfg["method"])(cfg, spec)
