"""One-shot check of imer's GPU path (issue 40): about 8 minutes on one GPU for the small demo.

1. Every registered extractor on the demo corpus on the device (face stages at the demo feature
   set's 5 fps), into a temporary cache, at the device's precision (``Extractor.precision``: fp16
   autocast on CUDA): seconds, utterances/s, peak GPU memory; and, on a few utterances, the
   difference from float32 features computed on the CPU (max abs, cosine).
2. Every registered method (its config of the same name), 2 epochs on fold 1 (test = the first
   speaker, validation = the next), from the same initial weights and batches: on the device under
   the default autocast (``train.amp: true``) and in float32, and on the CPU in float32 with two
   seeds. Per run: s/epoch (the second epoch's training plus validation), training samples/s,
   peak GPU memory, the achieved FLOP/s of a training step (bench/flops.py's counter) against a
   dense matmul of the same dtype timed in this process; and the agreement with the CPU: the
   relative difference of the untrained model's outputs on one batch (numerics alone), and the
   validation UA after 2 epochs next to the spread between the two CPU seeds (the demo's noise:
   dropout draws differ between devices, so CUDA and CPU runs are not bit-exact).

``--device cpu`` is the smoke test (tests/test_gpu_check.py): a few utterances and batches, the
reduced-precision paths run as CPU bf16 autocast.

    .venv/bin/python bench/gpu_check.py [--device cuda] [--utterances N] [--batches K] [--out FILE]
Writes bench/results/gpu_check.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

FACE_FPS = 5  # the demo feature set's rate for the face stages


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.startswith("cuda") else None


def matmul_flops(device: str, dtype, n: int) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on ``device``, best of 10."""
    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        info.update(name=torch.cuda.get_device_name(), memory_gib=round(total / 2 ** 30, 1),
                    bf16=torch.cuda.is_bf16_supported(),
                    # what this process holds beyond torch's allocator: the CUDA context (train/job_memory.py)
                    context_mib=round((total - free - torch.cuda.memory_reserved()) / 2 ** 20))
    return info


# ---- 1. extractors ---------------------------------------------------------------------------------

def pick(man, n: int | None, dataset: str):
    """The first ``n`` utterances of each speaker in turn (all when None), as a manifest of ``dataset``."""
    from bench_precision import pick as spread

    sub = spread(man, n or len(man))
    sub.dataset = dataset
    return sub


def extractor_list(device: str, precision: str, denseface: Path | None) -> list:
    """Every registered extractor (stages others read first), face stages at FACE_FPS, the demo
    set's parameters where it has them; ``denseface``: its checkpoint, found in the user's cache."""
    from extract import base
    from extract.faces import FaceFeatureExtractor, Faces
    from train.config import feature_set

    demo = {s["name"]: s.get("params") or {} for s in feature_set("demo").values()}
    out = []
    for name, cls in sorted(base.available().items(), key=lambda kv: (len(kv[1].requires), kv[0])):
        params = dict(demo.get(name, {}))
        if name == "denseface" and denseface is not None:
            params["checkpoint"] = str(denseface)
        if issubclass(cls, (FaceFeatureExtractor, Faces)):
            params["fps"] = FACE_FPS
        if cls.half_precision and precision != "auto":
            params["precision"] = precision
        out.append(base.create(name, device=device, **params))
    return out


def extract_all(man, device: str, precision: str, n_compare: int, denseface=None) -> tuple[list[dict], dict]:
    """(one row per extractor, {extractor name: store path}) for ``man`` on ``device``."""
    from extract.base import ExtractorUnavailable, create
    from pipeline.runner import run_features
    from bench_precision import compare

    rows, paths = [], {}
    ref_man = pick(man, n_compare, "gpucheck-cpu")
    for ext in extractor_list(device, precision, denseface):
        _reset_peak(device)
        t0 = time.perf_counter()
        try:
            done = run_features(man, [ext], progress=False, required=True)
        except ExtractorUnavailable as e:
            rows.append({"extractor": ext.name, "skipped": str(e).splitlines()[0][:160]})
            continue
        _sync(device)
        s = next(x for x in done if x.key == ext.key)
        row = {"extractor": ext.name, "precision": ext.precision, "utterances": s.computed + s.cached,
               "failed": len(s.failed), "seconds": round(time.perf_counter() - t0, 2), "peak_mib": _peak_mib(device)}
        row["utt_per_s"] = round(row["utterances"] / row["seconds"], 2) if row["seconds"] else None
        paths[ext.name] = s.path
        params = {k: v for k, v in ext.params.items() if k != "precision"}
        ref = create(ext.name, device="cpu", **params)  # float32 on the CPU, the reference
        [r] = [x for x in run_features(ref_man, [ref], progress=False) if x.key == ref.key]
        from pipeline.store import FeatureStore

        row["vs_cpu_fp32"] = compare(FeatureStore.open(r.path), FeatureStore.open(s.path))
        rows.append(row)
    return rows, paths


# ---- 2. methods -----------------------------------------------------------------------------------

def method_configs() -> dict[str, str]:
    """{registered method: the config that trains it} (the config of the same name, else the first)."""
    from train.config import list_configs, load_config
    from train.methods import available

    out = {}
    for name in available():
        if name.startswith("_"):  # the tests' own probe methods (test_missing_invariance's convention)
            continue
        if name in list_configs():
            out[name] = name
        else:
            out[name] = next(c for c in list_configs() if load_config(c, "demo").get("method") == name)
    return out


def speaker_fold(data, man):
    """Fold 1 of the demo protocol: test = the first speaker, validation = the next, train = the rest."""
    spk = {u.id: u.speaker for u in man}
    order = sorted(set(spk.values()))
    rows = lambda keep: np.array([i for i, u in enumerate(data.ids) if keep(spk.get(u))], np.int64)  # noqa: E731
    return rows(lambda s: s not in order[:2]), rows(lambda s: s == order[1])


def run_method(cfg: dict, data, tr, va, device: str, seed: int, amp, batches: int | None, tmp: str) -> dict:
    """2 epochs of ``cfg`` on ``device`` (weights initialised on the CPU, so every device starts
    alike); the untrained model's outputs on one full-modality batch; timing, memory, FLOPs."""
    import torch

    from bench_train import step_flops
    from pipeline.device import autocast
    from train.conditions import apply_availability
    from train.data import Normalizer, batch_to
    from train.methods import build
    from train.trainer import Trainer

    torch.manual_seed(seed)
    np.random.seed(seed)
    method = build(cfg, data.spec)
    if cfg.get("requires"):  # random-init prerequisites: this checks the path, not the accuracy
        method.attach({role: build(cfg["prerequisites"][n], data.spec) for role, n in cfg["requires"].items()})
    c = copy.deepcopy(cfg)
    c["train"]["amp"] = amp
    norm = Normalizer.fit(data, tr, c.get("data", {}).get("normalize", []))
    trainer = Trainer(method, data, tr, va, c, tmp, seed=seed, device=device, normalizer=norm, progress=False)
    bs = int(c["train"]["batch_size"])
    probe = data.collate(tr[:bs], norm)
    full = batch_to(apply_availability(probe, np.ones((len(probe["y"]), 3), bool)), device)
    full["phase"] = "val"
    method.eval()
    with torch.no_grad(), autocast(device, trainer.amp_dtype):
        out0 = method.predict(full)
    opt, _, scaler, params = trainer.optimisation()
    _reset_peak(device)
    epochs = [trainer.train_epoch(e, opt, scaler, params, bs, max_batches=batches) for e in range(2)]
    val = trainer.validate(bs)
    _sync(device)
    peak = _peak_mib(device)
    train_b = dict(probe)
    flops = step_flops(trainer, train_b) / len(probe["y"])
    ep = epochs[1]
    return {"s_per_epoch": round(ep["train_time_s"] + val["val_time_s"], 3),
            "samples_per_s": round(ep["samples_per_s"], 1), "peak_mib": peak, "flop_per_sample": flops,
            "val_ua": val["val"].get("ua"), "amp_dtype": str(trainer.amp_dtype).removeprefix("torch."),
            "out0": out0.float().cpu().numpy() if torch.is_tensor(out0) else None}


def check_method(name: str, cfg: dict, data, man, device: str, amp_word, batches, cpu_seeds: int, limits: dict,
                 tmp: str) -> dict:
    tr, va = speaker_fold(data, man)
    runs = {("fp32", 0): run_method(cfg, data, tr, va, device, 0, False, batches, tmp)}
    runs["amp", 0] = run_method(cfg, data, tr, va, device, 0, amp_word, batches, tmp)
    # on the CPU the float32 run is itself the reference
    cpu = [runs["fp32", 0] if device == "cpu" and s == 0 else run_method(cfg, data, tr, va, "cpu", s, False, batches, tmp)
           for s in range(cpu_seeds)]
    row = {"method": name, "config": cfg["name"], "cpu_val_ua": [r["val_ua"] for r in cpu],
           "cpu_seed_spread": float(np.ptp([r["val_ua"] for r in cpu])) if len(cpu) > 1 else None}
    for mode in ("amp", "fp32"):
        r = runs[mode, 0]
        dtype = r["amp_dtype"] if r["amp_dtype"] != "None" else "float32"
        achieved = r["flop_per_sample"] * r["samples_per_s"]
        ref = cpu[0]["out0"]
        rel = (float(np.abs(r["out0"] - ref).max() / max(np.abs(ref).max(), 1e-12))
               if r["out0"] is not None and ref is not None else None)
        row[mode] = {"dtype": dtype, "s_per_epoch": r["s_per_epoch"], "samples_per_s": r["samples_per_s"],
                     "peak_mib": r["peak_mib"], "gflop_per_s": round(achieved / 1e9, 3),
                     "share_of_matmul": round(achieved / limits[dtype], 5), "untrained_out_rel_diff": rel,
                     "val_ua": r["val_ua"], "ua_minus_cpu": r["val_ua"] - cpu[0]["val_ua"]}
    return row


def train_all(man, paths: dict, device: str, amp_word, batches, cpu_seeds: int, limits: dict, only=None) -> list[dict]:
    from pipeline.store import FeatureStore
    from train.config import feature_set, load_config
    from train.run import build_data

    stores = {m: FeatureStore.open(paths[s["name"]]) for m, s in feature_set("demo").items()}
    rows, built = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cname in method_configs().items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            try:
                cfg = load_config(cname, "demo")
                key = json.dumps(cfg.get("data"), sort_keys=True, default=str)
                if key not in built:
                    built[key] = build_data(man, stores, cfg)
                row = check_method(name, cfg, built[key], man, device, amp_word, batches, cpu_seeds, limits, tmp)
            except Exception as e:  # noqa: BLE001 - reported, the other methods go on
                row = {"method": name, "config": cname, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"  {name}: {row['seconds']} s{'  ERROR ' + row['error'] if 'error' in row else ''}", flush=True)
    return rows


# ---- report ----------------------------------------------------------------------------------------

def _f(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def print_report(res: dict) -> None:
    i = res["info"]
    print(f"\n== {i.get('name', i['device'])} (torch {i['torch']}); matmul limits "
          + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in res["matmul_flop_per_s"].items())
          + (f"; CUDA context {i['context_mib']} MiB" if "context_mib" in i else ""))
    print(f"\n{'extractor':<12}{'prec':<6}{'utts':>5}{'s':>8}{'utt/s':>8}{'peak MiB':>10}{'max abs':>10}{'cos min':>10}")
    for r in res["extractors"]:
        if "skipped" in r:
            print(f"{r['extractor']:<12}skipped: {r['skipped'][:90]}")
            continue
        v = r["vs_cpu_fp32"]
        print(f"{r['extractor']:<12}{r['precision']:<6}{r['utterances']:>5}{r['seconds']:>8.2f}{_f(r['utt_per_s']):>8}"
              f"{_f(r['peak_mib']):>10}{_f(v['max_abs']):>10}{_f(v['cos_min'], '.6f'):>10}")
    print(f"\n{'method':<18}{'mode':<10}{'s/epoch':>9}{'samp/s':>9}{'peak MiB':>10}{'GFLOP/s':>9}{'of mm':>8}"
          f"{'out diff':>10}{'UA':>7}{'UA-cpu':>8}{'cpu noise':>10}")
    for r in res["methods"]:
        if "error" in r:
            print(f"{r['method']:<18}ERROR {r['error'][:100]}")
            continue
        for mode in ("amp", "fp32"):
            m = r[mode]
            print(f"{r['method']:<18}{m['dtype']:<10}{m['s_per_epoch']:>9.3f}{m['samples_per_s']:>9.1f}{_f(m['peak_mib']):>10}"
                  f"{m['gflop_per_s']:>9.2f}{m['share_of_matmul']:>8.2%}{_f(m['untrained_out_rel_diff']):>10}"
                  f"{m['val_ua']:>7.3f}{m['ua_minus_cpu']:>+8.3f}{_f(r['cpu_seed_spread'], '.3f'):>10}")
    print(f"\ntotal {res['wall_s']:.0f} s")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:K or cpu (a smoke test)")
    ap.add_argument("--manifest", help="manifest (default: the demo corpus)")
    ap.add_argument("--utterances", type=int, help="utterances to use (default: all on CUDA, 12 on cpu)")
    ap.add_argument("--batches", type=int, help="training batches per epoch (default: all on CUDA, 2 on cpu)")
    ap.add_argument("--compare-utterances", type=int, default=4, help="utterances compared with CPU float32 features")
    ap.add_argument("--cpu-seeds", type=int, default=2, help="CPU reference seeds (their spread is the noise)")
    ap.add_argument("--methods", help="comma-separated registered methods (default: all)")
    ap.add_argument("--out", help="JSON file for the figures (default bench/results/gpu_check.json)")
    args = ap.parse_args(argv)

    import torch

    from pipeline.device import resolve_device

    device = resolve_device(args.device)
    cpu = device == "cpu"
    torch.set_num_threads(1)
    from manifests.datasets import load_manifest

    t0 = time.perf_counter()
    from extract.denseface import default_checkpoint

    man = load_manifest("demo", manifest=args.manifest)  # read before IMER_CACHE moves to the temporary cache
    dense = default_checkpoint() if default_checkpoint().is_file() else None
    man = pick(man, args.utterances or (12 if cpu else None), "gpucheck")
    info = device_info(device)
    n = 512 if cpu else 8192
    low = torch.bfloat16 if cpu or torch.cuda.is_bf16_supported() else torch.float16
    limits = {"float32": matmul_flops(device, torch.float32, n), str(low).removeprefix("torch."): matmul_flops(device, low, n)}
    if not cpu:
        limits["float16"] = matmul_flops(device, torch.float16, n)
    old = os.environ.get("IMER_CACHE"), torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["IMER_CACHE"] = cache
            print(f"extractors on {device}, {len(man)} utterances", flush=True)
            ext_rows, paths = extract_all(man, device, "bf16" if cpu else "auto", args.compare_utterances, dense)
            print("methods: 2 epochs each", flush=True)
            only = set(args.methods.split(",")) if args.methods else None
            meth = train_all(man, paths, device, "bf16" if cpu else True, args.batches or (2 if cpu else None),
                             args.cpu_seeds, limits, only)
    finally:  # a caller in the same process (the test) keeps its cache and threads
        if old[0] is None:
            os.environ.pop("IMER_CACHE", None)
        else:
            os.environ["IMER_CACHE"] = old[0]
        torch.set_num_threads(old[1])
    res = {"info": info, "matmul_flop_per_s": limits, "extractors": ext_rows, "methods": meth,
           "utterances": len(man), "wall_s": time.perf_counter() - t0}
    print_report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    else:
        from common import write_result

        write_result("gpu_check" if not cpu else "gpu_check_cpu_smoke", res)
    return res


if __name__ == "__main__":
    main()
