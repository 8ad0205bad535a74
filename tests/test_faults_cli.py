"""Reliability of the command line and of store maintenance (issue 42): `imer store repair` repairs
what `imer store verify` reports or says in one line why it cannot; a damaged index is named as
such everywhere; media that exist but are not regular files are named so; an unknown dataset or
an IMER_CACHE / IMER_RESULTS naming a file is an error (exit 2); a closed stdout pipe ends any
command quietly. None of these may print a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_faults_store import SPEC, extracted  # noqa: F401 - the fixture: a 6-utterance store in 16-frame chunks

from manifests.schema import Media
from pipeline.cli import main
from pipeline.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]


def _features(ds, man):
    return ["features", "--dataset", ds, "--manifest", str(man), "--extractors", SPEC, "--no-progress",
            "--device", "cpu"]


def _last_data_chunk(path: Path) -> Path:
    st = FeatureStore.open(path)
    return path / "data" / "c" / str((st.n_frames - 1) // int(st._arrays["data"].chunks[0])) / "0"


@pytest.mark.parametrize("how", ["flip-bytes", "garbage-header"])
def test_repair_of_the_last_chunk(extracted, how, capsys):  # noqa: F811
    """The chunk the next append writes into is damaged: repair must not have to read it back."""
    ds, man, path, ref = extracted
    p = _last_data_chunk(path)
    b = bytearray(p.read_bytes())
    if how == "flip-bytes":
        mid = len(b) // 2
        b[mid:mid + 8] = bytes(x ^ 0x5A for x in b[mid:mid + 8])
    else:
        b[:16] = b"\xff" * 16
    p.write_bytes(bytes(b))
    assert main(["store", "verify", str(path)]) == 1
    assert f"imer store repair {path}" in capsys.readouterr().out
    assert main(["store", "repair", str(path), "--manifest", str(man), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "repaired 1 damaged" in out and "computed 1, cached 5" in out
    assert main(["store", "verify", str(path)]) == 0
    st = FeatureStore.open(path)
    for u, (x, m, _, _) in ref.items():
        np.testing.assert_array_equal(st[u], x)
        np.testing.assert_array_equal(st.mask(u), m)


@pytest.mark.parametrize("column", ["ids", "fingerprints", "notes"])
def test_deleted_index_chunk_is_named_by_every_command(extracted, column, capsys):  # noqa: F811
    ds, man, path, ref = extracted
    (path / "index" / column / "c" / "0").unlink()
    for argv, code in ((["store", "verify", str(path)], 1),
                       (["store", "repair", str(path), "--manifest", str(man), "--device", "cpu"], 1),
                       (["store", "gc", str(path)], 1), (_features(ds, man), 2)):
        assert main(argv) == code, argv
        cap = capsys.readouterr()
        err = cap.err.strip().splitlines()
        assert len(err) == 1 and f"index/{column} chunk 0 missing" in err[0], (argv, cap)
        assert "cannot rebuild an index" in err[0] and f"rm -r {path}" in err[0]
        assert "computed" not in cap.out  # features did not recompute everything under empty ids
    assert (path / "index" / "ids").is_dir()  # gc did not rewrite it


def test_repair_fixes_a_lowered_commit_point(extracted, capsys):  # noqa: F811
    import zarr

    ds, man, path, ref = extracted
    g = zarr.open_group(str(path), mode="r+")
    com = dict(g.attrs["committed"])
    g.attrs["committed"] = {"entries": com["entries"] - 2, "frames": com["frames"]}
    assert main(["store", "verify", str(path)]) == 1
    assert main(["store", "repair", str(path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    assert main(["store", "verify", str(path)]) == 0


def test_repair_says_why_it_cannot(extracted, capsys):  # noqa: F811
    import zarr

    ds, man, path, ref = extracted
    zarr.open_group(str(path), mode="r+")["index/notes"][0] = "not json"  # valid chunk, bad content
    assert main(["store", "verify", str(path)]) == 1
    assert "bad note" in capsys.readouterr().out
    assert main(["store", "repair", str(path)]) == 1
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert "nothing to repair" not in cap.out
    assert len(err) == 1 and "cannot repair" in err[0] and "bad note" in err[0] and f"rm -r {path}" in err[0]


@pytest.mark.parametrize("kind", ["fifo", "dir", "dev-zero-link"])
def test_media_that_is_not_a_regular_file(tmp_path, kind):
    from extract.audio_io import load_audio
    from extract.video_io import read_frames

    p = tmp_path / "media"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    else:
        p.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        load_audio(Media(str(p)))
    with pytest.raises(ValueError, match="not a regular file"):
        read_frames(str(p))
    with pytest.raises(ValueError, match="audio file not found"):
        load_audio(Media(str(tmp_path / "absent.wav")))
    # and the store's change detection neither blocks on a FIFO nor reads /dev/zero for ever
    from extract.base import file_digest

    assert file_digest(p) == f"notfile:{p}"


def test_store_ls_unknown_dataset_is_an_error(capsys):
    assert main(["store", "ls", "--dataset", "nosuch"]) == 2
    assert "no feature stores for dataset 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("var", ["IMER_CACHE", "IMER_RESULTS"])
@pytest.mark.parametrize("below", [False, True])
def test_env_var_naming_a_file(tmp_path, monkeypatch, capsys, var, below):
    f = tmp_path / "a-file"
    f.write_text("x")
    monkeypatch.setenv(var, str(f / "sub" if below else f))
    for argv in (["store", "ls"], ["store", "verify"], ["report", "--dataset", "demo"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{var}=" in err[0] and "not a directory" in err[0], argv


def test_cache_root_naming_a_file_is_an_error(tmp_path, monkeypatch, capsys):
    """The library path (no `imer` front end): store ls's own check."""
    from pipeline.cache import CacheError, cache_root
    from pipeline.commands import store

    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("IMER_CACHE", str(tmp_path / "f"))
    with pytest.raises(CacheError, match="not a directory"):
        cache_root()

    class Args:
        store_cmd, dataset, path = "ls", None, None

    assert store.main(Args()) == 2
    assert "IMER_CACHE=" in capsys.readouterr().err


@pytest.mark.parametrize("argv,code", [(["store", "ls"], 141), (["store", "verify"], 141),
                                       (["--help"], 0)])  # argparse itself ignores a failed write
def test_closed_pipe_is_quiet(tmp_path, argv, code):
    """`imer store ls | head -1`: stdout's reader is gone before imer writes (deterministic)."""
    cache = tmp_path / "cache"
    for i in range(3):
        FeatureStore.open_or_create(cache / "stores" / "pipes" / f"st{i}", dim=2, attrs={"key": f"st{i}"})
    r, w = os.pipe()
    os.close(r)
    env = {**os.environ, "IMER_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], stdout=w, stderr=subprocess.PIPE,
                              cwd=REPO, env=env, timeout=60)
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert proc.returncode == code and err == "", (proc.returncode, err)


def test_chunks_of_fill_values_are_written(tmp_path):
    """A whole mask chunk of invalid frames (no face in a long video) and a status chunk of all-OK
    rows equal the fill value: they must still be written, or verify would call them missing."""
    from extract.base import Output

    st = FeatureStore.open_or_create(tmp_path / "s", dim=2, attrs={"key": "s"}, chunk_frames=16)
    rng = np.random.default_rng(0)
    st.commit({"long": (Output(rng.standard_normal((300, 2)).astype(np.float32), np.zeros(300, bool)), "fp")})
    assert (tmp_path / "s" / "mask" / "c" / "0").is_file()
    assert (tmp_path / "s" / "index" / "status" / "c" / "0").is_file()
    assert FeatureStore.open(tmp_path / "s").verify() == []
