"""How much emotion each modality of a demo corpus carries, measured from the media files alone
with simple, standard tools (independent of imer's extractors and models):

- audio: MFCC statistics (librosa: 20 MFCCs + deltas, mean and std over frames);
- video: pixel statistics of the face region (OpenCV: grey 12x12 thumbnails of the centre crop,
  mean and std over the frames where the face is visible);
- text: bag of words (scikit-learn CountVectorizer);
- fusion: stacking, a logistic regression on the three classifiers' class probabilities
  (see :func:`separability`).

Each is a scikit-learn logistic regression, cross-validated leave-one-speaker-out; audio and video
features are z-normalised per speaker (speaker normalisation, standard in speaker-independent
emotion recognition). Scores are unweighted accuracy (sklearn balanced_accuracy_score).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from manifests.schema import Manifest, read_manifest


def audio_features(path: str) -> np.ndarray:
    import librosa
    import soundfile as sf

    y, sr = sf.read(path, dtype="float32")
    m = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20, n_fft=512, hop_length=160)
    d = librosa.feature.delta(m)
    return np.concatenate([m.mean(1), m.std(1), d.std(1)])


def video_features(path: str, occluded: list) -> np.ndarray:
    import cv2

    cap = cv2.VideoCapture(path)
    thumbs, t = [], 0
    hidden = {i for a, b in occluded for i in range(a, b)}
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if t not in hidden:
            h, w = frame.shape[:2]
            face = cv2.cvtColor(frame[h // 8: h - h // 16, w // 6: w - w // 6], cv2.COLOR_BGR2GRAY)
            thumbs.append(cv2.resize(face, (12, 12), interpolation=cv2.INTER_AREA).astype(np.float32).ravel())
        t += 1
    cap.release()
    if not thumbs:
        raise ValueError(f"{path}: no readable frame with a visible face")
    x = np.stack(thumbs)
    return np.concatenate([x.mean(0), x.std(0)])


def _speaker_norm(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    x = x.copy()
    for s in np.unique(speakers):
        m = speakers == s
        x[m] = (x[m] - x[m].mean(0)) / (x[m].std(0) + 1e-6)
    return x


def features(manifest: Manifest, progress: bool = False) -> dict:
    from tqdm import tqdm

    utts = list(manifest)
    it = tqdm(utts, desc="features", unit="utt", disable=not progress, leave=False)
    a, v = [], []
    for u in it:
        a.append(audio_features(u.audio.path))
        v.append(video_features(u.video.path, u.extra.get("occluded", [])))
    spk = np.array([u.speaker for u in utts])
    return {"audio": _speaker_norm(np.stack(a), spk), "video": _speaker_norm(np.stack(v), spk),
            "text": [u.text for u in utts], "speaker": spk, "label": np.array([u.label for u in utts])}


def _model(modality: str):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if modality == "text":
        return make_pipeline(CountVectorizer(lowercase=True), LogisticRegression(C=1.0, max_iter=2000))
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


MODALITIES = ("audio", "video", "text")


def _rows(x, idx):
    return [x[i] for i in idx] if isinstance(x, list) else x[idx]


def _log_proba(feats: dict, train: np.ndarray, test: np.ndarray, classes: np.ndarray) -> dict:
    """Per modality: log-probabilities on ``test`` of a classifier fitted on ``train``."""
    y = feats["label"]
    out = {}
    for m in MODALITIES:
        clf = _model(m).fit(_rows(feats[m], train), y[train])
        if list(clf.classes_) != list(classes):
            raise ValueError(f"{m}: a training fold lacks a class ({sorted(set(classes) - set(clf.classes_))}); "
                             "the corpus needs every class for every speaker")
        out[m] = np.log(np.clip(clf.predict_proba(_rows(feats[m], test)), 1e-9, 1))
    return out


def _out_of_fold(feats: dict, idx: np.ndarray, classes: np.ndarray) -> dict:
    """Leave-one-speaker-out log-probabilities of every utterance in ``idx`` (a model never sees
    the speaker it predicts)."""
    from sklearn.model_selection import LeaveOneGroupOut

    lp = {m: np.zeros((len(idx), len(classes))) for m in MODALITIES}
    for tr, te in LeaveOneGroupOut().split(idx, groups=feats["speaker"][idx]):
        for m, v in _log_proba(feats, idx[tr], idx[te], classes).items():
            lp[m][te] = v
    return lp


def separability(feats: dict) -> dict:
    """Leave-one-speaker-out unweighted accuracy per modality, of their fusion, and chance.

    Fusion is stacking: a logistic regression on the three modalities' class probabilities, trained
    on out-of-fold predictions for the training speakers only (nested leave-one-speaker-out), so
    it learns how far to trust each modality without ever seeing the test speaker."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    y, groups = feats["label"], feats["speaker"]
    classes = np.unique(y)
    everyone = np.arange(len(y))
    outer = _out_of_fold(feats, everyone, classes)
    fused = np.empty(len(y), dtype=y.dtype)
    for s in np.unique(groups):
        tr, te = everyone[groups != s], everyone[groups == s]
        inner = _out_of_fold(feats, tr, classes)
        proba = np.exp(np.hstack([inner[m] for m in MODALITIES]))
        stack = LogisticRegression(C=0.1, max_iter=2000).fit(proba, y[tr])
        fused[te] = stack.predict(np.exp(np.hstack([outer[m][te] for m in MODALITIES])))
    out = {m: float(balanced_accuracy_score(y, classes[lp.argmax(1)])) for m, lp in outer.items()}
    out["fusion"] = float(balanced_accuracy_score(y, fused))
    out["chance"] = 1.0 / len(classes)
    return out


def measure(manifest_path: Path | str, progress: bool = False) -> dict:
    from threadpoolctl import threadpool_limits

    # one BLAS/OpenMP thread: these matrices are tiny, and on a busy machine extra threads only
    # spin (10-20x slower fits measured on 2 shared cores)
    with threadpool_limits(1):
        return separability(features(read_manifest(manifest_path), progress=progress))
