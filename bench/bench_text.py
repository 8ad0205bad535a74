"""Text extraction speed: sentences/s and word pieces/s, batched (extract() on batch_size
sentences: length-sorted padded forward passes, on CPU cut into buckets padded by at most
cpu_max_padding) vs one sentence per forward pass, on the same sentences, for the
offline default `minilm-l6` (6 layers, 384 dims, real weights) and for `bert` on a model of
bert-base's shape (12 layers, 768 dims) with random weights built here (speed only; minilm's
tokenizer, which is bert-base-uncased's vocabulary). The two modes take turns on every
batch_size sentences within each round (order reversed every other turn); each keeps its fastest
round, and the median of the per-round ratios is given too.

    .venv/bin/python bench/bench_text.py [--n 128] [--rounds 3] [--device auto] [--threads N] [--sizes minilm-l6,bert-base]
Writes bench/results/text.json.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

VOCAB = ("i really do not know what you want from me today , but the weather was lovely and we walked "
         "to the station together before the train left ! honestly it is unbelievable how angry she got "
         "about nothing . are you serious ? that sounds wonderful , thank you so much").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Utterance-like transcripts of 3 to 40 words (IEMOCAP utterances are mostly 5-30 words)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def bert_base_shaped(tmp: Path, tokenizer_dir: Path) -> Path:
    """A BertModel of bert-base's shape with random weights, next to a copy of minilm's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    d = tmp / "bert-base-shaped"
    d.mkdir()
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, d / f.name)
    torch.manual_seed(0)
    BertModel(BertConfig()).eval().save_pretrained(d)  # BertConfig's defaults are bert-base's shape
    return d


def bench(ex, utts, rounds: int) -> dict:
    import numpy as np

    t = time.perf_counter()
    ex.ensure_loaded()
    load_s = time.perf_counter() - t
    pieces = sum(len(ex.tokenizer(u.text)["input_ids"]) for u in utts)
    runs = {"batched": lambda group: ex.extract(group),
            "one_by_one": lambda group: [ex.extract([u])[0] for u in group]}
    ex.extract(utts[:8])  # warm-up: first forward pass allocates
    step = ex.batch_size
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs: dict[str, list] = {k: [] for k in runs}
    for r in range(rounds):
        total = dict.fromkeys(runs, 0.0)
        for g, s in enumerate(range(0, len(utts), step)):
            for name in list(runs) if (r + g) % 2 == 0 else list(runs)[::-1]:
                t = time.perf_counter()
                o = runs[name](utts[s:s + step])
                total[name] += time.perf_counter() - t
                if r == 0:
                    outs[name] += o
        for name in runs:
            times[name].append(total[name])
    best = {k: min(v) for k, v in times.items()}
    diff = max(float(np.abs(a.features - b.features).max()) for a, b in zip(outs["batched"], outs["one_by_one"]))
    print(f"{ex.name} {ex.dim}-d: batched {best['batched']:.2f} s, one by one {best['one_by_one']:.2f} s; "
          f"ratio {best['one_by_one'] / best['batched']:.2f}", flush=True)
    return {"dim": ex.dim, "load_s": round(load_s, 2), "sentences": len(utts),
            "mean_pieces_per_sentence": round(pieces / len(utts), 1), "batch_size": step,
            **{name: {"seconds": round(best[name], 2), "sentences_per_s": round(len(utts) / best[name], 1),
                      "tokens_per_s": round(pieces / best[name])} for name in runs},
            "ratio_batched_vs_one_by_one": round(best["one_by_one"] / best["batched"], 2),
            "ratio_median_of_rounds": round(statistics.median(o / b for o, b in zip(times["one_by_one"], times["batched"])), 2),
            "max_abs_diff_batched_vs_one_by_one": float(f"{diff:.2e}"),
            "rounds": rounds, "seconds_per_round": {k: [round(x, 2) for x in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128, help="sentences, extracted both ways")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's, as the extractors)")
    ap.add_argument("--sizes", default="minilm-l6,bert-base")
    args = ap.parse_args()

    import torch

    from extract.base import create
    from manifests.schema import Utterance
    from pipeline.device import resolve_device, torch_threads

    device = resolve_device(args.device)
    utts = [Utterance(id=str(i), text=s) for i, s in enumerate(sentences(args.n))]
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="imer-bench-text-") as tmp, torch_threads(device, args.threads):
        figures["_run"] = {"device": device, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                           "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
        minilm = create("minilm-l6", device=device)
        sizes = args.sizes.split(",")
        if "minilm-l6" in sizes:
            figures["minilm-l6"] = bench(minilm, utts, args.rounds)
        if "bert-base" in sizes:
            model = bert_base_shaped(Path(tmp), minilm._resolve()[0])
            figures["bert-base-shaped"] = {"model": "locally built BertModel (bert-base's shape), random weights",
                                           **bench(create("bert", device=device, model=str(model)), utts, args.rounds)}
        figures["_run"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    write_result("text", figures)


if __name__ == "__main__":
    main()
