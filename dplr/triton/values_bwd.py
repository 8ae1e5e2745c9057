"""The chunk backward's values stage, one program per (chunk, value head) (and channel slice),
after the state passes have left every chunk's initial state ``S`` and the gradient ``dS'`` of
the state after it (see :mod:`dplr.triton.state`); :mod:`dplr.triton.chunk_bwd` takes the keys.

With ``dO' = scale · dO``, the tied form ``R = beta ⊙ (v - X S)``, ``P = M R``:

* :func:`chunk_grad_values_kernel` (over value blocks): ``dA_qk = dO' Pᵀ``, ``dP = A_qkᵀ dO' + K_end dS'``,
  ``dR = Mᵀ dP``, ``dM = dP Rᵀ``, ``dv = beta ⊙ dR``, ``dbeta = Σ (v - X S) ⊙ dR``,
  ``d exp(G_C) = Σ_v S ⊙ dS'`` (general: ``R = X S + A_ak v``; none: ``P`` is ``v``), leaving ``P``
  and ``-dv`` for
* :func:`chunk_grad_key_sides_kernel` (over channel slices): the decayed key vectors' gradients
  ``dQ_start = dO' Sᵀ``, ``dK_end = P dS'ᵀ``, ``dX = -dv Sᵀ``.

With a value-side decay (``VALUE_DECAY``) the values kernel also recomputes the pseudo-values
with their column factors (:mod:`dplr.triton.state`), takes each column-decayed product back
through :func:`~dplr.triton.columns.column_product_bwd` and writes ``dgv``: ``dgv_t =
Σ_{i>=t} dGV_i + Σ_{i<t} dTo_end_i + exp(GV_C) d exp(GV_C)``, ``dGV`` gathering the reads of the
state (``exp(GV)``) and the products' pair factors; the key-side quantities keep their meaning,
so the keys kernel is the same.

The formulas are those of autograd through the forward's math (checked to 1e-16 in fp64 when
they were derived); the tests compare the kernels with the fp64 reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_bwd import _exclusive_sums
from .columns import column_factors, column_product_bwd
from .intra import _chunk_rows, _dot_t, _load_rows, _mm, _store_rows
from .state import _state_offsets
from .structure import DECAY_NONE, LOWRANK_GENERAL, LOWRANK_NONE, LOWRANK_TIED


@triton.jit
def _chunk_tiles(A_QK, K_END, X_START, M_SOLVE, hv, bos, i, valid, kk, HV, K, C, LOWRANK: tl.constexpr):
    """The chunk's inputs to the values kernel: ``A_qk``, ``K_end`` and, with a low-rank term,
    ``X_start`` and the solve ``M`` (else stand-ins that go unused)."""
    A_qk = _load_rows(A_QK + hv * C, bos, i, valid, HV * C, i, C)
    k_end = _load_rows(K_END + hv * K, bos, i, valid, HV * K, kk, K)
    x_c, m_c = k_end, A_qk
    if LOWRANK != LOWRANK_NONE:
        x_c = _load_rows(X_START + hv * K, bos, i, valid, HV * K, kk, K)
        m_c = _load_rows(M_SOLVE + hv * C, bos, i, valid, HV * C, i, C)
    return A_qk, k_end, x_c, m_c


@triton.jit
def chunk_grad_values_kernel(
    v, beta, do, STATES, DSTATES, X_START, M_SOLVE, A_AK, K_END, B_END, A_QK, A_QB, Q_START, DECAY_END, GV_CUM, U_COL,
    dv, DA_QK, DA_QB, DA_AK, DM, STASH_Q, STASH_K, STASH_X, STASH_B, DBETA, DDECAY, dgv,
    chunk_bos, chunk_len, scale,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    MERGES: tl.constexpr, HOLD: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``dv [BT, HV, V]``; fp32: ``DA_* , DM [BT, HV, C]``, ``DBETA [BT, HV]``, ``DDECAY [NT, HV, K]``,
    and the ``[BT, HV, V]`` factors ``STASH_*`` of :func:`chunk_grad_key_sides_kernel` (those it
    does not read from the inputs); with ``VALUE_DECAY`` also
    ``dgv [BT, HV, V]`` fp32 (``Q_START``, ``DECAY_END``, ``GV_CUM`` and the pseudo-values' part
    ``U_COL`` that the state does not reach, from :func:`~dplr.triton.columns.chunk_columns_kernel`,
    are read only then).

    ``HOLD``: the chunk's ``C x K`` and ``C x C`` inputs are loaded once and held across the
    value blocks, else loaded again in every block (from L2); see ``configs.chunk_backward``."""
    cid, hv, bos, n, i, valid = _chunk_rows(chunk_bos, chunk_len, C)
    kk = tl.arange(0, KP)
    if LOWRANK == LOWRANK_TIED:
        beta_c = tl.load(beta + (bos + i) * HV + hv, mask=valid, other=0.0).to(tl.float32)
    if HOLD:
        held_A_qk, held_k_end, held_x_c, held_m_c = _chunk_tiles(
            A_QK, K_END, X_START, M_SOLVE, hv, bos, i, valid, kk, HV, K, C, LOWRANK
        )

    dA_qk = tl.zeros((C, C), tl.float32)
    dA_qb = tl.zeros((C, C), tl.float32)
    dA_ak = tl.zeros((C, C), tl.float32)
    dM = tl.zeros((C, C), tl.float32)
    dbeta = tl.zeros((C,), tl.float32)
    ddecay = tl.zeros((KP,), tl.float32)
    if VALUE_DECAY:
        dN = tl.zeros((C, C), tl.float32)  # general: the gradient of N = M A_ak
    for v0 in tl.range(0, V, BV):
        vcols = v0 + tl.arange(0, BV)
        state_mask = (kk < K)[:, None] & (vcols < V)[None, :]
        state = _state_offsets(cid, hv, kk, vcols, HV, K, V)
        # The tiles as stored (the states in bf16 for bf16 inputs, see configs.ChunkBackward) meet
        # in _mm on the 16-bit tensor cores; fp32 copies serve the elementwise work.
        S16 = tl.load(STATES + state, mask=state_mask, other=0.0)
        dS16 = tl.load(DSTATES + state, mask=state_mask, other=0.0)
        v16 = _load_rows(v + hv * V, bos, i, valid, HV * V, vcols, V)
        do16 = _load_rows(do + hv * V, bos, i, valid, HV * V, vcols, V)
        S, dS, v_c, do_c = S16.to(tl.float32), dS16.to(tl.float32), v16.to(tl.float32), do16.to(tl.float32) * scale
        if HOLD:
            A_qk, k_end, x_c, m_c = held_A_qk, held_k_end, held_x_c, held_m_c
        else:
            A_qk, k_end, x_c, m_c = _chunk_tiles(
                A_QK, K_END, X_START, M_SOLVE, hv, bos, i, valid, kk, HV, K, C, LOWRANK
            )
        if VALUE_DECAY:
            # P = exp(GV) ⊙ Pw + (N ∘ F) Z (see dplr.triton.state); dG gathers the gradient of the
            # cumulative decays GV, to_end that of the factors exp(GV_C - GV).
            GV = GV_CUM + hv * V
            start_v, end_v, chunk_v, whole, rise = column_factors(GV, bos, n, vcols, HV * V, V, C)
            q_start = _load_rows(Q_START + hv * K, bos, i, valid, HV * K, kk, K)
            dG = do_c * start_v * _mm(q_start, S, PREC)
            kd = _mm(k_end, dS, PREC)
            if LOWRANK == LOWRANK_TIED:
                XS = _mm(x_c, S, PREC)
                Z = beta_c[:, None] * v_c
                Pw = _mm(m_c, -beta_c[:, None] * XS, PREC)
                P = start_v * Pw + _load_rows(U_COL + hv * V, bos, i, valid, HV * V, vcols, V)
                dP, dA, dG_p = column_product_bwd(A_qk, P, do_c, whole, start_v, rise, GV, bos, n, vcols, HV * V, V,
                                                  C, MERGES, PREC, True)  # fmt: skip
                dP += end_v * kd
                to_end = P * end_v * kd
                _store_rows(STASH_K + hv * V, P * end_v, bos, i, valid, HV * V, vcols, V)
            else:
                dv_c, dA, dG_p = column_product_bwd(A_qk, v_c, do_c, whole, start_v, rise, GV, bos, n, vcols, HV * V,
                                                    V, C, MERGES, PREC, True)  # fmt: skip
                dv_c += end_v * kd
                to_end = v_c * end_v * kd
                _store_rows(STASH_K + hv * V, v_c * end_v, bos, i, valid, HV * V, vcols, V)
            dA_qk += dA
            dG += dG_p
            if LOWRANK == LOWRANK_GENERAL:
                A_qb = _load_rows(A_QB + hv * C, bos, i, valid, HV * C, i, C)
                A_ak = _load_rows(A_AK + hv * C, bos, i, valid, HV * C, i, C)
                b_end = _load_rows(B_END + hv * K, bos, i, valid, HV * K, kk, K)
                XS = _mm(x_c, S, PREC)
                Pw = _mm(m_c, XS, PREC)
                N = _mm(m_c, A_ak, PREC)
                P = start_v * Pw + _load_rows(U_COL + hv * V, bos, i, valid, HV * V, vcols, V)
                dP, dA, dG_p = column_product_bwd(A_qb, P, do_c, whole, start_v, rise, GV, bos, n, vcols, HV * V, V,
                                                  C, MERGES, PREC, True)  # fmt: skip
                dA_qb += dA
                dG += dG_p
                bd = _mm(b_end, dS, PREC)
                dP += end_v * bd
                to_end += P * end_v * bd
                _store_rows(STASH_B + hv * V, P * end_v, bos, i, valid, HV * V, vcols, V)
            if LOWRANK != LOWRANK_NONE:
                dG += start_v * dP * Pw
                dPw = start_v * dP
                dXS = _mm(tl.trans(m_c), dPw, PREC)
                if LOWRANK == LOWRANK_TIED:
                    dM += _dot_t(dPw, -beta_c[:, None] * XS, PREC)
                    dbeta -= tl.sum(XS * dXS, axis=1)
                    _store_rows(STASH_X + hv * V, -beta_c[:, None] * dXS, bos, i, valid, HV * V, vcols, V)
                    dZ, dA, dG_p = column_product_bwd(m_c, Z, dP, whole, start_v, rise, GV, bos, n, vcols, HV * V, V,
                                                      C, MERGES, PREC, True)  # fmt: skip
                    dM += dA
                    dv_c = beta_c[:, None] * dZ
                    dbeta += tl.sum(v_c * dZ, axis=1)
                else:
                    dM += _dot_t(dPw, XS, PREC)
                    _store_rows(STASH_X + hv * V, dXS, bos, i, valid, HV * V, vcols, V)
                    dZ, dA, dG_p = column_product_bwd(N, v_c, dP, whole, start_v, rise, GV, bos, n, vcols, HV * V, V,
                                                      C, MERGES, PREC, True)  # fmt: skip
                    dN += dA
                    dv_c += dZ
                dG += dG_p
            # The state's columns decay by exp(GV_C) over the chunk, after its rows by exp(G_C).
            kept = S * dS
            if DECAY != DECAY_NONE:
                kept *= tl.load(DECAY_END + (cid * HV + hv) * K + kk, mask=kk < K, other=0.0)[:, None]
            ptrs = dgv + hv * V + (bos + i)[:, None] * (HV * V) + vcols[None, :]
            later, earlier = _exclusive_sums(ptrs, HV * V, i[:, None], n, (vcols < V)[None, :], dG, to_end)
            dgv_c = dG + later + earlier + (chunk_v * tl.sum(kept, axis=0))[None, :]
            _store_rows(dgv + hv * V, dgv_c, bos, i, valid, HV * V, vcols, V)
            # What the shared tail below reads: the output's and the next chunk's views of S.
            do_c = do_c * start_v
            dS = dS * chunk_v[None, :]
        elif LOWRANK == LOWRANK_TIED:
            Rv = v_c - _mm(x_c, S16, PREC)
            P = _mm(m_c, beta_c[:, None] * Rv, PREC)
            dA_qk += _dot_t(do_c, P, PREC)
            dP = scale * _mm(tl.trans(A_qk), do16, PREC) + _mm(k_end, dS16, PREC)
            dR = _mm(tl.trans(m_c), dP, PREC)
            dM += _dot_t(dP, beta_c[:, None] * Rv, PREC)
            dbeta += tl.sum(Rv * dR, axis=1)
            dv_c = beta_c[:, None] * dR
            _store_rows(STASH_K + hv * V, P, bos, i, valid, HV * V, vcols, V)
            _store_rows(STASH_X + hv * V, -dv_c, bos, i, valid, HV * V, vcols, V)
        elif LOWRANK == LOWRANK_GENERAL:
            A_qb = _load_rows(A_QB + hv * C, bos, i, valid, HV * C, i, C)
            A_ak = _load_rows(A_AK + hv * C, bos, i, valid, HV * C, i, C)
            b_end = _load_rows(B_END + hv * K, bos, i, valid, HV * K, kk, K)
            R = _mm(x_c, S16, PREC) + _mm(A_ak, v16, PREC)
            P = _mm(m_c, R, PREC)
            dA_qk += scale * _dot_t(do16, v16, PREC)
            dA_qb += _dot_t(do_c, P, PREC)
            dP = scale * _mm(tl.trans(A_qb), do16, PREC) + _mm(b_end, dS16, PREC)
            dR = _mm(tl.trans(m_c), dP, PREC)
            dM += _dot_t(dP, R, PREC)
            dA_ak += _dot_t(dR, v_c, PREC)
            dv_c = scale * _mm(tl.trans(A_qk), do16, PREC) + _mm(k_end, dS16, PREC) + _mm(tl.trans(A_ak), dR, PREC)
            _store_rows(STASH_B + hv * V, P, bos, i, valid, HV * V, vcols, V)
            _store_rows(STASH_X + hv * V, dR, bos, i, valid, HV * V, vcols, V)
        else:
            dA_qk += scale * _dot_t(do16, v16, PREC)
            dv_c = scale * _mm(tl.trans(A_qk), do16, PREC) + _mm(k_end, dS16, PREC)
        if VALUE_DECAY:
            _store_rows(STASH_Q + hv * V, do_c, bos, i, valid, HV * V, vcols, V)
        _store_rows(dv + hv * V, dv_c, bos, i, valid, HV * V, vcols, V)
        ddecay += tl.sum(S * dS, axis=1)

    if VALUE_DECAY and LOWRANK == LOWRANK_GENERAL:  # N = M A_ak, strictly lower
        A_ak = _load_rows(A_AK + hv * C, bos, i, valid, HV * C, i, C).to(tl.float32)
        m_c = _load_rows(M_SOLVE + hv * C, bos, i, valid, HV * C, i, C)
        dN = tl.where(i[:, None] > i[None, :], dN, 0.0)
        dM += _dot_t(dN, A_ak, PREC)
        dA_ak += _mm(tl.trans(m_c), dN, PREC)
    _store_rows(DA_QK + hv * C, dA_qk, bos, i, valid, HV * C, i, C)
    tl.store(DDECAY + (cid * HV + hv) * K + kk, ddecay, mask=kk < K)
    if LOWRANK != LOWRANK_NONE:
        _store_rows(DM + hv * C, dM, bos, i, valid, HV * C, i, C)
    if LOWRANK == LOWRANK_TIED:
        tl.store(DBETA + (bos + i) * HV + hv, dbeta, mask=valid)
    if LOWRANK == LOWRANK_GENERAL:
        _store_rows(DA_QB + hv * C, dA_qb, bos, i, valid, HV * C, i, C)
        _store_rows(DA_AK + hv * C, dA_ak, bos, i, valid, HV * C, i, C)


@triton.jit
def chunk_grad_key_sides_kernel(
    v, do, STATES, DSTATES, STASH_Q, STASH_K, STASH_X, STASH_B, DQ_START, DK_END, DX, DB_END,
    chunk_bos, chunk_len, scale,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One (chunk, value head, slice of ``BK`` channels): the decayed key vectors' gradients, each
    a ``[C, V]`` factor left by :func:`chunk_grad_values_kernel` times the chunk's state or its
    gradient, summed over value blocks in registers: ``DQ_START = Lq Sᵀ``, ``DX = Lx Sᵀ``,
    ``DK_END = Lk dS'ᵀ``, ``DB_END = Lb dS'ᵀ`` (fp32 ``[BT, HV, K]``). ``Lq`` is ``scale · dO``
    and, without a low-rank term, ``Lk`` is ``v``, read from the inputs; the others come from
    the ``STASH_*`` buffers (``[BT, HV, V]``, fp32 or bf16: ``configs.ChunkBackward.stash_bf16``).

    A kernel of its own because the values kernel would otherwise carry these ``C x K``
    accumulators across its value blocks beside its own ``C x C`` ones (spilling), or add to
    them in memory once per block."""
    cid, hv, bos, _, i, valid = _chunk_rows(chunk_bos, chunk_len, C)
    kk = tl.program_id(2) * BK + tl.arange(0, BK)
    dq_start = tl.zeros((C, BK), tl.float32)
    dk_end = tl.zeros((C, BK), tl.float32)
    dx = tl.zeros((C, BK), tl.float32)
    db_end = tl.zeros((C, BK), tl.float32)
    for v0 in tl.range(0, V, BV):
        vcols = v0 + tl.arange(0, BV)
        state = _state_offsets(cid, hv, kk, vcols, HV, K, V)
        state_mask = (kk < K)[:, None] & (vcols < V)[None, :]
        S = tl.load(STATES + state, mask=state_mask, other=0.0)  # as stored: see the values kernel
        dS = tl.load(DSTATES + state, mask=state_mask, other=0.0)
        if VALUE_DECAY:
            dq_start += _dot_t(_load_rows(STASH_Q + hv * V, bos, i, valid, HV * V, vcols, V), S, PREC)
        else:
            dq_start += scale * _dot_t(_load_rows(do + hv * V, bos, i, valid, HV * V, vcols, V), S, PREC)
        if VALUE_DECAY or LOWRANK == LOWRANK_TIED:
            left_k = _load_rows(STASH_K + hv * V, bos, i, valid, HV * V, vcols, V)
        else:
            left_k = _load_rows(v + hv * V, bos, i, valid, HV * V, vcols, V)
        dk_end += _dot_t(left_k, dS, PREC)
        if LOWRANK != LOWRANK_NONE:
            dx += _dot_t(_load_rows(STASH_X + hv * V, bos, i, valid, HV * V, vcols, V), S, PREC)
        if LOWRANK == LOWRANK_GENERAL:
            db_end += _dot_t(_load_rows(STASH_B + hv * V, bos, i, valid, HV * V, vcols, V), dS, PREC)
    _store_rows(DQ_START + hv * K, dq_start, bos, i, valid, HV * K, kk, K)
    _store_rows(DK_END + hv * K, dk_end, bos, i, valid, HV * K, kk, K)
    if LOWRANK != LOWRANK_NONE:
        _store_rows(DX + hv * K, dx, bos, i, valid, HV * K, kk, K)
    if LOWRANK == LOWRANK_GENERAL:
        _store_rows(DB_END + hv * K, db_end, bos, i, valid, HV * K, kk, K)
