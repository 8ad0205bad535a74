"""CM-ARR: flows invert with the right log-determinant, the missing-latent rule, the 2-Wasserstein
similarity, the InfoNCE and supervised contrastive terms, the refinement blocks, L_rec only on
training batches, the loss path equal to predict, the ablation switches and the t-SNE figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train import protocols
from train.conditions import apply_availability, availability
from train.config import load_config
from train.flows import ActNorm, GlowFlow
from train.methods import build
from train.methods.cm_arr import CMARR
from train.methods.cm_arr_nets import (RCAB, ChannelAttention, ConcatFusion, Refiner, Similarity, info_nce,
                                       missing_latents, supcon, w2_distance)
from train.synthetic import synthetic_data

ORDER = ("a", "v", "t")
# small networks: the mechanism is the same at any width
TINY = {"model.dim": 8, "model.heads": 2, "model.flow": {"steps": 2, "hidden": [8, 8]},
        "model.refine": {"blocks": 2, "reduction": 4}, "model.classifier": [8]}


def tiny_cfg(name="cm-arr", **extra) -> dict:
    return load_config(name, None, {**TINY, **extra})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    d = synthetic_data(n=40, dims={"a": 5, "v": 4, "t": 6}, seed=3, absent=0.1)
    d.resample_to = 6  # data.resample_to: the one common length the method needs
    return d


def train_batch(data, n=16, seed=0) -> dict:
    batch = data.collate(np.arange(n))
    b = apply_availability(batch, protocols.draw({"kind": "conditions", "choices": ["a", "v", "t", "av", "at", "vt"]}, n, np.random.default_rng(seed)))
    b["phase"] = "train"
    return b


def model(data, name="cm-arr", seed=0, **extra) -> CMARR:
    torch.manual_seed(seed)
    return build(tiny_cfg(name, **extra), data.spec)


def perturbed_flow(features=4, steps=3, seed=0) -> GlowFlow:
    g = torch.Generator().manual_seed(seed)
    f = GlowFlow(features, steps, hidden=(8, 8), generator=g)
    with torch.no_grad():  # away from the identity initialisation, so every part does something
        for p in f.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return f.eval()


# ---- flows ---------------------------------------------------------------------------------------

def test_flow_inverts_and_logdet_matches_autograd():
    f = perturbed_flow()
    x = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(1))
    z, ladj = f(x)
    assert ladj.shape == (5, 7)
    assert not torch.allclose(z, x, atol=1e-2)  # not the identity
    assert (f.inverse(z) - x).abs().max() < 1e-5
    for b, t in [(0, 0), (3, 5)]:
        jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0][0], x[b, t])
        assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[b, t], atol=1e-4)


def test_actnorm_inverts_logdet_and_data_init():
    an = ActNorm(3)
    x = torch.randn(50, 3) * torch.tensor([2.0, 0.5, 4.0]) + torch.tensor([1.0, -3.0, 0.0])
    x_pad = torch.cat([x, torch.full((10, 3), 1e3)])  # masked-out frames must not enter the statistics
    mask = torch.cat([torch.ones(50, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)])
    an.initialize(x_pad, mask)
    assert bool(an.initialized)
    y, ladj = an().call_and_ladj(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(0), torch.ones(3), atol=1e-4)
    assert (an().inv(y) - x).abs().max() < 1e-5
    jac = torch.autograd.functional.jacobian(lambda v: an()(v), x[0])
    assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[0], atol=1e-5)


def test_flow_actnorm_initialises_once_on_training_data():
    g = torch.Generator().manual_seed(0)
    f = GlowFlow(4, 2, hidden=(8, 8), generator=g).train()
    x = torch.randn(8, 6, 4) * 3 + 2
    z, _ = f(x)
    # coupling and LU start at the identity, so the first step's ActNorm standardises the output
    assert torch.allclose(z.reshape(-1, 4).mean(0), torch.zeros(4), atol=1e-4)
    state = {k: v.clone() for k, v in f.state_dict().items()}
    f(x * 10)  # a second batch leaves the initialisation alone
    assert all(torch.equal(state[k], v) for k, v in f.state_dict().items())


# ---- reconstruction: the missing latent ------------------------------------------------------------

def test_missing_latent_is_the_mean_of_the_available_ones():
    z = {m: torch.randn(4, 3, 5) for m in ORDER}
    present = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    zt = missing_latents(z, present, ORDER)
    assert torch.equal(zt[0], (z["a"][0] + z["v"][0]) / 2)
    assert torch.equal(zt[1], z["v"][1])
    assert torch.equal(zt[2], (z["a"][2] + z["t"][2]) / 2)
    assert torch.equal(zt[3], torch.zeros(3, 5))
    z["t"][0] = float("nan")  # an unavailable modality's latent never enters
    assert torch.isfinite(missing_latents(z, present, ORDER)[0]).all()


def test_model_completes_from_the_available_flows(data):
    m = model(data).eval()
    b = train_batch(data)
    b["present"] = torch.tensor([[1, 1, 0], [1, 0, 0]] * 8, dtype=torch.bool)
    valid = {n: b["frame_mask"][n] & b["present"][:, i].view(-1, 1) for i, n in enumerate(ORDER)}
    enc = m.encode(b["x"], valid)
    c = m.complete({n: enc[n]["X"] for n in ORDER}, valid, b["present"])
    za, _ = m.flows["a"](enc["a"]["X"])
    zv, _ = m.flows["v"](enc["v"]["X"])
    assert torch.allclose(c["z_tilde"][0], (za[0] + zv[0]) / 2, atol=1e-6)
    assert torch.allclose(c["z_tilde"][1], za[1], atol=1e-6)
    # the missing text is the inverse text flow of that latent, refined
    expect = m.refine["t"](m.flows["t"].inverse(c["z_tilde"][:1]))
    assert torch.allclose(c["xc"]["t"][:1], expect, atol=1e-5)
    assert torch.equal(c["xc"]["a"], enc["a"]["X"])  # available modalities pass through


def test_missing_modality_input_does_not_change_the_output(data):
    m = model(data).eval()
    batch = data.collate(np.arange(12))
    for cond in ("a", "at", "v", "vt"):
        b = apply_availability(batch, np.tile(availability(cond), (12, 1)))
        b.pop("x_full")
        out = m.predict(b)
        for i, n in enumerate(ORDER):
            if not availability(cond)[i]:
                b2 = dict(b, x={**b["x"], n: torch.randn_like(b["x"][n]) * 5})
                assert torch.equal(m.predict(b2), out), (cond, n)


# ---- alignment -------------------------------------------------------------------------------------

def test_w2_is_zero_for_identical_gaussians_and_similarity_falls_with_distance():
    mu, sig = torch.randn(3, 6), torch.rand(3, 6) + 0.1
    assert torch.allclose(w2_distance(mu, sig, mu, sig).diagonal(), torch.zeros(3), atol=1e-4)
    d = w2_distance(mu[:1], sig[:1], mu[1:2], sig[1:2])[0, 0]
    expect = ((mu[0] - mu[1]) ** 2).sum() + ((sig[0] - sig[1]) ** 2).sum()
    assert torch.allclose(d, expect, atol=1e-4)
    sim = Similarity(6)
    assert float(sim.a) < 0
    shifts = [0.0, 0.5, 1.0, 2.0, 4.0]
    s = [float(sim(mu[:1], sig[:1], mu[:1] + k, sig[:1] * (1 + k))) for k in shifts]
    assert all(x > y for x, y in zip(s, s[1:])), s


def test_info_nce_is_symmetric_and_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    s1, s2 = torch.rand(6, 4, generator=g) + 0.1, torch.rand(6, 4, generator=g) + 0.1
    sim, tau = Similarity(4, a_init=1.0), torch.tensor(0.5)
    l12 = info_nce(sim(mu1, s1, mu2, s2), tau)
    l21 = info_nce(sim(mu2, s2, mu1, s1), tau)
    assert torch.allclose(l12, l21, atol=1e-5)
    p = torch.randperm(6, generator=g)
    lp = info_nce(sim(mu1[p], s1[p], mu2[p], s2[p]), tau)
    assert torch.allclose(l12, lp, atol=1e-5)
    # positives are the same utterance: matching pairs give a lower loss than a shuffled pairing
    assert info_nce(sim(mu1, s1, mu1, s1), tau) < l12


# ---- refinement ------------------------------------------------------------------------------------

def reference_supcon(z, labels, tau):
    z = torch.nn.functional.normalize(z, dim=-1)
    total, anchors = 0.0, 0
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(torch.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
        total += -sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_supcon_counts_same_label_views_of_other_utterances():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 5, generator=g)  # 3 utterances x 3 modality views (view-major as in the loss)
    labels = torch.tensor([0, 0, 1]).repeat(3)  # utterances 0 and 1 share a label
    assert torch.allclose(supcon(z, labels, 0.1), reference_supcon(z, labels, 0.1), atol=1e-5)
    distinct = torch.tensor([0, 1, 2]).repeat(3)
    assert not torch.allclose(supcon(z, labels, 0.1), supcon(z, distinct, 0.1))
    # pulling utterance 1's views onto utterance 0's lowers the loss only when they share a label
    z2 = z.clone()
    z2[[1, 4, 7]] = z[[0, 3, 6]].mean(0)
    z2[[0, 3, 6]] = z[[0, 3, 6]].mean(0)
    assert supcon(z2, labels, 0.1) < supcon(z, labels, 0.1)


def test_refinement_keeps_shape_and_attention_in_unit_interval():
    blk = RCAB(16, reduction=4)
    x = torch.randn(3, 16, 7) * 10
    assert blk(x).shape == (3, 16, 7)
    w = blk.ca.weights(blk.body(x))
    assert w.shape == (3, 16, 1)
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    ca = ChannelAttention(16, 4)
    with torch.no_grad():
        for p in ca.parameters():
            p.mul_(20)  # large pre-activations: a missing sigmoid would leave [0, 1]
    w = ca.weights(x)
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    assert Refiner(16, blocks=3, reduction=4)(torch.randn(3, 7, 16)).shape == (3, 7, 16)


# ---- training ----------------------------------------------------------------------------------------

def test_loss_path_equals_predict(data):
    """The loss reads the unmasked inputs once (for the alignment pairs and the targets): its
    classification output must be exactly what predict gives on the masked batch."""
    m = model(data).eval()
    b = train_batch(data)
    logits = m.training_parts(b)["logits"]
    pb = {k: v for k, v in b.items() if k not in ("x_full", "y")}
    assert torch.allclose(m.predict(pb), logits, atol=1e-5)


def test_rec_loss_only_on_training_batches(data, tmp_path, monkeypatch):
    from train.trainer import Trainer, evaluate

    calls = []
    orig = CMARR.reconstruction_loss
    monkeypatch.setattr(CMARR, "reconstruction_loss", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    cfg = tiny_cfg(**{"train.epochs": 1, "train.batch_size": 8})
    m = model(data)
    tr, va = np.arange(24), np.arange(24, 40)
    Trainer(m, data, tr, va, cfg, tmp_path, progress=False).fit()
    assert len(calls) == 3  # one per training batch; validation (6 conditions) added none
    evaluate(m, data, va, ["a", "vt", "avt"])
    assert len(calls) == 3
    with pytest.raises(RuntimeError, match="training batches only"):
        m.loss(dict(train_batch(data), phase="val"))


def test_loss_terms_and_weights(data):
    m = model(data).train()
    loss, parts = m.loss(train_batch(data))
    assert set(parts) == {"ce", "udcl", "rec", "spcl"}
    assert torch.allclose(loss, sum(parts.values()))
    assert all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    for n in ORDER:  # the reconstruction gradient reaches every modality's flow
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.flows[n].parameters()), n
    m2 = model(data, **{"loss.rec": 20.0, "loss.spcl": 0.5})
    _, p2 = m2.train().loss(train_batch(data))
    assert torch.allclose(p2["rec"], 2 * parts["rec"], rtol=1e-4)
    assert torch.allclose(p2["spcl"], 5 * parts["spcl"], rtol=1e-4)


def test_ablation_configs_switch_one_thing(data):
    base = load_config("cm-arr")
    for name, key in [("cm-arr-noudcl", "loss"), ("cm-arr-nospcl", "loss"),
                      ("cm-arr-point", "model"), ("cm-arr-noattn", "model")]:
        cfg = load_config(name)
        assert {k for k in cfg if cfg[k] != base.get(k)} <= {key, "name"}, name
    _, parts = model(data, "cm-arr-noudcl").train().loss(train_batch(data))
    assert "udcl" not in parts
    _, parts = model(data, "cm-arr-nospcl").train().loss(train_batch(data))
    assert "spcl" not in parts
    assert model(data, "cm-arr-point").sim.kind == "cosine"
    assert isinstance(model(data, "cm-arr-noattn").fusion, ConcatFusion)


def test_tsne_figure(data, tmp_path):
    m = model(data)
    paths = m.figures(tmp_path, data, np.arange(20))
    assert [p.name for p in paths] == ["tsne.png"] and paths[0].stat().st_size > 1000


def test_rec_target_is_detached(data):
    """L_rec pulls the reconstruction towards the projected ground truth, not the other way: with
    text missing in every row, the text projection gets no gradient from L_rec."""
    m = model(data).train()
    b = apply_availability(data.collate(np.arange(16)), np.tile(availability("av"), (16, 1)))
    b["phase"] = "train"
    _, parts = m.loss(b)
    parts["rec"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.proj["t"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.proj["a"].parameters())


def test_run_writes_the_tsne_figure(tmp_path):
    """Through the runner: the figures hook draws tsne.png into each fold x seed folder and
    result.json lists it; the resumable checkpoint reloads with its ActNorm initialisation."""
    from train.run import run_experiment
    from train.synthetic import synthetic_folds
    from train.trainer import load_checkpoint

    d = synthetic_data(n=30, dims={"a": 5, "v": 4, "t": 6}, seed=4)
    d.resample_to = 5
    cfg = tiny_cfg(**{"train.epochs": 1, "train.batch_size": 8, "eval.conditions": ["a", "avt"]})
    run = run_experiment(d, synthetic_folds(d, 2)[:1], cfg, dataset="synth", seeds=[0], results_dir=tmp_path,
                         progress=False, log=lambda *_: None)
    import json

    res = json.loads((run / "folds" / "f1" / "seed0" / "result.json").read_text())
    assert res["figures"] == ["folds/f1/seed0/tsne.png"] and (run / res["figures"][0]).is_file()
    m, _, _ = load_checkpoint(run / "folds" / "f1" / "seed0" / "best.pt")
    assert all(bool(t.initialized) for f in m.flows.values() for t in f.transforms if hasattr(t, "initialized"))


def test_mixed_precision_forward_and_backward(data):
    """Under autocast (CUDA's fp16 in training; CPU bf16 here) the flows run in float32 and the
    completion keeps dtypes consistent: loss, gradients and predictions stay finite."""
    m = model(data).train()
    b = train_batch(data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.loss(b)
        loss.backward()
        m.eval()
        out = m.predict({k: v for k, v in b.items() if k not in ("x_full", "y")})
    assert torch.isfinite(loss) and torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
