"""The `logmel` extractor against librosa called directly."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from extract.base import Failure, create
from manifests.schema import Media, Utterance


def test_logmel_matches_librosa(tmp_path):
    import librosa

    sr = 16000
    t = np.arange(int(0.73 * sr)) / sr
    y = (0.3 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, len(t))).astype(np.float32)
    sf.write(tmp_path / "a.wav", y, sr, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", y, 8000, subtype="FLOAT")  # other rate: resampled by load_audio
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    ext = create("logmel", n_mels=32)
    a, b, bad = ext.extract([Utterance("a", audio=Media(str(tmp_path / "a.wav"))),
                             Utterance("b", audio=Media(str(tmp_path / "b.wav"), start=0.1, end=0.5)),
                             Utterance("bad", audio=Media(str(tmp_path / "bad.wav")))])
    ref = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=512, win_length=400, hop_length=160, n_mels=32)
    np.testing.assert_allclose(a.features, np.log(ref + 1e-10).T, rtol=1e-5, atol=1e-5)
    assert a.features.shape == (1 + len(y) // 160, 32) and a.features.dtype == np.float32
    assert b.features.shape == (1 + int(0.4 * sr) // 160, 32)  # 0.4 s segment at 10 ms hop
    assert isinstance(bad, Failure) and "bad.wav" in bad.reason
    assert ext.dim == 32 and ext.frame_rate == 100.0
    assert ext.key != create("logmel").key and ext.key == create("logmel", n_mels=32).key
