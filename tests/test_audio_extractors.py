"""compare / egemaps / librosa against the libraries called directly on the same samples.
(librosa's numba compile, ~17 s in a fresh venv, is paid once, in this module.)"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from extract.base import Failure, Output, available, create
from manifests.schema import Media, Utterance

SR = 16000


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    """1.5 s of a gliding harmonic 'voice' with noise, stored as float WAV at 16 kHz, so the file's
    samples are exactly what load_audio returns."""
    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * SR)) / SR
    f0 = 140 + 60 * t
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(0.2 / k * np.sin(k * phase) for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    x = (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    p = tmp_path_factory.mktemp("audio") / "voice.wav"
    sf.write(p, x, SR, subtype="FLOAT")
    return Utterance("v", audio=Media(str(p))), x


def smile(feature_set, level, x):
    import opensmile

    return opensmile.Smile(feature_set, level).process_signal(x, SR).to_numpy()


def test_registered_as_default_audio_extractors():
    reg = available()
    for name in ("compare", "egemaps", "librosa", "wav2vec2"):
        assert reg[name].modality == "audio" and reg[name].default is True


def test_compare_equals_opensmile(voice):
    import opensmile

    utt, x = voice
    e = create("compare")
    assert (e.dim, e.frame_rate) == (130, 100.0)
    out = e.extract([utt])[0]
    assert isinstance(out, Output)
    lld = smile(opensmile.FeatureSet.ComParE_2016, opensmile.FeatureLevel.LowLevelDescriptors, x)
    de = smile(opensmile.FeatureSet.ComParE_2016, opensmile.FeatureLevel.LowLevelDescriptors_Deltas, x)
    assert lld.shape == (150 - 4, 65) and de.shape == (150 - 2, 65)  # SPEC §1: 100N-4, 100N-2
    assert out.features.shape == (146, 130) and out.features.dtype == np.float32
    np.testing.assert_array_equal(out.features[:, :65], lld.astype(np.float32))
    np.testing.assert_array_equal(out.features[:, 65:], de[:146].astype(np.float32))


def test_compare_deltas_are_row_aligned_with_llds(voice):
    """Row i of the Deltas level is the openSMILE regression (window 2) of LLD rows i-2..i+2."""
    utt, _ = voice
    f = create("compare").extract([utt])[0].features
    lld, de = f[:, :65].astype(np.float64), f[:, 65:]
    reg = sum(k * (lld[2 + k:len(lld) - 2 + k] - lld[2 - k:len(lld) - 2 - k]) for k in (1, 2)) / 10
    inner = de[2:len(lld) - 2]
    scale = np.abs(inner).max(0) + 1e-6
    good = np.median(np.abs(reg - inner) / scale, axis=0)
    assert np.median(good) < 1e-3  # aligned; a one-row shift gives ~0.1
    shifted = np.median(np.abs(reg[1:] - inner[:-1]) / scale[None], axis=0)
    assert np.median(shifted) > 10 * np.median(good) + 1e-3


def test_compare_downsample_like_mmin(voice):
    from scipy.signal import resample_poly

    utt, _ = voice
    full = create("compare").extract([utt])[0].features
    e = create("compare", downsample=10)
    assert e.frame_rate == 10.0 and e.key != create("compare").key
    ds = e.extract([utt])[0].features
    np.testing.assert_allclose(ds, resample_poly(full, 1, 10, axis=0), rtol=1e-5, atol=1e-4)
    assert ds.shape == (15, 130)
    with pytest.raises(ValueError, match="downsample"):
        create("compare", downsample=0)


def test_egemaps_equals_opensmile(voice):
    import opensmile

    utt, x = voice
    e = create("egemaps")
    assert (e.dim, e.frame_rate) == (25, 100.0)
    f = e.extract([utt])[0].features
    ref = smile(opensmile.FeatureSet.eGeMAPSv02, opensmile.FeatureLevel.LowLevelDescriptors, x)
    assert f.shape == ref.shape == (146, 25)
    np.testing.assert_array_equal(f, ref.astype(np.float32))


def test_librosa_equals_librosa_calls(voice):
    import librosa

    utt, x = voice
    e = create("librosa")
    assert (e.dim, e.frame_rate) == (33, 100.0)
    f = e.extract([utt])[0].features
    n = 1 + len(x) // 160
    assert f.shape == (n, 33) and f.dtype == np.float32
    zcr = librosa.feature.zero_crossing_rate(x, frame_length=400, hop_length=160)
    mfcc = librosa.feature.mfcc(y=x, sr=SR, n_mfcc=20, n_fft=512, win_length=400, hop_length=160)
    chroma = librosa.feature.chroma_cqt(y=x, sr=SR, hop_length=160)
    np.testing.assert_allclose(f[:, 0], zcr[0], rtol=1e-6)
    np.testing.assert_allclose(f[:, 1:21], mfcc.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f[:, 21:], chroma.T, rtol=1e-5, atol=1e-6)


def test_librosa_chroma_finds_the_note(tmp_path):
    p = tmp_path / "a440.wav"
    sf.write(p, 0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR), SR)
    f = create("librosa").extract([Utterance("a", audio=Media(str(p)))])[0].features
    assert f[:, 21:].mean(0).argmax() == 9  # chroma bins start at C: A is the 10th
    zcr = f[5:-5, 0].mean()  # a 440 Hz sine crosses zero 880 times a second
    assert zcr == pytest.approx(880 / SR, rel=0.05)


def test_bad_utterances_become_failures_and_the_batch_goes_on(voice, tmp_path):
    utt, _ = voice
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(700, np.float32), SR)  # 44 ms: loads, but too short for ComParE's 60 ms frames
    batch = [utt, Utterance("gone", audio=Media(str(tmp_path / "gone.wav"))),
             Utterance("short", audio=Media(str(short))), Utterance("noaudio")]
    for name in ("compare", "egemaps", "librosa"):
        outs = create(name).extract(batch)
        assert isinstance(outs[0], Output)
        assert isinstance(outs[1], Failure) and "gone.wav" in outs[1].reason and "not found" in outs[1].reason
        assert isinstance(outs[3], Failure) and "no audio" in outs[3].reason
        if name == "compare":
            assert isinstance(outs[2], Failure) and "too short" in outs[2].reason and "short.wav" in outs[2].reason


def test_resampled_stereo_source_gives_the_same_frame_count(voice, tmp_path):
    _, x = voice
    import soxr

    y = soxr.resample(x, SR, 44100)
    p = tmp_path / "st44.wav"
    sf.write(p, np.stack([y, y], 1), 44100, subtype="FLOAT")
    u = Utterance("s", audio=Media(str(p)))
    for name, rows in (("compare", 146), ("librosa", 1 + len(x) // 160)):
        assert create(name).extract([u])[0].features.shape[0] == rows
