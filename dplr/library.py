"""``torch.library`` registration: one custom op per call, so ``torch.compile(fullgraph=True)``
sees ``dplr::recurrence`` as a single node (with a fake kernel for shapes) instead of tracing
the chunk loop, its host syncs and its data-dependent branches, and so that the Triton kernels
(which autograd cannot see through) get their backward.

Backends: ``torch`` (the PyTorch path) and ``triton`` (:mod:`dplr.triton`). Eager calls on the
PyTorch path skip the wrapper and run the engine under autograd directly. Otherwise the op's
backward (``dplr::recurrence_backward``) recomputes what it needs from the inputs: the Triton
backward kernels, or the PyTorch forward differentiated by autograd.
"""

from __future__ import annotations

import dataclasses

import torch

from . import settings
from .engine import Problem, chunk_fwd
from .torch_chunk import records_graph
from .torch_recurrent import recurrent_fwd
from .transition import Decay, LowRank, Transition

RECURRENT_CHUNK = 0  # the chunk_size that selects the token-by-token path

_INPUTS = ("q", "k", "v", "g", "beta", "a", "b", "initial_state", "gv")  # the op's tensor arguments, in order


def run(problem: Problem, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path: ``chunk_size == RECURRENT_CHUNK`` runs the token loop. The path picks
    its own precision (``Problem.compute_dtype``), so a caller's autocast is switched off inside:
    under it the products would run in bf16 (and the triangular solve has no bf16 kernel)."""
    with torch.autocast(problem.q.device.type, enabled=False):
        if chunk_size == RECURRENT_CHUNK:
            return recurrent_fwd(problem)
        return chunk_fwd(problem, chunk_size=chunk_size)


def _forward(backend: str, problem: Problem, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o in v's dtype, final state in fp32 / fp64)``."""
    if backend == "triton":
        from . import triton as triton_path

        o, final = triton_path.forward(problem, chunk_size)
    else:
        o, final = run(problem, chunk_size)
    return o.to(problem.v.dtype), final


def _problem(q, k, v, g, beta, a, b, initial_state, gv, cu_seqlens, scale, decay, lowrank) -> Problem:
    return Problem(
        transition=Transition(Decay(decay), LowRank(lowrank), value_decay=gv is not None), q=q, k=k, v=v, g=g,
        beta=beta, a=a, b=b, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, gv=gv,
    )  # fmt: skip


@torch.library.custom_op("dplr::recurrence", mutates_args=())
def recurrence_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    gv: torch.Tensor | None,
    cu_seqlens: list[int] | None,
    scale: float,
    decay: str,
    lowrank: str,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _problem(q, k, v, g, beta, a, b, initial_state, gv, cu_seqlens, scale, decay, lowrank)
    return _forward(backend, problem, chunk_size)


@recurrence_op.register_fake
def _(q, k, v, g, beta, a, b, initial_state, gv, cu_seqlens, scale, decay, lowrank, chunk_size, backend):
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return v.new_empty(B, T, HV, V), q.new_empty(N, HV, K, V, dtype=state_dtype)


def _autograd_inside_op():
    """A custom op's kernel runs with the autograd dispatch keys excluded; include them again so
    the backward can differentiate its recomputed forward. Workaround (private API,
    ``torch._C._ForceDispatchKeyGuard``) until the PyTorch path has an explicit backward."""
    keys = torch._C.DispatchKey
    current = torch._C._dispatch_tls_local_exclude_set()
    exclude = torch._C.DispatchKeySet(keys.AutocastCPU)  # keep autocast off, as it is here
    for name in dir(keys):
        if name.startswith("Autocast") and current.has(getattr(keys, name)):
            exclude = exclude.add(getattr(keys, name))
    return torch._C._ForceDispatchKeyGuard(torch._C.DispatchKeySet(keys.BackendSelect), exclude)


@torch.library.custom_op("dplr::recurrence_backward", mutates_args=())
def recurrence_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    gv: torch.Tensor | None,
    d_out: torch.Tensor,
    d_final: torch.Tensor,
    cu_seqlens: list[int] | None,
    scale: float,
    decay: str,
    lowrank: str,
    chunk_size: int,
    backend: str,
) -> list[torch.Tensor]:
    """Gradients for the nine tensor inputs (an empty tensor for an absent one)."""
    inputs = (q, k, v, g, beta, a, b, initial_state, gv)
    if backend == "triton":
        from . import triton as triton_path

        problem = _problem(*inputs, cu_seqlens, scale, decay, lowrank)
        grads = triton_path.backward(problem, d_out, d_final, chunk_size)
    else:
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        with _autograd_inside_op(), torch.enable_grad():
            out, final = run(_problem(*leaves, cu_seqlens, scale, decay, lowrank), chunk_size)
        present = [t for t in leaves if t is not None]
        cotangents = (d_out.to(out.dtype), d_final.to(final.dtype))
        found = iter(torch.autograd.grad((out, final), present, cotangents, allow_unused=True))
        grads = [None if t is None else next(found) for t in leaves]
    return [
        q.new_empty(0) if t is None else torch.zeros_like(t) if grad is None else grad
        for t, grad in zip(inputs, grads, strict=True)
    ]


@recurrence_backward_op.register_fake
def _(q, k, v, g, beta, a, b, initial_state, gv, d_out, d_final, cu_seqlens, scale, decay, lowrank, chunk_size,
      backend):  # fmt: skip
    return [q.new_empty(0) if t is None else torch.empty_like(t) for t in (q, k, v, g, beta, a, b, initial_state, gv)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[: len(_INPUTS)])
    ctx.options = inputs[len(_INPUTS) :]


def _backward(ctx, d_out, d_final):
    tensors = ctx.saved_tensors
    grads = recurrence_backward_op(*tensors, d_out, d_final, *ctx.options)
    result = [None if t is None else grad for t, grad in zip(tensors, grads, strict=True)]
    return (*result, *(None for _ in ctx.options))


recurrence_op.register_autograd(_backward, setup_context=_setup_context)


class _KeepingChunk(torch.autograd.Function):
    """The Triton chunk op with ``DPLR_KEEP_INTERMEDIATES=1``: its backward reads what the forward
    kept (:func:`dplr.triton.chunk.forward_keeping`) instead of recomputing it. Eager only: the
    kept tensors' shapes depend on ``cu_seqlens``, which a fake kernel cannot give."""

    @staticmethod
    def forward(ctx, problem: Problem, chunk_size: int, *tensors):
        from .triton import chunk as triton_chunk

        o, final, kept = triton_chunk.forward_keeping(problem, chunk_size)
        ctx.save_for_backward(*tensors)
        ctx.problem, ctx.chunk_size, ctx.kept = problem, chunk_size, kept
        return o.to(problem.v.dtype), final

    @staticmethod
    def backward(ctx, d_out, d_final):
        from .triton import chunk as triton_chunk

        problem = dataclasses.replace(ctx.problem, **dict(zip(_INPUTS, ctx.saved_tensors, strict=True)))
        ctx.problem = None
        # Handed over with no reference left here or on ctx, so that the backward frees each kept
        # tensor as soon as it is spent, as it frees its own recomputed ones.
        grads = triton_chunk.backward(problem, d_out, d_final, ctx.chunk_size, kept=_hand_over(ctx))
        return (None, None, *grads)


def _hand_over(ctx) -> object:
    """``ctx.kept``, cleared on ``ctx``."""
    kept, ctx.kept = ctx.kept, None
    return kept


def _inputs(problem: Problem) -> list[torch.Tensor | None]:
    """The op's tensor arguments, in the order of :data:`_INPUTS`."""
    return [getattr(problem, name) for name in _INPUTS]


def needs_grad(problem: Problem) -> bool:
    """Whether autograd will ask this call for a gradient."""
    return records_graph(*_inputs(problem))


def _keeps(problem: Problem, chunk_size: int, backend: str) -> bool:
    """Whether this call runs :class:`_KeepingChunk`: the Triton chunk kernels, eager, asked
    for by ``DPLR_KEEP_INTERMEDIATES`` and with a gradient to come."""
    if backend != "triton" or chunk_size == RECURRENT_CHUNK or torch.compiler.is_compiling():
        return False
    return needs_grad(problem) and settings.keep_intermediates()


def dispatch(problem: Problem, chunk_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path in eager mode runs under autograd; everything else goes through the op
    (or, keeping intermediates, :class:`_KeepingChunk`)."""
    if backend == "torch" and not torch.compiler.is_compiling():
        return run(problem, chunk_size)
    if _keeps(problem, chunk_size, backend):
        return _KeepingChunk.apply(problem, chunk_size, *_inputs(problem))
    p = problem
    return recurrence_op(
        *_inputs(p), p.cu_seqlens, p.scale, p.transition.decay.value, p.transition.lowrank.value, chunk_size, backend
    )
