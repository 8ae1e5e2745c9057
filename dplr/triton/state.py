"""Stages 4-5 on the GPU: the sequential state pass over a sequence's chunks, with each chunk's
output computed from the state it starts with (one program per sequence, value head and block
of value columns; the state ``[K, BV]`` stays in registers, in fp32, for the whole sequence).

Per chunk, with ``X_START, M_SOLVE, K_END, ...`` from :mod:`dplr.triton.intra`:

* the pseudo-values of a rank-one part: tied ``P = M (beta ⊙ (v - X S))`` with ``X = k ⊙ exp(G)``,
  general ``P = M (X S + A_ak v)`` with ``X = a ⊙ exp(G_prev)``;
* ``O = scale · (Q_START S + A_qk (P | v) [+ A_qb P])``;
* ``S ← exp(G_C) ⊙ S + K_ENDᵀ (P | v) [+ B_ENDᵀ P]``.

With a value-side decay (``VALUE_DECAY``; docs/value-decay.md §2 and §5) the state's columns
carry the factors of :mod:`dplr.triton.columns`: ``P = exp(GV) ⊙ (W S) + U`` with
``W S = M (-beta ⊙ X S)`` (tied) or ``M (X S)`` (general), and ``U = (N ∘ F) Z`` made beforehand,
for all chunks in parallel (:func:`~dplr.triton.columns.chunk_columns_kernel`), as is the
output's share that does not read ``S``, ``O_COL``; since ``(A ∘ F)(exp(GV) ⊙ W S) =
exp(GV) ⊙ (A W S)``, ``O = scale · (exp(GV) ⊙ (Q_START S + A W S) + O_COL)`` with ``A = A_qk``
(tied) or ``A_qb`` (general), and no column-decayed product is left on the sequential path;
``S ← exp(G_C) ⊙ S ⊙ exp(GV_C) + K_ENDᵀ (exp(GV_C - GV) ⊙ (P | v)) [+ B_ENDᵀ (...P)]``.

The chunk's loads do not depend on ``S``, so the pipelined loop fetches the next chunk while
this one computes; only the three small products are on the sequential path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import column_factors
from .intra import _load_rows, _store_rows
from .structure import DECAY_NONE, LOWRANK_GENERAL, LOWRANK_NONE, LOWRANK_TIED


@triton.jit
def _mm(x, y, PREC: tl.constexpr):
    """``x @ y`` with the operands in ``x``'s dtype (bf16 inputs: bf16 tensor cores), fp32 sum."""
    return tl.dot(x, y.to(x.dtype), input_precision=PREC)


@triton.jit
def _widen(x, VALUE_DECAY: tl.constexpr, BV: tl.constexpr):
    """A tile that meets the state in :func:`_mm`, widened to fp32 (so its products run on tf32)
    under a value decay or when the state's blocks are narrower than 64 columns. Triton 3.6's
    sm_90 code for the 16-bit products of the state passes reads past the block's shared memory
    on such blocks: compute-sanitizer on an H200 reports "Invalid __shared__ read of size 1024
    bytes" (GLA and KDA with gv, K = V = 128, blocks of 16 and 32), and at K = V = 256 (blocks of
    32) every low-rank family's state pass faulted with an illegal address, at blocks of 16 too,
    while fp32 tiles or blocks of 64 ran clean. At V = 32 (blocks of 32, these tiles widened) the
    tied form ran clean, but the general form's forward still faulted in its one product left
    16-bit, ``A_ak v``; with it widened, the output came out infinite from the next one,
    ``A_qb P``. With both widened (and ``A_qb`` in the backward) the general form passes at V = 32
    in bf16 and fp16, every gradient (benchmarks/results/gpu_state_pass_faults_H200.log).
    The tiles hold 16-bit values, which tf32 represents exactly, so only ``S`` is rounded later
    than before."""
    if VALUE_DECAY or BV < 64:  # a constexpr branch: one return, of either type
        x = x.to(tl.float32)
    return x


@triton.jit
def _state_offsets(row, hv, kk, vcols, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Offsets of the ``[KP, BV]`` tile ``(kk, vcols)`` of state ``(row, hv)`` in ``[.., HV, K, V]``."""
    return ((row * HV + hv) * K + kk[:, None]).to(tl.int64) * V + vcols[None, :]


@triton.jit
def chunk_state_kernel(
    X_START, M_SOLVE, A_AK, Q_START, K_END, B_END, A_QK, A_QB, DECAY_END, GV_CUM, U_COL, O_COL, v, beta, o, h0, ht,
    STATES,
    seq_bos, seq_len, seq_chunk0, scale,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    STORE_O: tl.constexpr, STORE_STATES: tl.constexpr,
    PREC: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """``o [BT, HV, V]``; states ``h0, ht [N, HV, K, V]`` fp32; per-sequence token offset,
    length and first chunk in ``seq_bos, seq_len, seq_chunk0``. For the backward it can store
    every chunk's initial state in ``STATES [NT, HV, K, V]`` (bf16 or fp32, the store rounds)
    and skip the output. With ``VALUE_DECAY`` it reads the column-decayed products ``U_COL``
    (and ``O_COL``) that :func:`~dplr.triton.columns.chunk_columns_kernel` made beforehand."""
    n = tl.program_id(0)
    hv = tl.program_id(1)
    vb = tl.program_id(2)
    bos = tl.load(seq_bos + n).to(tl.int64)
    length = tl.load(seq_len + n)
    chunk0 = tl.load(seq_chunk0 + n)
    i = tl.arange(0, C)
    kk = tl.arange(0, KP)
    vcols = vb * BV + tl.arange(0, BV)
    state_mask = (kk < K)[:, None] & (vcols < V)[None, :]
    state_ptr = _state_offsets(n, hv, kk, vcols, HV, K, V)

    S = tl.zeros((KP, BV), dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + state_ptr, mask=state_mask, other=0.0).to(tl.float32)

    for c in tl.range(0, tl.cdiv(length, C), num_stages=NUM_STAGES):
        row0 = bos + c * C
        valid = c * C + i < length
        if STORE_STATES:  # the chunk's initial state, for the backward
            chunk_state = _state_offsets(chunk0 + c, hv, kk, vcols, HV, K, V)
            tl.store(STATES + chunk_state, S, mask=state_mask)
        q_start = _widen(_load_rows(Q_START + hv * K, row0, i, valid, HV * K, kk, K), VALUE_DECAY, BV)
        k_end = _widen(_load_rows(K_END + hv * K, row0, i, valid, HV * K, kk, K), VALUE_DECAY, BV)
        A_qk = _widen(_load_rows(A_QK + hv * C, row0, i, valid, HV * C, i, C), VALUE_DECAY, BV)
        v_c = _load_rows(v + hv * V, row0, i, valid, HV * V, vcols, V)
        if VALUE_DECAY:
            start_v, end_v, chunk_v, _, _ = column_factors(GV_CUM + hv * V, row0, tl.minimum(length - c * C, C), vcols,
                                                           HV * V, V, C)  # fmt: skip
        if LOWRANK != LOWRANK_NONE:
            x_c = _widen(_load_rows(X_START + hv * K, row0, i, valid, HV * K, kk, K), VALUE_DECAY, BV)
            m_c = _load_rows(M_SOLVE + hv * C, row0, i, valid, HV * C, i, C)
            if LOWRANK == LOWRANK_TIED:
                beta_c = tl.load(beta + (row0 + i) * HV + hv, mask=valid, other=0.0).to(tl.float32)
                if VALUE_DECAY:  # W S = M (-beta ⊙ X S); P = exp(GV) ⊙ W S + U
                    Pw = tl.dot(m_c, -beta_c[:, None] * _mm(x_c, S, PREC), input_precision=PREC)
                else:
                    R = beta_c[:, None] * (v_c.to(tl.float32) - _mm(x_c, S, PREC))
            elif VALUE_DECAY:  # W S = M (X S)
                Pw = tl.dot(m_c, _mm(x_c, S, PREC), input_precision=PREC)
            else:
                a_ak = _widen(_load_rows(A_AK + hv * C, row0, i, valid, HV * C, i, C), VALUE_DECAY, BV)
                R = _mm(x_c, S, PREC) + _mm(a_ak, v_c, PREC)
            if VALUE_DECAY:
                P = start_v * Pw + _load_rows(U_COL + hv * V, row0, i, valid, HV * V, vcols, V)
            else:
                P = tl.dot(m_c, R, input_precision=PREC)  # the solve stays fp32 (tf32 at most)

        if STORE_O:
            out = _mm(q_start, S, PREC)
            if VALUE_DECAY:  # (A ∘ F)(exp(GV) ⊙ W S) = exp(GV) ⊙ (A W S); the rest is O_COL
                if LOWRANK == LOWRANK_TIED:
                    out += _mm(A_qk, Pw, PREC)
                if LOWRANK == LOWRANK_GENERAL:
                    A_qb = _widen(_load_rows(A_QB + hv * C, row0, i, valid, HV * C, i, C), VALUE_DECAY, BV)
                    out += _mm(A_qb, Pw, PREC)
                out = start_v * out + _load_rows(O_COL + hv * V, row0, i, valid, HV * V, vcols, V)
            else:
                if LOWRANK == LOWRANK_TIED:
                    out += _mm(A_qk, P, PREC)
                else:
                    out += _mm(A_qk, v_c, PREC)
                if LOWRANK == LOWRANK_GENERAL:
                    A_qb = _widen(_load_rows(A_QB + hv * C, row0, i, valid, HV * C, i, C), VALUE_DECAY, BV)
                    out += _mm(A_qb, P, PREC)
            _store_rows(o + hv * V, out * scale, row0, i, valid, HV * V, vcols, V)

        if DECAY != DECAY_NONE:
            decay = tl.load(DECAY_END + ((chunk0 + c) * HV + hv) * K + kk, mask=kk < K, other=0.0)
            S = decay[:, None] * S
        if VALUE_DECAY:  # the columns decay over the chunk; what the chunk writes, from each token on
            S = S * chunk_v[None, :]
            if LOWRANK != LOWRANK_NONE:
                P = P * end_v
            if LOWRANK != LOWRANK_TIED:
                v_c = v_c.to(tl.float32) * end_v
        if LOWRANK == LOWRANK_TIED:
            S += _mm(tl.trans(k_end), P, PREC)
        else:
            S += _mm(tl.trans(k_end), v_c, PREC)
        if LOWRANK == LOWRANK_GENERAL:
            b_end = _widen(_load_rows(B_END + hv * K, row0, i, valid, HV * K, kk, K), VALUE_DECAY, BV)
            S += _mm(tl.trans(b_end), P, PREC)

    if STORE_HT:
        tl.store(ht + state_ptr, S, mask=state_mask)


@triton.jit
def chunk_state_bwd_kernel(
    X_START, M_SOLVE, Q_START, K_END, B_END, A_QK, A_QB, DECAY_END, GV_CUM, D_COL, beta, do, dht, dh0, DSTATES,
    seq_bos, seq_len, seq_chunk0, scale,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, VALUE_DECAY: tl.constexpr, USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PREC: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """The state pass backwards: ``dS`` is the gradient of the state after the chunk; per chunk
    (last first) it is stored in ``DSTATES [NT, HV, K, V]`` and carried to the chunk's start:

    * tied: ``dP = A_qkᵀ dO' + K_END dS``, ``dR = beta ⊙ (Mᵀ dP)``, ``dS ← exp(G_C) ⊙ dS + Q_STARTᵀ dO' - Xᵀ dR``;
    * general: ``dP = A_qbᵀ dO' + B_END dS``, ``dS ← exp(G_C) ⊙ dS + Q_STARTᵀ dO' + Xᵀ (Mᵀ dP)``;
    * none: ``dS ← exp(G_C) ⊙ dS + Q_STARTᵀ dO'``,

    with ``dO' = scale · dO``; ``dh0`` is the gradient of the initial state. With a value-side
    decay ``A_qkᵀ dO'`` and ``A_qbᵀ dO'`` are the column-decayed products ``(A ∘ F)ᵀ dO'``, read
    from ``D_COL`` (made for all chunks in parallel beforehand), the
    state's rows reach ``dP`` through ``exp(GV_C - GV)``, every read of ``S`` carries ``exp(GV)``
    (``dO'`` and ``dP`` are scaled by it before they meet ``Q_START`` and ``M``) and
    ``dS ← exp(G_C) ⊙ dS ⊙ exp(GV_C) + ...``."""
    n = tl.program_id(0)
    hv = tl.program_id(1)
    vb = tl.program_id(2)
    bos = tl.load(seq_bos + n).to(tl.int64)
    length = tl.load(seq_len + n)
    chunk0 = tl.load(seq_chunk0 + n)
    i = tl.arange(0, C)
    kk = tl.arange(0, KP)
    vcols = vb * BV + tl.arange(0, BV)
    state_mask = (kk < K)[:, None] & (vcols < V)[None, :]
    state_ptr = _state_offsets(n, hv, kk, vcols, HV, K, V)

    dS = tl.zeros((KP, BV), dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + state_ptr, mask=state_mask, other=0.0).to(tl.float32)
    chunks = tl.cdiv(length, C)
    for back in tl.range(0, chunks, num_stages=NUM_STAGES):
        c = chunks - 1 - back
        row0 = bos + c * C
        valid = c * C + i < length
        chunk_state = _state_offsets(chunk0 + c, hv, kk, vcols, HV, K, V)
        tl.store(DSTATES + chunk_state, dS, mask=state_mask)
        do_c = (_load_rows(do + hv * V, row0, i, valid, HV * V, vcols, V).to(tl.float32) * scale).to(
            do.dtype.element_ty
        )
        q_start = _widen(_load_rows(Q_START + hv * K, row0, i, valid, HV * K, kk, K), VALUE_DECAY, BV)
        if VALUE_DECAY:
            start_v, end_v, chunk_v, _, _ = column_factors(GV_CUM + hv * V, row0, tl.minimum(length - c * C, C), vcols,
                                                           HV * V, V, C)  # fmt: skip
            carry = _mm(tl.trans(q_start), do_c.to(tl.float32) * start_v, PREC)
        else:
            carry = _mm(tl.trans(q_start), do_c, PREC)
        if LOWRANK != LOWRANK_NONE:
            x_c = _widen(_load_rows(X_START + hv * K, row0, i, valid, HV * K, kk, K), VALUE_DECAY, BV)
            m_c = _load_rows(M_SOLVE + hv * C, row0, i, valid, HV * C, i, C)
            WRITE = K_END if LOWRANK == LOWRANK_TIED else B_END
            write = _widen(_load_rows(WRITE + hv * K, row0, i, valid, HV * K, kk, K), VALUE_DECAY, BV)
            if VALUE_DECAY:  # (A ∘ F)ᵀ dO', made beforehand (dplr.triton.columns.chunk_columns_bwd_kernel)
                dP = _load_rows(D_COL + hv * V, row0, i, valid, HV * V, vcols, V)
                dP = start_v * (dP + end_v * _mm(write, dS, PREC))
            else:
                A_READ = A_QK if LOWRANK == LOWRANK_TIED else A_QB
                A_read = _load_rows(A_READ + hv * C, row0, i, valid, HV * C, i, C)
                if LOWRANK == LOWRANK_GENERAL:  # see _widen: checked unwidened for the tied form only
                    A_read = _widen(A_read, VALUE_DECAY, BV)
                dP = _mm(tl.trans(A_read), do_c, PREC) + _mm(write, dS, PREC)
            if LOWRANK == LOWRANK_TIED:
                beta_c = tl.load(beta + (row0 + i) * HV + hv, mask=valid, other=0.0).to(tl.float32)
                dR = beta_c[:, None] * tl.dot(tl.trans(m_c), dP, input_precision=PREC)
                carry -= _mm(tl.trans(x_c), dR, PREC)
            else:
                carry += _mm(tl.trans(x_c), tl.dot(tl.trans(m_c), dP, input_precision=PREC), PREC)
        if DECAY != DECAY_NONE:
            decay = tl.load(DECAY_END + ((chunk0 + c) * HV + hv) * K + kk, mask=kk < K, other=0.0)
            dS = decay[:, None] * dS
        if VALUE_DECAY:
            dS = dS * chunk_v[None, :]
        dS += carry

    if STORE_DH0:
        tl.store(dh0 + state_ptr, dS, mask=state_mask)
