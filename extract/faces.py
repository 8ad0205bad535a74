"""The face-track stage and what the face-feature extractors share.

``faces`` runs MTCNN once per video frame and stores, per frame, one face: [prob, x1, y1, x2, y2,
then 5 landmarks (x, y): the eye on the image's left, the other eye, nose tip, left and right
mouth corner], pixels of the original frame (dim 15). Mask = a face was found. In two-person
videos (``Media.side`` "left"/"right", IEMOCAP's side-by-side dialogues) the face is the most
confident one whose box centre lies in that half of the frame; otherwise the most confident one.

``fer-cnn``, ``denseface`` and ``openface`` subclass ``FaceFeatureExtractor``: they read this track
from ``self.upstream["faces"]`` (filled by the stage runner), decode the same frames again, align
each face with a 5-point similarity transform onto ``FACE_TEMPLATE`` and compute their vectors.
Frames without a face keep mask False (zero rows that the mask marks invalid); an utterance
without any face is an Output with every mask False and info ``{"no_face": true}``: the visual
modality is missing for it, which the training side treats as such.

Face detection (MTCNN) runs in float32 on every device: its output is geometry (boxes, landmarks)
that thresholds and alignment read. The face-feature networks (``fer-cnn``, ``denseface``) run
under fp16 autocast on CUDA and in float32 on CPU (``Extractor.precision``); a half-precision store
has its own key, so it never mixes with float32 features.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from extract.base import Extractor, ExtractorUnavailable, Output, register
from extract.video_io import iter_chunks
from manifests.schema import Utterance
from pipeline.device import torch_threads

TRACK_COLUMNS = ("prob", "x1", "y1", "x2", "y2",
                 "eye_a_x", "eye_a_y", "eye_b_x", "eye_b_y", "nose_x", "nose_y",
                 "mouth_a_x", "mouth_a_y", "mouth_b_x", "mouth_b_y")  # a = image left, b = image right

# Where the 5 landmarks go in the aligned square crop (fractions of its side). The shape is the
# ArcFace 5-point mean frontal face (112x112 template /112), scaled by 0.9 about the centre and
# raised by 0.08: that frames the face like the detector crops FER2013 models are trained on
# (forehead to chin, a little background), rather than ArcFace's tight identity crop.
_ARCFACE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]]) / 112.0
FACE_TEMPLATE = (0.5 + 0.9 * (_ARCFACE - 0.5) + np.array([0.0, -0.08])).astype(np.float32)


def choose_face(boxes: np.ndarray, probs: np.ndarray, width: int, side: str | None) -> int | None:
    """Index of the face to keep among one frame's detections (sorted by probability, highest
    first), or None: the most confident, restricted to the named half of the frame."""
    if len(probs) == 0:
        return None
    if side is None:
        return 0
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    on_side = cx < width / 2 if side == "left" else cx >= width / 2
    hits = np.flatnonzero(on_side)
    return int(hits[0]) if len(hits) else None


def align_face(frame: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """Warp ``frame`` so the 5 landmarks ``points`` (5, 2) land on FACE_TEMPLATE in a size x size
    crop (rotation, uniform scale and translation only, least squares over the 5 points)."""
    import cv2

    src = np.asarray(points, np.float32).reshape(5, 2)
    dst = FACE_TEMPLATE * size
    # RANSAC with a threshold larger than the crop keeps all 5 points as inliers: a plain
    # least-squares fit refined by Levenberg-Marquardt, deterministic.
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0 * size)
    if m is None:
        raise ValueError(f"degenerate face landmarks {src.round(1).tolist()}; cannot align")
    return cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def gray_faces(crops: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 RGB aligned crops -> (N, size, size) uint8 gray (area resampling, which
    averages rather than skips pixels when shrinking)."""
    import cv2

    return np.stack([cv2.resize(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY), (size, size), interpolation=cv2.INTER_AREA)
                     for c in crops])


@register
class Faces(Extractor):
    """MTCNN face track: one face per frame, [prob, box, 5 landmarks] (dim 15), mask = face found."""

    name = "faces"
    version = "1"
    modality = "video"
    default = True
    batch_size = 4  # utterances per extract() call: frames, not utterances, fill the detector batch
    defaults = {
        "fps": None,  # frames per second to analyse; None = every frame at the native rate
        "min_face_size": 20,  # pixels; MTCNN's smallest pyramid scale
        "thresholds": [0.6, 0.7, 0.7],  # P-, R-, O-Net score thresholds (facenet-pytorch defaults)
    }
    frame_batch = 32  # frames per MTCNN call (same output for any value; only speed and memory change)
    cpu_threads: ClassVar[int | None] = 1  # torch threads on CPU, see torch_threads

    def extract(self, utts):
        with torch_threads(self.device, self.cpu_threads):
            return super().extract(utts)

    @property
    def dim(self) -> int:
        return len(TRACK_COLUMNS)

    @property
    def frame_rate(self) -> float | None:
        """The analysis rate; None = each video's native rate (stored per utterance in info["fps"])."""
        return self.params["fps"]

    def columns(self) -> list[str]:
        return list(TRACK_COLUMNS)

    def model_identity(self) -> dict:
        return {"detector": "facenet-pytorch MTCNN (P/R/O-Net weights shipped in the wheel)"}

    def load(self) -> None:
        from extract.mtcnn import load_mtcnn

        try:
            self.mtcnn = load_mtcnn(self.device, min_face_size=self.params["min_face_size"],
                                    thresholds=list(self.params["thresholds"]))
        except ImportError as e:
            raise ExtractorUnavailable(f"faces: MTCNN needs facenet-pytorch ({e}); install it with "
                                       "`pip install --no-deps facenet-pytorch==2.6.0` (make setup does)") from None

    def extract_one(self, utt: Utterance) -> Output:
        from extract.mtcnn import detect

        video = _video_of(utt)
        rows: list[np.ndarray] = []
        for _, frames in iter_chunks(video, self.frame_batch, self.params["fps"]):
            width = frames[0].shape[1]
            for boxes, probs, points in detect(self.mtcnn, frames):
                row = np.zeros(len(TRACK_COLUMNS), np.float32)
                k = choose_face(boxes, probs, width, video.side)
                if k is not None:
                    row[0] = probs[k]
                    row[1:5] = boxes[k]
                    row[5:] = points[k].reshape(-1)
                rows.append(row)
        feats = np.stack(rows)
        mask = feats[:, 0] > 0
        info = {"frames": len(feats), "faces": int(mask.sum())}
        if self.params["fps"] is None:
            from extract.video_io import probe

            info["fps"] = probe(video.path).fps
        if not mask.any():
            info["no_face"] = True
        return Output(feats, mask, info)


def _video_of(utt: Utterance):
    video = utt.video
    if video is None:
        raise ValueError(f"{utt.id}: the manifest gives no video for this utterance")
    if video.side not in (None, "left", "right"):
        raise ValueError(f"{utt.id}: video side must be 'left', 'right' or absent, got {video.side!r}; fix the manifest")
    return video


class FaceFeatureExtractor(Extractor):
    """Base of the extractors that read the ``faces`` track and compute one vector per aligned face.

    Subclasses set ``crop_size`` and implement ``embed(crops, rows, frame_size)``: crops (N, S, S, 3)
    uint8 RGB aligned faces, rows (N, 15) their track rows, frame_size (width, height) -> (N, dim)."""

    modality = "video"
    requires = ("faces",)
    crop_size: ClassVar[int] = 112
    frame_batch = 64  # aligned faces per embed() call (same output for any value)
    cpu_threads: ClassVar[int | None] = 1  # torch threads on CPU, see torch_threads

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # every face feature takes `fps`: the rate of the faces track it reads (None = native)
        cls.defaults = {"fps": Faces.defaults["fps"], **cls.defaults}

    def upstream_params(self) -> dict[str, dict]:
        fps = self.params["fps"]
        return {} if fps == Faces.defaults["fps"] else {"faces": {"fps": fps}}

    def extract(self, utts):
        with torch_threads(self.device, self.cpu_threads):
            return super().extract(utts)

    @property
    def frame_rate(self) -> float | None:
        return self._track_fps()

    def _track_fps(self) -> float | None:
        """The rate the faces track was extracted at: its store's recorded params, else this
        extractor's ``fps`` (the rate the runner extracts the faces stage at for it)."""
        attrs = getattr(self.upstream.get("faces"), "attrs", None) or {}
        params = attrs.get("params") or {}
        return params["fps"] if "fps" in params else self.params["fps"]

    def embed(self, crops: np.ndarray, rows: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def extract_one(self, utt: Utterance) -> Output:
        video = _video_of(utt)
        track, mask = self._track(utt)
        feats = np.zeros((len(track), self.dim), np.float32)
        info: dict = {"frames": len(track), "faces": int(mask.sum())}
        if not mask.any():
            info["no_face"] = True
            return Output(feats, mask, info)
        crops: list[np.ndarray] = []
        where: list[int] = []
        frame_size = None

        def flush():
            if where:
                feats[where] = self.embed(np.stack(crops), track[where], frame_size)
                crops.clear()
                where.clear()

        i = 0
        for _, frames in iter_chunks(video, self.frame_batch, self._track_fps()):
            frame_size = (frames[0].shape[1], frames[0].shape[0])
            for frame in frames:
                if i < len(track) and mask[i]:
                    try:
                        crops.append(align_face(frame, track[i, 5:15].reshape(5, 2), self.crop_size))
                        where.append(i)
                    except ValueError:  # degenerate landmarks: this frame has no usable face
                        mask[i] = False
                        info["unaligned"] = info.get("unaligned", 0) + 1
                    if len(where) == self.frame_batch:
                        flush()
                i += 1
        if i != len(track):
            raise ValueError(f"{video.path}: the faces track of {utt.id} has {len(track)} frames but the video now "
                             f"gives {i}; the video changed or the faces stage used another fps — re-extract faces")
        flush()
        bad = mask & ~np.isfinite(feats).all(1)  # e.g. a head pose that did not solve
        if bad.any():
            feats[bad], mask[bad] = 0.0, False
            info["non_finite"] = int(bad.sum())
        info["faces"] = int(mask.sum())
        if not mask.any():
            info["no_face"] = True
        return Output(feats, mask, info)

    def _track(self, utt: Utterance) -> tuple[np.ndarray, np.ndarray]:
        store = self.upstream.get("faces")
        if store is None:
            raise ExtractorUnavailable(f"{self.name} reads the `faces` stage: run it through `imer features` "
                                       "(which extracts faces first) or set extractor.upstream['faces'] to its store")
        try:
            track = np.asarray(store[utt.id], np.float32)
            mask = np.array(store.mask(utt.id), bool)  # a copy: frames that fail alignment are unset
        except KeyError as e:
            raise ValueError(f"{utt.id}: no faces track ({e.args[0] if e.args else 'missing'}); "
                             "the faces stage must succeed for an utterance before its face features") from None
        if track.ndim != 2 or track.shape[1] != len(TRACK_COLUMNS) or mask.shape != (len(track),):
            raise ValueError(f"{utt.id}: faces track has shape {track.shape} / mask {mask.shape}, expected "
                             f"(T, {len(TRACK_COLUMNS)}) / (T,); re-extract faces")
        return track, mask
