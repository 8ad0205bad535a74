"""Evaluation of a method under test columns (conditions, ``mr=r``, ``eta=x``: ``train.protocols``)
with the protocol's masks and per-column seeds, and the validation quantities the trainer selects
on (pooled outputs, the task loss, the selection metric).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from pipeline.device import autocast, autocast_dtype
from train import metrics, protocols
from train.conditions import MODALITIES, apply_availability, without_truth
from train.data import MultimodalData, Normalizer, batch_to


def shares_encoders(method) -> bool:
    """True when ``method`` encodes each modality on its own (``Method.encode_each``): evaluation
    then builds every condition from two encoder passes and may batch by length (a sample's
    output does not depend on its batch-mates)."""
    from train.methods import Method

    return type(method).encode_each is not Method.encode_each


def evaluate(method, data: MultimodalData, idx, columns, normalizer: Normalizer | None = None,
             batch_size: int = 256, device: str = "cpu", amp=False, seed: int = 0,
             phase: str = "test", share: bool = True, output: str = "predict") -> dict | None:
    """Raw outputs of ``method`` on rows ``idx`` under each test column (a condition, ``mr=r`` or
    ``eta=x``, see ``train.protocols``): {column: {"index": (N,), "y": (N,), "out": (N, C),
    "avail": (N, 3), "present": (N, 3)}}, rows in the order of ``idx``; ``present`` = natural
    presence & ``avail``, what the model saw.
    Masks come from (the split's ids and natural presence, protocol, seed), so every method sees
    the same ones. ``predict``
    gets the masked inputs and ``phase`` only: labels and unmasked inputs are removed first. The
    torch RNG is forked and seeded per (seed, column, batch), so a stochastic method (IMDer's
    sampling) gives the same numbers every time, whatever other columns are evaluated with it.
    A method with per-modality encoders (``shares_encoders``; ``share=False`` turns this off, for
    the bench) is encoded twice per batch, as given and with every modality zeroed, and each
    column's embeddings are picked from those two; its batches are sorted by length (less padding).
    ``output="represent"`` collects ``method.represent`` (the joint representation) instead of
    the outputs, one forward per column; None when the method has none. ``amp``: the config's
    ``train.amp`` (``pipeline.device.autocast_dtype`` decides, as for training)."""
    columns = list(columns)
    dtype = autocast_dtype(device, amp)
    idx = np.asarray(idx, dtype=np.int64)
    ids = [data.ids[i] for i in idx]
    natural = data.natural[idx]
    avail = {c: protocols.masks(c, ids, seed, natural) for c in columns}
    unit = getattr(method, "batching", "utterance")
    per_sample = share and output == "predict" and shares_encoders(method) and unit == "utterance"  # so batches may be sorted
    share = per_sample and len(columns) > 2  # two encoder passes pay off from three columns on
    if unit == "conversation":  # whole conversations of this split, rows in turn order
        from train.conversations import order as conversation_order

        order = conversation_order(data, idx)
    else:
        order = data.length_order(idx) if per_sample else np.arange(len(idx))
    res = {c: {"index": [], "y": [], "out": []} for c in columns}
    was_training = method.training
    method.eval()
    cuda = str(device).startswith("cuda")
    with torch.no_grad(), torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        start = 0
        for batch in data.batches(idx[order], batch_size, normalizer, unit=unit):
            index, y = batch.pop("index").numpy(), batch.pop("y").numpy()
            n = len(index)
            pos = order[start:start + n]
            batch = batch_to(batch, device)  # once per batch; each column masks it on the device
            if share:
                with autocast(device, dtype):
                    given = method.encode_each(without_truth(apply_availability(batch, np.ones((n, 3), bool))))
                    zeroed = method.encode_each(without_truth(apply_availability(batch, np.zeros((n, 3), bool))))
            for c in columns:
                torch.manual_seed(zlib.crc32(f"{int(seed)}|{c}|{start}".encode()))
                b = without_truth(apply_availability(batch, avail[c][pos]))
                b["phase"] = phase
                with autocast(device, dtype):
                    if share:
                        keep = b["avail"]
                        h = {m: torch.where(keep[:, i, None], given[m], zeroed[m]) for i, m in enumerate(MODALITIES)}
                        out = method.predict_from(h, b)
                    else:
                        out = getattr(method, output)(b)
                if out is None:  # represent() of a method without a joint representation
                    method.train(was_training)
                    return None
                res[c]["index"].append(index)
                res[c]["y"].append(y)
                res[c]["out"].append(out.float().cpu().numpy().reshape(n, -1))
            start += n
    method.train(was_training)
    back = np.argsort(order, kind="stable")  # rows back in the order of idx
    out = {c: {k: np.concatenate(v)[back] if v else np.zeros(0) for k, v in r.items()} for c, r in res.items()}
    for c in columns:
        out[c]["avail"] = avail[c]
        out[c]["present"] = avail[c] & natural  # what the model saw
    return out


def pooled(results: dict) -> tuple[np.ndarray, np.ndarray]:
    """All conditions' (y, out) stacked: the pooled validation set of MMIN's model selection."""
    ys = [r["y"] for r in results.values()]
    outs = [r["out"] for r in results.values()]
    return np.concatenate(ys), np.concatenate(outs)


def output_loss(method, y: np.ndarray, out: np.ndarray) -> float:
    """The validation loss: the method's own task loss (cross-entropy, or L1/MSE as configured)."""
    if len(y) == 0:
        return float("nan")
    y_t = torch.from_numpy(y).long() if method.spec.task == "classification" else torch.from_numpy(y).float()
    with torch.no_grad():
        return float(method.task_loss(torch.from_numpy(out).float(), y_t))


def select_metric(name: str | None, task: str) -> str:
    """The validation metric that picks the checkpoint: ``auto`` (or none) = UA for classification,
    MAE for regression, ``loss`` = the validation task loss (lower is better); otherwise it must
    be one the task computes."""
    if not name or name == "auto":
        return "ua" if task == "classification" else "mae"
    if name == "loss":
        return name
    known = metrics.CLASSIFICATION if task == "classification" else tuple(metrics.regression_metrics([], []))
    if name not in known:
        raise ValueError(f"select.metric {name!r} is not a {task} metric; use auto, loss or one of {', '.join(k for k in known if k != 'n')}")
    return name
