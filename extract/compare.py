"""ComParE_2016 low-level descriptors + deltas (130 dims, 100 frames/s): MMIN's and IF-MMIN's
acoustic feature, computed with the `opensmile` wheel (libSMILEapi, no SMILExtract binary needed).

openSMILE returns the LLD level with 100N-4 rows and the Deltas level with 100N-2 rows for N
seconds; row i of both starts at i*10 ms (the extra delta rows repeat clipped end timestamps), so
the two are joined row by row and cut to the shorter. ``downsample=10`` reproduces MMIN's released
10 Hz features (``scipy.signal.resample_poly(x, 1, 10, axis=0)`` on the 100 Hz frames).
"""

from __future__ import annotations

import numpy as np

from extract.audio_io import load_audio
from extract.base import Extractor, Output, register

SR = 16000


@register
class ComParE(Extractor):
    name = "compare"
    version = "1"
    modality = "audio"
    defaults = {"downsample": 1}
    batch_size = 32
    default = True

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        d = self.params["downsample"]
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"compare: downsample must be an integer >= 1 (1 = 100 frames/s, 10 = MMIN's 10/s), got {d!r}")

    @property
    def dim(self) -> int:
        return 130

    @property
    def frame_rate(self) -> float:
        return 100.0 / self.params["downsample"]

    def model_identity(self) -> dict:
        from importlib.metadata import version  # not `import opensmile`: a no-op rerun stays fast

        return {"opensmile": version("opensmile"), "feature_set": "ComParE_2016"}

    def load(self) -> None:
        import opensmile

        fs = opensmile.FeatureSet.ComParE_2016
        self._lld = opensmile.Smile(fs, opensmile.FeatureLevel.LowLevelDescriptors)
        self._delta = opensmile.Smile(fs, opensmile.FeatureLevel.LowLevelDescriptors_Deltas)

    def extract_one(self, utt) -> Output:
        if utt.audio is None:
            raise ValueError(f"utterance {utt.id} has no audio")
        x = load_audio(utt.audio, SR)
        feats = compare_lld(x, self._lld, self._delta, where=utt.audio.path)
        d = self.params["downsample"]
        if d > 1:
            from scipy.signal import resample_poly

            if len(feats) <= d:  # MMIN's script drops these too
                raise ValueError(f"{utt.audio.path}: {len(feats)} ComParE frames, too few to downsample by {d}")
            feats = resample_poly(feats, 1, d, axis=0).astype(np.float32)
        return Output(feats)


def compare_lld(x: np.ndarray, lld, delta, sr: int = SR, where: str = "audio") -> np.ndarray:
    """(T, 130) float32: the 65 LLDs then their 65 deltas, joined by row."""
    a = smile_frames(lld, x, sr, where)
    b = smile_frames(delta, x, sr, where)
    n = min(len(a), len(b))
    return np.concatenate([a[:n], b[:n]], axis=1)


def smile_frames(smile, x: np.ndarray, sr: int, where: str = "audio") -> np.ndarray:
    """Run one openSMILE level on a signal; a signal shorter than the analysis window gives NaN rows,
    which become a clear error instead of NaN features."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Segment too short, filling with NaN": handled below
        f = smile.process_signal(x, sr).to_numpy(dtype=np.float32)
    if len(f) == 0 or np.isnan(f).any():
        raise ValueError(f"{where}: {len(x) / sr * 1000:.0f} ms of audio is too short for openSMILE "
                         f"{getattr(smile.feature_set, 'name', smile.feature_set)} frames; drop it or fix its segment")
    return f
