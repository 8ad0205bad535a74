"""Missing-modality protocols: one mechanism for training, model selection, test and tables.

The five papers test under three protocols (SPEC.md §4). Each test condition is a *column*, named
by a short id:

- fixed conditions (MMIN, IF-MMIN, CM-ARR): ``a``, ``v``, ``t``, ``av``, ``at``, ``vt`` and ``avt``
  (full): every utterance keeps the named modalities;
- missing rate (IMDer, GCNet): ``mr=0.3``: MR = 1 - sum(m_i) / (N * M) realised exactly on the split
  (to one modality slot), at least one modality kept per sample, ``mr=0`` = complete data;
- missing ratio (EMMR): ``eta=0.2``: exactly round(eta * N) samples lose exactly one modality, drawn
  uniformly from the three.

Test masks are a function of the split's utterance ids (as a set), their natural presence, the
protocol, its parameter and the seed: every method, every rerun and every order of the same split
sees the same masks for the same seed. Each utterance gets uniform keys from a hash of (protocol,
seed, id); the counts are exact on the split, so the allocation is by rank over the split: the
lowest keys of *this split* lose a modality, and the same utterance in another set of ids (a subset,
another fold file) can get a different mask. ``imer report`` and ``imer compare`` therefore refuse
to put side by side runs whose test ids differ. Masks are nested across parameters (what is
missing at MR 0.3 is also missing at MR 0.5).

Natural absence (no face in the whole video, an empty transcript: ``MultimodalData.natural``) is
part of the masks: a naturally absent modality is missing whatever the mask says, so it counts
towards MR and eta, and a sample always keeps at least one modality it really has, where it has
one. MR: the slots dropped are naturally present ones, never a sample's last present one, and
only as many as the rate still needs beyond the natural absences. Eta: a sample that already
misses a modality counts as one of the round(eta * N); the others needed are drawn among the
complete samples. Fixed conditions are what they say: a sample without any of the condition's
modalities has no input under it. ``realised`` reports, per column, what the model saw.

MR above (M - 1) / M = 2/3 cannot be reached while every sample keeps a modality: such a rate is
capped (every sample keeps exactly one, as the CPM-Nets / GCNet mask generator does) with a
warning, and ``realised`` reports what was drawn.

Training draws masks per batch from the trainer's seeded generator (config ``train.missing``):
``{kind: full}``, ``{kind: conditions, choices: [...]}``, ``{kind: missing-rate, rate: r}`` or
``rates: [...]`` (each batch draws one), ``{kind: missing-ratio, ratio: eta}`` or ``ratios: [...]``.
Training draws follow the same rules for natural absence; a conditions draw picks, per sample,
among the choices that keep one of its present modalities.
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
                  "sample; every sample keeps exactly one modality instead", stacklevel=4)  # masks'/draw's caller


def _natural(natural, n: int) -> np.ndarray:
    return np.ones((n, M), dtype=bool) if natural is None else np.asarray(natural, dtype=bool).reshape(n, M)


def allocate_rate(keys: np.ndarray, rate: float, natural=None) -> np.ndarray:
    """(N, M) availability from (N, M) uniform keys: of the droppable slots (naturally present, and
    not the sample's present slot with the largest key), the ones with the smallest keys are
    dropped until round(rate * N * M) slots are missing, natural absences included."""
    n = len(keys)
    nat = _natural(natural, n)
    keep = np.ones((n, M), dtype=bool)
    if n == 0:
        return keep
    want = int(round(rate * n * M))
    if want > (M - 1) * n:
        _warn_cap(rate)
        want = (M - 1) * n
    k = want - int((~nat).sum())
    if k <= 0:
        return keep
    kk = np.where(nat, keys, np.inf)
    has = nat.any(1)
    last = np.argmax(np.where(nat, keys, -np.inf), axis=1)  # the present slot with the largest key
    kk[np.flatnonzero(has), last[has]] = np.inf                           # never dropped
    flat = np.argsort(kk.reshape(-1), kind="stable")[:k]
    flat = flat[np.isfinite(kk.reshape(-1)[flat])]
    keep.reshape(-1)[flat] = False
    return keep


def allocate_ratio(sample_keys: np.ndarray, modality_keys: np.ndarray, ratio: float, natural=None) -> np.ndarray:
    """(N, M) availability: round(ratio * N) samples miss a modality. Samples that naturally miss
    one count among them; of the complete ones, those with the smallest keys lose the modality
    floor(modality_key * M)."""
    n = len(sample_keys)
    nat = _natural(natural, n)
    keep = np.ones((n, M), dtype=bool)
    complete = nat.all(1)
    k = max(0, int(round(ratio * n)) - int((~complete).sum()))
    order = np.argsort(np.where(complete, sample_keys, np.inf), kind="stable")
    hit = order[: min(k, int(complete.sum()))]
    keep[hit, np.minimum((modality_keys[hit] * M).astype(int), M - 1)] = False
    return keep


def _keys(ids, kind: str, seed: int) -> np.ndarray:
    """(N, M + 1) uniforms in [0, 1), a function of (protocol, seed, utterance id) alone."""
    out = np.empty((len(ids), M + 1))
    for i, u in enumerate(ids):
        h = hashlib.blake2b(f"{kind}|{int(seed)}|{u}".encode(), digest_size=8 * (M + 1)).digest()
        out[i] = np.frombuffer(h, dtype="<u8") / 2.0 ** 64
    return out


def masks(col: str, ids, seed: int, natural=None) -> np.ndarray:
    """(N, 3) bool availability (a, v, t) of the utterances ``ids`` under test column ``col``;
    ``natural`` (N, 3) is their natural presence (None: every modality exists). What the model
    sees is ``natural & masks``."""
    kind, p = parse(col)
    n = len(ids)
    if kind == FIXED:
        return np.tile(availability(p), (n, 1))
    keys = _keys(ids, kind, seed)
    if kind == RATE:
        return allocate_rate(keys[:, :M], p, natural)
    return allocate_ratio(keys[:, M], keys[:, 0], p, natural)


def realised_rate(present: np.ndarray) -> float:
    """MR = 1 - sum(m) / (N * M) of a presence (or availability) array."""
    present = np.asarray(present, bool)
    if present.size == 0:
        return 0.0  # no sample: nothing is missing
    return float(1.0 - present.sum() / present.size)


def realised(present: np.ndarray) -> dict:
    """What the model saw under a column, from (N, 3) presence (natural & mask): the missing rate
    ``mr``, the missing ratio ``eta`` (share of samples missing at least one modality) and
    ``no_input`` (share of samples with no modality at all)."""
    present = np.asarray(present, bool)
    n = max(len(present), 1)
    return {"mr": realised_rate(present), "eta": float((present.sum(1) < M).sum() / n),
            "no_input": float((present.sum(1) == 0).sum() / n)}


# ---- training-time draws ---------------------------------------------------------------------------

def draw(spec: dict | None, n: int, rng: np.random.Generator, natural=None) -> np.ndarray:
    """(n, 3) availability for one training batch under config ``train.missing``; ``natural``
    (n, 3) is the batch's natural presence (None: complete)."""
    spec = spec or {"kind": "full"}
    kind = spec.get("kind", "full")
    if kind == "full":
        return np.ones((n, M), dtype=bool)
    if kind == FIXED:
        choices = [canonical(c) for c in spec.get("choices", MISSING_CONDITIONS)]
        table = np.stack([availability(c) for c in choices])
        pick = rng.integers(0, len(choices), size=n)
        if natural is not None:
            usable = (table[None] & _natural(natural, n)[:, None]).any(2)  # (n, choices): keeps a present one
            bad = ~usable[np.arange(n), pick] & usable.any(1)
            if bad.any():  # redraw those uniformly among their usable choices
                u = rng.random(int(bad.sum()))
                opts = usable[bad]
                rank = np.floor(u * opts.sum(1)).astype(int)
                pick[bad] = np.argmax(np.cumsum(opts, 1) > rank[:, None], axis=1)
        return table[pick]
    if kind in (RATE, RATIO):
        one, many = ("rate", "rates") if kind == RATE else ("ratio", "ratios")
        vals = spec.get(many, [spec[one]] if one in spec else None)
        if not vals:
            raise ProtocolError(f"train.missing {kind} needs '{one}: x' or '{many}: [..]'")
        p = float(vals[int(rng.integers(0, len(vals)))]) if len(vals) > 1 else float(vals[0])
        parse(column(kind, p))  # range check
        if kind == RATE:
            return allocate_rate(rng.random((n, M)), p, natural)
        return allocate_ratio(rng.random(n), rng.random(n), p, natural)
    raise ProtocolError(f"train.missing.kind {kind!r} unknown; use full, conditions, missing-rate or missing-ratio")
