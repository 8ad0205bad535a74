"""The CPU training step's fast paths compute what the plain ones do (issue 40, item 6):

- ``make_optimizer`` runs torch's fused kernel where torch has one, and the fused Adam / AdamW /
  SGD give the plain optimiser's parameters up to float rounding;
- ``nets.by_length`` (rows of length 1 on their own, the others cut to their longest length)
  gives each row what that row alone gives: an LSTM over its own frames, max-pooled; TextCNN's
  windows over its own frames, each kernel's max over the windows that start in it; and TextCNN's
  dropout draws the same mask as on the whole batch;
- a masked batch is masked once: ``apply_availability`` seals it, the methods' guard passes a
  sealed batch on, and a batch changed after the masking (a tensor replaced or written in place)
  is masked again.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.conditions import apply_availability, is_sealed
from train.config import load_config
from train.methods import build
from train.nets import LSTMEncoder, TextCNN
from train.synthetic import synthetic_data
from train.trainer import make_optimizer


def _fit(opt_cfg: dict, fused: bool, steps: int = 25) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = make_optimizer([{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 3e-3}],
                         opt_cfg, fused=fused)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("cfg", [{"kind": "adam", "lr": 1e-2, "betas": [0.5, 0.999]},
                                 {"kind": "adamw", "lr": 1e-2, "weight_decay": 0.01},
                                 {"kind": "sgd", "lr": 0.1, "weight_decay": 1e-4}])
def test_fused_optimiser_equals_plain(cfg):
    plain, fused = _fit(cfg, False), _fit(cfg, True)
    start = _fit(cfg, False, steps=0)
    for p, f, s in zip(plain, fused, start):
        assert (p - s).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)


def test_fused_is_the_cpu_default(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(p, {"kind": "adam", "lr": 1e-3}).defaults["fused"] is True
    monkeypatch.setenv("IMER_UNFUSED_OPTIMIZER", "1")
    assert not make_optimizer(p, {"kind": "adam", "lr": 1e-3}).defaults["fused"]


def _rows(T: int, D: int, lengths, seed: int = 0):
    """A padded batch: row i has ``lengths[i]`` random frames, zeros after."""
    g = torch.Generator().manual_seed(seed)
    ln = torch.tensor(lengths)
    x = torch.randn(len(lengths), T, D, generator=g)
    x = x * (torch.arange(T)[None, :] < ln[:, None])[..., None]
    return x, ln


def test_lstm_rows_equal_each_row_alone():
    torch.manual_seed(0)
    enc = LSTMEncoder(5, hidden=7, pool="max")
    x, ln = _rows(9, 5, [9, 1, 4, 1, 6, 2])
    out = enc(x, ln)
    for i, n in enumerate(ln.tolist()):  # the row's own frames, no padding at all
        h, _ = enc.rnn(x[i:i + 1, :n])
        torch.testing.assert_close(out[i], h[0].amax(0), rtol=1e-5, atol=1e-6)
    # gradients: the sum of the rows' own
    enc.zero_grad()
    out.sum().backward()
    fast = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    sum(enc.rnn(x[i:i + 1, :n])[0][0].amax(0).sum() for i, n in enumerate(ln.tolist())).backward()
    for f, p in zip(fast, enc.parameters()):
        torch.testing.assert_close(f, p.grad, rtol=1e-5, atol=1e-6)


def test_textcnn_rows_equal_each_row_alone():
    torch.manual_seed(0)
    enc = TextCNN(6, embed=5, channels=4, kernels=(2, 3), dropout=0.5)
    x, ln = _rows(7, 6, [7, 1, 3, 1, 2])
    enc.eval()
    out = enc(x, ln)
    for i, n in enumerate(ln.tolist()):
        xi = torch.nn.functional.pad(x[i:i + 1, :n].transpose(1, 2), (0, max(0, 3 - n)))  # own frames, zeros to fit
        pooled = []
        for conv, k in zip(enc.convs, enc.kernels):
            a = torch.relu(conv(xi))[0]  # (C, P)
            pooled.append(a[:, :max(n - k + 1, 1)].amax(1))  # windows that start in the utterance
        torch.testing.assert_close(out[i], enc.embd(torch.cat(pooled)), rtol=1e-5, atol=1e-6)
    # training: the dropout mask is drawn over the whole batch in row order, as without the split
    enc.train()
    torch.manual_seed(5)
    fast = enc(x, ln)
    torch.manual_seed(5)
    whole = enc.embd(enc.dropout(enc._pooled(x, ln)))
    torch.testing.assert_close(fast, whole, rtol=1e-5, atol=1e-6)


def _masked_batch():
    d = synthetic_data(n=6, dims={"a": 5, "v": 4, "t": 6}, lengths={"a": (6, 12), "v": (3, 6), "t": (3, 8)}, seed=3)
    avail = np.ones((6, 3), bool)
    avail[:3, 0] = False  # rows 0-2 lose audio
    return d, apply_availability(d.collate(np.arange(6)), avail)


def test_sealed_batch_and_tampering():
    _, b = _masked_batch()
    assert is_sealed(b) and is_sealed(dict(b))
    replaced = {**b, "x": {**b["x"], "a": b["x"]["a"].clone()}}
    assert not is_sealed(replaced)
    b2 = apply_availability(b, b["avail"].numpy())
    assert is_sealed(b2)
    b2["lengths"]["a"][0] = 12  # written in place after the masking
    assert not is_sealed(b2)


def test_guard_masks_a_batch_changed_after_sealing():
    d, b = _masked_batch()
    cfg = load_config("baseline", "demo")
    torch.manual_seed(0)
    m = build(cfg, d.spec).eval()
    clean = m.predict(b)
    tampered = apply_availability(b, b["avail"].numpy())
    tampered["x"]["a"][:3] = 50.0  # the masked rows' frames written in place
    tampered["lengths"]["a"][:3] = 10
    torch.testing.assert_close(m.predict(tampered), clean, rtol=0, atol=0)
