"""Audio extraction speed on the demo corpus: utterances/s and audio-seconds/s per extractor, and
the `wav2vec2` extractor vs a naive per-utterance loop over the same model, at two model sizes.

    .venv/bin/python bench/bench_audio.py [--n 24] [--rounds 3] [--device auto] [--threads N] [--sizes small,base]

No pretrained wav2vec2 weights are reachable offline, so the wav2vec2 runs use models with random
weights built here (speed, not feature quality, is measured), both with wav2vec2-base's conv
stack and strides (50 frames/s): `small` (4 layers of 256 dims, 128 conv channels) and `base`
(wav2vec2-base's shape: 12 layers of 768 dims, 512 conv channels). Rows per size: the extractor as
it runs on this device (on CPU one chunk per forward), the naive loop, and on CPU also the
extractor forced into the GPU's padded buckets (what it did on CPU before; first round only).
The runs take turns on every extract() call's worth of utterances within each round; each keeps
its fastest round (compared with the naive loop's fastest of the same rounds), and the median of
the per-round ratios is given too. Writes bench/results/audio.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

W2V2_SIZES = {  # Wav2Vec2Config overrides; both keep wav2vec2-base's group-norm conv stack and strides
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  conv_dim=(128,) * 7, feat_extract_norm="group"),
    "base": dict(feat_extract_norm="group"),  # the config defaults are wav2vec2-base's shape
}


def rate(n: int, audio_s: float, seconds: float) -> dict:
    return {"seconds": round(seconds, 2), "utterances_per_s": round(n / seconds, 1),
            "audio_seconds_per_s": round(audio_s / seconds, 1)}


def timed_extract(ext, utts) -> tuple[float, list]:
    out = []
    t = time.perf_counter()
    for s in range(0, len(utts), ext.batch_size):
        out += ext.extract(utts[s:s + ext.batch_size])
    return time.perf_counter() - t, out


class NaiveWav2Vec2:
    """What one writes without batching: the HF model and processor, one utterance per forward."""

    def __init__(self, model_dir: str, device: str):
        from transformers import AutoModel, Wav2Vec2FeatureExtractor

        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.fe = Wav2Vec2FeatureExtractor()
        self.device = device

    def extract(self, utts) -> list:
        import torch

        from extract.audio_io import load_audio

        out = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.device.startswith("cuda")):
            for u in utts:
                x = self.fe(load_audio(u.audio), sampling_rate=16000, return_tensors="pt")["input_values"].to(self.device)
                out.append(self.model(x).last_hidden_state[0].float().cpu().numpy())
        return out


def bench_wav2vec2(size: str, utts, audio_s: float, device: str, rounds: int) -> dict:
    import numpy as np
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from extract.base import Output, create

    with tempfile.TemporaryDirectory(prefix="imer-bench-w2v2-") as tmp:
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config(**W2V2_SIZES[size])).eval().save_pretrained(tmp)
        config = Wav2Vec2Config.from_pretrained(tmp)
        runs = {"batched": create("wav2vec2", device=device, model=tmp)}
        if device == "cpu":  # the padded buckets the GPU uses, forced here: what batching costs on CPU
            runs["padded_buckets"] = create("wav2vec2", device=device, model=tmp)
            runs["padded_buckets"].cpu_batch = None
        runs["naive"] = NaiveWav2Vec2(tmp, device)
        for run in runs.values():
            run.extract(utts[:2])  # warm-up
        # Other processes share the machine, so the runs take turns on each extract() call's worth of
        # utterances (order reversed every other turn) and each keeps its fastest round.
        step = runs["batched"].batch_size
        groups = [utts[s:s + step] for s in range(0, len(utts), step)]
        names = list(runs)
        times: dict[str, list[float]] = {name: [] for name in names}
        outs: dict[str, list] = {name: [] for name in names}
        for r in range(rounds):
            now = [n for n in names if r == 0 or n != "padded_buckets"]  # its gap is far beyond the noise
            total = dict.fromkeys(now, 0.0)
            for g, group in enumerate(groups):
                for name in now if (r + g) % 2 == 0 else now[::-1]:
                    t = time.perf_counter()
                    o = runs[name].extract(group)
                    total[name] += time.perf_counter() - t
                    if r == 0:
                        outs[name] += [x.features if isinstance(x, Output) else x for x in o]
            for name in now:
                times[name].append(total[name])
        best = {name: min(t) for name, t in times.items()}
    res = {"model": "locally built Wav2Vec2Model, random weights (no pretrained weights reachable offline): "
                    f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, ffn {config.intermediate_size}, "
                    f"conv channels {config.conv_dim[0]}",
           "dim": config.hidden_size, "fp16": device.startswith("cuda"),
           "cpu_batch": runs["batched"].cpu_batch if device == "cpu" else None}
    for name in names[:-1]:
        diff = max(float(np.abs(o - r).max()) for o, r in zip(outs[name], outs["naive"]))
        per_round = [n / b for n, b in zip(times["naive"], times[name])]
        naive_best = min(times["naive"][:len(times[name])])  # over the rounds this run took part in
        res[name] = {**rate(len(utts), audio_s, best[name]), "ratio_vs_naive": round(naive_best / best[name], 2),
                     "ratio_vs_naive_median_of_rounds": round(statistics.median(per_round), 2),
                     "max_abs_diff_vs_naive": float(f"{diff:.2e}")}
    res["naive_per_utterance"] = rate(len(utts), audio_s, best["naive"])
    res["rounds"] = rounds
    res["timing"] = (f"fastest of the rounds; in each, the runs take turns on every {step} utterances "
                     "(one extract() call), order reversed every other turn")
    res["seconds_per_round"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
    print(f"wav2vec2 {size}: " + ", ".join(f"{k} {best[k]:.2f} s" for k in best)
          + f"; batched/naive speed ratio {best['naive'] / best['batched']:.2f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="demo utterances to extract")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="wav2vec2: alternating batched/naive rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's, as the extractors)")
    ap.add_argument("--sizes", default="small,base", help=f"wav2vec2 model sizes, of {','.join(W2V2_SIZES)}")
    args = ap.parse_args()

    import torch

    from extract.audio_io import audio_duration
    from extract.base import Output, create
    from manifests import demo
    from manifests.schema import read_manifest
    from pipeline.device import resolve_device, torch_threads

    device = resolve_device(args.device)
    corpus = demo.default_corpus_dir()
    demo.generate(corpus, seed=0, size="small")
    utts = read_manifest(corpus / "manifest.jsonl").utterances[: args.n]
    audio_s = sum(audio_duration(u.audio) for u in utts)
    with torch_threads(device, args.threads):
        figures: dict = {"corpus": f"demo small, first {len(utts)} utterances, {audio_s:.1f} s of audio",
                         "device": device, "torch_threads": torch.get_num_threads(),
                         "load_average_1min_at_start": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        for name in ("compare", "egemaps", "librosa"):
            ext = create(name, device=device)
            ext.extract(utts[:1])  # warm-up: library start-up (librosa's numba compile) is not throughput
            dt, out = timed_extract(ext, utts)
            assert all(isinstance(o, Output) for o in out), [o for o in out if not isinstance(o, Output)][:1]
            figures[name] = {"dim": ext.dim, **rate(len(utts), audio_s, dt)}
        t = time.perf_counter()
        figures["wav2vec2"] = {size: bench_wav2vec2(size, utts, audio_s, device, args.rounds)
                               for size in args.sizes.split(",")}
        figures["wav2vec2"]["wall_s"] = round(time.perf_counter() - t, 1)
        figures["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    write_result("audio", figures)


if __name__ == "__main__":
    main()
