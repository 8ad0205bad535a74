"""FLOPs of a training step (torch's FlopCounterMode, plus the recurrent kernels it does not
count) and the machine's practical limit: a dense matmul measured in the same process."""

from __future__ import annotations

import time


def _rnn_flops(x_shape, w_ih, w_hh) -> int:
    """One LSTM/GRU layer: every step multiplies the input and the hidden state by its gate
    weights, 2 FLOPs per multiply-add; ``x_shape`` is (T, B, I) or (B, T, I)."""
    steps = x_shape[0] * x_shape[1]
    return 2 * steps * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])


def _mkldnn_rnn(x, w0, w1, *args, out_shape=None, **kw) -> int:  # CPU (oneDNN) LSTM layer
    return _rnn_flops(x, w0, w1)


def _mkldnn_rnn_backward(x, w0, w1, *args, out_shape=None, **kw) -> int:  # grad of input + weights: ~2x
    return 2 * _rnn_flops(x, w0, w1)


def _cudnn_rnn(x, weights, *args, out_shape=None, **kw) -> int:  # CUDA: weights = [w_ih, w_hh, (b_ih, b_hh)] per layer
    mats = [w for w in weights if len(w) == 2]
    return sum(_rnn_flops(x, mats[k], mats[k + 1]) for k in range(0, len(mats) - 1, 2))


def _cudnn_rnn_backward(x, weights, *args, out_shape=None, **kw) -> int:
    return 2 * _cudnn_rnn(x, weights)


def counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten.mkldnn_rnn_layer: _mkldnn_rnn, aten.mkldnn_rnn_layer_backward: _mkldnn_rnn_backward}
    if hasattr(aten, "_cudnn_rnn"):
        mapping.update({aten._cudnn_rnn: _cudnn_rnn, aten._cudnn_rnn_backward: _cudnn_rnn_backward})
    return FlopCounterMode(display=False, custom_mapping=mapping)


def matmul_limit(device: str, n: int = 1024, reps: int = 10) -> dict:
    """FLOP/s of an n x n matmul (fp16 on CUDA, as under AMP; fp32 on CPU), best of ``reps``."""
    import torch

    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flop_per_s": 2 * n ** 3 / best}
