"""denseface (DenseNet-BC-100, k=12, 342-d): architecture, checkpoint round trip, the error without
a checkpoint, and `imer denseface-train` for one epoch on a tiny fake fer2013.csv (+ FER+ labels)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from extract.base import ExtractorUnavailable, create
from extract.denseface import (FER2013_CLASSES, FERPLUS_CLASSES, build_densenet, default_checkpoint,
                               load_checkpoint, save_checkpoint)
from pipeline.cli import main as imer
from pipeline.commands.denseface_train import FERPLUS_COLUMNS, ferplus_targets


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # small CPU work on a shared machine: threads only add waiting
    yield
    torch.set_num_threads(old)


def test_architecture_is_densenet_bc_100_with_342_features():
    net = build_densenet()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 100  # stem + 3 blocks x 16 x (1x1 + 3x3) + 2 transitions + classifier
    assert sum(c.kernel_size == (3, 3) for c in convs) == 49 and convs[0].stride == (2, 2)
    assert [c.out_channels for c in convs if c.kernel_size == (3, 3)][1:] == [12] * 48  # growth rate
    trans = [c for c in convs if c.kernel_size == (1, 1) and c.out_channels != 48]
    assert [(c.in_channels, c.out_channels) for c in trans] == [(216, 108), (300, 150)]  # compression 0.5
    assert net.dim == 342 and linears[0].in_features == 342 and linears[0].out_features == len(FERPLUS_CLASSES)
    f, logits = net.eval()(torch.zeros(2, 1, 64, 64))
    assert f.shape == (2, 342) and logits.shape == (2, 8)
    assert 0.7e6 < sum(p.numel() for p in net.parameters()) < 0.9e6  # ~0.8M, as DenseNet-BC-100 k=12


def test_checkpoint_round_trip_and_extractor(tmp_path):
    torch.manual_seed(0)
    net = build_densenet(n_classes=7).eval()
    for m in net.modules():  # non-trivial BN statistics, so a lost buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    ckpt = save_checkpoint(tmp_path / "d.pt", net, FER2013_CLASSES, 120.0, 50.0, {"depth": 100, "growth": 12},
                           {"epochs": 0})
    back, meta = load_checkpoint(ckpt)
    assert meta["classes"] == list(FER2013_CLASSES) and (meta["mean"], meta["std"]) == (120.0, 50.0)
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), back(x)):
            torch.testing.assert_close(a, b)
    ex = create("denseface", checkpoint=str(ckpt))
    assert ex.dim == 342 and ex.model_identity()["sha"]
    crops = np.stack([_astronaut_crop(112)] * 2)
    gray = cv2.resize(cv2.cvtColor(crops[0], cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA)
    with torch.no_grad():
        want_f, want_l = net(torch.from_numpy((gray.astype(np.float32) - 120.0) / 50.0)[None, None])
    ex.ensure_loaded()
    got = ex.embed(crops, None, None)
    np.testing.assert_allclose(got[0], want_f[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ex.predict(crops)[0], torch.softmax(want_l, -1)[0].numpy(), atol=1e-5)


def test_without_checkpoint_the_error_names_both_ways(tmp_path):
    ex = create("denseface")
    assert ex._checkpoint() == default_checkpoint()
    with pytest.raises(ExtractorUnavailable) as e:
        ex.ensure_loaded()
    msg = str(e.value)
    assert "imer denseface-train --fer2013" in msg and "denseface:checkpoint=PATH" in msg and "not public" in msg
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ExtractorUnavailable, match="not a readable torch checkpoint"):
        create("denseface", checkpoint=str(bad)).ensure_loaded()
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(ExtractorUnavailable, match="not a denseface checkpoint"):
        create("denseface", checkpoint=str(other)).ensure_loaded()


def test_runner_without_checkpoint_stops_or_skips_and_creates_no_store(tmp_path):
    from manifests.schema import Manifest, Media, Utterance
    from pipeline.runner import run_features
    from pipeline.store import store_path

    man = Manifest([Utterance("u", "dense-test", video=Media(str(tmp_path / "absent.mp4")))], "dense-test")
    ex = create("denseface", checkpoint=str(tmp_path / "none.pt"))
    with pytest.raises(ExtractorUnavailable, match="denseface-train"):
        run_features(man, [ex], progress=False, required=True)  # asked for by name: an error
    summ = run_features(man, [ex], progress=False, required=False)  # the default set: skipped, with why
    assert "denseface-train" in summ[-1].skipped
    assert not store_path("dense-test", ex.key).exists()


# ---- FER+ labels -------------------------------------------------------------------------------

def test_ferplus_targets_majority_and_probability():
    votes = np.array([
        [8, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # neutral wins; the single votes are outliers
        [4, 3, 3, 0, 0, 0, 0, 0, 0, 0],  # no majority; probability: the top 3 reach 75% of the votes
        [5, 3, 2, 0, 0, 0, 0, 0, 0, 0],  # no majority; probability: the top 2 reach 75%
        [0, 0, 0, 0, 0, 0, 0, 0, 7, 3],  # unknown wins: dropped
        [0, 6, 0, 0, 0, 0, 0, 0, 0, 0],  # image removed by FER+: dropped
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no votes: dropped
    ], float)
    has = np.array([True, True, True, True, False, True])
    t, keep = ferplus_targets((votes, has), "majority")
    assert keep.tolist() == [True, False, False, False, False, False] and t[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    t, keep = ferplus_targets((votes, has), "probability")
    assert keep.tolist() == [True, True, True, False, False, False]
    np.testing.assert_allclose(t[1][:3], [0.4, 0.3, 0.3])
    np.testing.assert_allclose(t[2][:3], [5 / 8, 3 / 8, 0])
    np.testing.assert_allclose(t.sum(1)[keep], 1.0)


# ---- imer denseface-train ----------------------------------------------------------------------

def _astronaut_crop(size: int) -> np.ndarray:
    from skimage import data

    return cv2.resize(data.astronaut()[30:210, 140:310], (size, size), interpolation=cv2.INTER_AREA)


def _fake_fer(d: Path, n_train: int = 16, n_val: int = 4, n_test: int = 4) -> tuple[Path, Path]:
    """fer2013.csv (48x48 faces: the astronaut, shifted and noised) and a matching fer2013new.csv."""
    rng = np.random.default_rng(0)
    face = cv2.cvtColor(_astronaut_crop(56), cv2.COLOR_RGB2GRAY).astype(np.float32)
    usage = ["Training"] * n_train + ["PublicTest"] * n_val + ["PrivateTest"] * n_test
    fer, plus = d / "fer2013.csv", d / "fer2013new.csv"
    with open(fer, "w", newline="") as f, open(plus, "w", newline="") as g:
        a, b = csv.writer(f), csv.writer(g)
        a.writerow(["emotion", "pixels", "Usage"])
        b.writerow(FERPLUS_COLUMNS)
        for i, u in enumerate(usage):
            y, x = rng.integers(0, 8, 2)
            img = np.clip(face[y:y + 48, x:x + 48] + rng.normal(0, 8, (48, 48)), 0, 255).astype(np.uint8)
            a.writerow([i % 7, " ".join(map(str, img.ravel())), u])
            votes = [0] * 10
            votes[i % 8] = 10
            if not i % 5:  # every 5th image has no majority: 4 / 3 / 3 votes
                votes[i % 8], votes[(i + 1) % 8], votes[(i + 2) % 8] = 4, 3, 3
            b.writerow([u, f"fer{i:07d}.png", *votes])
    return fer, plus


def test_denseface_train_one_epoch_writes_a_usable_checkpoint(tmp_path, capsys):
    fer, plus = _fake_fer(tmp_path)
    out = tmp_path / "models" / "denseface.pt"
    rc = imer(["denseface-train", "--fer2013", str(fer), "--ferplus", str(plus), "--out", str(out),
               "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "FER+ (majority), 8 classes; train 12, val 4, test 3 images" in err  # images 0, 5, 10, ... dropped
    model, meta = load_checkpoint(out)
    assert meta["classes"] == list(FERPLUS_CLASSES) and meta["trained"]["best_epoch"] == 1
    assert meta["trained"]["labels"] == "FER+ (majority)" and 0 <= meta["trained"]["test_acc"] <= 1
    ex = create("denseface", checkpoint=str(out))
    ex.ensure_loaded()
    f = ex.embed(np.stack([_astronaut_crop(112)]), None, None)
    assert f.shape == (1, 342) and np.isfinite(f).all() and np.abs(f).sum() > 0

    # FER2013 labels only (no --ferplus): 7 classes, every row kept
    out7 = tmp_path / "d7.pt"
    assert imer(["denseface-train", "--fer2013", str(fer), "--out", str(out7), "--epochs", "1",
                 "--batch-size", "16", "--device", "cpu", "--no-progress"]) == 0
    assert "FER2013, 7 classes; train 16, val 4, test 4 images" in capsys.readouterr().err
    assert load_checkpoint(out7)[1]["classes"] == list(FER2013_CLASSES)


@pytest.mark.parametrize("breakage, message", [
    ("columns", "columns are ['emotion', 'pixels'], expected ['emotion', 'pixels', 'Usage']"),
    ("pixels", "fer2013.csv:3: pixels must be 2304 (48x48) space-separated integers 0..255"),
    ("usage", "fer2013.csv:2: Usage 'Train' is not one of"),
    ("ferplus_rows", "fer2013new.csv: 23 rows but fer2013.csv has 24"),
])
def test_denseface_train_bad_input_names_file_and_line(tmp_path, capsys, breakage, message):
    fer, plus = _fake_fer(tmp_path)
    lines = fer.read_text().splitlines()
    if breakage == "columns":
        fer.write_text("emotion,pixels\n0,1 2 3\n")
    elif breakage == "pixels":
        lines[2] = "3,1 2 3,Training"
        fer.write_text("\n".join(lines) + "\n")
    elif breakage == "usage":
        lines[1] = lines[1].replace("Training", "Train")
        fer.write_text("\n".join(lines) + "\n")
    else:
        plus.write_text("\n".join(plus.read_text().splitlines()[:-1]) + "\n")
    rc = imer(["denseface-train", "--fer2013", str(fer), "--ferplus", str(plus), "--out", str(tmp_path / "x.pt"),
               "--epochs", "1", "--device", "cpu", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and not (tmp_path / "x.pt").exists()


def test_training_and_extraction_normalise_alike():
    """denseface-train (torch tensors) and the extractor (numpy) share one input rule."""
    import torch

    from extract.denseface import MEAN, STD, normalise

    g = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    a, t = normalise(g), normalise(torch.from_numpy(g))
    assert a.shape == tuple(t.shape) == (3, 1, 64, 64)
    assert np.allclose(a, t.numpy(), atol=1e-6) and np.isclose(a[0, 0, 0, 0], (g[0, 0, 0] - MEAN) / STD)
