"""Predict the emotion of one recording with a trained run, from any subset of audio, video, text.

Features are extracted on the fly with the run's extractor configs (the same stage runner as
``imer features``, into a throw-away store in a temp folder: the shared feature cache may be
read-only); the modalities not given are missing, exactly as in
the missing-modality test conditions. The class probabilities are averaged over the fold x
seed models the run's ``run.json`` lists (or taken from one fold with ``fold=``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from train.conditions import MODALITIES
from train.data import STORE_MODALITY, MultimodalData, Sequences, apply_mask


class PredictError(ValueError):
    """Bad input to ``predict``; the message says what to give instead."""


def resolve_run(run: str | Path, results_dir=None) -> Path:
    """A run folder (holding run.json), a method folder (its newest complete run) or
    ``<dataset>/<method>`` under the results root."""
    from train.run import newest_complete, read_runs, results_root

    p = Path(run)
    cands = [p, results_root(results_dir) / p]
    for c in cands:
        if (c / "run.json").is_file():
            return c
        newest = newest_complete(read_runs(c))
        if newest is not None:
            return newest
    raise PredictError(f"{run}: not a training run (no run.json there or in a sub-folder); "
                       "give results/<dataset>/<method>/<run-id> or results/<dataset>/<method>")


def _run_json(run_dir: Path) -> dict:
    from train.results import ReportError, read_json

    try:
        return read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    except ReportError as e:
        raise PredictError(str(e)) from None


def checkpoints(run_dir: Path, fold: str | None = None) -> list[Path]:
    """The run's best.pt files (of ``fold``), each checked against the checksum of its fold's
    result.json where the fold has finished (``train.results.verified``)."""
    from train.results import ReportError, listed, verified

    try:
        pts = [d / "best.pt" for d in listed(run_dir, "best.pt")]
        if fold is not None:
            pts = [p for p in pts if p.parent.parent.name == str(fold)]
        for p in pts:
            if (p.parent / "result.json").is_file():
                verified(p.parent)
    except ReportError as e:
        raise PredictError(str(e)) from None
    if not pts:
        raise PredictError(f"{run_dir}: no trained model{' for fold ' + str(fold) if fold else ''} "
                           "(folds/<fold>/seed<s>/best.pt); finish the run with imer train first")
    return pts


def extract_inputs(features: dict, inputs: dict, dims: dict, invalid_frames: str = "drop",
                   device: str = "cpu") -> dict[str, np.ndarray | None]:
    """{a/v/t: (T, D) features or None} for ``inputs`` ({"audio": path, "video": path, "text": str})
    using the extractor specs ``features`` ({"audio": {name, params}, ...})."""
    from manifests.schema import Manifest, Media, Utterance
    from pipeline.runner import make_extractor, run_features
    from pipeline.store import FeatureStore, store_path

    utt = Utterance("input", audio=Media(str(inputs["audio"])) if inputs.get("audio") else None,
                    video=Media(str(inputs["video"])) if inputs.get("video") else None, text=inputs.get("text"))
    for mod in ("audio", "video"):
        if inputs.get(mod) and not Path(inputs[mod]).is_file():
            what = "not a regular file (a directory, FIFO or device)" if Path(inputs[mod]).exists() else "no such file"
            raise PredictError(f"--{mod} {inputs[mod]}: {what}")
    dataset = "_predict"
    out: dict[str, np.ndarray | None] = {m: None for m in MODALITIES}
    with tempfile.TemporaryDirectory(prefix="imer-predict-") as scratch:
        for m in MODALITIES:
            mod = STORE_MODALITY[m]
            if not inputs.get(mod):
                continue
            ext = make_extractor(features[mod], device)
            run_features(Manifest([utt], dataset=dataset), [ext], progress=False, stores=Path(scratch))
            store = FeatureStore.open(store_path(dataset, ext.key, root=Path(scratch)))
            fails = store.failures()
            if "input" in fails:
                raise PredictError(f"--{mod} {inputs[mod]}: {ext.name} could not extract it ({fails['input']['reason']})")
            x = np.asarray(store["input"], np.float32)
            if x.shape[1] != dims[m]:
                raise PredictError(f"{ext.name} gives {x.shape[1]}-d features, the run was trained on {dims[m]}-d")
            out[m] = apply_mask(x, np.asarray(store.mask("input"), bool), invalid_frames)
    return out


def predict_features(run_dir: Path, seqs: dict, fold: str | None = None, device: str = "cpu") -> dict:
    """Class probabilities (or the regression value) for one utterance's features ``seqs``
    ({a/v/t: (T, D) or None}), averaged over the run's models."""
    import torch

    from train.conditions import condition_of
    from train.trainer import evaluate, load_checkpoint

    given = [seqs.get(m) is not None and len(seqs[m]) > 0 for m in MODALITIES]
    if not any(given):
        raise PredictError("nothing to predict from: give at least one of --audio, --video, --text "
                           "(or the given input had no usable frame, e.g. no face in the video)")
    cond = condition_of(given)
    outs, labels, task = [], None, None
    for pt in checkpoints(run_dir, fold):
        method, norm, cfg = load_checkpoint(pt, device)
        spec = method.spec
        labels, task = spec.labels, spec.task
        data = MultimodalData(["input"], [0 if task == "classification" else 0.0],
                              {m: Sequences.from_list([seqs.get(m)], spec.dims[m]) for m in MODALITIES},
                              labels=labels, task=task, max_len=cfg.get("data", {}).get("max_len"),
                              fixed_len=bool(cfg.get("data", {}).get("fixed_len")),
                              resample_to=cfg.get("data", {}).get("resample_to"))
        res = evaluate(method, data, [0], [cond], norm, 1, device)
        o = torch.from_numpy(res[cond]["out"][0])
        outs.append(torch.softmax(o, -1).numpy() if task == "classification" else o.numpy())
    mean = np.mean(outs, axis=0)
    result = {"run": str(run_dir), "condition": cond, "models": len(outs)}
    if task == "classification":
        k = int(np.argmax(mean))
        result.update(label=labels[k] if labels else k,
                      probabilities={(labels[i] if labels else str(i)): float(p) for i, p in enumerate(mean)})
    else:
        result.update(value=float(mean.reshape(-1)[0]))
    return result


def predict(run, audio=None, video=None, text=None, fold=None, device: str = "cpu", results_dir=None) -> dict:
    """Label and class probabilities of one recording given any subset of audio file, video file
    and transcript, with the models of training run ``run``."""
    from pipeline.device import resolve_device
    from pipeline.fsutil import safe_torch_load

    run_dir = resolve_run(run, results_dir)
    device = resolve_device(device)
    ck = safe_torch_load(checkpoints(run_dir, fold)[0], "cpu")
    cfg, dims = ck["config"], ck["spec"]["dims"]
    feats = _run_json(run_dir).get("features", {})
    imported = sorted({str(f.get("format")) for f in feats.values() if isinstance(f, dict) and f.get("format")})
    if imported:
        raise PredictError(f"{run_dir}: trained on imported {'/'.join(imported)} features, which imer cannot "
                           "compute from media; train on features imer extracts to predict from recordings")
    inputs = {"audio": audio, "video": video, "text": text}
    if not any(inputs.values()):
        raise PredictError("give at least one of --audio X.wav, --video Y.mp4, --text '...'")
    seqs = extract_inputs(cfg["features"], inputs, dims, cfg.get("data", {}).get("invalid_frames", "drop"), device)
    return predict_features(run_dir, seqs, fold, device)
