"""The chunk algorithm in stage order (DESIGN §3): the only place that knows the order.

Inputs are the canonical tensors of a :class:`~dplr.transition.Transition` (see
:class:`Problem`); the front-ends in :mod:`dplr.api` produce them. Everything here is plain
PyTorch and differentiable by autograd, so the backward comes for free; memory stays
``O(T·C + (T/C)·K·V)`` per head (chunk matrices and one state per chunk), never ``O(T²)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .torch_chunk.cumsum import chunk_decays
from .torch_chunk.intra import SUB, column_decay, intra_chunk
from .torch_chunk.layout import ChunkLayout
from .torch_chunk.output import chunk_output
from .torch_chunk.solve import pseudo_values
from .torch_chunk.state import state_pass
from .transition import Transition, expand_heads

# Elements of one stage tensor (a [chunks, HV, C, max(K, V, C)] block) per part of the chunk loop:
# 2^18 fp32 elements are 1 MiB, so that a part's live tensors (about 16 at the general structure's
# peak) take some 16 MiB: the heap pages one part frees then stay below glibc's trim threshold in a
# typical process, so the next part reuses them instead of the kernel taking them back and faulting
# them in again. (At 2^19, benchmarks/cpu_chunk.py's shape took 4-12k page faults per forward on a
# 2-core machine, about 10 ms of a 50 ms forward; at 2^18 none, for ~300 more small ops.)
PART_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Problem:
    """One call, in the canonical form of its transition.

    ``q, k [B,T,H,K]``, ``v [B,T,HV,V]``; ``g`` log decay ``[B,T,HV]`` or ``[B,T,HV,K]`` (or
    ``None``); ``beta [B,T,HV]`` for tied transitions; ``a, b [B,T,H,K]`` for general ones;
    ``initial_state [N,HV,K,V]`` or ``None``; ``cu_seqlens`` as host integers or ``None``;
    ``gv [B,T,HV,V]`` the value-side log decay when ``transition.value_decay``, else ``None``.
    """

    transition: Transition
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None
    beta: torch.Tensor | None
    a: torch.Tensor | None
    b: torch.Tensor | None
    scale: float
    initial_state: torch.Tensor | None
    cu_seqlens: list[int] | None
    gv: torch.Tensor | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        # fp64 inputs are computed in fp64 (the tests' exact mode); everything else in fp32.
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32

    @property
    def num_seqs(self) -> int:
        return self.q.shape[0] if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def start_state(self) -> torch.Tensor:
        HV, K, V = self.v.shape[2], self.q.shape[3], self.v.shape[3]
        if self.initial_state is None:
            return self.q.new_zeros(self.num_seqs, HV, K, V, dtype=self.compute_dtype)
        return self.initial_state.to(self.compute_dtype)


def chunk_fwd(problem: Problem, *, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(o [B,T,HV,V], final_state [N,HV,K,V])``, both in the compute dtype.

    The chunks run in parts of whole steps (:meth:`ChunkLayout.parts`), each part through every
    stage before the next, its state pass going on from the state the part before left: the
    stages' per-chunk tensors are held for one part at a time, not for the whole sequence. On a
    CPU that keeps them in cache and keeps the forward's peak memory low (every fresh page the
    allocator maps, or maps again after the kernel reclaimed it, is a page fault costing about
    as much as a pass of arithmetic over it). On a GPU the whole sequence is one part: there a
    part costs a dozen kernel launches per stage, and the card's memory is not paged out."""
    p, dtype, HV = problem, problem.compute_dtype, problem.v.shape[2]
    B, T = p.q.shape[:2]
    layout = ChunkLayout.build(batch=B, seq_len=T, cu_seqlens=p.cu_seqlens, chunk_size=chunk_size, device=p.q.device)
    K, V = p.q.shape[-1], p.v.shape[-1]
    per_chunk = HV * chunk_size * max(K, V, chunk_size)  # elements of a stage tensor per chunk
    part_chunks = max(1, PART_ELEMENTS // per_chunk) if p.q.device.type == "cpu" else max(1, layout.num_chunks)
    state, out = p.start_state(), None
    for rows, part in layout.parts(part_chunks):
        o, state = _chunk_part(
            p.transition,
            layout=part,
            # The intra stage reads q, k, a, b only element-wise: views, not copies, where they can be.
            q=expand_heads(layout.gather(p.q, dtype, rows, copy=False), HV, dim=1),
            k=expand_heads(layout.gather(p.k, dtype, rows, copy=False), HV, dim=1),
            a=expand_heads(layout.gather(p.a, dtype, rows, copy=False), HV, dim=1),
            b=expand_heads(layout.gather(p.b, dtype, rows, copy=False), HV, dim=1),
            v=layout.gather(p.v, dtype, rows),
            g=layout.gather(p.g, dtype, rows),
            beta=layout.gather(p.beta, dtype, rows),
            gv=layout.gather(p.gv, dtype, rows),
            initial_state=state,
            scale=p.scale,
        )
        out = layout.scatter_into(out, o, rows, shape=p.v.shape)  # each part straight to its tokens
        del o  # not held through the next part
    return out, state


def _chunk_part(
    transition: Transition, *, layout: ChunkLayout, q, k, a, b, v, g, beta, gv, initial_state, scale: float
):
    """One part's chunks (``[chunks, HV, C, ·]`` each) through the stages: ``(o [chunks, HV, C, V],
    the state after the part [N, HV, K, V])``."""
    chunk_size, dtype = layout.chunk_size, v.dtype
    decays = chunk_decays(g, sub=min(SUB, chunk_size))
    value_decays = chunk_decays(gv, sub=min(SUB, chunk_size))
    intra = intra_chunk(transition, q=q, k=k, a=a, b=b, decays=decays)
    # What a stage no longer needs is dropped as soon as it is spent (the part's peak memory):
    # q, k, a, b and the decays' per-token sums after intra, the solve-only fields after the solve,
    # W and U after the state pass.
    del q, k, a, b, g
    decays = decays.chunk_ends()
    columns = column_decay(value_decays, dtype=dtype)
    pseudo = pseudo_values(transition, intra=intra, v=v, beta=beta, columns=columns)
    intra = intra.after_solve()
    states = state_pass(
        transition,
        layout=layout,
        decays=decays,
        intra=intra,
        v=v,
        pseudo=pseudo,
        initial_state=initial_state,
        columns=columns,
    )
    del pseudo
    out = chunk_output(transition, intra=intra, states=states, v=v, scale=scale, columns=columns)
    return out, states.final
