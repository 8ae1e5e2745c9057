"""The recurrent forward kernel: one token at a time on a ``[K, BV]`` tile of the state.

One program owns one value head of one sequence and a block of ``BV`` value columns. The
columns of ``S`` evolve independently for every structure (each update is a linear map
acting on the key side, applied column by column, and a value decay ``gv`` scales each column
by its own factor), so splitting ``V`` across programs is exact and needs no communication.
The state stays in registers, in fp32 (fp64 for fp64 inputs), for the whole sequence.

The same kernel serves three callers (see :mod:`dplr.triton.recurrent`):

* ``fused_recurrent_*`` forward: state from ``h0[n]``, final state to ``ht[n]``;
* the backward's checkpoint pass (``SAVE == SAVE_CHECKPOINTS``): the state *before* every
  ``CK``-th token of a sequence, so the backward can restart from it;
* the serving decode step (``POOL``): the state is read from and written back to a pool slot
  ``slots[n]`` (``-1`` or out of range: nothing read or written), optionally keeping the state
  *after* every token (``SAVE == SAVE_EVERY_TOKEN``, for speculative roll-back).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .structure import DECAY_CHANNEL, DECAY_SCALAR, LOWRANK_GENERAL, LOWRANK_TIED

SAVE_NONE, SAVE_CHECKPOINTS, SAVE_EVERY_TOKEN = 0, 1, 2  # the kernel's SAVE argument

# Kernels may read module globals only when they are tl.constexpr objects (Triton rejects
# plain ints at compile time; the interpreter does not), hence these twins of the values above.
CHANNEL, SCALAR = tl.constexpr(DECAY_CHANNEL), tl.constexpr(DECAY_SCALAR)
TIED, GENERAL = tl.constexpr(LOWRANK_TIED), tl.constexpr(LOWRANK_GENERAL)
CHECKPOINTS, EVERY_TOKEN = tl.constexpr(SAVE_CHECKPOINTS), tl.constexpr(SAVE_EVERY_TOKEN)


@triton.jit
def load_token(
    q, k, v, g, beta, a, b, gv, t, i_h, i_hv,
    o_k, o_v, mask_k, mask_v,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Token ``t``'s inputs for value head ``i_hv`` (key head ``i_h``) in the compute dtype, from
    contiguous ``[B·T, H, K]`` (q, k, a, b), ``[B·T, HV, V]`` (v, gv), ``[B·T, HV, K]`` or
    ``[B·T, HV]`` (g) and ``[B·T, HV]`` (beta) tensors. Absent inputs come back as 0 (never read
    by the structure that lacks them); the decays come back as their factors ``exp(g)`` and
    ``exp(gv)`` (each in ``[0, 1]``: a step of -60 is ``8.8e-27``, a normal fp32 number)."""
    row_k = (t * H + i_h) * K
    row_s = t * HV + i_hv
    b_q = tl.load(q + row_k + o_k, mask=mask_k, other=0).to(ACC)
    b_k = tl.load(k + row_k + o_k, mask=mask_k, other=0).to(ACC)
    b_v = tl.load(v + row_s * V + o_v, mask=mask_v, other=0).to(ACC)
    if DECAY == CHANNEL:
        b_e = tl.exp(tl.load(g + row_s * K + o_k, mask=mask_k, other=0).to(ACC))
    elif DECAY == SCALAR:
        b_e = tl.exp(tl.load(g + row_s).to(ACC))
    else:
        b_e = 1.0
    if LOWRANK == TIED:
        b_beta = tl.load(beta + row_s).to(ACC)
    else:
        b_beta = 0.0
    if LOWRANK == GENERAL:
        b_a = tl.load(a + row_k + o_k, mask=mask_k, other=0).to(ACC)
        b_b = tl.load(b + row_k + o_k, mask=mask_k, other=0).to(ACC)
    else:
        b_a = 0.0
        b_b = 0.0
    if VALUE_DECAY:
        b_ev = tl.exp(tl.load(gv + row_s * V + o_v, mask=mask_v, other=0).to(ACC))
    else:
        b_ev = 1.0
    return b_q, b_k, b_v, b_e, b_beta, b_a, b_b, b_ev


@triton.jit
def decay_rows(h, b_e, DECAY: tl.constexpr):
    """``Diag(exp(g)) h`` on a ``[BK, BV]`` tile (a scalar decay scales the whole tile)."""
    if DECAY == CHANNEL:
        h = h * b_e[:, None]
    elif DECAY == SCALAR:
        h = h * b_e
    return h


@triton.jit
def carry(h, b_e, b_a, b_b, b_ev, DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr):
    """What the state carries into a token on a ``[BK, BV]`` tile, before its input term:
    ``(D + b aᵀ) h Diag(exp(gv))`` (the rank-one part of a tied transition is the delta step,
    applied by :func:`step` to this)."""
    if LOWRANK == GENERAL:
        b_x = tl.sum(b_a[:, None] * h, 0)  # aᵀ S reads the undecayed state
    h = decay_rows(h, b_e, DECAY)
    if LOWRANK == GENERAL:
        h = h + b_b[:, None] * b_x[None, :]
    if VALUE_DECAY:
        h = h * b_ev[None, :]  # the columns decay after the key-side transition, rank-one part included
    return h


@triton.jit
def step(
    h, b_k, b_v, b_e, b_beta, b_a, b_b, b_ev,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr,
):  # fmt: skip
    """One token of DESIGN §2 (with docs/value-decay.md §1) on a ``[BK, BV]`` tile: the state after the token."""
    h = carry(h, b_e, b_a, b_b, b_ev, DECAY, LOWRANK, VALUE_DECAY)
    if LOWRANK == TIED:
        b_v = b_beta * (b_v - tl.sum(b_k[:, None] * h, 0))  # the delta rule's corrected value
    return h + b_k[:, None] * b_v[None, :]


@triton.jit(do_not_specialize=["T", "num_slots"])
def recurrent_fwd_kernel(
    q, k, v, g, beta, a, b, gv,
    o,
    h0, ht, slots, num_slots,
    save, save_offsets,
    cu_seqlens,
    scale: tl.float64, T,
    s_n, s_h: tl.constexpr, s_k: tl.constexpr, s_v: tl.constexpr,
    e_n, e_h: tl.constexpr, e_k: tl.constexpr, e_v: tl.constexpr,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr,
    SAVE: tl.constexpr, CK: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_HT: tl.constexpr, STORE_O: tl.constexpr,
    POOL: tl.constexpr, VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Grid ``(N * HV * cdiv(V, BV),)``, the value block fastest. Inputs ``[B, T, ·, ·]``
    contiguous; ``o [B, T, HV, V]``; the state ``h0``/``ht`` at
    ``index * s_n + head * s_h + key * s_k + value * s_v`` (``index`` the sequence, or its pool
    slot); the ``save`` buffer likewise with ``e_*`` strides.

    The strides within a slot (``s_h, s_k, s_v`` and ``e_h, e_k, e_v``) are compile-time
    constants: a state layout is fixed for a model, and constant strides turn the tile's offsets
    into a pattern known to the compiler, folded into the load and store instructions, instead
    of 64-bit products per element held in registers. Only the slot strides stay run-time."""
    # The value blocks of one head are neighbouring programs (as in fla-core's decode kernel), so
    # the blocks of a state row that run side by side touch neighbouring memory. Measured on an
    # H200 (decode, N = 256, KDA and GDN): the same time as the (N * HV, NV) grid before it.
    pid = tl.program_id(0).to(tl.int64)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_nh, i_v = pid // NV, pid % NV
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    # ``scale`` arrives as fp64 (an fp32 argument would round K^-1/2 by up to 6e-8, visible
    # against an fp64 reference) and is rounded to the compute dtype here.
    scale = tl.full((), scale, ACC)
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    if POOL:
        slot = tl.load(slots + i_n).to(tl.int64)
        valid = (slot >= 0) & (slot < num_slots)  # padding and out-of-range slots: no access at all
        mask_s = mask_h & valid
        index = tl.where(valid, slot, 0)
    else:
        mask_s = mask_h
        index = i_n
    p_state = index * s_n + i_hv * s_h + o_k[:, None] * s_k + o_v[None, :] * s_v
    if HAS_H0:
        h = tl.load(h0 + p_state, mask=mask_s, other=0).to(ACC)
    else:
        h = tl.zeros([BK, BV], dtype=ACC)

    p_save = i_hv * e_h + o_k[:, None] * e_k + o_v[None, :] * e_v
    if SAVE == CHECKPOINTS:
        if VARLEN:
            first = tl.load(save_offsets + i_n).to(tl.int64)
        else:
            first = i_n * tl.cdiv(T, CK)
    for t in range(bos, eos):
        if SAVE == CHECKPOINTS:  # noqa: SIM102 (a compile-time branch around a run-time one)
            if (t - bos) % CK == 0:
                tl.store(save + (first + (t - bos) // CK) * e_n + p_save, h.to(save.dtype.element_ty), mask=mask_h)
        b_q, b_k, b_v, b_e, b_beta, b_a, b_b, b_ev = load_token(
            q, k, v, g, beta, a, b, gv, t, i_h, i_hv, o_k, o_v, mask_k, mask_v,
            H, HV, K, V, DECAY, LOWRANK, VALUE_DECAY, ACC,
        )  # fmt: skip
        h = step(h, b_k, b_v, b_e, b_beta, b_a, b_b, b_ev, DECAY, LOWRANK, VALUE_DECAY)
        if STORE_O:
            b_o = tl.sum(h * b_q[:, None], 0) * scale
            if POOL:
                b_o = tl.where(valid, b_o, 0.0)  # a padding row's output is defined: zeros
            tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)
        if SAVE == EVERY_TOKEN:
            kept = h
            if POOL:
                kept = tl.where(valid, h, 0.0)
            tl.store(save + t * e_n + p_save, kept.to(save.dtype.element_ty), mask=mask_h)
    if HAS_HT:
        tl.store(ht + p_state, h.to(ht.dtype.element_ty), mask=mask_s)
