"""Import MMSA's processed pickles (``aligned_50.pkl`` / ``unaligned_50.pkl``) into imer stores +
manifest + the ``standard`` fold.

A pickle holds ``train``/``valid``/``test``, each a dict with ``id`` (``<video>$_$<segment>``),
``raw_text``, ``audio`` (N, T, Da), ``vision`` (N, T, Dv), ``text`` (N, 50, 768: BERT features),
``text_bert`` (N, 3, 50: token ids, attention mask, segment ids), ``regression_labels`` (N,)
(sentiment in [-3, 3]), ``classification_labels``, ``annotations``; unaligned files also carry
``audio_lengths``/``vision_lengths``.

- Ids become ``<video>_<segment>`` (the MOSI/MOSEI recipes' ids); the original is ``extra.mmsa_id``.
- Text frames are the 50 BERT positions, masked by the attention mask (padding = invalid frames).
- Aligned audio/vision keep all 50 word-aligned steps (what IMDer reads); unaligned ones are cut
  to their lengths. Every store carries the attr ``aligned``; when all three say True,
  ``train.data`` keeps each step at its position (text padding zeroed and marked invalid, never
  dropped or stretched), so step k of every modality is the same word. Non-finite audio values
  (COVAREP's -inf) are set to 0, as MMSA does; the number replaced is kept in the entry's info.
- Pickles can run code when loaded: this reader only accepts numpy arrays and plain containers.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np

from manifests._common import finish_folds
from manifests.importers._stores import write_store
from manifests.schema import Fold, ManifestError, Utterance, write_manifest
from pipeline.fsutil import atomic_write_text

SPLITS = {"train": "train", "valid": "val", "test": "test"}
DIMS = {(5, 20): "mosi", (74, 35): "mosei"}  # (audio, vision) dims of MMSA's MOSI / MOSEI files
REQUIRED = ("id", "audio", "vision", "text", "regression_labels")

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles store bytes (array buffers) as latin-1 text + encode
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: an MMSA feature pickle holds only "
                                     "numpy arrays and plain containers")


def safe_unpickle(f):
    """Unpickle from an open binary file, accepting only numpy arrays and plain containers."""
    return _SafeUnpickler(f).load()


def load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = safe_unpickle(io.BufferedReader(f))
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ManifestError(f"{path}: not an MMSA feature pickle ({e})") from None
    if not isinstance(data, dict) or set(SPLITS) - set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{path}: expected a dict with train/valid/test, found {keys}")
    for s in SPLITS:
        missing = [k for k in REQUIRED if k not in data[s]]
        if missing:
            raise ManifestError(f"{path}: split {s!r} lacks {missing}; an MMSA pickle has {list(REQUIRED)} "
                                "(+ text_bert, raw_text, *_lengths)")
        n = len(data[s]["id"])
        for k in ("audio", "vision", "text", "regression_labels"):
            if len(data[s][k]) != n:
                raise ManifestError(f"{path}: split {s!r}: {k} has {len(data[s][k])} rows for {n} ids")
    return data


def imer_id(mmsa_id: str) -> tuple[str, str | None]:
    """(``<video>_<segment>``, video) from ``<video>$_$<segment>``; other ids are kept as they are."""
    if "$_$" in mmsa_id:
        vid, seg = mmsa_id.rsplit("$_$", 1)
        return f"{vid}_{seg}", vid
    return mmsa_id, None


def _items(data: dict, key: str, rows: list[tuple[str, int, str]], lengths_key: str | None):
    for split, i, uid in rows:
        d = data[split]
        x = np.asarray(d[key][i], dtype=np.float32)
        info = {}
        bad = ~np.isfinite(x)
        if bad.any():
            info["nonfinite_zeroed"] = int(bad.sum())
            x = np.where(bad, 0.0, x).astype(np.float32)
        mask = None
        if key == "text" and "text_bert" in d:
            m = np.asarray(d["text_bert"][i])[1] > 0
            if len(m) == len(x):
                mask = m
            else:  # kept without a mask, and said so in the store's note for this utterance
                info["text_mask_dropped"] = f"text_bert has {len(m)} tokens, text {len(x)}"
        if lengths_key and lengths_key in d:
            x = x[: int(d[lengths_key][i])]
            mask = None if mask is None else mask[: len(x)]
        yield uid, x, mask, info


def import_mmsa(pickle_path: str | Path, corpus: str | None = None, dataset: str | None = None) -> tuple[str, dict]:
    """Import one MMSA pickle; returns (dataset name, the feature map written to features.json)."""
    from extract.base import file_digest
    from manifests.datasets import manifest_dir, write_feature_map

    path = Path(pickle_path).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: file not found; pass MMSA's aligned_50.pkl or unaligned_50.pkl")
    data = load_pickle(path)
    aligned = "audio_lengths" not in data["train"]
    da, dv = (int(np.shape(data["train"][k])[-1]) for k in ("audio", "vision"))
    corpus = corpus or DIMS.get((da, dv))
    if corpus is None:
        raise ManifestError(f"{path}: audio/vision dims ({da}, {dv}) are neither MOSI's (5, 20) nor MOSEI's "
                            "(74, 35); pass --corpus NAME")
    dataset = dataset or f"{corpus}-{path.stem.replace('_', '')}"
    digest = file_digest(path)

    rows, utts, parts = [], [], {v: [] for v in SPLITS.values()}
    seen: dict[str, str] = {}
    for split, part in SPLITS.items():
        d = data[split]
        for i, raw_id in enumerate(d["id"]):
            raw_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            uid, vid = imer_id(raw_id)
            if uid in seen:
                raise ManifestError(f"{path}: id {raw_id!r} appears in both {seen[uid]} and {split}")
            seen[uid] = split
            value = float(np.asarray(d["regression_labels"][i]).reshape(-1)[0])
            text = d["raw_text"][i] if "raw_text" in d else None
            extra = {"mmsa_id": raw_id, "imported": "mmsa"}
            if "annotations" in d:
                extra["annotation"] = str(d["annotations"][i])
            utts.append(Utterance(id=uid, dataset=dataset, session=vid, value=value,
                                  text=str(text) if text is not None else None, extra=extra))
            rows.append((split, i, uid))
            parts[part].append(uid)

    mapping = {}
    for modality, key, lengths in (("audio", "audio", "audio_lengths"), ("video", "vision", "vision_lengths"),
                                   ("text", "text", None)):
        dim = int(np.shape(data["train"][key])[-1])
        skey = f"mmsa-{key}-{digest[:12]}"
        mapping[modality] = write_store(
            dataset, skey, modality=modality, dim=dim, frame_rate=None, total=len(rows),
            attrs={"name": f"mmsa-{key}", "format": "mmsa", "feature": key, "source": str(path),
                   "source_digest": digest, "aligned": aligned},
            items=_items(data, key, rows, None if aligned else lengths), desc=f"{modality} {key}")

    out = manifest_dir(dataset)
    write_manifest(out / "manifest.jsonl", utts, dataset, None, None)
    finish_folds(out, "standard", [Fold("standard", parts["train"], parts["val"], parts["test"])], utts, dataset)
    write_feature_map(dataset, mapping)
    atomic_write_text(out / "dataset.json", json.dumps({"protocols": ["standard"], "imported": "mmsa", "corpus": corpus,
                                                  "aligned": aligned, "source": str(path)}, indent=1))
    return dataset, mapping
