"""Data views: the task a run trains on, derived from a manifest's labels or values (``data.target``).

    {kind: labels}                      the manifest's classes (default; regression if it has values only)
    {kind: map, classes: {hap: pos, ang: neg, sad: neg}}
                                        classes merged or renamed (EMMR's IEMOCAP 2-class, neutral left out); labels not
                                        in the map are left out; ``order`` fixes the new class order
    {kind: sign, classes: 3}            negative [-3, 0) / neutral 0 / positive (0, 3] from the value
                                        (EMMR's MOSI 3-class)
    {kind: sign, classes: 2}            negative < 0 / positive > 0, zeros left out (the MMSA ACC2
                                        convention); ``zero: positive`` counts 0 as positive instead
    {kind: regression}                  the manifest's value (CMU-MOSI/MOSEI sentiment)

Each task reports its own metrics (train.metrics): WA, UA, macro-F1 for classes; ACC2 in both
conventions, weighted F1, ACC7, ACC3, MAE and Pearson r for regression.
"""

from __future__ import annotations

from train.data import DataError

KINDS = ("labels", "map", "sign", "regression")


def derive(utts: list, labels: list[str] | None, target: dict | None):
    """(kept utterances, y values, class names or None, task) for ``target`` over ``utts``."""
    target = dict(target or {"kind": "labels"})
    kind = target.get("kind", "labels")
    if kind not in KINDS:
        raise DataError(f"data.target.kind {kind!r} unknown; use one of {', '.join(KINDS)}")
    if kind == "labels":
        if labels is not None:
            kept = [u for u in utts if u.label_index is not None]
            return kept, [u.label_index for u in kept], list(labels), "classification"
        kind = "regression"
    if kind == "regression":
        kept = [u for u in utts if u.value is not None]
        return kept, [float(u.value) for u in kept], None, "regression"
    if kind == "map":
        classes = target.get("classes") or {}
        if not isinstance(classes, dict) or not classes:
            raise DataError("data.target map needs 'classes: {old label: new label, ...}'")
        new = [str(c) for c in target.get("order") or dict.fromkeys(classes.values())]
        if set(new) != {str(v) for v in classes.values()}:
            raise DataError(f"data.target.order {new} must list exactly the mapped classes {sorted(set(classes.values()))}")
        unknown = set(classes) - set(labels or [])
        if labels is None or unknown:
            raise DataError(f"data.target map names labels the manifest does not have: {sorted(unknown) or list(classes)}; "
                            f"its labels are {labels}")
        kept = [u for u in utts if u.label in classes]
        return kept, [new.index(str(classes[u.label])) for u in kept], new, "classification"
    n = int(target.get("classes", 3))
    kept = [u for u in utts if u.value is not None]
    if n == 3:
        return kept, [0 if u.value < 0 else 1 if u.value == 0 else 2 for u in kept], \
            ["negative", "neutral", "positive"], "classification"
    if n == 2:
        zero = target.get("zero", "exclude")
        if zero not in ("exclude", "positive"):
            raise DataError(f"data.target.zero must be exclude or positive, got {zero!r}")
        if zero == "exclude":
            kept = [u for u in kept if u.value != 0]
        return kept, [0 if u.value < 0 else 1 for u in kept], ["negative", "positive"], "classification"
    raise DataError(f"data.target sign takes classes: 2 or 3, got {n}")
