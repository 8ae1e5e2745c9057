"""The recurrent backward kernel: a reverse pass over the tokens with the state recomputed.

The backward of token ``t`` needs the state before it (``P = S_{t-1}``) together with the
gradient ``dS_t`` that flows back from later tokens. The transition need not be invertible
(the delta rule with ``beta = 1`` projects), so ``P`` is never recovered by running the
recurrence backwards. Instead the forward keeps a checkpoint of the state every ``CK``
tokens; the backward walks the segments last to first, recomputes a segment's ``CK`` states
from its checkpoint into a private scratch tile (``dq = scale · S_t do_t`` falls out of this
pass), then runs the segment's tokens in reverse. Memory: one checkpoint per ``CK`` tokens and
one scratch of ``CK`` tiles per program, never a state per token.

Per token, with ``D = Diag(exp(g))`` and ``dS`` the gradient of ``S_t`` (the output term
``scale q doᵀ`` added first):

* none:    ``S = D P + k vᵀ``;  ``dk = dS v``, ``dv = dSᵀ k``, ``dP = D dS``;
* general: ``S = D P + b xᵀ + k vᵀ``, ``x = Pᵀ a``;  also ``db = dS x``, ``dx = dSᵀ b``,
  ``da = P dx``, ``dP = D dS + a dxᵀ``;
* tied:    ``S = D P + k v'ᵀ``, ``v' = beta (v − (D P)ᵀ k)``;  ``dv' = dSᵀ k``,
  ``dk = dS v' − beta (D P) dv'``, ``dv = beta dv'``, ``dbeta = dv'·(v − (D P)ᵀ k)``,
  ``d(D P) = dS − beta k dv'ᵀ``, ``dP = D d(D P)``;

and ``dg = Σ_v d(D P) ⊙ D P`` (per key row for a channel decay, over the tile for a scalar).
With a value decay (``VALUE_DECAY``, ``Γ = Diag(exp(gv))``) the carried state is
``C = (D P + b xᵀ) Γ`` in place of ``D P + b xᵀ`` (the tied read uses ``C`` too); then
``dgv = Σ_k dC ⊙ C`` per column and the gradient entering the key-side rules above is
``dC Γ``. Only factors ``exp(gv) <= 1`` appear (``C`` is recomputed forwards, never divided), so
``gv = -60`` per step is as safe as ``g``. ``dgv``, like ``dv``, belongs to one program's columns.
Gradients that sum over value columns (``dq, dk, dg, dbeta, da, db``) are partial per block
of ``BV`` columns: ``ATOMIC`` adds them into one buffer, otherwise each block (and each value
head of a key-head group) writes its own slice and the caller sums them, bit-reproducibly.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .recurrent_fwd import CHANNEL, GENERAL, SCALAR, TIED, carry, decay_rows, load_token, step


@triton.jit
def accumulate(ptr, val, mask, ATOMIC: tl.constexpr):
    """Add a partial gradient: atomically into a shared buffer, or store it in its own slice."""
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, val, mask=mask)


@triton.jit(do_not_specialize=["T", "NT"])
def recurrent_bwd_kernel(
    q, k, v, g, beta, a, b, gv,
    ckpt, ckpt_offsets, cu_seqlens,
    do, dht, scratch,
    dq, dk, dv, dg, dbeta, da, db, dgv, dh0,
    scale: tl.float64, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr, CK: tl.constexpr,
    ATOMIC: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Grid ``(N * HV, cdiv(V, BV))``. ``ckpt [E, HV, K, V]`` holds the state before every
    ``CK``-th token of each sequence (sequence ``n`` from entry ``ckpt_offsets[n]``);
    ``do, dv, dgv [B, T, HV, V]``, ``dht, dh0 [N, HV, K, V]``; partial buffers
    ``dq, dk, da, db [R, NT, H, K]``, ``dg [R', NT, HV(, K)]``, ``dbeta [R', NT, HV]``
    (``NT = B·T``; ``R = R' = 1`` when ``ATOMIC``, else ``R = NV·HV/H`` and ``R' = NV``)."""
    i_nh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    NV: tl.constexpr = (V + BV - 1) // BV
    G: tl.constexpr = HV // H
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h, i_g = i_hv // G, i_hv % G
    scale = tl.full((), scale, ACC)  # fp64 in, as in the forward kernel
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        first = tl.load(ckpt_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
        first = i_n * tl.cdiv(T, CK)
    if ATOMIC:
        r_key = 0
        r_val = 0
    else:
        r_key = i_v * G + i_g
        r_val = i_v

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    p_kv = i_hv * K * V + o_k[:, None] * V + o_v[None, :]
    p_scr = scratch + (i_nh * NV + i_v) * CK * BK * BV + o_k[:, None] * BV + tl.arange(0, BV)[None, :]

    dh = tl.load(dht + i_n * HV * K * V + p_kv, mask=mask_h, other=0).to(ACC)
    nseg = tl.cdiv(eos - bos, CK)
    for r in range(0, nseg):
        seg = nseg - 1 - r
        t0 = bos + seg * CK
        t1 = tl.minimum(t0 + CK, eos)
        # Recompute the segment's states from its checkpoint, keeping each token's input state.
        h = tl.load(ckpt + (first + seg) * HV * K * V + p_kv, mask=mask_h, other=0).to(ACC)
        for t in range(t0, t1):
            tl.store(p_scr + (t - t0) * BK * BV, h)
            _, b_k, b_v, b_e, b_beta, b_a, b_b, b_ev = load_token(
                q, k, v, g, beta, a, b, gv, t, i_h, i_hv, o_k, o_v, mask_k, mask_v,
                H, HV, K, V, DECAY, LOWRANK, VALUE_DECAY, ACC,
            )  # fmt: skip
            h = step(h, b_k, b_v, b_e, b_beta, b_a, b_b, b_ev, DECAY, LOWRANK, VALUE_DECAY)
            b_do = tl.load(do + (t * HV + i_hv) * V + o_v, mask=mask_v, other=0).to(ACC)
            b_dq = tl.sum(h * b_do[None, :], 1) * scale
            accumulate(dq + ((r_key * NT + t) * H + i_h) * K + o_k, b_dq, mask_k, ATOMIC)
        tl.debug_barrier()  # the scratch tiles are read back below, possibly by other threads

        for j in range(0, t1 - t0):
            t = t1 - 1 - j
            h = tl.load(p_scr + (t - t0) * BK * BV)  # P = S_{t-1}
            b_q, b_k, b_v, b_e, b_beta, b_a, b_b, b_ev = load_token(
                q, k, v, g, beta, a, b, gv, t, i_h, i_hv, o_k, o_v, mask_k, mask_v,
                H, HV, K, V, DECAY, LOWRANK, VALUE_DECAY, ACC,
            )  # fmt: skip
            b_do = tl.load(do + (t * HV + i_hv) * V + o_v, mask=mask_v, other=0).to(ACC)
            dh += scale * b_q[:, None] * b_do[None, :]
            key_row = ((r_key * NT + t) * H + i_h) * K + o_k
            hd = decay_rows(h, b_e, DECAY)
            hc = hd  # C, the carried state (the tied read uses it): D P without a value decay
            if VALUE_DECAY:
                hc = carry(h, b_e, b_a, b_b, b_ev, DECAY, LOWRANK, VALUE_DECAY)
            if LOWRANK == TIED:
                b_u = b_v - tl.sum(b_k[:, None] * hc, 0)
                b_dvn = tl.sum(dh * b_k[:, None], 0)
                b_dk = tl.sum(dh * (b_beta * b_u)[None, :], 1) - b_beta * tl.sum(hc * b_dvn[None, :], 1)
                b_dv = b_beta * b_dvn
                accumulate(dbeta + (r_val * NT + t) * HV + i_hv, tl.sum(b_dvn * b_u, 0), None, ATOMIC)
                dh = dh - b_beta * b_k[:, None] * b_dvn[None, :]
            else:
                b_dk = tl.sum(dh * b_v[None, :], 1)
                b_dv = tl.sum(dh * b_k[:, None], 0)
            if VALUE_DECAY:  # dh is dC here; the key-side rules below take dC Γ
                tl.store(dgv + (t * HV + i_hv) * V + o_v, tl.sum(dh * hc, 0).to(dgv.dtype.element_ty), mask=mask_v)
                dh = dh * b_ev[None, :]
            if LOWRANK == GENERAL:
                b_x = tl.sum(b_a[:, None] * h, 0)
                b_dx = tl.sum(dh * b_b[:, None], 0)
                accumulate(db + key_row, tl.sum(dh * b_x[None, :], 1), mask_k, ATOMIC)
                accumulate(da + key_row, tl.sum(h * b_dx[None, :], 1), mask_k, ATOMIC)
            accumulate(dk + key_row, b_dk, mask_k, ATOMIC)
            tl.store(dv + (t * HV + i_hv) * V + o_v, b_dv.to(dv.dtype.element_ty), mask=mask_v)
            if DECAY == CHANNEL:
                accumulate(dg + ((r_val * NT + t) * HV + i_hv) * K + o_k, tl.sum(dh * hd, 1), mask_k, ATOMIC)
            elif DECAY == SCALAR:
                accumulate(dg + (r_val * NT + t) * HV + i_hv, tl.sum(tl.sum(dh * hd, 1), 0), None, ATOMIC)
            dh = decay_rows(dh, b_e, DECAY)
            if LOWRANK == GENERAL:
                dh = dh + b_a[:, None] * b_dx[None, :]
        tl.debug_barrier()  # the next segment overwrites the scratch tiles read above
    tl.store(dh0 + i_n * HV * K * V + p_kv, dh.to(dh0.dtype.element_ty), mask=mask_h)
