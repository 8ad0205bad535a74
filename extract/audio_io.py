"""Audio input shared by the audio extractors: any file (WAV/FLAC/OGG/MP3, or the audio track of a
video container) -> float32 mono in [-1, 1] at one sample rate, optionally only a time segment.

Plain audio files go through libsndfile (soundfile), which seeks to the segment so a 10-minute
IEMOCAP dialogue is not decoded to cut a 2-second turn. Anything libsndfile cannot open (MP4, AVI,
MKV, M4A...) is decoded with PyAV (FFmpeg), which also seeks close to the segment start. Resampling
uses soxr (the resampler librosa uses by default). Bad input raises ValueError naming the file and
the problem; the extractor base records it as that utterance's Failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from manifests.schema import Media

MIN_SECONDS = 0.025  # one 25 ms analysis window: anything shorter gives no frames in any extractor


def load_audio(media: Media, sr: int = 16000, min_seconds: float = MIN_SECONDS) -> np.ndarray:
    """Samples of ``media`` (its ``start``/``end`` segment, seconds, when given) as float32 mono
    at ``sr`` Hz, clipped to [-1, 1]. Raises ValueError for a missing, empty, corrupt or too short
    input or a segment outside the file."""
    path = Path(media.path)
    if not path.is_file():
        # a FIFO, directory or device exists but cannot be read as a file: say so, not "not found"
        what = "not a regular file (a directory, FIFO or device)" if path.exists() else "audio file not found"
        raise ValueError(f"{path}: {what}; check the manifest's root and media paths")
    start, end = check_segment(media, path)
    try:
        x, native = _read_soundfile(path, start, end)
    except _NotSoundfile:
        x, native = _read_av(path, start, end)
    if x.size == 0:
        raise ValueError(f"{path}: no audio samples{_seg(start, end)}; the file or segment is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{path}: audio contains NaN or infinite samples; re-encode the file")
    x = x.mean(axis=1) if x.ndim == 2 else x  # channels -> mono by averaging
    if native != sr:
        import soxr

        x = soxr.resample(x.astype(np.float64), native, sr, quality="HQ")
    x = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0)  # resampling may overshoot slightly
    if len(x) < min_seconds * sr:
        raise ValueError(f"{path}: audio{_seg(start, end)} is {len(x) / sr * 1000:.1f} ms long, shorter than "
                         f"the {min_seconds * 1000:.0f} ms minimum; drop it from the manifest or fix its times")
    return x


def audio_duration(media: Media) -> float:
    """Seconds of audio ``media`` covers (its segment, clipped to the file), read from headers only."""
    path = Path(media.path)
    start, end = check_segment(media, path)
    total = _file_duration(path)
    stop = total if end is None else min(end, total)
    return max(0.0, stop - start)


# ---- internals ---------------------------------------------------------------------------------

class _NotSoundfile(Exception):
    """libsndfile does not read this format; fall back to PyAV."""


def _seg(start: float, end: float | None) -> str:
    return "" if start == 0 and end is None else f" segment [{start:g}, {end if end is not None else 'end'}] s"


def check_segment(media: Media, path: Path) -> tuple[float, float | None]:
    start = 0.0 if media.start is None else float(media.start)
    end = None if media.end is None else float(media.end)
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"{path}: bad segment start={media.start} end={media.end}; need 0 <= start < end (seconds)")
    return start, end


def _read_soundfile(path: Path, start: float, end: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        f = sf.SoundFile(str(path))
    except sf.LibsndfileError as e:
        raise _NotSoundfile(str(e)) from None
    with f:
        native = f.samplerate
        if f.frames <= 0:
            raise ValueError(f"{path}: audio file has no samples")
        _note_truncated_wav(path, f)
        first = int(round(start * native))
        if first >= f.frames:
            raise ValueError(f"{path}: segment starts at {start:g} s, after the end of the audio "
                             f"({f.frames / native:.3f} s); fix the segment times in the manifest")
        n = -1 if end is None else int(round(end * native)) - first
        try:
            if first:
                f.seek(first)
            x = f.read(frames=n, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ValueError(f"{path}: corrupt audio data ({e}); re-encode the file") from None
    return x, native


def _note_truncated_wav(path: Path, f) -> None:
    """A WAV whose data chunk is shorter than its header says (a cut or half-copied file) reads
    without error; say so once per file, on stderr, so the user knows the features cover less."""
    if f.format not in ("WAV", "WAVEX") or str(path) in _NOTED:
        return
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    pos = 12
    while pos + 8 <= len(head):  # RIFF chunks: 4-byte id, little-endian 4-byte size, payload (even-padded)
        cid, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if cid == b"data":
            have = path.stat().st_size - (pos + 8)
            if 0 < have < size and size != 0xFFFFFFFF:
                import sys

                _NOTED.add(str(path))
                frame = max(1, f.channels * {"PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
                                             "PCM_U8": 1}.get(f.subtype, 2))
                print(f"imer: {path}: truncated WAV: its header announces {size // frame / f.samplerate:.2f} s, the "
                      f"file holds {have // frame / f.samplerate:.2f} s; features cover only what is there "
                      "(re-copy or re-encode the file)", file=sys.stderr)
            return
        pos += 8 + size + (size & 1)


_NOTED: set[str] = set()


def _read_av(path: Path, start: float, end: float | None) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: not a readable audio or video file ({_why(e)})") from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise ValueError(f"{path}: the file has no audio stream")
        stream = streams[0]
        native = stream.rate or stream.codec_context.sample_rate
        if not native:
            raise ValueError(f"{path}: the audio stream has no sample rate")
        # Keep the stream's channels and rate; only unify the sample format (float, planar).
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=native)
        if start > 0 and stream.time_base:
            try:  # lands on a keyframe at or before `start`; exact trimming below
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            except av.FFmpegError:
                container.seek(0, stream=stream)
        parts, t_next = [], None
        try:
            for frame in container.decode(stream):
                t0 = float(frame.time) if frame.time is not None else (t_next or 0.0)
                for out in resampler.resample(frame):
                    parts.append((t0, out.to_ndarray()))
                    t0 += out.samples / native
                t_next = t0
                if end is not None and t0 >= end:
                    break
            for out in resampler.resample(None):  # flush
                parts.append((t_next or 0.0, out.to_ndarray()))
        except av.FFmpegError as e:
            if not parts:
                raise ValueError(f"{path}: corrupt audio stream ({_why(e)})") from None
    if not parts:
        raise ValueError(f"{path}: the audio stream has no samples")
    # Cut [start, end) using each block's own timestamp (decoding after a seek starts early).
    pieces = []
    for t0, block in parts:
        a = max(0, int(round((start - t0) * native)))
        b = block.shape[1] if end is None else min(block.shape[1], int(round((end - t0) * native)))
        if b > a:
            pieces.append(block[:, a:b])
    if not pieces:
        raise ValueError(f"{path}: no audio{_seg(start, end)}; the segment lies outside the audio stream")
    return np.concatenate(pieces, axis=1).T.astype(np.float32, copy=False), native


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _file_duration(path: Path) -> float:
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except (sf.LibsndfileError, RuntimeError):
        pass
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise ValueError(f"{path}: the file has no audio stream")
            s = c.streams.audio[0]
            if s.duration is not None and s.time_base:
                return float(s.duration * s.time_base)
            if c.duration is not None:
                return c.duration / 1e6  # container duration is in AV_TIME_BASE (microseconds)
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a readable audio or video file ({_why(e)})") from None
    raise ValueError(f"{path}: cannot tell the audio duration")
