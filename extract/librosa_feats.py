"""EMMR's acoustic feature with librosa: zero-crossing rate (1) + MFCC (20) + chroma-CQT (12) = 33
dims per 10 ms frame. All three use centred frames with the same hop, so their frame counts agree
(1 + samples // hop). ZCR and MFCC use a 25 ms window (MFCC's FFT padded to the next power of two);
the CQT chooses its own per-bin windows."""

from __future__ import annotations

import numpy as np

from extract.audio_io import load_audio
from extract.base import Extractor, Output, register


@register
class LibrosaFeats(Extractor):
    name = "librosa"
    version = "1"
    modality = "audio"
    defaults = {"sr": 16000, "hop_ms": 10.0, "win_ms": 25.0, "n_mfcc": 20}
    batch_size = 32
    default = True

    @property
    def dim(self) -> int:
        return 1 + self.params["n_mfcc"] + 12

    @property
    def frame_rate(self) -> float:
        return self.params["sr"] / self.hop

    @property
    def hop(self) -> int:
        return int(round(self.params["sr"] * self.params["hop_ms"] / 1000))

    @property
    def win(self) -> int:
        return int(round(self.params["sr"] * self.params["win_ms"] / 1000))

    def model_identity(self) -> dict:
        from importlib.metadata import version  # not `import librosa`: a no-op rerun stays fast

        return {"librosa": version("librosa")}

    def extract_one(self, utt) -> Output:
        if utt.audio is None:
            raise ValueError(f"utterance {utt.id} has no audio")
        y = load_audio(utt.audio, self.params["sr"])
        if len(y) < self.win:
            raise ValueError(f"{utt.audio.path}: {len(y)} samples, shorter than one {self.params['win_ms']:g} ms window")
        return Output(librosa_features(y, self.params["sr"], self.hop, self.win, self.params["n_mfcc"]))


def librosa_features(y: np.ndarray, sr: int, hop: int, win: int, n_mfcc: int) -> np.ndarray:
    """(T, 1 + n_mfcc + 12) float32 frames, T = 1 + len(y) // hop."""
    import warnings

    import librosa

    n_fft = 1 << (win - 1).bit_length()
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=win, hop_length=hop)
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=n_mfcc, n_fft=n_fft, win_length=win, hop_length=hop)
    with warnings.catch_warnings():
        # the CQT's octave-by-octave downsampling warns on short inputs; the output is still defined
        warnings.simplefilter("ignore", UserWarning)
        chroma = librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=hop)
    n = min(zcr.shape[1], mfcc.shape[1], chroma.shape[1])
    return np.concatenate([zcr[:, :n], mfcc[:, :n], chroma[:, :n]], axis=0).T.astype(np.float32)
