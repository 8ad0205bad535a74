"""Visual extraction speed: frames/s of MTCNN face detection (`faces`) and of each face extractor
(`fer-cnn`, `openface`, `denseface`), batched (frame_batch frames per network call) vs one frame
per call, on the same generated clip of the demo's animated face (160x160, 25 fps). The two take
turns for --rounds rounds (order reversed every other round); each keeps its fastest.

Extractor figures cover the whole extract() call: decoding the video again, aligning each face
and the network/descriptor. `denseface` runs with random weights (a speed figure only: the
original weights are not public). On CPU the extractors use one torch thread (extract/faces.py).

    .venv/bin/python bench/bench_visual.py [--frames 100] [--rounds 3] [--device auto]
Writes bench/results/visual.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def face_clip(path: Path, n: int) -> Path:
    import numpy as np

    from extract.video_io import write_video
    from manifests import _demo_face as face

    rng = np.random.default_rng(0)
    track = face.FaceTrack(n_frames=n, expression=dict(lip_corner=3.0, lip_press=0.0, brow_lower=0.0,
                                                       inner_brow=0.0, eye_open=0.0),
                           onset_frames=5, jaw=np.abs(np.sin(np.arange(n) / 3.0)) * 4.0,
                           head=rng.normal(0, 1.0, (n, 4)) * [2, 2, 2, 0.01], seed=0)
    return write_video(path, face.render_frames(track, face.Appearance()), face.FPS)


def seconds(ex, utt, frame_batch: int) -> float:
    """Wall time of ex.extract([utt]) with ``frame_batch`` frames per network call."""
    ex.frame_batch = frame_batch
    t = time.perf_counter()
    out = ex.extract([utt])[0]
    dt = time.perf_counter() - t
    if not hasattr(out, "features"):
        raise RuntimeError(f"{ex.name}: extraction failed: {out.reason}")
    return dt


def compare(ex, utt, frame_batch: int, frames: int, rounds: int) -> dict:
    """Batched vs one frame per call on the same clip, taking turns; the fastest round of each
    (the least disturbed by other processes)."""
    times: dict[str, list[float]] = {"batched": [], "per_frame": []}
    for r in range(rounds):
        for name in ("batched", "per_frame") if r % 2 == 0 else ("per_frame", "batched"):
            times[name].append(seconds(ex, utt, frame_batch if name == "batched" else 1))
    batched, single = frames / min(times["batched"]), frames / min(times["per_frame"])
    return {"batched_frame_batch": frame_batch, "batched_fps": round(batched, 1), "per_frame_fps": round(single, 1),
            "ratio": round(batched / single, 2), "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=100, help="frames in the clip")
    ap.add_argument("--rounds", type=int, default=3, help="alternating batched / per-frame rounds")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from extract.base import create
    from extract.denseface import build_densenet, save_checkpoint
    from manifests.schema import Media, Utterance
    from pipeline.device import resolve_device
    from pipeline.runner import store_attrs
    from pipeline.store import FeatureStore

    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="imer-bench-visual-"))
    os.environ["IMER_CACHE"] = str(tmp / "cache")
    n, few = args.frames, max(4, args.frames // 4)
    clip = face_clip(tmp / "face.mp4", n)
    short = face_clip(tmp / "short.mp4", few)
    utt = Utterance("clip", "bench", video=Media(str(clip)))
    utt_short = Utterance("short", "bench", video=Media(str(short)))

    figures: dict = {"device": device, "frames": n, "frame_size": "160x160",
                     "torch_threads_cpu": 1 if device == "cpu" else None, "rounds": args.rounds,
                     "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    faces = create("faces", device=device)
    t = time.perf_counter()
    faces.ensure_loaded()
    load_s = time.perf_counter() - t
    seconds(faces, utt_short, faces.frame_batch)  # warm-up
    figures["faces"] = {"load_s": round(load_s, 2), **compare(faces, utt, 32, n, args.rounds)}
    if device == "cpu":  # why the extractors use one thread: the same batched run with torch's default
        faces.cpu_threads = None
        figures["faces"]["batched_fps_default_threads"] = round(few / seconds(faces, utt_short, 32), 1)
        figures["faces"]["default_threads"] = torch.get_num_threads()
        faces.cpu_threads = 1

    # the faces track the extractors read, as the stage runner would store it
    store = FeatureStore.open_or_create(tmp / "faces-store", dim=faces.dim, attrs=store_attrs(faces, "bench"))
    faces.frame_batch = 32
    store.commit({u.id: (faces.extract([u])[0], faces.fingerprint(u)) for u in (utt, utt_short)})

    ckpt = save_checkpoint(tmp / "denseface.pt", build_densenet(), ["c"] * 8, 131.0754, 47.858177,
                           {"depth": 100, "growth": 12}, {"note": "random weights, speed only"})
    for name, params in (("fer-cnn", {}), ("openface", {}), ("denseface", {"checkpoint": str(ckpt)})):
        ex = create(name, device=device, **params)
        ex.upstream = {"faces": store}
        t = time.perf_counter()
        ex.ensure_loaded()
        load_s = time.perf_counter() - t
        seconds(ex, utt_short, 64)  # warm-up
        figures[name] = {"dim": ex.dim, "load_s": round(load_s, 2), **compare(ex, utt, 64, n, args.rounds)}
    figures["torch"] = torch.__version__
    figures["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    write_result("visual", figures)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
