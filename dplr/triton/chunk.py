"""The Triton chunk path: the launches in stage order (the GPU twin of :mod:`dplr.engine`).

Forward = two launches: :func:`~dplr.triton.intra.chunk_prepare_kernel` (every chunk in
parallel) and :func:`~dplr.triton.state.chunk_state_kernel` (every sequence, value head and
block of value columns in parallel; sequential over the chunks of a sequence).

Backward = the same two again (recomputing the per-chunk quantities and storing every chunk's
initial state), then :func:`~dplr.triton.state.chunk_state_bwd_kernel` (the state's gradient,
last chunk first), then per chunk in parallel :func:`~dplr.triton.values_bwd.chunk_grad_values_kernel`,
:func:`~dplr.triton.values_bwd.chunk_grad_key_sides_kernel` and
:func:`~dplr.triton.chunk_bwd.chunk_grad_keys_kernel`.

A value-side decay ``gv`` adds launches of :mod:`dplr.triton.columns`: its per-chunk sums beside
launch 1, the column-decayed products that do not read the state before the state pass, and
their transposes before the state pass backwards.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton

from ..engine import Problem
from ..torch_chunk.layout import sequence_spans
from ..transition import Decay, LowRank
from . import configs
from .chunk_bwd import chunk_grad_keys_kernel
from .columns import chunk_columns_bwd_kernel, chunk_columns_kernel, chunk_value_sums_kernel
from .intra import chunk_prepare_kernel
from .state import chunk_state_bwd_kernel, chunk_state_kernel
from .structure import constexprs
from .values_bwd import chunk_grad_key_sides_kernel, chunk_grad_values_kernel

# Checked against the fp64 reference on an H100 and an H200 (benchmarks/gpu_chunk.py: every
# family, bf16 and fp32, varlen, all gradients, bit-identical across two passes), so
# DPLR_BACKEND=auto trains on it.
BACKWARD_CHECKED_ON_GPU = True
# The value-side decay gv (VALUE_DECAY) passes under TRITON_INTERPRET and on an H200 (last at
# code 318b843, benchmarks/results/gpu_value_decay_H200_318b843.json): GLA, KDA and DPLR forward and
# every gradient in bf16 and fp32, packed sequences, gates of -60 per step; and
# tests/triton/test_value_decay.py on the card. So DPLR_BACKEND=auto runs gv calls here.
VALUE_DECAY_CHECKED_ON_GPU = True


class ChunkIndex:
    """Where chunks and sequences lie in the flat token axis (built on the host from the
    problem's lengths, which the front-end already holds: no device sync). Cached per layout,
    so that repeated calls copy nothing to the device."""

    def __init__(self, B: int, T: int, cu_seqlens: tuple[int, ...] | None, chunk_size: int, device: torch.device):
        starts, lengths = sequence_spans(B, T, cu_seqlens)
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


def _structure(problem: Problem) -> dict:
    """The structure constexprs of a launch: the key side's and ``VALUE_DECAY`` (``gv``)."""
    return {**constexprs(problem.transition), "VALUE_DECAY": problem.transition.value_decay}


def _sub_blocks(chunk_size: int) -> dict:
    """The key side's sub-blocks (:mod:`dplr.triton.intra`): ``L`` tokens each, and ``LEVELS``
    pairwise merges of them up to the chunk."""
    L = min(16, chunk_size)
    return {"L": L, "LEVELS": int(math.log2(chunk_size // L))}


def _merges(chunk_size: int) -> int:
    """The value side's pairwise merges, from the chunk down to single tokens (:mod:`dplr.triton.columns`)."""
    return int(math.log2(chunk_size))


def _tokens(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T, heads, ...]`` → contiguous ``[B·T, heads, ...]``."""
    return None if x is None else x.reshape(-1, *x.shape[2:]).contiguous()


class Prepared(NamedTuple):
    """What the per-chunk kernel leaves for the state pass (token-major, per value head)."""

    index: ChunkIndex
    x_start: torch.Tensor
    M: torch.Tensor
    A_ak: torch.Tensor
    q_start: torch.Tensor
    k_end: torch.Tensor
    b_end: torch.Tensor
    A_qk: torch.Tensor
    A_qb: torch.Tensor
    decay_end: torch.Tensor
    G: torch.Tensor  # cumulative channel decays, fp32 (empty without channel decay)
    GV: torch.Tensor  # cumulative value-side decays, fp64 (empty without gv; see dplr.triton.columns)
    A_kk: torch.Tensor  # tied, for the backward only (else empty)


def forward(problem: Problem, chunk_size: int, cfg: configs.ChunkForward | None = None):
    """``(o [B,T,HV,V] in v's dtype, final state [N,HV,K,V] fp32)``."""
    p = problem
    if p.q.dtype == torch.float64:
        raise TypeError("the Triton kernels take fp16, bf16 or fp32 inputs; fp64 runs on the PyTorch path")
    K, V = p.q.shape[3], p.v.shape[3]
    lowrank = p.transition.lowrank.value
    cfg = cfg or configs.chunk_forward(
        K=K, V=V, C=chunk_size, dtype=p.q.dtype, device=p.q.device, lowrank=lowrank,
        value_decay=p.transition.value_decay,
    )  # fmt: skip
    return state_pass(p, prepare(p, chunk_size, cfg), chunk_size, cfg)


def prepare(problem: Problem, chunk_size: int, cfg: configs.ChunkForward, *, keep_akk: bool = False) -> Prepared:
    """Launch 1: every chunk in parallel (stages 1-3); ``keep_akk`` also stores ``A_kk`` (backward).
    With ``gv``, also its per-chunk sums (:func:`~dplr.triton.columns.chunk_value_sums_kernel`)."""
    p = problem
    B, T, H, K = p.q.shape
    HV, V = p.v.shape[2], p.v.shape[3]
    C, device = chunk_size, p.q.device
    cu = None if p.cu_seqlens is None else tuple(p.cu_seqlens)
    index = chunk_index(B, T, cu, C, device)
    lowrank = p.transition.lowrank
    q, k, g, beta, a, b, gv = (_tokens(x) for x in (p.q, p.k, p.g, p.beta, p.a, p.b, p.gv))
    store = p.q.dtype  # intermediates in the input precision, as the tensor cores read them

    def scratch(width: int, used: bool = True, dtype: torch.dtype = store) -> torch.Tensor:
        return torch.empty(B * T if used else 0, HV, width, device=device, dtype=dtype)

    has_rank, general = lowrank is not LowRank.NONE, lowrank is LowRank.GENERAL
    out = Prepared(
        index=index, x_start=scratch(K, has_rank), M=scratch(C, has_rank, torch.float32), A_ak=scratch(C, general),
        q_start=scratch(K), k_end=scratch(K),
        b_end=scratch(K, general), A_qk=scratch(C), A_qb=scratch(C, general),
        decay_end=torch.empty(index.num_chunks, HV, K, device=device, dtype=torch.float32),
        G=torch.empty(B * T if p.transition.decay is Decay.CHANNEL else 0, HV, K, device=device, dtype=torch.float32),
        GV=torch.empty(B * T if gv is not None else 0, HV, V, device=device, dtype=torch.float64),
        A_kk=scratch(C, keep_akk and lowrank is LowRank.TIED, torch.float32),
    )  # fmt: skip
    # The solve reads its matrix back by rows (L2-resident: written and read by one program).
    scratch_solve = torch.empty(
        index.num_chunks * HV * 2 * C * C if has_rank else 0, device=device, dtype=torch.float32
    )
    if index.num_chunks:
        dummy = q  # an unused pointer argument still needs a tensor
        chunk_prepare_kernel[(index.num_chunks, HV)](
            q, k, dummy if g is None else g, dummy if beta is None else beta,
            dummy if a is None else a, dummy if b is None else b,
            out.x_start, out.M, out.A_ak, out.A_kk, out.q_start, out.k_end, out.b_end, out.A_qk, out.A_qb,
            out.decay_end, out.G, scratch_solve, index.chunk_bos, index.chunk_len,
            H=H, HV=HV, K=K, C=C, **_sub_blocks(C), BK=cfg.BK,
            PREC=cfg.precision, STORE_AKK=out.A_kk.numel() > 0, num_warps=cfg.warps_prepare, num_stages=1,
            **constexprs(p.transition),
        )  # fmt: skip
        if gv is not None:
            chunk_value_sums_kernel[(index.num_chunks, HV, triton.cdiv(V, cfg.BV_columns))](
                gv, out.GV, index.chunk_bos, index.chunk_len, HV=HV, V=V, C=C, BV=cfg.BV_columns, num_warps=4
            )  # fmt: skip
    return out


def value_columns(
    problem: Problem, prep: Prepared, chunk_size: int, cfg: configs.ChunkForward, *, output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """With ``gv``: the column-decayed products that do not read the state, every chunk in
    parallel (:func:`~dplr.triton.columns.chunk_columns_kernel`): ``(U_COL, O_COL)``, each
    ``[BT, HV, V]`` fp32 (empty when the structure or ``output`` does not need it)."""
    p, index = problem, prep.index
    (B, T), HV, V = p.q.shape[:2], p.v.shape[2], p.v.shape[3]
    lowrank = p.transition.lowrank

    def f32(used: bool) -> torch.Tensor:
        return torch.empty(B * T if used else 0, HV, V, device=p.q.device, dtype=torch.float32)

    u_col, o_col = f32(lowrank is not LowRank.NONE), f32(output)
    if index.num_chunks and (u_col.numel() or o_col.numel()):  # GLA's recomputation needs neither
        v = _tokens(p.v)
        chunk_columns_kernel[(index.num_chunks, HV, triton.cdiv(V, cfg.BV_columns))](
            prep.M, prep.A_ak, prep.A_qk, prep.A_qb, prep.GV, v, v if p.beta is None else _tokens(p.beta),
            u_col, o_col, index.chunk_bos, index.chunk_len,
            HV=HV, V=V, C=chunk_size, BV=cfg.BV_columns, MERGES=_merges(chunk_size),
            LOWRANK=constexprs(p.transition)["LOWRANK"], STORE_O=output, PREC=cfg.precision, num_warps=4,
        )  # fmt: skip
    return u_col, o_col


def value_columns_bwd(
    problem: Problem, prep: Prepared, do: torch.Tensor, chunk_size: int, cfg: configs.ChunkForward
) -> torch.Tensor:
    """With ``gv`` and a rank-one part: ``D_COL = (A ∘ F)ᵀ (scale · dO)`` ``[BT, HV, V]`` fp32
    (``A = A_qk`` tied, ``A_qb`` general) for the state pass backwards, every chunk in parallel
    (:func:`~dplr.triton.columns.chunk_columns_bwd_kernel`); else an empty stand-in."""
    p, index = problem, prep.index
    HV, V = p.v.shape[2], p.v.shape[3]
    lowrank = p.transition.lowrank
    used = p.gv is not None and lowrank is not LowRank.NONE
    d_col = torch.empty(do.shape[0] if used else 0, HV, V, device=do.device, dtype=torch.float32)
    if used and index.num_chunks:
        chunk_columns_bwd_kernel[(index.num_chunks, HV, triton.cdiv(V, cfg.BV_columns))](
            prep.A_qk if lowrank is LowRank.TIED else prep.A_qb, prep.GV, do, d_col,
            index.chunk_bos, index.chunk_len, p.scale,
            HV=HV, V=V, C=chunk_size, BV=cfg.BV_columns, MERGES=_merges(chunk_size), PREC=cfg.precision, num_warps=4,
        )  # fmt: skip
    return d_col


def state_pass(
    problem: Problem,
    prep: Prepared,
    chunk_size: int,
    cfg: configs.ChunkForward,
    *,
    states: torch.Tensor | None = None,
    output: bool = True,
    columns: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Launch 2: every sequence, value head and value block in parallel (stages 4-5). With
    ``states [NT, HV, K, V]`` it also stores every chunk's initial state there; ``output=False``
    skips the output (the backward's recomputation). With ``gv`` it first runs
    :func:`value_columns`, unless given their ``columns``."""
    p = problem
    B, T, _, K = p.q.shape
    HV, V = p.v.shape[2], p.v.shape[3]
    index, device = prep.index, p.q.device
    # output=False (the backward's recomputation) writes no output: an empty stand-in
    o = torch.empty(*(B, T, HV, V) if output else (0, HV, V), device=device, dtype=p.v.dtype)
    final = torch.empty(index.num_seqs, HV, K, V, device=device, dtype=torch.float32)
    h0 = None if p.initial_state is None else p.initial_state.to(torch.float32).contiguous()
    if p.gv is not None and columns is None:
        columns = value_columns(p, prep, chunk_size, cfg, output=output)
    u_col, o_col = (final, final) if columns is None else columns
    if index.num_seqs:
        grid = (index.num_seqs, HV, triton.cdiv(V, cfg.BV_state))
        chunk_state_kernel[grid](
            prep.x_start, prep.M, prep.A_ak, prep.q_start, prep.k_end, prep.b_end, prep.A_qk, prep.A_qb, prep.decay_end,
            prep.GV, u_col, o_col, _tokens(p.v), final if p.beta is None else _tokens(p.beta), o,
            final if h0 is None else h0, final, final if states is None else states,
            index.seq_bos, index.seq_len, index.seq_chunk0, p.scale,
            HV=HV, K=K, V=V, KP=triton.next_power_of_2(K), C=chunk_size, BV=cfg.BV_state,
            USE_H0=h0 is not None, STORE_HT=True, STORE_O=output, STORE_STATES=states is not None,
            PREC=cfg.precision, NUM_STAGES=cfg.stages_state,
            num_warps=cfg.warps_state, **_structure(p),
        )  # fmt: skip
    return o, final


class Kept(NamedTuple):
    """What a forward keeps for its backward (``DPLR_KEEP_INTERMEDIATES=1``): the per-chunk
    quantities and every chunk's initial state, made at the backward's chunk size."""

    chunk_size: int
    prep: Prepared
    states: torch.Tensor  # [NT, HV, K, V], bf16 for bf16 inputs (configs.ChunkBackward.states_bf16), else fp32
    u_col: torch.Tensor | None  # with gv and a rank-one part: see value_columns


def _backward_configs(p: Problem, chunk_size: int) -> tuple[configs.ChunkBackward, configs.ChunkForward]:
    """The backward's launch configuration and that of the forward quantities it reads (at its chunk size)."""
    if p.q.dtype == torch.float64:
        raise TypeError("the Triton kernels take fp16, bf16 or fp32 inputs; fp64 runs on the PyTorch path")
    K, V, lowrank = p.q.shape[3], p.v.shape[3], p.transition.lowrank.value
    decay = p.transition.decay.value
    value_decay = p.transition.value_decay
    bwd = configs.chunk_backward(
        K=K, V=V, C=chunk_size, dtype=p.q.dtype, lowrank=lowrank, decay=decay, value_decay=value_decay
    )
    cfg = configs.chunk_forward(
        K=K, V=V, C=bwd.C, dtype=p.q.dtype, device=p.q.device, lowrank=lowrank, value_decay=value_decay
    )
    return bwd, cfg


def _chunk_states(
    p: Problem, prep: Prepared, chunk_size: int, cfg: configs.ChunkForward, bwd: configs.ChunkBackward, *, output: bool
):
    """The state pass that also stores every chunk's initial state: ``(o, final, states, u_col)``,
    ``u_col`` for the backward's values kernel (see :func:`value_columns`; ``None`` without gv)."""
    K, HV, V = p.q.shape[3], p.v.shape[2], p.v.shape[3]
    dtype = torch.bfloat16 if bwd.states_bf16 else torch.float32
    states = torch.empty(prep.index.num_chunks, HV, K, V, device=p.q.device, dtype=dtype)
    columns = None if p.gv is None else value_columns(p, prep, chunk_size, cfg, output=output)
    o, final = state_pass(p, prep, chunk_size, cfg, states=states, output=output, columns=columns)
    return o, final, states, None if columns is None else columns[0]


def forward_keeping(problem: Problem, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, Kept]:
    """:func:`forward`, keeping what :func:`backward` would recompute. It runs at the backward's
    chunk size (see :func:`configs.chunk_backward`: 32 for fp32 inputs or the general form on a
    GPU), so that what it keeps is what the backward reads; the output does not depend on it."""
    bwd, cfg = _backward_configs(problem, chunk_size)
    prep = prepare(problem, bwd.C, cfg, keep_akk=True)
    o, final, states, u_col = _chunk_states(problem, prep, bwd.C, cfg, bwd, output=True)
    return o, final, Kept(bwd.C, prep, states, u_col)


def backward(
    problem: Problem, d_out: torch.Tensor, d_final: torch.Tensor | None, chunk_size: int, *, kept: Kept | None = None
) -> tuple:
    """Gradients of ``(q, k, v, g, beta, a, b, initial_state, gv)`` (``None`` for absent inputs),
    each in its input's dtype. Recomputes the forward's per-chunk quantities and every chunk's initial
    state (or takes them from ``kept``, see :func:`forward_keeping`), then five launches: the state
    pass backwards (sequential over chunks), the values' gradients and the keys' (per chunk), and
    the sums over a key head's value heads. The chunk size is the backward's own (see
    :func:`configs.chunk_backward`): gradients do not depend on it."""
    p = problem
    B, T, H, K = p.q.shape
    HV, V = p.v.shape[2], p.v.shape[3]
    device, lowrank = p.q.device, p.transition.lowrank
    bwd, cfg = _backward_configs(p, chunk_size)
    C = bwd.C
    if kept is None:
        prep = prepare(p, C, cfg, keep_akk=True)
        states, u_col = _chunk_states(p, prep, C, cfg, bwd, output=False)[2:]
    elif kept.chunk_size != C:
        raise ValueError(f"kept intermediates were made at chunk size {kept.chunk_size}, the backward runs at {C}")
    else:
        prep, states, u_col = kept.prep, kept.states, kept.u_col
    index, NT, structure = prep.index, B * T, _structure(p)

    def buffer(*shape: int, used: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer of ``shape`` (fp32 unless told), empty where ``used`` is false."""
        return torch.empty(*shape if used else (0,), device=device, dtype=dtype)

    has_rank, general, tied = lowrank is not LowRank.NONE, lowrank is LowRank.GENERAL, lowrank is LowRank.TIED
    do = _tokens(d_out)
    d_states = torch.empty_like(states)
    dh0 = buffer(index.num_seqs, HV, K, V)
    KP = triton.next_power_of_2(K)
    beta = _tokens(p.beta)
    if index.num_seqs:
        chunk_state_bwd_kernel[(index.num_seqs, HV, triton.cdiv(V, cfg.BV_state))](
            prep.x_start, prep.M, prep.q_start, prep.k_end, prep.b_end, prep.A_qk, prep.A_qb, prep.decay_end, prep.GV,
            value_columns_bwd(p, prep, do, C, cfg),
            do if beta is None else beta, do, dh0 if d_final is None else d_final.to(torch.float32).contiguous(),
            dh0, d_states, index.seq_bos, index.seq_len, index.seq_chunk0, p.scale,
            HV=HV, K=K, V=V, KP=KP, C=C, BV=cfg.BV_state,
            USE_DHT=d_final is not None, STORE_DH0=True,
            PREC=cfg.precision, NUM_STAGES=cfg.stages_state, num_warps=cfg.warps_state, **structure,
        )  # fmt: skip

    dv = torch.empty(NT, HV, V, device=device, dtype=p.v.dtype)
    # fp32 partial gradients, per token and value head: of the chunk matrices ([.., C]) and (below)
    # of the decayed vectors ([.., K]), for the keys kernel
    dA_qk, dA_qb, dA_ak = buffer(NT, HV, C), buffer(NT, HV, C, used=general), buffer(NT, HV, C, used=general)
    dM = buffer(NT, HV, C, used=has_rank)
    dbeta = buffer(NT, HV, used=tied)
    d_decay = buffer(index.num_chunks, HV, K)
    gv = p.gv is not None
    dgv = buffer(NT, HV, V, used=gv)
    # the values kernel's [C, V] factors of the decayed key vectors' gradients (see
    # chunk_grad_key_sides_kernel; scale · dO and v are read from the inputs where they serve)
    stash = torch.bfloat16 if bwd.stash_bf16 else torch.float32
    stash_q, stash_k = buffer(NT, HV, V, used=gv, dtype=stash), buffer(NT, HV, V, used=gv or tied, dtype=stash)
    stash_x, stash_b = buffer(NT, HV, V, used=has_rank, dtype=stash), buffer(NT, HV, V, used=general, dtype=stash)
    grid = (index.num_chunks, HV)
    if index.num_chunks:
        chunk_grad_values_kernel[grid](
            _tokens(p.v), do if beta is None else beta, do, states, d_states, prep.x_start, prep.M, prep.A_ak,
            prep.k_end, prep.b_end, prep.A_qk, prep.A_qb, prep.q_start, prep.decay_end, prep.GV,
            dv if u_col is None else u_col,
            dv, dA_qk, dA_qb, dA_ak, dM, stash_q, stash_k, stash_x, stash_b, dbeta, d_decay, dgv,
            index.chunk_bos, index.chunk_len, p.scale,
            HV=HV, K=K, V=V, KP=KP, C=C, BV=bwd.BV_values, MERGES=_merges(C), HOLD=bwd.hold_values, **structure,
            PREC=cfg.precision, num_warps=bwd.warps_values, num_stages=bwd.stages_values, ptx_options=bwd.ptxas_values,
        )  # fmt: skip
    G_cum, M_solve, A_kk, decay_end = prep.G, prep.M, prep.A_kk, prep.decay_end
    # The forward's other tiles (recomputed or kept) are done with: freed before the decayed
    # vectors' gradients exist, and the states with the stash before the keys kernel's outputs
    # (2 x [chunks, HV, K, V] fp32 and up to 4 x [BT, HV, V] fp32 off the peak).
    del prep, u_col, kept
    dq_start, dk_end = buffer(NT, HV, K), buffer(NT, HV, K)
    db_end, dx = buffer(NT, HV, K, used=general), buffer(NT, HV, K, used=has_rank)
    if index.num_chunks:
        chunk_grad_key_sides_kernel[(index.num_chunks, HV, triton.cdiv(K, bwd.BK_sides))](
            _tokens(p.v), do, states, d_states, stash_q, stash_k, stash_x, stash_b, dq_start, dk_end, dx, db_end,
            index.chunk_bos, index.chunk_len, p.scale,
            HV=HV, K=K, V=V, C=C, BK=bwd.BK_sides, BV=bwd.BV_sides, LOWRANK=structure["LOWRANK"],
            VALUE_DECAY=gv, PREC=cfg.precision, num_warps=bwd.warps_sides,
        )  # fmt: skip
    del states, d_states, stash_q, stash_k, stash_x, stash_b
    # the inputs' gradients per value head. With one value head per key head the keys kernel
    # stores them in the inputs' dtype (its stores round once; no fp32 copy and cast after:
    # 0.4-0.8 ms and 2 x 0.13 GiB of DeltaNet's peak at (4, 8192, 16, 128)); else in fp32,
    # summed over a key head's value heads below.
    grads = p.q.dtype if HV == H else torch.float32
    dq, dk = buffer(NT, HV, K, dtype=grads), buffer(NT, HV, K, dtype=grads)
    da, db = buffer(NT, HV, K, used=general, dtype=grads), buffer(NT, HV, K, used=general, dtype=grads)
    dg = None if p.g is None else buffer(NT, HV, *p.g.shape[3:])
    if index.num_chunks:
        q, k, g, a, b = (_tokens(x) for x in (p.q, p.k, p.g, p.a, p.b))
        chunk_grad_keys_kernel[grid](
            q, k, q if g is None else g, q if a is None else a, q if b is None else b, do if beta is None else beta,
            G_cum, M_solve, A_kk, dA_qk, dA_qb, dA_ak, dM, dq_start, dk_end, db_end, dx, d_decay,
            decay_end, dbeta, dq, dk, da, db, dq if dg is None else dg,
            index.chunk_bos, index.chunk_len,
            H=H, HV=HV, K=K, C=C, **_sub_blocks(C), BK=bwd.BK_keys,
            PREC=cfg.precision, num_warps=bwd.warps_keys, **constexprs(p.transition),
        )  # fmt: skip

    def key_grad(x: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
        """``[BT, HV, K]`` → ``[B, T, H, K]``: a key head's value heads add up."""
        if like is None:
            return None
        if HV == H:  # one value head per key head: nothing to add up (and no copy to make)
            return x.view(B, T, H, K).to(like.dtype)
        return x.view(B, T, H, HV // H, K).sum(3).to(like.dtype)

    return (
        key_grad(dq, p.q), key_grad(dk, p.k), dv.view(B, T, HV, V),
        None if dg is None else dg.view(p.g.shape).to(p.g.dtype),
        None if p.beta is None else dbeta.view(B, T, HV).to(p.beta.dtype),
        key_grad(da, p.a), key_grad(db, p.b),
        None if p.initial_state is None else dh0.to(p.initial_state.dtype),
        None if p.gv is None else dgv.view(p.gv.shape).to(p.gv.dtype),
    )  # fmt: skip
