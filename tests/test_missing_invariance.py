"""A missing modality carries no information, for every registered method (issue 38): a method is
built (the demo's sizes), a modality is masked on some samples, then that modality's frames, its
length (1 vs the longest the batch can hold) and its frame mask are replaced with anything, before
the masking or after it, and the outputs of ``predict`` and ``represent`` must be bit-identical.
A new method is covered by registering it (its config of the same name is used; names starting with
"_" are the tests' own probes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.conditions import MODALITIES, apply_availability, without_truth
from train.config import load_config
from train.methods import available, build
from train.synthetic import synthetic_data

DIMS = {"a": 5, "v": 4, "t": 6}
# rows 0-2 lose the modality under test, rows 3-5 keep everything; one row lacks video naturally
MASKED = np.array([True, True, True, False, False, False])
LONG = 40  # "500" frames, scaled: the longest length the tampered batch can hold


def registered() -> list[str]:
    return sorted(n for n in available() if not n.startswith("_"))


def _data(cfg):
    d = synthetic_data(n=6, dims=DIMS, lengths={"a": (6, 12), "v": (3, 6), "t": (3, 8)}, seed=3)
    data = cfg.get("data") or {}
    d.max_len = {m: int(v) for m, v in (data.get("max_len") or {}).items() if v}
    d.fixed_len = bool(data.get("fixed_len"))
    d.resample_to = int(data["resample_to"]) if data.get("resample_to") else None
    return d


def _padded(batch: dict, m: str, T: int) -> dict:
    """``batch`` with modality ``m`` padded to ``T`` frames (zeros, invalid), same content."""
    b = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
    x, fm = b["x"][m], b["frame_mask"][m]
    if x.shape[1] < T:
        b["x"][m] = torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1]))
        b["frame_mask"][m] = torch.nn.functional.pad(fm, (0, T - fm.shape[1]))
    return b


def _tampered(batch: dict, m: str, rows, length: int, seed: int) -> dict:
    """``batch`` with modality ``m`` of ``rows`` replaced: random frames, ``length``, a random mask."""
    g = torch.Generator().manual_seed(seed)
    b = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
    x, fm, ln = b["x"][m].clone(), b["frame_mask"][m].clone(), b["lengths"][m].clone()
    r = torch.as_tensor(np.flatnonzero(rows))
    x[r] = torch.randn(x[r].shape, generator=g) * 50
    fm[r] = torch.rand(fm[r].shape, generator=g) < 0.5
    ln[r] = length
    b["x"][m], b["frame_mask"][m], b["lengths"][m] = x, fm, ln
    return b


def _outputs(method, batch) -> dict:
    out = {}
    for fn in ("predict", "represent"):
        torch.manual_seed(0)  # a stochastic method (IMDer's sampler) draws the same noise each time
        with torch.no_grad():
            y = getattr(method, fn)(dict(batch, phase="test"))
        out[fn] = None if y is None else y.detach().clone()
    return out


def _same(a: dict, b: dict) -> bool:
    return all((a[k] is None and b[k] is None) or torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def methods():
    torch.set_num_threads(1)
    out = {}
    for name in registered():
        cfg = load_config(name, "demo")
        data = _data(cfg)
        torch.manual_seed(0)
        out[name] = (build(cfg, data.spec).eval(), data)
    return out


def test_every_registered_method_is_covered(methods):
    assert set(methods) == set(registered()) and len(methods) >= 9


@pytest.mark.parametrize("name", registered())
@pytest.mark.parametrize("m", MODALITIES)
def test_masked_modality_content_length_and_mask_change_nothing(methods, name, m):
    method, data = methods[name]
    raw = data.collate(np.arange(6))
    raw["natural"][4, 1] = False  # one sample without video, as a recording without a face
    T = raw["x"][m].shape[1] if (data.resample_to or data.fixed_len) else LONG
    raw = _padded(raw, m, T)
    avail = np.ones((6, 3), bool)
    avail[MASKED, MODALITIES.index(m)] = False

    def masked(b):
        return without_truth(apply_availability(b, avail))

    ref = _outputs(method, masked(raw))
    # the missing modality's frames, length and frame mask replaced before the masking ...
    for length, seed in ((1, 1), (T, 2)):
        got = _outputs(method, masked(_tampered(raw, m, MASKED, length, seed)))
        assert _same(ref, got), f"{name}: masked {m} leaks (length {length}, before masking)"
    # ... or after it: a method never reads a modality its sample does not have
    for length, seed in ((1, 3), (T, 4)):
        got = _outputs(method, _tampered(masked(raw), m, MASKED, length, seed))
        assert _same(ref, got), f"{name}: masked {m} leaks (length {length}, after masking)"
    # the same holds for a naturally absent modality (row 4's video)
    if m == "v":
        got = _outputs(method, masked(_tampered(raw, "v", np.arange(6) == 4, T, 5)))
        assert _same(ref, got), f"{name}: a naturally absent video leaks"
    # and the modality does matter where it is present (the test can fail)
    got = _outputs(method, masked(_tampered(raw, m, ~MASKED & (raw["natural"][:, MODALITIES.index(m)]).numpy(), T, 6)))
    assert not torch.equal(ref["predict"], got["predict"]), f"{name}: {m} never reaches the output"
