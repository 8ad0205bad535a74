"""IF-MMIN: CMD against a direct moment computation, H' in every IF-IM block (only the first
without cascade), the pretraining checkpoint loaded and the teacher frozen, loss weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.conditions import apply_availability
from train.protocols import draw
from train.config import load_config
from train.methods import build
from train.methods.if_mmin import CMD_PAIRS, IFMMIN, IFMMINPretrain, cmd, rmse
from train.synthetic import synthetic_data, synthetic_folds

# small networks: the mechanism is the same at any width
TINY = {
    "model.encoders": {"a": {"kind": "lstm", "hidden": 8, "pool": "max"},
                       "v": {"kind": "lstm", "hidden": 8, "pool": "max"},
                       "t": {"kind": "textcnn", "embed": 8, "channels": 4, "kernels": [2, 3], "dropout": 0.5}},
    "model.invariance": {"layers": [8, 8], "dropout": 0.0},
    "model.classifier": [8],
}


def tiny_cfg(name: str, **extra) -> dict:
    over = dict(TINY)
    if name != "if-mmin-pretrain":
        over["model.imagination"] = {"kind": "cra", "layers": [12, 6], "blocks": 3,
                                     "cascade": load_config(name)["model"]["imagination"]["cascade"]}
    over.update(extra)
    return load_config(name, None, over)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=48, dims={"a": 5, "v": 4, "t": 6}, seed=3)


def train_batch(data, n=16, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    batch = data.collate(np.arange(n))
    return apply_availability(batch, draw({"kind": "conditions"}, n, rng))


def pretrained(data, seed=1) -> IFMMINPretrain:
    torch.manual_seed(seed)
    return build(tiny_cfg("if-mmin-pretrain"), data.spec)


def attached(data, name="if-mmin", **extra) -> IFMMIN:
    torch.manual_seed(0)
    m = build(tiny_cfg(name, **extra), data.spec)
    m.attach({"pretrained": pretrained(data)})
    return m


# ---- CMD -----------------------------------------------------------------------------------------

def direct_cmd(x1: np.ndarray, x2: np.ndarray, k: int) -> float:
    """Eq. 1 written out per coordinate with plain loops."""
    n1, d = x1.shape
    n2 = x2.shape[0]
    mean1 = [sum(x1[i, j] for i in range(n1)) / n1 for j in range(d)]
    mean2 = [sum(x2[i, j] for i in range(n2)) / n2 for j in range(d)]
    total = sum((mean1[j] - mean2[j]) ** 2 for j in range(d)) ** 0.5
    for order in range(2, k + 1):
        c1 = [sum((x1[i, j] - mean1[j]) ** order for i in range(n1)) / n1 for j in range(d)]
        c2 = [sum((x2[i, j] - mean2[j]) ** order for i in range(n2)) / n2 for j in range(d)]
        total += sum((c1[j] - c2[j]) ** 2 for j in range(d)) ** 0.5
    return total


@pytest.mark.parametrize("k", [1, 2, 5])
def test_cmd_equals_direct_central_moments(k):
    rng = np.random.default_rng(k)
    x1 = rng.normal(size=(7, 3))
    x2 = rng.gamma(2.0, size=(7, 3))  # skewed: the odd moments differ too
    got = cmd(torch.tensor(x1), torch.tensor(x2), k).item()
    assert got == pytest.approx(direct_cmd(x1, x2, k), rel=1e-5)


def test_cmd_zero_for_equal_inputs_and_gradient_finite():
    x = torch.randn(6, 4, requires_grad=True)
    d = cmd(x, x.detach().clone(), 5)
    assert d.item() == pytest.approx(0.0, abs=1e-6)
    d.backward()
    assert torch.isfinite(x.grad).all()


def test_pretrain_loss_is_ce_plus_mean_pairwise_cmd(data):
    m = pretrained(data).eval()
    batch = data.collate(np.arange(12))
    p = m.forward_parts(batch["x"], batch["lengths"])
    H = {k: v.detach().numpy().astype(np.float64) for k, v in p["H"].items()}
    want = sum(direct_cmd(H[a], H[b], 5) for a, b in CMD_PAIRS) / 3
    _, parts = m.loss(batch)
    assert parts["cmd"].item() == pytest.approx(want, rel=1e-4)
    assert set(CMD_PAIRS) == {("t", "a"), ("t", "v"), ("a", "v")}
    # the classifier reads [h; H]
    assert m.classifier.net[0].in_features == 2 * m.encoders.out_dim


# ---- IF-IM: where H' enters ---------------------------------------------------------------------

def block_inputs(model: IFMMIN, batch):
    seen_in, seen_out = [], []
    hooks = [enc.register_forward_hook(lambda mod, i, o: seen_in.append(i[0].detach())) for enc in model.imagine.encoders]
    hooks += [dec.register_forward_hook(lambda mod, i, o: seen_out.append(o.detach())) for dec in model.imagine.decoders]
    with torch.no_grad():
        p = model.forward_parts(batch)
    for h in hooks:
        h.remove()
    return p, seen_in, seen_out


@pytest.mark.parametrize("name", ["if-mmin", "if-mmin-nocascade"])
def test_invariant_feature_enters_blocks(data, name):
    model = attached(data, name).eval()
    batch = train_batch(data)
    p, ins, outs = block_inputs(model, batch)
    h = model.encoders.fuse(p["h"])
    inv = p["inv"]
    assert inv.abs().sum() > 0
    assert len(ins) == len(model.imagine.encoders) == 3
    torch.testing.assert_close(ins[0], h + inv)  # block 1: h + H'
    for i in range(1, len(ins)):
        want = outs[i - 1] + inv if name == "if-mmin" else outs[i - 1]
        torch.testing.assert_close(ins[i], want)
    # h' = transition(last block's output); joint representation = the block latents
    torch.testing.assert_close(p["recon"], model.imagine.transition(outs[-1]))
    assert p["latent"].shape[1] == 3 * 6


def test_invariant_feature_is_the_shared_encoder_on_masked_embeddings(data):
    model = attached(data).eval()
    batch = train_batch(data)
    with torch.no_grad():
        p = model.forward_parts(batch)
        h = model.encoders(batch["x"], batch["lengths"])
        want = torch.cat([model.invariance.net(h[m]) for m in ("a", "v", "t")], -1)
    torch.testing.assert_close(p["inv"], want)


# ---- pretraining checkpoint and freezing ---------------------------------------------------------

def test_pretrained_weights_loaded_into_student_and_teacher(data):
    pre = pretrained(data)
    torch.manual_seed(0)
    m = build(tiny_cfg("if-mmin"), data.spec)
    with pytest.raises(RuntimeError, match="never loaded"):
        m.loss(train_batch(data))
    with pytest.raises(ValueError, match="if-mmin-pretrain"):
        m.attach({})
    m.attach({"pretrained": pre})
    for part, src in (("encoders", pre.encoders), ("teacher", pre.encoders),
                      ("invariance", pre.invariance), ("teacher_inv", pre.invariance)):
        for k, v in src.state_dict().items():
            torch.testing.assert_close(getattr(m, part).state_dict()[k], v, msg=f"{part}.{k}")


def test_teacher_frozen_student_finetuned(data):
    m = attached(data).train()
    assert not m.teacher.training and not m.teacher_inv.training  # dropout off in the teacher
    trainable = {id(p) for p in m.trainable_parameters()}
    for part in (m.teacher, m.teacher_inv):
        assert all(not p.requires_grad and id(p) not in trainable for p in part.parameters())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    loss, _ = m.loss(train_batch(data))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = m.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if k.startswith(("teacher.", "teacher_inv.")):
            assert not changed, k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoders."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("invariance."))


def test_freeze_switch_keeps_student_parts_at_pretrained_weights(data):
    m = attached(data, **{"model.freeze": ["invariance"]})
    trainable = {id(p) for p in m.trainable_parameters()}
    assert all(id(p) not in trainable for p in m.invariance.parameters())
    assert any(id(p) in trainable for p in m.encoders.parameters())
    with pytest.raises(ValueError, match="model.freeze"):
        build(tiny_cfg("if-mmin", **{"model.freeze": ["classifier"]}), data.spec)


def test_targets_are_teacher_on_reversed_and_full_input(data):
    m = attached(data).eval()
    batch = train_batch(data)
    t = m.teacher_targets(batch)
    with torch.no_grad():
        full = m.teacher(batch["x_full"], batch["lengths_full"])
        H = torch.cat([m.teacher_inv.net(full[k]) for k in ("a", "v", "t")], -1)
        gone = {k: ~batch["avail"][:, i] & batch["natural"][:, i] for i, k in enumerate(("a", "v", "t"))}
        rev_x = {k: batch["x_full"][k] * gone[k].float().view(-1, 1, 1) for k in gone}
        rev_len = {k: torch.where(gone[k], batch["lengths_full"][k], 1) for k in gone}  # a zeroed one: 1 frame
        rev = m.teacher.fuse(m.teacher(rev_x, rev_len))
    torch.testing.assert_close(t["invariance"], H)
    torch.testing.assert_close(t["imagination"], rev)


# ---- loss weights --------------------------------------------------------------------------------

def test_loss_weights_applied(data):
    batch = train_batch(data)
    plain = attached(data, **{"loss.ce": 1.0, "loss.imagination": 1.0, "loss.invariance": 1.0}).eval()
    weighted = attached(data, **{"loss.ce": 2.0, "loss.imagination": 3.0, "loss.invariance": 5.0}).eval()
    with torch.no_grad():
        _, a = plain.loss(batch)
        total, b = weighted.loss(batch)
        p, t = plain.forward_parts(batch), plain.teacher_targets(batch)
    for k, w in (("ce", 2.0), ("imagination", 3.0), ("invariance", 5.0)):
        assert b[k].item() == pytest.approx(w * a[k].item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(v.item() for v in b.values()), rel=1e-6)
    # RMSE, as the paper says
    want = torch.sqrt(((p["inv"] - t["invariance"]) ** 2).mean())
    assert a["invariance"].item() == pytest.approx(want.item(), rel=1e-5)
    assert a["imagination"].item() == pytest.approx(rmse(p["recon"], t["imagination"]).item(), rel=1e-6)


def test_paper_settings_and_ablations():
    cfg = load_config("if-mmin")
    assert cfg["loss"] == {"ce": 1.0, "imagination": 1.0, "invariance": 100.0, "distance": "rmse"}
    assert cfg["requires"] == {"pretrained": "if-mmin-pretrain"}
    assert cfg["model"]["imagination"]["cascade"] is True
    assert load_config("if-mmin-noinv")["loss"]["invariance"] == 0.0
    assert load_config("if-mmin-nocascade")["model"]["imagination"]["cascade"] is False
    pre = load_config("if-mmin-pretrain")
    assert pre["loss"]["cmd_moments"] == 5 and pre["train"]["missing"] == {"kind": "full"}


def test_noinv_ablation_has_no_invariance_loss(data):
    m = attached(data, "if-mmin-noinv").eval()
    _, parts = m.loss(train_batch(data))
    assert set(parts) == {"ce", "imagination"}


# ---- end to end: the runner trains the pretraining stage and IF-MMIN loads it ----------------------

def test_run_trains_pretrain_stage_and_loads_its_checkpoint(tmp_path):
    from train.run import run_experiment
    from train.trainer import load_checkpoint

    d = synthetic_data(n=45, dims={"a": 5, "v": 4, "t": 6}, seed=0)
    folds = synthetic_folds(d, 1)
    epochs = {"train.epochs": 2, "train.schedule": {"kind": "constant"}, "train.batch_size": 16}
    cfg = tiny_cfg("if-mmin", **epochs)
    run = run_experiment(d, folds, cfg, dataset="synth", seeds=[0], results_dir=tmp_path, progress=False,
                         prereq_overrides={"if-mmin-pretrain": {**TINY, **epochs}}, log=lambda *a: None)
    pre_ck = next(run.glob("prereq/if-mmin-pretrain/*/seed0/best.pt"))
    pre, _, _ = load_checkpoint(pre_ck)
    hist = (pre_ck.parent / "result.json").read_text()
    assert '"cmd"' in hist  # the stage trained with its CMD loss
    m, _, _ = load_checkpoint(next(run.glob("folds/*/seed0/best.pt")))
    assert isinstance(m, IFMMIN) and bool(m.inherited)
    for k, v in pre.encoders.state_dict().items():
        torch.testing.assert_close(m.teacher.state_dict()[k], v)
    for k, v in pre.invariance.state_dict().items():
        torch.testing.assert_close(m.teacher_inv.state_dict()[k], v)
    assert (run / "table.md").is_file()


def test_other_imagination_kind_is_refused(data):
    """H' is defined on the cascade; `--set model.imagination.kind=ae` must not silently build it."""
    with pytest.raises(ValueError, match="imagination.kind must be cra"):
        build(tiny_cfg("if-mmin", **{"model.imagination.kind": "ae"}), data.spec)
