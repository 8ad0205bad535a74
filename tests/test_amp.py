"""Mixed precision (issue 40): the precision decision (``pipeline.device.autocast_dtype``), every
registered method's training step and evaluation under CPU bf16 autocast (the dtype mismatches a
GPU would show, on a machine without one), and the float32 islands: the flows and their
log-determinants, IMDer's std(t), score scaling and perturbations, the contrastive, KL and moment
losses, each checked under autocast against a float64 reference computed here from its equation.
A new method is covered by registering it (its config of the same name is used)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.device import autocast_dtype, float32
from train.conditions import MODALITIES, apply_availability
from train.config import load_config
from train.methods import available, build
from train.synthetic import synthetic_data
from train.trainer import Trainer, evaluate

DIMS = {"a": 5, "v": 4, "t": 6}
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def bf16_exact(*shape, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """float32 values that bf16 holds exactly: casting to bf16 and back loses nothing, so the
    float64 reference and the autocast run read the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16().float()


def cpu_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---- the precision decision -----------------------------------------------------------------------

@pytest.mark.parametrize("device, amp, bf16_ok, want", [
    ("cuda", True, True, torch.bfloat16), ("cuda", True, False, torch.float16),
    ("cuda:1", "auto", False, torch.float16), ("cuda", False, True, None), ("cuda", "fp32", True, None),
    ("cuda", "fp16", True, torch.float16), ("cuda", "bf16", True, torch.bfloat16),
    ("cpu", True, True, None), ("cpu", False, True, None), ("cpu", None, True, None),
    ("cpu", "bf16", False, torch.bfloat16), ("cpu", "BF16", False, torch.bfloat16)])
def test_precision_choice(monkeypatch, device, amp, bf16_ok, want):
    """true: bf16 where the GPU has it natively, fp16 (+ GradScaler) on an older one, float32 on
    CPU (the CPU results do not move); explicit words win; false: float32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_ok)
    assert autocast_dtype(device, amp) is want


@pytest.mark.parametrize("device, amp, match", [
    ("cuda", "bf16", "no bfloat16 support"), ("cpu", "fp16", "CUDA only"), ("cpu", "fp8", "train.amp 'fp8' unknown")])
def test_precision_refusals(monkeypatch, device, amp, match):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ValueError, match=match):
        autocast_dtype(device, amp)


def test_float32_decorator_is_a_no_op_outside_autocast():
    """Outside autocast the wrapped function gets the very tensors it was given (the float32 path
    is untouched); under autocast it gets float32 copies and runs with autocast off."""
    seen = {}

    @float32
    def probe(a, b=None):
        seen.update(a=a, b=b, on=torch.is_autocast_enabled("cpu"))
        return a @ a.T

    x = torch.randn(3, 4)
    probe(x, b=x)
    assert seen["a"] is x and seen["b"] is x and not seen["on"]
    with cpu_bf16():
        out = probe(x.bfloat16(), b=x)
    assert seen["a"].dtype == torch.float32 and not seen["on"] and out.dtype == torch.float32


# ---- every registered method under CPU bf16 autocast --------------------------------------------

def registered() -> list[str]:
    return sorted(n for n in available() if not n.startswith("_"))


def _data(cfg, n: int = 12):
    d = synthetic_data(n=n, dims=DIMS, lengths={"a": (6, 12), "v": (3, 6), "t": (3, 8)}, seed=3)
    data = cfg.get("data") or {}
    d.max_len = {m: int(v) for m, v in (data.get("max_len") or {}).items() if v}
    d.fixed_len = bool(data.get("fixed_len"))
    d.resample_to = int(data["resample_to"]) if data.get("resample_to") else None
    return d


def _method(name: str, data):
    """``name`` built from its demo config, its prerequisites (untrained) attached."""
    cfg = load_config(name, "demo")
    method = build(cfg, data.spec)
    method.attach({role: _method(req, data)[0] for role, req in (cfg.get("requires") or {}).items()})
    return method, cfg


def _low_precision_outputs(method, counter: list):
    """Hooks counting leaf modules whose output is bf16 / fp16 (autocast really ran)."""
    def hook(mod, inp, out):
        if torch.is_tensor(out) and out.dtype in LOW:
            counter.append(type(mod).__name__)
    return [m.register_forward_hook(hook) for m in method.modules() if not list(m.children())]


@pytest.mark.parametrize("name", registered())
def test_method_trains_and_evaluates_under_cpu_bf16(name, tmp_path):
    cfg = load_config(name, "demo")
    data = _data(cfg)
    torch.manual_seed(0)
    method, cfg = _method(name, data)
    cfg = copy.deepcopy(cfg)
    cfg["train"]["amp"] = "bf16"  # the trainer's and evaluate's own path, as a GPU run would take it
    tr = Trainer(method, data, np.arange(6), np.arange(6, 12), cfg, tmp_path, progress=False)
    opt, _, scaler, params = tr.optimisation()
    assert tr.amp_dtype is torch.bfloat16 and not scaler.is_enabled()  # bf16 needs no GradScaler

    seen = {}
    loss_fn = method.loss

    def loss(batch):  # what the trainer hands the method, and what it gets back
        out = loss_fn(batch)
        seen.update(x={m: batch["x"][m].dtype for m in MODALITIES}, loss=out[0].dtype,
                    parts={k: v.dtype for k, v in out[1].items()})
        return out

    method.loss = loss
    before = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    low: list = []
    hooks = _low_precision_outputs(method, low)
    rec = tr.train_epoch(0, opt, scaler, params, 6, max_batches=1)
    assert low, f"{name}: no layer ran in bf16 during training: autocast was not on"
    # inputs arrive normalised in float32 (the Normalizer works in numpy); losses are float32
    assert set(seen["x"].values()) == {torch.float32}
    assert seen["loss"] == torch.float32 and set(seen["parts"].values()) <= {torch.float32}, seen
    assert math.isfinite(rec["loss"])
    moved = [n for n, p in method.named_parameters()
             if p.requires_grad and p.grad is not None and bool(p.grad.abs().sum() > 0)]
    assert moved, f"{name}: no parameter got a gradient"
    for n in moved:
        p = dict(method.named_parameters())[n]
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), before[n]), f"{name}: {n} did not update"

    low.clear()
    res = evaluate(method, data, np.arange(6, 12), ["avt", "a", "vt", "t"], device="cpu", amp=tr.amp, phase="val")
    for h in hooks:
        h.remove()
    assert low, f"{name}: no layer ran in bf16 during evaluation"
    for col, r in res.items():
        assert r["out"].dtype == np.float32 and np.isfinite(r["out"]).all(), f"{name}: {col}"


def test_fp16_trains_with_a_grad_scaler(monkeypatch, tmp_path):
    """fp16 (a GPU without bf16) goes with an enabled GradScaler that scales the loss, unscales
    before clipping and steps; run here with CPU fp16 autocast on a method without LSTMs."""
    import train.trainer as trainer

    monkeypatch.setattr(trainer, "autocast_dtype", lambda device, amp: torch.float16)
    cfg = load_config("cm-arr", "demo")
    data = _data(cfg)
    torch.manual_seed(0)
    method, cfg = _method("cm-arr", data)
    tr = Trainer(method, data, np.arange(6), np.arange(6, 12), cfg, tmp_path, progress=False)
    opt, _, scaler, params = tr.optimisation()
    assert scaler.is_enabled()
    before = [p.detach().clone() for p in params]
    rec = tr.train_epoch(0, opt, scaler, params, 2, max_batches=3)
    assert math.isfinite(rec["loss"]) and 0 < scaler.get_scale() <= 2.0 ** 16
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_amp_true_on_cpu_stays_float32(tmp_path):
    """The config default (amp: true) keeps CPU training in float32: no GradScaler, no bf16 layer."""
    cfg = load_config("baseline", "demo")
    data = _data(cfg)
    method, cfg = _method("baseline", data)
    assert cfg["train"].get("amp", True) is True
    tr = Trainer(method, data, np.arange(6), np.arange(6, 12), cfg, tmp_path, progress=False)
    opt, _, scaler, params = tr.optimisation()
    low: list = []
    hooks = _low_precision_outputs(method, low)
    tr.train_epoch(0, opt, scaler, params, 6, max_batches=1)
    for h in hooks:
        h.remove()
    assert tr.amp_dtype is None and not scaler.is_enabled() and not low


# ---- float32 islands ------------------------------------------------------------------------------

def test_flow_and_its_log_determinant_run_in_float32():
    """Under bf16 autocast the flow's z, log|det J| and inverse are float32 and equal the float32
    run; log|det J| equals the log-determinant of the Jacobian (autograd, float64 slogdet)."""
    from train.flows import GlowFlow

    torch.manual_seed(0)
    flow = GlowFlow(6, steps=2, hidden=(8, 8))
    flow.train()
    flow(torch.randn(20, 6))  # ActNorm's data-dependent init
    with torch.no_grad():
        for p in flow.parameters():  # away from the identity init
            p.add_(0.2 * torch.randn_like(p))
    flow.eval()
    x = bf16_exact(5, 6, seed=1)
    ref_z, ref_l = flow(x)
    with cpu_bf16():
        z, ladj = flow(x.bfloat16())
        back = flow.inverse(z.bfloat16().float())
    assert z.dtype == ladj.dtype == back.dtype == torch.float32
    torch.testing.assert_close(z, ref_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ladj, ref_l, rtol=1e-6, atol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[0])
    assert abs(float(torch.linalg.slogdet(jac.double())[1]) - float(ladj[0].detach())) < 1e-4
    torch.testing.assert_close(flow.inverse(ref_z), x, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def imder():
    cfg = load_config("imder", "demo")
    data = _data(cfg)
    torch.manual_seed(0)
    method, _ = _method("imder", data)
    return method, data


def test_imder_std_of_t_is_float32_and_exact(imder):
    """std(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma)) (VE SDE, sigma 25) in float32 under autocast."""
    method, _ = imder
    t = torch.tensor([1e-5, 1e-3, 0.3, 1.0])
    with cpu_bf16():
        std = method.sde.marginal_std(t)
    s = 25.0
    ref = torch.sqrt((s ** (2 * t.double()) - 1) / (2 * math.log(s)))
    assert std.dtype == torch.float32
    torch.testing.assert_close(std.double(), ref, rtol=1e-5, atol=0)


def test_imder_score_is_scaled_by_std_in_float32(imder, monkeypatch):
    """The score network's output is its last layer divided by std(t), the division in float32:
    with std(t) replaced by 1 the output times the true std(t) is the same to float32 rounding.
    The last layer is made to give bf16 (here its LayerNorm promotes it to float32 by chance)."""
    from train.methods.imder_nets import ScoreUNet

    method, _ = imder
    net = method.score["a"].eval()
    monkeypatch.setattr(net, "_attend", lambda att, h, c: ScoreUNet._attend(att, h, c).bfloat16())
    g = torch.Generator().manual_seed(2)
    d, T = method.d, 6
    x, cond = torch.randn(2, d, T, generator=g), torch.randn(2, d, T, generator=g)
    t = torch.tensor([1e-5, 0.7])
    with cpu_bf16():
        out = net(x, t, cond)
        net.marginal_std = lambda tt: torch.ones_like(tt)
        try:
            raw = net(x, t, cond)
        finally:
            net.marginal_std = method.sde.marginal_std
    std = torch.sqrt((25.0 ** (2 * t.double()) - 1) / (2 * math.log(25.0)))
    assert out.dtype == torch.float32
    torch.testing.assert_close((out.double() * std[:, None, None]), raw.double(), rtol=1e-6, atol=1e-9)


def test_imder_perturbations_and_losses_are_float32(imder):
    """In IMDer's loss under bf16 autocast, every call of a score network (training's DSM on
    x0 + std z and the sampler's steps) gets a float32 input and a float32 condition x_obs(t)
    (noise of std(t) added in float32) and returns a float32 score, while its layers run in bf16."""
    method, data = imder
    method.train()
    b = data.collate(np.arange(6))
    avail = np.ones((6, 3), bool)
    avail[0, 0] = avail[1, 1] = avail[2, 2] = avail[3, :2] = False
    b = apply_availability(b, avail)
    b["phase"] = "train"
    calls = []

    def hook(mod, inp, out):
        calls.append((inp[0].dtype, inp[2].dtype, out.dtype))
    hooks = [net.register_forward_hook(hook) for net in method.score.values()]
    low: list = []
    hooks += _low_precision_outputs(method.score, low)
    with cpu_bf16():
        loss, parts = method.loss(b)
    for h in hooks:
        h.remove()
    assert calls and low and "score" in parts
    assert set(calls) == {(torch.float32, torch.float32, torch.float32)}, set(calls)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def _supcon_ref(z, labels, tau):
    z = F.normalize(z.double(), dim=-1)
    n = len(z)
    logits = z @ z.T / tau
    total, count = 0.0, 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        log_den = torch.logsumexp(logits[i, others], 0)
        pos = [j for j in others if labels[j] == labels[i]]
        if pos:
            total += -float(torch.stack([logits[i, j] - log_den for j in pos]).mean())
            count += 1
    return total / count


def test_cm_arr_supcon_logits_are_float32():
    """L_spcl (Khosla et al.'s L_out, tau 0.07) under bf16 autocast equals the float64 reference:
    its z z^T / tau runs in float32 (a bf16 matmul errs by ~1e-2 there)."""
    from train.methods.cm_arr_nets import supcon

    z = bf16_exact(9, 16, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3])
    with cpu_bf16():
        got = supcon(z.bfloat16(), labels, 0.07)
    assert got.dtype == torch.float32
    assert abs(float(got) - _supcon_ref(z, labels, 0.07)) < 1e-5


@pytest.mark.parametrize("kind", ["w2", "cosine"])
def test_cm_arr_alignment_infonce_is_float32(kind):
    """L_udcl for one pair (Eqs. 1-5): S = a * D_2W + b (or the cosine of the means), logits S /
    tau, cross-entropy in both directions; float32 under bf16 autocast, equal to float64."""
    from train.methods.cm_arr_nets import Similarity, info_nce

    d = 16
    sim = Similarity(d, kind, learn=True)
    with torch.no_grad():
        sim.a_raw.fill_(-2.0)
        sim.b.fill_(0.3)
    mu1, s1, mu2, s2 = (bf16_exact(6, d, seed=k).abs() if k % 2 else bf16_exact(6, d, seed=k) for k in range(4))
    tau = torch.tensor(0.07)
    with cpu_bf16(), torch.no_grad():
        got = info_nce(sim(mu1.bfloat16(), s1.bfloat16(), mu2.bfloat16(), s2.bfloat16()), tau)
    m1, m2, v1, v2 = mu1.double(), mu2.double(), s1.double(), s2.double()
    if kind == "w2":
        dist = ((m1[:, None] - m2[None]) ** 2).sum(-1) + ((v1[:, None] - v2[None]) ** 2).sum(-1)
        S = -F.softplus(torch.tensor(-2.0, dtype=torch.float64)) * dist + 0.3
    else:
        S = (m1 / m1.norm(dim=1, keepdim=True)) @ (m2 / m2.norm(dim=1, keepdim=True)).T
    logits = S / 0.07
    tgt = torch.arange(6)
    ref = F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(ref)) < 1e-4 * max(1.0, abs(float(ref)))


def test_emmr_kl_and_pair_weights_are_float32():
    """Eqs. 15-16's symmetric KL between per-frame softmaxes and Eq. 10's pair weights under bf16
    autocast equal their float64 references."""
    from train.methods.emmr_nets import pair_weights, sym_kl

    a, b = bf16_exact(2, 5, 12, scale=3.0, seed=4), bf16_exact(2, 5, 12, scale=3.0, seed=5)
    frames = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pa, pb = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    kl = 0.5 * ((pa * (pa.log() - pb.log())).sum(-1) + (pb * (pb.log() - pa.log())).sum(-1))
    ref = float(kl[frames].mean())
    logits = bf16_exact(4, 3, 5, scale=2.0, seed=6)
    ref_w = torch.softmax(torch.softmax(logits.double(), -1).amax(-1), -1)
    with cpu_bf16():
        got, w = sym_kl(a.bfloat16(), b.bfloat16(), frames), pair_weights(logits.bfloat16())
    assert got.dtype == w.dtype == torch.float32
    assert abs(float(got) - ref) < 1e-5
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-6, atol=1e-7)


def test_if_mmin_cmd_and_rmse_are_float32():
    """CMD (IF-MMIN Eq. 1, K = 5: ||mean1 - mean2|| + sum_k ||E c1^k - E c2^k||) and RMSE under bf16
    autocast equal their float64 references (5th powers: half precision loses them)."""
    from train.methods.if_mmin import cmd, rmse

    x1, x2 = bf16_exact(16, 8, scale=2.0, seed=7), (bf16_exact(16, 8, scale=2.0, seed=8) + 0.5).bfloat16().float()
    a, b = x1.double(), x2.double()
    c1, c2 = a - a.mean(0), b - b.mean(0)
    ref = float((a.mean(0) - b.mean(0)).norm() + sum((c1.pow(k).mean(0) - c2.pow(k).mean(0)).norm() for k in range(2, 6)))
    ref_rmse = float(((a - b) ** 2).mean().sqrt())
    with cpu_bf16():
        got, r = cmd(x1.bfloat16(), x2.bfloat16(), 5), rmse(x1.bfloat16(), x2.bfloat16())
    assert got.dtype == r.dtype == torch.float32
    assert abs(float(got) - ref) < 1e-5 * ref and abs(float(r) - ref_rmse) < 1e-6 * ref_rmse
