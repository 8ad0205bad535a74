"""Compare every method under identical features, folds, seeds and missing-modality protocols.

Trains (or reuses) each listed method and its prerequisites on every fold x seed, as tasks on
dask.distributed (a LocalCluster of --workers processes, or --scheduler tcp://host:8786 whose
workers have imer and the stores' path), evaluates each under the fixed conditions, missing rate
0 ... 0.7 and missing ratio 0 ... 0.5, and writes results/<dataset>/compare/<id>/report.md with
tables, paired Wilcoxon tests, curves and confusion matrices. A killed comparison resumes.

  imer compare --dataset demo
  imer compare --dataset demo --methods baseline,baseline-aug,mmin --workers 2 --seeds 0,1,2
  imer compare --dataset iemocap --data-root /data/IEMOCAP_full_release --features mmin
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--methods", help="comma-separated method configs (default: the seven methods that exist)")
    p.add_argument("--features", help="named feature set of train/feature_sets.yaml, applied to every method "
                                      "and its prerequisites (default: each config's features for the dataset)")
    p.add_argument("--folds", help="fold names or 1-based positions (default: all)")
    p.add_argument("--seeds", help="seeds, comma-separated (default: train/compare.yaml's for the dataset, "
                                   "e.g. 0-9 on the demo, else the first method's config)")
    p.add_argument("--workers", type=int, default=None,
                   help="LocalCluster worker processes (default: the CPU cores, at most 4; 1 with --device cuda)")
    p.add_argument("--scheduler", help="address of a running dask scheduler instead of a LocalCluster")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu: one job per worker)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[CONFIG:]KEY=VALUE",
                   help="override a config value for every method and prerequisite, e.g. train.batch_size=16; "
                        "CONFIG:KEY=VALUE for the config of that name only (baseline:model.init=kaiming), "
                        "wherever it trains (repeatable)")
    p.add_argument("--data-root", help="raw corpus directory")
    p.add_argument("--manifest", help="manifest file (own corpus)")
    p.add_argument("--results", help="results root (default $IMER_RESULTS or ./results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from pipeline.cluster import default_workers
    from train.compare import DEFAULT_METHODS, compare
    from train.config import ConfigError, check_overrides, list_configs, load_config, parse_override
    from train.data import DataError
    from train.protocols import ProtocolError
    from train.report import ReportError

    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        features = None
        if args.features:
            from train.config import feature_set

            features = feature_set(args.features)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        if overrides:  # a CONFIG: naming no config of the compared chains is refused, not ignored
            names = [m for m in methods or DEFAULT_METHODS if m in list_configs()]
            check_overrides([load_config(m, args.dataset) for m in names], overrides, plain_everywhere=True)
        out = compare(args.dataset, methods, features=features, overrides=overrides, folds=args.folds,
                      seeds=args.seeds, workers=args.workers or default_workers(args.device),
                      scheduler=args.scheduler, device=args.device,
                      results_dir=args.results, data_root=args.data_root, manifest=args.manifest,
                      progress=not args.no_progress, meta={"argv": sys.argv, "feature_set": args.features})
    except (ConfigError, DataError, ProtocolError, ReportError, ValueError, FileNotFoundError) as e:
        print(f"imer compare: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    return 0
