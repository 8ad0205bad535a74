"""Train a method on every fold x seed of a dataset and evaluate every missing-modality condition.

Missing feature stores are extracted first (the stage runner); results go to
results/<dataset>/<method>/<run-id>/ (config, metrics JSON/CSV, Table-5-style table.md, curves and
a per-condition chart); the table is printed. Rerunning the same command resumes an interrupted
run. Examples:

  imer train --dataset demo --method mmin
  imer train --dataset iemocap --data-root /data/IEMOCAP_full_release --method baseline --folds 1,2 --seeds 0
  imer train --dataset demo --method baseline,baseline-aug,mmin --set '*:train.batch_size=64'
  imer train --dataset demo --method mmin --set loss.cycle=0 --set baseline:train.clip_grad_norm=5.0
  imer train --dataset demo --method baseline-aug --eval missing-rate      # MR 0.0 ... 0.7
  imer train --dataset demo --method baseline-aug --eval conditions --eval missing-ratio=0.1,0.3

--set KEY=VALUE changes the method; --set CONFIG:KEY=VALUE the config of that name in its chain (a
prerequisite, such as MMIN's baseline, or the method); --set '*:KEY=VALUE' every config of the
chain. features.* and data.* always reach the whole chain. A plain KEY that a prerequisite reads
too (train.*, select.*, or a key its config holds) is refused, naming the prerequisite: say which
configs it is meant for.

A finished model is never trained twice: a fold x seed with the same config and data is reused
(also across runs), and only test columns it lacks are evaluated; a method's config records its
prerequisites' configs, so a model built on a differently trained prerequisite is never reused.
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (demo, iemocap, msp-improv, mosi, mosei, own, or imported)")
    p.add_argument("--method", required=True, help="method config(s), comma-separated (see train/configs/)")
    p.add_argument("--folds", help="fold names or 1-based positions, comma-separated (default: all)")
    p.add_argument("--seeds", help="seeds, comma-separated (default: the config's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA with AMP when present)")
    p.add_argument("--protocol", help="fold protocol (default: the dataset's first, e.g. mmin10 for IEMOCAP)")
    p.add_argument("--data-root", help="raw corpus directory (builds the manifest)")
    p.add_argument("--manifest", help="use this manifest instead of the cached/built one")
    p.add_argument("--eval", dest="eval", action="append", default=[], metavar="PROTOCOL[=P,...]",
                   help="test protocol(s), replacing the config's eval.conditions: conditions (the 7 fixed), "
                        "missing-rate (MR 0..0.7), missing-ratio (eta 0..0.5), with optional parameters "
                        "(missing-rate=0.1,0.5) or column ids (a,vt,mr=0.3); repeatable")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[CONFIG:]KEY=VALUE",
                   help="override a config value of the method (train.batch_size=64), of one config of its "
                        "chain (baseline:model.init=kaiming) or of every one ('*:train.batch_size=64'); "
                        "features.* and data.* reach the whole chain (repeatable)")
    p.add_argument("--results", help="results root (default $IMER_RESULTS or ./results)")
    p.add_argument("--run-id", help="name of the run folder (default: timestamp + config hash)")
    p.add_argument("--fresh", action="store_true", help="start a new run folder instead of resuming an unfinished one or "
                                                       "returning a finished one (finished fold x seed models are still reused)")
    p.add_argument("--threads", type=int, help="torch threads when training on CPU (default 1: these small nets "
                                               "gain little from more, and lose much on a busy machine)")
    p.add_argument("--workers", type=int, default=None, help="train the folds x seeds in N worker processes of one "
                                                             "torch thread each (dask LocalCluster; default 1: in sequence; "
                                                             "with --device cuda and --jobs-per-gpu: GPUs x jobs per GPU)")
    p.add_argument("--jobs-per-gpu", type=int, default=None, metavar="N",
                   help="on CUDA: at most N folds x seeds share one GPU, spread over every visible GPU (default with "
                        "--workers > 1: measured from the model's memory, see train/job_memory.py)")
    p.add_argument("--features", metavar="SET", help="train on a named feature set of train/feature_sets.yaml "
                                                    "instead of the config's (offline: what runs without downloads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from pipeline.commands.manifest import add_own_options

    add_own_options(p)


def _workers(args) -> tuple[int, str]:
    """(worker processes, device for the cluster's layout): --jobs-per-gpu on CUDA alone means
    every GPU slot; the device is resolved only when workers run in parallel."""
    from train.config import ConfigError

    if args.jobs_per_gpu is not None and args.jobs_per_gpu < 1:
        raise ConfigError(f"--jobs-per-gpu must be at least 1, got {args.jobs_per_gpu}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if (args.workers or 1) == 1 and args.jobs_per_gpu is None:
        return 1, args.device
    from pipeline.device import concrete_device

    device = concrete_device(args.device)
    if args.jobs_per_gpu is not None and not device.startswith("cuda"):
        raise ConfigError(f"--jobs-per-gpu places jobs on GPUs, but the device is {device}: add --device cuda")
    if args.workers is None:  # --jobs-per-gpu alone: every GPU slot
        from pipeline.device import gpu_count, gpu_ids

        return len(gpu_ids(device, gpu_count())) * args.jobs_per_gpu, device
    return args.workers, device


def main(args) -> int:
    from extract.base import ExtractorUnavailable
    from manifests.schema import ManifestError
    from pipeline.commands.manifest import own_options
    from pipeline.fsutil import UnsafeCheckpoint
    from pipeline.store import StoreError
    from train.config import ConfigError, check_overrides, feature_set, for_chain, list_configs, load_config
    from train.config import parse_override
    from train.data import DataError
    from train.protocols import ProtocolError, expand
    from train.results import ReportError
    from pipeline.cluster import Cluster
    from train.run import train_method

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in list_configs()]
    if unknown:
        print(f"imer train: unknown method(s) {', '.join(unknown)}; known: {', '.join(list_configs())}", file=sys.stderr)
        return 2
    try:
        from train.run import parse_seeds

        parse_seeds(args.seeds)  # before anything is built or marked running
        overrides = dict(parse_override(o) for o in args.overrides)
        if args.features:
            overrides["features"] = feature_set(args.features)
        if own_options(args):
            if not args.manifest:
                raise ManifestError("--folds-k/--folds-seed/--classes convert an own corpus: give its --manifest FILE")
            from manifests.datasets import load_manifest

            load_manifest(args.dataset, args.data_root, args.manifest, **own_options(args))  # later reads reuse it
        if args.eval:
            overrides["eval.conditions"] = [c for e in args.eval for c in expand(e)]
        cfgs = [load_config(m, args.dataset, overrides) for m in methods]
        check_overrides(cfgs, overrides)  # before anything is extracted or trained
        workers, device = _workers(args)
        # one for every listed method, started when first needed; on CUDA its workers are GPU slots
        cluster = Cluster(workers, device=device, jobs_per_gpu=args.jobs_per_gpu)
        for m, cfg in zip(methods, cfgs):
            train_method(args.dataset, m, folds=args.folds, seeds=args.seeds, device=args.device,
                         data_root=args.data_root, manifest=args.manifest, protocol=args.protocol,
                         results_dir=args.results, run_id=args.run_id, overrides=for_chain(cfg, overrides),
                         resume=not args.fresh, progress=not args.no_progress, threads=args.threads,
                         workers=workers, cluster=cluster)
        cluster.close()
    except (ConfigError, DataError, ManifestError, FileNotFoundError, StoreError, UnsafeCheckpoint,
            ExtractorUnavailable, ProtocolError, ReportError) as e:
        print(f"imer train: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverging run: train.run marked it failed in its run.json
        print(f"imer train: {e} (the run is marked failed)", file=sys.stderr)
        return 1
    return 0
