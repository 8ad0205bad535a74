"""Dataset registry: name -> recipe module; cached manifests and fold files.

A recipe is one module in ``manifests/`` that defines::

    DATASET = "iemocap"                    # name used on the command line (also ALIASES = [...])
    PROTOCOLS = ["mmin10", "loso5"]        # fold protocols it writes; the first is the default
    def build(data_root: Path | None, out_dir: Path, **options) -> Path:
        '''Parse the raw layout under data_root, write out_dir/manifest.jsonl and
        out_dir/folds-<protocol>.json for every protocol; return the manifest path.
        Options a recipe does not use are ignored (e.g. accept_counts, seed, source, k).'''
    CONVERTS = True                        # optional: the recipe converts a user file (``source``)

Built manifests live in ``$IMER_CACHE/manifests/<dataset>/`` so every checkout shares them.
Datasets without a recipe (features imported with `imer import-features`) live there too: their
protocols are the fold files present, and ``features.json`` maps each modality to its store.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from pathlib import Path
from types import ModuleType

from manifests.schema import Fold, Manifest, ManifestError, check_folds, read_folds, read_manifest
from pipeline.cache import cache_root
from pipeline.fsutil import atomic_write_json


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


def _find(dataset: str) -> ModuleType | None:
    """The recipe of ``dataset`` or of its alias; the module named like the dataset is tried first,
    so the common case imports one recipe, not all of them."""
    try:
        mod = importlib.import_module(f"manifests.{dataset.replace('-', '_')}")
    except ModuleNotFoundError:
        mod = None
    if mod is not None and getattr(mod, "DATASET", None) == dataset and hasattr(mod, "build"):
        return mod
    return recipes().get(dataset)


def recipe(dataset: str) -> ModuleType:
    mod = _find(dataset)
    if mod is None:
        raise ManifestError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(recipes()))}")
    return mod


def canonical(dataset: str) -> str:
    """The recipe's own name for an alias (msp_improv -> msp-improv); other names unchanged."""
    mod = _find(dataset)
    return mod.DATASET if mod is not None else dataset


def corpus_of(dataset: str) -> str:
    """The corpus behind a dataset name: a recipe's own name (aliases resolved), or for features
    imported with `imer import-features` the corpus they came from (``iemocap-mmin`` -> ``iemocap``),
    so per-corpus settings such as MSP-IMPROV's F1 model selection apply either way."""
    mod = _find(dataset)
    if mod is not None:
        return mod.DATASET
    doc = _read_json(manifest_dir(dataset) / "dataset.json") or {}
    return doc.get("corpus") or dataset


def manifest_dir(dataset: str) -> Path:
    return cache_root() / "manifests" / canonical(dataset)


def build_manifest(dataset: str, data_root: str | Path | None = None, **options) -> Path:
    """Run the dataset's recipe into its cached manifest dir. ``options`` go to the recipe
    (accept_counts, seed, source, k, splits, labels)."""
    out = manifest_dir(dataset)
    out.mkdir(parents=True, exist_ok=True)
    build = recipe(dataset).build
    params = inspect.signature(build).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # a recipe without **options
        options = {k: v for k, v in options.items() if k in params}
    return build(Path(data_root).expanduser() if data_root else None, out, **options)


def load_manifest(dataset: str, data_root: str | Path | None = None,
                  manifest: str | Path | None = None, **options) -> Manifest:
    """The dataset's manifest: an explicit file, else the cached one, else built by its recipe
    (the demo builds without a data root; licensed corpora need ``data_root``). For a recipe that
    converts a user file (``own``), an explicit ``manifest`` is that file: it is converted (once per
    content) into the cached manifest and folds."""
    if manifest:
        mod = _find(dataset)
        if mod is not None and getattr(mod, "CONVERTS", False):
            return read_manifest(build_manifest(dataset, data_root, source=manifest, **options))
        return read_manifest(manifest)
    path = manifest_dir(dataset) / "manifest.jsonl"
    if data_root is not None or not path.is_file():
        path = build_manifest(dataset, data_root, **options)
    return read_manifest(path)


def protocols(dataset: str) -> list[str]:
    """Fold protocols of ``dataset``, default first: the recipe's, else the fold files present."""
    mod = _find(dataset)
    if mod is not None:
        return list(getattr(mod, "PROTOCOLS", []))
    doc = _read_json(manifest_dir(dataset) / "dataset.json") or {}
    found = sorted(p.name[len("folds-"):-len(".json")] for p in manifest_dir(dataset).glob("folds-*.json"))
    first = [p for p in doc.get("protocols", []) if p in found]
    return first + [p for p in found if p not in first]


def load_folds(dataset: str, protocol: str | None = None) -> tuple[str, list[Fold]]:
    known = protocols(dataset)
    if not known and dataset not in recipes() and not manifest_dir(dataset).is_dir():
        raise ManifestError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(recipes()))} "
                            "(or import features with `imer import-features`)")
    protocol = protocol or (known[0] if known else None)
    if protocol is None:
        raise ManifestError(f"dataset {dataset!r} defines no fold protocol")
    path = manifest_dir(dataset) / f"folds-{protocol}.json"
    if not path.is_file():
        raise ManifestError(f"{path}: no fold file for protocol {protocol!r}; known: {known}. "
                            f"Build the manifest first: imer manifest --dataset {dataset}")
    return read_folds(path)


def check_dataset_folds(manifest: Manifest, dataset: str, protocol: str, folds: list[Fold]) -> None:
    """Refuse folds that do not belong to ``manifest`` (see schema.check_folds), before any training."""
    path = manifest_dir(dataset) / f"folds-{protocol}.json"
    how = ("imer manifest --dataset own --manifest YOUR.csv" if canonical(dataset) == "own"
           else f"imer manifest --dataset {dataset} --data-root PATH")
    check_folds(manifest, folds, path, how)


def manifest_and_folds(dataset: str, data_root=None, manifest=None, protocol: str | None = None):
    """(manifest, protocol, folds) of ``dataset``, the manifest built first where it is missing (the
    demo is generated), the folds checked against it: what training and comparing start from."""
    man = load_manifest(dataset, data_root=data_root, manifest=manifest)
    proto, folds = load_folds(dataset, protocol)
    check_dataset_folds(man, dataset, proto, folds)
    return man, proto, folds


# ---- imported feature stores ------------------------------------------------------------------------

def feature_map(dataset: str) -> dict[str, dict] | None:
    """``features.json`` of ``dataset``: modality -> {"key", "path", "dim", "frame_rate", "source", ...}
    for stores written by `imer import-features`; None when the dataset has none."""
    return _read_json(manifest_dir(dataset) / "features.json")


def write_feature_map(dataset: str, mapping: dict[str, dict]) -> Path:
    path = manifest_dir(dataset) / "features.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, mapping, sort_keys=True)
    return path


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg}); re-run the command that wrote it") from None
