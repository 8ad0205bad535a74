"""Missing-modality conditions: which modalities a sample keeps.

Availability is a boolean (N, 3) array in the order (a, v, t). A condition is named by the
modalities it keeps: "a", "v", "t", "av", "at", "vt" (the six missing conditions of MMIN's
Table 1) and "avt" (full). Masking a modality = its frame sequence replaced by zeros plus a False
flag in ``present`` (the authors' code multiplies by 0; selection gives the same zeros and never
turns a non-finite input into NaN). A masked modality also loses its length and frame mask: it
becomes what a naturally absent one is, one zero frame (length 1, no valid frame), so nothing
about it reaches a model, not even how long it was (utterance duration carries emotion).

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

TRUTH = ("x_full", "lengths_full", "frame_mask_full")  # the unmasked sample: for losses only


def apply_availability(batch: dict, avail) -> dict:
    """A new batch whose inputs keep only the modalities the sample has and keeps under ``avail``:
    ``present`` = natural presence AND availability; a modality not present has zero frames
    ``x``, ``lengths`` 1 and no valid frame in ``frame_mask``, whatever its true frames and length.
    The unmasked sample stays in ``x_full``, ``lengths_full`` and ``frame_mask_full`` (``TRUTH``)
    for losses that need the ground truth of what is missing (reconstruction, teacher targets);
    the evaluator removes them before ``predict``, so predictions can never use them."""
    import torch

    avail = torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=batch["natural"].device)
    full = batch.get("x_full", batch["x"])
    lengths = batch.get("lengths_full", batch["lengths"])
    fmask = batch.get("frame_mask_full", batch["frame_mask"])
    out = dict(batch)
    out.update(x_full=full, lengths_full=lengths, frame_mask_full=fmask, avail=avail)
    out["present"] = present = batch["natural"] & avail
    out.update(masked_view(full, lengths, fmask, present))
    return sealed(out)


SEAL = "_masked"  # the batch key of ``sealed``


def _inputs(batch: dict) -> tuple:
    return (batch["present"], *(t for k in ("x", "lengths", "frame_mask") for t in batch[k].values()))


def sealed(batch: dict) -> dict:
    """``batch`` (masked by ``present``) marked so that ``is_sealed`` can tell it is still exactly
    what the masking made: its input tensors themselves and their in-place version counters. The
    methods' guard then skips masking it again (a full copy of every modality per call)."""
    batch[SEAL] = tuple((t, t._version) for t in _inputs(batch))
    return batch


def is_sealed(batch: dict) -> bool:
    """True when ``batch``'s ``present``, ``x``, ``lengths`` and ``frame_mask`` are the very tensors
    ``sealed`` saw, unchanged since: any replaced or modified one (a caller's tampering) is False."""
    seal = batch.get(SEAL)
    if seal is None:
        return False
    now = _inputs(batch)
    return len(now) == len(seal) and all(a is t and t._version == v for a, (t, v) in zip(now, seal))


def masked_view(x: dict, lengths: dict, frame_mask: dict, keep) -> dict:
    """{"x", "lengths", "frame_mask"} of a sample where only the modalities ``keep`` (B, 3) says
    remain; the others are one zero frame (length 1, no valid frame)."""
    import torch

    cols = {m: keep[:, i] for i, m in enumerate(MODALITIES) if m in x}
    return {"x": {m: _keep(x[m], k) for m, k in cols.items()},
            "lengths": {m: torch.where(k.to(lengths[m].device), lengths[m], torch.ones_like(lengths[m]))
                        for m, k in cols.items()},
            "frame_mask": {m: frame_mask[m] & k.to(frame_mask[m].device)[:, None] for m, k in cols.items()}}


def without_truth(batch: dict) -> dict:
    """``batch`` without the unmasked sample (``TRUTH``): what ``predict`` may see."""
    return {k: v for k, v in batch.items() if k not in TRUTH}


def _keep(x, keep):
    """``x`` (B, T, D) where ``keep`` (B,) is True, exact zeros elsewhere (selection, NaN-safe)."""
    import torch

    return torch.where(keep.view(-1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def reversed_input(batch: dict) -> dict:
    """MMIN's teacher input: the missing modalities real, the available ones zeroed (``x``,
    ``lengths``, ``frame_mask``, as ``masked_view``: a zeroed modality is one zero frame)."""
    keep = batch["natural"] & ~batch["avail"]
    return masked_view(batch["x_full"], batch["lengths_full"], batch["frame_mask_full"], keep)
