"""Text extraction speed with the offline default (minilm-l6): sentences/s and word pieces/s,
batched (length-sorted, padded forward passes) vs one sentence per forward pass.

    .venv/bin/python bench/bench_text.py [--n 256] [--device auto]
Writes bench/results/text.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
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


def timed(ex, utts, per_call: int) -> float:
    t = time.perf_counter()
    for s in range(0, len(utts), per_call):
        ex.extract(utts[s:s + per_call])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256, help="sentences for the batched run (one-by-one uses n/4)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from extract.base import create
    from manifests.schema import Utterance
    from pipeline.device import resolve_device

    device = resolve_device(args.device)
    ex = create("minilm-l6", device=device)
    t = time.perf_counter()
    ex.ensure_loaded()
    load_s = time.perf_counter() - t
    utts = [Utterance(id=str(i), text=s) for i, s in enumerate(sentences(args.n))]
    ex.extract(utts[:8])  # warm-up: first forward pass allocates
    pieces = [len(ex.tokenizer(u.text)["input_ids"]) for u in utts]

    batched_s = timed(ex, utts, ex.batch_size)
    few = utts[: max(1, args.n // 4)]
    single_s = timed(ex, few, 1)
    n_few, pieces_few = len(few), sum(pieces[: len(few)])
    figures = {"minilm-l6": {
        "device": device, "torch_threads": torch.get_num_threads(), "load_s": round(load_s, 2),
        "mean_pieces_per_sentence": round(sum(pieces) / len(pieces), 1),
        "batched": {"batch_size": ex.batch_size, "sentences": len(utts),
                    "sentences_per_s": round(len(utts) / batched_s, 1),
                    "tokens_per_s": round(sum(pieces) / batched_s)},
        "one_by_one": {"sentences": n_few, "sentences_per_s": round(n_few / single_s, 1),
                       "tokens_per_s": round(pieces_few / single_s)},
        "speedup_batched": round((len(utts) / batched_s) / (n_few / single_s), 2),
    }}
    write_result("text", figures)


if __name__ == "__main__":
    main()
