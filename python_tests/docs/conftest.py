"""Fixtures of python_tests/docs: a temporary folder laid out like a checkout's surroundings.

``<tmp>/work`` is the current folder of a page's blocks (so the commands' relative outputs,
``runs/...``, ``zofo-bench-results/``, land there, never in the checkout), and
``<tmp>/shared/data/sst2`` a tiny SST-2-like data set, so that the docs' paths
``../shared/data/sst2/train.tsv`` resolve as they do next to the repository.
"""

import pytest

from docblocks import write_sst2_like


@pytest.fixture
def doc_workdir(tmp_path, monkeypatch, one_thread):
    write_sst2_like(tmp_path / "shared" / "data" / "sst2")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ZOFO_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return work


@pytest.fixture
def one_thread():
    """One torch thread, as in the other CPU-heavy tests: on a small machine shared with other
    processes a second (spinning) thread slows the tiny models' steps many times over."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
