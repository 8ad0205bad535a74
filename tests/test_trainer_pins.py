"""The trainer's per-epoch generator (train.trainer.Trainer.train_epoch), seeded by (seed, epoch):
checked from what the method's loss receives. Each epoch shuffles and masks anew; an epoch run on
its own (as after a resume) draws exactly what it draws after the epochs before it; another seed
draws otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.config import load_config
from train.methods import build
from train.synthetic import synthetic_data
from train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"train.batch_size": 8, "model.encoders.a.hidden": 4, "model.encoders.v.hidden": 4,
        "model.encoders.t.channels": 4, "train.missing": {"kind": "missing-rate", "rates": [0.3, 0.5]}}


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=40, seed=3)


def _draws(data, tmp_path, seed, epochs):
    """{epoch: (row order, (rows, 3) availability by row)} the loss saw in each of ``epochs``."""
    cfg = load_config("baseline", "demo", TINY)
    torch.manual_seed(0)
    method = build(cfg, data.spec)
    trainer = Trainer(method, data, np.arange(32), np.arange(32, 40), cfg, tmp_path / f"s{seed}", seed=seed,
                      progress=False)
    seen = []
    loss = method.loss
    method.loss = lambda b: (seen.append((b["index"].numpy().copy(), b["avail"].numpy().copy())), loss(b))[1]
    opt, _, scaler, params = trainer.optimisation()
    out = {}
    for e in epochs:
        seen.clear()
        trainer.train_epoch(e, opt, scaler, params, 8)
        order = np.concatenate([i for i, _ in seen])
        avail = np.zeros((40, 3), bool)
        avail[order] = np.concatenate([a for _, a in seen])
        out[e] = (order, avail[:32])
    return out


def test_each_epoch_draws_its_own_order_and_masks_from_seed_and_epoch(data, tmp_path):
    run = _draws(data, tmp_path, 0, [0, 1, 2])
    for e in (0, 1, 2):
        assert sorted(run[e][0].tolist()) == list(range(32))
        assert not run[e][1].all()  # the missing-rate draw removed modalities
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not np.array_equal(run[a][0], run[b][0]), (a, b)  # reshuffled
        assert not np.array_equal(run[a][1], run[b][1]), (a, b)  # masks drawn anew
    resumed = _draws(data, tmp_path, 0, [2])  # epoch 2 alone, as a resumed run starts it
    assert np.array_equal(resumed[2][0], run[2][0]) and np.array_equal(resumed[2][1], run[2][1])
    other = _draws(data, tmp_path, 1, [0])
    assert not np.array_equal(other[0][1], run[0][1])  # the seed reaches the training masks
