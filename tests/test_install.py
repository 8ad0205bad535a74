"""`pip install .` (a built wheel, not editable) gives a working `imer` run from outside the checkout
(issue 39, item 5): version, method configs, feature sets and fold lists come from the installed
package, and a real `imer train` runs. The wheel goes into a --target folder (its dependencies are
the project venv's own, hence --no-deps); the checkout is copied first so the build writes nothing
into it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder the wheel was installed into, its `imer` console script)."""
    tmp = tmp_path_factory.mktemp("install")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    src = tmp / "src"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(site), str(src)],
                   check=True, capture_output=True, timeout=300, cwd=tmp)
    return site, site / "bin" / "imer"


def _env(site: Path, cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(site), "IMER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _run(cmd, site, cwd, cache, timeout=120):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(site, cache), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


PROBE = r"""
import json, os, sys
import yaml
import manifests, pipeline, extract, train
from manifests import _cmu_std_folds as folds
from train import config
print(json.dumps({
    "files": {m.__name__: m.__file__ for m in (pipeline, extract, train, manifests)},
    "configs": {n: sorted(config.load_config(n)) for n in config.list_configs()},
    "feature_sets": {n: config.feature_set(n)
                     for n in yaml.safe_load(open(os.path.join(os.path.dirname(config.__file__), "feature_sets.yaml")))},
    "folds": {k: len(v) for k, v in folds.MOSI.items()},
}))
"""


def test_installed_package_is_complete_outside_the_checkout(installed, tmp_path):
    site, imer = installed
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _run([imer, "--version"], site, tmp_path, tmp_path / "cache").strip() == f"imer {version}"
    assert "--method" in _run([imer, "train", "--help"], site, tmp_path, tmp_path / "cache")
    got = json.loads(_run([sys.executable, "-c", PROBE], site, tmp_path, tmp_path / "cache"))
    for name, f in got["files"].items():  # the wheel's copy, not the checkout's
        assert Path(f).is_relative_to(site), (name, f)
    shipped = sorted(p.stem for p in (ROOT / "train" / "configs").glob("*.yaml") if not p.stem.startswith("_"))
    assert sorted(got["configs"]) == shipped and all(got["configs"].values())
    assert got["folds"] and all(n > 0 for n in got["folds"].values())
    assert got["feature_sets"] and all(got["feature_sets"].values())
    assert (site / "train" / "compare.yaml").is_file()


def test_installed_imer_trains_the_demo(installed, tmp_path, tiny_demo):
    """A real run of the installed `imer train` from a folder outside the checkout, on the
    session's tiny demo corpus (features extracted and a model trained: ~40 s on 2 CPU cores)."""
    site, imer = installed
    out = _run([imer, "train", "--dataset", "demo", "--data-root", Path(tiny_demo).parent, "--method", "baseline",
                "--folds", "1", "--seeds", "0", "--no-progress"], site, tmp_path, tmp_path / "cache", timeout=400)
    assert "| baseline | UA |" in out
    assert list((tmp_path / "results" / "demo" / "baseline").glob("*/table.md"))


@pytest.mark.slow
def test_installed_imer_trains_the_full_demo(installed, tmp_path):
    """The exact command of issue 39 on the default demo corpus (generated, all default features
    extracted, one fold trained: ~4 min on 2 CPU cores). Run with `pytest -m slow`."""
    site, imer = installed
    out = _run([imer, "train", "--dataset", "demo", "--method", "baseline", "--folds", "1", "--no-progress"],
               site, tmp_path, tmp_path / "cache", timeout=1200)
    assert "| baseline | UA |" in out
