"""Import MMIN's released features (AIM3-RUC/MMIN) into imer stores + manifest + folds.

Layout of ``feature_root``::

    A/comparE.h5          one dataset per utterance id, (T, 130), 10 Hz (MMIN downsampled x10)
    A/comparE_raw.h5      MSP-IMPROV's acoustic file (100 Hz)
    V/denseface.h5        (T, 342); a face-less utterance is a single all-zero frame
    L/bert_large.h5       (T, 1024) word pieces
    target/<cv>/{trn,val,tst}_label.npy     IEMOCAP one-hot (N, 4); MSP-IMPROV integers (N,)
    target/<cv>/{trn,val,tst}_int2name.npy  IEMOCAP (N, 1) bytes; MSP-IMPROV strings (N,)

Classes ang, hap, neu, sad = 0..3 (the IEMOCAP recipe uses the same order). Folds are MMIN's own
id lists (cv 1..10 for IEMOCAP -> protocol ``mmin10``, 1..12 for MSP-IMPROV -> ``mmin12``).
``A/comparE_mean_std.h5`` (MMIN's per-fold statistics) is not imported: imer's trainer fits its
own normalisation on each fold's training utterances.

All-zero Denseface frames are stored with mask False (no face), so the trainer treats a face-less
utterance as missing its visual modality, imer's convention for "no face".
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from manifests._common import finish_folds
from manifests.importers._stores import write_store
from manifests.schema import Fold, ManifestError, Utterance, write_manifest
from pipeline.fsutil import atomic_write_text

LABELS = ["ang", "hap", "neu", "sad"]
SPLITS = ("trn", "val", "tst")
CORPORA = {"iemocap": {"folds": 10, "protocol": "mmin10", "audio": "comparE"},
           "msp-improv": {"folds": 12, "protocol": "mmin12", "audio": "comparE_raw"}}
FRAME_RATES = {"comparE": 10.0, "comparE_raw": 100.0}
MODALITY_DIRS = {"audio": "A", "video": "V", "text": "L"}


def _speaker(corpus: str, uid: str) -> tuple[str | None, str | None]:
    import re

    if corpus == "iemocap":
        m = re.match(r"^Ses0([1-5])[FM]_.+_([FM])\d{3}$", uid)
        return (f"Ses0{m.group(1)}{m.group(2)}", m.group(1)) if m else (None, None)
    m = re.match(r"^MSP-IMPROV-S\d\d[AHSN]-([FM])0([1-6])-[RTSP]-[FM]{2}\d\d$", uid)
    return (f"{m.group(1)}0{m.group(2)}", m.group(2)) if m else (None, None)


def _names(arr: np.ndarray, path: Path) -> list[str]:
    a = np.asarray(arr)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ManifestError(f"{path}: int2name has shape {a.shape}; expected (N,) or (N, 1) utterance ids")
    return [x.decode() if isinstance(x, bytes) else str(x) for x in a.tolist()]


def _labels(arr: np.ndarray, path: Path) -> list[int]:
    a = np.asarray(arr)
    if a.ndim == 2:
        if a.shape[1] != len(LABELS):
            raise ManifestError(f"{path}: one-hot labels with {a.shape[1]} columns; MMIN has {len(LABELS)} classes")
        bad = np.flatnonzero((a != 0).sum(axis=1) != 1)
        if len(bad):
            raise ManifestError(f"{path}: row {int(bad[0])} is not one-hot ({a[bad[0]].tolist()}); "
                                "each label row needs exactly one non-zero class")
        a = a.argmax(axis=1)
    if a.ndim != 1 or (len(a) and (a.min() < 0 or a.max() >= len(LABELS))):
        raise ManifestError(f"{path}: labels must be one-hot (N, 4) or class indices 0..3, got shape {np.shape(arr)}")
    return [int(x) for x in a]


def load_npy(path: Path) -> np.ndarray:
    """A target .npy; arrays of Python objects (ids saved as a list of strings) are pickled inside
    the file and are read with the restricted unpickler, never with ``allow_pickle=True``."""
    import pickle

    from manifests.importers.mmsa import safe_unpickle

    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise ManifestError(f"{path}: not a readable .npy file ({e})") from None
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = read_header(f)
            arr = np.asarray(safe_unpickle(f))
    except (ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ManifestError(f"{path}: not a readable .npy file ({e})") from None
    return arr.reshape(shape)


def read_targets(root: Path, corpus: str) -> tuple[dict[str, int], list[Fold]]:
    tdir = root / "target"
    cvs = sorted((int(p.name) for p in tdir.iterdir() if p.is_dir() and p.name.isdigit())) if tdir.is_dir() else []
    want = CORPORA[corpus]["folds"]
    if cvs != list(range(1, want + 1)):
        raise ManifestError(f"{tdir}: expected fold folders 1..{want} for {corpus}, found {cvs or 'none'}; "
                            "point --source at MMIN's feature root (the folder holding A/, V/, L/, target/)")
    labels: dict[str, int] = {}
    folds = []
    for cv in cvs:
        parts = {}
        for s in SPLITS:
            lp, np_ = tdir / str(cv) / f"{s}_label.npy", tdir / str(cv) / f"{s}_int2name.npy"
            for p in (lp, np_):
                if not p.is_file():
                    raise ManifestError(f"{p}: missing; each target/<cv>/ needs {{trn,val,tst}}_{{label,int2name}}.npy")
            names, ys = _names(load_npy(np_), np_), _labels(load_npy(lp), lp)
            if len(names) != len(ys):
                raise ManifestError(f"{tdir / str(cv)}: {s}_int2name has {len(names)} ids but {s}_label has {len(ys)} labels")
            for n, y in zip(names, ys):
                if labels.setdefault(n, y) != y:
                    raise ManifestError(f"{lp}: {n} is labelled {LABELS[y]} here but {LABELS[labels[n]]} in another fold")
            parts[s] = names
        folds.append(Fold(str(cv), parts["trn"], parts["val"], parts["tst"]))
    return labels, folds


def _h5_items(path: Path, ids: list[str], dim: int, zero_is_invalid: bool):
    import h5py

    with h5py.File(path, "r") as f:
        for uid in ids:
            if uid not in f:
                continue
            x = np.asarray(f[uid][()], dtype=np.float32)
            if x.ndim == 1:
                x = x[None, :]
            if x.ndim != 2 or x.shape[1] != dim:
                raise ManifestError(f"{path}: {uid} has shape {x.shape}, other utterances have (T, {dim})")
            mask = np.any(x != 0, axis=1) if zero_is_invalid else None
            yield uid, x, mask, {}


def _h5_dim(path: Path, ids: list[str]) -> tuple[int, int]:
    """(feature dim, number of the ids present) of one MMIN h5 file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            present = [u for u in ids if u in f]
            if not present:
                raise ManifestError(f"{path}: none of the {len(ids)} utterance ids of the targets is in this file "
                                    f"(its first keys: {list(f.keys())[:3]}); is it the same corpus?")
            shape = f[present[0]].shape
    except OSError as e:
        raise ManifestError(f"{path}: not a readable HDF5 file ({e})") from None
    return int(shape[-1]), len(present)


def import_mmin(feature_root: str | Path, corpus: str | None = None, dataset: str | None = None,
                audio: str | None = None, video: str = "denseface", text: str = "bert_large") -> tuple[str, dict]:
    """Import one MMIN feature root; returns (dataset name, the feature map written to features.json)."""
    from manifests.datasets import manifest_dir, write_feature_map
    from extract.base import file_digest

    root = Path(feature_root).expanduser()
    if not (root / "target").is_dir():
        found = ", ".join(sorted(p.name for p in root.iterdir())) if root.is_dir() else "(no such directory)"
        raise ManifestError(f"{root}: not an MMIN feature root; expected A/<feature>.h5, V/<feature>.h5, "
                            f"L/<feature>.h5 and target/<cv>/. Found: {found}")
    if corpus is None:
        n = sum(p.is_dir() and p.name.isdigit() for p in (root / "target").iterdir())
        corpus = {10: "iemocap", 12: "msp-improv"}.get(n)
        if corpus is None:
            raise ManifestError(f"{root / 'target'}: {n} fold folders; cannot tell IEMOCAP (10) from MSP-IMPROV (12); "
                                "pass --corpus")
    if corpus not in CORPORA:
        raise ManifestError(f"unknown MMIN corpus {corpus!r}; one of {sorted(CORPORA)}")
    dataset = dataset or f"{corpus}-mmin"
    labels, folds = read_targets(root, corpus)
    ids = list(labels)

    feats = {"audio": audio or CORPORA[corpus]["audio"], "video": video, "text": text}
    mapping = {}
    for modality, feature in feats.items():
        path = root / MODALITY_DIRS[modality] / f"{feature}.h5"
        if not path.is_file():
            d = path.parent
            have = ", ".join(sorted(p.name for p in d.glob("*.h5"))) if d.is_dir() else f"(no {d.name}/ folder)"
            raise ManifestError(f"{path}: not found; MMIN's {modality} features go in {d.name}/<feature>.h5 "
                                f"(found: {have}); choose another with --{modality} NAME")
        dim, n = _h5_dim(path, ids)
        if n < len(ids):
            print(f"{path.name}: {len(ids) - n} of the {len(ids)} utterances in target/ are not in this file "
                  f"(kept without {modality})")
        digest = file_digest(path)
        key = f"mmin-{feature}-{digest[:12]}"
        mapping[modality] = write_store(
            dataset, key, modality=modality, dim=dim, frame_rate=FRAME_RATES.get(feature), total=n,
            attrs={"name": f"mmin-{feature}", "format": "mmin", "feature": feature, "source": str(path),
                   "source_digest": digest},
            items=_h5_items(path, ids, dim, zero_is_invalid=(modality == "video")), desc=f"{modality} {feature}")

    utts = []
    for uid in ids:
        spk, sess = _speaker(corpus, uid)
        y = labels[uid]
        utts.append(Utterance(id=uid, dataset=dataset, speaker=spk, session=sess,
                              label=LABELS[y], label_index=y, extra={"imported": "mmin"}))
    out = manifest_dir(dataset)
    write_manifest(out / "manifest.jsonl", utts, dataset, LABELS, None)
    finish_folds(out, CORPORA[corpus]["protocol"], folds, utts, dataset)
    write_feature_map(dataset, mapping)
    atomic_write_text(out / "dataset.json", _json({"protocols": [CORPORA[corpus]["protocol"]], "imported": "mmin",
                                             "corpus": corpus, "source": str(root),
                                             "labels": dict(Counter(LABELS[y] for y in labels.values()))}))
    return dataset, mapping


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1, sort_keys=True)
