"""IEMOCAP (``IEMOCAP_full_release``), 4 classes: neu, hap+exc -> hap, ang, sad (5531 utterances).

Sources, per ``Session{n}`` (n = 1..5):
- labels and times: ``dialog/EmoEvaluation/<dialog>.txt`` (top level only; subfolders hold
  per-annotator files and names starting with ``.`` are skipped);
- text: ``dialog/transcriptions/<dialog>.txt``;
- audio: ``sentences/wav/<dialog>/<utt>.wav`` (one file per utterance);
- video: ``dialog/avi/DivX/<dialog>.avi`` cut to the utterance's time span. Both actors sit side by
  side; the actor wearing markers (utt id char 5) is on the left, so the speaker is on the left iff
  ``utt[-4] == utt[5]``.

Speaker = ``Ses0N`` + gender of the turn (``utt[-4]``), e.g. ``Ses01F``: 10 speakers.
Class order (label_index) is MMIN's: ang, hap, neu, sad = 0..3, so imported MMIN features agree.

Protocols:
- ``mmin10``: 10 folds named "1".."10" like MMIN's cv numbers. Fold 2s-1 and 2s hold out session s;
  odd folds validate on its male speaker and test on its female speaker, even folds swap them
  (MMIN's released targets alternate this way; which one comes first is not documented, this order
  mirrors MMIN's MSP-IMPROV folds). Train on the other four sessions.
- ``loso5``: 5 folds (CM-ARR), test = session s. CM-ARR does not say how it validated; choosing on
  the test session would leak, so validation is a seeded, label-stratified 10% of the training
  sessions (documented choice).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from manifests._common import compare_counts, find_root, finish_folds, split_off, stop_on_mismatch
from manifests.schema import Fold, ManifestError, Media, Utterance, number_turns, write_manifest

DATASET = "iemocap"
PROTOCOLS = ["mmin10", "loso5"]
LABELS = ["ang", "hap", "neu", "sad"]
MAP4 = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
SESSIONS = range(1, 6)

# Label totals of the full release (all 10,039 turns) and of the 4-class subset.
DOCUMENTED_ALL = {"xxx": 2507, "fru": 1849, "neu": 1708, "ang": 1103, "sad": 1084, "exc": 1041,
                  "hap": 595, "sur": 107, "fea": 40, "oth": 3, "dis": 2}
DOCUMENTED_4 = {"hap": 1636, "ang": 1103, "sad": 1084, "neu": 1708}

UTT_ID = r"Ses0[1-5][FM]_[A-Za-z0-9_]+_[FM]\d{3}"
_NUM = r"(\d+(?:\.\d+)?)"
_SUMMARY = re.compile(rf"^\[{_NUM} - {_NUM}\]\t({UTT_ID})\t([a-z]{{3}})\t\[{_NUM}, {_NUM}, {_NUM}\]$")
_ANNOTATOR = re.compile(r"^[A-Z]-[A-Za-z]+\d*:\s")
_TRANSCRIPT = re.compile(rf"^({UTT_ID}) \[{_NUM}-{_NUM}\]:(.*)$")

EXPECTED = ("IEMOCAP_full_release/ with Session1..Session5, each holding dialog/EmoEvaluation/<dialog>.txt, "
            "dialog/transcriptions/<dialog>.txt, dialog/avi/DivX/<dialog>.avi and sentences/wav/<dialog>/<utt>.wav")


def dialog_of(utt: str) -> str:
    return utt.rsplit("_", 1)[0]


def speaker_of(utt: str) -> str:
    return utt[:5] + utt[-4]


def side_of(utt: str) -> str:
    return "left" if utt[-4] == utt[5] else "right"


def parse_emo_evaluation(path: Path) -> list[dict]:
    """Summary lines of one EmoEvaluation file: {id, start, end, emotion, vad}. Annotator lines are
    checked for shape and skipped; anything else is an error naming the file and line."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, raw in enumerate(f, 1):
            line = raw.rstrip()  # CRLF copies and trailing blanks parse the same
            if not line.strip() or line.startswith("%"):
                continue
            m = _SUMMARY.match(line)
            if m:
                s, e, utt, emo, v, a, d = m.groups()
                if dialog_of(utt) != path.stem:
                    raise ManifestError(f"{path}:{no}: utterance {utt} does not belong to dialogue {path.stem}")
                out.append({"id": utt, "start": float(s), "end": float(e), "emotion": emo,
                            "vad": [float(v), float(a), float(d)]})
            elif _ANNOTATOR.match(line):
                continue
            else:
                raise ManifestError(f"{path}:{no}: unrecognised line {line[:80]!r}; expected a summary line "
                                    "'[START - END]<TAB>UTT_ID<TAB>emo<TAB>[V, A, D]' or an annotator line "
                                    "'C-E1:<TAB>...'. Fix or replace this file from the original release.")
    return out


def parse_transcription(path: Path) -> dict[str, str]:
    """Utterance id -> text. Lines that are not utterances (``M:``/``F:`` notes, ids such as
    ``..._MXX0``) are skipped; a line starting with a real utterance id must be well-formed."""
    out: dict[str, str] = {}
    id_start = re.compile(rf"^{UTT_ID}\b")
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, raw in enumerate(f, 1):
            line = raw.rstrip()
            m = _TRANSCRIPT.match(line)
            if m:
                out[m.group(1)] = m.group(4).strip()
            elif id_start.match(line):
                raise ManifestError(f"{path}:{no}: malformed transcription line {line[:80]!r}; "
                                    "expected 'UTT_ID [START-END]: text'")
    return out


def _session_dirs(root: Path) -> list[Path]:
    found = [root / f"Session{n}" for n in SESSIONS if (root / f"Session{n}").is_dir()]
    return found


def build(data_root: Path | None, out_dir: Path, accept_counts: bool = False, seed: int = 0, **_) -> Path:
    root = find_root(DATASET, data_root, "Session[1-5]/dialog/EmoEvaluation", EXPECTED,
                     names=["IEMOCAP_full_release"])
    sessions = _session_dirs(root)
    all_labels: Counter = Counter()
    utts: list[Utterance] = []
    missing: Counter = Counter()
    starts: dict[str, float] = {}
    for sdir in tqdm(sessions, desc="iemocap sessions", unit="session"):
        emo_dir = sdir / "dialog" / "EmoEvaluation"
        if not emo_dir.is_dir():
            raise ManifestError(f"iemocap: {emo_dir} not found; expected {EXPECTED}. Found in {sdir}: "
                                f"{', '.join(sorted(p.name for p in sdir.iterdir()))}")
        files = sorted(p for p in emo_dir.glob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ManifestError(f"iemocap: no <dialog>.txt label files in {emo_dir}")
        for ev in files:
            dialog = ev.stem
            tr_path = sdir / "dialog" / "transcriptions" / f"{dialog}.txt"
            texts = parse_transcription(tr_path) if tr_path.is_file() else {}
            avi = sdir / "dialog" / "avi" / "DivX" / f"{dialog}.avi"
            for rec in parse_emo_evaluation(ev):
                utt = rec["id"]
                starts[utt] = rec["start"]
                all_labels[rec["emotion"]] += 1
                lab = MAP4.get(rec["emotion"])
                if lab is None:  # xxx, fru, sur, fea, oth, dis: not in the 4-class protocol
                    continue
                wav = sdir / "sentences" / "wav" / dialog / f"{utt}.wav"
                if not wav.is_file():
                    missing["audio"] += 1
                if not avi.is_file():
                    missing["video"] += 1
                if utt not in texts:
                    missing["text"] += 1
                utts.append(Utterance(
                    id=utt, dataset=DATASET, speaker=speaker_of(utt), session=str(int(utt[3:5])),
                    label=lab, label_index=LABELS.index(lab),
                    audio=Media(str(wav.relative_to(root))) if wav.is_file() else None,
                    video=Media(str(avi.relative_to(root)), rec["start"], rec["end"], side_of(utt)) if avi.is_file() else None,
                    text=texts.get(utt),
                    extra={"emotion": rec["emotion"], "vad": rec["vad"]},
                    conversation=dialog))
    if not utts:
        raise ManifestError(f"iemocap: no 4-class utterances found under {root}")
    # the dialogue is the conversation; its (4-class) turns numbered in order of their start time
    number_turns(utts, lambda u: starts[u.id])
    for m, n in missing.items():
        print(f"iemocap: {n} utterances have no {m} file (kept without that modality)")

    if len(sessions) == len(SESSIONS):  # looks complete: hold it to the documented numbers
        found4 = Counter(u.label for u in utts)
        report = compare_counts("label totals (all turns)", DOCUMENTED_ALL, dict(all_labels))
        report += compare_counts("4-class subset", DOCUMENTED_4, dict(found4))
        stop_on_mismatch(DATASET, out_dir, report, accept_counts)

    path = write_manifest(out_dir / "manifest.jsonl", utts, DATASET, LABELS, root)
    write_protocols(out_dir, utts, seed)
    return path


def write_protocols(out_dir: Path, utts: list[Utterance], seed: int = 0) -> None:
    by_session: dict[str, list[Utterance]] = {}
    for u in utts:
        by_session.setdefault(u.session, []).append(u)
    labels = {u.id: u.label for u in utts}
    mmin, loso = [], []
    for s in sorted(by_session, key=int):
        test_all = [u.id for u in by_session[s]]
        train = [u.id for u in utts if u.session != s]
        male = [u.id for u in by_session[s] if u.speaker.endswith("M")]
        female = [u.id for u in by_session[s] if u.speaker.endswith("F")]
        k = int(s)
        mmin.append(Fold(str(2 * k - 1), train, male, female))
        mmin.append(Fold(str(2 * k), train, female, male))
        tr, va = split_off(train, 0.1, seed + k, labels)
        loso.append(Fold(str(k), tr, va, test_all))
    finish_folds(out_dir, "mmin10", mmin, utts, DATASET)
    finish_folds(out_dir, "loso5", loso, utts, DATASET)
