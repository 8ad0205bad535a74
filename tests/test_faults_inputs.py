"""Bad inputs and traps (issue 19): the own corpus's manifest and folds stay together, folds are
checked against the manifest, class lists, short rows and non-UTF-8 files are one-line errors
naming file and line, a cut WAV is noted, bad CLI values are one-line errors, an extractor that
cannot run offline says the two ways out, and a checkpoint that would run code is refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from manifests import datasets
from manifests.schema import ManifestError
from pipeline.cli import main


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A cache of its own per test: the `own` dataset's conversion options carry over between runs."""
    monkeypatch.setenv("IMER_CACHE", str(tmp_path / "cache"))


def _csv(tmp_path, n=12, speakers=6, extra_rows=(), header="id,audio,text,label,speaker"):
    rows = [header]
    for i in range(n):
        p = tmp_path / f"u{i}.wav"
        if not p.exists():
            sf.write(p, (0.1 * np.random.default_rng(i).standard_normal(1600)).astype(np.float32), 16000)
        rows.append(f"u{i},u{i}.wav,text {i},{'ab'[i % 2]},s{i % speakers}")
    src = tmp_path / "corpus.csv"
    src.write_text("\n".join([*rows, *extra_rows]) + "\n")
    return src


def _files(d):
    return {p.name: p.read_bytes() for p in d.glob("*") if p.is_file()}


def test_failed_reconversion_leaves_manifest_and_folds_together(tmp_path, capsys):
    src = _csv(tmp_path, n=8, speakers=4)
    assert main(["manifest", "--dataset", "own", "--manifest", str(src), "--folds-k", "4"]) == 0
    d = datasets.manifest_dir("own")
    before = _files(d)
    src.write_text(src.read_text() + "u8,u0.wav,new,a,s0\n")
    # 4 speakers cannot make 5 folds: the conversion fails before writing anything
    assert main(["manifest", "--dataset", "own", "--manifest", str(src), "--folds-k", "5"]) == 2
    assert "only 4 speakers" in capsys.readouterr().err
    assert _files(d) == before
    # a later conversion that gives no --folds-k (imer features / imer train) keeps the 4 folds
    man = datasets.load_manifest("own", manifest=src)
    proto, folds = datasets.load_folds("own")
    assert len(folds) == 4 and len(man) == 9
    assert sorted(i for f in folds for i in f.test) == sorted(u.id for u in man)
    datasets.check_dataset_folds(man, "own", proto, folds)
    # the options are accepted wherever a conversion happens
    assert main(["features", "--dataset", "own", "--manifest", str(src), "--folds-k", "3", "--extractors", "nosuch"]) == 2
    assert len(datasets.load_folds("own")[1]) == 3


def test_folds_of_another_manifest_are_refused(tmp_path):
    src = _csv(tmp_path)
    man = datasets.load_manifest("own", manifest=src)
    proto, folds = datasets.load_folds("own")
    d = datasets.manifest_dir("own")
    (d / "manifest.jsonl").write_text("\n".join(l for l in (d / "manifest.jsonl").read_text().splitlines()
                                                if '"u3"' not in l) + "\n")
    from manifests.schema import read_manifest

    with pytest.raises(ManifestError, match="not in the manifest.*'u3'.*imer manifest --dataset own"):
        datasets.check_dataset_folds(read_manifest(d / "manifest.jsonl"), "own", proto, folds)
    # the same id count but other ids: the digest recorded with the folds tells
    text = (d / "manifest.jsonl").read_text().replace('"u4"', '"u4x"')
    (d / "manifest.jsonl").write_text(text)
    folds = [type(f)(f.name, [i for i in f.train if i not in ("u3", "u4")], [i for i in f.val if i not in ("u3", "u4")],
                     [i for i in f.test if i not in ("u3", "u4")]) for f in folds]
    with pytest.raises(ManifestError, match="another version of the manifest"):
        datasets.check_dataset_folds(read_manifest(d / "manifest.jsonl"), "own", proto, folds)
    assert len(man) == 12


def test_declared_classes_and_singletons(tmp_path, capsys):
    src = _csv(tmp_path, extra_rows=["u99,u0.wav,typo,hapy,s1"])
    with pytest.raises(ManifestError, match=r"corpus.csv:14: label 'hapy' is not one of the declared classes a, b"):
        datasets.load_manifest("own", manifest=src, classes="a,b")
    assert main(["manifest", "--dataset", "own", "--manifest", str(src), "--classes", "b,a"]) == 2
    assert "corpus.csv:14: label 'hapy'" in capsys.readouterr().err
    man = datasets.load_manifest("own", manifest=src)  # undeclared: kept, but said
    assert "corpus.csv:14: class 'hapy' has a single utterance" in capsys.readouterr().err
    assert man.labels == ["a", "b", "hapy"]
    src = _csv(tmp_path)
    man = datasets.load_manifest("own", manifest=src, classes="b,a")
    assert man.labels == ["b", "a"] and man.by_id()["u0"].label_index == 1


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_manifest_names_file_and_line(tmp_path, suffix, capsys):
    if suffix == ".csv":
        src = _csv(tmp_path)
        src.write_bytes(src.read_bytes().replace(b"text 2", b"caf\xe9 2"))
        line = 4
    else:
        src = tmp_path / "corpus.jsonl"
        src.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
        line = 2
    assert main(["manifest", "--dataset", "own", "--manifest", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{src}:{line}: not UTF-8" in err
    from manifests.schema import read_manifest

    with pytest.raises(ManifestError, match=f"{src.name}:{line}: not UTF-8"):
        read_manifest(src)


def test_short_csv_row_is_an_error(tmp_path):
    src = _csv(tmp_path, extra_rows=["u99,u0.wav"])
    with pytest.raises(ManifestError, match=r"corpus.csv:14: 2 field\(s\), the header has 5 columns"):
        datasets.load_manifest("own", manifest=src)


def test_cut_wav_is_noted(tmp_path, capsys):
    from extract.audio_io import load_audio
    from manifests.schema import Media

    p = tmp_path / "full.wav"
    sf.write(p, (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    load_audio(Media(str(p)))
    assert capsys.readouterr().err == ""
    assert len(load_audio(Media(str(cut)))) < 16000
    err = capsys.readouterr().err
    assert f"{cut}: truncated WAV" in err and "2.00 s" in err and "1.00 s" in err


@pytest.mark.parametrize("argv, match", [
    (["--seeds", "-1"], "seeds must be integers in [0, 2**32)"),
    (["--set", "train.batch_size=0"], "train.batch_size must be a positive integer, got 0"),
    (["--features", "nosuch"], "no such feature set"),
])
def test_bad_train_values_are_one_line(argv, match, capsys):
    # an unknown dataset: the value is refused before anything is looked up (the old code went on to train)
    assert main(["train", "--dataset", "nosuch", "--method", "baseline", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_bad_seed_leaves_no_run_marked_running(tmp_path):
    from train.config import ConfigError, load_config
    from train.run import run_experiment
    from train.synthetic import synthetic_data, synthetic_folds

    d = synthetic_data(n=20, dims={"a": 3, "v": 3, "t": 3}, seed=0)
    cfg = load_config("baseline", None, {"train.epochs": 1})
    with pytest.raises(ConfigError, match="seeds"):
        run_experiment(d, synthetic_folds(d, 2), cfg, dataset="synth", seeds="0,-1", results_dir=tmp_path,
                       progress=False, log=lambda *_: None)
    assert not list(tmp_path.rglob("run.json"))


def test_extractor_that_cannot_run_offline_says_the_ways_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = _csv(tmp_path)
    from extract.base import ExtractorUnavailable
    from pipeline.runner import ensure_features

    with pytest.raises(ExtractorUnavailable) as e:
        ensure_features("own", {"text": "bert:model=bert-large-uncased"}, manifest=src, device="cpu", progress=False)
    msg = str(e.value)
    assert "the text extractor 'bert' cannot run here for dataset 'own'" in msg and "--features offline" in msg
    assert "\n" not in msg
    # the CLI: one line, exit 2 (the config's bert-large text features on an own corpus)
    argv = ["train", "--dataset", "own", "--manifest", str(src), "--method", "baseline", "--no-progress",
            "--set", "features={text: {name: bert, params: {model: bert-large-uncased}}}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'bert' cannot run here" in err


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['IMER_FAULTS_MARKER']}",))


def _crafted(path, marker):
    os.environ["IMER_FAULTS_MARKER"] = str(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "config": {}, "spec": {"dims": {}}, "x": _Evil()}, path, pickle_protocol=2)


def test_crafted_checkpoint_is_refused(tmp_path, capsys):
    from pipeline.fsutil import UnsafeCheckpoint
    from train.trainer import load_checkpoint

    marker = tmp_path / "pwned"
    _crafted(tmp_path / "best.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match="refused to load"):
        load_checkpoint(tmp_path / "best.pt")
    assert not marker.exists()

    run = tmp_path / "run"
    (run).mkdir()
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    _crafted(run / "folds" / "f1" / "seed0" / "best.pt", marker)
    assert main(["predict", "--run", str(run), "--text", "hello", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to load" in err and not marker.exists()


def test_crafted_last_checkpoint_is_not_resumed(tmp_path):
    from pipeline.fsutil import UnsafeCheckpoint
    from train.config import load_config
    from train.methods import build
    from train.synthetic import synthetic_data, synthetic_folds
    from train.trainer import Trainer

    d = synthetic_data(n=24, dims={"a": 3, "v": 3, "t": 3}, seed=0)
    f = synthetic_folds(d, 2)[0]
    cfg = load_config("baseline", None, {"train.epochs": 1, "train.schedule": {"kind": "constant"}})
    out = tmp_path / "fold"
    marker = tmp_path / "pwned"
    _crafted(out / "last.pt", marker)
    tr = Trainer(build(cfg, d.spec), d, d.indices(f.train, "train"), d.indices(f.val, "val"), cfg, out, progress=False)
    with pytest.raises(UnsafeCheckpoint):
        tr.fit()
    assert not marker.exists()
    # what the trainer itself writes loads back with weights_only=True
    (out / "last.pt").unlink()
    Trainer(build(cfg, d.spec), d, d.indices(f.train, "train"), d.indices(f.val, "val"), cfg, out, progress=False).fit()
    for name in ("best.pt", "last.pt"):
        torch.load(out / name, weights_only=True)
