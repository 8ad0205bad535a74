"""Helpers shared by the dataset recipes: layout checks with useful errors, fold assembly,
count validation against documented corpus statistics, and printable summaries."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Iterable

from manifests.schema import Fold, ManifestError, Utterance, check_speaker_disjoint, write_folds
from pipeline.fsutil import atomic_write_text


def need_root(dataset: str, data_root: Path | None, expected: str) -> Path:
    if data_root is None:
        raise ManifestError(f"{dataset}: no data root given; pass --data-root PATH (make: DATA_ROOT=PATH) "
                            f"pointing at {expected}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ManifestError(f"{dataset}: data root {root} is not a directory; expected {expected}")
    return root


def listing(d: Path, n: int = 12) -> str:
    """A short listing of what is in ``d`` (for 'expected X, found Y' errors)."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty)"
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def layout_error(dataset: str, root: Path, expected: list[str]) -> ManifestError:
    exp = "; ".join(expected)
    return ManifestError(f"{dataset}: {root} does not have the expected layout. Expected: {exp}. "
                         f"Found in {root}: {listing(root)}")


def find_root(dataset: str, data_root: Path | None, marker: str, expected_desc: str,
              names: Iterable[str] = ()) -> Path:
    """The corpus root: ``data_root`` itself when it contains ``marker`` (a relative glob), else a
    child named one of ``names`` (e.g. IEMOCAP_full_release) that does. Raises a layout error."""
    root = need_root(dataset, data_root, expected_desc)
    for cand in [root, *(root / n for n in names)]:
        if cand.is_dir() and any(cand.glob(marker)):
            return cand
    raise layout_error(dataset, root, [expected_desc])


# ---- folds --------------------------------------------------------------------------------------

def split_off(ids: list[str], frac: float, seed: int, labels: dict[str, str | None] | None = None) -> tuple[list[str], list[str]]:
    """Seeded, label-stratified hold-out of ``frac`` of ``ids``: returns (rest, held)."""
    rng = random.Random(seed)
    groups: dict[object, list[str]] = {}
    for i in sorted(ids):
        groups.setdefault(labels.get(i) if labels else None, []).append(i)
    held: set[str] = set()
    for key in sorted(groups, key=str):
        g = groups[key]
        rng.shuffle(g)
        held.update(g[: max(1, round(frac * len(g)))] if len(g) > 1 else [])
    return [i for i in ids if i not in held], [i for i in ids if i in held]


def finish_folds(out_dir: Path, protocol: str, folds: list[Fold], utts: list[Utterance], dataset: str) -> Path:
    """Assert the protocol's invariants (disjoint splits, speaker-independent test) and write it."""
    check_fold_invariants(protocol, folds, utts, dataset)
    return write_folds(out_dir / f"folds-{protocol}.json", folds, protocol, manifest_ids=[u.id for u in utts])


def check_fold_invariants(protocol: str, folds: list[Fold], utts: list[Utterance], dataset: str) -> None:
    """Disjoint splits, ids of the manifest, non-empty train/test, speaker-independent test."""
    speakers = {u.id: u.speaker for u in utts}
    known = set(speakers)
    for f in folds:
        tr, va, te = set(f.train), set(f.val), set(f.test)
        if tr & va or tr & te or va & te:
            raise ManifestError(f"{dataset}/{protocol}: fold {f.name}: splits overlap")
        unknown = (tr | va | te) - known
        if unknown:
            raise ManifestError(f"{dataset}/{protocol}: fold {f.name}: ids not in the manifest: {sorted(unknown)[:5]}")
        if not f.train or not f.test:
            raise ManifestError(f"{dataset}/{protocol}: fold {f.name} has an empty train or test split "
                                f"({len(f.train)}/{len(f.val)}/{len(f.test)}); the data is too small for this protocol")
    check_speaker_disjoint(folds, speakers, where=f"{dataset}/{protocol}")


# ---- documented counts ----------------------------------------------------------------------------

def compare_counts(title: str, expected: dict[str, int], found: dict[str, int]) -> list[str]:
    """Lines of a report table; empty when every expected count matches."""
    bad = [k for k in expected if expected[k] != found.get(k, 0)]
    if not bad:
        return []
    lines = [title, f"  {'':<16}{'expected':>10}{'found':>10}"]
    for k in expected:
        mark = "  <--" if k in bad else ""
        lines.append(f"  {k:<16}{expected[k]:>10}{found.get(k, 0):>10}{mark}")
    return lines


def stop_on_mismatch(dataset: str, out_dir: Path, report: list[str], accept: bool) -> None:
    """Write the count report and stop, unless the user accepted this very report (now, or on an
    earlier build: the acceptance is remembered so `imer features --data-root` can rebuild)."""
    path, ok = out_dir / "count-report.txt", out_dir / "count-report.accepted"
    if not report:
        path.unlink(missing_ok=True)
        ok.unlink(missing_ok=True)
        return
    text = "\n".join(report) + "\n"
    atomic_write_text(path, text)
    if accept or (ok.is_file() and ok.read_text() == text):
        atomic_write_text(ok, text)
        print(f"{dataset}: counts differ from the documented ones (accepted; see {path})")
        return
    raise ManifestError(f"{dataset}: the corpus looks complete but its counts differ from the documented ones "
                        f"(report: {path}):\n" + text +
                        f"Check your copy of the corpus. To use it as it is, run once: imer manifest --dataset "
                        f"{dataset} --data-root PATH --accept-counts")


# ---- summaries --------------------------------------------------------------------------------------

def summary(utts: list[Utterance], folds: dict[str, list[Fold]] | None = None) -> str:
    """Counts per label, speaker and fold (what `imer manifest` prints)."""
    lines = [f"{len(utts)} utterances"]
    mods = Counter(m for u in utts for m in ("audio", "video", "text") if getattr(u, m) is not None)
    lines.append("with media: " + ", ".join(f"{m} {mods.get(m, 0)}" for m in ("audio", "video", "text")))
    labels = Counter(u.label for u in utts if u.label is not None)
    if labels:
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
    values = [u.value for u in utts if u.value is not None]
    if values:
        lines.append(f"values: n={len(values)} min={min(values):.3f} max={max(values):.3f} "
                     f"mean={sum(values) / len(values):.3f}")
    spk = Counter(u.speaker for u in utts if u.speaker is not None)
    if spk:
        lines.append(f"speakers ({len(spk)}): " + ", ".join(f"{k} {v}" for k, v in sorted(spk.items())))
    for proto, fl in (folds or {}).items():
        lines.append(f"folds-{proto} ({len(fl)} folds; train/val/test):")
        for f in fl:
            lines.append(f"  {f.name:>8}: {len(f.train)}/{len(f.val)}/{len(f.test)}")
    return "\n".join(lines)
