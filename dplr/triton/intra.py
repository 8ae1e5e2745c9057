"""Stages 1-3 on the GPU, one program per (chunk, value head): the chunk's cumulative decays,
its intra-chunk matrices, the triangular solve and the pseudo-value factors ``W, U``.

The math is that of :mod:`dplr.torch_chunk` (see its stage files):

* ``A_xy[i, j] = Σ_d x_id y_jd exp(Gx_id - G_jd)``. With a decay per channel the chunk is cut
  into sub-blocks of ``L`` tokens. Inside a block both sides are taken against the block's
  middle ``m_p``: factors of at most ``exp(HALF_LIMIT)``, so one tensor-core product serves all
  diagonal blocks. Blocks merge pairwise level by level at ``c``, the decay at the end of the
  upper half: ``exp(Gx_i - c) · exp(c - G_j)``, both ``<= 1``. A slice of channels whose
  blocks decay faster than ``HALF_LIMIT`` per half takes the exact element-wise product.
* tied: ``M = (I + diag(beta) A_kk)⁻¹``, ``W = -M (beta ⊙ k ⊙ exp(G))``, ``U = M (beta ⊙ v)``;
  general: ``M = (I - A_ab)⁻¹``, ``W = M (a ⊙ exp(G_prev))``, ``U = M (A_ak v)``; then the
  pseudo-values are ``P = U + W S`` for the chunk's initial state ``S``.
* the inverse: the diagonal blocks by forward substitution (row by row, exact), then
  ``M ← M - M (N ⊙ off) M`` doubling the block size up to ``C``.

Channels are processed in slices of ``BK`` (any ``K`` up to 256, no unrolled blocks).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..torch_chunk.intra import HALF_LIMIT
from .structure import DECAY_CHANNEL, DECAY_NONE, DECAY_SCALAR, LOWRANK_GENERAL, LOWRANK_NONE, LOWRANK_TIED

LIMIT = tl.constexpr(HALF_LIMIT)


@triton.jit
def _rows_of(v, NB: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """Per-block values ``[NB, BK]`` repeated on each of the block's ``L`` rows → ``[NB·L, BK]``."""
    return tl.reshape(tl.broadcast_to(v[:, None, :], (NB, L, BK)), (NB * L, BK))


@triton.jit
def _at_row(G, r: tl.constexpr, NB: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """Row ``r`` of every block of ``G [NB·L, BK]`` → ``[NB, BK]``."""
    rows = tl.arange(0, L)
    return tl.sum(tl.where((rows == r)[None, :, None], tl.reshape(G, (NB, L, BK)), 0.0), axis=1)


@triton.jit
def _pick_blocks(e, src, NB: tl.constexpr):
    """``out[p] = e[src[p]]`` for ``e [NB, BK]``; ``src < 0`` gives 0."""
    blocks = tl.arange(0, NB)
    return tl.sum(tl.where((blocks[None, :] == src[:, None])[:, :, None], e[None, :, :], 0.0), axis=1)


@triton.jit
def _dot_t(x, y, PREC: tl.constexpr):
    """``x yᵀ`` for ``[C, BK]`` tiles, accumulated in fp32."""
    return tl.dot(x, tl.trans(y), input_precision=PREC)


@triton.jit
def _load_rows(ptr, row0, rows, valid, stride, cols, ncols):
    """A ``[len(rows), len(cols)]`` tile of a token-major tensor, zero outside the chunk/width."""
    mask = valid[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + (row0 + rows)[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, row0, rows, valid, stride, cols, ncols):
    mask = valid[:, None] & (cols < ncols)[None, :]
    tl.store(
        ptr + (row0 + rows)[:, None].to(tl.int64) * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _channel_slice(
    q, k, a, b, g, A_qk, A_kk, A_ab, A_ak, A_qb,
    C: tl.constexpr, L: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr, BK: tl.constexpr,
    LOWRANK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Add one channel slice's share of the intra-chunk matrices (channel decay);
    ``NB = C / L`` blocks, ``LEVELS = log2(NB)`` merges."""
    i = tl.arange(0, C)
    G = tl.cumsum(g, axis=0)
    Gp = G - g  # G_{i-1}: the rank-one rows read the state before this token's decay
    e = _at_row(G, L - 1, NB, L, BK)  # decay at each block's end             [NB, BK]
    s = _pick_blocks(e, tl.arange(0, NB) - 1, NB)  # ... and just before it (0 for block 0)
    m = _at_row(G, L // 2 - 1, NB, L, BK)  # the reference point inside the block
    unsafe = tl.max(tl.maximum(s - m, m - e)) > LIMIT
    same_block = (i[:, None] // L) == (i[None, :] // L)
    incl = same_block & (i[:, None] >= i[None, :])
    strict = same_block & (i[:, None] > i[None, :])

    if unsafe:
        # Exact, column by column: exp(Gx_i - G_j) with j <= i inside one block is <= 1.
        for j in range(C):
            at_j = (i == j)[:, None]
            col = (i == j)[None, :]
            kj = tl.sum(tl.where(at_j, k, 0.0), axis=0)
            Gj = tl.sum(tl.where(at_j, G, 0.0), axis=0)
            live = (i // L) == (j // L)
            ex = tl.exp(tl.where((live & (i >= j))[:, None], G - Gj[None, :], float("-inf")))
            A_qk = tl.where(col, A_qk + tl.sum(q * kj[None, :] * ex, axis=1)[:, None], A_qk)
            if LOWRANK == LOWRANK_TIED:
                ex_s = tl.where((i > j)[:, None], ex, 0.0)
                A_kk = tl.where(col, A_kk + tl.sum(k * kj[None, :] * ex_s, axis=1)[:, None], A_kk)
            if LOWRANK == LOWRANK_GENERAL:
                bj = tl.sum(tl.where(at_j, b, 0.0), axis=0)
                ex_p = tl.exp(tl.where((live & (i > j))[:, None], Gp - Gj[None, :], float("-inf")))
                A_ab = tl.where(col, A_ab + tl.sum(a * bj[None, :] * ex_p, axis=1)[:, None], A_ab)
                A_ak = tl.where(col, A_ak + tl.sum(a * kj[None, :] * ex_p, axis=1)[:, None], A_ak)
                A_qb = tl.where(col, A_qb + tl.sum(q * bj[None, :] * ex, axis=1)[:, None], A_qb)
    else:
        M_row = _rows_of(m, NB, L, BK)
        # Clamped so that the unused upper triangle stays finite; inside the kept lower
        # triangle the exponents are within ±LIMIT already.
        x_mid = tl.exp(tl.minimum(G - M_row, LIMIT))
        y_mid = tl.exp(tl.minimum(M_row - G, LIMIT))
        k_col = k * y_mid
        A_qk += tl.where(incl, _dot_t(q * x_mid, k_col, PREC), 0.0)
        if LOWRANK == LOWRANK_TIED:
            A_kk += tl.where(strict, _dot_t(k * x_mid, k_col, PREC), 0.0)
        if LOWRANK == LOWRANK_GENERAL:
            a_row = a * tl.exp(tl.minimum(Gp - M_row, LIMIT))
            b_col = b * y_mid
            A_ab += tl.where(strict, _dot_t(a_row, b_col, PREC), 0.0)
            A_ak += tl.where(strict, _dot_t(a_row, k_col, PREC), 0.0)
            A_qb += tl.where(incl, _dot_t(q * x_mid, b_col, PREC), 0.0)

    # Between blocks: merge pairs level by level; the lower half's rows meet the upper half's
    # columns at c, the decay at the upper half's end.
    for level in tl.static_range(LEVELS):
        half = C >> (level + 1)
        per_half = half // L
        p = tl.arange(0, NB)
        c = _rows_of(_pick_blocks(e, (p // (2 * per_half)) * (2 * per_half) + per_half - 1, NB), NB, L, BK)
        lower = ((i % (2 * half)) >= half)[:, None]
        x_f = tl.exp(tl.where(lower, G - c, float("-inf")))
        y_f = tl.exp(tl.where(lower, float("-inf"), c - G))
        meet = ((i[:, None] // (2 * half)) == (i[None, :] // (2 * half))) & ((i[:, None] % (2 * half)) >= half)
        meet = meet & ((i[None, :] % (2 * half)) < half)
        k_col = k * y_f
        A_qk += tl.where(meet, _dot_t(q * x_f, k_col, PREC), 0.0)
        if LOWRANK == LOWRANK_TIED:
            A_kk += tl.where(meet, _dot_t(k * x_f, k_col, PREC), 0.0)
        if LOWRANK == LOWRANK_GENERAL:
            a_row = a * tl.exp(tl.where(lower, Gp - c, float("-inf")))
            b_col = b * y_f
            A_ab += tl.where(meet, _dot_t(a_row, b_col, PREC), 0.0)
            A_ak += tl.where(meet, _dot_t(a_row, k_col, PREC), 0.0)
            A_qb += tl.where(meet, _dot_t(q * x_f, b_col, PREC), 0.0)
    return A_qk, A_kk, A_ab, A_ak, A_qb


@triton.jit
def _unit_lower_inverse(
    N, C: tl.constexpr, L: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr, PREC: tl.constexpr
):
    """``(I + N)⁻¹`` for a strictly lower ``N [C, C]`` (fp32): forward substitution inside the
    ``L``-blocks (exact, all blocks at once), then ``M ← M - M (N ⊙ off) M`` per level."""
    i = tl.arange(0, C)
    r = tl.arange(0, L)
    blk = tl.arange(0, NB)
    same_block = (i[:, None] // L) == (i[None, :] // L)
    # Each row's own diagonal block: [C, L] → [NB, L, L].
    own = tl.sum(tl.where(blk[None, :, None] == (i // L)[:, None, None], tl.reshape(N, (C, NB, L)), 0.0), axis=1)
    Nb = tl.reshape(own, (NB, L, L))
    Mb = tl.where((r[:, None] == r[None, :])[None, :, :], 1.0, 0.0) + tl.zeros((NB, L, L), dtype=tl.float32)
    for row in tl.static_range(1, L):
        n_row = tl.sum(tl.where((r == row)[None, :, None], Nb, 0.0), axis=1)  # [NB, L]
        update = -tl.sum(n_row[:, :, None] * Mb, axis=1)  # -Σ_k N[row, k] M[k, :]
        Mb = tl.where((r == row)[None, :, None], Mb + update[:, None, :], Mb)
    wide = tl.reshape(Mb, (C, L))
    M = tl.where(same_block, tl.reshape(tl.broadcast_to(wide[:, None, :], (C, NB, L)), (C, C)), 0.0)
    for level in tl.static_range(LEVELS):
        half = L << level
        meet = ((i[:, None] // (2 * half)) == (i[None, :] // (2 * half))) & ((i[:, None] % (2 * half)) >= half)
        meet = meet & ((i[None, :] % (2 * half)) < half)
        M = M - tl.dot(tl.dot(M, tl.where(meet, N, 0.0), input_precision=PREC), M, input_precision=PREC)
    return M


@triton.jit
def chunk_prepare_kernel(
    q, k, v, g, beta, a, b,
    W, U, Q_START, K_END, B_END, A_QK, A_QB, DECAY_END,
    chunk_bos, chunk_len,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One (chunk, value head). Inputs token-major: ``q, k, a, b [BT, H, K]``, ``v [BT, HV, V]``,
    ``g [BT, HV, K]`` or ``[BT, HV]``, ``beta [BT, HV]``. Outputs token-major per value head:
    ``W, Q_START, K_END, B_END [BT, HV, K]``, ``U [BT, HV, V]``, ``A_QK, A_QB [BT, HV, C]`` (row i
    of the chunk's matrix at token i), and ``DECAY_END [NT, HV, K] = exp(G_C)``."""
    cid = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    bos = tl.load(chunk_bos + cid).to(tl.int64)
    n = tl.load(chunk_len + cid)
    i = tl.arange(0, C)
    valid = i < n
    incl = i[:, None] >= i[None, :]
    strict = i[:, None] > i[None, :]

    A_qk = tl.zeros((C, C), dtype=tl.float32)
    A_kk = tl.zeros((C, C), dtype=tl.float32)
    A_ab = tl.zeros((C, C), dtype=tl.float32)
    A_ak = tl.zeros((C, C), dtype=tl.float32)
    A_qb = tl.zeros((C, C), dtype=tl.float32)
    if DECAY == DECAY_SCALAR:
        gs = tl.load(g + (bos + i) * HV + hv, mask=valid, other=0.0).to(tl.float32)
        Gs = tl.cumsum(gs, axis=0)
        Gs_end = tl.sum(tl.where(i == C - 1, Gs, 0.0), axis=0)  # the cumsum's own last value: exp(0) for the last token

    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        q_t = _load_rows(q + h * K, bos, i, valid, H * K, cols, K).to(tl.float32)
        k_t = _load_rows(k + h * K, bos, i, valid, H * K, cols, K).to(tl.float32)
        a_t = q_t
        b_t = k_t
        if LOWRANK == LOWRANK_GENERAL:
            a_t = _load_rows(a + h * K, bos, i, valid, H * K, cols, K).to(tl.float32)
            b_t = _load_rows(b + h * K, bos, i, valid, H * K, cols, K).to(tl.float32)
        if DECAY == DECAY_CHANNEL:
            g_t = _load_rows(g + hv * K, bos, i, valid, HV * K, cols, K).to(tl.float32)
            A_qk, A_kk, A_ab, A_ak, A_qb = _channel_slice(
                q_t, k_t, a_t, b_t, g_t, A_qk, A_kk, A_ab, A_ak, A_qb, C, L, NB, LEVELS, BK, LOWRANK, PREC
            )
            G = tl.cumsum(g_t, axis=0)
            G_end = tl.sum(tl.where((i == C - 1)[:, None], G, 0.0), axis=0)  # not sum(g): see Gs_end
            start = tl.exp(G)
            to_end = tl.exp(G_end[None, :] - G)
            tl.store(DECAY_END + (cid * HV + hv) * K + cols, tl.exp(G_end), mask=cols < K)
        else:
            A_qk += _dot_t(q_t, k_t, PREC)
            if LOWRANK == LOWRANK_TIED:
                A_kk += _dot_t(k_t, k_t, PREC)
            if LOWRANK == LOWRANK_GENERAL:
                A_ab += _dot_t(a_t, b_t, PREC)
                A_ak += _dot_t(a_t, k_t, PREC)
                A_qb += _dot_t(q_t, b_t, PREC)
            start = tl.full((C, BK), 1.0, tl.float32)
            to_end = tl.full((C, BK), 1.0, tl.float32)
            if DECAY == DECAY_SCALAR:
                start = start * tl.exp(Gs)[:, None]
                to_end = to_end * tl.exp(Gs_end - Gs)[:, None]
                tl.store(
                    DECAY_END + (cid * HV + hv) * K + cols, tl.zeros((BK,), tl.float32) + tl.exp(Gs_end), mask=cols < K
                )
        _store_rows(Q_START + hv * K, q_t * start, bos, i, valid, HV * K, cols, K)
        _store_rows(K_END + hv * K, k_t * to_end, bos, i, valid, HV * K, cols, K)
        if LOWRANK == LOWRANK_GENERAL:
            _store_rows(B_END + hv * K, b_t * to_end, bos, i, valid, HV * K, cols, K)

    if DECAY == DECAY_SCALAR:
        # One decay per token: the pairwise factors form a C x C matrix, exp(G_i - G_j) <= 1.
        diff = Gs[:, None] - Gs[None, :]
        A_qk = A_qk * tl.exp(tl.where(incl, diff, float("-inf")))
        A_kk = A_kk * tl.exp(tl.where(strict, diff, float("-inf")))
        diff_prev = diff - gs[:, None]
        A_ab = A_ab * tl.exp(tl.where(strict, diff_prev, float("-inf")))
        A_ak = A_ak * tl.exp(tl.where(strict, diff_prev, float("-inf")))
        A_qb = A_qb * tl.exp(tl.where(incl, diff, float("-inf")))
    if DECAY == DECAY_NONE:
        A_qk = tl.where(incl, A_qk, 0.0)
        A_kk = tl.where(strict, A_kk, 0.0)
        A_ab = tl.where(strict, A_ab, 0.0)
        A_ak = tl.where(strict, A_ak, 0.0)
        A_qb = tl.where(incl, A_qb, 0.0)
    _store_rows(A_QK + hv * C, A_qk, bos, i, valid, HV * C, i, C)
    if LOWRANK == LOWRANK_GENERAL:
        _store_rows(A_QB + hv * C, A_qb, bos, i, valid, HV * C, i, C)

    if LOWRANK != LOWRANK_NONE:
        if LOWRANK == LOWRANK_TIED:
            beta_t = tl.load(beta + (bos + i) * HV + hv, mask=valid, other=0.0).to(tl.float32)
            M = _unit_lower_inverse(beta_t[:, None] * A_kk, C, L, NB, LEVELS, PREC)
        else:
            M = _unit_lower_inverse(-A_ab, C, L, NB, LEVELS, PREC)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            if LOWRANK == LOWRANK_TIED:
                x_t = _load_rows(k + h * K, bos, i, valid, H * K, cols, K).to(tl.float32) * beta_t[:, None]
            else:
                x_t = _load_rows(a + h * K, bos, i, valid, H * K, cols, K).to(tl.float32)
            # tied rows read exp(G_i) (k after the decay), general rows exp(G_{i-1}) (a before it)
            if DECAY == DECAY_CHANNEL:
                g_t = _load_rows(g + hv * K, bos, i, valid, HV * K, cols, K).to(tl.float32)
                G = tl.cumsum(g_t, axis=0)
                if LOWRANK == LOWRANK_GENERAL:
                    G = G - g_t
                x_t = x_t * tl.exp(G)
            if DECAY == DECAY_SCALAR:
                Gx = Gs
                if LOWRANK == LOWRANK_GENERAL:
                    Gx = Gs - gs
                x_t = x_t * tl.exp(Gx)[:, None]
            w = tl.dot(M, x_t, input_precision=PREC)
            if LOWRANK == LOWRANK_TIED:
                w = -w
            _store_rows(W + hv * K, w, bos, i, valid, HV * K, cols, K)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            v_t = _load_rows(v + hv * V, bos, i, valid, HV * V, cols, V).to(tl.float32)
            if LOWRANK == LOWRANK_TIED:
                rhs = v_t * beta_t[:, None]
            else:
                rhs = tl.dot(A_ak, v_t, input_precision=PREC)
            _store_rows(U + hv * V, tl.dot(M, rhs, input_precision=PREC), bos, i, valid, HV * V, cols, V)
