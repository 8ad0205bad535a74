"""A method's loss weights and dropout when its config leaves them out are the ones its shipped
config (the paper's or the authors' values) states, so a user's trimmed config trains the same
method; a negative weight is refused before anything trains."""

from __future__ import annotations

import copy

import pytest
import torch

from train.config import ConfigError, load_config
from train.data import DataSpec
from train.methods import Method, available, build

SPEC = DataSpec({"a": 5, "v": 4, "t": 6}, "classification", ["ang", "hap", "neu", "sad"])


def _main_configs() -> list[str]:
    """Registered methods whose config of the same name is the method itself (not an ablation)."""
    out = []
    for name in sorted(available()):
        if name.startswith("_"):
            continue
        try:
            cfg = load_config(name)
        except ConfigError:
            continue
        if cfg.get("method", name) == name:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _main_configs())
def test_code_defaults_equal_the_shipped_loss_weights(monkeypatch, name):
    cfg = load_config(name)
    calls = []
    orig = Method.loss_weight

    def spy(self, term, default):
        calls.append((term, default))
        return orig(self, term, default)

    monkeypatch.setattr(Method, "loss_weight", spy)
    torch.manual_seed(0)
    build(cfg, SPEC)
    stated = cfg.get("loss") or {}
    checked = [(t, d) for t, d in calls if t in stated]
    assert all(float(stated[t]) == d for t, d in checked), f"{name}: defaults {checked} vs config {stated}"
    if calls:
        assert checked, f"{name}: no loss weight of the code is stated in its config"
    # and a config without its loss section builds a method with exactly those weights
    trimmed = copy.deepcopy(cfg)
    trimmed.pop("loss", None)
    calls.clear()
    build(trimmed, SPEC)
    assert [d for _, d in calls] == [float(stated.get(t, d)) for t, d in calls]


def test_a_negative_loss_weight_is_refused():
    cfg = load_config("mmin")
    cfg["loss"] = dict(cfg["loss"], cycle=-1.0)
    with pytest.raises(ConfigError, match=r"loss\.cycle is -1\.0"):
        build(cfg, SPEC)
    cfg["loss"]["cycle"] = float("nan")
    with pytest.raises(ConfigError, match=r"loss\.cycle"):
        build(cfg, SPEC)


def test_mmin_classifier_dropout_defaults_to_the_authors():
    cfg = load_config("mmin")
    assert cfg["model"]["dropout"] == 0.5
    del cfg["model"]["dropout"]
    torch.manual_seed(0)
    m = build(cfg, SPEC)
    drops = [mod.p for mod in m.classifier.modules() if isinstance(mod, torch.nn.Dropout)]
    assert drops and all(p == 0.5 for p in drops)


def test_mmin_without_cycle_builds_no_backward_module():
    cfg = load_config("mmin")
    assert build(cfg, SPEC).imagine_back is not None
    cfg["loss"] = dict(cfg["loss"], cycle=0.0)
    assert build(cfg, SPEC).imagine_back is None
