"""The recurrent (token-by-token) PyTorch path: ``fused_recurrent_*`` on CPU, and the decode step.

One loop over time, batched over every sequence and head; varlen batches are padded to the
longest sequence with tokens that leave the state as it is (zero key, value and decay).
"""

from __future__ import annotations

import itertools

import torch

from .engine import Problem
from .torch_chunk.layout import ChunkLayout
from .transition import Decay, LowRank, Transition, expand_heads


def step(
    transition: Transition,
    state: torch.Tensor,
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    scale: float,
    gv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``state [..., K, V]``; ``q, k, a, b [..., K]``, ``v [..., V]``, ``g [...]`` or
    ``[..., K]``, ``beta [...]``, ``gv [..., V]`` (with ``transition.value_decay``).
    Returns ``(o [..., V], new state)``."""

    def read(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # xᵀ S
        return (x[..., None, :] @ s).squeeze(-2)

    if transition.lowrank is LowRank.GENERAL:
        x = read(a, state)  # a_tᵀ S_{t-1}: the undecayed state
    if transition.decay is Decay.SCALAR:
        state = torch.exp(g)[..., None, None] * state
    elif transition.decay is Decay.CHANNEL:
        state = torch.exp(g)[..., None] * state
    if transition.lowrank is LowRank.GENERAL:
        state = state + b[..., :, None] * x[..., None, :]
    if transition.value_decay:
        state = state * torch.exp(gv)[..., None, :]  # the columns decay after the key-side transition
    if transition.lowrank is LowRank.TIED:
        v = beta[..., None] * (v - read(k, state))  # the delta rule's corrected value
    state = state + k[..., :, None] * v[..., None, :]
    return read(q, state) * scale, state


def recurrent_fwd(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(o [B,T,HV,V], final_state [N,HV,K,V])`` in the compute dtype."""
    p, dtype, HV = problem, problem.compute_dtype, problem.v.shape[2]
    B, T = p.q.shape[:2]
    lengths = [T] * B if p.cu_seqlens is None else [e - s for s, e in itertools.pairwise(p.cu_seqlens)]
    longest = max(lengths, default=0)
    # One "chunk" per non-empty sequence, as long as the longest: [M, HV, longest, ·].
    layout = ChunkLayout.build(
        batch=B, seq_len=T, cu_seqlens=p.cu_seqlens, chunk_size=max(longest, 1), device=p.q.device
    )
    q, k, a, b = (expand_heads(layout.gather(x, dtype), HV, dim=1) for x in (p.q, p.k, p.a, p.b))
    v, g, beta, gv = (layout.gather(x, dtype) for x in (p.v, p.g, p.beta, p.gv))

    states = p.start_state()[layout.order]
    running = layout.num_chunks  # sequences with at least one token come first in `order`
    state, outs = states[:running], []
    for t in range(longest):
        o, state = step(
            p.transition,
            state,
            q=q[:, :, t],
            k=k[:, :, t],
            v=v[:, :, t],
            g=None if g is None else g[:, :, t],
            beta=None if beta is None else beta[:, :, t],
            a=None if a is None else a[:, :, t],
            b=None if b is None else b[:, :, t],
            scale=p.scale,
            gv=None if gv is None else gv[:, :, t],
        )
        outs.append(o)
    final = torch.cat([state, states[running:]])
    final = torch.empty_like(final).index_copy(0, layout.order, final)
    if not outs:
        return p.v.new_zeros(p.v.shape, dtype=dtype), final
    return layout.scatter(torch.stack(outs, dim=2), p.v.shape), final
