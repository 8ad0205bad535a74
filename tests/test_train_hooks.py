"""Framework hooks the later methods need: seeded phase-aware evaluation without labels, optimiser
groups, epoch-end hooks, drop_last, validation frequency, loss-based selection, the attention-mask
helper, data views (targets, resampling), non-finite frames, protocol columns in run tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from manifests.schema import Utterance
from train import protocols as P
from train.conditions import apply_availability
from train.config import load_config
from train.data import MultimodalData, Normalizer
from train.methods import Method, build, register
from train.nets import key_padding_mask, modality_valid
from train.run import prerequisite_overrides, run_experiment
from train.synthetic import synthetic_data, synthetic_folds
from train.targets import derive
from train.trainer import Trainer, evaluate

FAST = {"train.schedule": {"kind": "linear_decay", "constant": 2, "decay": 1}, "train.batch_size": 16,
        "model.encoders.a.hidden": 16, "model.encoders.v.hidden": 16, "model.encoders.t.channels": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=60, seed=0, absent=0.1)


@register
class _Probe(Method):
    """A tiny stochastic method that records what the framework hands it."""

    name = "_probe"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.head = nn.Linear(sum(spec.dims.values()), spec.out_dim)
        self.other = nn.Linear(1, 1)
        self.seen: list[dict] = []
        self.epochs: list[int] = []

    def _feat(self, batch):
        return torch.cat([batch["x"][m].mean(1) for m in ("a", "v", "t")], -1)

    def predict(self, batch):
        self.seen.append({"keys": set(batch), "phase": batch.get("phase"), "n": len(batch["lengths"]["a"])})
        return self.head(self._feat(batch)) + torch.randn(len(batch["lengths"]["a"]), self.spec.out_dim)

    def loss(self, batch):
        self.seen.append({"keys": set(batch), "phase": batch.get("phase"), "n": len(batch["y"])})
        out = self.head(self._feat(batch)) + 0 * self.other.weight.sum()
        ce = self.task_loss(out, batch["y"])
        return ce, {"ce": ce}

    def param_groups(self):
        lr0 = self.cfg.get("probe_frozen_lr")
        if lr0 is None:
            return super().param_groups()
        return [{"params": list(self.head.parameters())}, {"params": list(self.other.parameters()), "lr": lr0}]

    def on_epoch_end(self, epoch, record):
        self.epochs.append(epoch)
        record["probe"] = epoch * 10


def _probe_cfg(**extra):
    cfg = load_config("baseline", "demo", FAST)
    cfg["method"] = "_probe"
    for k, v in extra.items():
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return cfg


def _fit(data, cfg, tmp_path, seed=0):
    fold = synthetic_folds(data, 2)[0]
    torch.manual_seed(seed)
    tr, va = data.indices(fold.train), data.indices(fold.val)
    m = build(cfg, data.spec)
    t = Trainer(m, data, tr, va, cfg, tmp_path, seed=seed, normalizer=Normalizer.fit(data, tr, []),
                signature="s", progress=False)
    return m, t.fit()


def test_stochastic_method_evaluates_identically_twice(data):
    m = build(_probe_cfg(), data.spec)
    idx = np.arange(len(data))
    r1 = evaluate(m, data, idx, ["avt", "mr=0.5"], seed=3)
    r2 = evaluate(m, data, idx, ["avt", "mr=0.5"], seed=3)
    for c in r1:
        assert np.array_equal(r1[c]["out"], r2[c]["out"])
    r3 = evaluate(m, data, idx, ["avt"], seed=4)
    assert not np.array_equal(r1["avt"]["out"], r3["avt"]["out"])  # the noise is real, only seeded
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    evaluate(m, data, idx, ["avt"], seed=3)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched


def test_predict_gets_no_labels_and_knows_its_phase(data, tmp_path):
    m, _ = _fit(data, _probe_cfg(), tmp_path)
    phases = {s["phase"] for s in m.seen}
    assert phases == {"train", "val"}
    for s in m.seen:
        if s["phase"] != "train":
            assert "y" not in s["keys"] and "x_full" not in s["keys"] and "index" not in s["keys"]
    m.seen.clear()
    evaluate(m, data, np.arange(10), ["a"])
    assert [s["phase"] for s in m.seen] == ["test"]


def test_evaluation_masks_follow_the_protocol(data):
    m = build(_probe_cfg(), data.spec)
    idx = np.arange(len(data))
    res = evaluate(m, data, idx, ["mr=0.5", "eta=0.3", "vt"], seed=2)
    nat = data.natural
    assert not nat.all()  # the fixture has natural absence: the masks take it into account
    assert np.array_equal(res["mr=0.5"]["avail"], P.masks("mr=0.5", data.ids, 2, nat))
    assert np.array_equal(res["mr=0.5"]["present"], res["mr=0.5"]["avail"] & nat)  # what the model saw
    assert P.realised(res["mr=0.5"]["present"])["mr"] == pytest.approx(0.5, abs=1 / (3 * len(data)))
    seen = res["eta=0.3"]["present"]
    assert (seen.sum(1) < 3).sum() == max(round(0.3 * len(data)), int((~nat.all(1)).sum()))
    assert res["vt"]["avail"].tolist() == [[False, True, True]] * len(data)


def test_epoch_end_hook_and_param_groups(data, tmp_path):
    m, summary = _fit(data, _probe_cfg(probe_frozen_lr=0.0), tmp_path)
    assert m.epochs == [0, 1, 2] and [h["probe"] for h in summary["history"]] == [0, 10, 20]
    torch.manual_seed(0)
    w0 = build(_probe_cfg(probe_frozen_lr=0.0), data.spec)  # same init (seed 0) as the trained one
    assert torch.equal(m.other.weight, w0.other.weight)  # lr 0 group: unchanged
    assert not torch.equal(m.head.weight, w0.head.weight)  # default group: trained


def test_drop_last_changes_the_batches(data, tmp_path):
    m, _ = _fit(data, _probe_cfg(**{"train.drop_last": True}), tmp_path / "a")
    sizes = [s["n"] for s in m.seen if s["phase"] == "train"]
    assert set(sizes) == {16}
    m2, _ = _fit(data, _probe_cfg(), tmp_path / "b")
    assert min(s["n"] for s in m2.seen if s["phase"] == "train") < 16  # the short last batch is kept


def test_val_every_and_loss_based_selection(data, tmp_path):
    sched = {"kind": "linear_decay", "constant": 4, "decay": 1}
    _, s = _fit(data, _probe_cfg(**{"train.val_every": 2, "train.schedule": sched}), tmp_path / "a")
    assert ["val_score" in h for h in s["history"]] == [False, True, False, True, True]
    _, s = _fit(data, _probe_cfg(**{"select.metric": "loss", "train.schedule": sched}), tmp_path / "b")
    losses = [h["val_loss"] for h in s["history"]]
    assert s["metric"] == "loss" and s["best_epoch"] == int(np.argmin(losses)) + 1
    _, s2 = _fit(data, _probe_cfg(**{"train.schedule": sched}), tmp_path / "c")
    assert s2["metric"] == "ua" and s2["best_epoch"] == int(np.argmax([h["val_score"] for h in s2["history"]])) + 1


def test_attention_mask_helper_keeps_outputs_finite_with_a_modality_absent(data):
    batch = apply_availability(data.collate(np.arange(6)), np.tile([True, True, False], (6, 1)))
    valid = modality_valid(batch, "t")
    assert not valid.any()  # text unavailable for every sample
    mha = nn.MultiheadAttention(batch["x"]["t"].shape[-1], 2, batch_first=True)
    x = batch["x"]["t"]
    out, _ = mha(x, x, x, key_padding_mask=key_padding_mask(valid))
    assert torch.isfinite(out).all()
    naive, _ = mha(x, x, x, key_padding_mask=~valid)
    assert not torch.isfinite(naive).all()  # what the helper prevents
    va = modality_valid(batch, "a")
    empty = ~va.any(1)
    assert empty.any() and not empty.all()  # some samples lack audio naturally
    want = ~va
    want[empty, 0] = False  # only the empty rows change, and only their first key
    assert torch.equal(key_padding_mask(va), want)


def test_non_finite_frames_never_reach_a_model():
    rng = np.random.default_rng(0)
    seqs = {m: [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)] for m in "avt"}
    seqs["a"][1][2] = np.nan
    seqs["v"][2][0] = np.inf
    d = MultimodalData.from_arrays([f"u{i}" for i in range(4)], [0, 1, 0, 1], seqs, labels=["x", "y"])
    assert d.seqs["a"].lengths[1] == 4 and d.seqs["v"].lengths[2] == 4  # the bad frames are dropped
    b = d.collate(np.arange(4))
    assert all(torch.isfinite(b["x"][m]).all() for m in "avt")
    raw = {"x": {"a": torch.full((2, 3, 3), float("nan"))}, "lengths": {"a": torch.full((2,), 3)},
           "frame_mask": {"a": torch.ones(2, 3, dtype=torch.bool)}, "natural": torch.ones(2, 3, dtype=torch.bool)}
    masked = apply_availability(raw, np.array([[False, True, True]] * 2))
    assert torch.equal(masked["x"]["a"], torch.zeros(2, 3, 3))  # selection, not NaN * 0


def test_resample_to_gives_every_modality_one_length(data):
    d = synthetic_data(n=8, seed=1, absent=0.2)
    d.resample_to = 7
    b = d.collate(np.arange(8))
    for i, m in enumerate("avt"):
        assert b["x"][m].shape[1] == 7
        assert torch.equal(b["frame_mask"][m].all(1), b["natural"][:, i])
    s = d.seqs["a"].seq(0)
    t = np.linspace(0, len(s) - 1, 7)
    want = np.stack([np.interp(t, np.arange(len(s)), s[:, k]) for k in range(s.shape[1])], 1)
    if d.seqs["a"].lengths[0]:
        assert np.allclose(b["x"]["a"][0].numpy(), want, atol=1e-5)


def test_targets_derive_tasks_from_labels_and_values():
    lab = ["ang", "hap", "neu", "sad"]
    utts = [Utterance(f"u{i}", label=lab[i % 4], label_index=i % 4, value=v)
            for i, v in enumerate([-2.0, 0.0, 1.4, -0.2, 0.0, 3.0])]
    kept, y, labels, task = derive(utts, lab, {"kind": "map", "classes": {"hap": "pos", "neu": "pos", "ang": "neg",
                                                                           "sad": "neg"}, "order": ["neg", "pos"]})
    assert labels == ["neg", "pos"] and task == "classification" and y == [0, 1, 1, 0, 0, 1]
    _, y3, l3, _ = derive(utts, None, {"kind": "sign", "classes": 3})
    assert l3 == ["negative", "neutral", "positive"] and y3 == [0, 1, 2, 0, 1, 2]
    k2, y2, _, _ = derive(utts, None, {"kind": "sign", "classes": 2})
    assert [u.id for u in k2] == ["u0", "u2", "u3", "u5"] and y2 == [0, 1, 0, 1]  # zeros left out
    _, y2z, _, _ = derive(utts, None, {"kind": "sign", "classes": 2, "zero": "positive"})
    assert y2z == [0, 1, 1, 0, 1, 1]
    _, yr, lr, tr = derive(utts, lab, {"kind": "regression"})
    assert tr == "regression" and lr is None and yr == [-2.0, 0.0, 1.4, -0.2, 0.0, 3.0]


def test_run_tables_take_columns_from_the_protocol_and_reuse_models(data, tmp_path):
    folds = synthetic_folds(data, 2)[:1]
    cfg = load_config("baseline-aug", "demo", {**FAST, "eval.conditions": P.expand("missing-rate")})
    logs = []
    run = run_experiment(data, folds, cfg, dataset="synth", results_dir=tmp_path, progress=False,
                         log=logs.append)
    table = (run / "table.md").read_text()
    for r in ("MR 0 ", "MR 0.3", "MR 0.7", "MR avg 0.1–0.7"):
        assert r in table
    assert "{a,v,t}" not in table
    best = next(run.glob("folds/*/seed0/best.pt"))
    stamp = best.stat().st_mtime_ns
    cfg2 = load_config("baseline-aug", "demo", {**FAST, "eval.conditions": P.expand("missing-ratio")})
    run2 = run_experiment(data, folds, cfg2, dataset="synth", results_dir=tmp_path, progress=False,
                          log=logs.append)
    assert any("reusing" in line for line in logs)  # the trained model was copied, not retrained
    assert "η 0.5" in (run2 / "table.md").read_text()
    assert next(run.glob("folds/*/seed0/best.pt")).stat().st_mtime_ns == stamp
    res = json.loads(next(run2.glob("folds/*/seed0/result.json")).read_text())
    assert {"mr=0.3", "eta=0.5"} <= set(res["test"])


def test_two_methods_get_identical_test_masks(data, tmp_path):
    folds = synthetic_folds(data, 2)[:1]
    over = {**FAST, "eval.conditions": ["mr=0.4", "eta=0.2"]}
    runs = [run_experiment(data, folds, load_config(m, "demo", over), dataset="synth", results_dir=tmp_path,
                           progress=False, log=lambda *_: None) for m in ("baseline", "baseline-aug")]
    p1, p2 = (np.load(next(r.glob("folds/*/seed0/predictions.npz"))) for r in runs)
    for c in ("mr=0.4", "eta=0.2"):
        assert np.array_equal(p1[f"{c}_avail"], p2[f"{c}_avail"])
        assert np.array_equal(p1[f"{c}_present"], p2[f"{c}_present"])
        assert not p1[f"{c}_present"].all()


def test_feature_overrides_reach_prerequisites(data, tmp_path):
    over = {"features.audio.params.downsample": 5, "train.batch_size": 8}
    po = prerequisite_overrides(over)
    assert po["*"] == {"features.audio.params.downsample": 5}
    cfg = load_config("mmin", "demo", {**FAST, **over, "train.schedule": {"kind": "linear_decay", "constant": 1, "decay": 0}})
    run = run_experiment(data, synthetic_folds(data, 2)[:1], cfg, dataset="synth", results_dir=tmp_path,
                         prereq_overrides={"*": {**FAST, **po["*"]}}, progress=False, log=lambda *_: None)
    pre = next(run.glob("prereq/baseline/*/seed0/result.json"))
    assert pre.is_file()


def test_report_never_mixes_runs_with_different_folds_or_features(data, tmp_path):
    from train.report import ReportError, report, update_block

    folds = synthetic_folds(data, 2)
    quiet = {"progress": False, "log": lambda *_: None, "dataset": "synth", "results_dir": tmp_path}
    run_experiment(data, folds[:1], load_config("baseline", "demo", FAST), **quiet)
    run_experiment(data, folds[1:], load_config("baseline-aug", "demo", FAST), **quiet)
    with pytest.raises(ReportError, match=r"differ in folds: \['f1'\] \(baseline\) vs \['f2'\] \(baseline-aug\)"):
        report("synth", tmp_path, methods=["baseline", "baseline-aug"])
    text = report("synth", tmp_path)  # without --methods: one table per comparable group
    assert text.count("## features") == 2 and "folds" in text
    feats = {"audio": {"key": "compare-x"}}
    run_experiment(data, folds[:1], load_config("baseline-aug", "demo", FAST), meta={"features": feats}, **quiet)
    with pytest.raises(ReportError, match="differ in features"):
        report("synth", tmp_path, methods=["baseline", "baseline-aug"])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:synth -->\nold table\n<!-- /report -->\nend\n")
    update_block(readme, "synth", report("synth", tmp_path, methods=["baseline"]))
    doc = readme.read_text()
    assert "old table" not in doc and "| baseline | UA |" in doc and doc.endswith("<!-- /report -->\nend\n")


def test_report_run_id_picks_that_run_not_the_latest(data, tmp_path, capsys):
    from pipeline.cli import main
    from train.report import ReportError, latest_runs, report

    folds = synthetic_folds(data, 2)
    quiet = {"progress": False, "log": lambda *_: None, "dataset": "synth", "results_dir": tmp_path}
    first = run_experiment(data, folds[:1], load_config("baseline", "demo", FAST), run_id="one x", **quiet)
    assert first.name == "one_x"  # imer train makes the id a safe folder name; --run accepts either form
    later = run_experiment(data, folds[1:], load_config("baseline", "demo", FAST), run_id="two", **quiet)
    assert latest_runs("synth", tmp_path) == {"baseline": later}
    assert latest_runs("synth", tmp_path, "") == {"baseline": later}  # --run "" is no id, as in report
    assert latest_runs("synth", tmp_path, "one x") == latest_runs("synth", tmp_path, "one_x") == {"baseline": first}
    text = report("synth", tmp_path, methods=["baseline"], run_id="one x")
    assert "run `one_x`" in text and "run `two`" not in text
    assert "# synth: every method's run one x" in (tmp_path / "synth" / "report.md").read_text()
    with pytest.raises(ReportError, match="no complete run 'three' of baseline.*--run-id three"):
        report("synth", tmp_path, methods=["baseline"], run_id="three")
    with pytest.raises(ReportError, match="--run-id 'no such'$"):  # a command that can be pasted
        report("synth", tmp_path, methods=["baseline"], run_id="no such")
    assert main(["report", "--dataset", "synth", "--results", str(tmp_path), "--run", "two"]) == 0
    assert "run `two`" in capsys.readouterr().out
    assert main(["report", "--dataset", "synth", "--results", str(tmp_path), "--run", "three"]) == 1
    assert "--method baseline --run-id three" in capsys.readouterr().out
