"""Tiny fixture trees that mimic each raw corpus layout exactly (directory and file names, label-file
line formats), with real tiny media: WAVs via soundfile, AVI/MP4 via OpenCV. Each maker returns the
data root and a plain table of what it wrote, so tests can compute expectations independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SR = 16000


def wav(path: Path, seconds: float, sr: int = SR) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def video(path: Path, frames: int = 4, size=(32, 16)) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = "MJPG" if path.suffix == ".avi" else "mp4v"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 30, size)
    for i in range(frames):
        w.write(np.full((size[1], size[0], 3), 40 * i, np.uint8))
    w.release()
    return path


# ---- IEMOCAP -----------------------------------------------------------------------------------

# (turn suffix, emotion) per impro dialogue; the same for every session.
IEMOCAP_TURNS = [("F000", "neu"), ("M000", "hap"), ("F001", "exc"), ("M001", "ang"), ("F002", "sad"),
                 ("M002", "xxx"), ("F003", "fru"), ("M003", "oth"), ("F004", "ang"), ("M004", "sad"),
                 ("F005", "hap"), ("M005", "neu")]
# A script dialogue of session 1 recorded with the male actor wearing markers.
IEMOCAP_SCRIPT = [("F000", "sad"), ("M000", "ang"), ("F001", "sur")]


def _emo_block(utt: str, start: float, end: float, emo: str) -> str:
    return (f"[{start:.4f} - {end:.4f}]\t{utt}\t{emo}\t[2.5000, 3.0000, 2.0000]\n"
            f"C-E2:\tNeutral;\t()\nC-E3:\tNeutral;\t()\nA-E3:\tval 3; act 2; dom  2;\t()\n"
            f"A-F1:\tval 2; act 3; dom  3;\t()\n\n")


def make_iemocap(base: Path, sessions=(1, 2, 3), media: bool = True) -> tuple[Path, list[dict]]:
    """IEMOCAP_full_release/ under ``base``; returns (root, rows of every labelled turn)."""
    root = base / "IEMOCAP_full_release"
    rows = []
    for n in sessions:
        sdir = root / f"Session{n}"
        dialogs = [(f"Ses0{n}F_impro01", IEMOCAP_TURNS)]
        if n == 1:
            dialogs.append(("Ses01M_script01_1", IEMOCAP_SCRIPT))
        for dialog, turns in dialogs:
            emo = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"]
            tr = ["M: (breathing)\n"]
            for i, (suf, e) in enumerate(turns):
                utt = f"{dialog}_{suf}"
                start, end = 1.5 * i + 0.25, 1.5 * i + 1.25
                emo.append(_emo_block(utt, start, end, e))
                tr.append(f"{utt} [{start:08.4f}-{end:08.4f}]: words of {suf.lower()}.\n")
                rows.append({"id": utt, "dialog": dialog, "session": n, "emotion": e, "start": start, "end": end,
                             "text": f"words of {suf.lower()}.", "speaker": f"Ses0{n}{suf[0]}",
                             "marker": dialog[5]})
                if media:
                    wav(sdir / "sentences" / "wav" / dialog / f"{utt}.wav", 0.1)
            tr.append(f"{dialog}_MXX0 [000.0000-001.0000]: noise line that is not a turn\n")
            (sdir / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (sdir / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("".join(emo))
            (sdir / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
            (sdir / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("".join(tr))
            if media:
                video(sdir / "dialog" / "avi" / "DivX" / f"{dialog}.avi")
        # per-annotator subfolder and a macOS resource fork: both must be ignored
        cat = sdir / "dialog" / "EmoEvaluation" / "Categorical"
        cat.mkdir(parents=True, exist_ok=True)
        (cat / f"Ses0{n}F_impro01_e1_cat.txt").write_text("Ses01F_impro01_F000 :Neutral state; ()\n")
        (sdir / "dialog" / "EmoEvaluation" / f"._Ses0{n}F_impro01.txt").write_bytes(b"\x00\x05\x16\x07junk")
    return root, rows


# ---- MSP-IMPROV --------------------------------------------------------------------------------

def msp_name(sentence: int, target: str, gender: str, session: int, scenario: str, turn: str) -> str:
    return f"MSP-IMPROV-S{sentence:02d}{target}-{gender}0{session}-{scenario}-{turn}"


def make_msp(base: Path, sessions=(1, 2), label_name: str = "Evaluation.txt") -> tuple[Path, list[dict]]:
    """Returns (root, rows): each row a recording with its consensus letter, scenario and duration."""
    root = base / "MSP-IMPROV"
    spec = []  # (sentence, target, gender, scenario, turn, letter, seconds)
    spec += [(1, "A", "F", "S", "FM01", "A", 1.2), (1, "A", "M", "S", "MF01", "H", 1.5),
             (2, "H", "F", "S", "FM02", "N", 2.0), (2, "H", "M", "S", "MF02", "S", 1.1),
             (3, "S", "F", "S", "FM03", "N", 0.6),  # too short: dropped
             (3, "S", "M", "S", "MF03", "O", 1.3),  # other: dropped
             (4, "N", "F", "S", "FM04", "X", 1.3),  # no agreement: dropped
             (4, "N", "M", "S", "MF04", "S", 1.0),  # exactly 1 s: kept
             (5, "A", "F", "R", "FM01", "A", 1.4),  # target-read: not in the subset
             (5, "A", "M", "T", "MF01", "A", 1.4),  # target-improvised: not in the subset
             (6, "H", "F", "P", "FM01", "H", 1.4)]  # natural: not in the subset
    rows, lines = [], []
    for k in sessions:
        for sentence, target, gender, scen, turn, letter, sec in spec:
            name = msp_name(sentence, target, gender, k, scen, turn)
            rel = f"session{k}/S{sentence:02d}{target}/{scen}/{name}"
            wav(root / "Audio" / f"{rel}.wav", sec)
            video(root / "Video" / f"{rel}.avi", frames=2)
            (root / "All_human_transcriptions").mkdir(parents=True, exist_ok=True)
            (root / "All_human_transcriptions" / f"{name}.txt").write_text(f"text of {name}\n")
            lines.append(f"UTD-IMPROV-{name[11:]}.avi; {letter}; A:3.0; V:NaN; D:2.5 ; N:4.0;\n")
            lines.append("rater1; Angry; Frustrated; A:3.0; V:2.0; D:3.0; N:4.0;\n")
            lines.append("rater2; Neutral; ; A:2.0; V:3.0; D:3.0; N:3.0;\n\n")
            rows.append({"id": name, "session": k, "gender": gender, "scenario": scen, "letter": letter,
                         "seconds": sec, "turn": turn})
    (root / label_name).write_text("".join(lines))
    return root, rows


# ---- CMU-MOSI / CMU-MOSEI --------------------------------------------------------------------------

def make_mosi(base: Path, videos: dict[str, list[float]]) -> Path:
    """``videos``: video id -> sentiment per segment (segments numbered from 1)."""
    root = base / "CMU-MOSI"
    raw = root / "Raw"
    rows = []
    for vid, values in videos.items():
        lines = []
        for i, v in enumerate(values, 1):
            rows.append(f"{2.0 * i:.3f},{2.0 * i + 1.5:.3f},{vid},{i},{v}\n")
            lines.append(f"{i}_DELIM_segment {i} of {vid}\n")
            wav(raw / "Audio" / "WAV_16000" / "Segmented" / f"{vid}_{i}.wav", 0.1)
            video(raw / "Video" / "Segmented" / f"{vid}_{i}.mp4", frames=2)
        (raw / "Transcript" / "Segmented").mkdir(parents=True, exist_ok=True)
        (raw / "Transcript" / "Segmented" / f"{vid}.annotprocessed").write_text("".join(lines))
    (raw / "Labels").mkdir(parents=True, exist_ok=True)
    (raw / "Labels" / "OpinionLevelSentiment.csv").write_text("".join(rows))
    return root


def make_mosei(base: Path, videos: dict[str, list[float]], csd_offset: float = 0.0) -> Path:
    """MOSEI tree with labels as an SDK computational sequence (HDF5). Segments from 0; the label
    intervals are the transcript spans shifted by ``csd_offset`` seconds."""
    import h5py

    root = base / "CMU-MOSEI"
    tdir = root / "Transcript" / "Segmented" / "Combined"
    tdir.mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "Labels" / "CMU_MOSEI_LabelsSentiment.csd", "w") as f:
        data = f.create_group("Sentiment Labels").create_group("data")
        f["Sentiment Labels"].create_group("metadata")
        for vid, values in videos.items():
            lines, iv = [], []
            for i, v in enumerate(values):
                s, e = 3.0 * i + 0.5, 3.0 * i + 2.25
                lines.append(f"{vid}___{i}___{s}___{e}___words of segment {i}\n")
                iv.append([s + csd_offset, e + csd_offset])
                video(root / "Videos" / "Segmented" / "Combined" / f"{vid}_{i}.mp4", frames=2)
            (tdir / f"{vid}.txt").write_text("".join(lines))
            g = data.create_group(vid)
            g["features"] = np.array(values, dtype=np.float32)[:, None]
            g["intervals"] = np.array(iv, dtype=np.float64)
    return root


# ---- released feature files: MMIN (h5 + npy targets) and MMSA (pickles) ---------------------------

MMIN_LABELS = ["ang", "hap", "neu", "sad"]


def _mmin_feature(rng, label: int, frames: int, dim: int) -> np.ndarray:
    """Class-dependent features (a label-specific offset on a few dims) so a model can learn them."""
    x = rng.normal(0.0, 1.0, (frames, dim)).astype(np.float32)
    x[:, label::4][:, :8] += 2.0
    return x


def make_mmin(base: Path, corpus: str = "iemocap", per_speaker: int = 4, seed: int = 0,
              no_face: tuple[str, ...] = (), no_text: tuple[str, ...] = (),
              dims=(130, 342, 1024)) -> tuple[Path, dict[str, int]]:
    """An MMIN feature root as released (AIM3-RUC/MMIN): ``A/comparE.h5`` (IEMOCAP) or
    ``A/comparE_raw.h5`` (MSP-IMPROV), ``V/denseface.h5``, ``L/bert_large.h5`` (one dataset per
    utterance id), ``A/comparE_mean_std.h5`` (IEMOCAP) and ``target/<cv>/{trn,val,tst}_{label,int2name}.npy``
    (IEMOCAP: one-hot labels, (N, 1) bytes ids, 10 folds; MSP-IMPROV: integer labels, str ids, 12 folds).
    ``no_face`` ids get Denseface's single all-zero frame; ``no_text`` ids are left out of the L file.
    Returns (root, {id: class index})."""
    import h5py

    rng = np.random.default_rng(seed)
    root = base / f"{corpus}_features_2021"
    for d in ("A", "V", "L"):
        (root / d).mkdir(parents=True, exist_ok=True)
    iemocap = corpus == "iemocap"
    sessions = range(1, 6) if iemocap else range(1, 7)
    utts: dict[str, tuple[int, str, int]] = {}  # id -> (session, gender, label)
    for s in sessions:
        for g in "FM":
            for i in range(per_speaker):
                if iemocap:
                    uid = f"Ses0{s}F_impro0{i % 3 + 1}_{g}{i:03d}"
                else:
                    uid = f"MSP-IMPROV-S{i + 1:02d}{'AHSN'[i % 4]}-{g}0{s}-S-{g}{'MF'[g == 'M']}{i + 1:02d}"
                utts[uid] = (s, g, (i + (g == "M") + s) % 4)
    a_name = "comparE" if iemocap else "comparE_raw"
    da, dv, dl = dims
    with h5py.File(root / "A" / f"{a_name}.h5", "w") as fa, h5py.File(root / "V" / "denseface.h5", "w") as fv, \
            h5py.File(root / "L" / "bert_large.h5", "w") as fl:
        for uid, (_, _, y) in utts.items():
            fa[uid] = _mmin_feature(rng, y, int(rng.integers(5, 12)), da)
            fv[uid] = np.zeros((1, dv), np.float32) if uid in no_face else _mmin_feature(rng, y, int(rng.integers(2, 6)), dv)
            if uid not in no_text:
                fl[uid] = _mmin_feature(rng, y, int(rng.integers(3, 8)), dl)
    if iemocap:
        with h5py.File(root / "A" / "comparE_mean_std.h5", "w") as f:
            for cv in range(1, 11):
                f[f"{cv}/mean"] = np.zeros(da, np.float32)
                f[f"{cv}/std"] = np.ones(da, np.float32)
    n_cv = 2 * len(sessions)
    for cv in range(1, n_cv + 1):
        k = (cv + 1) // 2
        val_g, test_g = ("M", "F") if cv % 2 else ("F", "M")
        parts = {"trn": [u for u, (s, _, _) in utts.items() if s != k],
                 "val": [u for u, (s, g, _) in utts.items() if s == k and g == val_g],
                 "tst": [u for u, (s, g, _) in utts.items() if s == k and g == test_g]}
        d = root / "target" / str(cv)
        d.mkdir(parents=True, exist_ok=True)
        for split, ids in parts.items():
            ys = np.array([utts[u][2] for u in ids])
            if iemocap:
                np.save(d / f"{split}_label.npy", np.eye(4, dtype=np.float32)[ys])
                np.save(d / f"{split}_int2name.npy", np.array([[u.encode()] for u in ids]))
            else:
                np.save(d / f"{split}_label.npy", ys.astype(np.int64))
                np.save(d / f"{split}_int2name.npy", np.array(ids))
    return root, {u: y for u, (_, _, y) in utts.items()}


def make_mmsa(path: Path, corpus: str = "mosi", aligned: bool = True, sizes=(6, 3, 4), seed: int = 0,
              protocol: int = 4) -> dict:
    """An MMSA processed pickle (``aligned_50.pkl`` / ``unaligned_50.pkl``): train/valid/test, each with
    ``raw_text``, ``audio``, ``vision``, ``id`` (``<video>$_$<segment>``), ``text`` (N, 50, 768),
    ``text_bert`` (N, 3, 50), ``annotations``, ``classification_labels``, ``regression_labels`` and,
    unaligned only, ``audio_lengths``/``vision_lengths``. Audio holds some -inf (COVAREP). Returns
    the dict it pickled."""
    import pickle

    rng = np.random.default_rng(seed)
    da, dv = (5, 20) if corpus == "mosi" else (74, 35)
    ta, tv = (50, 50) if aligned else ((375, 500) if corpus == "mosi" else (500, 500))
    data = {}
    for j, split in enumerate(("train", "valid", "test")):
        n = sizes[j]
        words = rng.integers(3, 12, n)
        reg = np.round(rng.uniform(-3, 3, n), 4).astype(np.float32)
        bert = np.zeros((n, 3, 50), np.float32)
        for i, w in enumerate(words):
            bert[i, 0, : w + 2] = rng.integers(1000, 3000, w + 2)
            bert[i, 1, : w + 2] = 1
        audio = rng.normal(size=(n, ta, da)).astype(np.float32)
        audio[0, 1, 0] = -np.inf
        d = {"raw_text": np.array([f"words of {split} {i}" for i in range(n)], dtype=object),
             "audio": audio, "vision": rng.normal(size=(n, tv, dv)).astype(np.float32),
             "id": [f"vid{split}{i // 2}$_${i % 2 + 1}" for i in range(n)],
             "text": rng.normal(size=(n, 50, 768)).astype(np.float32), "text_bert": bert,
             "annotations": ["Positive" if r > 0 else "Negative" if r < 0 else "Neutral" for r in reg],
             "classification_labels": np.sign(reg).astype(np.float32) + 1, "regression_labels": reg}
        if not aligned:
            d["audio_lengths"] = rng.integers(10, ta, n).tolist()
            d["vision_lengths"] = rng.integers(10, tv, n).tolist()
        data[split] = d
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return data
