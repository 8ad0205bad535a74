"""Compare every method under identical features, folds, seeds and missing-modality protocols.

Trains (or reuses) each listed method and its prerequisites on every fold x seed, as tasks on
dask.distributed (a LocalCluster of --workers processes, or --scheduler tcp://host:8786 whose
workers have imer and the stores' path), evaluates each under the fixed conditions, missing rate
0 ... 0.7 and missing ratio 0 ... 0.5, and writes results/<dataset>/compare/<id>/report.md with
tables, paired Wilcoxon tests, curves and confusion matrices. A killed comparison resumes.

  imer compare --dataset demo
  imer compare --dataset demo --methods baseline,baseline-aug,mmin --workers 2 --seeds 0,1,2
  imer compare --dataset iemocap --data-root /data/IEMOCAP_full_release --features mmin
  imer compare --dataset demo --docs docs/comparison.md --block compare-demo --figures docs

--docs FILE pastes report.md between '<!-- report:BLOCK -->' and '<!-- /report -->' of a Markdown
file, with a provenance line (command, commit, CPU, threads, date, wall time); --figures DIR copies
its figures there as BLOCK-curves.png, BLOCK-tsne.png and BLOCK-confusion.png.
"""

from __future__ import annotations

import os
import shutil
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
                   help="LocalCluster worker processes (default: the CPU cores, at most 4; with --device cuda "
                        "one per GPU slot: GPUs x --jobs-per-gpu)")
    p.add_argument("--jobs-per-gpu", type=int, default=None, metavar="N",
                   help="with --device cuda: at most N jobs share one GPU; jobs spread over every visible GPU "
                        "(default: measured from the methods' memory, see train/job_memory.py)")
    p.add_argument("--scheduler", help="address of a running dask scheduler instead of a LocalCluster")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K (default cpu: one job per worker; "
                                                   "cuda: every visible GPU, cuda:K: the K-th only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[CONFIG:]KEY=VALUE",
                   help="override a config value for every method and prerequisite, e.g. train.batch_size=16; "
                        "CONFIG:KEY=VALUE for the config of that name only (baseline:model.init=kaiming), "
                        "wherever it trains (repeatable)")
    p.add_argument("--data-root", help="raw corpus directory")
    p.add_argument("--manifest", help="manifest file (own corpus)")
    p.add_argument("--results", help="results root (default $IMER_RESULTS or ./results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--docs", metavar="FILE", help="also paste the report into the block '<!-- report:BLOCK -->' "
                                                  "... '<!-- /report -->' of the Markdown file FILE, with its provenance")
    p.add_argument("--block", help="the block name for --docs (default: compare-DATASET)")
    p.add_argument("--figures", metavar="DIR", help="with --docs: copy the report's figures into DIR as BLOCK-<name>.png")


def _default_workers(device: str) -> int | None:
    """None on CUDA: a worker per GPU slot (train.compare.gpu_plan)."""
    from pipeline.cluster import default_workers

    return None if str(device).startswith("cuda") else default_workers(device)


def _check_gpu_options(args) -> str | None:
    if args.jobs_per_gpu is not None and args.jobs_per_gpu < 1:
        return f"--jobs-per-gpu must be at least 1, got {args.jobs_per_gpu}"
    if args.jobs_per_gpu is not None and not str(args.device).startswith("cuda"):
        return "--jobs-per-gpu places jobs on GPUs: add --device cuda (or cuda:K)"
    return None


def main(args) -> int:
    bad = _check_gpu_options(args)
    if bad:
        print(f"imer compare: {bad}", file=sys.stderr)
        return 2
    from train.compare import DEFAULT_METHODS, compare
    from train.config import ConfigError, check_overrides, list_configs, load_config, parse_override
    from train.data import DataError
    from train.protocols import ProtocolError
    from train.report import ReportError

    # what --docs / --figures need is checked before hours of training, not after
    if args.docs and not os.path.isfile(args.docs) or args.figures and not os.path.isdir(args.figures):
        what = f"--docs {args.docs}: no such Markdown file" if args.docs and not os.path.isfile(args.docs) \
            else f"--figures {args.figures}: no such directory"
        print(f"imer compare: {what}", file=sys.stderr)
        return 2
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
                      seeds=args.seeds, workers=args.workers or _default_workers(args.device),
                      scheduler=args.scheduler, device=args.device, jobs_per_gpu=args.jobs_per_gpu,
                      results_dir=args.results, data_root=args.data_root, manifest=args.manifest,
                      progress=not args.no_progress, meta={"argv": sys.argv, "feature_set": args.features})
    except (ConfigError, DataError, ProtocolError, ReportError, ValueError, FileNotFoundError) as e:
        print(f"imer compare: {e}", file=sys.stderr)
        return 2
    text = (out / "report.md").read_text()
    if args.docs:
        from pipeline.provenance import command_line, paste_block

        block = args.block or f"compare-{args.dataset}"
        cmd = command_line("imer compare", args, {
            "dataset": "--dataset", "methods": "--methods", "features": "--features", "folds": "--folds",
            "seeds": "--seeds", "workers": "--workers", "device": "--device", "jobs_per_gpu": "--jobs-per-gpu", "overrides": "--set",
            "data_root": "--data-root", "manifest": "--manifest"})
        from train.results import read_json

        wall = read_json(out / "compare.json").get("wall_s") if (out / "compare.json").is_file() else None
        try:
            paste_block(args.docs, block, text, cmd, wall_s=wall)
        except ReportError as e:
            print(f"imer compare: {e}", file=sys.stderr)
            return 2
        for png in sorted(out.glob("*.png")) if args.figures else []:
            shutil.copyfile(png, os.path.join(args.figures, f"{block}-{png.name}"))
    print(text)
    return 0
