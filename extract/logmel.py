"""`logmel`: log-mel filterbank frames (librosa), 25 ms window, 10 ms hop by default.

A small, real, model-free audio feature: the stage runner's and the stores' tests use it, and
it is a quick sanity feature for any corpus (`imer features --dataset demo --extractors logmel`).
"""

from __future__ import annotations

import numpy as np

from extract.base import Extractor, Output, register


@register
class LogMel(Extractor):
    name = "logmel"
    version = "1"
    modality = "audio"
    defaults = {"sr": 16000, "n_mels": 40, "win_ms": 25, "hop_ms": 10, "fmin": 0.0, "fmax": None}
    batch_size = 32

    @property
    def dim(self) -> int:
        return int(self.params["n_mels"])

    @property
    def frame_rate(self) -> float:
        return 1000.0 / self.params["hop_ms"]

    def extract_one(self, utt) -> Output:
        import librosa

        from extract.audio_io import load_audio

        p = self.params
        sr = int(p["sr"])
        y = load_audio(utt.audio, sr=sr)
        win = int(round(sr * p["win_ms"] / 1000))
        hop = int(round(sr * p["hop_ms"] / 1000))
        n_fft = 1 << (win - 1).bit_length()  # next power of two >= the window
        mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=n_fft, win_length=win, hop_length=hop,
                                             n_mels=int(p["n_mels"]), fmin=p["fmin"], fmax=p["fmax"],
                                             center=True, power=2.0)
        # log with a floor: digital silence would otherwise give -inf
        return Output(np.log(mel + 1e-10).T.astype(np.float32))
