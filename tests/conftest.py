"""Shared fixtures. Every test session gets its own IMER_CACHE so the user's cache is untouched,
and runs offline (no hub downloads)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download, whatever the caller set
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("imer-cache")
    old = os.environ.get("IMER_CACHE")
    os.environ["IMER_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("IMER_CACHE", None)
    else:
        os.environ["IMER_CACHE"] = old


@pytest.fixture(scope="session")
def dask_scheduler():
    """The address of one 2-worker LocalCluster for the whole session (starting one, and warming
    its workers, costs seconds)."""
    from dask.distributed import LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield c.scheduler_address
    c.close()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny generated demo corpus (real WAV/MP4/text), shared by the whole test session.
    Returns the path of its manifest.jsonl."""
    from manifests import demo

    out = tmp_path_factory.mktemp("demo-tiny")
    return demo.generate(out, seed=0, size="tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny nets: torch threads only add overhead on a shared 2-core machine (restored after)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
