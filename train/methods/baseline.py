"""Full-modality and augmented baselines (MMIN §4.4, the authors' UttFusionModel).

EncA/EncV (LSTM + max-pool), EncT (TextCNN) -> concat (a, v, t) -> FC classifier. The two
baselines differ only in training data, which is a config switch: ``baseline`` trains on full
data (``train.missing: {kind: full}``), ``baseline-aug`` pools full data with the six missing
conditions (each training sample draws one of the seven conditions uniformly).

Precision (mixed precision, ``train.amp``): the task loss (``Method.task_loss``) runs in float32 on
float32 outputs; the encoders and classifier run in the autocast dtype.
"""

from __future__ import annotations

import torch

from train.methods import Method, register
from train.nets import FcClassifier, ModalityEncoders


@register
class Baseline(Method):
    name = "baseline"
    exports = ("encoders",)

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        self.encoders = ModalityEncoders(spec.dims, m["encoders"])
        self.classifier = FcClassifier(self.encoders.out_dim, m["classifier"], spec.out_dim, m.get("dropout", 0.3))

    def embed(self, x: dict, lengths: dict) -> torch.Tensor:
        """The fused (a, v, t) utterance embedding."""
        return self.encoders.fuse(self.encoders(x, lengths))

    def encode_each(self, batch):
        return self.encoders(batch["x"], batch["lengths"])

    def predict_from(self, h, batch):
        return self.classifier(self.encoders.fuse(h))

    def predict(self, batch):
        return self.predict_from(self.encode_each(batch), batch)

    def loss(self, batch):
        ce = self.task_loss(self.predict(batch), batch["y"])
        return ce, {"ce": ce}
