"""The evaluator's torch RNG for stochastic methods (IMDer's sampling; train.evaluation.evaluate):
seeded per (seed, column, batch) inside a forked RNG. Checked from the outputs of a method whose
prediction is pure noise: a rerun repeats them, another seed, another column or another batch of
the same column draws other noise, a column's numbers do not depend on which other columns are
evaluated with it, and the caller's RNG state is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from train.evaluation import evaluate
from train.methods import Method
from train.synthetic import synthetic_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Noise(Method):
    """Not registered: outputs torch.randn, so they show which RNG state each batch starts from."""

    name = "noise-stub"

    def __init__(self, spec):
        super().__init__({}, spec)
        self.w = nn.Parameter(torch.zeros(()))

    def predict(self, batch):
        return torch.randn(len(batch["present"]), 3) + self.w


@pytest.fixture(scope="module")
def setup():
    data = synthetic_data(n=16, seed=4)
    return Noise(data.spec), data


def _run(setup, columns, seed, batch_size=4):
    method, data = setup
    out = evaluate(method, data, np.arange(12), columns, batch_size=batch_size, seed=seed)
    return {c: out[c]["out"] for c in columns}


def test_noise_is_seeded_per_seed_column_and_batch(setup):
    state = torch.get_rng_state()
    a = _run(setup, ["avt", "a"], seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # forked: the caller's RNG is untouched
    again = _run(setup, ["avt", "a"], seed=0)
    other = _run(setup, ["avt", "a"], seed=1)
    alone = _run(setup, ["a"], seed=0)
    for c in ("avt", "a"):
        assert np.array_equal(a[c], again[c]), c
        assert not np.allclose(a[c], other[c]), c  # the run's seed reaches the evaluation noise
        batches = [a[c][k:k + 4] for k in (0, 4, 8)]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not np.allclose(batches[i], batches[j]), (c, i, j)  # each batch its own draw
    assert not np.allclose(a["avt"], a["a"])
    assert np.array_equal(alone["a"], a["a"])
