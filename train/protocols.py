"""Missing-modality protocols: one mechanism for training, model selection, test and tables.

The five papers test under three protocols (SPEC.md §4). Each test condition is a *column*, named
by a short id:

- fixed conditions (MMIN, IF-MMIN, CM-ARR): ``a``, ``v``, ``t``, ``av``, ``at``, ``vt`` and ``avt``
  (full): every utterance keeps the named modalities;
- missing rate (IMDer, GCNet): ``mr=0.3``: MR = 1 - sum(m_i) / (N * M) realised exactly on the split
  (to one modality slot), at least one modality kept per sample, ``mr=0`` = complete data;
- missing ratio (EMMR): ``eta=0.2``: exactly round(eta * N) samples lose exactly one modality, drawn
  uniformly from the three.

Test masks are a function of (utterance id, protocol, parameter, seed) only: every method, every
rerun and every split order sees the same masks for the same seed. Each utterance gets uniform
keys from a hash of (protocol, seed, id); a parameter only says how many of the lowest keys are
dropped, so masks are nested (what is missing at MR 0.3 is also missing at MR 0.5).

MR above (M - 1) / M = 2/3 cannot be reached while every sample keeps a modality: such a rate is
capped at 2/3 (every sample keeps exactly one, as the CPM-Nets / GCNet mask generator does) with a
warning, and ``realised_rate`` reports what was drawn.

Training draws masks per batch from the trainer's seeded generator (config ``train.missing``):
``{kind: full}``, ``{kind: conditions, choices: [...]}``, ``{kind: missing-rate, rate: r}`` or
``rates: [...]`` (each batch draws one), ``{kind: missing-ratio, ratio: eta}`` or ``ratios: [...]``.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

from train.conditions import CONDITIONS, MISSING_CONDITIONS, MODALITIES, availability, canonical

FIXED, RATE, RATIO = "conditions", "missing-rate", "missing-ratio"
PREFIX = {RATE: "mr", RATIO: "eta"}
DEFAULTS = {FIXED: list(CONDITIONS), RATE: [round(0.1 * i, 1) for i in range(8)],
            RATIO: [round(0.1 * i, 1) for i in range(6)]}
AVERAGE = {FIXED: "average", RATE: "mr-average", RATIO: "eta-average"}
M = len(MODALITIES)


class ProtocolError(ValueError):
    """A protocol or column id that cannot be used; the message says what is accepted."""


# ---- column ids -----------------------------------------------------------------------------------

def column(kind: str, param=None) -> str:
    if kind == FIXED:
        return canonical(param)
    return f"{PREFIX[kind]}={float(param):g}"


def parse(col: str) -> tuple[str, object]:
    """``"mr=0.3"`` -> ("missing-rate", 0.3); ``"ta"`` -> ("conditions", "at")."""
    col = str(col).strip()
    for kind, pre in PREFIX.items():
        if col.startswith(pre + "="):
            try:
                p = float(col[len(pre) + 1:])
            except ValueError:
                raise ProtocolError(f"column {col!r}: {pre}= takes a number, e.g. {pre}=0.3") from None
            if not (0.0 <= p < 1.0 or (kind == RATIO and p == 1.0)):
                raise ProtocolError(f"column {col!r}: {kind} must lie in [0, 1{')' if kind == RATE else ']'}")
            return kind, p
    try:
        return FIXED, canonical(col)
    except ValueError:
        raise ProtocolError(f"test condition {col!r} unknown: use a condition ({', '.join(CONDITIONS)}), "
                            "mr=<rate> or eta=<ratio>") from None


def normalise(col: str) -> str:
    return column(*parse(col))


def expand(text: str) -> list[str]:
    """CLI form -> column ids: ``missing-rate`` (MR 0..0.7), ``missing-rate=0.1,0.5``,
    ``missing-ratio`` (eta 0..0.5), ``conditions`` (the seven fixed ones) or explicit ids."""
    name, _, params = str(text).partition("=")
    name = name.strip()
    if name in DEFAULTS:
        vals = [v for v in params.split(",") if v.strip()] if params else DEFAULTS[name]
        try:
            return [column(name, v) for v in vals]
        except ValueError:
            raise ProtocolError(f"--eval {text}: give numbers after '=', e.g. {name}=0.1,0.3") from None
    return [normalise(c) for c in str(text).split(",") if c.strip()]


def groups(columns) -> list[tuple[str, list[str]]]:
    """Table layout: (protocol, ordered columns incl. its average) for each protocol present."""
    by = {FIXED: [], RATE: [], RATIO: []}
    for c in columns:
        if c in AVERAGE.values():
            continue
        by[parse(c)[0]].append(normalise(c))
    out = []
    fixed = [c for c in CONDITIONS if c in by[FIXED]]
    if fixed:
        avg = [AVERAGE[FIXED]] if all(c in fixed for c in MISSING_CONDITIONS) else []
        out.append((FIXED, [c for c in fixed if c != "avt"] + avg + (["avt"] if "avt" in fixed else [])))
    for kind in (RATE, RATIO):
        cols = sorted(set(by[kind]), key=lambda c: parse(c)[1])
        if cols:
            avg = [AVERAGE[kind]] if len(average_members(AVERAGE[kind], cols)) > 1 else []
            out.append((kind, cols + avg))
    return out


def average_members(avg: str, columns) -> list[str]:
    """Columns an average is taken over: the six missing conditions, or every nonzero MR / eta."""
    if avg == AVERAGE[FIXED]:
        return list(MISSING_CONDITIONS)
    kind = next(k for k, v in AVERAGE.items() if v == avg)
    return [c for c in columns if c not in AVERAGE.values() and parse(c)[0] == kind and parse(c)[1] > 0]


def title(col: str, columns=()) -> str:
    if col == AVERAGE[FIXED]:
        return "Average"
    if col in AVERAGE.values():
        ps = [parse(c)[1] for c in average_members(col, columns)]
        rng = f" {min(ps):g}–{max(ps):g}" if ps else ""
        return ("MR" if col == AVERAGE[RATE] else "η") + f" avg{rng}"
    kind, p = parse(col)
    if kind == FIXED:
        return "{" + ",".join(p) + "}"
    return ("MR " if kind == RATE else "η ") + f"{p:g}"


# ---- allocation: exact counts from uniform keys ----------------------------------------------------

_WARNED: set = set()


def _warn_cap(rate: float) -> None:
    if rate in _WARNED:  # once per process and rate: it is said, not repeated per batch
        return
    _WARNED.add(rate)
    warnings.warn(f"missing rate {rate:g} exceeds {(M - 1) / M:.3f}, the most that keeps one modality per "
                  "sample; every sample keeps exactly one modality instead", stacklevel=3)


def allocate_rate(keys: np.ndarray, rate: float) -> np.ndarray:
    """(N, M) availability from (N, M) uniform keys: the round(rate * N * M) droppable slots with the
    smallest keys are dropped; a sample's slot with its largest key is never droppable."""
    n = len(keys)
    k = int(round(rate * n * M))
    if k > (M - 1) * n:
        _warn_cap(rate)
        k = (M - 1) * n
    keep = np.ones((n, M), dtype=bool)
    if k == 0:
        return keep
    order = np.argsort(keys, axis=1, kind="stable")[:, : M - 1]      # droppable slots, lowest key first
    cand = np.take_along_axis(keys, order, axis=1)                   # ascending within a sample
    flat = np.argsort(cand.reshape(-1), kind="stable")[:k]           # a sample's 2nd before its 1st never wins
    rows, pos = np.divmod(flat, M - 1)
    keep[rows, order[rows, pos]] = False
    return keep


def allocate_ratio(sample_keys: np.ndarray, modality_keys: np.ndarray, ratio: float) -> np.ndarray:
    """(N, M) availability: the round(ratio * N) samples with the smallest keys each lose the modality
    floor(modality_key * M)."""
    n = len(sample_keys)
    keep = np.ones((n, M), dtype=bool)
    hit = np.argsort(sample_keys, kind="stable")[: int(round(ratio * n))]
    keep[hit, np.minimum((modality_keys[hit] * M).astype(int), M - 1)] = False
    return keep


def _keys(ids, kind: str, seed: int) -> np.ndarray:
    """(N, M + 1) uniforms in [0, 1), a function of (protocol, seed, utterance id) alone."""
    out = np.empty((len(ids), M + 1))
    for i, u in enumerate(ids):
        h = hashlib.blake2b(f"{kind}|{int(seed)}|{u}".encode(), digest_size=8 * (M + 1)).digest()
        out[i] = np.frombuffer(h, dtype="<u8") / 2.0 ** 64
    return out


def masks(col: str, ids, seed: int) -> np.ndarray:
    """(N, 3) bool availability (a, v, t) of the utterances ``ids`` under test column ``col``."""
    kind, p = parse(col)
    n = len(ids)
    if kind == FIXED:
        return np.tile(availability(p), (n, 1))
    keys = _keys(ids, kind, seed)
    if kind == RATE:
        return allocate_rate(keys[:, :M], p)
    return allocate_ratio(keys[:, M], keys[:, 0], p)


def realised_rate(avail: np.ndarray) -> float:
    """MR = 1 - sum(m) / (N * M) of an availability array."""
    avail = np.asarray(avail, bool)
    return float(1.0 - avail.sum() / max(avail.size, 1))


# ---- training-time draws ---------------------------------------------------------------------------

def draw(spec: dict | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) availability for one training batch under config ``train.missing``."""
    spec = spec or {"kind": "full"}
    kind = spec.get("kind", "full")
    if kind == "full":
        return np.ones((n, M), dtype=bool)
    if kind == FIXED:
        choices = [canonical(c) for c in spec.get("choices", MISSING_CONDITIONS)]
        table = np.stack([availability(c) for c in choices])
        return table[rng.integers(0, len(choices), size=n)]
    if kind in (RATE, RATIO):
        one, many = ("rate", "rates") if kind == RATE else ("ratio", "ratios")
        vals = spec.get(many, [spec[one]] if one in spec else None)
        if not vals:
            raise ProtocolError(f"train.missing {kind} needs '{one}: x' or '{many}: [..]'")
        p = float(vals[int(rng.integers(0, len(vals)))]) if len(vals) > 1 else float(vals[0])
        parse(column(kind, p))  # range check
        if kind == RATE:
            return allocate_rate(rng.random((n, M)), p)
        return allocate_ratio(rng.random(n), rng.random(n), p)
    raise ProtocolError(f"train.missing.kind {kind!r} unknown; use full, conditions, missing-rate or missing-ratio")
