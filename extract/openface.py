"""`openface`: an OpenFace-style per-frame vector computed in Python, without the OpenFace binary.

Columns (``columns()``; default 345 = 1 + 4 + 10 + 6 + 324):
- ``confidence``: the MTCNN face probability (OpenFace: ``confidence`` of its landmark fit).
- ``box_x1, box_y1, box_x2, box_y2``: the face box as fractions of the frame width/height.
- ``lmk_<point>_x/_y`` for eye_a, eye_b, nose, mouth_a, mouth_b (a = image left): the 5 MTCNN
  landmarks relative to the box, (x - x1) / box width, (y - y1) / box height.
- ``pose_Tx, pose_Ty, pose_Tz`` (mm) and ``pose_Rx, pose_Ry, pose_Rz`` (radians; pitch, yaw, roll),
  OpenFace's conventions: camera coordinates (x right, y down, z forward), R = Rx·Ry·Rz, camera
  intrinsics defaulted as OpenFace does without calibration (fx = fy = 500·(W/640 + H/480)/2,
  centre of the frame). Solved with cv2.solvePnP (SQPnP) from the 5 landmarks and a generic 3-D
  5-point face (mm, ``FACE_3D``), where OpenFace fits its 68-point 3-D model; translation is of the
  5 points' centroid and is only as good as the guessed focal length.
- ``hog_<i>``: HOG of the aligned face (gray, ``hog_size`` px square, ``hog_cell`` px cells, 2x2-cell
  blocks, ``hog_orientations`` bins, L2-Hys; skimage.feature.hog): the appearance descriptor that
  OpenFace's action-unit models read (OpenFace: Felzenszwalb HOG, 8 px cells on a 112 px face).

Against OpenFace 2.0's per-frame output (the 709-dim "OpenFace 2.0" feature EMMR used is that
CSV minus bookkeeping columns: gaze directions/angles, 2-D and 3-D eye-region landmarks, pose,
68 2-D and 3-D landmarks, rigid and non-rigid shape parameters, 17 AU intensities and 18 AU
presences), this matches: confidence; head pose (6, same conventions, coarser fit); a landmark
subset (the nose tip and mouth corners are OpenFace points 30, 48, 54; MTCNN's eye centres are not
among the 68). It does not produce: gaze, eye-region landmarks, the other 2-D/3-D landmarks,
shape (PDM) parameters, or action units — instead of AU predictions it stores the HOG those
predictions are computed from. So it is not a drop-in for released OpenFace features.
"""

from __future__ import annotations

import numpy as np

from extract.base import register
from extract.faces import FaceFeatureExtractor, gray_faces

POINTS = ("eye_a", "eye_b", "nose", "mouth_a", "mouth_b")

# Generic face, mm, camera axes for a frontal face (x right, y down, z away from the camera). x, y:
# the ArcFace 5-point mean frontal face (the alignment template's shape) scaled to 63 mm between the
# eye centres; depth behind the nose tip: eyes 20 mm, mouth corners 24 mm (adult anthropometric
# averages, rounded). Centred on the centroid. Five points cannot tell a smile (raised mouth
# corners) from a head pitched down, so pitch carries some expression.
_ARC = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
_F3D = np.column_stack([(_ARC - _ARC[2]) * 63.0 / (_ARC[1, 0] - _ARC[0, 0]), [20.0, 20.0, 0.0, 24.0, 24.0]])
FACE_3D = (_F3D - _F3D.mean(0)).astype(np.float64)


def camera_matrix(width: int, height: int) -> np.ndarray:
    """OpenFace's intrinsics when none are given: fx = fy = mean of 500·W/640 and 500·H/480."""
    f = (500.0 * width / 640.0 + 500.0 * height / 480.0) / 2.0
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def head_pose(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(Tx, Ty, Tz, Rx, Ry, Rz) of the 5 landmarks (5, 2) pixel coordinates in a W x H frame."""
    import cv2
    from scipy.spatial.transform import Rotation

    img = np.asarray(points, np.float64).reshape(5, 1, 2)
    k = camera_matrix(width, height)
    ok, rvec, tvec = cv2.solvePnP(FACE_3D.reshape(5, 1, 3), img, k, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return np.full(6, np.nan)
    rvec, tvec = cv2.solvePnPRefineLM(FACE_3D.reshape(5, 1, 3), img, k, None, rvec, tvec)
    rot = Rotation.from_rotvec(rvec.reshape(3))
    return np.concatenate([tvec.reshape(3), rot.as_euler("XYZ")])  # intrinsic XYZ: R = Rx·Ry·Rz


@register
class OpenFace(FaceFeatureExtractor):
    """Confidence, box, normalised landmarks, head pose and HOG of the aligned face, per frame."""

    name = "openface"
    version = "1"
    default = True
    defaults = {"hog_size": 64, "hog_cell": 16, "hog_orientations": 9}

    def _hog_blocks(self) -> int:
        cells = self.params["hog_size"] // self.params["hog_cell"]
        if cells < 2:
            raise ValueError(f"openface: hog_size / hog_cell must be at least 2 cells, got {self.params}")
        return (cells - 1) ** 2  # 2x2-cell blocks, one cell stride

    @property
    def dim(self) -> int:
        return 1 + 4 + 10 + 6 + self._hog_blocks() * 4 * self.params["hog_orientations"]

    def columns(self) -> list[str]:
        cols = ["confidence", "box_x1", "box_y1", "box_x2", "box_y2"]
        cols += [f"lmk_{p}_{a}" for p in POINTS for a in "xy"]
        cols += ["pose_Tx", "pose_Ty", "pose_Tz", "pose_Rx", "pose_Ry", "pose_Rz"]
        cols += [f"hog_{i}" for i in range(self.dim - len(cols))]
        return cols

    def load(self) -> None:
        self._hog_blocks()  # validate the parameters before the run

    def hog(self, gray: np.ndarray) -> np.ndarray:
        from skimage.feature import hog

        c = self.params["hog_cell"]
        return hog(gray, orientations=self.params["hog_orientations"], pixels_per_cell=(c, c),
                   cells_per_block=(2, 2), block_norm="L2-Hys", feature_vector=True)

    def embed(self, crops, rows, frame_size):
        w, h = frame_size
        rows = np.asarray(rows, np.float64)
        box = rows[:, 1:5]
        bw = np.maximum(box[:, 2] - box[:, 0], 1e-6)
        bh = np.maximum(box[:, 3] - box[:, 1], 1e-6)
        pts = rows[:, 5:15].reshape(-1, 5, 2)
        lmk = np.stack([(pts[..., 0] - box[:, :1]) / bw[:, None], (pts[..., 1] - box[:, 1:2]) / bh[:, None]], -1)
        pose = np.stack([head_pose(p, w, h) for p in pts])
        grays = gray_faces(crops, self.params["hog_size"])
        hogs = np.stack([self.hog(g) for g in grays])
        out = np.concatenate([rows[:, :1], box / [w, h, w, h], lmk.reshape(-1, 10), pose, hogs], axis=1)
        return out.astype(np.float32)
