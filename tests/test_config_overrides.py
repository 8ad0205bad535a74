"""Issue 38 (6): `--set` overrides name the config they change. A plain KEY changes the method,
CONFIG:KEY the config of that name in its chain (a prerequisite, at any depth), '*:KEY' every
config; a plain KEY that a prerequisite reads too is refused in one line. What a prerequisite
trains with is recorded in its dependant's config, so it enters the dependant's signature."""

from __future__ import annotations

import json

import pytest

from pipeline import cli
from train.config import ConfigError, chain, check_overrides, load_config, parse_override, with_prerequisites
from train.run import run_experiment
from train.synthetic import synthetic_data, synthetic_folds

NORMAL = {"kind": "normal", "std": 0.02}


def _init(cfg: dict) -> dict:
    return cfg["model"]["init"]


# ---- which configs each form reaches ---------------------------------------------------------------

def test_scoped_forms_reach_exactly_the_configs_named():
    plain = load_config("mmin", "iemocap")
    assert _init(plain) == _init(plain["prerequisites"]["baseline"]) == {"kind": "kaiming"}

    pre = load_config("mmin", "iemocap", {"baseline:model.init": NORMAL})
    assert _init(pre["prerequisites"]["baseline"]) == NORMAL and _init(pre) == {"kind": "kaiming"}

    own = load_config("mmin", "iemocap", {"mmin:model.init": NORMAL})
    assert _init(own) == NORMAL and _init(own["prerequisites"]["baseline"]) == {"kind": "kaiming"}

    both = load_config("mmin", "iemocap", {"*:train.batch_size": 8})
    assert both["train"]["batch_size"] == both["prerequisites"]["baseline"]["train"]["batch_size"] == 8

    method_only = load_config("mmin", "iemocap", {"train.batch_size": 8, "loss.cycle": 0.5})
    assert method_only["train"]["batch_size"] == 8 and method_only["loss"]["cycle"] == 0.5
    assert method_only["prerequisites"]["baseline"]["train"]["batch_size"] == 128
    assert "loss" not in method_only["prerequisites"]["baseline"]


def test_features_and_data_reach_the_whole_chain():
    cfg = load_config("if-mmin", "iemocap", {"features.audio.params.downsample": 5, "data.max_len": {"a": 50}})
    pre = cfg["prerequisites"]["if-mmin-pretrain"]
    assert pre["features"]["audio"]["params"]["downsample"] == cfg["features"]["audio"]["params"]["downsample"] == 5
    assert pre["data"]["max_len"] == cfg["data"]["max_len"] == {"a": 50}


def test_the_most_specific_form_wins():
    cfg = load_config("mmin", "iemocap", {"*:train.batch_size": 8, "train.batch_size": 16,
                                          "baseline:train.batch_size": 32})
    assert cfg["train"]["batch_size"] == 16 and cfg["prerequisites"]["baseline"]["train"]["batch_size"] == 32
    cfg = load_config("mmin", "iemocap", {"train.batch_size": 16, "mmin:train.batch_size": 64})
    assert cfg["train"]["batch_size"] == 64


def test_a_scope_reaches_a_prerequisite_of_a_prerequisite():
    """The chain is followed at any depth: here baseline is made to build on baseline-aug."""
    cfg = load_config("mmin", "iemocap", {"baseline:requires": {"x": "baseline-aug"},
                                          "baseline-aug:train.batch_size": 4, "*:train.optimizer.lr": 1e-3})
    assert chain(cfg) == ["mmin", "baseline", "baseline-aug"]
    deep = cfg["prerequisites"]["baseline"]["prerequisites"]["baseline-aug"]
    assert deep["train"]["batch_size"] == 4 and cfg["prerequisites"]["baseline"]["train"]["batch_size"] == 128
    assert deep["train"]["optimizer"]["lr"] == cfg["train"]["optimizer"]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="loops through mmin -> baseline -> mmin"):
        load_config("mmin", "iemocap", {"baseline:requires": {"x": "mmin"}})


def test_override_syntax():
    assert parse_override("baseline:model.init={kind: normal, std: 0.02}") == ("baseline:model.init", NORMAL)
    assert parse_override("*:train.batch_size=8") == ("*:train.batch_size", 8)
    for bad in (":model.init=1", "baseline:=1", "prerequisites.baseline.train.batch_size=8"):
        with pytest.raises(ConfigError):
            parse_override(bad)


# ---- refusals --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model.init", "train.batch_size", "train.epochs", "model.encoders.a.layers"])
def test_a_plain_key_the_prerequisite_reads_is_refused_in_one_line(key):
    over = {key: 3}
    with pytest.raises(ConfigError) as e:
        check_overrides([load_config("mmin", "iemocap", over)], over)
    msg = str(e.value)
    assert "\n" not in msg and "mmin builds on baseline" in msg
    assert f"'*:{key}=...'" in msg and f"baseline:{key}=..." in msg and f"mmin:{key}=..." in msg


@pytest.mark.parametrize("over", [
    {"loss.cycle": 0.0},                        # MMIN's loss: the baseline has none
    {"model.imagination.blocks": 3},           # MMIN's CRA
    {"eval.conditions": ["a"], "seeds": [1]},  # change no trained model
    {"features.audio.params.downsample": 5},   # reaches the chain
    {"model.init": NORMAL, "baseline:model.init": NORMAL},
    {"train.batch_size": 8, "*:train.batch_size": 8},
])
def test_keys_that_reach_or_cannot_matter_pass(over):
    check_overrides([load_config("mmin", "iemocap", over)], over)


def test_an_unknown_config_is_refused_listing_the_chain():
    over = {"baseline-aug:model.init": NORMAL}
    with pytest.raises(ConfigError, match=r"no config 'baseline-aug' in the chain \(mmin: mmin, baseline\)"):
        check_overrides([load_config("mmin", "iemocap", over)], over, plain_everywhere=True)
    # in a list of methods, a config of any of their chains is known
    check_overrides([load_config(m, "iemocap", over) for m in ("baseline-aug", "mmin")], over)


def test_imer_train_refuses_before_training(monkeypatch, capsys):
    import train.run

    monkeypatch.setattr(train.run, "train_method", lambda *a, **k: pytest.fail("trained"))
    assert cli.main(["train", "--dataset", "demo", "--method", "mmin", "--set", "model.init={kind: kaiming}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mmin builds on baseline" in err and "baseline:model.init=" in err
    assert cli.main(["train", "--dataset", "demo", "--method", "mmin", "--set", "basline:model.init=x"]) == 2
    assert "no config 'basline'" in capsys.readouterr().err


def test_imer_train_gives_each_method_the_overrides_of_its_chain(monkeypatch):
    import train.run

    calls = {}
    monkeypatch.setattr(train.run, "train_method", lambda ds, m, **k: calls.setdefault(m, k["overrides"]))
    argv = ["train", "--dataset", "demo", "--method", "baseline,mmin", "--set", "*:train.batch_size=8",
            "--set", "mmin:loss.cycle=0", "--set", "baseline:model.dropout=0.2", "--set", "loss.forward=2"]
    assert cli.main(argv) == 0
    assert calls["baseline"] == {"*:train.batch_size": 8, "baseline:model.dropout": 0.2, "loss.forward": 2}
    assert calls["mmin"] == {"*:train.batch_size": 8, "mmin:loss.cycle": 0, "baseline:model.dropout": 0.2,
                             "loss.forward": 2}


def test_imer_compare_sends_plain_keys_to_every_config(monkeypatch):
    import train.compare

    seen = {}
    monkeypatch.setattr(train.compare, "compare", lambda ds, methods, **k: seen.update(k) or pytest.fail("ran"))
    assert cli.main(["compare", "--dataset", "demo", "--methods", "mmin", "--set", "base:model.init=x"]) == 2
    assert not seen
    ctx = train.compare.Context("demo", [], {"train.batch_size": 8, "baseline:model.dropout": 0.2}, "", "", "")
    cfg = ctx.config("mmin")
    pre = cfg["prerequisites"]["baseline"]
    assert cfg["train"]["batch_size"] == pre["train"]["batch_size"] == 8
    assert pre["model"]["dropout"] == 0.2 and cfg["model"]["dropout"] == 0.5
    assert ctx.config("baseline")["model"]["dropout"] == 0.2  # the listed baseline is the same config


# ---- the runner trains and signs what the config records ----------------------------------------------

FAST = {"*:train.schedule": {"kind": "linear_decay", "constant": 1, "decay": 1}, "*:train.batch_size": 16,
        **{f"*:model.encoders.{m}.hidden": 8 for m in "av"}, "*:model.encoders.t.channels": 8,
        "mmin:model.imagination.layers": [16, 8]}


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=40, seed=3, absent=0.1)


def _mmin(data, root, logs, **over):
    cfg = load_config("mmin", "demo", {**FAST, **over})
    return run_experiment(data, synthetic_folds(data, 2)[:1], cfg, dataset="synth", seeds=[0], results_dir=root,
                          progress=False, log=logs.append)


def test_a_prerequisite_trained_with_another_override_is_not_reused(data, tmp_path, one_torch_thread):
    logs = []
    first = _mmin(data, tmp_path, logs)
    pre = json.loads(next(first.glob("prereq/baseline/*/seed0/result.json")).read_text())
    assert any("training the prerequisite" in line for line in logs)

    logs.clear()  # the same scoped sets: the same run, nothing trained
    assert _mmin(data, tmp_path, logs) == first and not any("training" in line for line in logs)

    logs.clear()
    other = _mmin(data, tmp_path, logs, **{"baseline:train.optimizer.lr": 3e-3})
    assert other != first
    assert any("training the prerequisite" in line for line in logs), logs
    assert not any("reusing" in line for line in logs), logs  # neither the baseline nor the MMIN model
    pre2 = json.loads(next(other.glob("prereq/baseline/*/seed0/result.json")).read_text())
    mmin1, mmin2 = (json.loads(next(r.glob("folds/*/seed0/result.json")).read_text()) for r in (first, other))
    assert pre2["signature"] != pre["signature"] and mmin2["signature"] != mmin1["signature"]
    from train.trainer import load_checkpoint

    model, _, _ = load_checkpoint(next(other.glob("prereq/baseline/*/seed0/best.pt")))
    assert model.cfg["train"]["optimizer"]["lr"] == 3e-3  # the prerequisite trained with the scoped value
    recorded = json.loads((other / "run.json").read_text())
    assert recorded["config_hash"] != json.loads((first / "run.json").read_text())["config_hash"]

    logs.clear()  # run_experiment's prereq_overrides is the same as the scoped key: the same run
    again = run_experiment(data, synthetic_folds(data, 2)[:1], load_config("mmin", "demo", FAST), dataset="synth",
                           seeds=[0], results_dir=tmp_path, progress=False, log=logs.append,
                           prereq_overrides={"baseline": {"train.optimizer.lr": 3e-3}})
    assert again == other and not any("training" in line for line in logs)


def test_with_prerequisites_changes_the_recorded_configs_at_every_depth():
    cfg = load_config("mmin", "iemocap", {"baseline:requires": {"x": "baseline-aug"}})
    out = with_prerequisites(cfg, "iemocap", {"*": {"train.batch_size": 8}, "baseline-aug": {"model.dropout": 0.1}})
    base = out["prerequisites"]["baseline"]
    aug = base["prerequisites"]["baseline-aug"]
    assert out["train"]["batch_size"] == 128 and base["train"]["batch_size"] == aug["train"]["batch_size"] == 8
    assert aug["model"]["dropout"] == 0.1 and base["model"]["dropout"] == 0.3
    assert cfg["prerequisites"]["baseline"]["train"]["batch_size"] == 128  # the input is left as it was
    # a config written by hand without its prerequisites gets them resolved
    bare = {k: v for k, v in cfg.items() if k != "prerequisites"}
    assert with_prerequisites(bare, "iemocap")["prerequisites"]["baseline"] == load_config("baseline", "iemocap")

