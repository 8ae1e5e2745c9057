"""Tests of the Triton kernels. Without a GPU they run under ``TRITON_INTERPRET=1``, which must
be set before Triton is first imported; this package sets it when it is imported (the
interpreter's NumPy shim is :mod:`dplr.triton.interpreter`). A test module collected earlier
that imports Triton defeats this: the setting belongs in the session's first conftest."""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"  # where the tests put their tensors

if TRITON and INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")
