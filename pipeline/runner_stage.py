"""Execution of one extractor's stage (:func:`pipeline.runner.run_features`): the missing utterances
in batches by fixed manifest position, each computed under a per-batch claim (so concurrent runs
split the work), in this process or on dask workers, and committed to the store as they come back.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from extract.base import Extractor, ExtractorUnavailable, Failure
from manifests.schema import Utterance
from pipeline.store import FeatureStore

if TYPE_CHECKING:
    from pipeline.cluster import Cluster
    from pipeline.runner import Summary


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
