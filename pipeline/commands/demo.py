"""Run the main job end to end on the demo corpus: generate (cached), extract, train, report.

Each step is the code a real corpus goes through (`imer features`, `imer train`, `imer report`);
a rerun reuses the cached corpus, stores and finished runs.
"""

from __future__ import annotations

import sys
import time


def demo_methods() -> list[str]:
    """The configs marked ``report: {demo: true}``, in report order."""
    from train.config import catalog, report_order

    return report_order([n for n, c in catalog().items() if c["demo"]])


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--methods", help="comma-separated methods to train (default: every config marked "
                                     "'report: {demo: true}', in report order)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for extraction and for training the folds (default: the CPU cores, "
                        "at most 4, on CPU; 1 on a GPU)")


def main(args) -> int:
    from manifests.datasets import load_manifest
    from pipeline.cluster import Cluster, default_workers
    from pipeline.device import resolve_device
    from pipeline.runner import ensure_features
    from train.config import list_configs, load_config
    from train.report import report
    from train.run import train_method

    t0 = time.perf_counter()
    wanted = [m for m in args.methods.split(",") if m] if args.methods else demo_methods()
    unknown = [m for m in wanted if m not in list_configs()]
    if unknown:
        print(f"imer demo: unknown method(s) {', '.join(unknown)}; available: {', '.join(list_configs())}",
              file=sys.stderr)
        return 2

    device = resolve_device(args.device)
    workers = args.workers or default_workers(device)
    print("== 1/4 demo corpus (generated once, then cached)", flush=True)
    manifest = load_manifest("demo")
    print(f"   {len(manifest)} utterances, manifest {manifest.path}", flush=True)

    print("== 2/4 features", flush=True)
    specs = {}  # the union of the features the chosen methods read on the demo, extracted in one pass
    for m in wanted:
        for mod, spec in load_config(m, "demo")["features"].items():
            specs.setdefault(f"{mod}:{spec}", spec)
    for name, store in ensure_features("demo", specs, device=device, workers=workers).items():
        print(f"   {name.split(':')[0]}: {store.path}", flush=True)

    print(f"== 3/4 train and evaluate every missing-modality condition ({workers} worker process(es))", flush=True)
    with Cluster(workers) as cluster:
        for m in wanted:
            print(f"-- {m}", flush=True)
            train_method("demo", m, device=device, workers=workers, cluster=cluster)

    print("== 4/4 report", flush=True)
    print(report("demo"))
    print(f"== demo done in {time.perf_counter() - t0:.0f} s")
    return 0
