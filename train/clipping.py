"""Gradient clipping, the one place the trainer's clipping settings are read (config ``train``):

- ``clip_grad_norm: X``: the total gradient norm of all trainable parameters is scaled to at most X
  (imer's default way).
- ``clip_grad_norm_per_module: true`` (with ``clip_grad_norm: X``): each sub-network's gradient norm
  is clipped to X on its own, as the MMIN / IF-MMIN authors' code does (``for model in
  self.model_names: clip_grad_norm_(net<model>.parameters(), X)``). The sub-networks are those of
  ``sub_networks``: one per modality encoder, one per other part (imagination modules, classifier,
  invariance encoder), which is the authors' split (netA, netV, netL, netAE, netAE_cycle, netC,
  netinvariant). A module with a small gradient is then not scaled down because another's is large.
- ``clip_grad_value: X``: every gradient element is clamped to [-X, X] (IMDer's
  ``clip_grad_value_``). It cannot be combined with a norm clip (set ``clip_grad_norm: null``);
  being element-wise, it is the same per module or not.

With AMP the gradients are unscaled first, so the thresholds are in true gradient units.
"""

from __future__ import annotations

import torch
from torch import nn


def sub_networks(method: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``method`` grouped as the authors' sub-networks: every direct
    child module is one group, except that a child holding per-modality encoders (an ``enc``
    ModuleDict, ``ModalityEncoders``) gives one group per modality; a module registered twice
    (MMIN's shared forward/backward imagination) counts once, parameters of no child form
    ``(own)``. Frozen parts (no trainable parameter) give no group."""
    groups: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()

    def add(name: str, params) -> None:
        ps = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            groups[name] = ps

    for name, child in method.named_children():
        enc = getattr(child, "enc", None)
        if isinstance(enc, nn.ModuleDict):
            for m, sub in enc.items():
                add(f"{name}.{m}", sub.parameters())
            add(name, child.parameters())  # anything the encoders' container holds besides them
        else:
            add(name, child.parameters())
    add("(own)", method.parameters())
    return groups


def clip_gradients(method: nn.Module, tcfg: dict, params, scaler=None, optimizer=None) -> None:
    """Clip the gradients of ``params`` (the optimiser's trainable parameters) in place as the
    ``train`` config ``tcfg`` says (see the module doc); nothing when no clipping is set. With a
    grad ``scaler`` (AMP), ``optimizer``'s gradients are unscaled first."""
    norm, value = tcfg.get("clip_grad_norm"), tcfg.get("clip_grad_value")
    per_module = bool(tcfg.get("clip_grad_norm_per_module", False))
    if norm and value:
        raise ValueError("train.clip_grad_norm and train.clip_grad_value are both set; choose one")
    if per_module and not (norm or value):  # (a value clip is element-wise: per module or not is the same)
        raise ValueError("train.clip_grad_norm_per_module needs train.clip_grad_norm (the per-module maximum)")
    if not (norm or value):
        return
    if scaler is not None and optimizer is not None and scaler.is_enabled():
        scaler.unscale_(optimizer)
    if value:
        torch.nn.utils.clip_grad_value_(params, float(value))
    elif per_module:
        wanted = {id(p) for p in params}
        for ps in sub_networks(method).values():
            ps = [p for p in ps if id(p) in wanted]
            if ps:
                torch.nn.utils.clip_grad_norm_(ps, float(norm))
    else:
        torch.nn.utils.clip_grad_norm_(params, float(norm))
