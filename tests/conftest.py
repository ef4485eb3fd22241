"""Shared test settings and fixtures.

torch runs single-threaded: tiny nets are dominated by thread synchronisation, and CI has
2 cores."""

import pytest
import torch
from tinydata import write_tiny_idx

torch.set_num_threads(1)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No user data paths or mirrors leak in; the download cache is a temporary folder."""
    monkeypatch.delenv("FASTPC_DATA", raising=False)
    monkeypatch.delenv("FASTPC_MIRROR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny generated Fashion-MNIST-shaped IDX dataset (see tinydata.py)."""
    return write_tiny_idx(tmp_path_factory.mktemp("tiny") / "data")
