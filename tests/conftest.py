from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. It must be chosen before Triton is
# first imported, and some test modules import it while being collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Tests of the PyTorch path pin it, whatever the caller's environment says."""
    monkeypatch.setenv("DPLR_BACKEND", "torch")
