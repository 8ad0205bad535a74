"""Method configs: YAML files in ``train/configs/`` holding each paper's hyperparameters.

A config may ``extends: <other>`` (deep-merged, the child wins; lists are replaced, not merged) and
may carry per-dataset overrides under ``datasets: {<dataset>: {...}}``, applied last. Files whose
name starts with ``_`` are shared bases, not methods. An ablation is a config that extends its
method and changes one switch (``mmin-ae.yaml`` = ``mmin.yaml`` with a plain autoencoder).

A config may ``requires: {role: <config>}`` (MMIN builds on ``baseline``): its resolved config then
records each prerequisite's resolved config under ``prerequisites`` (recursively), so whatever
changes a prerequisite changes the signature of the models built on it. Command-line overrides
(``--set``) name the config they change: ``KEY=V`` the method, ``CONFIG:KEY=V`` one config of the
chain (the method or a prerequisite, at any depth), ``*:KEY=V`` every config of the chain;
``features.*`` and ``data.*`` always reach the whole chain (a method and what it builds on read the
same data).
"""

from __future__ import annotations

import copy
import math
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


# Sections a method and the configs it builds on must share: an override of them reaches the chain.
SHARED = ("features", "data")
# Keys that do not change a trained model: seeds, test columns, catalogue entries.
DESCRIPTIVE = ("seeds", "dataset_override", "eval", "report")
# Keys every config's training reads, with a default where the file has none (train.Trainer,
# Method.task_loss): an override of one matters to every prerequisite.
READ_BY_ALL = ("train.", "select.", "loss.regression")


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
    """``"train.epochs=3"`` -> ("train.epochs", 3), ``"baseline:model.init={kind: normal}"`` ->
    ("baseline:model.init", {"kind": "normal"}); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    k, v = text.split("=", 1)
    split_scope(k.strip())  # a malformed CONFIG:KEY is refused here
    return k.strip(), yaml.safe_load(v)


def split_scope(key: str) -> tuple[str | None, str]:
    """``"baseline:model.init"`` -> ("baseline", "model.init"); ``"model.init"`` -> (None, "model.init")."""
    scope, sep, path = key.partition(":")
    scope, path = (scope.strip(), path.strip()) if sep else (None, key.strip())
    if sep and not (scope and path):
        raise ConfigError(f"override {key!r}: expected KEY, CONFIG:KEY (e.g. baseline:model.init) or '*:KEY'")
    if path.split(".")[0] == "prerequisites":
        raise ConfigError(f"override {key!r}: 'prerequisites' is resolved from 'requires'; "
                          f"set CONFIG:KEY for the prerequisite instead (e.g. baseline:model.init)")
    return scope, path


def by_scope(overrides: dict | None) -> dict:
    """{None (plain keys) | "*" | config: {key: value}} of flat ``--set`` overrides."""
    out: dict = {}
    for k, v in (overrides or {}).items():
        scope, path = split_scope(k)
        out.setdefault(scope, {})[path] = v
    return out


def everywhere(overrides: dict | None) -> dict:
    """``overrides`` with every plain key made ``*:KEY`` (``imer compare``: the whole chain)."""
    return {k if split_scope(k)[0] else f"*:{k}": v for k, v in (overrides or {}).items()}


def load_config(name: str, dataset: str | None = None, overrides: dict | None = None) -> dict:
    """The resolved config of method ``name`` for ``dataset``: bases merged, the dataset's
    overrides applied, then ``overrides`` ({key: value}; see the module doc for ``CONFIG:KEY`` and
    ``*:KEY``; a scope naming no config of the chain is ignored here, refused by
    ``check_overrides``). Where several forms set one key, ``CONFIG:`` wins over a plain key, which
    wins over ``*:``. ``cfg["name"]`` is the config name, ``cfg["method"]`` the method class in
    ``train/methods`` (defaults to the name); ``cfg["prerequisites"]`` the required configs,
    resolved for the same dataset (the one whose per-dataset settings the method took)."""
    scoped = by_scope(overrides)
    return _resolve(name, dataset, scoped, scoped.get(None, {}), ())


def _resolve(name: str, dataset, scoped: dict, plain: dict, stack: tuple) -> dict:
    if name in stack:
        raise ConfigError(f"train/configs/{name}.yaml: 'requires' loops through {' -> '.join(stack + (name,))}")
    cfg = _load_one(name, dataset, {**scoped.get("*", {}), **plain, **scoped.get(name, {})})
    reqs = cfg.get("requires") or {}
    if reqs:
        shared = {k: v for k, v in plain.items() if k.split(".")[0] in SHARED}
        key = (cfg.get("dataset_override") or {}).get("dataset") or dataset
        cfg["prerequisites"] = {p: _resolve(p, key, scoped, shared, stack + (name,)) for p in reqs.values()}
    return cfg


def _load_one(name: str, dataset: str | None, overrides: dict) -> dict:
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
    for k, v in overrides.items():
        set_dotted(cfg, k, v)
    cfg["name"] = name
    cfg.setdefault("method", name)
    _check_values(cfg, name)
    return cfg


def chain(cfg: dict) -> list[str]:
    """The names of a resolved config and of every config it builds on, the method first."""
    out = [cfg["name"]]
    for p in (cfg.get("prerequisites") or {}).values():
        out += [n for n in chain(p) if n not in out]
    return out


def _prerequisite_configs(cfg: dict) -> dict:
    """{name: resolved config} of every prerequisite of ``cfg``, at any depth."""
    out = {}
    for n, p in (cfg.get("prerequisites") or {}).items():
        out.setdefault(n, p)
        out.update({k: v for k, v in _prerequisite_configs(p).items() if k not in out})
    return out


def _has(cfg: dict, parts: list[str]) -> bool:
    node = cfg
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def _matters(pcfg: dict, key: str) -> bool:
    """Whether ``key`` can change what ``pcfg`` trains: a key its training reads whatever the file
    says (READ_BY_ALL), or one whose path, or a part of that path below its top section, the
    resolved config holds (``model.encoders.a.layers`` matters where ``model.encoders.a`` exists;
    ``model.imagination.*`` and ``loss.cycle`` do not matter to MMIN's baseline, which has neither)."""
    parts = key.split(".")
    return key.startswith(READ_BY_ALL) or any(_has(pcfg, parts[:i]) for i in range(min(2, len(parts)), len(parts) + 1))


def check_overrides(cfgs: list[dict], overrides: dict | None, plain_everywhere: bool = False) -> None:
    """Refuse, in one line, ``--set`` overrides that would be half-applied to the resolved method
    configs ``cfgs``: a ``CONFIG:`` naming no config of their chains, and (unless plain keys reach
    every config, ``plain_everywhere``: ``imer compare``) a plain key that a prerequisite also
    reads, where neither ``*:KEY`` nor ``PREREQ:KEY`` says what the prerequisite gets."""
    scoped = by_scope(overrides)
    names = [n for c in cfgs for n in chain(c)]
    for scope, keys in scoped.items():
        if scope not in (None, "*") and scope not in names:
            shown = "; ".join(f"{c['name']}: {', '.join(chain(c))}" for c in cfgs)
            raise ConfigError(f"--set {scope}:{next(iter(keys))}: no config {scope!r} in the chain ({shown}); "
                              f"name one of them, or '*' for all")
    if plain_everywhere:
        return
    for cfg in cfgs:
        for key in scoped.get(None, {}):
            if key.split(".")[0] in SHARED + DESCRIPTIVE:
                continue
            for p, pcfg in _prerequisite_configs(cfg).items():
                if _matters(pcfg, key) and key not in scoped.get("*", {}) and key not in scoped.get(p, {}):
                    m = cfg["name"]
                    raise ConfigError(f"--set {key}: {m} builds on {p}, which reads {key} too and would keep its "
                                      f"own value; write --set '*:{key}=...' for the whole chain, --set "
                                      f"{p}:{key}=... for {p}, or --set {m}:{key}=... for {m} alone")


def check_chain(cfg: dict) -> None:
    """A method and each config it builds on read the same data: their ``features`` and ``data``
    sections must be equal (checked before any feature is extracted)."""
    for name, pcfg in (cfg.get("prerequisites") or {}).items():
        for section in SHARED:
            if pcfg.get(section) != cfg.get(section):
                raise ConfigError(f"train/configs/{name}.yaml: its '{section}' section differs from "
                                  f"{cfg['name']}'s, but {cfg['name']} builds on it; make them equal")
        check_chain(pcfg)


def for_chain(cfg: dict, overrides: dict | None) -> dict:
    """The ``overrides`` that concern the resolved ``cfg``'s chain: plain, ``*:`` and ``CONFIG:``
    keys naming one of its configs (``imer train --method a,b`` gives each method its own)."""
    names = chain(cfg)
    return {k: v for k, v in (overrides or {}).items() if split_scope(k)[0] in (None, "*", *names)}


def with_prerequisites(cfg: dict, dataset: str | None = None, per_prereq: dict | None = None) -> dict:
    """``cfg`` with its ``prerequisites`` resolved (those it records are kept) and ``per_prereq``
    ({config | "*": {key: value}}) applied to them at every depth: what ``run_experiment``'s
    ``prereq_overrides`` does, recorded in the config, so it enters the method's signature."""
    reqs = cfg.get("requires") or {}
    per = per_prereq or {}
    if not reqs or not (per or set(reqs.values()) - set(cfg.get("prerequisites") or {})):
        return cfg
    key = (cfg.get("dataset_override") or {}).get("dataset") or dataset
    recorded = cfg.get("prerequisites") or {}
    out = dict(cfg, prerequisites={})
    for name in reqs.values():
        p = copy.deepcopy(recorded[name]) if name in recorded else load_config(name, key)
        extra = {**per.get("*", {}), **per.get(name, {})}
        for k, v in extra.items():
            set_dotted(p, k, v)
        _check_values(p, name)
        out["prerequisites"][name] = with_prerequisites(p, key, per)
    return out


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
    bad = _non_finite(cfg)
    if bad:  # torch would fail deep in the first step (or train on NaN), after the run was marked running
        key, v = bad
        raise ConfigError(f"{key} must be a finite number, got {v!r} (train/configs/{name}.yaml or --set {key}=...)")


def _non_finite(node, path: str = "") -> tuple[str, object] | None:
    """(key, value) of the first NaN or infinite number in a config, written as a number (.nan)
    or as a word YAML keeps as text (nan, inf); None when there is none."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        if isinstance(node, float) and not math.isfinite(node):
            return path, node
        if isinstance(node, str) and node.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity"):
            return path, node
        return None
    for k, v in items:
        if k == "prerequisites":  # checked one by one (with_prerequisites)
            continue
        hit = _non_finite(v, f"{path}.{k}" if path else str(k))
        if hit:
            return hit
    return None


def feature_set(name: str) -> dict:
    """A named feature set of train/feature_sets.yaml ({modality: extractor spec})."""
    path = Path(__file__).parent / "feature_sets.yaml"
    sets = yaml.safe_load(path.read_text()) or {}
    if name not in sets:
        raise ConfigError(f"--features {name!r}: no such feature set in {path}; known: {', '.join(sets)}")
    return sets[name]
