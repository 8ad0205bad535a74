"""bench/gpu_check.py on the CPU (``--device cpu``): the one-shot GPU check runs end to end in the
suite, so it cannot rot while no GPU is at hand. Every registered extractor runs (or says why it
cannot), the reduced-precision paths run as CPU bf16 autocast, every registered method trains 2
epochs of 2 batches under bf16 autocast and in float32."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_gpu_check_runs_everything_on_cpu(tiny_demo, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("IMER_RESULTS", str(tmp_path / "results"))
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    from extract.base import available
    from train.methods import available as methods

    out = tmp_path / "gpu_check.json"
    res = gpu_check.main(["--device", "cpu", "--manifest", str(tiny_demo), "--utterances", "8", "--cpu-seeds", "1",
                          "--compare-utterances", "2", "--out", str(out)])
    assert json.loads(out.read_text())["utterances"] == 8

    ext = {r["extractor"]: r for r in res["extractors"]}
    assert set(ext) == set(available())
    offline = {"compare", "egemaps", "faces", "fer-cnn", "librosa", "logmel", "minilm-l6", "openface"}
    assert all("skipped" not in ext[n] and ext[n]["failed"] == 0 and ext[n]["utterances"] == 8 for n in offline)
    for name, r in ext.items():
        if "skipped" in r:
            continue
        diff = r["vs_cpu_fp32"]
        if sys.modules["extract.base"].get(name).half_precision:  # ran in bf16: close to float32, not equal
            assert r["precision"] == "bf16" and 0 < diff["max_abs"] and diff["cos_min"] > 0.99, (name, diff)
        else:  # float32 on the CPU both times: the same features
            assert r["precision"] == "fp32" and diff["max_abs"] == 0, (name, diff)

    rows = {r["method"]: r for r in res["methods"]}
    assert set(rows) == {n for n in methods() if not n.startswith("_")}  # not the suite's probes
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        amp, fp32 = r["amp"], r["fp32"]
        assert amp["dtype"] == "bfloat16" and fp32["dtype"] == "float32"
        assert fp32["untrained_out_rel_diff"] == 0 and fp32["ua_minus_cpu"] == 0  # the reference itself
        assert 0 < amp["untrained_out_rel_diff"] < 0.05, (name, amp)  # bf16 rounding, nothing worse
        assert amp["samples_per_s"] > 0 and amp["gflop_per_s"] > 0 and fp32["s_per_epoch"] > 0


def test_store_key_records_a_precision_other_than_float32():
    """Half-precision features never share a store with float32 ones; float32 keys are unchanged
    (no ``precision`` entry), so existing stores stay valid. ``auto``: fp16 on CUDA for the
    networks that allow it, float32 on CPU and for everything else."""
    import pytest

    from extract.base import create

    for name in ("minilm-l6", "fer-cnn", "logmel"):
        plain = create(name, device="cpu")
        assert "precision" not in plain.config() and create(name, device="cpu", precision="fp32").key == plain.key
    assert create("minilm-l6", device="cpu", precision="bf16").config()["precision"] == "bf16"
    assert create("minilm-l6", device="cpu", precision="bf16").key != create("minilm-l6", device="cpu").key
    assert create("minilm-l6", device="cuda").config()["precision"] == "fp16"  # no GPU needed to name the key
    assert create("fer-cnn", device="cuda:1").precision == "fp16"
    assert create("minilm-l6", device="cuda", fp16=False).precision == "fp32"
    assert "precision" not in create("openface", device="cuda").config()  # HOG and geometry: float32 only
    with pytest.raises(ValueError, match="float32 only"):
        create("logmel", precision="fp16")
    with pytest.raises(ValueError, match="auto, fp32, fp16 or bf16"):
        create("minilm-l6", precision="half")
