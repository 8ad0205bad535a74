"""Reliability under a hostile machine (issue 42, items 3-4): a full disk (ENOSPC) and the file size
limit (EFBIG, `ulimit -f`) mid-extraction, a read-only feature cache, an unreachable dask
scheduler, and media that exist but are not regular files in an own corpus. Each ends in one
line on stderr that names what happened and what to do, never a traceback; nothing is lost (the
store verifies and a rerun resumes), and what only reads a read-only cache works."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_faults_store import SPEC, _corpus, _Rms, extracted  # noqa: F401 - registers the test extractor

from pipeline.cli import main
from pipeline.store import FeatureStore, store_path

REPO = Path(__file__).resolve().parents[1]
N = 40  # utterances: enough batches (of 2) that a limit can fall mid-extraction

# Runs `imer` commands (or ["@python", source]) in a fresh process (the test extractor registered) and prints
# [[status, stdout, stderr, seconds], ...] as JSON. _FSIZE: the file size limit in bytes, SIGXFSZ ignored
# (as under `ulimit -f`, where the write then fails with EFBIG). _EROFS: a directory every write
# under which fails with EROFS, as on a read-only mount (for root, whom chmod does not stop).
DRIVER = r"""
import builtins, contextlib, errno, io, json, os, resource, signal, sys, time
sys.path.insert(0, os.environ["_TESTS"])
import test_faults_store  # noqa: F401
lim = int(os.environ.get("_FSIZE") or 0)
if lim:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
ro = os.environ.get("_EROFS")
if ro:
    ro = os.path.realpath(ro)
    def _inside(p):
        try:
            p = os.path.realpath(os.fsdecode(p))
        except TypeError:  # a file descriptor
            return False
        return p == ro or p.startswith(ro + os.sep)
    def _refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def _guard(fn, *, flags=None, mode=None, paths=1):
        def g(*a, **k):
            writing = True
            if flags is not None:
                writing = bool((a[1] if len(a) > 1 else k.get("flags", 0)) & WRITE)
            if mode is not None:
                m = a[1] if len(a) > 1 else k.get("mode", "r")
                writing = any(c in str(m) for c in "wax+")
            for p in a[:paths]:
                if writing and _inside(p):
                    _refuse(p)
            return fn(*a, **k)
        return g
    os.open = _guard(os.open, flags=True)
    builtins.open = io.open = _guard(io.open, mode=True)
    for name in ("mkdir", "rmdir", "unlink", "remove"):
        setattr(os, name, _guard(getattr(os, name)))
    for name in ("rename", "replace", "link", "symlink"):
        setattr(os, name, _guard(getattr(os, name), paths=2))
from pipeline.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e, t0 = io.StringIO(), io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            if argv[0] == "@python":  # library code rather than a command: ["@python", source]
                exec(argv[1], {})
                rc = 0
            else:
                rc = main(argv)
        except SystemExit as x:
            rc = x.code
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = "raised"
    out.append([rc, o.getvalue(), e.getvalue(), time.perf_counter() - t0])
sys.stdout.write(json.dumps(out))
"""


def _imer(cmds: list[list[str]], env: dict, preexec=None, timeout: float = 120) -> list[tuple]:
    """Run ``cmds`` in one fresh process: [(status, stdout, stderr, seconds)] per command."""
    full = {**os.environ, **env, "_TESTS": str(REPO / "tests"), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cmds)], capture_output=True, text=True, cwd=REPO,
                       env=full, preexec_fn=preexec, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return [tuple(r) for r in json.loads(p.stdout)]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _features(ds, man, *more):
    return ["features", "--dataset", ds, "--manifest", str(man), "--extractors", SPEC, "--no-progress",
            "--device", "cpu", *more]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """(dataset, manifest, its utterances' reference features) with IMER_CACHE a fresh folder."""
    monkeypatch.setenv("IMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IMER_RESULTS", str(tmp_path / "results"))
    from manifests.schema import read_manifest

    ds = f"more-{tmp_path.name}"[:40]
    man = _corpus(tmp_path / "corpus", ds, N)
    ref = {u.id: _Rms().extract_one(u) for u in read_manifest(man)}
    return ds, man, ref


# what `imer train` reads from the cache before it trains (train.run.train_method): the stores,
# through the stage runner (a no-op here), then all of a store at once (MultimodalData.from_stores)
TRAIN_READS = """
from pipeline.runner import ensure_features
stores = ensure_features({ds!r}, {{"audio": {spec!r}}}, device="cpu", manifest={man!r}, progress=False)
whole = stores["audio"].load()
assert len(whole) == {n} and len(whole.data) > 0, len(whole)
print(len(whole), "utterances read")
"""


def _nothing_lost(ds, man, ref, capsys) -> None:
    """The store verifies, holds only whole utterances, and a rerun computes just the rest."""
    path = store_path(ds, _Rms().key)
    assert main(["store", "verify", str(path)]) == 0
    kept = FeatureStore.open(path).ids()
    assert 0 < len(kept) < N, len(kept)  # the fault came mid-extraction
    capsys.readouterr()
    assert main(_features(ds, man)) == 0
    assert f"computed {N - len(kept)}, cached {len(kept)}, failed 0" in capsys.readouterr().out
    assert main(["store", "verify", str(path)]) == 0
    st = FeatureStore.open(path)
    for u, r in ref.items():
        np.testing.assert_array_equal(st[u], r.features)
        np.testing.assert_array_equal(st.mask(u), r.mask)


def test_disk_full_mid_extraction(corpus, monkeypatch, capsys):
    """ENOSPC from the 4th data chunk write on (a disk that fills up while imer writes)."""
    import zarr.storage

    ds, man, ref = corpus
    real, writes = zarr.storage.LocalStore.set, []

    async def filling(self, key, value):
        if key.startswith("data/c/"):
            writes.append(key)
            if len(writes) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", filling)
    assert main(_features(ds, man)) == 1
    line = _one_line(capsys.readouterr().err)
    path = store_path(ds, _Rms().key)
    assert f"no space left on the device writing {path}" in line
    assert "IMER_CACHE" in line and "rerun the same command" in line
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    _nothing_lost(ds, man, ref, capsys)


def test_file_too_large_mid_extraction(corpus, capsys):
    """A real `ulimit -f` (RLIMIT_FSIZE, SIGXFSZ ignored): the growing data chunk passes it."""
    ds, man, ref = corpus
    [(rc, out, err, _)] = _imer([_features(ds, man)], {"_FSIZE": "8000"})
    assert rc == 1, (rc, out, err)
    line = _one_line(err)
    assert f"file too large writing {store_path(ds, _Rms().key)}" in line and "ulimit -f" in line
    _nothing_lost(ds, man, ref, capsys)


@pytest.mark.usefixtures("one_torch_thread")
def test_disk_full_while_a_run_writes_its_outputs(tmp_path, monkeypatch, capsys):
    """ENOSPC on a fold's predictions.npz (through fsutil's atomic write) under `imer train`: one
    line naming the file meant, the run marked failed, and the same command then finishes it."""
    import builtins

    import pipeline.fsutil
    import train.run
    from train.config import load_config
    from train.run import run_experiment
    from train.synthetic import synthetic_data, synthetic_folds

    data = synthetic_data(n=24, dims={"a": 3, "v": 4, "t": 4}, seed=0)
    cfg = load_config("baseline", "demo", {"train.epochs": 1, "train.schedule": {"kind": "constant"},
                                           "train.batch_size": 16, "model.encoders.a.hidden": 8,
                                           "model.encoders.v.hidden": 8, "model.encoders.t.channels": 8})
    monkeypatch.setattr(train.run, "train_method", lambda dataset, method, **kw: run_experiment(
        data, synthetic_folds(data, 2)[:1], cfg, dataset="synth", seeds=[0], results_dir=tmp_path, progress=False,
        log=lambda *_: None))

    def full(path, *a, **k):
        if "predictions.npz" in str(path) and "w" in str(a[0] if a else k.get("mode", "r")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return builtins.open(path, *a, **k)

    monkeypatch.setattr(pipeline.fsutil, "open", full, raising=False)
    assert main(["train", "--dataset", "demo", "--method", "baseline"]) == 1
    line = _one_line(capsys.readouterr().err)
    [run] = tmp_path.glob("synth/baseline/*")
    assert f"no space left on the device writing {run}/folds/f1/seed0/predictions.npz:" in line
    assert "IMER_RESULTS" in line and "rerun the same command" in line
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    monkeypatch.delattr(pipeline.fsutil, "open")
    assert main(["train", "--dataset", "demo", "--method", "baseline"]) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert (run / "folds" / "f1" / "seed0" / "predictions.npz").is_file()


def test_a_full_disk_under_run_outputs_names_the_file():
    """Run outputs go through fsutil's temp files: the line names the file meant, not the temp."""
    from pipeline.cli import write_error

    e = OSError(errno.ENOSPC, "No space left on device", "/r/demo/mmin/x/.result.json.123-456.tmp")
    line, code = write_error(e)
    assert code == 1 and "writing /r/demo/mmin/x/result.json:" in line and "IMER_RESULTS" in line
    assert write_error(OSError(errno.ENOENT, "No such file", "/x")) is None  # not a write fault: untouched


# ---- a read-only cache ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_on_test_features(tmp_path_factory):
    """A tiny trained run whose audio features are the test extractor's (3-d), for imer predict."""
    import torch

    from train.config import load_config
    from train.run import run_experiment
    from train.synthetic import synthetic_data, synthetic_folds

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("results")
    d = synthetic_data(n=24, dims={"a": 3, "v": 4, "t": 4}, seed=0)
    cfg = load_config("baseline", "demo", {"features.audio": {"name": SPEC}, "train.epochs": 1,
                                           "train.schedule": {"kind": "constant"}, "train.batch_size": 16,
                                           "model.encoders.a.hidden": 8, "model.encoders.v.hidden": 8,
                                           "model.encoders.t.channels": 8})
    run = run_experiment(d, synthetic_folds(d, 2)[:1], cfg, dataset="synth", seeds=[0], results_dir=root,
                         progress=False, log=lambda *_: None)
    torch.set_num_threads(old)
    return run


def _drop_dac():
    """In the child, as root: drop the capabilities that let root write where chmod forbids it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, from the bounding set (PR_CAPBSET_DROP)
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _chmod_tree(root: Path, writable: bool) -> None:
    for d, dirs, files in os.walk(root):
        for n in [*files, *dirs, ""]:
            p = Path(d) / n
            m = p.stat().st_mode
            p.chmod(m | stat.S_IWUSR if writable else m & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _chmod_stops(code: str, preexec) -> bool:
    """Whether ``code`` fails in a child started as the test's children are (chmod in effect)."""
    return subprocess.run([sys.executable, "-c", code], preexec_fn=preexec, capture_output=True).returncode != 0


@pytest.mark.parametrize("how", ["erofs", "chmod"])
def test_read_only_cache(corpus, run_on_test_features, tmp_path, how, capsys):
    """Everything that only reads a read-only cache works (store ls / verify, a no-op `imer features`,
    the stores training reads, predict with its throw-away store elsewhere); what must write says in
    one line that the cache is read-only and how to point IMER_CACHE elsewhere."""
    ds, man, ref = corpus
    cache = Path(os.environ["IMER_CACHE"])
    assert main(_features(ds, man)) == 0
    capsys.readouterr()
    more = _corpus(tmp_path / "corpus2", ds, N + 2)  # two new utterances: a write into the existing store
    wav = tmp_path / "corpus" / "u1.wav"
    env, preexec = {}, None
    if how == "erofs":
        env["_EROFS"] = str(cache)
    else:
        preexec = _drop_dac if os.geteuid() == 0 else None
        _chmod_tree(cache, writable=False)
    try:
        if how == "chmod" and not _chmod_stops(f"open({str(cache / 'probe')!r}, 'w')", preexec):
            pytest.skip("chmod does not stop this process's writes (root without a way to drop them); "
                        "the erofs case covers this")
        reads = [["store", "ls"], ["store", "ls", "--dataset", ds], ["store", "verify"], _features(ds, man),
                 ["predict", "--run", str(run_on_test_features), "--audio", str(wav), "--json"],
                 ["@python", TRAIN_READS.format(man=str(man), ds=ds, spec=SPEC, n=N)]]
        writes = [_features(ds, more), _features(ds + "-new", man), ["store", "gc", "--dataset", ds]]
        res = _imer(reads + writes, env, preexec)
        for argv, (rc, out, err, _) in zip(reads, res):
            assert rc == 0 and "Traceback" not in err, (argv, rc, err)
        assert any(ln.split()[:2] == [ds, _Rms().key] for ln in res[0][1].splitlines()), res[0][1]
        assert res[2][1].strip() == f"{store_path(ds, _Rms().key)}: ok"
        assert f"computed 0, cached {N}" in res[3][1]
        assert f"{N} utterances read" in res[5][1]
        pred = json.loads(res[4][1])
        assert pred["condition"] == "a" and sum(pred["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        for argv, (rc, out, err, _) in zip(writes, res[len(reads):]):
            line = _one_line(err)
            assert rc == 2, (argv, rc, err)
            assert f"the feature cache {cache.resolve()} is read-only" in line, (argv, line)
            assert "point IMER_CACHE at a writable directory" in line, (argv, line)
    finally:
        if how == "chmod":
            _chmod_tree(cache, writable=True)
    assert not (cache / "probe").exists()
    assert sorted(p.name for p in (cache / "stores").iterdir()) == [ds]  # predict wrote nothing here


@pytest.mark.parametrize("what", ["stores-folder", "zarr-json"])
def test_unreadable_cache_is_an_error(corpus, what):
    """A cache folder that cannot be listed is not an empty cache (store ls / verify / gc exit 2),
    and a store whose zarr.json cannot be read is not damage (no advice to remove it)."""
    ds, man, _ = corpus
    assert main(_features(ds, man)) == 0
    cache = Path(os.environ["IMER_CACHE"])
    path = store_path(ds, _Rms().key)
    target = cache / "stores" if what == "stores-folder" else path / "zarr.json"
    preexec = _drop_dac if os.geteuid() == 0 else None
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        if not _chmod_stops(f"import os; os.listdir({str(target)!r}) if os.path.isdir({str(target)!r}) "
                            f"else open({str(target)!r}).read()", preexec):
            pytest.skip("chmod does not stop this process (root without a way to drop that)")
        res = _imer([["store", "ls"], ["store", "verify"], ["store", "gc"]], {}, preexec)
    finally:
        target.chmod(mode)
    for argv, (rc, out, err, _) in zip(["ls", "verify", "gc"], res):
        if what == "zarr-json" and argv == "ls":  # ls lists what it can: the store's row says why not
            assert rc == 0 and "the store cannot be read" in out and "rm -r" not in out, (out, err)
            continue
        line = _one_line(err)
        assert rc == 2 if what == "stores-folder" else rc in (1, 2), (argv, rc, err)
        if what == "stores-folder":
            assert f"{cache / 'stores'}: the feature cache cannot be listed" in line and "IMER_CACHE" in line
        else:
            assert f"{path}: the store cannot be read" in line and "permissions" in line and "rm -r" not in line


# ---- an unreachable scheduler -------------------------------------------------------------------

def test_unreachable_scheduler_is_one_line_within_10_s(corpus):
    ds, man, _ = corpus
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    [(rc, out, err, took)] = _imer([_features(ds, man, "--scheduler", f"tcp://127.0.0.1:{port}")], {})
    assert rc == 2, (rc, err)
    line = _one_line(err)
    assert f"cannot reach the dask scheduler at tcp://127.0.0.1:{port}" in line and "--scheduler" in line
    assert took < 10, took  # the command, from its start to its one line (dask alone would wait 30 s)


# ---- media that are not regular files, in an own corpus ------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "dir", "dev-zero-link", "absent"])
def test_own_corpus_media_that_is_not_a_regular_file(tmp_path, monkeypatch, kind, capsys):
    monkeypatch.setenv("IMER_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "clip.wav"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    elif kind == "dev-zero-link":
        p.symlink_to("/dev/zero")
    good = tmp_path / "ok.wav"
    sf.write(good, np.zeros(1600, np.float32), 16000)
    csv = tmp_path / "corpus.csv"
    csv.write_text("id,audio,label\na,ok.wav,x\nb,clip.wav,y\n")
    assert main(["manifest", "--dataset", "own", "--manifest", str(csv)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{csv}:3: audio file 'clip.wav'" in line
    assert ("not found" in line) == (kind == "absent")
    assert ("is not a regular file" in line) == (kind != "absent")


# ---- flipped bytes that zarr's crc32c check catches: named in words, repaired or refused --------------

def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 4] = bytes(x ^ 0x5A for x in b[mid:mid + 4])
    p.write_bytes(bytes(b))


def test_flipped_mask_chunk_is_named_and_repaired(extracted, capsys):  # noqa: F811
    ds, man, path, ref = extracted
    _flip(path / "mask" / "c" / "0")
    assert main(["store", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "mask chunk 0 fails its crc32c checksum" in out and "checksum do not match" not in out
    assert f"imer store repair {path}" in out
    assert main(["store", "repair", str(path), "--manifest", str(man), "--device", "cpu"]) == 0
    assert f"repaired {len(ref)} damaged" in capsys.readouterr().out
    assert main(["store", "verify", str(path)]) == 0


@pytest.mark.parametrize("column", ["ids", "offsets", "status"])
def test_flipped_index_chunk_says_what_to_run(extracted, column, capsys):  # noqa: F811
    """An index chunk cannot be repaired (it says which utterance is where): every command says so
    in one line, in words, with the command that brings the store back."""
    ds, man, path, ref = extracted
    _flip(path / "index" / column / "c" / "0")
    for argv, code in ((["store", "verify", str(path)], 1),
                       (["store", "repair", str(path), "--manifest", str(man), "--device", "cpu"], 1),
                       (_features(ds, man), 2)):
        assert main(argv) == code, argv
        line = _one_line(capsys.readouterr().err)
        assert f"a chunk of index/{column} fails its crc32c checksum" in line and "do not match" not in line
        assert f"rm -r {path}" in line and f"imer features --dataset {ds}" in line


def test_damaged_zarr_json_says_what_to_run(extracted, capsys):  # noqa: F811
    ds, man, path, ref = extracted
    _flip(path / "zarr.json")
    for argv, code in ((["store", "verify", str(path)], 1), (["store", "repair", str(path)], 1),
                       (_features(ds, man), 2)):
        assert main(argv) == code, argv
        line = _one_line(capsys.readouterr().err)
        assert "its zarr.json cannot be read" in line and f"rm -r {path}" in line and "imer features" in line
