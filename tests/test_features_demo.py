"""`imer features` on demo utterances writes the audio and text stores; the default set reports
wav2vec2 as unavailable (no weights offline) with how to provide them, and goes on."""

from __future__ import annotations

import numpy as np

from extract.audio_io import audio_duration
from manifests.schema import read_manifest, write_manifest
from pipeline.store import FeatureStore, list_stores


def _subset(tiny_demo, tmp_path, n=4):
    man = read_manifest(tiny_demo)
    return man, write_manifest(tmp_path / "manifest.jsonl", man.utterances[:n], "demo-sub", root=tmp_path)


def test_features_cli_writes_audio_and_text_stores(tiny_demo, tmp_path, capsys):
    from pipeline.cli import main

    man, mpath = _subset(tiny_demo, tmp_path)
    argv = ["features", "--dataset", "demo-at", "--manifest", str(mpath), "--no-progress", "--device", "cpu",
            "--extractors", "compare,librosa,minilm-l6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 utterances, 3 stage(s): computed 12, cached 0, failed 0" in out
    stores = {FeatureStore.open(p).attrs["extractor"]: FeatureStore.open(p) for p in list_stores("demo-at")}
    assert set(stores) == {"compare", "librosa", "minilm-l6"}
    for u in man.utterances[:4]:
        secs = audio_duration(u.audio)
        assert abs(len(stores["compare"][u.id]) - (100 * secs - 4)) <= 1  # SPEC §1: 100 N - 4 rows
        assert abs(len(stores["librosa"][u.id]) - (1 + 100 * secs)) <= 1
        assert stores["minilm-l6"][u.id].shape[1] == 384 and len(stores["minilm-l6"][u.id]) >= 3
    assert [s.dim for s in (stores["compare"], stores["librosa"])] == [130, 33]
    assert all(s.verify() == [] for s in stores.values())
    assert main(argv) == 0  # nothing new: all cached
    assert "computed 0, cached 12, failed 0" in capsys.readouterr().out


def test_default_set_skips_wav2vec2_with_instructions(tiny_demo, tmp_path):
    from extract.base import create
    from pipeline.runner import run_features

    man, mpath = _subset(tiny_demo, tmp_path, n=2)
    man = read_manifest(mpath)
    sums = run_features(man, [create("wav2vec2"), create("logmel", n_mels=8)], progress=False, required=False)
    assert sums[0].skipped and "facebook/wav2vec2-base" in sums[0].skipped and "HF_HOME" in sums[0].skipped
    assert sums[0].line().startswith("wav2vec2: skipped: ") and not sums[0].path.exists()
    assert sums[1].computed == 2 and np.isfinite(FeatureStore.open(sums[1].path).load().data).all()
