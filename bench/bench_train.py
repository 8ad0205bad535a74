"""Training speed per method: seconds per epoch and training samples/s.

Two data sets:
- ``iemocap-synthetic``: random features shaped like IEMOCAP's MMIN features (5531 utterances;
  A 130-d x ~500 frames, V 342-d x ~50, L 1024-d x ~25; one fold = ~80% train, ~10% validation).
  Only ``--batches`` training batches and as many validation batches are timed (after one warm-up
  batch) and the epoch time is extrapolated from them: a full epoch would take minutes per method
  on a CPU. The JSON says so (``extrapolated: true``).
- ``demo``: the demo corpus' real features (the demo configs' extractors; extracted first if
  missing), fold 1, one full epoch timed per method (``extrapolated: false``).

An epoch = training on the train split (each method's missing-condition sampling) + evaluating the
validation split under the method's selection conditions (1 for baseline, 6 for the others).

EMMR reads other features (librosa 33, OpenFace 709, BERT-base 768) at fixed lengths (A 150,
V 100, T 25): its IEMOCAP-sized set has those shapes, and on the demo it reads its own features.

    .venv/bin/python bench/bench_train.py [--batches 3] [--device auto] [--threads N] [--skip-demo]
                                          [--methods baseline,emmr]
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

METHODS = ["baseline", "baseline-aug", "mmin", "cm-arr", "emmr"]
# CM-ARR reads every modality resampled to one length (its config's data.resample_to: 50 for
# IEMOCAP, 16 on the demo); it is timed on the same data, resampled for it.
IEMOCAP = {"n": 5531, "dims": {"a": 130, "v": 342, "t": 1024},
           "lengths": {"a": (400, 600), "v": (40, 60), "t": (15, 35)}, "train_share": 0.8, "val_share": 0.1}
# the shapes of EMMR's features on IEMOCAP (SPEC.md §2); its config's fixed lengths cut them to 150 / 100 / 25
FEATURE_DIMS = {"emmr": {"a": 33, "v": 709, "t": 768}}


def build(name: str, dataset: str, data, device: str):
    """The method with its config for ``dataset``; MMIN gets a (random) baseline as prerequisite."""
    import torch

    from train.config import load_config
    from train.methods import build as build_method

    cfg = load_config(name, dataset)
    torch.manual_seed(0)
    m = build_method(cfg, data.spec)
    if cfg.get("requires"):
        m.attach({role: build_method(load_config(req, dataset), data.spec) for role, req in cfg["requires"].items()})
    return m.to(device), cfg


def time_batches(method, cfg, data, train_idx, val_idx, device: str, max_batches: int | None):
    """(train seconds, train samples, val seconds, val condition-samples) over at most
    ``max_batches`` batches each (None = the whole split), after one untimed warm-up batch."""
    import numpy as np
    import torch

    from train.conditions import apply_availability
    from train.protocols import draw, masks
    from train.data import Normalizer, batch_to
    from train.clipping import clip_gradients
    from train.trainer import make_optimizer

    amp = device.startswith("cuda") and bool(cfg["train"].get("amp", True))
    bs = int(cfg["train"]["batch_size"])
    norm = Normalizer.fit(data, train_idx, cfg["data"]["normalize"])
    params = method.trainable_parameters()
    opt = make_optimizer(params, cfg["train"]["optimizer"])
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(batch):
        b = batch_to(apply_availability(batch, draw(cfg["train"].get("missing"), len(batch["y"]), rng)), device)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
            loss, _ = method.loss(b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        clip_gradients(method, cfg["train"], params, scaler, opt)  # as the trainer does
        scaler.step(opt)
        scaler.update()

    method.train()
    batches = data.batches(train_idx, bs, norm, rng=rng)
    step(next(batches))  # warm-up
    sync()
    t, n, k = time.perf_counter(), 0, 0
    for batch in batches:
        step(batch)
        n += len(batch["y"])
        k += 1
        if max_batches and k >= max_batches:
            break
    sync()
    train_s = time.perf_counter() - t

    conds = cfg["select"]["conditions"]
    method.eval()
    vbs = max(bs, 256)
    t, nv, k = time.perf_counter(), 0, 0
    with torch.no_grad():
        for batch in data.batches(val_idx, vbs, norm):
            for c in conds:
                b = apply_availability(batch, masks(c, batch["ids"], 0))
                b.pop("x_full")
                with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
                    method.predict(batch_to(b, device))
                nv += len(batch["y"])
            k += 1
            if max_batches and k >= max_batches:
                break
    sync()
    return train_s, n, time.perf_counter() - t, nv


def figures(name, dataset, data, train_idx, val_idx, device, max_batches, n_train, n_val) -> dict:
    method, cfg = build(name, dataset, data, device)
    kept = data.resample_to
    data.resample_to = cfg.get("data", {}).get("resample_to") or kept  # the method's own data view
    try:
        train_s, n, val_s, nv = time_batches(method, cfg, data, train_idx, val_idx, device, max_batches)
    finally:
        data.resample_to = kept
    tr_sps, val_sps = n / train_s, nv / val_s
    n_cond = len(cfg["select"]["conditions"])
    epoch_s = n_train / tr_sps + n_val * n_cond / val_sps
    return {"epoch_s": round(epoch_s, 2), "train_samples_per_s": round(tr_sps, 1),
            "val_condition_samples_per_s": round(val_sps, 1), "batch_size": int(cfg["train"]["batch_size"]),
            "epochs_in_config": _epochs(cfg), "timed_train_samples": n, "timed_val_condition_samples": nv,
            "train_utterances_per_epoch": n_train, "val_utterances": n_val, "val_conditions": n_cond}


def _epochs(cfg) -> int:
    from train.trainer import total_epochs

    return total_epochs(cfg["train"])


def _with_lengths(data, name: str, dataset: str):
    """``data`` cut / padded as the method's config asks (data.max_len, data.fixed_len)."""
    from train.config import load_config

    d = load_config(name, dataset).get("data", {})
    data.max_len = {m: int(v) for m, v in (d.get("max_len") or {}).items() if v}
    data.fixed_len = bool(d.get("fixed_len"))
    return data


def iemocap_synthetic(batches: int, device: str, methods=METHODS) -> dict:
    import numpy as np

    from train.synthetic import synthetic_data

    n_train = int(IEMOCAP["n"] * IEMOCAP["train_share"])
    n_val = int(IEMOCAP["n"] * IEMOCAP["val_share"])
    # only the utterances the timed batches read are generated (1 warm-up + ``batches`` of 128)
    n_gen = 128 * (batches + 1) + 256 * batches
    data = synthetic_data(n=n_gen, dims=IEMOCAP["dims"], lengths=IEMOCAP["lengths"], seed=0)
    tr, va = np.arange(128 * (batches + 1)), np.arange(128 * (batches + 1), n_gen)
    out = {"extrapolated": True, "timed_batches": batches,
           "note": f"{batches} training and {batches} validation batches timed after one warm-up batch; "
                   f"epoch_s = {n_train} train utterances / train samples/s + {n_val} val utterances x "
                   "selection conditions / val samples/s",
           "shape": {"utterances": IEMOCAP["n"], "dims": IEMOCAP["dims"], "frames": IEMOCAP["lengths"]}}
    for name in methods:
        if name in FEATURE_DIMS:  # other features than MMIN's: data of their shapes, cut as the config says
            d = synthetic_data(n=n_gen, dims=FEATURE_DIMS[name], lengths=IEMOCAP["lengths"], seed=0)
            _with_lengths(d, name, "iemocap")
        else:
            d = data
        out[name] = figures(name, "iemocap", d, tr, va, device, batches, n_train, n_val)
        out[name]["dims"] = d.spec.dims
        print(f"  iemocap-synthetic {name}: {out[name]['epoch_s']} s/epoch, "
              f"{out[name]['train_samples_per_s']} train samples/s", flush=True)
    return out


def demo(device: str, methods=METHODS) -> dict:
    from manifests.datasets import load_folds, load_manifest
    from train.config import load_config
    from train.run import build_data, ensure_stores

    cfg = load_config("mmin", "demo")
    man = load_manifest("demo")
    _, folds = load_folds("demo")
    data = build_data(man, ensure_stores("demo", cfg, device), cfg)
    fold = folds[0]
    tr, va = data.indices(fold.train), data.indices(fold.val)
    out = {"extrapolated": False, "fold": fold.name, "utterances": len(data), "dims": data.spec.dims,
           "note": "one full epoch timed (after one warm-up batch) on fold 1 of the demo corpus"}
    own = {}  # methods reading other features than MMIN's (EMMR): their own data module
    for name in methods:
        c = load_config(name, "demo")
        d = data
        if (c["features"], c.get("data", {}).get("max_len")) != (cfg["features"], cfg.get("data", {}).get("max_len")):
            key = repr((c["features"], c.get("data")))
            if key not in own:
                own[key] = build_data(man, ensure_stores("demo", c, device), c)
            d = own[key]
        out[name] = figures(name, "demo", d, d.indices(fold.train), d.indices(fold.val), device, None, len(tr), len(va))
        out[name]["dims"] = d.spec.dims
        print(f"  demo {name}: {out[name]['epoch_s']} s/epoch, {out[name]['train_samples_per_s']} train samples/s",
              flush=True)
    return out


def _context(device: str) -> dict:
    """Recorded with each section: a later run with --skip-demo keeps the earlier demo figures."""
    import torch

    return {"device": device, "torch_threads": torch.get_num_threads(),
            "load_avg_1min_after": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _earlier(section: str) -> dict:
    """The section as bench/results/train.json has it (a run timing some methods keeps the rest)."""
    import json

    from common import RESULTS

    path = RESULTS / "train.json"
    return json.loads(path.read_text()).get(section, {}) if path.is_file() else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=3, help="timed batches on the IEMOCAP-sized set (default 3)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1, as imer train)")
    ap.add_argument("--skip-demo", action="store_true", help="only the synthetic IEMOCAP-sized set")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated configs to time (default all); others' earlier figures are kept")
    args, _ = ap.parse_known_args()

    import torch

    from pipeline.device import resolve_device

    from train.run import cpu_threads

    device = resolve_device(args.device)
    with cpu_threads(device, args.threads):  # what `imer train` uses: 1 thread on CPU unless told
        res = {"device": device, "torch_threads": torch.get_num_threads(), "amp": device.startswith("cuda"),
               "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
        t = time.perf_counter()
        methods = [m for m in args.methods.split(",") if m]
        res["iemocap-synthetic"] = {**_earlier("iemocap-synthetic"), **iemocap_synthetic(args.batches, device, methods),
                                    **_context(device)}
        if not args.skip_demo:
            res["demo"] = {**_earlier("demo"), **demo(device, methods), **_context(device)}
        res["bench_s"] = round(time.perf_counter() - t, 1)
        res["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    write_result("train", res)


if __name__ == "__main__":
    main()
