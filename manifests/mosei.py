"""CMU-MOSEI raw segments with sentiment in [-3, 3].

Layout under the data root (or its ``Raw/``)::

    Transcript/Segmented/Combined/<vid>.txt   lines 'vid___seg___start___end___text' (segments from 0)
    Videos/Segmented/Combined/<vid>_<seg>.mp4 (audio is read from the same file)
    Labels/*.csd                              the SDK's label sequence (HDF5: <root>/data/<vid>/
                                              {features (N, k), intervals (N, 2)}; sentiment = column 0)

The raw release carries labels only as that computational sequence, keyed by time interval, so a
segment gets the label whose interval matches its transcript span (both ends within
``TOLERANCE`` s, nearest wins). Alternatively pass ``labels=FILE``, a CSV in MOSI's format
``start,end,video_id,segment_no,label``. Protocol ``standard``: the CMU SDK's standard video lists
(2250/300/678; shipped with imer, or ``splits=FILE``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from manifests._cmu import existing, read_sentiment_csv, standard_splits, write_standard_folds
from manifests._common import layout_error, need_root
from manifests.schema import ManifestError, Media, Utterance, number_turns, write_manifest

DATASET = "mosei"
ALIASES = ["cmu-mosei"]
PROTOCOLS = ["standard"]
TOLERANCE = 0.05

TRANSCRIPTS = "Transcript/Segmented/Combined"
VIDEOS = "Videos/Segmented/Combined"
EXPECTED = (f"{TRANSCRIPTS}/<vid>.txt, {VIDEOS}/<vid>_<seg>.mp4 and a label file Labels/*.csd "
            "(or labels=FILE, a CSV start,end,video_id,segment_no,label)")
_NUM = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def parse_transcript(path: Path) -> list[dict]:
    line_re = re.compile(rf"^(.+?)___(\d+)___{_NUM}___{_NUM}___(.*)$")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            m = line_re.match(line)
            if not m or m.group(1) != path.stem:
                raise ManifestError(f"{path}:{no}: malformed line {line[:80]!r}; expected "
                                    f"'{path.stem}___<seg>___<start>___<end>___<text>'")
            out.append({"seg": str(int(m.group(2))), "start": float(m.group(3)), "end": float(m.group(4)),
                        "text": m.group(5).strip()})
    return out


def read_csd(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """video id -> (intervals (N, 2), sentiment (N,)) from an SDK computational sequence."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            top = list(f.keys())
            if len(top) != 1 or "data" not in f[top[0]]:
                raise ManifestError(f"{path}: not a CMU SDK computational sequence (expected one root group "
                                    f"with data/<video>/{{features, intervals}}; found {top})")
            data = f[top[0]]["data"]
            out = {}
            for vid in data:
                feats, iv = data[vid]["features"][()], data[vid]["intervals"][()]
                if feats.ndim != 2 or iv.shape != (feats.shape[0], 2):
                    raise ManifestError(f"{path}: video {vid}: features {feats.shape} / intervals {iv.shape} "
                                        "do not pair up as (N, k) / (N, 2)")
                out[vid] = (iv.astype(float), feats[:, 0].astype(float))
            return out
    except OSError as e:
        raise ManifestError(f"{path}: cannot read as HDF5 ({e}); pass the SDK's .csd label file") from None


def _find_root(data_root: Path | None) -> Path:
    root = need_root(DATASET, data_root, EXPECTED)
    for cand in (root, root / "Raw"):
        if (cand / TRANSCRIPTS).is_dir():
            return cand
    raise layout_error(DATASET, root, [EXPECTED])


def _label_source(root: Path, labels: str | Path | None):
    if labels is not None:
        return Path(labels)
    csds = sorted((root / "Labels").glob("*.csd")) if (root / "Labels").is_dir() else []
    if not csds:
        raise ManifestError(f"mosei: no label file: expected {root / 'Labels'}/*.csd (the SDK's "
                            "CMU_MOSEI_LabelsSentiment.csd or CMU_MOSEI_Labels.csd), or pass labels=FILE "
                            "(CLI: --labels FILE), a CSV start,end,video_id,segment_no,label")
    pref = [p for p in csds if "sentiment" in p.name.lower()] or [p for p in csds if "label" in p.name.lower()] or csds
    return pref[0]


def build(data_root: Path | None, out_dir: Path, labels: str | Path | None = None,
          splits: str | Path | None = None, **_) -> Path:
    root = _find_root(data_root)
    src = _label_source(root, labels)
    by_key = read_sentiment_csv(src) if src.suffix.lower() != ".csd" else None
    by_vid = read_csd(src) if by_key is None else None
    utts: list[Utterance] = []
    unmatched = 0
    for tp in tqdm(sorted((root / TRANSCRIPTS).glob("*.txt")), desc="mosei", unit="video"):
        vid = tp.stem
        for seg in parse_transcript(tp):
            if by_key is not None:
                rec = by_key.get((vid, seg["seg"]))
                value = rec["value"] if rec else None
            else:
                value = None
                if vid in by_vid:
                    iv, sent = by_vid[vid]
                    err = np.maximum(np.abs(iv[:, 0] - seg["start"]), np.abs(iv[:, 1] - seg["end"]))
                    j = int(np.argmin(err)) if len(err) else -1
                    if j >= 0 and err[j] <= TOLERANCE:
                        value = float(sent[j])
            if value is None:
                unmatched += 1
                continue
            if not -3.0 <= value <= 3.0:
                raise ManifestError(f"{src}: sentiment {value} for {vid}_{seg['seg']} outside [-3, 3]")
            uid = f"{vid}_{seg['seg']}"
            mp4 = existing(root, f"{VIDEOS}/{uid}.mp4")
            utts.append(Utterance(id=uid, dataset=DATASET, session=vid, value=value,
                                  audio=Media(mp4) if mp4 else None, video=Media(mp4) if mp4 else None,
                                  text=seg["text"] or None,
                                  extra={"segment": int(seg["seg"]), "span": [seg["start"], seg["end"]]},
                                  conversation=vid))
    number_turns(utts, lambda u: u.extra["segment"])  # a video is one conversation, its segments in order
    if unmatched:
        print(f"mosei: {unmatched} transcript segments have no label in {src.name} (left out)")
    if not utts:
        raise ManifestError(f"mosei: no labelled segments under {root} (labels from {src})")
    n = sum(u.video is None for u in utts)
    if n:
        print(f"mosei: {n} segments have no video/audio file (kept with text only)")
    path = write_manifest(out_dir / "manifest.jsonl", utts, DATASET, None, root)
    write_standard_folds(out_dir, utts, DATASET, standard_splits(DATASET, splits))
    return path
