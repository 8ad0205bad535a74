"""Training on a store larger than the memory budget (issue 40 item 5) and the planning scan on it
(issue 42 item 5).

Builds, in a temp directory, stores shaped like wav2vec2-large on a MOSEI-like corpus (audio
1024-d at 50 frames/s, durations lognormal with median 6 s; video 35-d at 15/s; text 768-d at
3 tokens/s), synthetic features written through the store API until the audio store holds
``--gb`` GB. Then, on the same stores and the same rows:

- in memory: ``MultimodalData.from_stores`` with a budget the stores fit (the same store loaded);
- streamed: the same with ``--budget`` (default 1G), so the audio store is read per batch
  (train.streaming: reads in store order, one batch ahead in a background thread).

Both train the ``baseline`` method (its own config: batch 128, length-bucketed batches) through
``Trainer.train_epoch`` for ``--batches`` batches after one warm-up batch, ``--rounds`` times
interleaved; s/epoch is extrapolated from s/batch to the fold's training batches. Before each
streamed round the store's files are dropped from the page cache (``posix_fadvise DONTNEED``) so
the reads come from the disk (``--warm`` keeps them). The first streamed batches are checked
bit-identical to the in-memory ones. The planning scan (``FeatureStore.damaged_changed``) of the
audio store is timed against a full read (``damaged``).

    .venv/bin/python bench/bench_stream.py [--gb 4] [--budget 1G] [--batches 6] [--rounds 2]
                                           [--dtype float32|float16] [--dir /tmp] [--keep]
Writes bench/results/stream.json (section "stream-<dtype>").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import write_result  # noqa: E402

SHAPES = {"audio": (1024, 50.0), "video": (35, 15.0), "text": (768, 3.0)}  # dim, frames per second


def build_stores(root: Path, gb: float, dtype: str, seed: int = 0):
    """Stores of synthetic features; returns ({modality: FeatureStore}, ids, seconds to write)."""
    from extract.base import Output
    from pipeline.store import FeatureStore

    rng = np.random.default_rng(seed)
    per_s = SHAPES["audio"][0] * SHAPES["audio"][1] * np.dtype(dtype).itemsize
    durations = []
    while sum(durations) * per_s < gb * 1e9:
        durations.append(float(np.clip(np.exp(rng.normal(np.log(6.0), 0.5)), 1.0, 30.0)))
    ids = [f"u{i:05d}" for i in range(len(durations))]
    t0 = time.perf_counter()
    stores = {}
    for mod, (dim, rate) in SHAPES.items():
        st = FeatureStore.open_or_create(root / mod, dim=dim, dtype=dtype,
                                         attrs={"key": f"bench-{mod}", "modality": mod, "dataset": "bench-stream"})
        for s in range(0, len(ids), 64):
            batch = {}
            for u, d in zip(ids[s:s + 64], durations[s:s + 64]):
                n = max(1, int(d * rate))
                batch[u] = (Output(rng.standard_normal((n, dim), dtype=np.float32)), "fp")
            st.commit(batch)
        stores[mod] = st
    return stores, ids, time.perf_counter() - t0


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of every file under ``path`` (reads then hit the disk)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def planning_scan(path: Path) -> dict:
    from pipeline.store import FeatureStore

    out = {}
    for k in range(3):  # the first may re-read the chunks of the last commit (written < 2 s before the record)
        t = time.perf_counter()
        st = FeatureStore.open(path)
        assert st.damaged_changed() == {}
        out[f"noop_scan_s_{k + 1}"] = round(time.perf_counter() - t, 4)
        time.sleep(1.0 if k == 0 else 0)
    t = time.perf_counter()
    assert FeatureStore.open(path).damaged() == {}
    out["full_read_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    assert FeatureStore.open(path).damaged_changed() == {}
    out["noop_scan_after_full_read_s"] = round(time.perf_counter() - t, 4)
    return out


def make_trainer(data, tr, va, out_dir):
    import torch

    from train.config import load_config
    from train.data import Normalizer
    from train.methods import build as build_method
    from train.trainer import Trainer

    cfg = load_config("baseline", "bench-stream")
    torch.manual_seed(0)
    method = build_method(cfg, data.spec)
    t = time.perf_counter()
    norm = Normalizer.fit(data, tr, cfg["data"].get("normalize", []))
    fit_s = time.perf_counter() - t
    trainer = Trainer(method, data, tr, va, cfg, out_dir, device="cpu", normalizer=norm, progress=False)
    return trainer, int(cfg["train"]["batch_size"]), fit_s, cfg


def time_epoch(data, tr, va, out_dir, batches: int) -> dict:
    trainer, bs, fit_s, cfg = make_trainer(data, tr, va, out_dir)
    opt, _, scaler, params = trainer.optimisation()
    trainer.train_epoch(0, opt, scaler, params, bs, max_batches=1)  # warm-up
    rec = trainer.train_epoch(1, opt, scaler, params, bs, max_batches=batches)
    n_batches = len(data.batch_rows(tr, bs, np.random.default_rng(0), bool(cfg["train"].get("drop_last")), True))
    per_batch = rec["train_time_s"] / batches
    return {"s_per_batch": round(per_batch, 3), "s_per_epoch": round(per_batch * n_batches, 1),
            "batches_per_epoch": n_batches, "collate_s_per_batch": round(rec["phases_s"]["collate"] / batches, 3),
            "normalizer_fit_s": round(fit_s, 2)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=4.0, help="size of the audio store (GB)")
    ap.add_argument("--budget", default="1G", help="memory budget of the streamed run (data.memory_budget)")
    ap.add_argument("--batches", type=int, default=6, help="training batches timed per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--dir", default=None, help="where the temp stores go (default: the system temp dir)")
    ap.add_argument("--warm", action="store_true", help="leave the store in the page cache before streamed rounds")
    ap.add_argument("--keep", action="store_true", help="keep the stores (their path is printed)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from manifests.schema import Manifest, Utterance
    from train.data import MultimodalData
    from train.streaming import StreamedSequences, parse_bytes

    root = Path(tempfile.mkdtemp(prefix="imer-bench-stream-", dir=args.dir))
    try:
        stores, ids, write_s = build_stores(root, args.gb, args.dtype)
        size = stores["audio"].size_bytes()
        print(f"built {len(ids)} utterances, audio store {size / 1e9:.2f} GB on disk in {write_s:.0f} s ({root})", flush=True)
        scan = planning_scan(root / "audio")
        print(f"planning scan: {scan}", flush=True)
        rng = np.random.default_rng(0)
        man = Manifest([Utterance(u, label="ab"[i % 2], label_index=i % 2) for i, u in enumerate(ids)],
                       dataset="bench-stream", labels=["a", "b"])
        perm = rng.permutation(len(ids))
        tr, va = np.sort(perm[: int(0.8 * len(ids))]), np.sort(perm[int(0.8 * len(ids)): int(0.9 * len(ids))])
        budget = parse_bytes(args.budget)
        r0 = rss_mb()
        streamed = MultimodalData.from_stores(man, stores, memory_budget=budget)
        assert isinstance(streamed.seqs["a"], StreamedSequences), "the audio store fits the budget: raise --gb"
        t = time.perf_counter()
        memory = MultimodalData.from_stores(man, stores, memory_budget=1 << 50)
        load_s = time.perf_counter() - t
        r1 = rss_mb()
        # the same batches both ways, bit for bit
        rows = streamed.batch_rows(tr, 128, np.random.default_rng(1), bucket=True)[:2]
        for r in rows:
            a, b = streamed.collate(r), memory.collate(r)
            assert all(np.array_equal(a["x"][m].numpy(), b["x"][m].numpy()) for m in "avt")
        runs: dict = {"memory": [], "streamed": []}
        with tempfile.TemporaryDirectory() as out:
            for k in range(args.rounds):
                for mode, data in (("memory", memory), ("streamed", streamed)):
                    if mode == "streamed" and not args.warm:
                        drop_page_cache(root)
                    f = time_epoch(data, tr, va, Path(out) / f"{mode}{k}", args.batches)
                    runs[mode].append(f)
                    print(f"round {k + 1} {mode}: {f}", flush=True)
        best = {m: min(r["s_per_epoch"] for r in v) for m, v in runs.items()}
        write_result("stream", {f"stream-{args.dtype}": {
            "command": "bench/bench_stream.py " + " ".join(sys.argv[1:]),
            "utterances": len(ids), "audio_store_gb_on_disk": round(size / 1e9, 2),
            "audio_frames": stores["audio"].n_frames, "dtype": args.dtype, "memory_budget": args.budget,
            "write_s": round(write_s, 1), "in_memory_load_s": round(load_s, 1),
            "in_memory_rss_growth_mb": round(r1 - r0), "page_cache": "warm" if args.warm else "dropped before each streamed round",
            "planning_scan": scan, "method": "baseline (batch 128, bucketed)", "threads": 1,
            "rounds": runs, "best_s_per_epoch": best,
            "streamed_over_memory": round(best["streamed"] / best["memory"], 3), "goal": "<= 1.5",
            "in_memory_is": "the same store loaded whole (from_stores with a budget it fits)",
            "extrapolated": f"s/epoch = s/batch over {args.batches} batches x batches per epoch"}})
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
