"""eGeMAPSv02 low-level descriptors (25 dims, 100 frames/s) with the `opensmile` wheel: the
Geneva minimalistic parameter set (pitch, jitter, shimmer, loudness, formants, MFCC 1-4...).
openSMILE has no Deltas level for eGeMAPS."""

from __future__ import annotations

from extract.audio_io import load_audio
from extract.base import Extractor, Output, register
from extract.compare import SR, smile_frames


@register
class EGeMAPS(Extractor):
    name = "egemaps"
    version = "1"
    modality = "audio"
    defaults: dict = {}
    batch_size = 32
    default = True

    @property
    def dim(self) -> int:
        return 25

    @property
    def frame_rate(self) -> float:
        return 100.0

    def model_identity(self) -> dict:
        from importlib.metadata import version  # not `import opensmile`: a no-op rerun stays fast

        return {"opensmile": version("opensmile"), "feature_set": "eGeMAPSv02"}

    def load(self) -> None:
        import opensmile

        self._smile = opensmile.Smile(opensmile.FeatureSet.eGeMAPSv02, opensmile.FeatureLevel.LowLevelDescriptors)

    def extract_one(self, utt) -> Output:
        if utt.audio is None:
            raise ValueError(f"utterance {utt.id} has no audio")
        return Output(smile_frames(self._smile, load_audio(utt.audio, SR), SR, where=utt.audio.path))
