"""Entry points of the recurrent (token-by-token) Triton kernels: ``fused_recurrent_*`` forward
and backward (``chunk_size == 0`` in :mod:`dplr.triton`), and the state-pool decode step.

The kernels live in :mod:`.recurrent_fwd` and :mod:`.recurrent_bwd`; this module sizes the
tiles, allocates outputs and buffers, and launches. Inputs are the canonical tensors of a
:class:`dplr.engine.Problem` (in-kernel options already applied by the front-end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import settings
from ..engine import Problem
from .recurrent_bwd import recurrent_bwd_kernel
from .recurrent_fwd import SAVE_CHECKPOINTS, SAVE_EVERY_TOKEN, SAVE_NONE, recurrent_fwd_kernel
from .structure import constexprs

MAX_HEAD_DIM = 256
BACKWARD_CHECKED_ON_GPU = True  # benchmarks/results/gpu_recurrent_H200.log
# gv (VALUE_DECAY): benchmarks/gpu_recurrent.py's gv checks pass on an H200 (code 8d0f2be,
# benchmarks/results/gpu_recurrent_nvidia_h200_checks.json: fused_recurrent forward and backward
# of GLA, KDA and DPLR under normal and -30..-60 gates, and the decode step in both layouts), so
# DPLR_BACKEND=auto (and dplr.decode) run gv calls on these kernels.
VALUE_DECAY_CHECKED_ON_GPU = True
# Tokens between two state checkpoints in the backward: memory T/CK states per head, and a
# scratch of CK tiles per program for the recomputed segment.
CHECKPOINT_EVERY = 64


@dataclass(frozen=True)
class Tiles:
    """How a ``[K, V]`` state is split across programs: ``BK`` rows (all of ``K``), ``BV`` columns."""

    BK: int
    BV: int
    num_warps: int


# The split of the state across programs, per kind of kernel: (state elements per program,
# warps). The recurrent passes are latency-bound (one dependent step per token), so one warp
# per program keeps every reduction over K in shuffles, with no barrier; 32 values a thread
# and tile fit in registers (the backward holds three tiles). The decode step is bandwidth-
# bound and wants more bytes in flight per program. Tuning data: the decode sweep on an H200
# (benchmarks/results/gpu_decode_tiles_H200_280dde8.json: N = 256, H = 32, K = V = 128, fp32
# pool, CUDA graph replay), once the slot's strides were compile-time constants: 8192 values on
# 4 warps (BV = 64) take 0.275 ms (KDA) and 0.276 ms (GDN), against 0.287 / 0.282 ms on 2
# warps (the default before) and 0.286 / 0.369 ms for fla-core on the same inputs.
TILES = {"forward": (1024, 1), "backward": (1024, 1), "decode": (8192, 4)}


def tiles(K: int, V: int, kind: str) -> Tiles:
    """The tile for head sizes ``K, V`` (each at most :data:`MAX_HEAD_DIM`) and a ``kind`` of
    kernel (``"forward"``, ``"backward"`` or ``"decode"``): all of ``K``, as many columns as
    :data:`TILES` allows (at least 4: 16-byte rows), and no more warps than 1024 values fill."""
    elements, warps = TILES[kind]
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(elements // BK, 4))
    return Tiles(BK=BK, BV=BV, num_warps=max(1, min(warps, BK * BV // 1024)))


def _check_supported(problem: Problem) -> None:
    K, V = problem.q.shape[3], problem.v.shape[3]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(
            f"the Triton recurrent kernels take head dimensions up to {MAX_HEAD_DIM}, got K={K}, V={V}; "
            "use DPLR_BACKEND=torch"
        )


def _acc(dtype: torch.dtype):
    """The kernels' arithmetic: fp32 states and sums whatever the inputs (a bf16 state would
    drift over thousands of steps); fp64 for fp64 inputs, the tests' exact mode."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _inputs(problem: Problem) -> dict:
    """The kernels' token tensors, contiguous (a broadcast ``g_gamma`` view is materialised)."""
    p = problem
    return {
        name: None if x is None else x.contiguous()
        for name, x in dict(q=p.q, k=p.k, v=p.v, g=p.g, beta=p.beta, a=p.a, b=p.b, gv=p.gv).items()
    }


def _structure(problem: Problem) -> dict:
    """The structure constexprs of a launch: the key side's, and whether ``gv`` decays the columns."""
    return {**constexprs(problem.transition), "VALUE_DECAY": problem.transition.value_decay}


def _device_int64(values: list[int] | None, device: torch.device) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def _lengths(problem: Problem) -> list[int]:
    B, T = problem.q.shape[:2]
    cu = problem.cu_seqlens
    return [T] * B if cu is None else [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]


def _checkpoint_offsets(problem: Problem, every: int) -> tuple[list[int], int]:
    """First checkpoint of each sequence and the total count (one per started segment)."""
    offsets, total = [], 0
    for length in _lengths(problem):
        offsets.append(total)
        total += -(-length // every)
    return offsets, total


def forward(problem: Problem, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, T, HV, V], final_state [N, HV, K, V])`` in the compute dtype."""
    _check_supported(problem)
    o, final, _ = _forward(problem, store_o=True, every=0)
    return o, final


def _forward(problem: Problem, *, store_o: bool, every: int) -> tuple:
    """The forward kernel over a problem; ``every > 0`` also keeps the state before every
    ``every``-th token of each sequence. Returns ``(o or None, final, checkpoints or None)``."""
    p, dtype, device = problem, problem.compute_dtype, problem.q.device
    B, T, H, K = p.q.shape
    HV, V = p.v.shape[2], p.v.shape[3]
    N = p.num_seqs
    tile = tiles(K, V, "forward")
    x = _inputs(p)
    o = torch.empty(B, T, HV, V, dtype=dtype, device=device) if store_o else None
    final = torch.empty(N, HV, K, V, dtype=dtype, device=device)
    h0 = None if p.initial_state is None else p.initial_state.to(dtype).contiguous()
    ckpt = offsets = None
    if every:
        first, total = _checkpoint_offsets(p, every)
        ckpt = torch.empty(total, HV, K, V, dtype=dtype, device=device)
        offsets = _device_int64(first, device) if p.cu_seqlens is not None else None
    if N * HV:
        recurrent_fwd_kernel[(N * HV * triton.cdiv(V, tile.BV),)](
            x["q"], x["k"], x["v"], x["g"], x["beta"], x["a"], x["b"], x["gv"],
            o, h0, final, None, 0,
            ckpt, offsets,
            _device_int64(p.cu_seqlens, device),
            p.scale, T,
            *final.stride(),
            *(final if ckpt is None else ckpt).stride(),
            H=H, HV=HV, K=K, V=V, BK=tile.BK, BV=tile.BV, **_structure(p),
            SAVE=SAVE_CHECKPOINTS if every else SAVE_NONE, CK=max(every, 1),
            HAS_H0=h0 is not None, HAS_HT=True, STORE_O=store_o, POOL=False, VARLEN=p.cu_seqlens is not None,
            ACC=_acc(dtype), num_warps=tile.num_warps,
        )  # fmt: skip
    return o, final, ckpt


def backward(problem: Problem, d_out: torch.Tensor, d_final: torch.Tensor | None, chunk_size: int) -> tuple:
    """Gradients of ``(q, k, v, g, beta, a, b, initial_state, gv)`` (``None`` for absent inputs),
    each in its input's dtype, from ``d_out [B, T, HV, V]`` and ``d_final [N, HV, K, V]``."""
    _check_supported(problem)
    p, dtype, device = problem, problem.compute_dtype, problem.q.device
    B, T, H, K = p.q.shape
    HV, V = p.v.shape[2], p.v.shape[3]
    N, NT, G = p.num_seqs, B * T, HV // H
    # Short sequences need no more than one segment of scratch (a power of two: few compilations).
    every = min(CHECKPOINT_EVERY, triton.next_power_of_2(max(_lengths(p), default=1) or 1))
    _, _, ckpt = _forward(p, store_o=False, every=every)

    tile = tiles(K, V, "backward")
    NV = triton.cdiv(V, tile.BV)
    atomic = not settings.deterministic()
    # Atomics add every partial into one zeroed buffer; deterministic runs give each block of
    # columns (and each value head of a key-head group) its own slice, summed below in order.
    r_key, r_val = (1, 1) if atomic else (NV * G, NV)
    alloc = torch.zeros if atomic else torch.empty
    structure = _structure(p)
    general, tied = p.a is not None, p.beta is not None

    def buffer(rows: int, *shape: int) -> torch.Tensor:
        return alloc(rows, NT, *shape, dtype=dtype, device=device)

    dq, dk = buffer(r_key, H, K), buffer(r_key, H, K)
    da, db = (buffer(r_key, H, K), buffer(r_key, H, K)) if general else (None, None)
    dg = None if p.g is None else buffer(r_val, HV, K) if p.g.dim() == 4 else buffer(r_val, HV)
    dbeta = buffer(r_val, HV) if tied else None
    dv = torch.empty(B, T, HV, V, dtype=dtype, device=device)
    dgv = None if p.gv is None else torch.empty(B, T, HV, V, dtype=dtype, device=device)
    dh0 = torch.empty(N, HV, K, V, dtype=dtype, device=device)
    if d_final is None:
        d_final = dh0.new_zeros(N, HV, K, V)
    if N * HV:
        scratch = torch.empty(N * HV * NV * every * tile.BK * tile.BV, dtype=dtype, device=device)
        first, _ = _checkpoint_offsets(p, every)
        x = _inputs(p)
        recurrent_bwd_kernel[(N * HV, NV)](
            x["q"], x["k"], x["v"], x["g"], x["beta"], x["a"], x["b"], x["gv"],
            ckpt, _device_int64(first, device) if p.cu_seqlens is not None else None,
            _device_int64(p.cu_seqlens, device),
            d_out.to(dtype).contiguous(), d_final.to(dtype).contiguous(), scratch,
            dq, dk, dv, dg, dbeta, da, db, dgv, dh0,
            p.scale, T, NT,
            H=H, HV=HV, K=K, V=V, BK=tile.BK, BV=tile.BV, **structure, CK=every,
            ATOMIC=atomic, VARLEN=p.cu_seqlens is not None, ACC=_acc(dtype), num_warps=tile.num_warps,
        )  # fmt: skip

    def reduce(buf: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        return None if buf is None else buf.sum(0).view(like.shape).to(like.dtype)

    return (
        reduce(dq, p.q),
        reduce(dk, p.k),
        dv.to(p.v.dtype),
        reduce(dg, p.g),
        reduce(dbeta, p.beta),
        reduce(da, p.a),
        reduce(db, p.b),
        None if p.initial_state is None else dh0.to(p.initial_state.dtype),
        None if p.gv is None else dgv.to(p.gv.dtype),
    )


def decode(
    problem: Problem,
    pool: torch.Tensor,
    slots: torch.Tensor,
    *,
    state_v_first: bool,
    intermediate: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The state-pool decode step: sequence ``n`` runs its ``T`` tokens from ``pool[slots[n]]``
    and writes the state back there, in place. ``pool [P, HV, K, V]`` (``[P, HV, V, K]`` when
    ``state_v_first``), ``slots [N]``; a slot outside ``[0, P)`` is neither read nor written and
    its rows of the outputs are zeros. Returns ``(o [N, T, HV, V] in v's dtype, the state after
    every token [N, T, HV, K, V] (or ``[.., V, K]``) in the pool's dtype, or None)``."""
    _check_supported(problem)
    p, device = problem, problem.q.device
    N, T, H, K = p.q.shape
    HV, V = p.v.shape[2], p.v.shape[3]
    tile = tiles(K, V, "decode")
    acc = torch.float64 if torch.float64 in (pool.dtype, p.compute_dtype) else torch.float32
    o = torch.empty(N, T, HV, V, dtype=p.v.dtype, device=device)
    state_shape = (V, K) if state_v_first else (K, V)
    inter = torch.empty(N, T, HV, *state_shape, dtype=pool.dtype, device=device) if intermediate else None

    def kv_strides(x: torch.Tensor) -> tuple[int, int]:  # (key, value) strides of a state tensor
        return (x.stride(-1), x.stride(-2)) if state_v_first else (x.stride(-2), x.stride(-1))

    save_strides = (inter.stride(1), inter.stride(2), *kv_strides(inter)) if intermediate else (0, 0, 0, 0)
    x = _inputs(p)
    if N * HV * T:
        recurrent_fwd_kernel[(N * HV * triton.cdiv(V, tile.BV),)](
            x["q"], x["k"], x["v"], x["g"], x["beta"], x["a"], x["b"], x["gv"],
            o, pool, pool, slots, pool.shape[0],
            inter, None, None,
            p.scale, T,
            pool.stride(0), pool.stride(1), *kv_strides(pool),
            *save_strides,
            H=H, HV=HV, K=K, V=V, BK=tile.BK, BV=tile.BV, **_structure(p),
            SAVE=SAVE_EVERY_TOKEN if intermediate else SAVE_NONE, CK=1,
            HAS_H0=True, HAS_HT=True, STORE_O=True, POOL=True, VARLEN=False,
            ACC=_acc(acc), num_warps=tile.num_warps,
        )  # fmt: skip
    return o, inter
