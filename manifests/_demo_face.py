"""Face video for the demo corpus: a real photo (``skimage.data.astronaut()``) animated with
expression warps, head motion, speech-driven jaw motion, per-speaker appearance and occlusions.

All geometry is in the photo's pixel coordinates. The landmarks below are where MTCNN puts the
5 points on this photo (eyes, nose, mouth corners); brows sit above the eyes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIZE = 160          # output frames are SIZE x SIZE
FPS = 25
COARSE = 4          # the expression warp is computed every COARSE output pixels and interpolated
CENTER = (224.0, 117.0)  # face centre in the photo; output pixel (80, 80) maps here at rest

EYE_L, EYE_R = (205.0, 102.0), (247.0, 104.0)
MOUTH_L, MOUTH_R = (202.0, 139.0), (245.0, 142.0)
BROW_L, BROW_R = (203.0, 88.0), (249.0, 90.0)
BROW_IN_L, BROW_IN_R = (215.0, 90.0), (236.0, 91.0)
JAW = (224.0, 156.0)

# Expression parameters (pixels in the photo, except eye_open: relative lid opening change).
PARAMS = ("lip_corner", "lip_press", "brow_lower", "inner_brow", "eye_open")
# Prototype expression of each class at full intensity. The photo already smiles: neutral relaxes it.
PROTOTYPES = {
    "neu": dict(lip_corner=-1.5, lip_press=0.0, brow_lower=0.0, inner_brow=0.0, eye_open=0.0),
    "hap": dict(lip_corner=5.0, lip_press=-1.0, brow_lower=0.0, inner_brow=0.5, eye_open=-0.25),
    "ang": dict(lip_corner=-2.0, lip_press=3.0, brow_lower=5.0, inner_brow=-1.0, eye_open=0.25),
    "sad": dict(lip_corner=-5.0, lip_press=0.5, brow_lower=-1.0, inner_brow=5.0, eye_open=-0.25),
}


@dataclass
class Appearance:
    """How one speaker looks: mirrored or not, colour gains, gamma, zoom and framing offset."""
    flip: bool = False
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # R, G, B
    gamma: float = 1.0
    zoom: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)


@dataclass
class FaceTrack:
    """Everything needed to render one utterance's video."""
    n_frames: int
    expression: dict                 # PARAMS -> target value (after intensity and idiosyncrasy)
    onset_frames: int                # frames to reach the target expression
    jaw: np.ndarray                  # per-frame jaw opening in pixels (speech envelope)
    head: np.ndarray                 # (n_frames, 4): tx, ty (px), rotation (deg), log zoom
    occluded: list[tuple[int, int]] = field(default_factory=list)  # [start, end) frame ranges
    occluder_rgb: tuple[int, int, int] = (200, 160, 140)
    noise: float = 3.0               # sensor noise std (grey levels)
    seed: int = 0                    # noise stream


_PHOTO = None


def photo() -> np.ndarray:
    global _PHOTO
    if _PHOTO is None:
        from skimage import data

        _PHOTO = np.ascontiguousarray(data.astronaut())
    return _PHOTO


def _bump(x, y, c, sigma):
    return np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2 * sigma * sigma))


def displacement(x: np.ndarray, y: np.ndarray, e: dict, jaw: float):
    """Expression displacement (dx, dy) at photo coordinates (x, y): smooth Gaussian bumps around
    the landmarks, so the face deforms like a rubber sheet (mouth corners, brows, lids, jaw)."""
    dx = np.zeros_like(x)
    dy = np.zeros_like(y)
    gl, gr = _bump(x, y, MOUTH_L, 7.0), _bump(x, y, MOUTH_R, 7.0)
    # corners up (+) / down (-), and out with a smile; lip press pulls them inward
    dy -= e["lip_corner"] * (gl + gr)
    out = 0.4 * max(e["lip_corner"], 0.0) - e["lip_press"]
    dx += out * (gr - gl)
    # brows: lowering also draws them together
    bl, br = _bump(x, y, BROW_L, 9.0), _bump(x, y, BROW_R, 9.0)
    dy += e["brow_lower"] * (bl + br)
    dx += 0.5 * e["brow_lower"] * (bl - br)
    il, ir = _bump(x, y, BROW_IN_L, 6.0), _bump(x, y, BROW_IN_R, 6.0)
    dy -= e["inner_brow"] * (il + ir)
    # lids: vertical stretch around each eye centre
    for eye in (EYE_L, EYE_R):
        dy += e["eye_open"] * (y - eye[1]) * _bump(x, y, eye, 6.0)
    dy += jaw * _bump(x, y, JAW, 11.0)
    return dx, dy


def _grid(step: int = 1):
    """Output pixel centres relative to the frame centre; ``step`` > 1 gives the centres of
    step x step blocks, which is where cv2.resize puts the samples of a 1/step image."""
    c = np.arange(0, SIZE, step, dtype=np.float32) + (step - 1) / 2 - SIZE / 2 + 0.5
    v, u = np.meshgrid(c, c, indexing="ij")
    return u, v


def render_frames(track: FaceTrack, look: Appearance):
    """Yield RGB uint8 frames (SIZE x SIZE x 3)."""
    import cv2

    img = photo()
    rng = np.random.default_rng(track.seed)
    grids = [_grid(), _grid(COARSE)]
    if look.flip:
        grids = [(-u, v) for u, v in grids]
    lut = np.stack([np.clip(255.0 * (np.arange(256) / 255.0) ** look.gamma * g, 0, 255)
                    for g in look.gains], axis=1).astype(np.uint8)[:, None, :]  # (256, 1, 3) for cv2.LUT
    half = int(round(track.noise * np.sqrt(3)))
    occluded = np.zeros(track.n_frames, bool)
    for a, b in track.occluded:
        occluded[a:b] = True
    occ_mask = _occluder_mask()
    for t in range(track.n_frames):
        tx, ty, rot, logz = track.head[t]
        z = look.zoom * np.exp(logz)
        c, s = np.cos(np.deg2rad(rot)), np.sin(np.deg2rad(rot))

        def to_photo(u, v):  # output pixel -> photo point (head pose and framing, before expression)
            uu, vv = (u - tx - look.offset[0]) / z, (v - ty - look.offset[1]) / z
            return CENTER[0] + c * uu + s * vv, CENTER[1] - s * uu + c * vv

        (x, y), (xc, yc) = (to_photo(u, v) for u, v in grids)
        ramp = min(1.0, (t + 1) / max(track.onset_frames, 1))
        e = {name: ramp * val for name, val in track.expression.items()}
        # the deformation is smooth: evaluate it on a coarse grid and interpolate (16x fewer bumps)
        dx, dy = (cv2.resize(d.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
                  for d in displacement(xc, yc, e, float(track.jaw[t])))
        # backward warp: an output pixel shows the photo point that the deformation moved there
        frame = cv2.remap(img, (x - dx).astype(np.float32), (y - dy).astype(np.float32),
                          cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        frame = cv2.LUT(frame, lut)
        if occluded[t]:
            frame = _occlude(frame, occ_mask, track.occluder_rgb, t)
        # sensor noise: uniform integers in [-half, half] (std sqrt(half(half+1)/3) ~ track.noise)
        noisy = frame.astype(np.int16) + rng.integers(-half, half + 1, frame.shape, dtype=np.int16)
        yield np.clip(noisy, 0, 255).astype(np.uint8)


def _occluder_mask() -> np.ndarray:
    """A soft blob (a hand or object held in front of the camera) that hides the whole face."""
    import cv2

    m = np.zeros((SIZE, SIZE), np.float32)
    cv2.ellipse(m, (SIZE // 2, SIZE // 2 + 8), (int(SIZE * 0.47), int(SIZE * 0.56)), 0, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(m, (0, 0), 3.0)[..., None]


def _occlude(frame: np.ndarray, mask: np.ndarray, rgb, t: int) -> np.ndarray:
    shade = np.linspace(1.1, 0.8, SIZE, dtype=np.float32)[:, None, None]  # lit from above
    blob = np.asarray(rgb, np.float32)[None, None, :] * shade * (1.0 + 0.02 * np.sin(t))
    return (frame * (1 - mask) + np.clip(blob, 0, 255) * mask).astype(np.uint8)


def write_mp4(path: Path, frames_rgb) -> int:
    """Write frames with OpenCV's mp4v encoder (the H.264 'avc1' writer is not available in the
    opencv-python wheels). Returns the number of frames written."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV could not open an mp4v video writer")
    n = 0
    try:
        for f in frames_rgb:
            writer.write(np.ascontiguousarray(f[:, :, ::-1]))
            n += 1
    finally:
        writer.release()
    return n
