"""Method configs: YAML files in ``train/configs/`` holding each paper's hyperparameters.

A config may ``extends: <other>`` (deep-merged, the child wins; lists are replaced, not merged) and
may carry per-dataset overrides under ``datasets: {<dataset>: {...}}``, applied last. Files whose
name starts with ``_`` are shared bases, not methods. An ablation is a config that extends its
method and changes one switch (``mmin-ae.yaml`` = ``mmin.yaml`` with a plain autoencoder).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and what to fix."""


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def list_configs() -> list[str]:
    """Every runnable method config (``imer train --method`` accepts these names)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def catalog() -> dict[str, dict]:
    """{config: {"order": int, "demo": bool}} from each config file's own ``report:`` section (not
    inherited: an ablation does not join the demo because its method does). Report tables list
    methods by ``order`` (then name); ``imer demo`` trains those with ``demo: true``."""
    out = {}
    for name in list_configs():
        try:
            doc = yaml.safe_load(config_path(name).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_path(name)}: not valid YAML ({e})") from None
        rep = doc.get("report") or {}
        out[name] = {"order": int(rep.get("order", 1000)), "demo": bool(rep.get("demo", False))}
    return out


def report_order(names) -> list[str]:
    cat = catalog()
    return sorted(names, key=lambda n: (cat.get(n, {}).get("order", 1000), n))


def deep_merge(base: dict, over: dict) -> dict:
    """Child values win; nested mappings merge, except that a component spec naming a different
    ``name`` or ``kind`` (another extractor, another encoder) replaces the old one whole, so no
    parameter of the old component leaks into the new one."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict) and not _other_component(old, v):
            out[k] = deep_merge(old, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _other_component(old: dict, new: dict) -> bool:
    return any(key in new and key in old and new[key] != old[key] for key in ("name", "kind"))


def _read(name: str, seen: tuple[str, ...] = ()) -> dict:
    path = config_path(name)
    if not path.is_file():
        raise ConfigError(f"unknown method config {name!r} ({path} not found); known: {', '.join(list_configs())}")
    if name in seen:
        raise ConfigError(f"{path}: 'extends' loops through {' -> '.join(seen + (name,))}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must be a YAML mapping at top level")
    parent = doc.pop("extends", None)
    if parent:
        doc = deep_merge(_read(parent, seen + (name,)), doc)
    return doc


def set_dotted(cfg: dict, key: str, value) -> None:
    """``set_dotted(cfg, "train.epochs", 3)``: command-line style override of one leaf."""
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """``"train.epochs=3"`` -> ("train.epochs", 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def load_config(name: str, dataset: str | None = None, overrides: dict | None = None) -> dict:
    """The resolved config of method ``name`` for ``dataset``: bases merged, the dataset's
    overrides applied, then ``overrides`` ({dotted key: value}). ``cfg["name"]`` is the config
    name, ``cfg["method"]`` the method class in ``train/methods`` (defaults to the name)."""
    cfg = _read(name)
    cfg.pop("report", None)  # catalogue entry of the file, see catalog()
    per_dataset = cfg.pop("datasets", None) or {}
    if dataset and dataset not in per_dataset:
        from manifests.datasets import corpus_of

        dataset = corpus_of(dataset)  # aliases and imported features (msp-improv-mmin) use their corpus's
    if dataset and dataset in per_dataset:
        cfg = deep_merge(cfg, per_dataset[dataset])
        # kept in the resolved config so results say what the dataset changed (e.g. fewer demo epochs)
        cfg["dataset_override"] = {"dataset": dataset, "changes": per_dataset[dataset]}
    for k, v in (overrides or {}).items():
        set_dotted(cfg, k, v)
    cfg["name"] = name
    cfg.setdefault("method", name)
    _check_values(cfg, name)
    return cfg


def _check_values(cfg: dict, name: str) -> None:
    """Values that would otherwise fail deep inside training (a zero batch size, zero epochs)."""
    t = cfg.get("train") or {}
    for key in ("batch_size", "epochs"):
        v = t.get(key)
        if v is None and key == "epochs":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {v!r} "
                              f"(train/configs/{name}.yaml or --set train.{key}=N)")


def feature_set(name: str) -> dict:
    """A named feature set of train/feature_sets.yaml ({modality: extractor spec})."""
    path = Path(__file__).parent / "feature_sets.yaml"
    sets = yaml.safe_load(path.read_text()) or {}
    if name not in sets:
        raise ConfigError(f"--features {name!r}: no such feature set in {path}; known: {', '.join(sets)}")
    return sets[name]
