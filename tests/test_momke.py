"""MoMKE: what each expert reads (its modality in stage 1, every modality in stage 2; attention
keys only where the modality is present, never across conversations), the Soft Router's weights
and the mixture they make, both stages' losses against the equations, stage 2 starting from stage
1's weights, and the no-router ablation. References are computed here with plain torch ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.conditions import MODALITIES, apply_availability, without_truth
from train.config import load_config
from train.methods import build
from train.methods.momke import MoMKE, MoMKEExperts
from train.synthetic import synthetic_data

D = 8  # small experts: the mechanism is the same at any width
TINY = {"*:model.experts": {"hidden": D, "depth": 2, "heads": 2, "mlp_ratio": 1, "attn_dropout": 0.0}}
# two conversations: rows 0-3 (turns 0-3) and rows 4-6 (turns 0-2)
CONV = torch.tensor([0, 0, 0, 0, 1, 1, 1])
TURN = torch.tensor([0, 1, 2, 3, 0, 1, 2])
# row 1 loses a, row 2 keeps only t, row 5 loses v and t; rows 4-6 never have a (conversation 1
# has no audio key at all: its audio queries attend to nothing)
AVAIL = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1], [0, 1, 0], [0, 1, 1]], bool)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=7, dims={"a": 5, "v": 4, "t": 6}, seed=3)


def batch_of(data, avail=AVAIL) -> dict:
    b = data.collate(np.arange(7))
    b.update(conversation=CONV.clone(), turn=TURN.clone(), speaker=TURN % 2)
    return apply_availability(b, avail)


def build_tiny(data, name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build(load_config(name, None, TINY), data.spec).eval()


def stage2(data, name="momke"):
    m = build_tiny(data, name, seed=0)
    m.attach({"experts": build_tiny(data, "momke-experts", seed=1)})
    return m


def mean_pool(batch, m):
    """The utterance-level view, by hand: mean over valid frames, zero where none."""
    x, fm = batch["x"][m], batch["frame_mask"][m].float()
    return (x * fm[..., None]).sum(1) / fm.sum(1, keepdim=True).clamp(min=1)


def present(batch, m):
    return batch["present"][:, MODALITIES.index(m)]


def grid(rows):
    """(7, ...) rows -> (2, 4, ...) conversations, zero padded."""
    out = rows.new_zeros((2, 4, *rows.shape[1:]))
    out[CONV, TURN] = rows
    return out


def capture(module, store: list, what="input"):
    def hook(_, args, out):
        store.append(args if what == "input" else out)
    return module.register_forward_hook(hook)


def ce(logits, y):
    """Cross-entropy as the mean negative log-likelihood, by hand."""
    return -(logits.log_softmax(-1).gather(1, y[:, None])).mean()


# ---- the expert layer ----------------------------------------------------------------------------------

def test_expert_layer_is_masked_attention_over_turns_plus_mlp(data):
    layer = build_tiny(data, "momke-experts").experts["a"].layers[0]
    torch.manual_seed(5)
    x = torch.randn(2, 4, D)
    keys = torch.tensor([[True, False, True, True], [False, False, False, False]])
    got = layer(x, keys)
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    ref = torch.zeros_like(x)
    for c in range(2):
        heads = []
        for h in range(2):
            s = slice(h * D // 2, (h + 1) * D // 2)
            sc = q[c, :, s] @ k[c, :, s].T / (D // 2) ** 0.5
            kc = keys[c]
            a = torch.zeros(4, 4) if not kc.any() else torch.softmax(sc.masked_fill(~kc, -1e30), -1)
            heads.append(a @ v[c, :, s])
        o = torch.cat(heads, -1)
        ref[c] = o + layer.mlp.fc2(F.gelu(layer.mlp.fc1(o)))
    torch.testing.assert_close(got, ref)


def test_an_expert_is_a_residual_stack_of_its_layers(data):
    expert = build_tiny(data, "momke-experts").experts["t"]
    assert len(expert.layers) == 2  # the tiny depth; the configs' is 4
    torch.manual_seed(6)
    x, keys = torch.randn(2, 4, D), torch.tensor([[True, True, False, True], [True, False, True, True]])
    ref = x
    for layer in expert.layers:
        ref = ref + layer(ref, keys)
    torch.testing.assert_close(expert(x, keys), ref)


# ---- stage 1 -------------------------------------------------------------------------------------------

def test_stage1_each_expert_reads_only_its_modality(data):
    method, b = build_tiny(data, "momke-experts"), without_truth(batch_of(data))
    seen = {m: [] for m in MODALITIES}
    hooks = [capture(method.experts[m].layers[0], seen[m]) for m in MODALITIES]
    method.predict(b)
    for h in hooks:
        h.remove()
    for m in MODALITIES:
        assert len(seen[m]) == 1, f"expert {m} called {len(seen[m])} times in stage 1"
        x, keys = seen[m][0]
        torch.testing.assert_close(x, grid(method.projections[m](mean_pool(b, m))))
        assert torch.equal(keys, grid(present(b, m)))  # padding and absent turns are no keys


def test_stage1_loss_is_the_sum_of_each_experts_ce_over_its_present_rows(data):
    method, b = build_tiny(data, "momke-experts"), batch_of(data)
    outs = {m: [] for m in MODALITIES}
    hooks = [capture(method.heads[m], outs[m], "output") for m in MODALITIES]
    total, parts = method.loss(b)
    for h in hooks:
        h.remove()
    ref = {}
    for m in MODALITIES:
        rows = present(b, m)
        ref[m] = ce(outs[m][0][rows], b["y"][rows])
        torch.testing.assert_close(parts[f"ce_{m}"], ref[m])
    torch.testing.assert_close(total, sum(ref.values()))


def test_stage1_predicts_the_mean_of_the_present_modalities_heads(data):
    method, b = build_tiny(data, "momke-experts"), without_truth(batch_of(data))
    outs = {m: [] for m in MODALITIES}
    hooks = [capture(method.heads[m], outs[m], "output") for m in MODALITIES]
    got = method.predict(b)
    for h in hooks:
        h.remove()
    w = b["present"].float()
    ref = sum(outs[m][0] * w[:, i:i + 1] for i, m in enumerate(MODALITIES)) / w.sum(1, keepdim=True)
    torch.testing.assert_close(got, ref)


def test_conversations_do_not_see_each_other(data):
    method, b = build_tiny(data, "momke-experts"), without_truth(batch_of(data))
    ref = method.predict(b)
    other = {k: (dict(v) if isinstance(v, dict) else v) for k, v in b.items()}
    other["x"] = {m: v.clone() for m, v in b["x"].items()}
    other["x"]["t"][4:] += 10.0  # conversation 1 only
    got = method.predict(other)
    assert torch.equal(got[:4], ref[:4]) and not torch.equal(got[4:], ref[4:])


# ---- stage 2 -------------------------------------------------------------------------------------------

def test_stage2_starts_from_stage1s_projections_and_experts(data):
    fresh = build_tiny(data, "momke", seed=0)
    with pytest.raises(RuntimeError, match="never loaded"):
        fresh.loss(batch_of(data))
    s1 = build_tiny(data, "momke-experts", seed=1)
    s2 = stage2(data)
    for part in ("projections", "experts"):
        mine, theirs, init = (getattr(m, part).state_dict() for m in (s2, s1, fresh))
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), part
        assert not all(torch.equal(init[k], theirs[k]) for k in theirs)  # not equal by chance
    for part in ("routers", "fuse", "head"):  # stage 2's own parts stay at their initialisation
        mine, init = getattr(s2, part).state_dict(), getattr(fresh, part).state_dict()
        assert all(torch.equal(mine[k], init[k]) for k in init), part
    # and what an expert computes in stage 2 is stage 1's expert on the same input
    b, seen, out = without_truth(batch_of(data)), [], []
    hooks = [capture(s2.experts["v"], seen), capture(s2.experts["v"], out, "output")]
    s2.predict(b)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out[0], s1.experts["v"](*seen[0]))


def test_stage2_every_expert_reads_every_modality(data):
    method, b = stage2(data), without_truth(batch_of(data))
    seen = {e: [] for e in MODALITIES}
    hooks = [capture(method.experts[e].layers[0], seen[e]) for e in MODALITIES]
    method.predict(b)
    for h in hooks:
        h.remove()
    want_x = torch.cat([grid(method.projections[m](mean_pool(b, m))) for m in MODALITIES])
    want_keys = torch.cat([grid(present(b, m)) for m in MODALITIES])
    for e in MODALITIES:
        x, keys = seen[e][0]
        torch.testing.assert_close(x, want_x)  # modalities a, v, t stacked as separate conversations
        assert torch.equal(keys, want_keys)


def _mixture_reference(method, b):
    """(router outputs, fuse input, logits, the mixture by hand) of one forward pass."""
    r_out = {m: [] for m in MODALITIES}
    r_in = {m: [] for m in MODALITIES}
    e_out = {e: [] for e in MODALITIES}
    fuse_in, logits = [], []
    hooks = [capture(method.fuse, fuse_in), capture(method.head, logits, "output")]
    hooks += [capture(method.experts[e], e_out[e], "output") for e in MODALITIES]
    if method.routers is not None:
        hooks += [capture(method.routers[m], r_out[m], "output") for m in MODALITIES]
        hooks += [capture(method.routers[m], r_in[m]) for m in MODALITIES]
    method.predict(b)
    for h in hooks:
        h.remove()
    mixed = []
    for i, m in enumerate(MODALITIES):
        p = method.projections[m](mean_pool(b, m))
        if method.routers is not None:
            torch.testing.assert_close(r_in[m][0][0], p)  # the router of m reads m's projection
            w = r_out[m][0].exp() / r_out[m][0].exp().sum(-1, keepdim=True)
            torch.testing.assert_close(w.sum(-1), torch.ones(7))
        else:
            w = torch.full((7, 3), 1 / 3)
        # E_e(p_m): expert e's output on modality m's block (a, v, t stacked), back to rows
        experts_on_m = [e_out[e][0].chunk(3)[i][CONV, TURN] for e in MODALITIES]
        r = sum(w[:, j:j + 1] * experts_on_m[j] for j in range(3))
        mixed.append(r * present(b, m)[:, None].float())
    return w, fuse_in[0][0], logits[0], torch.cat(mixed, -1)


def test_router_weights_sum_to_one_and_mix_the_experts(data):
    method, b = stage2(data), without_truth(batch_of(data))
    _, z, logits, ref = _mixture_reference(method, b)
    torch.testing.assert_close(z, ref)  # z = [sum_e w_{a,e} E_e(p_a); ... v; ... t], zero where absent
    parts = method.forward_parts(b)
    for m in MODALITIES:
        torch.testing.assert_close(parts["weights"][m].sum(-1), torch.ones(7))
    hidden = ref + torch.relu(method.fuse(ref))
    torch.testing.assert_close(logits, method.head(hidden))
    torch.testing.assert_close(method.represent(b), hidden)


def test_stage2_loss_is_the_ce_of_the_head(data):
    method, b = stage2(data), batch_of(data)
    logits = []
    h = capture(method.head, logits, "output")
    total, parts = method.loss(b)
    h.remove()
    torch.testing.assert_close(parts["ce"], ce(logits[0], b["y"]))
    torch.testing.assert_close(total, parts["ce"])


def test_norouter_ablation_has_no_router_and_averages_the_experts(data):
    method = stage2(data, "momke-norouter")
    assert method.routers is None and not any(k.startswith("routers") for k in method.state_dict())
    assert any(k.startswith("routers") for k in stage2(data).state_dict())
    w, z, _, ref = _mixture_reference(method, without_truth(batch_of(data)))
    torch.testing.assert_close(z, ref)
    assert torch.equal(w, torch.full((7, 3), 1 / 3))


# ---- configs -------------------------------------------------------------------------------------------

def test_configs_hold_the_authors_values_and_link_the_stages():
    s1, s2, ab = load_config("momke-experts"), load_config("momke"), load_config("momke-norouter")
    assert s2["requires"] == {"experts": "momke-experts"} and ab["method"] == "momke"
    assert s2["model"]["router"] is True and ab["model"]["router"] is False
    for cfg in (s1, s2):
        assert cfg["model"]["experts"] == {"hidden": 256, "depth": 4, "heads": 2, "mlp_ratio": 1, "attn_dropout": 0.0}
        assert cfg["model"]["dropout"] == 0.5
        t = cfg["train"]
        assert (t["batch_size"], t["epochs"], t["optimizer"]["lr"], t["optimizer"]["weight_decay"]) == (16, 100, 1e-4, 1e-5)
    assert s1["train"]["missing"] == {"kind": "full"}
    assert set(s2["train"]["missing"]["choices"]) == {"a", "v", "t", "av", "at", "vt", "avt"}
    assert MoMKE.batching == MoMKEExperts.batching == "conversation"
    assert load_config("momke", "mosi")["train"]["epochs"] == 150
