"""Stage runner: plan which (extractor, utterance) pairs are missing from the stores, extract them
(in-process, or in parallel with dask), commit results in batches, and summarise.

Planning reads only fingerprints (file content hashes, remembered across runs by path, size,
mtime, ctime and inode), so a run with nothing to do starts no cluster and loads no model.
Results always come back to this process, which is the only writer of its run; the store's lock
keeps it safe next to other processes writing the same store.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from extract import base
from extract.base import Extractor, ExtractorUnavailable, Failure
from manifests.schema import Manifest, Utterance
from pipeline.cache import cache_root
from pipeline.cluster import Cluster
from pipeline.fsutil import atomic_write_json
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


# ---- remembered file digests -------------------------------------------------------------------

def _digest_file(dataset: str, stores: Path | None = None) -> Path:
    return (cache_root() / "stores" if stores is None else Path(stores)) / dataset / "_digests.json"


def _media_paths(manifest: Manifest) -> set[str]:
    return {m.path for u in manifest for m in (u.audio, u.video) if m is not None}


def _stat_key(st) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _prime_digests(manifest: Manifest, stores: Path | None = None) -> dict:
    """Feed remembered content hashes of unchanged files (same size, mtime, ctime and inode: a
    rewrite changes ctime) to extract.base's per-process memo, so a no-op run hashes nothing:
    neither the manifest's media nor the model files hashed for store keys."""
    try:
        saved = json.loads(_digest_file(manifest.dataset, stores).read_text())
    except (OSError, ValueError):
        saved = {}
    for p, rec in saved.items():
        try:
            st = os.stat(p)
        except OSError:
            continue
        if rec[:4] == _stat_key(st):
            base._DIGESTS.setdefault((p, st.st_size, st.st_mtime_ns), rec[4])
    return saved


def _save_digests(manifest: Manifest, saved: dict, extra: set[str] = frozenset(), stores: Path | None = None) -> None:
    """Remember the digests of the manifest's media and of ``extra`` files (model files)."""
    new = {p: rec for p, rec in saved.items() if os.path.exists(p)}
    for p in _media_paths(manifest) | set(extra):
        try:
            st = os.stat(p)
        except OSError:
            continue
        d = base._DIGESTS.get((p, st.st_size, st.st_mtime_ns))
        if d is not None:
            new[p] = _stat_key(st) + [d]
    if new == saved:
        return
    path = _digest_file(manifest.dataset, stores)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, new, indent=None)
    except OSError:
        pass  # only a speed-up: a read-only cache still works


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


# ---- execution ---------------------------------------------------------------------------------

def _extract_safely(ext: Extractor, utts: list[Utterance]) -> list:
    """ext.extract(utts); if the whole batch raises, retry one by one so one bad file fails alone."""
    try:
        res = ext.extract(utts)
        if len(res) != len(utts):
            raise RuntimeError(f"extractor {ext.name!r} returned {len(res)} results for {len(utts)} utterances")
        return res
    except ExtractorUnavailable:
        raise
    except Exception as e:  # noqa: BLE001
        if len(utts) == 1:
            return [Failure(f"{type(e).__name__}: {e}")]
        return [r for u in utts for r in _extract_safely(ext, [u])]


_WORKER_EXTRACTORS: dict = {}
_WORKER_LOCK = threading.Lock()


def _work(token: str, recipe: tuple, utts: list[Utterance]) -> list:
    """Runs on a dask worker: build (once per worker thread and run) and load the extractor, extract."""
    cls, device, params, upstream = recipe
    key = (token, threading.get_ident())
    with _WORKER_LOCK:
        ext = _WORKER_EXTRACTORS.get(key)
        if ext is None:
            for k in [k for k in _WORKER_EXTRACTORS if k[0] != token]:
                del _WORKER_EXTRACTORS[k]  # a finished run's models
            ext = _WORKER_EXTRACTORS[key] = cls(device=device, **params)
            ext.upstream = {n: FeatureStore.open(p) for n, p in upstream.items()}
    ext.ensure_loaded()
    return [(u.id, r) for u, r in zip(utts, _extract_safely(ext, utts))]


def _blocks(todo: list, pos: dict, size: int) -> list[tuple[int, list]]:
    """Batches of ``todo`` by fixed manifest position (block k = positions [k*size, (k+1)*size)),
    so two processes planning the same manifest agree on which batch an utterance is in."""
    size = max(1, int(size))
    out: dict[int, list] = {}
    for u in todo:
        out.setdefault(pos[u.id] // size, []).append(u)
    return sorted(out.items())


class _Claims:
    """One lock file per batch next to the store (``<key>.claims/``): a process computes a batch
    only while it holds its claim, so two concurrent runs split the work instead of both doing
    all of it. flock-based: the claim of a killed process is released by the OS."""

    def __init__(self, store_path: Path, size: int):
        self.dir = Path(store_path).with_name(Path(store_path).name + ".claims")
        self.size = int(size)

    def take(self, block: int, wait: bool):
        import filelock

        self.dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.dir / f"{block}-{self.size}.lock"))
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except filelock.Timeout:
            return None
        return lock


def _run_stage(ext: Extractor, store: FeatureStore, todo: list, summ: Summary, cluster: Cluster | None,
               bar, pos: dict | None = None, replace=frozenset(), retry_failed: bool = False) -> None:
    fps = {u.id: fp for u, fp in todo}
    pos = pos or {u.id: i for i, (u, _) in enumerate(todo)}
    done_here: set[str] = set()

    def pending(b: list) -> list:
        """What of batch ``b`` still needs computing (another process may have committed it)."""
        store.refresh()
        state = store.state()
        out = []
        for u in b:
            have = state.get(u.id)
            if u.id in replace and u.id not in done_here:
                out.append(u)
            elif have is None or have[0] != fps[u.id] or (not have[1] and retry_failed):
                out.append(u)
        if len(out) < len(b):
            summ.cached += len(b) - len(out)
            bar.update(len(b) - len(out))
        return out

    def commit(results: list) -> None:
        try:
            written = set(store.commit({uid: (r, fps[uid]) for uid, r in results}, replace=replace - done_here))
        except OSError as e:  # a full disk or `ulimit -f`: zarr's error names no file; the store is intact
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(store.path)) from None
        done_here.update(uid for uid, _ in results)
        failures = store.failures()
        for uid, r in results:
            if uid in failures:  # failed now (a retried failure that fails again is not rewritten)
                summ.failed[uid] = failures[uid]["reason"]
            elif uid not in written:
                summ.cached += 1  # another process committed it meanwhile
            else:
                summ.computed += 1
        bar.update(len(results))

    claims = _Claims(store.path, ext.batch_size)
    blocks = _blocks([u for u, _ in todo], pos, ext.batch_size)
    deferred = []
    if cluster is None:
        ext.ensure_loaded()

        def claimed(k, b, wait: bool) -> bool:
            """Extract batch ``k`` under its claim; False when another run holds it (no wait)."""
            lock = claims.take(k, wait=wait)  # with wait: returns once the other run committed (or died)
            if lock is None:
                return False
            try:
                b = pending(b)
                if b:
                    commit(list(zip([u.id for u in b], _extract_safely(ext, b))))
            finally:
                lock.release()
            return True

        # a batch another run is computing is left for the end, then waited for
        deferred = [(k, b) for k, b in blocks if not claimed(k, b, wait=False)]
        for k, b in deferred:
            claimed(k, b, wait=True)
        return
    from distributed import as_completed

    client = cluster.get()
    recipe = (type(ext), ext.device, dict(ext.params), {n: str(s.path) for n, s in ext.upstream.items()})
    token = uuid.uuid4().hex

    def submit(items, wait: bool) -> None:
        futures, held = [], {}
        for k, b in items:
            lock = claims.take(k, wait=wait)
            if lock is None:
                deferred.append((k, b))
                continue
            b = pending(b)
            if not b:
                lock.release()
                continue
            fut = client.submit(_work, token, recipe, b, pure=False)
            futures.append(fut)
            held[fut.key] = lock
        try:
            for fut in as_completed(futures):
                commit(fut.result())
                held.pop(fut.key).release()
                fut.release()
        finally:
            client.cancel([f for f in futures if not f.done()])
            for lock in held.values():
                lock.release()

    submit(blocks, wait=False)
    later, deferred[:] = list(deferred), []
    for item in later:
        submit([item], wait=True)


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
