"""Evaluation metrics, computed with scikit-learn.

Classification (IEMOCAP, MSP-IMPROV, demo): WA = accuracy, UA = mean per-class recall over the
classes present in the ground truth (balanced accuracy), F1 = macro F1.
Regression (CMU-MOSI/MOSEI sentiment in [-3, 3]): ACC2 and weighted F1 on negative vs positive
with zero labels excluded (the MMSA convention) and again with zeros counted as positive
(``*_has0``), ACC7 on round(clip(y, -3, 3)), ACC3 on the sign (EMMR's 3 classes), MAE, Pearson r.
"""

from __future__ import annotations

import warnings

import numpy as np

CLASSIFICATION = ("wa", "ua", "f1")
REGRESSION = ("acc2", "acc2_has0", "f1", "acc7", "mae", "corr")
LOWER_IS_BETTER = {"mae", "loss"}
NAMES = {"wa": "WA", "ua": "UA", "f1": "F1", "acc2": "ACC2", "acc2_has0": "ACC2 (≥0)", "f1_has0": "F1 (≥0)",
         "acc7": "ACC7", "acc3": "ACC3", "mae": "MAE", "corr": "Corr"}


def classification_metrics(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score  # scikit-learn: only when scoring

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {"wa": float("nan"), "ua": float("nan"), "f1": float("nan"), "n": 0}
    with warnings.catch_warnings():  # a class absent from a tiny split is expected, not news
        warnings.simplefilter("ignore")
        return {"wa": float(accuracy_score(y_true, y_pred)),
                "ua": float(balanced_accuracy_score(y_true, y_pred)),
                "f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
                "n": int(len(y_true))}


def regression_metrics(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error

    y, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    if len(y) == 0:
        return {k: float("nan") for k in ("acc2", "f1", "acc2_has0", "f1_has0", "acc7", "acc3", "mae", "corr")} | {"n": 0}
    nz = y != 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "acc2": float(accuracy_score(y[nz] > 0, p[nz] > 0)) if nz.any() else float("nan"),
            "f1": float(f1_score(y[nz] > 0, p[nz] > 0, average="weighted", zero_division=0)) if nz.any() else float("nan"),
            "acc2_has0": float(accuracy_score(y >= 0, p >= 0)),
            "f1_has0": float(f1_score(y >= 0, p >= 0, average="weighted", zero_division=0)),
            "acc7": float(accuracy_score(np.round(np.clip(y, -3, 3)), np.round(np.clip(p, -3, 3)))),
            "acc3": float(accuracy_score(np.sign(y), np.sign(p))),
            "mae": float(mean_absolute_error(y, p)),
            "corr": float(np.corrcoef(y, p)[0, 1]) if y.std() > 0 and p.std() > 0 else float("nan"),
        }
    out["n"] = int(len(y))
    return out


def compute(task: str, y_true, output) -> dict:
    """Metrics from a method's raw output: logits (N, C) for classification, values (N,) for regression."""
    output = np.asarray(output)
    if task == "classification":
        return classification_metrics(y_true, output.argmax(-1))
    return regression_metrics(y_true, output.reshape(len(output), -1)[:, 0])


def table_metrics(task: str) -> tuple[str, ...]:
    return CLASSIFICATION if task == "classification" else REGRESSION


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None or np.isnan(old):
        return not np.isnan(new)
    return new < old if metric in LOWER_IS_BETTER else new > old
