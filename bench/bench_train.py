"""Training speed per method, before and after imer's speed-ups, in one run: seconds per epoch,
samples/s, the padding fraction of the training batches, and the achieved FLOP/s of a training
step against the machine's practical limit (a dense matmul timed in the same process).

"before" = random training batches and one forward per validation condition; "after" =
length-bucketed batches (``data.bucket: true``) and per-modality encoders run twice per
validation batch, the conditions assembled from them (methods with ``encode_each``). Every epoch
goes through the trainer itself (``Trainer.train_epoch`` / ``validate``).

Two data sets:
- ``iemocap-synthetic``: random features with IEMOCAP's MMIN shapes (5531 utterances; A 130-d at
  ~120 frames/s, V 342-d at ~12, L 1024-d ~5.5 word pieces/s; every modality's length follows one
  lognormal utterance duration, median 3.7 s; one fold = 80% train, 10% validation). Only
  ``--batches`` training batches (after one warm-up) and 256 x batches validation utterances are
  timed; the epoch time is extrapolated (``extrapolated: true``). The padding of a whole epoch
  (batch 128) is computed from the lengths of all 5531.
- ``demo``: the demo corpus' real features, fold 1, one full epoch timed per method.

EMMR reads other features (librosa 33, OpenFace 709, BERT-base 768) at fixed lengths (A 150,
V 100, T 25): its IEMOCAP-sized set has those shapes, and on the demo it reads its own features.
FLOPs: torch's FlopCounterMode, with the LSTM kernels it does not count (oneDNN / cuDNN) added
(bench/flops.py); counted on one training batch.

    .venv/bin/python bench/bench_train.py [--batches 2] [--device auto] [--threads N] [--skip-demo]
                                          [--methods baseline,emmr]
    .venv/bin/python bench/bench_train.py --steps [--before /tmp/imer-before] [--rounds 3] [--batches 2]

``--steps`` times only the training step, before vs after (``bench/train_step.py``): two worker
processes of one thread, one on the code at ``--before`` (a checkout of an earlier commit) or on
this code with the unfused optimiser, asked in turn; ms per step on the demo (a whole epoch) and on
the IEMOCAP-sized set (``--batches`` batches of 128), median of ``--rounds``, and both sides'
training loss (the same computation up to float rounding).
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

import numpy as np  # noqa: E402
from common import write_result  # noqa: E402

METHODS = ["baseline", "baseline-aug", "mmin", "if-mmin", "cm-arr", "emmr", "imder"]
# CM-ARR and IMDer read every modality resampled to one length (their configs' data.resample_to);
# they are timed on the same data, resampled for them.
IEMOCAP = {"n": 5531, "dims": {"a": 130, "v": 342, "t": 1024}, "train_share": 0.8, "val_share": 0.1,
           # frames per second of utterance (ComParE ~120, Denseface ~12, word pieces ~5.5 + [CLS]/[SEP])
           "per_second": {"a": 120.0, "v": 12.0, "t": 5.5}, "offset": {"a": 0, "v": 0, "t": 3},
           # utterance durations: lognormal, median 3.7 s (IEMOCAP's spread, 0.6-30 s)
           "duration": {"log_median": 1.3, "log_sigma": 0.6, "min": 0.6, "max": 30.0}}
# the shapes of EMMR's features on IEMOCAP (SPEC.md §2); its config's fixed lengths cut them to 150 / 100 / 25
FEATURE_DIMS = {"emmr": {"a": 33, "v": 709, "t": 768}}
VARIANTS = {"before": {"bucket": False, "share": False},  # random batches, one forward per condition
            "after": {"bucket": True, "share": True}}     # length-bucketed batches, encoders shared


def build(name: str, dataset: str, data, device: str):
    """The method with its config for ``dataset``; prerequisites (random weights) attached."""
    import torch

    from train.config import load_config
    from train.methods import build as build_method

    cfg = load_config(name, dataset)
    torch.manual_seed(0)
    m = build_method(cfg, data.spec)
    if cfg.get("requires"):
        m.attach({role: build_method(load_config(req, dataset), data.spec) for role, req in cfg["requires"].items()})
    return m.to(device), cfg


def step_flops(trainer, batch) -> int:
    """FLOPs of one training step (loss + backward) on ``batch``."""
    from flops import counter

    from train.conditions import apply_availability
    from train.data import batch_to
    from train.protocols import draw

    b = batch_to(apply_availability(batch, draw(trainer.tcfg.get("missing"), len(batch["y"]),
                                                 np.random.default_rng(0), batch["natural"].numpy())), trainer.device)
    b["phase"] = "train"
    with counter() as fc:
        loss, _ = trainer.method.loss(b)
        loss.backward()
    trainer.method.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def time_variant(name, dataset, data, tr, va, device, max_batches, variant: str, out_dir) -> dict:
    """Train ``max_batches`` (None = an epoch) after one warm-up batch, then validate, through the
    trainer itself; training FLOPs counted on one batch."""
    import copy

    import torch

    from train.data import Normalizer
    from train.trainer import Trainer

    method, cfg = build(name, dataset, data, device)
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("data", {})["bucket"] = VARIANTS[variant]["bucket"]
    norm = Normalizer.fit(data, tr, cfg["data"].get("normalize", []))
    trainer = Trainer(method, data, tr, va, cfg, out_dir, device=device, normalizer=norm, progress=False)
    bs = int(cfg["train"]["batch_size"])
    opt, _, scaler, params = trainer.optimisation()
    trainer.train_epoch(0, opt, scaler, params, bs, max_batches=1)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    rec = trainer.train_epoch(1, opt, scaler, params, bs, max_batches=max_batches)
    val = trainer.validate(bs, share=VARIANTS[variant]["share"])
    sync()
    # the batches train_epoch(1) drew: the trainer's generator for (seed 0, epoch 1)
    rows = data.batch_rows(tr, bs, np.random.default_rng([0, 1]), bool(cfg["train"].get("drop_last")),
                           VARIANTS[variant]["bucket"])[:max_batches]
    flops = step_flops(trainer, data.collate(rows[0], norm))
    n_cond = len(trainer.select_columns)
    phases = {**{k: v / rec["train_time_s"] for k, v in rec["phases_s"].items()},
              "validation_s": val["val_time_s"]}
    return {"train_samples_per_s": rec["samples_per_s"], "val_time_s": val["val_time_s"], "phases": phases,
            "train_s_per_element": rec["train_time_s"] / data.padding_fraction(rows)["elements"],
            "val_condition_samples_per_s": len(va) * n_cond / val["val_time_s"], "n_cond": n_cond,
            "flops_per_sample": flops / len(rows[0]), "batch_size": bs,
            "padding": data.padding_fraction(rows), "epochs_in_config": _epochs(cfg)}


def figures(name, dataset, data, train_idx, val_idx, device, max_batches, n_train, n_val, limit,
            full=None, rounds: int = 1) -> dict:
    """``full`` (extrapolated sets): the lengths of the whole corpus (dims 1); the training time is
    then seconds per padded element x the padded elements of a whole epoch, since an encoder's
    cost grows with the padded batch, not with the real frames."""
    import tempfile

    from train.config import load_config

    kept = data.resample_to
    data.resample_to = load_config(name, dataset).get("data", {}).get("resample_to") or kept  # its data view
    out, epoch = {}, {}
    if full is not None:
        full.resample_to, full.max_len, full.fixed_len = data.resample_to, data.max_len, data.fixed_len
        everything = np.arange(n_train)
        for v in VARIANTS:
            bs = int(load_config(name, dataset)["train"]["batch_size"])
            rows = full.batch_rows(everything, bs, np.random.default_rng(0), bucket=VARIANTS[v]["bucket"])
            epoch[v] = full.padding_fraction(rows, dims=data.spec.dims)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {v: [] for v in VARIANTS}
            for _ in range(rounds):  # interleaved: before, after, before, after, ...
                for v in VARIANTS:
                    runs[v].append(time_variant(name, dataset, data, train_idx, val_idx, device, max_batches, v, tmp))
            for v, fs in runs.items():
                def epoch_s(f, v=v):
                    train_s = f["train_s_per_element"] * epoch[v]["elements"] if epoch else n_train / f["train_samples_per_s"]
                    return train_s + n_val * f["n_cond"] / f["val_condition_samples_per_s"]

                per_round = [epoch_s(f) for f in fs]
                f = fs[int(np.argsort(per_round)[len(fs) // 2])]  # the median round
                if epoch:
                    f["padding"] = epoch[v]  # the whole epoch's, not the few timed batches'
                achieved = f["flops_per_sample"] * f["train_samples_per_s"]
                out[v] = {"epoch_s": round(epoch_s(f), 2), "epoch_s_rounds": [round(x, 2) for x in per_round],
                          "train_samples_per_s": round(f["train_samples_per_s"], 1),
                          "val_condition_samples_per_s": round(f["val_condition_samples_per_s"], 1),
                          "train_padding": {k: round(x, 3) for k, x in f["padding"].items() if k != "elements"},
                          "train_gflop_per_s": round(achieved / 1e9, 3),
                          "train_time_shares": {k: round(x, 3) for k, x in f["phases"].items() if k != "validation_s"},
                          "share_of_matmul_limit": round(achieved / limit["flop_per_s"], 4)}
                out.update(batch_size=f["batch_size"], val_conditions=f["n_cond"], rounds=rounds,
                           train_gflop_per_sample=round(f["flops_per_sample"] / 1e9, 4), epochs_in_config=f["epochs_in_config"])
    finally:
        data.resample_to = kept
    out["speedup"] = round(out["before"]["epoch_s"] / out["after"]["epoch_s"], 2)
    out.update(train_utterances_per_epoch=n_train, val_utterances=n_val)
    return out


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


def iemocap_like(n: int, dims: dict, seed: int = 0, lengths_only: bool = False):
    """Random features with IEMOCAP's MMIN shapes; every modality's length follows one drawn
    utterance duration, as in the corpus (so batches mix short and long utterances)."""
    from train.data import MultimodalData

    rng = np.random.default_rng(seed)
    d = IEMOCAP["duration"]
    dur = np.clip(np.exp(rng.normal(d["log_median"], d["log_sigma"], n)), d["min"], d["max"])
    y = rng.integers(0, 4, n)
    seqs = {}
    for m in "avt":
        ln = np.maximum(1, np.round(dur * IEMOCAP["per_second"][m] + IEMOCAP["offset"][m]).astype(int))
        dim = 1 if lengths_only else dims[m]
        seqs[m] = [rng.normal(size=(k, dim)).astype(np.float32) + 0.3 * y[i] for i, k in enumerate(ln)]
    return MultimodalData.from_arrays([f"u{i:05d}" for i in range(n)], y, seqs, labels=["neu", "hap", "ang", "sad"])


def iemocap_synthetic(batches: int, device: str, methods, limit: dict) -> dict:
    n_train = int(IEMOCAP["n"] * IEMOCAP["train_share"])
    n_val = int(IEMOCAP["n"] * IEMOCAP["val_share"])
    # only the utterances the timed batches read are generated (1 warm-up + ``batches`` of 128)
    n_gen = 128 * (batches + 1) + 256 * batches
    tr, va = np.arange(128 * (batches + 1)), np.arange(128 * (batches + 1), n_gen)
    full = iemocap_like(IEMOCAP["n"], IEMOCAP["dims"], lengths_only=True)  # the padding of a whole epoch
    out = {"extrapolated": True, "timed_batches": batches,
           "note": f"{batches} training batches (after one warm-up) and {len(va)} validation utterances timed; "
                   f"epoch_s = seconds per padded training element x the padded elements of a {n_train}-utterance "
                   f"epoch (batch 128) + {n_val} val utterances x selection conditions / val condition-samples/s",
           "shape": {k: IEMOCAP[k] for k in ("n", "dims", "per_second", "duration")}}

    sets = {}
    for name in methods:
        dims = FEATURE_DIMS.get(name, IEMOCAP["dims"])
        key = tuple(sorted(dims.items()))
        if key not in sets:
            sets[key] = iemocap_like(n_gen, dims)
        d = _with_lengths(sets[key], name, "iemocap")
        out[name] = figures(name, "iemocap", d, tr, va, device, batches, n_train, n_val, limit, full)
        out[name]["dims"] = d.spec.dims
        _print("iemocap-synthetic", name, out[name])
    return out


def _print(where: str, name: str, f: dict) -> None:
    b, a = f["before"], f["after"]
    print(f"  {where} {name}: {b['epoch_s']} -> {a['epoch_s']} s/epoch (x{f['speedup']}), padding "
          f"{b['train_padding']['all']:.0%} -> {a['train_padding']['all']:.0%}, "
          f"{a['train_gflop_per_s']} GFLOP/s = {a['share_of_matmul_limit']:.1%} of the matmul limit", flush=True)


def demo(device: str, methods, limit: dict, rounds: int = 3) -> dict:
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
           "note": "one full epoch per round timed (after one warm-up batch) on fold 1 of the demo corpus; "
                   "before and after interleaved, the median of the rounds"}
    own = {}  # methods reading other features than MMIN's (EMMR): their own data module
    for name in methods:
        c = load_config(name, "demo")
        d = data
        if (c["features"], c.get("data", {}).get("max_len")) != (cfg["features"], cfg.get("data", {}).get("max_len")):
            key = repr((c["features"], c.get("data")))
            if key not in own:
                own[key] = build_data(man, ensure_stores("demo", c, device), c)
            d = own[key]
        out[name] = figures(name, "demo", d, d.indices(fold.train), d.indices(fold.val), device, None, len(tr), len(va),
                            limit, rounds=rounds)
        out[name]["dims"] = d.spec.dims
        _print("demo", name, out[name])
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
    ap.add_argument("--batches", type=int, default=2, help="timed batches on the IEMOCAP-sized set (default 2; 0 skips it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="demo: interleaved before/after epochs per method (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1, as imer train)")
    ap.add_argument("--skip-demo", action="store_true", help="only the synthetic IEMOCAP-sized set")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated configs to time (default all); others' earlier figures are kept")
    ap.add_argument("--steps", action="store_true", help="only the training step, before vs after (bench/train_step.py)")
    ap.add_argument("--before", default=None, help="--steps: a checkout of the earlier code (default: this code, unfused optimiser)")
    args, _ = ap.parse_known_args()
    if args.steps:
        from train_step import compare

        methods = [m for m in args.methods.split(",") if m]
        datasets = (["demo"] if not args.skip_demo else []) + (["iemocap-synthetic"] if args.batches > 0 else [])
        t = time.perf_counter()
        res = compare(methods, datasets, args.rounds, max(args.batches, 1), args.before)
        res.update(torch_threads=1, cpu_count=os.cpu_count(), load_avg_1min_end=round(os.getloadavg()[0], 2),
                   bench_s=round(time.perf_counter() - t, 1), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        earlier = _earlier("step")  # a run timing some methods keeps the others' figures
        res.update({ds: {**earlier.get(ds, {}), **res[ds]} for ds in datasets})
        write_result("train", {"step": {**earlier, **res}})
        return

    import torch

    from pipeline.device import resolve_device

    from train.run import cpu_threads

    device = resolve_device(args.device)
    with cpu_threads(device, args.threads):  # what `imer train` uses: 1 thread on CPU unless told
        from flops import matmul_limit

        limit = matmul_limit(device)
        print(f"  practical limit: {limit['n']}x{limit['n']} {limit['dtype']} matmul, "
              f"{limit['flop_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
        res = {"device": device, "torch_threads": torch.get_num_threads(), "amp": device.startswith("cuda"),
               "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
               "matmul_limit": {**limit, "gflop_per_s": round(limit["flop_per_s"] / 1e9, 2)},
               "variants": {"before": "random batches; validation: one forward per condition",
                            "after": "length-bucketed batches (data.bucket); validation: per-modality encoders "
                                     "run twice per batch, conditions assembled (methods with encode_each)"}}
        t = time.perf_counter()
        methods = [m for m in args.methods.split(",") if m]
        if args.batches > 0:
            res["iemocap-synthetic"] = {**_earlier("iemocap-synthetic"),
                                        **iemocap_synthetic(args.batches, device, methods, limit), **_context(device)}
        if not args.skip_demo:
            res["demo"] = {**_earlier("demo"), **demo(device, methods, limit, args.rounds), **_context(device)}
        res["bench_s"] = round(time.perf_counter() - t, 1)
        res["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    write_result("train", res)


if __name__ == "__main__":
    main()
