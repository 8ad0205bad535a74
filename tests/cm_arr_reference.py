"""CM-ARR references written from the paper's equations (Sun et al. 2024, SPEC.md §3) with plain torch
ops, for tests/test_cm_arr_reference.py. They read the model's modules only for their weights (and
zuko's hyper-network MLP); the arithmetic of every equation is written out here."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from train.flows import GlowFlow

ORDER = ("a", "v", "t")

def lin(x, layer):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def mha(attn, q, kv, valid):
    """Scaled dot-product multi-head attention, Q from q, K = V from kv; invalid keys ignored (a row
    with none keeps its first key, as train.nets.key_padding_mask)."""
    B, Tq, d = q.shape
    h = attn.num_heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    heads = lambda t: t.reshape(B, t.shape[1], h, d // h).transpose(1, 2)  # noqa: E731
    Q, K, V = heads(q @ wq.T + bq), heads(kv @ wk.T + bk), heads(kv @ wv.T + bv)
    ignore = ~valid.clone()
    ignore[ignore.all(1), 0] = False
    s = (Q @ K.transpose(-1, -2) / math.sqrt(d // h)).masked_fill(ignore[:, None, None, :], float("-inf"))
    return lin((s.softmax(-1) @ V).transpose(1, 2).reshape(B, Tq, d), attn.out_proj)


def block(blk, q, kv, valid):
    h = layer_norm(q + mha(blk.attn, q, kv, valid), blk.ln1)
    return layer_norm(h + lin(F.gelu(lin(h, blk.ff[0])), blk.ff[3]), blk.ln2)


def umc(u, x, valid):
    """Fig. 3: Linear, self-attention + LN, GELU MLP + LN, heads mu and sigma = softplus + 1e-4."""
    h0 = lin(x, u.inp)
    h = layer_norm(h0 + mha(u.attn, h0, h0, valid), u.ln1)
    h = layer_norm(h + lin(F.gelu(lin(h, u.mlp[0])), u.mlp[3]), u.ln2)
    return lin(h, u.mu), torch.log1p(torch.exp(lin(h, u.sigma))) + 1e-4


def conv1x1(x, c):
    return torch.einsum("oc,bcl->bol", c.weight[..., 0], x) + c.bias[:, None]


def refiner(r, x):
    """Stacked RCABs on (B, T, d): y + conv3(ReLU(conv3(y))) * sigmoid(1x1(ReLU(1x1(mean_T))))."""
    y = x.transpose(1, 2)
    for rcab in r.blocks:
        c1, c2 = rcab.body[0], rcab.body[2]
        body = F.conv1d(torch.relu(F.conv1d(y, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1)
        ca1, ca2 = rcab.ca.net[0], rcab.ca.net[2]
        w = torch.sigmoid(conv1x1(torch.relu(conv1x1(body.mean(2, keepdim=True), ca1)), ca2))
        y = y + body * w
    return y.transpose(1, 2)


def flow_forward(f: GlowFlow, x):
    """Glow steps: ActNorm (x e^s + b), permutation, W = L U (unit upper U), affine coupling of the
    dimensions whose parity differs from the step's (zuko's bounded log-scale, slope 1e-3)."""
    ladj = x.new_zeros(x.shape[:-1])
    ts = list(f.transforms)
    for k in range(0, len(ts), 4):
        an, perm, lu, cp = ts[k:k + 4]
        x = x * an.log_scale.exp() + an.shift
        ladj = ladj + an.log_scale.sum()
        x = x[..., perm._0]
        LU = lu._0
        W = torch.tril(LU) @ (torch.triu(LU, 1) + torch.eye(len(LU)))
        x = x @ W.T
        ladj = ladj + torch.diagonal(LU).abs().log().sum()
        keep = torch.arange(f.features) % 2 == ((k // 4) % 2)
        phi = cp.hyper(x[..., keep]).unflatten(-1, (-1, 2))
        raw = phi[..., 1]
        log_scale = raw / (1 + (raw / math.log(1e-3)).abs())
        x = x.clone()
        x[..., ~keep] = x[..., ~keep] * log_scale.exp() + phi[..., 0]
        ladj = ladj + log_scale.sum(-1)
    return x, ladj


def mean_over(x, valid):
    w = valid.float().unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def forward(m, x, valid, present):
    """The whole model, phases written out per utterance: Eqs. 6-8 with the missing modality's own
    inverse flow, the refinement, then Eqs. 10-13 with text as the query and the classifier."""
    mu, sig, X, z, ladj = {}, {}, {}, {}, {}
    for n in ORDER:
        mu[n], sig[n] = umc(m.umc[n], x[n], valid[n])
        conv = m.proj[n]
        X[n] = F.conv1d((mu[n] * valid[n].unsqueeze(-1)).transpose(1, 2), conv.weight, conv.bias,
                        padding=conv.kernel_size[0] // 2).transpose(1, 2)
        z[n], ladj[n] = flow_forward(m.flows[n], X[n])
    xhat = {n: torch.zeros_like(X[n]) for n in ORDER}
    xtil = {n: torch.zeros_like(X[n]) for n in ORDER}
    xc, valid_c = {n: X[n].clone() for n in ORDER}, {n: valid[n].clone() for n in ORDER}
    for b in range(len(present)):
        have = [n for i, n in enumerate(ORDER) if present[b, i]]
        zt = sum(z[n][b] for n in have) / len(have) if have else torch.zeros_like(X["a"][b])
        for i, n in enumerate(ORDER):
            if not present[b, i]:
                xtil[n][b] = m.flows[n].inverse(zt[None])[0]
                xhat[n][b] = refiner(m.refine[n], xtil[n][b][None])[0]
                xc[n][b], valid_c[n][b] = xhat[n][b], True
    if hasattr(m.fusion, "cross"):
        q = xc["t"]
        h = torch.cat([block(m.fusion.cross[o], q, xc[o], valid_c[o]) for o in ("a", "v")], -1)
        fused = mean_over(block(m.fusion.self_attn, h, h, valid_c["t"]), valid_c["t"])
    else:  # "w/o attention": the completed sequences' means, concatenated
        fused = torch.cat([mean_over(xc[n], valid_c[n]) for n in ORDER], -1)
    out = fused
    for layer in m.classifier.net:
        if isinstance(layer, torch.nn.Linear):
            out = lin(out, layer)
        elif isinstance(layer, torch.nn.ReLU):
            out = torch.relu(out)
    return dict(mu=mu, sig=sig, X=X, z=z, ladj=ladj, xtil=xtil, xhat=xhat, xc=xc, valid_c=valid_c,
                fused=fused, logits=out)


def w2(mu1, s1, mu2, s2):
    """Eq. 1 for every pair: ||mu_i - mu_j||^2 + ||Sigma_i - Sigma_j||^2."""
    return ((mu1[:, None] - mu2[None]) ** 2).sum(-1) + ((s1[:, None] - s2[None]) ** 2).sum(-1)


def nce(S, tau):
    """Eqs. 2-4: -log exp(S_ii/tau) / sum_n exp(S_in/tau), plus the same with the roles swapped."""
    e = torch.exp(S / tau)
    return (-torch.log(e.diagonal() / e.sum(1))).mean() + (-torch.log(e.diagonal() / e.sum(0))).mean()


def udcl(m, r, valid, natural):
    total = 0.0
    for p, q in (("a", "t"), ("t", "v"), ("a", "v")):
        rows = natural[:, ORDER.index(p)] & natural[:, ORDER.index(q)]
        mp, sp = mean_over(r["mu"][p], valid[p])[rows], mean_over(r["sig"][p], valid[p])[rows]
        mq, sq = mean_over(r["mu"][q], valid[q])[rows], mean_over(r["sig"][q], valid[q])[rows]
        if m.sim.kind == "cosine":  # "w/ Point": cosine of the means
            S = (mp / mp.norm(dim=1, keepdim=True)) @ (mq / mq.norm(dim=1, keepdim=True)).T
        else:
            S = -F.softplus(m.sim.a_raw) * w2(mp, sp, mq, sq) + m.sim.b
        total = total + nce(S, m.log_tau.exp())
    return total


def supcon_loss(views, labels, tau):
    """Khosla et al. L_out: anchor i, positives P(i) = other views of its label, denominator A(i) =
    every view but i; mean over the anchors that have a positive."""
    v = views / views.norm(dim=-1, keepdim=True)
    losses = []
    for i in range(len(v)):
        pos = [p for p in range(len(v)) if p != i and labels[p] == labels[i]]
        if pos:
            denom = sum(torch.exp(v[i] @ v[a] / tau) for a in range(len(v)) if a != i)
            losses.append(-sum(torch.log(torch.exp(v[i] @ v[p] / tau) / denom) for p in pos) / len(pos))
    return torch.stack(losses).mean()


def rec(r, X_true, valid, present, natural):
    """Eq. 9 summed over the (utterance, missing modality) pairs with a real target, divided by
    the number of (valid frame, dimension) elements it sums (the code's stated normalisation)."""
    se, count = 0.0, 0
    for i, n in enumerate(ORDER):
        for b in range(len(present)):
            if not present[b, i] and natural[b, i]:
                f = valid[n][b]
                se = se + ((r["xhat"][n][b][f] - X_true[n][b][f]) ** 2).sum()
                count += int(f.sum()) * X_true[n].shape[-1]
    return se / count


def truth_valid(b):
    return {n: b["frame_mask_full"][n] & b["natural"][:, i:i + 1] for i, n in enumerate(ORDER)}


def input_valid(b):
    return {n: b["frame_mask"][n] & b["present"][:, i:i + 1] for i, n in enumerate(ORDER)}
