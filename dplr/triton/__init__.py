"""Triton kernels (NVIDIA GPUs; on CPU tensors under ``TRITON_INTERPRET=1``).

Every kernel is parameterised by the structure through ``tl.constexpr`` (see
:mod:`dplr.triton.structure`), so one kernel serves every family. Entry points take the
canonical :class:`dplr.engine.Problem` of a call, like the PyTorch path:

* ``forward(problem, chunk_size)`` → ``(o, final_state)`` in the compute dtype;
* ``backward(problem, d_out, d_final, chunk_size)`` → gradients of the nine tensor inputs
  ``(q, k, v, g, beta, a, b, initial_state, gv)`` (``None`` for an absent input).

``chunk_size == 0`` selects the recurrent (token-by-token) kernels.
"""

from __future__ import annotations

import importlib

import torch

from ..engine import Problem
from . import interpreter

interpreter.patch()

RECURRENT_CHUNK = 0


def _module(chunk_size: int):
    name = "recurrent" if chunk_size == RECURRENT_CHUNK else "chunk"
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise RuntimeError(f"this build of dplr has no Triton {name} kernels; use DPLR_BACKEND=torch") from err


def forward(problem: Problem, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _module(chunk_size).forward(problem, chunk_size)


def has_backward(chunk_size: int, *, checked_on_gpu: bool = True, value_decay: bool = False) -> bool:
    """Whether these kernels have a backward; by default only one that has also passed the
    check against the reference on a GPU (the module's ``BACKWARD_CHECKED_ON_GPU``, and with
    ``value_decay`` :func:`value_decay_checked` too), which is what ``DPLR_BACKEND=auto``
    requires before it trains on them. ``DPLR_BACKEND=triton`` runs any backward there is."""
    try:
        module = _module(chunk_size)
    except RuntimeError:
        return False
    checked = getattr(module, "BACKWARD_CHECKED_ON_GPU", False)
    if value_decay:
        checked = checked and value_decay_checked(chunk_size)
    return hasattr(module, "backward") and (checked or not checked_on_gpu)


def value_decay_checked(chunk_size: int) -> bool:
    """Whether these kernels' value-side decay (``gv``) has passed its check on a GPU (the
    module's ``VALUE_DECAY_CHECKED_ON_GPU``). Until it has, ``DPLR_BACKEND=auto`` runs no ``gv``
    call on them, forward included: a forward that was never run on a GPU is not trusted either."""
    try:
        module = _module(chunk_size)
    except RuntimeError:
        return False
    return getattr(module, "VALUE_DECAY_CHECKED_ON_GPU", False)


def backward(problem: Problem, d_out: torch.Tensor, d_final: torch.Tensor, chunk_size: int) -> tuple:
    module = _module(chunk_size)
    if not hasattr(module, "backward"):
        raise RuntimeError("this build of dplr has no Triton backward for these kernels; use DPLR_BACKEND=torch")
    return module.backward(problem, d_out, d_final, chunk_size)
