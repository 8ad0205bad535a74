"""MSP-IMPROV, MMIN's subset: "other-improvised" turns, 4 classes, at least 1 s long
(documented: 3819 = hap 999, ang 460, sad 627, neu 1733).

Layout under the data root::

    Audio/session{k}/S01A/S/MSP-IMPROV-S01A-F01-S-FM01.wav     (48 kHz; extractors resample)
    Video/session{k}/S01A/S/MSP-IMPROV-S01A-F01-S-FM01.avi
    All_human_transcriptions/MSP-IMPROV-S01A-F01-S-FM01.txt
    Evaluation.txt   (some copies: Evalution.txt)

Name fields ``MSP-IMPROV-S01A-F01-S-FM01``: sentence 01-20 and target emotion (A/H/S/N); actor
``F01`` (gender + session digit, F0k and M0k form session k); scenario R target-read,
T target-improvised, S other-improvised, P natural interaction; the last field (``FM01``/``MF01``)
is kept as ``extra.turn``: its exact meaning is undocumented. Speaker = the actor field, as in
public MSP-IMPROV preprocessing code and MMIN's folds (val M0k / test F0k), which need 12 speakers.

Label lines: ``UTD-IMPROV-<name>.avi; A; A:3.0; V:2.5; D:3.0 ; N:4.0;`` (consensus letter
A/H/S/N/O/X; numbers may be NaN), each followed by rater lines up to a blank line.

MMIN's subset also kept only utterances with a detected face; that filter belongs to feature
extraction, not to the manifest, so the manifest's counts can be higher than 3819. When the corpus
looks complete (all six sessions) and the counts differ from the documented ones, the build stops
with a report (count-report.txt) unless ``accept_counts`` is set.

Protocols: ``mmin12`` (fold cv = 1..12, session k = (cv+1)//2; odd cv: val M0k, test F0k; even:
swapped; train on the other 5 sessions) and ``loso6`` (test = session k; validation = seeded,
label-stratified 10% of the training sessions, since CM-ARR does not document its own).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from manifests._common import (compare_counts, layout_error, need_root, finish_folds, split_off,
                               stop_on_mismatch)
from manifests.schema import Fold, ManifestError, Media, Utterance, number_turns, write_manifest

DATASET = "msp-improv"
ALIASES = ["msp_improv", "mspimprov"]
PROTOCOLS = ["mmin12", "loso6"]
LABELS = ["ang", "hap", "neu", "sad"]  # MMIN's order: A, H, N, S
LETTERS = {"A": "ang", "H": "hap", "N": "neu", "S": "sad"}
SESSIONS = range(1, 7)
MIN_SECONDS = 1.0
SCENARIOS = {"R": "target-read", "T": "target-improvised", "S": "other-improvised", "P": "natural"}

# Corpus paper, Tables 3-4: turns and consensus labels per scenario.
DOCUMENTED_SCENARIOS = {
    "T": {"turns": 652, "ang": 115, "sad": 106, "hap": 136, "neu": 283},
    "R": {"turns": 620, "ang": 169, "sad": 80, "hap": 88, "neu": 241},
    "S": {"turns": 4381, "ang": 470, "sad": 633, "hap": 1048, "neu": 1789},
    "P": {"turns": 2785, "ang": 38, "sad": 66, "hap": 1372, "neu": 1164},
}
DOCUMENTED_SUBSET = {"hap": 999, "ang": 460, "sad": 627, "neu": 1733}

NAME = re.compile(r"^MSP-IMPROV-S(\d\d)([AHSN])-([FM])0([1-6])-([RTSP])-([FM]{2}\d\d)$")
_V = r"(\d+(?:\.\d+)?|NaN)"
_LABEL = re.compile(rf"^UTD-IMPROV-(\S+)\.avi;\s*([A-Z]);\s*A:{_V};\s*V:{_V};\s*D:{_V}\s*;\s*N:{_V};?$")

EXPECTED = ("Audio/session1..6/<S01A>/<S|R|T|P>/MSP-IMPROV-*.wav, Video/session1..6/.../*.avi, "
            "All_human_transcriptions/<utt>.txt and Evaluation.txt (or Evalution.txt) at the top")


def parse_evaluation(path: Path) -> dict[str, dict]:
    """Consensus records keyed by the MSP- file name: {letter, avdn}."""
    out: dict[str, dict] = {}
    seen_summary = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith("UTD-"):
                m = _LABEL.match(line)
                if not m:
                    raise ManifestError(f"{path}:{no}: malformed label line {line[:90]!r}; expected "
                                        "'UTD-IMPROV-<name>.avi; L; A:x; V:x; D:x ; N:x;'")
                name = "MSP-IMPROV-" + m.group(1)
                if not NAME.match(name):
                    raise ManifestError(f"{path}:{no}: utterance name {m.group(1)!r} does not follow "
                                        "S<nn><emo>-<F|M>0<k>-<R|T|S|P>-<turn>")
                letter = m.group(2)
                if letter not in "AHSNOX":
                    raise ManifestError(f"{path}:{no}: unknown consensus label {letter!r}; expected one of A H S N O X")
                avdn = [math.nan if v == "NaN" else float(v) for v in m.group(3, 4, 5, 6)]
                prev = out.get(name)
                if prev is not None and prev["letter"] != letter:
                    raise ManifestError(f"{path}:{no}: {name} labelled again with a different label "
                                        f"({prev['letter']} then {letter})")
                out[name] = {"letter": letter, "avdn": avdn}
                seen_summary = True
            elif not seen_summary or ";" not in line:
                raise ManifestError(f"{path}:{no}: unrecognised line {line[:90]!r}; expected a 'UTD-IMPROV-...' "
                                    "label line or a rater line 'rater; Label; ...;'")
    return out


def _label_file(root: Path) -> Path | None:
    for n in ("Evaluation.txt", "Evalution.txt"):
        if (root / n).is_file():
            return root / n
    return None


def _find_root(data_root: Path | None) -> Path:
    root = need_root(DATASET, data_root, EXPECTED)
    for cand in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (cand / "Audio").is_dir() and _label_file(cand):
            return cand
    raise layout_error(DATASET, root, [EXPECTED])


def _index(d: Path, ext: str) -> dict[str, Path]:
    return {p.stem: p for p in d.rglob(f"*{ext}")} if d.is_dir() else {}


def build(data_root: Path | None, out_dir: Path, accept_counts: bool = False, seed: int = 0, **_) -> Path:
    import soundfile as sf

    root = _find_root(data_root)
    labels = parse_evaluation(_label_file(root))
    wavs = _index(root / "Audio", ".wav")
    avis = _index(root / "Video", ".avi")
    bad = [n for n in wavs if not NAME.match(n)]
    if bad:
        raise ManifestError(f"msp-improv: {wavs[bad[0]]}: file name does not follow MSP-IMPROV-S<nn><emo>-"
                            f"<F|M>0<k>-<R|T|S|P>-<turn> ({len(bad)} such files)")
    if not wavs:
        raise layout_error(DATASET, root, [EXPECTED])
    sessions = {int(NAME.match(n).group(4)) for n in wavs}

    per_scenario: dict[str, Counter] = {k: Counter() for k in SCENARIOS}
    for name, rec in labels.items():
        sc = NAME.match(name).group(5)
        per_scenario[sc]["turns"] += 1
        if rec["letter"] in LETTERS:
            per_scenario[sc][LETTERS[rec["letter"]]] += 1

    utts: list[Utterance] = []
    dropped = Counter()
    for name in tqdm(sorted(labels), desc="msp-improv", unit="utt"):
        rec = labels[name]
        m = NAME.match(name)
        sentence, target, gender, sess, scen, turn = m.groups()
        if scen != "S":
            continue
        lab = LETTERS.get(rec["letter"])
        if lab is None:
            dropped["label O/X"] += 1
            continue
        wav = wavs.get(name)
        if wav is None:
            dropped["no audio file"] += 1
            continue
        try:
            dur = sf.info(str(wav)).duration
        except RuntimeError as e:
            raise ManifestError(f"msp-improv: {wav}: unreadable WAV header ({e}); replace the file") from None
        if dur < MIN_SECONDS:
            dropped[f"shorter than {MIN_SECONDS:g} s"] += 1
            continue
        tpath = root / "All_human_transcriptions" / f"{name}.txt"
        text = tpath.read_text(encoding="utf-8", errors="replace").strip() if tpath.is_file() else None
        avi = avis.get(name)
        utts.append(Utterance(
            id=name, dataset=DATASET, speaker=f"{gender}0{sess}", session=sess,
            label=lab, label_index=LABELS.index(lab),
            audio=Media(str(wav.relative_to(root))),
            video=Media(str(avi.relative_to(root))) if avi else None,
            text=text or None,
            extra={"turn": turn, "sentence": int(sentence), "target": target,
                   "duration": round(dur, 4), "avdn": [None if math.isnan(v) else v for v in rec["avdn"]]},
            # one improvisation: target sentence and emotion, session, scenario; both actors' turns
            conversation=f"S{sentence}{target}-{sess}-{scen}"))
    # turns in the order of the number in the name's last field (FM01, MF02, ...)
    number_turns(utts, lambda u: int("".join(c for c in u.extra["turn"] if c.isdigit()) or 0))
    for why, n in sorted(dropped.items()):
        print(f"msp-improv: dropped {n} other-improvised utterances: {why}")
    if not utts:
        raise ManifestError(f"msp-improv: no other-improvised 4-class utterances of >= {MIN_SECONDS:g} s found under {root}")

    if sessions == set(SESSIONS):
        report: list[str] = []
        for sc, doc in DOCUMENTED_SCENARIOS.items():
            report += compare_counts(f"{SCENARIOS[sc]} ({sc}) in {_label_file(root).name}", doc, dict(per_scenario[sc]))
        report += compare_counts(f"MMIN subset (other-improvised, 4 classes, >= {MIN_SECONDS:g} s)",
                                 DOCUMENTED_SUBSET, dict(Counter(u.label for u in utts)))
        stop_on_mismatch(DATASET, out_dir, report, accept_counts)

    path = write_manifest(out_dir / "manifest.jsonl", utts, DATASET, LABELS, root)
    write_protocols(out_dir, utts, seed)
    return path


def write_protocols(out_dir: Path, utts: list[Utterance], seed: int = 0) -> None:
    labels = {u.id: u.label for u in utts}
    mmin, loso = [], []
    for k in sorted({int(u.session) for u in utts}):
        s = str(k)
        train = [u.id for u in utts if u.session != s]
        f = [u.id for u in utts if u.speaker == f"F0{k}"]
        m = [u.id for u in utts if u.speaker == f"M0{k}"]
        mmin.append(Fold(str(2 * k - 1), train, m, f))
        mmin.append(Fold(str(2 * k), train, f, m))
        tr, va = split_off(train, 0.1, seed + k, labels)
        loso.append(Fold(s, tr, va, f + m))
    finish_folds(out_dir, "mmin12", mmin, utts, DATASET)
    finish_folds(out_dir, "loso6", loso, utts, DATASET)
