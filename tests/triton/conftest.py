"""Every test here runs the Triton kernels, through the public ops."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _triton_backend(_torch_backend, monkeypatch):
    """After the root conftest's pin to the PyTorch path (hence the dependency), so this wins."""
    monkeypatch.setenv("DPLR_BACKEND", "triton")
