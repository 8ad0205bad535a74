"""imer predict end to end: features extracted on the fly with the run's extractors (ComParE for a
WAV file, MiniLM for text), missing modalities handled, the CLI's output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from train.config import load_config
from train.run import run_experiment
from train.synthetic import synthetic_data, synthetic_folds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch baseline on synthetic data shaped like the demo features (compare 130, fer-cnn 128,
    minilm-l6 384), with the demo config's extractors recorded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("results")
    d = synthetic_data(n=40, dims={"a": 130, "v": 128, "t": 384}, seed=0)
    cfg = load_config("baseline", "demo", {"train.epochs": 1, "train.schedule": {"kind": "constant"},
                                           "train.batch_size": 16, "model.encoders.a.hidden": 16,
                                           "model.encoders.v.hidden": 16, "model.encoders.t.channels": 16})
    out = run_experiment(d, synthetic_folds(d, 2), cfg, dataset="synth", seeds=[0], results_dir=root,
                         progress=False, log=lambda *_: None)
    yield out
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    p = tmp_path_factory.mktemp("audio") / "clip.wav"
    t = np.arange(16000 * 2) / 16000
    sig = 0.3 * np.sin(2 * np.pi * (140 + 40 * np.sin(2 * np.pi * 1.5 * t)) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(p, sig.astype(np.float32), 16000)
    return p


def test_extract_inputs_uses_the_run_extractors(run, wav):
    from extract.base import create
    from manifests.schema import Media, Utterance
    from pipeline.cache import cache_root
    from train.predict import extract_inputs

    def listing():
        root = cache_root()
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []

    cfg = load_config("baseline", "demo")
    before = listing()
    seqs = extract_inputs(cfg["features"], {"audio": str(wav), "text": "I am so happy today!"},
                          {"a": 130, "v": 128, "t": 384})
    assert seqs["v"] is None and seqs["a"].shape[1] == 130 and seqs["t"].shape[1] == 384
    ref = create("compare", downsample=10).extract([Utterance("x", audio=Media(str(wav)))])[0]
    assert np.allclose(seqs["a"], ref.features, atol=1e-5)  # exactly what the store would hold
    assert listing() == before  # predict writes nothing into the shared cache (its scratch store is a temp dir)


def test_predict_command(run, wav, capsys):
    from pipeline.cli import main
    from train.predict import predict

    res = predict(run, audio=str(wav), text="Leave me alone, I am furious!")
    assert res["condition"] == "at" and res["models"] == 2
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert res["label"] == max(res["probabilities"], key=res["probabilities"].get)
    assert main(["predict", "--run", str(run), "--text", "so sad", "--fold", "f1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["condition"] == "t" and out["models"] == 1
    assert main(["predict", "--run", str(run)]) == 2
    assert "give at least one" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), "--audio", "/nonexistent.wav"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_resolve_run_skips_a_damaged_run_json(tmp_path):
    """A half-written run.json beside finished runs is passed over, not a traceback; the newest
    complete run wins by finishing time."""
    import json

    from train.predict import resolve_run

    for name, doc in [("20260101-a", {"status": "complete", "finished": "2026-01-02"}),
                      ("20260103-b", {"status": "complete", "finished": "2026-01-01"}),
                      ("20260104-c", {"status": "running"})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(doc))
    (tmp_path / "20260105-d").mkdir()
    (tmp_path / "20260105-d" / "run.json").write_text('{"status": "compl')
    assert resolve_run(tmp_path) == tmp_path / "20260101-a"


def test_a_run_reads_only_the_folds_and_seeds_it_lists(tmp_path):
    from train.predict import checkpoints
    from train.results import listed

    (tmp_path / "run.json").write_text(json.dumps({"folds": ["Ses 01", "2"], "seeds": [0]}))
    for fold in ("Ses_01", "2", "3"):
        for seed in (0, 1):
            (tmp_path / "folds" / fold / f"seed{seed}").mkdir(parents=True)
            (tmp_path / "folds" / fold / f"seed{seed}" / "best.pt").touch()
    assert tmp_path / "folds" / "Ses_01" / "seed0" in listed(tmp_path, "best.pt")  # the folder of fold "Ses 01"
    assert [p.parent.parent.name + "/" + p.parent.name for p in checkpoints(tmp_path)] == ["2/seed0", "Ses_01/seed0"]
    (tmp_path / "run.json").write_text(json.dumps({}))  # a run that lists none: all of them
    assert len(checkpoints(tmp_path)) == 6
