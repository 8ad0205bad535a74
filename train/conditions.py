"""Missing-modality conditions: which modalities a sample keeps.

Availability is a boolean (N, 3) array in the order (a, v, t). A condition is named by the
modalities it keeps: "a", "v", "t", "av", "at", "vt" (the six missing conditions of MMIN's
Table 1) and "avt" (full). Masking a modality = its frame sequence multiplied by 0 plus a False
flag in ``present`` (the authors' code does exactly this; lengths are kept).

Training-time samplers, all driven by a seeded ``numpy.random.Generator`` so runs reproduce:
``conditions`` (each sample draws one condition uniformly, MMIN), ``random`` (each modality
dropped with a per-sample missing rate, at least one kept; IMDer's protocol), ``one`` (a fraction
of samples lose exactly one modality; EMMR's protocol), ``full`` (nothing dropped).
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


def sample_conditions(n: int, rng: np.random.Generator, choices=MISSING_CONDITIONS) -> np.ndarray:
    """Each sample draws one of ``choices`` uniformly (MMIN's training protocol)."""
    table = np.stack([availability(c) for c in choices])
    return table[rng.integers(0, len(choices), size=n)]


def random_missing(n: int, rate: float, rng: np.random.Generator, min_keep: int = 1) -> np.ndarray:
    """Each modality of each sample is dropped with probability ``rate``; samples left with fewer
    than ``min_keep`` modalities get randomly chosen ones back. The realised missing rate is
    therefore a little below ``rate`` for large rates; rate 0 means complete data."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"missing rate must be in [0, 1], got {rate}")
    keep = rng.random((n, len(MODALITIES))) >= rate
    short = np.flatnonzero(keep.sum(1) < min_keep)
    for i in short:
        lost = np.flatnonzero(~keep[i])
        back = rng.choice(lost, size=min_keep - int(keep[i].sum()), replace=False)
        keep[i, back] = True
    return keep


def one_missing(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """round(rate * n) samples, chosen at random, each lose exactly one random modality."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"missing rate must be in [0, 1], got {rate}")
    keep = np.ones((n, len(MODALITIES)), dtype=bool)
    hit = rng.choice(n, size=int(round(rate * n)), replace=False)
    keep[hit, rng.integers(0, len(MODALITIES), size=len(hit))] = False
    return keep


def sample_availability(spec: dict | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """Dispatch on a config's ``train.missing`` section: {kind: conditions, choices: [...]},
    {kind: random, rate: r, min_keep: 1}, {kind: one, rate: r} or {kind: full}."""
    spec = spec or {"kind": "full"}
    kind = spec.get("kind", "full")
    if kind == "full":
        return np.ones((n, len(MODALITIES)), dtype=bool)
    if kind == "conditions":
        return sample_conditions(n, rng, [canonical(c) for c in spec.get("choices", MISSING_CONDITIONS)])
    if kind == "random":
        return random_missing(n, float(spec["rate"]), rng, int(spec.get("min_keep", 1)))
    if kind == "one":
        return one_missing(n, float(spec["rate"]), rng)
    raise ValueError(f"train.missing.kind {kind!r} unknown; use full, conditions, random or one")


# ---- applying a condition to a batch ------------------------------------------------------------

def apply_availability(batch: dict, avail) -> dict:
    """A new batch whose inputs ``x`` keep only the available modalities (others multiplied by 0),
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
    out["x"] = {m: full[m] * avail[:, i].to(full[m].dtype).view(-1, 1, 1) for i, m in enumerate(MODALITIES) if m in full}
    return out


def reversed_input(batch: dict) -> dict:
    """MMIN's teacher input: the missing modalities real, the available ones zeroed."""
    avail = batch["avail"]
    full = batch["x_full"]
    return {m: full[m] * (~avail[:, i]).to(full[m].dtype).view(-1, 1, 1) for i, m in enumerate(MODALITIES) if m in full}
