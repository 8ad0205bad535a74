"""Stage runner: incremental, changed sources, failures, SIGKILL + resume, concurrent writers,
dask, upstream stages, unavailable extractors, the `imer features` CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from extract import base
from extract.base import Extractor, ExtractorUnavailable, Output
from manifests.schema import Media, Utterance, read_manifest, write_manifest
from pipeline.runner import StrictFailure, ensure_features, parse_specs, run_features
from pipeline.store import FeatureStore, store_path

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def frames_of(y: np.ndarray, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference features: per hop-sample frame [mean, std, min, max]; silent frames are invalid."""
    n = len(y) // hop
    fr = y[:n * hop].reshape(n, hop)
    return np.stack([fr.mean(1), fr.std(1), fr.min(1), fr.max(1)], 1).astype(np.float32), fr.std(1) > 1e-4


class Frames(Extractor):
    """Test-only stage (not registered). IMER_TEST_SLEEP seconds per utterance widen the kill window."""

    name = "test-frames"
    modality = "audio"
    defaults = {"hop": 160}
    batch_size = 2
    loads = 0
    calls: list = []

    @property
    def dim(self):
        return 4

    @property
    def frame_rate(self):
        return SR / self.params["hop"]

    def load(self):
        type(self).loads += 1

    def extract_one(self, utt):
        type(self).calls.append(utt.id)
        time.sleep(float(os.environ.get("IMER_TEST_SLEEP", "0")))
        y, _ = sf.read(utt.audio.path, dtype="float32")  # raises on a corrupt file
        return Output(*frames_of(y, self.params["hop"]))


def _wav(path: Path, seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = (0.2 * rng.standard_normal(int(SR * seconds))).astype(np.float32)
    y[: SR // 20] = 0  # 50 ms of silence: invalid frames in the mask
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, SR, subtype="FLOAT")
    return y


def _corpus(d: Path, dataset: str, n: int, extra: list[Utterance] = ()) -> Path:
    utts = []
    for i in range(n):
        if not (d / "wav" / f"u{i:02d}.wav").exists():  # rewriting would change the bytes: libsndfile
            _wav(d / "wav" / f"u{i:02d}.wav", i, 0.15 + 0.05 * (i % 5))  # stamps float WAVs (PEAK chunk)
        utts.append(Utterance(f"u{i:02d}", dataset=dataset, speaker=f"s{i % 2}", audio=Media(f"wav/u{i:02d}.wav")))
    return write_manifest(d / "manifest.jsonl", [*utts, *extra], dataset, root=d)


def _manifest(d: Path, dataset: str, n: int, extra=()):
    return read_manifest(_corpus(d, dataset, n, list(extra)))


def _assert_matches_reference(store: FeatureStore, man, hop=160):
    for u in man:
        if u.audio is None or u.id not in store:
            continue
        y, _ = sf.read(u.audio.path, dtype="float32")
        f, m = frames_of(y, hop)
        np.testing.assert_array_equal(store[u.id], f)
        np.testing.assert_array_equal(store.mask(u.id), m)


@pytest.fixture(autouse=True)
def _reset_counters():
    Frames.loads, Frames.calls = 0, []


def test_incremental_and_noop(tmp_path, monkeypatch):
    man = _manifest(tmp_path, "inc", 5)
    [s] = run_features(man, [Frames()], progress=False)
    assert (s.computed, s.cached, s.failed) == (5, 0, {}) and Frames.loads == 1
    st = FeatureStore.open(store_path("inc", Frames().key))
    assert st.path == s.path and sorted(st.ids()) == [u.id for u in man]
    assert st.attrs["extractor"] == "test-frames" and st.attrs["params"] == {"hop": 160}
    assert st.attrs["frame_rate"] == 100.0 and st.attrs["dataset"] == "inc" and st.attrs["key"] == Frames().key
    _assert_matches_reference(st, man)

    # nothing new: no model load, no cluster even with workers > 1, nothing extracted
    monkeypatch.setattr("pipeline.cluster.Cluster.get", lambda self: pytest.fail("cluster started for a no-op run"))
    [s] = run_features(man, [Frames()], workers=2, progress=False)
    assert (s.computed, s.cached) == (0, 5) and Frames.loads == 1 and len(Frames.calls) == 5

    man2 = _manifest(tmp_path, "inc", 8)  # three new utterances
    [s] = run_features(man2, [Frames()], progress=False)
    assert (s.computed, s.cached) == (3, 5)
    assert sorted(Frames.calls[5:]) == ["u05", "u06", "u07"]
    st.refresh()
    assert len(st) == 8 and st.n_entries == 8
    _assert_matches_reference(st, man2)


def test_changed_source_is_recomputed(tmp_path):
    man = _manifest(tmp_path, "chg", 4)
    run_features(man, [Frames()], progress=False)
    st = FeatureStore.open(store_path("chg", Frames().key))
    old = st["u02"].copy()
    _wav(tmp_path / "wav" / "u02.wav", 99, 0.25)  # same length as before, other samples
    [s] = run_features(man, [Frames()], progress=False)
    assert (s.computed, s.cached) == (1, 3) and Frames.calls[-1] == "u02"
    st.refresh()
    assert not np.array_equal(st["u02"], old) and st.n_entries == 5
    _assert_matches_reference(st, man)
    L = st.load()
    assert len(L.data) == sum(len(st[u]) for u in st.ids())  # the stale frames are not served
    np.testing.assert_array_equal(st.to_dask().compute(), L.data)


class WeightedFrames(Frames):
    """Frames whose store key depends on a weights file, as a model extractor's does."""

    name = "test-weighted-frames"
    weights = ""

    def model_identity(self):
        return {"weights": base.file_digest(self.weights)}


def test_digests_remembered_across_processes(tmp_path, monkeypatch):
    from pipeline.runner import _prime_digests

    man = _manifest(tmp_path, "dig", 3)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"w" * 1000)
    monkeypatch.setattr(WeightedFrames, "weights", str(weights))
    monkeypatch.setattr(base, "_DIGESTS", {})
    run_features(man, [WeightedFrames()], progress=False)
    truth = {u.audio.path: base.file_digest(u.audio.path) for u in man}
    truth[str(weights)] = base.file_digest(weights)
    monkeypatch.setattr(base, "_DIGESTS", {})  # as in a fresh process: media and weights need no hashing
    _prime_digests(man)
    assert {k[0]: v for k, v in base._DIGESTS.items()} == truth
    time.sleep(0.01)
    _wav(tmp_path / "wav" / "u01.wav", 1, 0.2)  # rewritten: ctime moves, its remembered digest is not trusted
    monkeypatch.setattr(base, "_DIGESTS", {})
    _prime_digests(man)
    assert {k[0] for k in base._DIGESTS} == set(truth) - {man.utterances[1].audio.path}


def test_corrupt_input_recorded_and_run_continues(tmp_path):
    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / "junk.wav").write_bytes(b"RIFF\x00\x00not really audio")
    extra = [Utterance("junk", audio=Media("wav/junk.wav")), Utterance("textonly", text="no audio here")]
    man = _manifest(tmp_path, "bad", 3, extra)
    with pytest.raises(StrictFailure) as ei:
        run_features(man, [Frames()], progress=False, strict=True)
    [s] = ei.value.summaries
    assert s.computed == 3 and list(s.failed) == ["junk"] and s.no_source == 1
    assert "junk.wav" in s.failed["junk"] or "LibsndfileError" in s.failed["junk"]
    assert "failed junk:" in s.line()
    st = FeatureStore.open(s.path)
    assert st.failures()["junk"]["reason"] == s.failed["junk"] and "junk" not in st and len(st) == 3
    _assert_matches_reference(st, man)

    [s] = run_features(man, [Frames()], progress=False)  # same bad file: not retried
    assert (s.computed, s.cached, list(s.failed_before)) == (0, 3, ["junk"]) and Frames.calls.count("junk") == 1
    [s] = run_features(man, [Frames()], progress=False, retry_failed=True)
    assert list(s.failed) == ["junk"] and Frames.calls.count("junk") == 2


CHILD = """
import importlib.util, sys
sys.path.insert(0, {repo!r})
spec = importlib.util.spec_from_file_location("runner_tests", {test!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
from manifests.schema import read_manifest
from pipeline.runner import run_features
man = read_manifest(sys.argv[1]); man.dataset = sys.argv[2]
[s] = run_features(man, [mod.Frames()], progress=False)
print("SUMMARY", s.computed, s.cached, len(s.failed), flush=True)
"""


def _child(tmp_path: Path, manifest: Path, dataset: str, sleep: float) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), test=str(Path(__file__).resolve())))
    env = {**os.environ, "IMER_TEST_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, str(script), str(manifest), dataset], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reference(man, dataset: str) -> FeatureStore:
    man.dataset = dataset
    run_features(man, [Frames()], progress=False)
    return FeatureStore.open(store_path(dataset, Frames().key))


def _assert_same(a: FeatureStore, b: FeatureStore):
    assert sorted(a.ids()) == sorted(b.ids())
    for u in a.ids():
        np.testing.assert_array_equal(a[u], b[u])
        np.testing.assert_array_equal(a.mask(u), b.mask(u))
        assert a.fingerprint(u) == b.fingerprint(u)


def test_sigkill_mid_extraction_then_resume(tmp_path):
    mpath = _corpus(tmp_path, "kill", 12)
    proc = _child(tmp_path, mpath, "kill", sleep=0.15)
    path = store_path("kill", Frames().key)
    deadline = time.time() + 90
    seen = 0
    while time.time() < deadline and proc.poll() is None:
        if (path / "zarr.json").is_file():
            seen = FeatureStore.open(path).n_entries
            if seen >= 4:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"child finished or died before the kill: {proc.communicate()}"
    assert seen >= 4, "child committed nothing within 90 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)

    st = FeatureStore.open(path)
    done = len(st)
    assert 4 <= done < 12 and st.verify() == []
    man = read_manifest(mpath)
    [s] = run_features(man, [Frames()], progress=False)  # resume
    assert (s.computed, s.cached) == (12 - done, done)
    st.refresh()
    assert st.n_entries == 12 and st.verify() == []
    _assert_same(st, _reference(read_manifest(mpath), "kill-ref"))


def test_two_concurrent_extractions(tmp_path):
    mpath = _corpus(tmp_path, "conc", 12)
    procs = [_child(tmp_path, mpath, "conc", sleep=0.03) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    counts = [tuple(map(int, o.split("SUMMARY")[1].split())) for o, _ in outs]
    assert sum(c[0] for c in counts) == 12  # every utterance computed-and-written by exactly one of them
    assert all(c[0] + c[1] == 12 and c[2] == 0 for c in counts)
    st = FeatureStore.open(store_path("conc", Frames().key))
    assert st.verify() == [] and st.n_entries == 12
    _assert_same(st, _reference(read_manifest(mpath), "conc-ref"))


def test_dask_workers_and_scheduler(tmp_path):
    from distributed import LocalCluster

    man = _manifest(tmp_path, "dask", 10)
    [s] = run_features(man, [Frames()], workers=2, processes=False, progress=False)
    assert s.computed == 10
    assert 1 <= Frames.loads <= 2  # once per worker, not once per batch (5 batches)
    st = FeatureStore.open(s.path)
    _assert_matches_reference(st, man)
    np.testing.assert_array_equal(st.to_dask().compute(), st.load().data)

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cl:
        man.dataset = "dask-sched"
        [s2] = run_features(man, [Frames()], scheduler=cl.scheduler_address, progress=False)
    assert s2.computed == 10
    _assert_same(FeatureStore.open(s2.path), st)


class MeanOfLogMel(Extractor):
    """Test-only downstream stage: reads the logmel store through ``upstream``."""

    name = "test-mean-logmel"
    modality = "audio"
    requires = ("logmel",)

    @property
    def dim(self):
        return 1

    def extract_one(self, utt):
        return Output(self.upstream["logmel"][utt.id].mean(axis=1, keepdims=True))


def test_upstream_stage_runs_first(tmp_path):
    man = _manifest(tmp_path, "up", 3)
    sums = run_features(man, [MeanOfLogMel()], progress=False)
    assert [s.extractor for s in sums] == ["logmel", "test-mean-logmel"] and all(s.computed == 3 for s in sums)
    lm, down = FeatureStore.open(sums[0].path), FeatureStore.open(sums[1].path)
    for u in man:
        np.testing.assert_allclose(down[u.id][:, 0], lm[u.id].mean(axis=1), rtol=1e-6)
    assert "upstream" in down.attrs["config"] and down.attrs["config"]["upstream"]["logmel"] == lm.key


class NoWeights(Extractor):
    name = "test-noweights"
    modality = "audio"

    @property
    def dim(self):
        return 1

    def load(self):
        raise ExtractorUnavailable("test-noweights: no weights; pass weights=PATH")


class NeedsNoWeights(MeanOfLogMel):
    name = "test-needs-noweights"
    requires = ("test-noweights",)


def test_unavailable_extractor(tmp_path, monkeypatch):
    monkeypatch.setitem(base._REGISTRY.classes, "test-noweights", NoWeights)
    man = _manifest(tmp_path, "unav", 2)
    with pytest.raises(ExtractorUnavailable, match="no weights"):
        run_features(man, [NoWeights()], progress=False)
    sums = run_features(man, [NeedsNoWeights(), Frames()], progress=False, required=False)
    assert [(s.extractor, s.skipped) for s in sums] == [
        ("test-noweights", "test-noweights: no weights; pass weights=PATH"),
        ("test-needs-noweights", "needs test-noweights, which is unavailable: test-noweights: no weights; pass weights=PATH"),
        ("test-frames", None)]
    assert sums[0].line() == "test-noweights: skipped: test-noweights: no weights; pass weights=PATH"
    assert sums[2].computed == 2 and not sums[0].path.exists()


def test_parse_specs():
    assert parse_specs("logmel") == [{"name": "logmel", "params": {}}]
    assert parse_specs("a,logmel:n_mels=64,hop_ms=20,b:x=true,y=null, c") == [
        {"name": "a", "params": {}}, {"name": "logmel", "params": {"n_mels": 64, "hop_ms": 20}},
        {"name": "b", "params": {"x": True, "y": None}}, {"name": "c", "params": {}}]
    with pytest.raises(ValueError, match="before any extractor"):
        parse_specs("k=v")


def test_features_cli_and_ensure_features(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / "junk.wav").write_bytes(b"junk")
    mpath = _corpus(tmp_path, "cli", 3, [Utterance("junk", audio=Media("wav/junk.wav"))])
    argv = ["features", "--dataset", "cli", "--manifest", str(mpath), "--no-progress", "--device", "cpu"]
    assert main(argv + ["--extractors", "logmel:n_mels=24"]) == 0
    out = capsys.readouterr().out
    key = base.create("logmel", n_mels=24).key
    assert f"{key}: computed 3, cached 0, failed 1" in out and "failed junk:" in out
    assert "4 utterances, 1 stage(s): computed 3, cached 0, failed 1" in out
    st = FeatureStore.open(store_path("cli", key))
    assert st.dim == 24 and len(st) == 3

    assert main(argv + ["--extractors", "logmel:n_mels=24", "--strict"]) == 1
    assert "(+1 failed earlier, not retried)" in capsys.readouterr().out
    assert main(argv + ["--extractors", "nosuch"]) == 2
    assert "unknown extractor 'nosuch'" in capsys.readouterr().err

    # a no-op rerun in a fresh process imports neither torch nor the feature libraries
    check = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
             "heavy = sorted({'torch', 'librosa', 'opensmile', 'transformers'} & set(sys.modules)); "
             "assert rc == 0 and not heavy, (rc, heavy)")
    r = subprocess.run([sys.executable, "-c", check, *argv, "--extractors", "logmel:n_mels=24"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "computed 0, cached 3" in r.stdout, r.stderr

    stores = ensure_features("cli", {"audio": "logmel:n_mels=24"}, manifest=mpath, device="cpu", progress=False)
    assert list(stores) == ["audio"] and stores["audio"].path == st.path and len(stores["audio"]) == 3
    with pytest.raises(ValueError, match="not text"):
        ensure_features("cli", {"text": "logmel"}, manifest=mpath, device="cpu", progress=False)


def test_second_checkout_sharing_the_cache_computes_nothing(tmp_path):
    """Another checkout of imer (a copy of its packages, a fresh process) pointed at the same
    IMER_CACHE finds every store key and fingerprint equal: it extracts nothing."""
    import shutil

    man = _manifest(tmp_path / "corpus", "twoco", 3)
    [s] = run_features(man, [base.create("logmel", n_mels=12)], progress=False)
    assert s.computed == 3
    other = tmp_path / "checkout2"
    for pkg in ("extract", "pipeline", "manifests"):
        shutil.copytree(REPO / pkg, other / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, extract; assert extract.__file__.startswith(sys.argv[2]), extract.__file__; "
            "from extract.base import create; from manifests.schema import read_manifest; "
            "from pipeline.runner import run_features; man = read_manifest(sys.argv[1]); "
            "[s] = run_features(man, [create('logmel', n_mels=12)], progress=False); print(s.computed, s.cached, s.key)")
    env = {**os.environ, "PYTHONPATH": str(other)}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus" / "manifest.jsonl"), str(other)],
                       cwd=other, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "3", s.key]

