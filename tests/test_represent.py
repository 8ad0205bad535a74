"""``Method.represent``: the joint representation each imagination method's classifier reads, for
the comparison report's t-SNE. It is (B, d), reads the masked inputs only (never ``x_full``) and
moves when a modality is masked; the other methods have none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.conditions import apply_availability
from train.config import load_config
from train.methods import build
from train.synthetic import synthetic_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGINATION = ["mmin", "if-mmin", "cm-arr", "imder", "emmr"]
# the demo configs, shrunk where a net is large: the mechanism is the same at any width
SMALL = {"imder": {"model.score": {"channels": [8, 16], "embed_dim": 16, "heads": 2, "attn_layers": 1},
                   "model.refine": {"blocks": 1, "reduction": 4},
                   "model.sampler": {"test": {"kind": "em", "steps": 2}}},
         "cm-arr": {"model.dim": 8, "model.heads": 2, "model.flow": {"steps": 2, "hidden": [8, 8]},
                    "model.refine": {"blocks": 2, "reduction": 4}, "model.classifier": [8]},
         "emmr": {"model.encoder": {"dim": 16, "heads": 2, "dropout": 0.0}, "model.tf": {"ffn": 16},
                  "model.ae": {"layers": [12, 8, 4]}, "model.cra": {"layers": [12, 8, 4], "blocks": 2}}}
B = 8


@pytest.fixture(scope="module")
def data():
    d = synthetic_data(n=B, dims={"a": 5, "v": 4, "t": 6}, seed=4)
    d.resample_to = 6  # one common length (CM-ARR needs it; the others do not mind)
    return d


def _model(name, spec):
    torch.manual_seed(0)
    m = build(load_config(name, "demo", SMALL.get(name, {})), spec)
    return m.eval()


HEAD = {"imder": lambda m: m.backbone.out}  # the layer that reads the representation (else m.classifier)


def _masked(batch, avail, x_full=None):
    b = apply_availability(batch, avail)
    if x_full is None:
        b.pop("x_full")  # as the evaluator does: a method reading it would fail
    else:
        b["x_full"] = x_full
    b["phase"] = "test"
    return b


def _call(fn, b, seed=0):
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)  # IMDer samples: evaluation-style, seeded
        return fn(b)


@pytest.mark.parametrize("name", IMAGINATION)
def test_represent_reads_the_masked_input_only(name, data):
    model = _model(name, data.spec)
    batch = data.collate(np.arange(B))
    full = np.ones((B, 3), bool)
    miss = full.copy()
    miss[:, 0] = False  # audio missing
    r_full = _call(model.represent, _masked(batch, full))
    assert r_full.ndim == 2 and r_full.shape[0] == B and r_full.shape[1] > 1
    assert torch.isfinite(r_full).all()
    r_miss = _call(model.represent, _masked(batch, miss))
    assert r_miss.shape == r_full.shape
    assert not torch.allclose(r_miss, r_full)  # masking a modality moves the representation

    # x_full is never read: other unmasked inputs next to the masked ones change nothing
    noise = {m: torch.randn_like(v) * 5 for m, v in batch["x"].items()}
    assert torch.equal(_call(model.represent, _masked(batch, miss, x_full=noise)), r_miss)
    # it is what the classifier reads: predict's output is the head applied to it (full input,
    # where EMMR's key-missing check never fires)
    head = HEAD.get(name, lambda m: m.classifier)(model)
    with torch.no_grad():
        want = head(r_full)
    assert torch.allclose(_call(model.predict, _masked(batch, full)), want, atol=1e-6)


def test_methods_without_a_joint_representation_return_none(data):
    for name in ("baseline", "baseline-aug"):
        model = _model(name, data.spec)
        b = apply_availability(data.collate(np.arange(B)), np.ones((B, 3), bool))
        assert model.represent(b) is None
