"""The Triton chunk path: the launches in stage order (the GPU twin of :mod:`dplr.engine`).

Forward = two launches: :func:`~dplr.triton.intra.chunk_prepare_kernel` (every chunk in
parallel) and :func:`~dplr.triton.state.chunk_state_kernel` (every sequence, value head and
block of value columns in parallel; sequential over the chunks of a sequence).
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from ..engine import Problem
from ..transition import LowRank
from . import configs
from .intra import chunk_prepare_kernel
from .state import chunk_state_kernel
from .structure import constexprs


class ChunkIndex:
    """Where chunks and sequences lie in the flat token axis (built on the host from the
    problem's lengths, which the front-end already holds: no device sync). Cached per layout,
    so that repeated calls copy nothing to the device."""

    def __init__(self, B: int, T: int, cu_seqlens: tuple[int, ...] | None, chunk_size: int, device: torch.device):
        if cu_seqlens is None:
            starts = torch.arange(B, dtype=torch.int64) * T
            lengths = torch.full((B,), T, dtype=torch.int64)
        else:
            bounds = torch.tensor(cu_seqlens, dtype=torch.int64)
            starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
        counts = (lengths + chunk_size - 1) // chunk_size
        first = torch.cumsum(counts, 0) - counts
        owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
        within = torch.arange(int(counts.sum())) - first[owner]
        self.num_seqs = len(counts)
        self.num_chunks = int(counts.sum())
        self.chunk_bos = (starts[owner] + within * chunk_size).to(device=device, dtype=torch.int64)
        self.chunk_len = torch.clamp(lengths[owner] - within * chunk_size, max=chunk_size).to(device, torch.int32)
        self.seq_bos = starts.to(device=device, dtype=torch.int64)
        self.seq_len = lengths.to(device=device, dtype=torch.int32)
        self.seq_chunk0 = first.to(device=device, dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def chunk_index(
    B: int, T: int, cu_seqlens: tuple[int, ...] | None, chunk_size: int, device: torch.device
) -> ChunkIndex:
    return ChunkIndex(B, T, cu_seqlens, chunk_size, device)


def _tokens(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T, heads, ...]`` → contiguous ``[B·T, heads, ...]``."""
    return None if x is None else x.reshape(-1, *x.shape[2:]).contiguous()


def forward(problem: Problem, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = problem
    if p.q.dtype == torch.float64:
        raise TypeError("the Triton kernels take fp16, bf16 or fp32 inputs; fp64 runs on the PyTorch path")
    B, T, H, K = p.q.shape
    HV, V = p.v.shape[2], p.v.shape[3]
    C = chunk_size
    device = p.q.device
    cu = None if p.cu_seqlens is None else tuple(p.cu_seqlens)
    index = chunk_index(B, T, cu, C, device)
    structure = constexprs(p.transition)
    lowrank = p.transition.lowrank
    cfg = configs.chunk_forward(K=K, V=V, C=C, dtype=p.q.dtype, device=device)

    q, k, v, g, beta, a, b = (_tokens(x) for x in (p.q, p.k, p.v, p.g, p.beta, p.a, p.b))
    BT = B * T
    store = p.q.dtype  # intermediates in the input precision, as the tensor cores read them

    def scratch(width: int, used: bool = True) -> torch.Tensor:
        return torch.empty(BT if used else 0, HV, width, device=device, dtype=store)

    has_rank = lowrank is not LowRank.NONE
    general = lowrank is LowRank.GENERAL
    W, U = scratch(K, has_rank), scratch(V, has_rank)
    q_start, k_end, b_end = scratch(K), scratch(K), scratch(K, general)
    A_qk, A_qb = scratch(C), scratch(C, general)
    decay_end = torch.empty(index.num_chunks, HV, K, device=device, dtype=torch.float32)
    dummy = q  # an unused pointer argument still needs a tensor

    L = min(16, C)
    NB = C // L
    if index.num_chunks:
        chunk_prepare_kernel[(index.num_chunks, HV)](
            q, k, v, dummy if g is None else g, dummy if beta is None else beta,
            dummy if a is None else a, dummy if b is None else b,
            W, U, q_start, k_end, b_end, A_qk, A_qb, decay_end,
            index.chunk_bos, index.chunk_len,
            H=H, HV=HV, K=K, V=V, C=C, L=L, NB=NB, LEVELS=int(math.log2(NB)), BK=cfg.BK, BV=cfg.BV_prepare,
            PREC=cfg.precision, num_warps=cfg.warps_prepare, num_stages=1, **structure,
        )  # fmt: skip

    o = torch.empty(B, T, HV, V, device=device, dtype=p.v.dtype)
    final = torch.empty(index.num_seqs, HV, K, V, device=device, dtype=torch.float32)
    h0 = None if p.initial_state is None else p.initial_state.to(torch.float32).contiguous()
    if index.num_seqs:
        grid = (index.num_seqs, HV, triton.cdiv(V, cfg.BV_state))
        chunk_state_kernel[grid](
            W, U, q_start, k_end, b_end, A_qk, A_qb, decay_end, v, o, final if h0 is None else h0, final,
            index.seq_bos, index.seq_len, index.seq_chunk0, p.scale,
            HV=HV, K=K, V=V, KP=triton.next_power_of_2(K), C=C, BV=cfg.BV_state,
            USE_H0=h0 is not None, STORE_HT=True, PREC=cfg.precision, NUM_STAGES=cfg.stages_state,
            num_warps=cfg.warps_state, **structure,
        )  # fmt: skip
    return o, final
