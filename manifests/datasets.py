"""Dataset registry: name -> recipe module; cached manifests and fold files.

A recipe is one module in ``manifests/`` that defines::

    DATASET = "iemocap"                    # name used on the command line (also ALIASES = [...])
    PROTOCOLS = ["mmin10", "loso5"]        # fold protocols it writes; the first is the default
    def build(data_root: Path | None, out_dir: Path) -> Path:
        '''Parse the raw layout under data_root, write out_dir/manifest.jsonl and
        out_dir/folds-<protocol>.json for every protocol; return the manifest path.'''

Built manifests live in ``$IMER_CACHE/manifests/<dataset>/`` so every checkout shares them.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

from manifests.schema import Fold, Manifest, ManifestError, read_folds, read_manifest
from pipeline.cache import cache_root


def recipes() -> dict[str, ModuleType]:
    import manifests

    out: dict[str, ModuleType] = {}
    for m in pkgutil.iter_modules(manifests.__path__):
        if m.name.startswith("_") or m.name in ("schema", "datasets"):
            continue
        mod = importlib.import_module(f"manifests.{m.name}")
        if hasattr(mod, "DATASET") and hasattr(mod, "build"):
            for name in [mod.DATASET, *getattr(mod, "ALIASES", [])]:
                out[name] = mod
    return out


def recipe(dataset: str) -> ModuleType:
    r = recipes()
    if dataset not in r:
        raise ManifestError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(r))}")
    return r[dataset]


def manifest_dir(dataset: str) -> Path:
    return cache_root() / "manifests" / dataset


def build_manifest(dataset: str, data_root: str | Path | None = None) -> Path:
    out = manifest_dir(dataset)
    out.mkdir(parents=True, exist_ok=True)
    return recipe(dataset).build(Path(data_root).expanduser() if data_root else None, out)


def load_manifest(dataset: str, data_root: str | Path | None = None,
                  manifest: str | Path | None = None) -> Manifest:
    """The dataset's manifest: an explicit file, else the cached one, else built by its recipe
    (the demo builds without a data root; licensed corpora need ``data_root``)."""
    if manifest:
        return read_manifest(manifest)
    path = manifest_dir(dataset) / "manifest.jsonl"
    if data_root is not None or not path.is_file():
        path = build_manifest(dataset, data_root)
    return read_manifest(path)


def load_folds(dataset: str, protocol: str | None = None) -> tuple[str, list[Fold]]:
    mod = recipe(dataset)
    protocols = list(getattr(mod, "PROTOCOLS", []))
    protocol = protocol or (protocols[0] if protocols else None)
    if protocol is None:
        raise ManifestError(f"dataset {dataset!r} defines no fold protocol")
    path = manifest_dir(dataset) / f"folds-{protocol}.json"
    if not path.is_file():
        raise ManifestError(f"{path}: no fold file for protocol {protocol!r}; known: {protocols}. "
                            f"Build the manifest first: imer manifest --dataset {dataset}")
    return read_folds(path)
