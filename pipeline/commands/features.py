"""Extract frame-level features of a dataset into the shared feature stores.

Only utterances missing from a store (or whose source file changed) are computed; a rerun with
nothing new loads no model. Examples:

  imer features --dataset demo
  imer features --dataset demo --extractors logmel,logmel:n_mels=64,hop_ms=20
  imer features --dataset iemocap --data-root /data/IEMOCAP_full_release --workers 4
  imer features --dataset iemocap --scheduler tcp://head:8786
"""

from __future__ import annotations

import sys
import time

from extract.base import ExtractorUnavailable


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (a recipe in manifests/, e.g. demo, iemocap)")
    p.add_argument("--extractors", metavar="SPEC",
                   help="comma-separated extractor names, each optionally name:key=value,key=value "
                        "(default: every extractor marked default; unavailable ones are skipped)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--workers", type=int, default=1, help="parallel dask workers on this machine (default 1: in-process)")
    p.add_argument("--threads", action="store_true", help="dask workers as threads of this process, not processes")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="dask.distributed scheduler address (tcp://host:8786); workers need imer and the media paths")
    p.add_argument("--data-root", help="raw corpus directory (builds the manifest)")
    p.add_argument("--manifest", help="use this manifest.jsonl instead of the cached/built one")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored dtype (default float32)")
    p.add_argument("--retry-failed", action="store_true", help="retry utterances that failed before (same source)")
    p.add_argument("--repair", action="store_true",
                   help="recompute the utterances a damaged store lost (else a damaged store is an error)")
    from pipeline.commands.manifest import add_own_options

    add_own_options(p)
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any utterance failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    from manifests.datasets import load_manifest
    from manifests.schema import ManifestError
    from pipeline.device import resolve_device
    from pipeline.runner import StrictFailure, default_extractors, make_extractor, parse_specs, run_features
    from pipeline.store import StoreError

    t0 = time.perf_counter()
    if args.workers < 1:
        print("imer features: --workers must be >= 1", file=sys.stderr)
        return 2
    from manifests.datasets import feature_map

    if feature_map(args.dataset) and not (args.data_root or args.manifest):
        print(f"imer features: dataset {args.dataset!r} holds imported features (imer import-features) "
              "and no media to extract from; train on it directly (imer train --dataset "
              f"{args.dataset} ...) or pass --data-root/--manifest of the raw corpus", file=sys.stderr)
        return 2
    try:
        from pipeline.commands.manifest import own_options

        man = load_manifest(args.dataset, args.data_root, args.manifest, **own_options(args))
        man.dataset = args.dataset
        # 'auto' resolves (importing torch) only once a stage has work, and 'cpu' needs no check:
        # a no-op rerun stays fast
        device = args.device.lower()
        device = device if device in ("auto", "cpu") else resolve_device(device)
        if args.extractors:
            exts = [make_extractor(s, device) for s in parse_specs(args.extractors)]
        else:
            exts = default_extractors(device)
            if not exts:
                print("imer features: no extractor is marked default; pass --extractors NAME", file=sys.stderr)
                return 2
        summaries = run_features(man, exts, workers=args.workers, scheduler=args.scheduler, strict=args.strict,
                                 progress=not args.no_progress, required=bool(args.extractors),
                                 retry_failed=args.retry_failed, processes=not args.threads, dtype=args.dtype,
                                 repair=args.repair)
        status = 0
    except StrictFailure as e:
        summaries, status = e.summaries, 1
    except ExtractorUnavailable as e:
        print(f"imer features: {e}", file=sys.stderr)
        return 2
    except (ManifestError, StoreError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"imer features: {msg}", file=sys.stderr)
        return 2
    for s in summaries:
        print(s.line())
    tot = {k: sum(getattr(s, k) for s in summaries) for k in ("computed", "cached")}
    failed = sum(len(s.all_failed) for s in summaries)
    skipped = sum(1 for s in summaries if s.skipped)
    print(f"{len(man)} utterances, {len(summaries)} stage(s): computed {tot['computed']}, cached {tot['cached']}, "
          f"failed {failed}" + (f", {skipped} stage(s) skipped" if skipped else "")
          + f"; {time.perf_counter() - t0:.1f} s")
    if status:
        print(f"imer features: {failed} utterance(s) failed (--strict)", file=sys.stderr)
    return status
