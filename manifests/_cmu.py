"""Shared by the CMU-MOSI and CMU-MOSEI recipes: sentiment labels, the standard splits, and the
"standard" fold file. Utterance ids are ``<video>_<segment>``; speakers are not annotated (MOSI has
89 speakers in 93 videos, MOSEI ~1000 in 3228), so ``speaker`` stays empty, ``session`` holds the
video id, and the splits are checked to be video-disjoint instead."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from manifests._common import finish_folds
from manifests.schema import Fold, ManifestError, Utterance

SPLITS = ("train", "valid", "test")


def read_sentiment_csv(path: Path) -> dict[tuple[str, str], dict]:
    """``start,end,video_id,segment_no,label`` rows (no header; MOSI's OpinionLevelSentiment.csv) ->
    {(video, segment): {value, start, end}}. Labels must lie in [-3, 3]."""
    out: dict[tuple[str, str], dict] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for no, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 5:
                raise ManifestError(f"{path}:{no}: expected 5 fields 'start,end,video_id,segment_no,label', "
                                    f"got {len(row)}: {','.join(row)[:80]!r}")
            try:
                start, end, value = float(row[0]), float(row[1]), float(row[4])
                seg = str(int(row[3]))
            except ValueError:
                raise ManifestError(f"{path}:{no}: not numbers where expected in {','.join(row)[:80]!r} "
                                    "(start, end, segment_no and label are numeric)") from None
            if not -3.0 <= value <= 3.0:
                raise ManifestError(f"{path}:{no}: sentiment {value} outside [-3, 3]")
            key = (row[2].strip(), seg)
            if key in out:
                raise ManifestError(f"{path}:{no}: segment {key[0]}_{key[1]} listed twice")
            out[key] = {"value": value, "start": start, "end": end}
    return out


def standard_splits(corpus: str, splits_file: Path | None = None) -> dict[str, list[str]]:
    """Video ids per split: the CMU SDK lists shipped with imer, or a user JSON file
    {"train": [...], "valid": [...], "test": [...]}."""
    if splits_file is None:
        from manifests import _cmu_std_folds

        return getattr(_cmu_std_folds, corpus.upper())
    p = Path(splits_file)
    try:
        doc = json.loads(p.read_text())
        assert isinstance(doc, dict) and all(isinstance(doc.get(s), list) for s in SPLITS)
    except (OSError, json.JSONDecodeError, AssertionError):
        raise ManifestError(f"{p}: bad split file; expected JSON {{\"train\": [video ids], \"valid\": [...], "
                            "\"test\": [...]}") from None
    return {s: [str(v) for v in doc[s]] for s in SPLITS}


def write_standard_folds(out_dir: Path, utts: list[Utterance], dataset: str, splits: dict[str, list[str]]) -> None:
    for a, b in (("train", "test"), ("train", "valid"), ("valid", "test")):
        both = set(splits[a]) & set(splits[b])
        if both:  # the splits are video-disjoint: a video listed twice is an error, not "last wins"
            raise ManifestError(f"{dataset}/standard: videos {sorted(both)[:5]} are in both {a} and {b}")
    where = {v: s for s in SPLITS for v in splits[s]}
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    outside = 0
    for u in utts:
        s = where.get(u.session)
        if s is None:
            outside += 1
        else:
            parts[s].append(u.id)
    if outside:
        print(f"{dataset}: {outside} utterances belong to videos outside the standard splits (left out of the folds)")
    finish_folds(out_dir, "standard", [Fold("standard", parts["train"], parts["valid"], parts["test"])], utts, dataset)


def existing(root: Path, rel: str) -> str | None:
    return rel if (root / rel).is_file() else None
