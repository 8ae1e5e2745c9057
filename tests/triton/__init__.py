"""Tests of the Triton kernels. Without a GPU they run under ``TRITON_INTERPRET=1``, which must
be set before Triton is first imported: this package's import does it (pytest imports it
before any test module in it)."""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = not torch.cuda.is_available()

if TRITON and INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from triton.runtime import interpreter as _interpreter

    _patch_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        """Workaround: Triton 3.6's interpreter turns a scalar (a one-element array) into a
        Python int with ``int(array)``, which NumPy >= 2.4 rejects, so a loop with run-time
        bounds fails. Take the element instead. Remove when the pinned Triton uses ``.item()``."""
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patch_lang_tensor
