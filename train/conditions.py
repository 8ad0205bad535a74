"""Missing-modality conditions: which modalities a sample keeps.

Availability is a boolean (N, 3) array in the order (a, v, t). A condition is named by the
modalities it keeps: "a", "v", "t", "av", "at", "vt" (the six missing conditions of MMIN's
Table 1) and "avt" (full). Masking a modality = its frame sequence replaced by zeros plus a False
flag in ``present`` (the authors' code multiplies by 0; selection gives the same zeros and never
turns a non-finite input into NaN); lengths are kept.

Which samples keep which modalities under a protocol (fixed conditions, missing rate, missing
ratio) is decided in ``train.protocols``; this module names conditions and applies them.
"""

from __future__ import annotations

import numpy as np

MODALITIES = ("a", "v", "t")
CONDITIONS = ("a", "v", "t", "av", "at", "vt", "avt")
MISSING_CONDITIONS = CONDITIONS[:6]
FULL = "avt"


def canonical(name: str) -> str:
    """'ta' -> 'at'; rejects unknown letters and the empty condition."""
    letters = set(name)
    if not letters or letters - set(MODALITIES) or len(letters) != len(name):
        raise ValueError(f"bad condition {name!r}: use the available modalities' letters, one of {', '.join(CONDITIONS)}")
    return "".join(m for m in MODALITIES if m in letters)


def availability(name: str) -> np.ndarray:
    """(3,) bool: True where the condition keeps the modality."""
    name = canonical(name)
    return np.array([m in name for m in MODALITIES])


def condition_of(row) -> str:
    """Name of an availability row; '' when nothing is available."""
    return "".join(m for m, keep in zip(MODALITIES, row) if keep)


# ---- applying a condition to a batch ------------------------------------------------------------

def apply_availability(batch: dict, avail) -> dict:
    """A new batch whose inputs ``x`` keep only the available modalities (others zeroed),
    with ``present`` = natural presence AND availability. The unmasked inputs stay in ``x_full``
    for losses that need the ground truth of what is missing (reconstruction, teacher targets);
    the evaluator removes ``x_full`` before ``predict``, so predictions can never use it."""
    import torch

    avail = torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=batch["natural"].device)
    full = batch.get("x_full", batch["x"])
    out = dict(batch)
    out["x_full"] = full
    out["avail"] = avail
    out["present"] = batch["natural"] & avail
    out["x"] = {m: _keep(full[m], avail[:, i]) for i, m in enumerate(MODALITIES) if m in full}
    return out


def _keep(x, keep):
    """``x`` (B, T, D) where ``keep`` (B,) is True, exact zeros elsewhere (selection, NaN-safe)."""
    import torch

    return torch.where(keep.view(-1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def reversed_input(batch: dict) -> dict:
    """MMIN's teacher input: the missing modalities real, the available ones zeroed."""
    avail = batch["avail"]
    full = batch["x_full"]
    return {m: _keep(full[m], ~avail[:, i]) for i, m in enumerate(MODALITIES) if m in full}
