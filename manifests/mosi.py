"""CMU-MOSI raw segments with opinion-level sentiment in [-3, 3] (2199 segments, 93 videos).

Layout under the data root (the folder holding ``Raw/``, or ``Raw/`` itself)::

    Raw/Labels/OpinionLevelSentiment.csv          start,end,video_id,segment_no,label (no header)
    Raw/Transcript/Segmented/<vid>.annotprocessed  lines '<seg>_DELIM_<text>'
    Raw/Audio/WAV_16000/Segmented/<vid>_<seg>.wav
    Raw/Video/Segmented/<vid>_<seg>.mp4

Segments are numbered from 1. Protocol ``standard``: the CMU SDK's standard train/valid/test video
lists (52/10/31 videos; shipped with imer, or ``splits=FILE``).
"""

from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from manifests._cmu import existing, read_sentiment_csv, standard_splits, write_standard_folds
from manifests._common import compare_counts, layout_error, need_root, stop_on_mismatch
from manifests.schema import ManifestError, Media, Utterance, number_turns, write_manifest

DATASET = "mosi"
ALIASES = ["cmu-mosi"]
PROTOCOLS = ["standard"]
DOCUMENTED = {"segments": 2199, "videos": 93}

LABELS_CSV = "Labels/OpinionLevelSentiment.csv"
EXPECTED = ("Raw/Labels/OpinionLevelSentiment.csv, Raw/Transcript/Segmented/<vid>.annotprocessed, "
            "Raw/Audio/WAV_16000/Segmented/<vid>_<seg>.wav and Raw/Video/Segmented/<vid>_<seg>.mp4")
_LINE = re.compile(r"^(\d+)_DELIM_(.*)$")


def parse_annotprocessed(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            m = _LINE.match(line)
            if not m:
                raise ManifestError(f"{path}:{no}: malformed transcript line {line[:80]!r}; expected '<seg>_DELIM_<text>'")
            out[str(int(m.group(1)))] = m.group(2).strip()
    return out


def _find_root(data_root: Path | None) -> Path:
    root = need_root(DATASET, data_root, EXPECTED)
    for cand in (root / "Raw", root):
        if (cand / LABELS_CSV).is_file():
            return cand
    raise layout_error(DATASET, root, [EXPECTED])


def build(data_root: Path | None, out_dir: Path, splits: str | Path | None = None,
          accept_counts: bool = False, **_) -> Path:
    root = _find_root(data_root)
    labels = read_sentiment_csv(root / LABELS_CSV)
    tdir = root / "Transcript" / "Segmented"
    texts: dict[str, dict[str, str]] = {}
    utts: list[Utterance] = []
    for (vid, seg), rec in tqdm(sorted(labels.items()), desc="mosi", unit="seg"):
        if vid not in texts:
            tp = tdir / f"{vid}.annotprocessed"
            texts[vid] = parse_annotprocessed(tp) if tp.is_file() else {}
        uid = f"{vid}_{seg}"
        wav = existing(root, f"Audio/WAV_16000/Segmented/{uid}.wav")
        mp4 = existing(root, f"Video/Segmented/{uid}.mp4")
        utts.append(Utterance(id=uid, dataset=DATASET, session=vid, value=rec["value"],
                              audio=Media(wav) if wav else None, video=Media(mp4) if mp4 else None,
                              text=texts[vid].get(seg),
                              extra={"segment": int(seg), "span": [rec["start"], rec["end"]]},
                              conversation=vid))
    number_turns(utts, lambda u: u.extra["segment"])  # a video is one conversation, its segments in order
    if not utts:
        raise ManifestError(f"mosi: {root / LABELS_CSV} lists no segments")
    for m in ("audio", "video", "text"):
        n = sum(getattr(u, m) is None for u in utts)
        if n:
            print(f"mosi: {n} segments have no {m} (kept without that modality)")

    sp = standard_splits(DATASET, splits)
    videos = {u.session for u in utts}
    if splits is None and videos >= {v for s in sp.values() for v in s}:  # all standard videos present
        report = compare_counts("CMU-MOSI segments", DOCUMENTED, {"segments": len(utts), "videos": len(videos)})
        stop_on_mismatch(DATASET, out_dir, report, accept_counts)
    path = write_manifest(out_dir / "manifest.jsonl", utts, DATASET, None, root)
    write_standard_folds(out_dir, utts, DATASET, sp)
    return path
