"""Demo corpus: determinism, real media, faces MTCNN can find (and cannot where occluded),
speaker-independent folds, and modalities of different strength (text > audio > video > chance,
fusion above the best one), measured from the media with scikit-learn, not with imer's extractors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from manifests import demo
from manifests.schema import read_folds, read_manifest
from pipeline.cli import main as imer


def _frames(path: str) -> list[np.ndarray]:
    """All frames of a video as RGB uint8."""
    cap = cv2.VideoCapture(path)
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(np.ascontiguousarray(f[:, :, ::-1]))
    cap.release()
    return out


def test_same_seed_gives_identical_corpus(tiny_demo, tmp_path, capsys):
    """`imer demo-corpus --out B --seed 0` equals the fixture's corpus A (same seed): byte-identical
    manifest and folds, sample-identical audio."""
    a = Path(tiny_demo).parent
    b = tmp_path / "B"
    assert imer(["demo-corpus", "--out", str(b), "--seed", "0", "--size", "tiny", "--quiet"]) == 0
    assert "32 utterances" in capsys.readouterr().out
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    assert (a / "folds-speaker.json").read_bytes() == (b / "folds-speaker.json").read_bytes()
    for u in read_manifest(a / "manifest.jsonl"):
        xa, ra = sf.read(u.audio.path, dtype="int16")
        xb, rb = sf.read(str(b / "wav" / f"{u.id}.wav"), dtype="int16")
        assert ra == rb == 16000 and np.array_equal(xa, xb), u.id
    # another seed plans another corpus (labels, sentences, prosody)
    p0, p1 = demo.plan_corpus(0, "tiny"), demo.plan_corpus(1, "tiny")
    assert [(p.label, p.text, p.prosody) for p in p0] != [(p.label, p.text, p.prosody) for p in p1]


def test_cached_corpus_is_reused_and_bad_out_is_refused(tiny_demo, tmp_path, capsys):
    a = Path(tiny_demo).parent
    before = (a / "corpus.json").stat().st_mtime_ns
    assert demo.generate(a, seed=0, size="tiny", progress=False) == Path(tiny_demo)
    assert (a / "corpus.json").stat().st_mtime_ns == before  # not regenerated
    with pytest.raises(demo.DemoError, match="seed 0 size tiny"):
        demo.generate(a, seed=1, size="tiny", progress=False)  # never overwrites another corpus
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert imer(["demo-corpus", "--out", str(f), "--size", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "file.txt" in err and "not a directory" in err and len(err.splitlines()) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="not a demo corpus"):
        demo.generate(other, seed=0, size="tiny", progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_manifest_and_speaker_folds(tiny_demo):
    corpus = Path(tiny_demo).parent
    m = read_manifest(tiny_demo)
    info = json.loads((corpus / "corpus.json").read_text())
    assert len(m) == info["n_utterances"] == 32
    assert m.labels == demo.LABELS == ["neu", "hap", "ang", "sad"]
    speakers = sorted({u.speaker for u in m})
    assert len(speakers) >= 4
    for u in m:
        assert u.label in demo.LABELS and u.label_index == demo.LABELS.index(u.label)
        assert u.text and u.audio.path.endswith(".wav") and u.video.path.endswith(".mp4")
        assert u.extra["fold"] == speakers.index(u.speaker) + 1
    # every speaker has every class (per-speaker balance)
    for s in speakers:
        assert sorted(u.label for u in m if u.speaker == s) == sorted(demo.LABELS * 2)
    # text is not a give-away: some emotional utterances have neutral or ambiguous sentences
    assert any(u.label != "neu" and u.extra["text_kind"] != "emotional" for u in m)
    proto, folds = read_folds(corpus / "folds-speaker.json")
    assert proto == "speaker" and len(folds) == len(speakers)
    spk = {u.id: u.speaker for u in m}
    for k, f in enumerate(folds):
        assert {spk[i] for i in f.test} == {speakers[k]}
        assert not {spk[i] for i in f.train} & {spk[i] for i in f.test + f.val}
        assert sorted(f.train + f.val + f.test) == sorted(spk)


def test_recipe_builds_the_demo_dataset_from_a_corpus(tiny_demo):
    from manifests.datasets import build_manifest

    path = build_manifest("demo", Path(tiny_demo).parent)
    m = read_manifest(path)
    assert m.dataset == "demo" and len(m) == 32
    assert all(Path(u.audio.path).is_file() and Path(u.video.path).is_file() for u in m)


def test_sentiment_value_follows_valence_and_intensity(tiny_demo):
    """Every record carries the regression target: 0 for neutral, the valence's sign otherwise,
    its size 3 x the mean drawn intensity; the generator and the recipe agree on it."""
    from manifests.datasets import build_manifest

    gen = {u.id: u.value for u in read_manifest(tiny_demo)}
    m = read_manifest(build_manifest("demo", Path(tiny_demo).parent))
    for u in m:
        want = 3 * demo.VALENCE[u.label] * (u.extra["audio_intensity"] + u.extra["video_intensity"]) / 2
        assert u.value == pytest.approx(want, abs=0.005) and -3 <= u.value <= 3
        assert np.sign(u.value) == demo.VALENCE[u.label] and gen[u.id] == u.value
    assert len({u.value for u in m if u.label != "neu"}) > 20  # continuous, not four levels


def test_every_media_file_opens(tiny_demo):
    for u in read_manifest(tiny_demo):
        info = sf.info(u.audio.path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), u.id
        x, _ = sf.read(u.audio.path, dtype="float32")
        assert abs(len(x) / 16000 - u.extra["duration"]) < 1e-3
        assert np.sqrt(np.mean(x ** 2)) > 0.01 and np.abs(x).max() <= 1.0  # speech, not silence
        cap = cv2.VideoCapture(u.video.path)
        assert cap.isOpened(), u.video.path
        assert round(cap.get(cv2.CAP_PROP_FPS)) == 25
        cap.release()
        frames = _frames(u.video.path)
        assert len(frames) == u.extra["n_frames"] == round(u.extra["duration"] * 25), u.id
        assert frames[0].shape == (160, 160, 3)
        if u.extra["occluded"]:
            a, b = u.extra["occluded"][0]
            assert 0 < a < b <= len(frames)


def test_mtcnn_finds_faces_only_where_visible(tiny_demo):
    """MTCNN (imer's detector) on sampled frames: a face in >= 90% of frames where it is visible
    (including the frames right next to an occlusion), none in occluded frames."""
    import torch

    from extract.mtcnn import detect, load_mtcnn

    rng = np.random.default_rng(0)
    visible, hidden = [], []
    for u in read_manifest(tiny_demo):
        frames = _frames(u.video.path)
        occ = {i for a, b in u.extra["occluded"] for i in range(a, b)}
        vis = [i for i in range(len(frames)) if i not in occ]
        picks = {int(rng.choice(vis))}
        for a, b in u.extra["occluded"]:
            hidden += [frames[a], frames[(a + b) // 2], frames[b - 1]]
            picks |= {i for i in (a - 1, b) if 0 <= i < len(frames)}
        visible += [frames[i] for i in sorted(picks)]
    assert len(hidden) >= 12 and len(visible) >= 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: on a shared 2-core machine one thread is ~3x faster
    try:
        mtcnn = load_mtcnn()
        found_vis = [len(boxes) > 0 for boxes, _, _ in detect(mtcnn, visible)]
        found_hid = [len(boxes) > 0 for boxes, _, _ in detect(mtcnn, hidden)]
    finally:
        torch.set_num_threads(threads)
    assert np.mean(found_vis) >= 0.9, f"face found in {np.mean(found_vis):.0%} of visible frames"
    assert not any(found_hid), f"a face was found in {sum(found_hid)} occluded frames"


def test_separability_measure_follows_the_signal():
    """The measurement itself: an informative feature scores well, noise scores at chance,
    and stacking picks the informative modality."""
    from threadpoolctl import threadpool_limits

    from manifests._demo_separability import separability

    rng = np.random.default_rng(0)
    labels = np.array(demo.LABELS * 24)
    speakers = np.repeat([f"s{i}" for i in range(4)], 24)
    onehot = np.eye(4)[[demo.LABELS.index(v) for v in labels]]
    feats = {"audio": onehot * 2 + rng.normal(0, 1, (96, 4)), "video": rng.normal(0, 1, (96, 8)),
             "text": ["some words here"] * 96, "speaker": speakers, "label": labels}
    with threadpool_limits(1):
        r = separability(feats)
    assert r["audio"] > 0.8 and r["video"] < 0.45 and r["text"] == pytest.approx(0.25)
    assert r["fusion"] > 0.75


def test_modalities_carry_signal_of_different_strength(tmp_path):
    """text > audio > video > chance, fusion > text, with margins; leave-one-speaker-out,
    sklearn on MFCC statistics / face-region pixel statistics / bag of words (see
    manifests/_demo_separability.py). 6 speakers x 24 short utterances (~25 s on 2 cores)."""
    from manifests._demo_separability import measure

    size = demo.Size(speakers=6, per_class=6, short=True)
    r = measure(demo.generate(tmp_path / "sep", seed=0, size=size, progress=False))
    msg = json.dumps({k: round(v, 3) for k, v in r.items()})
    # measured (seed 0): text 0.819, audio 0.597, video 0.500, fusion 0.868, chance 0.25
    assert r["video"] >= r["chance"] + 0.15, msg
    assert r["audio"] >= r["video"] + 0.06, msg
    assert r["text"] >= r["audio"] + 0.10, msg
    assert r["fusion"] >= r["text"] + 0.02, msg


def test_tts_errors_are_one_line():
    from manifests._demo_tts import Prosody, TTSUnavailable, synthesize_batch

    with pytest.raises(TTSUnavailable, match="no voice 'xx-nonexistent'"):
        synthesize_batch([("Hi.", "xx-nonexistent", Prosody())])
