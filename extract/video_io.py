"""Video input shared by the visual extractors: RGB frames of a file (MP4, AVI, MKV...) or of a time
segment of it, at the native frame rate or resampled to a fixed one.

Decoding uses PyAV (FFmpeg in-process), which seeks to the keyframe before the segment start, so a
10-minute IEMOCAP dialogue is not decoded from the beginning to cut a 2-second turn. Frames are
yielded in chunks, so a long video never sits in memory whole. Resampling to ``fps`` picks, for
each output time start + k/fps, the frame on screen at that time (the last one that began at or
before it): frames are repeated or dropped, never blended. Bad input raises ValueError naming the
file and the problem; the extractor base records it as that utterance's Failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from extract.audio_io import check_segment  # one rule for audio and video segments
from manifests.schema import Media

# A frame whose timestamp is within this fraction of a frame period after an output time still
# counts as on screen at that time: container timestamps are rounded (e.g. 1/30 s stored in ms).
_TOLERANCE = 0.25


@dataclass
class VideoInfo:
    path: str
    fps: float  # native (average) frame rate
    width: int
    height: int
    duration: float | None  # seconds, None when the container does not say


def probe(path: str | Path) -> VideoInfo:
    """Frame rate, size and duration from the container headers (no decoding)."""
    av = _av()
    path = Path(path)
    with _open(path) as c:
        s = _video_stream(c, path)
        fps = _stream_fps(s, path)
        dur = None
        if s.duration is not None and s.time_base is not None:
            dur = float(s.duration * s.time_base)
        elif c.duration is not None:
            dur = c.duration / av.time_base
        return VideoInfo(str(path), fps, s.codec_context.width, s.codec_context.height, dur)


def iter_frames(media: Media | str | Path, fps: float | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (time in seconds within the file, HxWx3 uint8 RGB frame) over the segment of ``media``
    ([start, end), whole file when unset), at the native rate (``fps`` None) or at ``fps``."""
    media = media if isinstance(media, Media) else Media(str(media))
    path = Path(media.path)
    start, end = check_segment(media, path)
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be a positive number or None (native rate), got {fps!r}")
    n = 0
    with _open(path) as c:
        s = _video_stream(c, path)
        s.thread_type = "AUTO"  # frame-parallel decoding; output order is unchanged
        period = 1.0 / _stream_fps(s, path)
        tol = _TOLERANCE * period
        if start > 0:
            _seek(c, s, start)
        held = None  # [time, av frame, rgb array or None]: the frame on screen, converted on first use
        for i, frame in enumerate(_decode(c, s, path)):
            t = float(frame.pts * s.time_base) if frame.pts is not None else i * period
            if fps is None:  # native rate: every frame that begins inside the segment
                if t < start - tol:
                    continue
                if end is not None and t >= end - tol:
                    break
                n += 1
                yield t, frame.to_ndarray(format="rgb24")
                continue
            cur = [t, frame, None]
            # Output times before this frame begins show the held frame (or this one, if the
            # segment starts before the first frame).
            while (tk := start + n / fps) < t - tol and (end is None or tk < end):
                n += 1
                yield tk, _rgb(held or cur)
            held = cur
            if end is not None and start + n / fps >= end:
                break
        else:
            # End of file: the last frame stays on screen for one period.
            if fps is not None and held is not None:
                stop = held[0] + period if end is None else min(end, held[0] + period)
                while (tk := start + n / fps) < stop - 1e-9:
                    n += 1
                    yield tk, _rgb(held)
    if n == 0:
        raise ValueError(f"{path}: no video frames{_seg(start, end)}; the file is empty or the segment lies "
                         "outside it (check start/end in the manifest)")


def iter_chunks(media: Media | str | Path, size: int, fps: float | None = None
                ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Like ``iter_frames`` but grouped: (times (k,), k frames) with k <= ``size``."""
    times: list[float] = []
    frames: list[np.ndarray] = []
    for t, img in iter_frames(media, fps):
        times.append(t)
        frames.append(img)
        if len(frames) == size:
            yield np.asarray(times), frames
            times, frames = [], []
    if frames:
        yield np.asarray(times), frames


def read_frames(media: Media | str | Path, fps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All frames of the segment at once: (times (T,) float64, frames (T, H, W, 3) uint8)."""
    pairs = list(iter_frames(media, fps))
    return np.array([t for t, _ in pairs]), np.stack([f for _, f in pairs])


def write_video(path: str | Path, frames, fps: float) -> Path:
    """Write RGB uint8 frames (all the same size) as MPEG-4 Part 2 (OpenCV's `mp4v`, which works
    everywhere OpenCV does; its H.264 writer does not). Used by tests, the bench and demo data."""
    import cv2

    path = Path(path)
    frames = list(frames)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    h, w = frames[0].shape[:2]
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not wr.isOpened():
        raise ValueError(f"{path}: OpenCV cannot open an mp4v writer here")
    try:
        for f in frames:
            if f.shape[:2] != (h, w):
                raise ValueError(f"{path}: frame of size {f.shape[:2]} differs from the first {(h, w)}")
            wr.write(cv2.cvtColor(np.ascontiguousarray(f, dtype=np.uint8), cv2.COLOR_RGB2BGR))
    finally:
        wr.release()
    return path


# ---- internals ---------------------------------------------------------------------------------

def _rgb(held: list) -> np.ndarray:
    if held[2] is None:
        held[2] = held[1].to_ndarray(format="rgb24")
    return held[2]


def _av():
    import av

    return av


def _open(path: Path):
    av = _av()
    if not path.is_file():
        # a FIFO, directory or device exists but cannot be read as a file: say so, not "not found"
        what = "not a regular file (a directory, FIFO or device)" if path.exists() else "video file not found"
        raise ValueError(f"{path}: {what}; check the manifest's root and media paths")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot open as video ({e}); the file is damaged or not a video — "
                         "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)") from None


def _video_stream(c, path: Path):
    if not c.streams.video:
        raise ValueError(f"{path}: the file has no video stream; point the manifest's video at a video file")
    return c.streams.video[0]


def _stream_fps(s, path: Path) -> float:
    rate = s.average_rate or s.guessed_rate or s.base_rate
    if not rate or float(rate) <= 0:
        raise ValueError(f"{path}: the video stream declares no frame rate; re-encode it with a fixed rate")
    return float(rate)


def _seek(c, s, start: float) -> None:
    """Seek to the keyframe at or before ``start`` (frames before it are skipped while decoding)."""
    av = _av()
    try:
        c.seek(int(start / s.time_base), stream=s, backward=True, any_frame=False)
    except av.error.FFmpegError:
        c.seek(0, stream=s)  # unseekable stream: decode from the start


def _decode(c, s, path: Path):
    av = _av()
    try:
        yield from c.decode(s)
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: video decoding failed ({e}); the file is damaged — re-encode it") from None


def _seg(start: float, end: float | None) -> str:
    if start == 0 and end is None:
        return ""
    return f" in [{start:g}, {'end' if end is None else f'{end:g}'}) s"
