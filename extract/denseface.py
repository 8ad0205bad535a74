"""`denseface`: MMIN's visual feature, the 342-dim pooled output of a DenseNet-BC (depth 100, growth
rate 12) trained on FER+, per aligned face.

Architecture as in the MMIN authors' torch port of their TensorFlow model: a 3x3 stride-2 stem conv
with 2k = 24 channels (no BN/pool after it), three dense blocks of 16 bottleneck layers (BN-ReLU-
1x1 conv to 4k, BN-ReLU-3x3 conv to k), transitions BN-ReLU-1x1 conv (compression 0.5)-2x2 average
pool, a final BN-ReLU and global average pooling: 24 -> 216 -> 108 -> 300 -> 150 -> 342 channels
on a 64x64 gray face normalised by mean 131.0754, std 47.858177 (SPEC §2); a linear layer maps the
342 features to the FER+ classes.

The original weights are not public, so the extractor needs a checkpoint written by
``imer denseface-train`` (this module's ``save_checkpoint``); without one it is unavailable and
says how to get one. It is therefore not in the default set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.base import ExtractorUnavailable, file_digest, register
from extract.faces import FaceFeatureExtractor, gray_faces
from pipeline.cache import cache_root

FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
MEAN, STD = 131.0754, 47.858177
INPUT_SIZE = 64
CHECKPOINT_FORMAT = "imer-denseface-1"


def default_checkpoint() -> Path:
    return cache_root() / "models" / "denseface.pt"


def build_densenet(n_classes: int = len(FERPLUS_CLASSES), depth: int = 100, growth: int = 12,
                   bottleneck: int = 4, compression: float = 0.5):
    """DenseNet-BC; ``forward(x (N, 1, 64, 64))`` -> (features (N, 342), logits (N, n_classes))."""
    import torch
    from torch import nn

    n_layers = (depth - 4) // 6  # two convs per bottleneck layer, three blocks, stem + 2 transitions + fc

    def bn_relu_conv(cin, cout, k):
        return [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)]

    class DenseLayer(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.body = nn.Sequential(*bn_relu_conv(cin, bottleneck * growth, 1),
                                      *bn_relu_conv(bottleneck * growth, growth, 3))

        def forward(self, x):
            return torch.cat([x, self.body(x)], 1)

    class DenseNet(nn.Module):
        def __init__(self):
            super().__init__()
            c = 2 * growth
            mods: list[nn.Module] = [nn.Conv2d(1, c, 3, stride=2, padding=1, bias=False)]
            for b in range(3):
                for _ in range(n_layers):
                    mods.append(DenseLayer(c))
                    c += growth
                if b < 2:
                    out = int(c * compression)
                    mods += [*bn_relu_conv(c, out, 1), nn.AvgPool2d(2)]
                    c = out
            mods += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            self.features = nn.Sequential(*mods)
            self.dim = c
            self.classifier = nn.Linear(c, n_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
                elif isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            f = self.features(x).mean((2, 3))
            return f, self.classifier(f)

    return DenseNet()


def normalise(gray64, mean: float = MEAN, std: float = STD):
    """(N, 64, 64) uint8 -> (N, 1, 64, 64) float32, (x - mean) / std; numpy arrays or torch
    tensors (training on the GPU normalises there with the same rule)."""
    x = gray64.float() if hasattr(gray64, "float") and not isinstance(gray64, np.ndarray) else np.asarray(gray64, np.float32)
    return ((x - mean) / std)[:, None]


def save_checkpoint(path: str | Path, model, classes, mean: float, std: float, arch: dict, trained: dict) -> Path:
    """A plain dict of tensors and JSON-like values, loadable with torch.load(weights_only=True)."""
    from pipeline.fsutil import atomic_torch_save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": CHECKPOINT_FORMAT, "arch": dict(arch), "classes": list(classes), "mean": float(mean),
           "std": float(std), "trained": dict(trained),
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    return atomic_torch_save(doc, path)


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """(model in eval mode on ``device``, checkpoint dict without the weights)."""
    from pipeline.fsutil import safe_torch_load

    path = Path(path)
    try:
        doc = safe_torch_load(path, "cpu")
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of a wrong or damaged file
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}); "
                         "write one with `imer denseface-train`") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a denseface checkpoint (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}); write one with `imer denseface-train`")
    try:
        model = build_densenet(n_classes=len(doc["classes"]), **doc["arch"])
        model.load_state_dict(doc["state_dict"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged denseface checkpoint ({type(e).__name__}: {e}); "
                         "rewrite it with `imer denseface-train`") from None
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit DenseNet-BC {doc['arch']} ({str(e).splitlines()[0]})") from None
    meta = {k: v for k, v in doc.items() if k != "state_dict"}
    return model.eval().to(device), meta


@register
class Denseface(FaceFeatureExtractor):
    """342-dim pooled DenseNet-BC-100 (k=12, FER+) features of each aligned face (MMIN's visual feature)."""

    name = "denseface"
    version = "1"
    default = False  # the original weights are not public: a checkpoint must be trained first
    half_precision = True  # fp16 autocast on CUDA (precision auto); float32 on CPU
    defaults = {"checkpoint": None}  # path; None = $IMER_CACHE/models/denseface.pt

    @property
    def dim(self) -> int:
        return 342

    def _checkpoint(self) -> Path:
        c = self.params["checkpoint"]
        return Path(c).expanduser() if c else default_checkpoint()

    def model_identity(self) -> dict:
        p = self._checkpoint()
        return {"checkpoint": str(p), "sha": file_digest(p) if p.is_file() else None}

    def load(self) -> None:
        import torch

        p = self._checkpoint()
        if not p.is_file():
            raise ExtractorUnavailable(
                f"denseface needs a trained checkpoint and {p} does not exist (the MMIN authors' weights are not "
                "public). Either train one on FER2013 + FER+ labels (GPU advised): `imer denseface-train --fer2013 "
                f"fer2013.csv --ferplus fer2013new.csv --out {default_checkpoint()}` (found there by default), or pass "
                "a checkpoint written by that command: `imer features --extractors denseface:checkpoint=PATH`")
        try:
            self.model, self.meta = load_checkpoint(p, self.device)
        except ValueError as e:
            raise ExtractorUnavailable(str(e)) from None
        if str(self.device).startswith("cpu"):  # channels-last: ~1.2x faster on CPU, same outputs to 1e-6
            self.model.to(memory_format=torch.channels_last)
        if self.model.dim != self.dim:
            raise ExtractorUnavailable(f"{p}: its network pools {self.model.dim} features, denseface is {self.dim}-dim "
                                       "(DenseNet-BC depth 100, growth 12); retrain with the default architecture")
        self._torch = torch

    def _forward(self, crops: np.ndarray):
        torch = self._torch
        x = normalise(gray_faces(crops, INPUT_SIZE), self.meta["mean"], self.meta["std"])
        from pipeline.device import autocast, precision_dtype

        with torch.inference_mode(), autocast(str(self.device), precision_dtype(self.precision)):
            f, logits = self.model(torch.from_numpy(x).to(self.device))
        return f.float().cpu().numpy(), torch.softmax(logits.float(), -1).cpu().numpy()

    def embed(self, crops, rows, frame_size):
        return self._forward(crops)[0]

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities (N, n_classes) in the checkpoint's ``classes`` order."""
        self.ensure_loaded()
        return self._forward(crops)[1]
