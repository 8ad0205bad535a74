"""extract/audio_io.py: resampling, channel mixing, segments, video containers and bad input, checked
on signals whose content is known (tones at known frequencies, one frequency per second)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from extract.audio_io import audio_duration, load_audio
from manifests.schema import Media

SR = 16000


def tone(freq, seconds, sr, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)


def peak_hz(x, sr=SR):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()]


def steps(sr, freqs=(440, 880, 1320, 1760)):
    """One second per frequency: the segment [k, k+1) s is identified by freqs[k]."""
    return np.concatenate([tone(f, 1.0, sr) for f in freqs])


def write_mp4(path, audio, sr, with_audio=True, seconds=None):
    """An MPEG-4 file with a small video track and (optionally) a stereo AAC track, via PyAV."""
    import av

    seconds = seconds if seconds is not None else audio.shape[1] / sr
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=25)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        if with_audio:
            a = c.add_stream("aac", rate=sr)
            a.layout = "stereo"
        for _ in range(int(seconds * 25)):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                c.mux(p)
        if with_audio:
            data = audio.astype(np.float32)
            for i in range(0, data.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, i:i + 1024]), format="fltp", layout="stereo")
                fr.sample_rate, fr.pts = sr, i
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode(None):
                c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
    return path


def test_resamples_any_rate_and_keeps_the_tone(tmp_path):
    for sr, subtype in [(44100, "PCM_16"), (8000, "PCM_16"), (48000, "FLOAT"), (16000, "PCM_24")]:
        p = tmp_path / f"t{sr}.wav"
        sf.write(p, tone(1000, 2.0, sr), sr, subtype=subtype)
        x = load_audio(Media(str(p)))
        assert x.dtype == np.float32 and x.ndim == 1
        assert len(x) == 2 * SR
        assert abs(peak_hz(x) - 1000) < 1.0
        # amplitude survives resampling (away from the edges)
        assert abs(np.abs(x[1000:-1000]).max() - 0.5) < 0.01


def test_channels_are_averaged(tmp_path):
    left, right = tone(500, 1.0, 22050), tone(2000, 1.0, 22050, amp=0.25)
    p = tmp_path / "st.wav"
    sf.write(p, np.stack([left, right], 1), 22050, subtype="FLOAT")
    x = load_audio(Media(str(p)))
    spec = np.abs(np.fft.rfft(x)) / (len(x) / 2)  # sine amplitude per bin
    f = np.fft.rfftfreq(len(x), 1 / SR)
    assert spec[np.argmin(abs(f - 500))] == pytest.approx(0.25, abs=0.01)
    assert spec[np.argmin(abs(f - 2000))] == pytest.approx(0.125, abs=0.01)
    # opposite channels cancel
    q = tmp_path / "anti.wav"
    sf.write(q, np.stack([left, -left], 1), 22050, subtype="FLOAT")
    assert np.abs(load_audio(Media(str(q)))).max() < 1e-6


def test_output_is_clipped_to_unit_range(tmp_path):
    p = tmp_path / "loud.wav"
    sf.write(p, 3 * tone(300, 0.5, SR), SR, subtype="FLOAT")
    x = load_audio(Media(str(p)))
    assert x.max() == 1.0 and x.min() == -1.0


def test_segment_cut_by_content(tmp_path, monkeypatch):
    p = tmp_path / "steps.wav"
    sf.write(p, steps(44100), 44100, subtype="PCM_16")
    # the segment's frequency identifies it; only the segment's frames are read from disk
    read_frames = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *a, **k):
        out = real_read(self, frames, *a, **k)
        read_frames.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    for k, f in enumerate((440, 880, 1320, 1760)):
        x = load_audio(Media(str(p), start=k + 0.1, end=k + 0.9))
        assert len(x) == int(0.8 * SR)
        assert abs(peak_hz(x) - f) < 2
    assert read_frames == [int(0.8 * 44100)] * 4
    # end past the file is clipped to the file; start only -> to the end
    assert len(load_audio(Media(str(p), start=3.5, end=9.0))) == SR // 2
    assert abs(peak_hz(load_audio(Media(str(p), start=2.0))) - 1480) < 300  # 1320 and 1760 halves
    assert audio_duration(Media(str(p), start=1.0, end=2.5)) == pytest.approx(1.5)
    assert audio_duration(Media(str(p))) == pytest.approx(4.0)


def test_audio_inside_a_video_container(tmp_path):
    sr = 44100
    s = steps(sr)
    p = write_mp4(tmp_path / "clip.mp4", np.stack([s, s]), sr)
    full = load_audio(Media(str(p)))
    assert abs(len(full) - 4 * SR) <= 2048 * SR / sr  # AAC pads the last frame
    ref = load_audio(Media(str(_wav(tmp_path, s, sr))))
    n = min(len(full), len(ref))
    assert np.corrcoef(full[:n], ref[:n])[0, 1] > 0.99  # same content, same timing (AAC is lossy)
    for k, f in enumerate((440, 880, 1320, 1760)):
        x = load_audio(Media(str(p), start=k + 0.2, end=k + 0.7))
        assert len(x) == SR // 2
        assert abs(peak_hz(x) - f) < 3
        seg_ref = ref[int((k + 0.2) * SR):int((k + 0.7) * SR)]
        assert np.corrcoef(x, seg_ref)[0, 1] > 0.99  # cut at the right time, not just the right tone
    assert audio_duration(Media(str(p), start=1.0, end=3.0)) == pytest.approx(2.0)


def _wav(tmp_path, x, sr):
    p = tmp_path / "ref.wav"
    sf.write(p, x, sr, subtype="FLOAT")
    return p


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("empty", "no samples"),
    ("garbage", "not a readable audio"),
    ("zero_bytes", "not a readable audio"),
    ("too_short", "shorter than"),
    ("after_end", "after the end"),
    ("bad_segment", "bad segment"),
    ("video_no_audio", "no audio stream"),
    ("nan", "NaN"),
])
def test_bad_input_raises_a_clear_value_error(tmp_path, case, message):
    p = tmp_path / f"{case}.wav"
    media = Media(str(p))
    if case == "empty":
        sf.write(p, np.zeros(0), SR)
    elif case == "garbage":
        p.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    elif case == "zero_bytes":
        p.write_bytes(b"")
    elif case == "too_short":
        sf.write(p, tone(440, 0.01, SR), SR)
    elif case == "after_end":
        sf.write(p, tone(440, 1.0, SR), SR)
        media = Media(str(p), start=2.0, end=3.0)
    elif case == "bad_segment":
        sf.write(p, tone(440, 1.0, SR), SR)
        media = Media(str(p), start=0.8, end=0.5)
    elif case == "video_no_audio":
        p = write_mp4(tmp_path / "silent.mp4", None, SR, with_audio=False, seconds=1.0)
        media = Media(str(p))
    elif case == "nan":
        x = tone(440, 0.5, SR)
        x[100] = np.nan
        sf.write(p, x, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=message) as e:
        load_audio(media)
    assert str(e.value).startswith(str(p))  # names the file
    assert "\n" not in str(e.value)
