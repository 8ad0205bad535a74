"""The dataset-level entry point of training: ``train_method`` (what ``imer train`` calls) loads the
config, manifest and folds, makes sure the features exist (``ensure_stores``: the stage runner
extracts what is missing), builds the data module and hands over to
:func:`train.run.run_experiment`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.device import torch_threads
from train.config import ConfigError, by_scope, check_chain, check_overrides, for_chain, load_config
from train.config import with_prerequisites
from train.data import MultimodalData


def ensure_stores(dataset: str, cfg: dict, device: str, data_root=None, manifest=None, workers: int = 1) -> dict:
    """{modality: FeatureStore} for the config's features, extracting whatever is missing (on
    ``workers`` processes). A dataset made by `imer import-features` trains on its imported stores
    (no media, no extraction)."""
    from manifests.importers import open_imported

    imported = open_imported(dataset)
    if imported is not None:
        return imported
    try:
        from pipeline.runner import ensure_features
    except ImportError as e:
        raise SystemExit(f"imer train: the feature stage runner is not available ({e}); "
                         "run `imer features` first or install the full toolkit") from None
    kw = {"device": device, "data_root": data_root, "workers": workers}
    if cfg.get("data", {}).get("store_dtype", "float32") != "float32":  # float16: the -f16 stores
        kw["dtype"] = cfg["data"]["store_dtype"]
    if manifest:
        kw["manifest"] = manifest
    return ensure_features(dataset, cfg["features"], **kw)


def store_description(stores: dict) -> dict:
    """What the run records about each store: enough to rebuild its extractor for ``imer predict``."""
    out = {}
    for mod, s in stores.items():
        a = getattr(s, "attrs", None)
        a = dict(a() if callable(a) else a or {})
        out[mod] = {k: a.get(k) for k in ("name", "params", "key", "dim", "frame_rate", "modality", "version", "requires", "format")
                    if k in a}
        if getattr(s, "path", None) is not None:
            out[mod]["path"] = str(s.path)
    return out


def build_data(manifest, stores: dict, cfg: dict) -> MultimodalData:
    d = cfg.get("data", {})
    if d.get("invalid_frames", "drop") not in ("drop", "zero"):
        raise ConfigError(f"data.invalid_frames must be drop or zero, got {d['invalid_frames']!r}")
    from train.streaming import parse_bytes  # data.memory_budget: above it a store is streamed per batch

    budget = parse_bytes(d["memory_budget"]) if d.get("memory_budget") is not None else None
    return MultimodalData.from_stores(manifest, stores, invalid_frames=d.get("invalid_frames", "drop"), memory_budget=budget,
                                      max_len=d.get("max_len"), fixed_len=bool(d.get("fixed_len")),
                                      resample_to=d.get("resample_to"), target=d.get("target"))


def train_method(dataset: str, method: str, folds=None, seeds=None, device: str = "auto", *,
                 data_root=None, manifest=None, protocol: str | None = None, results_dir=None,
                 run_id: str | None = None, overrides: dict | None = None,
                 prereq_overrides: dict | None = None, resume: bool = True, progress: bool = True,
                 threads: int | None = None, log=print, workers: int = 1, cluster=None) -> Path:
    """Extract what is missing, train ``method`` on every fold x seed of ``dataset``, evaluate every
    condition and write ``results/<dataset>/<method>/<run-id>/``; returns that directory. On CPU,
    training uses ``threads`` torch threads (default 1, see ``cpu_threads``); ``workers`` > 1 trains
    the folds x seeds in that many worker processes of one thread each (``cluster``: one to share).
    ``overrides``: plain keys change ``method`` (``features.*``, ``data.*`` the whole chain),
    ``CONFIG:KEY`` the config of that name in its chain, ``*:KEY`` all (train.config);
    ``prereq_overrides`` ({config | "*": {key: value}}) change the prerequisites only ("*": every
    one). The command line also refuses plain keys a prerequisite reads (``check_overrides``)."""
    from manifests.datasets import manifest_and_folds
    from pipeline.device import resolve_device
    from train.run import run_experiment  # train.run imports this module

    cfg = with_prerequisites(load_config(method, dataset, overrides), dataset, prereq_overrides)
    check_overrides([cfg], overrides, plain_everywhere=True)  # a CONFIG: outside the chain is a typo
    check_chain(cfg)  # before any feature is extracted
    dev = device if device == "auto" else resolve_device(device)  # auto: resolved when a fold has work
    man, proto, fold_list = manifest_and_folds(dataset, data_root, manifest,
                                               protocol or cfg.get("fold_protocol"))  # CLI, else the config's
    stores = ensure_stores(dataset, cfg, dev, None, manifest, workers=workers)  # the manifest built above
    data = build_data(man, stores, cfg)
    meta = {"protocol": proto, "features": store_description(stores),
            "manifest": str(man.path) if man.path else None, "argv": sys.argv, "overrides": for_chain(cfg, overrides)}
    if prereq_overrides:
        meta["prereq_overrides"] = prereq_overrides
    return run_experiment(data, fold_list, cfg, dataset=dataset, fold_select=folds, seeds=seeds, device=dev,
                          results_dir=results_dir, run_id=run_id, resume=resume, meta=meta, progress=progress,
                          log=log, workers=workers, cluster=cluster, threads=threads)


def prerequisite_overrides(overrides: dict | None, per_prereq: dict | None = None) -> dict:
    """What of flat ``--set`` ``overrides`` reaches the prerequisites, as {"*" | config: {key:
    value}}: ``features.*``, ``data.*`` and ``*:KEY`` reach every one ("*"), ``CONFIG:KEY`` the
    config named; other plain keys stay with the method. ``per_prereq`` is merged in."""
    scoped = by_scope(overrides)
    out = {"*": {**{k: v for k, v in scoped.get(None, {}).items() if k.split(".")[0] in ("features", "data")},
                 **scoped.get("*", {})}}
    for c, o in [*((c, o) for c, o in scoped.items() if c not in (None, "*")), *(per_prereq or {}).items()]:
        out[c] = {**out.get(c, {}), **o}
    return out


def cpu_threads(device: str, n: int | None = None):
    """Torch intra-op threads while training on CPU: ``n``, default 1 (restored afterwards); these
    small recurrent nets gain little from more threads (see pipeline.device.torch_threads)."""
    return torch_threads(device, int(n or 1))
