"""Writing imported per-utterance arrays into imer feature stores, and the dataset's feature map."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

BATCH = 256  # utterances per store commit: bounds memory for large files (BERT-large tokens)


def array_fingerprint(x: np.ndarray, mask: np.ndarray | None = None) -> str:
    """Hash of an imported utterance's values: a changed source re-imports only what changed."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((x.shape, str(x.dtype))).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    if mask is not None:
        h.update(np.ascontiguousarray(mask, dtype=bool).tobytes())
    return h.hexdigest()


def write_store(dataset: str, key: str, *, modality: str, dim: int, frame_rate: float | None,
                attrs: dict, items: Iterable[tuple[str, np.ndarray, np.ndarray | None, dict]],
                total: int | None = None, desc: str = "") -> dict:
    """Commit ``(id, features (T, dim), mask (T,) | None, info)`` items into the store at
    ``store_path(dataset, key)``; returns the feature-map entry for this modality."""
    from extract.base import Output
    from pipeline.store import FeatureStore, store_path

    path = store_path(dataset, key)
    meta = {"key": key, "name": attrs.get("name", key), "modality": modality, "dim": int(dim),
            "frame_rate": frame_rate, "dataset": dataset, **attrs}
    store = FeatureStore.open_or_create(path, dim=int(dim), attrs=meta)
    batch: dict = {}
    written = failed = 0
    for uid, x, mask, info in tqdm(items, total=total, desc=desc or key, unit="utt"):
        x = np.asarray(x, dtype=np.float32)
        batch[uid] = (Output(x, mask, info), array_fingerprint(x, mask))
        if len(batch) >= BATCH:
            written += len(store.commit(batch))
            batch = {}
    if batch:
        written += len(store.commit(batch))
    failed = len(store.failures())
    return {"key": key, "path": str(path), "dim": int(dim), "frame_rate": frame_rate,
            "utterances": len(store), "failed": failed, "written": written,
            **{k: v for k, v in attrs.items() if k in ("source", "feature", "format")}}


def open_imported(dataset: str) -> dict | None:
    """{modality: FeatureStore} of a dataset made by `imer import-features` (its ``features.json``),
    or None for a dataset whose features are extracted from media. Training uses these stores as
    they are, whatever extractors the method config names."""
    from manifests.datasets import feature_map
    from manifests.schema import ManifestError
    from pipeline.store import FeatureStore, StoreError, store_path

    mapping = feature_map(dataset)
    if not mapping:
        return None
    stores = {}
    for modality, entry in mapping.items():
        try:
            # by key under the current cache (the recorded absolute path goes stale if the cache moves)
            stores[modality] = FeatureStore.open(store_path(dataset, entry["key"]))
        except (KeyError, StoreError) as e:
            raise ManifestError(f"dataset {dataset!r}: imported {modality} store unusable ({e}); re-run "
                                f"`imer import-features` with the same --source") from None
    return stores
