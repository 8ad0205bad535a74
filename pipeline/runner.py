"""Stage runner: plan which (extractor, utterance) pairs are missing from the stores, extract them
(in-process, or in parallel with dask), commit results in batches, and summarise.

Planning reads only fingerprints (file content hashes, remembered across runs by path, size,
mtime, ctime and inode), so a run with nothing to do starts no cluster and loads no model.
Results always come back to this process, which is the only writer of its run; the store's lock
keeps it safe next to other processes writing the same store. The remembered digests live in
:mod:`pipeline.runner_digests`, the execution of a stage in :mod:`pipeline.runner_stage`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from extract import base
from extract.base import Extractor, ExtractorUnavailable
from manifests.schema import Manifest
from pipeline.cluster import Cluster
from pipeline.runner_digests import _prime_digests, _save_digests
from pipeline.runner_stage import _run_stage
from pipeline.store import FeatureStore, StoreDamaged, _damage_message, store_path


@dataclass
class Summary:
    """What one extractor's stage did in a run."""

    extractor: str
    key: str | None = None
    path: Path | None = None
    computed: int = 0
    cached: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # failed in this run: id -> reason
    failed_before: dict[str, str] = field(default_factory=dict)  # failed earlier, same source (not retried)
    no_source: int = 0  # utterances without this modality in the manifest (missing by design)
    skipped: str | None = None  # why the stage did not run (extractor unavailable)
    repaired: int = 0  # damaged utterances recomputed (repair=True)
    seconds: float = 0.0

    @property
    def all_failed(self) -> dict[str, str]:
        return {**self.failed_before, **self.failed}

    def line(self) -> str:
        if self.skipped:
            return f"{self.extractor}: skipped: {self.skipped}"
        s = (f"{self.key}: computed {self.computed}, cached {self.cached}, failed {len(self.failed)}"
             + (f" (+{len(self.failed_before)} failed earlier, not retried)" if self.failed_before else "")
             + (f", without this modality {self.no_source}" if self.no_source else "")
             + (f", repaired {self.repaired} damaged" if self.repaired else "")
             + f" in {self.seconds:.1f} s -> {self.path}")
        for uid, why in list(self.all_failed.items())[:20]:
            s += f"\n  failed {uid}: {why}"
        if len(self.all_failed) > 20:
            s += f"\n  ... {len(self.all_failed) - 20} more (see FeatureStore.failures())"
        return s


class StrictFailure(RuntimeError):
    """``strict=True`` and some utterances failed; ``.summaries`` holds the run's summaries."""

    def __init__(self, msg: str, summaries: list[Summary]):
        super().__init__(msg)
        self.summaries = summaries


# ---- extractor specs ---------------------------------------------------------------------------

def parse_specs(text: str) -> list[dict]:
    """``"a,b:k=v,k2=v2,c"`` -> [{"name": "a", "params": {}}, {"name": "b", "params": {k, k2}}, ...].
    A comma-separated ``key=value`` without a colon belongs to the extractor before it; values are
    YAML scalars (``64`` -> int, ``true`` -> bool, ``null`` -> None)."""
    out: list[dict] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if "=" in tok and ":" not in tok.split("=", 1)[0]:
            if not out:
                raise ValueError(f"--extractors {text!r}: parameter {tok!r} comes before any extractor name; "
                                 "write name:key=value,key2=value")
            kv = tok
        else:
            name, _, kv = tok.partition(":")
            out.append({"name": name.strip(), "params": {}})
            if not kv:
                continue
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"--extractors {text!r}: {kv!r} is not key=value")
        import yaml  # here: a no-op `imer features` rerun pays for no import it does not use

        out[-1]["params"][k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


def make_extractor(spec: str | dict, device: str = "cpu") -> Extractor:
    """An extractor from a name, a ``"name:k=v"`` string or ``{"name": ..., "params": {...}}``."""
    if isinstance(spec, str):
        specs = parse_specs(spec)
        if len(specs) != 1:
            raise ValueError(f"expected one extractor spec, got {spec!r}")
        spec = specs[0]
    return base.create(spec["name"], device=device, **dict(spec.get("params") or {}))


def default_extractors(device: str = "cpu") -> list[Extractor]:
    return [cls(device=device) for cls in base.available().values() if getattr(cls, "default", False)]


# ---- planning ----------------------------------------------------------------------------------

def store_attrs(ext: Extractor, dataset: str) -> dict:
    return {"extractor": ext.name, "version": ext.version, "params": ext.params, "model": ext.model_identity(),
            "config": ext.config(), "key": ext.key, "modality": ext.modality, "dataset": dataset,
            "frame_rate": ext.frame_rate}


def plan(ext: Extractor, manifest: Manifest, store: FeatureStore | None, retry_failed: bool = False,
         force=frozenset()):
    """(todo [(utt, fingerprint)], cached, failed_before {id: reason}, no_source); ids in ``force``
    (damaged entries being repaired) are computed again whatever the store holds."""
    state = store.state() if store is not None else {}
    fails = store.failures() if store is not None else {}
    todo, cached, failed_before, no_source = [], 0, {}, 0
    for u in manifest:
        if ext.source(u) is None:
            no_source += 1
            continue
        fp = ext.fingerprint(u)
        have = state.get(u.id)
        if have is not None and have[0] == fp and (have[1] or not retry_failed) and u.id not in force:
            if have[1]:
                cached += 1
            else:
                failed_before[u.id] = fails[u.id]["reason"]
        else:
            todo.append((u, fp))
    return todo, cached, failed_before, no_source


def _with_upstream(extractors: list[Extractor]) -> list[Extractor]:
    """Extractors in run order, each after the stages it ``requires`` (created with the parameters
    its ``upstream_params`` gives, as Extractor.config() assumes); one instance per store key."""
    order: list[Extractor] = []
    by_key: dict[str, Extractor] = {}

    def add(ext: Extractor, chain: tuple = ()):
        if ext.name in chain:
            raise ValueError(f"extractor dependency cycle: {' -> '.join(chain + (ext.name,))}")
        if ext.key in by_key:
            return by_key[ext.key]
        for n in ext.requires:
            add(ext.create_upstream(n), chain + (ext.name,))
        by_key[ext.key] = ext
        order.append(ext)
        return ext

    for e in extractors:
        add(e)
    return order


# ---- running the stages ------------------------------------------------------------------------

def run_features(manifest: Manifest, extractors: list[Extractor], *, workers: int = 1, scheduler: str | None = None,
                 strict: bool = False, progress: bool = True, required: bool = True, retry_failed: bool = False,
                 processes: bool = True, dtype: str = "float32", repair: bool = False,
                 stores: Path | None = None) -> list[Summary]:
    """Bring every extractor's store for ``manifest.dataset`` up to date with ``manifest``.

    ``workers`` > 1 or a ``scheduler`` address runs batches on dask.distributed (local worker
    processes, or threads with ``processes=False``); otherwise in this process. An extractor that
    raises ExtractorUnavailable propagates when ``required``, else its summary says "skipped: why"
    (stages that need it are skipped too). ``strict`` raises StrictFailure once everything is
    committed if any utterance failed (now or, same source, earlier).

    Every existing store is checked first: the chunks changed since they were written or last
    verified (file size or mtime, ``FeatureStore.damaged_changed``: a no-op run reads no frame) are
    read and their utterances compared with their checksums; a damaged store raises StoreDamaged
    naming it, unless ``repair``, which reads the whole store, recomputes just the damaged
    utterances from their sources and compacts the store. (Every read for training checks each
    utterance's checksum too; ``imer store verify`` reads everything.) Two runs on the same store at once
    split the batches between them (per-batch claims). ``stores`` replaces ``<cache>/stores`` (imer
    predict's throw-away stores: nothing is written to the shared cache)."""
    summaries: list[Summary] = []
    unavailable: dict[str, str] = {}
    cluster = Cluster(workers, scheduler, processes) if (workers > 1 or scheduler) else None
    saved = _prime_digests(manifest, stores)
    positions = {u.id: i for i, u in enumerate(manifest)}
    hashed = {k[0] for k in base._DIGESTS}
    model_files: set[str] = set()
    try:
        stages = _with_upstream(extractors)  # computes store keys: hashes model files not yet known
        model_files = {k[0] for k in base._DIGESTS} - hashed
        for ext in stages:
            t0 = time.perf_counter()
            path = store_path(manifest.dataset, ext.key, dtype, stores)
            summ = Summary(ext.name, ext.key, path)
            summaries.append(summ)
            missing = [n for n in ext.requires if n in unavailable]
            if missing:
                summ.skipped = f"needs {missing[0]}, which is unavailable: {unavailable[missing[0]]}"
                unavailable[ext.name] = summ.skipped
                continue
            store = FeatureStore.open(path) if (path / "zarr.json").is_file() else None
            # the planning scan reads only chunks changed since written or verified (``repair``: all)
            damaged = {} if store is None else store.damaged() if repair else store.damaged_changed(refresh=False)
            if damaged and not repair:
                raise StoreDamaged(_damage_message(path, damaged), damaged)
            todo, summ.cached, summ.failed_before, summ.no_source = plan(ext, manifest, store, retry_failed,
                                                                         force=set(damaged))
            if todo and ext.requires:
                ups = {n: store_path(manifest.dataset, ext.create_upstream(n).key, dtype, stores) for n in ext.requires}
                absent = [n for n, p in ups.items() if not (p / "zarr.json").is_file()]
                if absent:  # the upstream stage had nothing it could extract
                    summ.skipped = f"upstream stage {absent[0]!r} has no store for {manifest.dataset}"
                    continue
                ext.upstream = {n: FeatureStore.open(p) for n, p in ups.items()}
            if todo:
                try:
                    ext.check_available()  # before torch / the model library are imported
                    _resolve_device(ext)
                    if cluster is None:
                        ext.ensure_loaded()  # before creating the store: no empty store for an unavailable one
                    if store is None:
                        store = FeatureStore.open_or_create(path, dim=_dim(ext), attrs=store_attrs(ext, manifest.dataset),
                                                            dtype=dtype)
                    from tqdm.auto import tqdm  # only with work to do: a no-op rerun stays fast

                    with tqdm(total=len(todo), desc=ext.name, unit="utt", disable=not progress,
                              file=sys.stderr) as bar:
                        _run_stage(ext, store, todo, summ, cluster, bar, positions, set(damaged), retry_failed)
                except ExtractorUnavailable as e:
                    if required:
                        e.extractor = ext.name
                        raise
                    summ.skipped = str(e)
                    unavailable[ext.name] = str(e)
            if damaged and store is not None:
                # superseded damaged entries, and damaged ones no longer in the manifest, leave the store
                store.compact(drop=set(damaged) - {u.id for u, _ in todo})
                summ.repaired = len(set(damaged) & {u.id for u, _ in todo})
                left = store.damaged()
                if left:
                    raise StoreDamaged(_damage_message(path, left) + " (still damaged after a repair: "
                                       "remove the store and extract again)", left)
            summ.seconds = time.perf_counter() - t0
    finally:
        if cluster is not None:
            cluster.close()
        _save_digests(manifest, saved, model_files, stores)
    if strict:
        bad = {s.key: s.all_failed for s in summaries if s.all_failed}
        if bad:
            n = sum(len(v) for v in bad.values())
            raise StrictFailure(f"{n} utterance(s) failed extraction in {', '.join(bad)} (--strict)", summaries)
    return summaries


def _resolve_device(ext: Extractor) -> None:
    """'auto' -> cuda|cpu, only for stages with work: resolving imports torch, which a no-op run skips."""
    if ext.device == "auto":
        from pipeline.device import resolve_device

        ext.device = resolve_device("auto")


def _dim(ext: Extractor) -> int:
    """The extractor's feature width; some know it only once their model is loaded."""
    try:
        return int(ext.dim)
    except Exception:  # noqa: BLE001
        ext.ensure_loaded()
        return int(ext.dim)


def ensure_features(dataset: str, specs: dict[str, str | dict], *, device: str = "auto", data_root=None,
                    manifest=None, workers: int = 1, progress: bool = True,
                    dtype: str = "float32") -> dict[str, FeatureStore]:
    """Stores for ``specs`` ({modality: extractor name | "name:k=v" | {"name", "params"}}) on
    ``dataset``, extracting whatever is missing first; returns {modality: FeatureStore}.
    ``dtype`` float16: the ``-f16`` stores (half the disk and memory, see ``store_path``)."""
    from manifests.datasets import load_manifest
    from pipeline.device import resolve_device

    man = load_manifest(dataset, data_root, manifest)
    man.dataset = dataset
    dev = device if device in ("auto", "cpu") else resolve_device(device)  # 'auto' resolves once there is work
    exts = {}
    for mod, spec in specs.items():
        ext = make_extractor(spec, dev)
        if mod in base.MODALITIES and ext.modality != mod:
            raise ValueError(f"extractor {ext.name!r} is a {ext.modality} extractor, not {mod}")
        exts[mod] = ext
    def unavailable(mod: str, name: str, e: Exception) -> ExtractorUnavailable:
        return ExtractorUnavailable(
            f"the {mod} extractor {name!r} cannot run here for dataset {dataset!r}: {e}. Two ways out: provide "
            f"its weights as said, or train on features that run offline: add `--features offline` "
            f"(train/feature_sets.yaml)")

    for mod, ext in exts.items():
        try:
            ext.key  # resolves the model (an unavailable one fails here, before any work)
        except ExtractorUnavailable as e:
            raise unavailable(mod, ext.name, e) from None
    try:
        summaries = run_features(man, list(exts.values()), workers=workers, progress=progress, dtype=dtype)
    except ExtractorUnavailable as e:
        name = getattr(e, "extractor", None)
        mod = next((m for m, x in exts.items() if x.name == name), None)
        if mod is None:
            raise
        raise unavailable(mod, name, e) from None
    for s in summaries:
        if s.computed or s.failed:
            print(f"imer: {s.line()}", file=sys.stderr)
    return {mod: FeatureStore.open(store_path(man.dataset, ext.key, dtype)) for mod, ext in exts.items()}
