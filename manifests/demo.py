"""The demo corpus: a small, deterministic corpus of real media files (16 kHz WAV speech from
espeak-ng, 25 fps MP4 face video from a real photo, transcripts) with 4 emotions and several
speakers, that flows through exactly the same code as a licensed corpus.

Layout written by :func:`generate`::

    DIR/corpus.json            what was generated (seed, size, counts); written last
    DIR/manifest.jsonl         imer manifest, media paths relative to DIR
    DIR/folds-speaker.json     one fold per speaker (test = that speaker)
    DIR/wav/<id>.wav           16 kHz mono PCM-16
    DIR/video/<id>.mp4         160x160, 25 fps, mp4v

Each modality carries the emotion with its own strength, drawn independently per utterance
(prosody intensity, facial-expression intensity, and whether the sentence is emotional, neutral
or ambiguous), so no single modality is perfect and fusing them helps, as in real corpora.
Ground truth the generator knows goes into each record's ``extra`` keys (see ``_record``); each
record's ``value`` is a continuous sentiment in [-3, 3] for regression (see ``sentiment``).
Utterances are grouped into two-speaker conversations (``conversations``): manifest keys only,
the media and the speaker folds are what they were before conversations existed.

Recipe: ``DATASET = "demo"``, protocol ``speaker``, labels ``LABELS`` in label_index order.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from manifests.schema import (Fold, ManifestError, Media, Utterance, check_speaker_disjoint,
                              read_manifest, write_folds, write_manifest)

DATASET = "demo"
PROTOCOLS = ["speaker"]
LABELS = ["neu", "hap", "ang", "sad"]  # label_index order
GENERATOR_VERSION = 2  # bump when the output changes; cached corpora of another version are regenerated


class DemoError(ManifestError):
    pass


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str     # espeak-ng voice+variant
    gender: str
    pitch: int     # personal espeak base pitch / range / rate
    range: int
    rate: int
    # appearance (see _demo_face.Appearance)
    flip: bool
    gains: tuple[float, float, float]
    gamma: float
    zoom: float
    offset: tuple[float, float]


SPEAKERS = [
    Speaker("S01F", "en-us+f2", "F", 55, 55, 170, False, (1.00, 1.00, 1.00), 1.00, 1.00, (0, 0)),
    Speaker("S02M", "en-us+m3", "M", 45, 45, 180, True, (1.08, 0.97, 0.92), 0.90, 1.06, (3, -2)),
    Speaker("S03F", "en-gb-x-rp+f4", "F", 52, 60, 165, False, (0.93, 1.00, 1.08), 1.10, 0.95, (-3, 2)),
    Speaker("S04M", "en-gb-scotland+m1", "M", 42, 50, 185, True, (1.05, 1.05, 0.95), 1.05, 1.03, (2, 3)),
    Speaker("S05F", "en-029+f3", "F", 58, 50, 175, False, (0.95, 0.92, 0.95), 0.92, 0.97, (-2, -3)),
    Speaker("S06M", "en-us-nyc+m6", "M", 48, 42, 190, True, (1.10, 1.00, 1.00), 1.08, 1.08, (0, 2)),
    Speaker("S07F", "en+f1", "F", 50, 58, 160, False, (1.00, 0.95, 1.10), 0.95, 0.93, (3, 0)),
    Speaker("S08M", "en-gb-x-gbclan+m2", "M", 40, 48, 178, True, (0.92, 1.02, 1.00), 1.02, 1.00, (-3, -1)),
]


@dataclass(frozen=True)
class Size:
    speakers: int
    per_class: int        # utterances per class per speaker
    short: bool           # ~1 s sentences (tiny) instead of 1.5-3 s
    p_occluded: float = 0.3   # share of videos with a stretch of frames where the face is hidden

    @property
    def n_utterances(self) -> int:
        return self.speakers * self.per_class * len(LABELS)


SIZES = {
    "tiny": Size(speakers=4, per_class=2, short=True),       # 32 utterances, ~1 s (tests)
    "small": Size(speakers=6, per_class=8, short=False),     # 192 utterances (make demo)
    "medium": Size(speakers=8, per_class=25, short=False),   # 800 utterances
}

# ---- how each emotion shows ----------------------------------------------------------------------
# The strengths below were tuned so that simple per-modality classifiers score
# text > audio > video > chance and their fusion beats text (see _demo_separability, README).
# espeak-ng prosody offsets at full intensity (pitch, pitch range, words/min, amplitude):
# happy = higher, wider, faster, louder; angry = much faster and louder; sad = lower, flat, slow, soft.
EMO_PROSODY = {
    "neu": dict(pitch=0, range=0, rate=0, volume=0),
    "hap": dict(pitch=22, range=45, rate=36, volume=36),
    "ang": dict(pitch=11, range=27, rate=63, volume=90),
    "sad": dict(pitch=-22, range=-45, rate=-90, volume=-63),
}
PROSODY_JITTER = dict(pitch=2.5, range=5.0, rate=6.0, volume=6.0)  # per-utterance idiosyncrasy (std)
EXPRESSION_GAIN = 0.5       # share of the full prototype expression (_demo_face.PROTOTYPES) faces show
EXPRESSION_JITTER = 1.2     # std (pixels) of idiosyncratic expression added to every parameter
EYE_JITTER = 0.08           # std of the relative lid-opening idiosyncrasy
INTENSITY = dict(audio=(0.3, 1.0), video=(0.2, 1.0))  # uniform ranges of per-utterance intensity
TEXT_MIX = dict(p_ambiguous=0.16, p_neutral=0.04)      # sentences that do not show the emotion
HEAD_AROUSAL = {"neu": 1.0, "hap": 1.04, "ang": 1.12, "sad": 0.92}  # head-motion amplitude factor
SAD_HEAD_DROP = 0.5         # pixels the head hangs lower when sad
CONVERSATION_TURNS = 8      # turns each speaker takes in a demo conversation (16-turn dialogues)
# Continuous sentiment in [-3, 3] (the MOSI/MOSEI scale), for the regression path: the emotion's
# valence times how strongly voice and face show it (the drawn intensities, which the media carry).
VALENCE = {"neu": 0.0, "hap": 1.0, "ang": -1.0, "sad": -1.0}


def _size(size) -> Size:
    if isinstance(size, Size):
        return size
    if size not in SIZES:
        raise DemoError(f"unknown demo corpus size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


# ---- planning: every random choice, made up front from the seed ----------------------------------

@dataclass
class Plan:
    id: str
    speaker: Speaker
    label: str
    text: str
    text_kind: str
    prosody: dict
    audio_intensity: float
    video_intensity: float
    expression: dict
    lead: float            # seconds of silence before / after the speech
    tail: float
    gain_db: float
    snr_db: float
    occluded: bool
    seed: int              # for the per-utterance noise streams


def plan_corpus(seed: int, size) -> list[Plan]:
    from manifests import _demo_face as face
    from manifests._demo_text import choose_text

    sz = _size(size)
    if not 1 <= sz.speakers <= len(SPEAKERS):
        raise DemoError(f"demo corpus: {sz.speakers} speakers asked for, 1..{len(SPEAKERS)} available")
    plans: list[Plan] = []
    for si, spk in enumerate(SPEAKERS[:sz.speakers]):
        srng = np.random.default_rng([seed, si])
        labels = list(np.repeat(LABELS, sz.per_class))
        srng.shuffle(labels)
        n = len(labels)
        n_occ = int(round(sz.p_occluded * n))
        occluded = set(srng.permutation(n)[:n_occ].tolist())
        for j, label in enumerate(labels):
            rng = np.random.default_rng([seed, si, j])
            text, kind = choose_text(rng, label, sz.short, **TEXT_MIX)
            a = rng.uniform(*INTENSITY["audio"])
            base = dict(pitch=spk.pitch, range=spk.range, rate=spk.rate, volume=100)
            prosody = {k: int(round(base[k] + a * EMO_PROSODY[label][k] + rng.normal(0, PROSODY_JITTER[k])))
                       for k in base}
            if sz.short:  # short sentences are spoken briskly so utterances stay near 1 s
                prosody["rate"] += 25
            v = rng.uniform(*INTENSITY["video"])
            expr = {}
            for k in face.PARAMS:
                jit = EYE_JITTER if k == "eye_open" else EXPRESSION_JITTER
                expr[k] = round(float(v * EXPRESSION_GAIN * face.PROTOTYPES[label][k] + rng.normal(0, jit)), 4)
            plans.append(Plan(
                id=f"{spk.id}_{j + 1:03d}", speaker=spk, label=label, text=text, text_kind=kind,
                prosody=prosody, audio_intensity=round(float(a), 4), video_intensity=round(float(v), 4),
                expression=expr, lead=float(rng.uniform(0.1, 0.3)), tail=float(rng.uniform(0.1, 0.3)),
                gain_db=float(rng.uniform(-4, 4)), snr_db=float(rng.uniform(22, 35)),
                occluded=j in occluded, seed=int(rng.integers(2**31))))
    return plans


# ---- rendering -----------------------------------------------------------------------------------

def _finish_audio(speech: np.ndarray, p: Plan, sr: int) -> np.ndarray:
    """Pad with silence, apply a microphone gain and add background noise at the planned SNR."""
    rng = np.random.default_rng([p.seed, 1])
    x = np.concatenate([np.zeros(int(p.lead * sr), np.float32), speech, np.zeros(int(p.tail * sr), np.float32)])
    x = x * np.float32(10 ** (p.gain_db / 20))
    power = float(np.mean(speech.astype(np.float64) ** 2)) * 10 ** (p.gain_db / 10)
    noise = rng.normal(0, 1, x.shape)
    noise = np.convolve(noise, np.ones(4) / 2, mode="same")  # a little low-pass: room/mic noise, not pure white
    noise *= np.sqrt(power / 10 ** (p.snr_db / 10) / max(float(np.mean(noise ** 2)), 1e-12))
    return np.clip(x + noise.astype(np.float32), -1, 1).astype(np.float32)


def _jaw(audio: np.ndarray, sr: int, n_frames: int, fps: int) -> np.ndarray:
    """Jaw opening per video frame from the speech envelope (lip-sync)."""
    hop = sr // fps
    rms = np.array([np.sqrt(np.mean(audio[i * hop:(i + 1) * hop] ** 2)) if i * hop < len(audio) else 0.0
                    for i in range(n_frames)])
    env = rms / max(rms.max(), 1e-9)
    env = np.where(env > 0.15, env, 0.0)  # silence: mouth at rest
    return 5.0 * np.convolve(env, [0.25, 0.5, 0.25], mode="same")


def _head(rng: np.random.Generator, n: int, label: str, fps: int) -> np.ndarray:
    """Smooth head motion: a few random slow sinusoids per axis (tx, ty px; roll deg; log zoom)."""
    t = np.arange(n) / fps
    amp = np.array([3.0, 2.0, 3.0, 0.02]) * HEAD_AROUSAL[label]
    out = np.zeros((n, 4))
    for k in range(4):
        for _ in range(3):
            f = rng.uniform(0.2, 1.5)
            out[:, k] += amp[k] / 2 * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    if label == "sad":
        out[:, 1] += SAD_HEAD_DROP
    return out


def _occlusion(rng: np.random.Generator, n: int, fps: int) -> list[tuple[int, int]]:
    length = int(rng.integers(int(0.24 * fps), int(0.6 * fps) + 1))
    length = min(length, max(1, n - 4))
    start = int(rng.integers(2, max(3, n - length - 1)))
    return [(start, min(n, start + length))]


def _render(p: Plan, speech: np.ndarray, out: Path) -> Utterance:
    import soundfile as sf

    from manifests import _demo_face as face
    from manifests._demo_tts import SR

    audio = _finish_audio(speech, p, SR)
    wav = Path("wav") / f"{p.id}.wav"
    sf.write(out / wav, audio, SR, subtype="PCM_16")

    rng = np.random.default_rng([p.seed, 2])
    n = max(1, int(round(len(audio) / SR * face.FPS)))
    occluded = _occlusion(rng, n, face.FPS) if p.occluded else []
    spk = p.speaker
    track = face.FaceTrack(
        n_frames=n, expression=p.expression, onset_frames=int(rng.integers(3, 9)),
        jaw=_jaw(audio, SR, n, face.FPS), head=_head(rng, n, p.label, face.FPS), occluded=occluded,
        occluder_rgb=tuple(int(c) for c in rng.integers(90, 220, 3)), noise=3.0, seed=p.seed)
    look = face.Appearance(spk.flip, spk.gains, spk.gamma, spk.zoom, spk.offset)
    mp4 = Path("video") / f"{p.id}.mp4"
    written = face.write_mp4(out / mp4, face.render_frames(track, look))
    if written != n:
        raise DemoError(f"{out / mp4}: wrote {written} of {n} frames")
    return Utterance(
        id=p.id, dataset=DATASET, speaker=spk.id, label=p.label, label_index=LABELS.index(p.label),
        value=sentiment(p.label, p.audio_intensity, p.video_intensity), audio=Media(str(wav)), video=Media(str(mp4)), text=p.text,
        extra=_record(p, spk, len(audio) / SR, n, occluded))


def sentiment(label: str, audio_intensity: float, video_intensity: float) -> float:
    """The demo's regression target: 3 x valence(label) x the mean of the audio and video
    intensities, rounded to 0.01; neutral is 0, the others lie in +-[0.75, 3]."""
    v = 3.0 * VALENCE[label] * (float(audio_intensity) + float(video_intensity)) / 2.0
    return round(min(3.0, max(-3.0, v)), 2) + 0.0  # + 0.0: no -0.0 in the manifest


def _record(p: Plan, spk: Speaker, duration: float, n_frames: int, occluded) -> dict:
    """Ground truth kept in each manifest record's ``extra``: the speaker-fold it is tested in, the
    video's frame count and occluded [start, end) frame ranges (no face visible), and how strongly
    each modality shows the emotion."""
    from manifests import _demo_face

    return {
        "fold": SPEAKERS.index(spk) + 1, "gender": spk.gender, "duration": round(duration, 4),
        "fps": _demo_face.FPS, "n_frames": n_frames, "occluded": [list(r) for r in occluded],
        "text_kind": p.text_kind, "voice": spk.voice, "prosody": p.prosody,
        "audio_intensity": p.audio_intensity, "video_intensity": p.video_intensity,
        "expression": p.expression,
    }


def conversations(utts: list[Utterance], turns_per_speaker: int = CONVERSATION_TURNS) -> None:
    """Group the utterances into conversations of two speakers, in place (``conversation``,
    ``turn``): speakers are paired in fold order (S01F with S02M, S03F with S04M, ...; an odd
    one out talks alone); each speaker's utterances, in id order, are cut into runs of
    ``turns_per_speaker`` and the k-th runs of a pair alternate turn by turn in conversation k.
    A pair is a speaker-fold's test and validation speakers (fold 1, 3, ...: as MMIN's IEMOCAP
    folds split a session) or its test speaker and a training one (fold 2, 4, ...); a method
    that reads conversations only ever sees the part of one inside the split at hand
    (``train.conversations``)."""
    by_spk: dict[str, list[Utterance]] = {}
    for u in sorted(utts, key=lambda u: u.id):
        by_spk.setdefault(u.speaker, []).append(u)
    speakers = sorted(by_spk)
    for p in range(0, len(speakers), 2):
        pair = speakers[p:p + 2]
        runs = [[by_spk[s][i:i + turns_per_speaker] for i in range(0, len(by_spk[s]), turns_per_speaker)] for s in pair]
        for k in range(max(len(r) for r in runs)):
            parts = [r[k] if k < len(r) else [] for r in runs]
            order = [x for i in range(max(map(len, parts))) for x in (part[i] for part in parts if i < len(part))]
            for t, u in enumerate(order):
                u.conversation, u.turn = f"{'-'.join(pair)}_{k + 1:02d}", t


def speaker_folds(utts: list[Utterance]) -> list[Fold]:
    """Fold k: test = speaker k, validation = the next speaker, train = the rest."""
    speakers = sorted({u.speaker for u in utts})
    if len(speakers) < 3:
        raise DemoError(f"demo corpus: speaker folds need at least 3 speakers, have {len(speakers)}")
    folds = []
    for k, s in enumerate(speakers):
        v = speakers[(k + 1) % len(speakers)]
        folds.append(Fold(name=str(k + 1),
                          train=[u.id for u in utts if u.speaker not in (s, v)],
                          val=[u.id for u in utts if u.speaker == v],
                          test=[u.id for u in utts if u.speaker == s]))
    check_speaker_disjoint(folds, {u.id: u.speaker for u in utts}, where="demo speaker folds")
    return folds


# ---- the corpus directory: cached, atomic ---------------------------------------------------------

def _stamp(seed: int, size) -> dict:
    sz = _size(size)
    name = size if isinstance(size, str) else "custom"
    return {"generator": "imer-demo", "version": GENERATOR_VERSION, "seed": int(seed), "size": name,
            "spec": asdict(sz)}


def _read_stamp(d: Path) -> dict | None:
    try:
        return json.loads((d / "corpus.json").read_text())
    except (OSError, ValueError):
        return None


def generate(out: Path | str, seed: int = 0, size="small", *, progress: bool = True) -> Path:
    """Write the demo corpus under ``out`` (cached: a complete corpus of the same seed/size is reused)
    and return its manifest path. Built in a temp dir next to ``out`` and renamed when complete, so
    a killed run never leaves a half corpus. ``size`` is "tiny" | "small" | "medium" (or a Size)."""
    from filelock import FileLock

    out = Path(out).expanduser().absolute()
    want = _stamp(seed, size)
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: is a file, not a directory; choose a new or empty --out directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        have = _read_stamp(out)
        if have is not None and {k: have.get(k) for k in want} == want and (out / "manifest.jsonl").is_file():
            return out / "manifest.jsonl"
        old = None
        if out.exists() and any(out.iterdir()):
            ours = have is not None and have.get("generator") == "imer-demo"
            if not ours:
                raise DemoError(f"{out}: directory is not empty and is not a demo corpus; "
                                "choose a new or empty --out directory")
            if (have.get("seed"), have.get("size"), have.get("spec")) != (want["seed"], want["size"], want["spec"]):
                raise DemoError(f"{out}: holds a demo corpus with seed {have.get('seed')} size "
                                f"{have.get('size')}; choose another --out or delete it")
            old = out  # same corpus from an older generator version: replace it
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            _write_corpus(tmp, seed, size, want, progress)
            if old is not None:
                trash = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
                os.replace(out, trash)
                shutil.rmtree(trash, ignore_errors=True)
            elif out.exists():
                out.rmdir()  # empty
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out / "manifest.jsonl"


def _write_corpus(d: Path, seed: int, size, stamp: dict, progress: bool) -> None:
    from tqdm import tqdm

    from manifests._demo_tts import Prosody, synthesize_batch

    (d / "wav").mkdir(parents=True)
    (d / "video").mkdir()
    plans = plan_corpus(seed, size)
    speech = synthesize_batch([(p.text, p.speaker.voice, Prosody(**p.prosody), p.seed) for p in plans])
    utts = [_render(p, s, d) for p, s in zip(tqdm(plans, desc="demo corpus", unit="utt", disable=not progress,
                                                  leave=False), speech)]
    conversations(utts)
    write_manifest(d / "manifest.jsonl", utts, DATASET, labels=LABELS, root=None)
    write_folds(d / "folds-speaker.json", speaker_folds(utts), "speaker")
    from manifests import _demo_face, _demo_tts

    counts = {"n_utterances": len(utts),
              "labels": dict(sorted(Counter(u.label for u in utts).items())),
              "speakers": dict(sorted(Counter(u.speaker for u in utts).items())),
              "occluded_videos": sum(bool(u.extra["occluded"]) for u in utts),
              "seconds": round(sum(u.extra["duration"] for u in utts), 2),
              "sample_rate": _demo_tts.SR, "fps": _demo_face.FPS, "frame_size": _demo_face.SIZE}
    (d / "corpus.json").write_text(json.dumps({**stamp, **counts}, indent=1))  # last: marks it complete


def corpus_info(d: Path | str) -> dict:
    info = _read_stamp(Path(d))
    if info is None or info.get("generator") != "imer-demo":
        raise DemoError(f"{d}: not a generated demo corpus (no corpus.json); create one with "
                        "`imer demo-corpus --out DIR`")
    return info


# ---- recipe --------------------------------------------------------------------------------------

def default_corpus_dir(seed: int = 0, size: str = "small") -> Path:
    from pipeline.cache import cache_root

    return cache_root() / "corpora" / f"demo-{size}-s{seed}"


def build(data_root: Path | None, out_dir: Path) -> Path:
    """data_root = a generated corpus dir, or None for the cached small seed-0 corpus (generated on
    first use). Writes out_dir/manifest.jsonl (root = the corpus dir) and out_dir/folds-speaker.json."""
    if data_root is None:
        corpus = default_corpus_dir()
        generate(corpus, seed=0, size="small")
    else:
        corpus = Path(data_root).expanduser().absolute()
        corpus_info(corpus)
    src = read_manifest(corpus / "manifest.jsonl")
    utts = []
    for u in src:
        for m in (u.audio, u.video):
            rel = Path(m.path).relative_to(corpus)
            if not (corpus / rel).is_file():
                raise DemoError(f"{corpus / rel}: media file of utterance {u.id} is missing; "
                                "regenerate the corpus (delete the directory and rerun)")
            m.path = str(rel)
        u.label_index = LABELS.index(u.label)
        # from the record's ground truth, so corpora generated before the value existed get it too
        u.value = sentiment(u.label, u.extra["audio_intensity"], u.extra["video_intensity"])
        u.dataset = DATASET
        utts.append(u)
    conversations(utts)  # from the ids, so corpora generated before conversations existed get them too
    out_dir = Path(out_dir)
    path = write_manifest(out_dir / "manifest.jsonl", utts, DATASET, labels=LABELS, root=corpus)
    write_folds(out_dir / "folds-speaker.json", speaker_folds(utts), "speaker")
    return path
