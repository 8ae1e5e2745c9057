from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Tests of the PyTorch path pin it, whatever the caller's environment says."""
    monkeypatch.setenv("DPLR_BACKEND", "torch")
