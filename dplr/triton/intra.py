"""Stages 1-3 on the GPU, one program per (chunk, value head): the chunk's cumulative decays,
its intra-chunk matrices, the triangular solve and the pseudo-value factors ``W, U``.

The math is that of :mod:`dplr.torch_chunk` (see its stage files):

* ``A_xy[i, j] = Σ_d x_id y_jd exp(Gx_id - G_jd)``. With a decay per channel, a chunk that
  decays by at most ``CHUNK_LIMIT`` in every channel (the usual case) takes one product per
  matrix, both sides against the chunk's middle. Otherwise the rows go in blocks of ``L``,
  each block's rows meeting all earlier columns in one product against the block's middle
  ``m_p``: row factors of at most ``exp(HALF_LIMIT)``, column factors ``<= 1`` for earlier
  blocks. A channel slice whose block strays further from its middle takes the block's start
  as reference instead (both factors ``<= 1``) and the exact element-wise product for the
  block's own pairs. (The backward, :mod:`dplr.triton.chunk_bwd`, takes the same whole-chunk
  products; on faster-decaying slices it goes by sub-blocks merged pairwise instead of row blocks.)
* tied: ``M = (I + diag(beta) A_kk)⁻¹``; general: ``M = (I - A_ab)⁻¹``. The state pass forms
  the pseudo-values from them and the chunk's initial state ``S``:
  ``P = M (beta ⊙ (v - (k ⊙ exp(G)) S))`` (tied), ``P = M ((a ⊙ exp(G_prev)) S + A_ak v)`` (general).
* the inverse: forward substitution inside the ``L``-blocks (exact), then
  ``M ← M - M (N ⊙ off) M``, doubling the block size up to ``C`` (the block formula for
  ``[[A, 0], [N', D]]⁻¹``) on the tensor cores.

The cumulative decays of a channel slice go to a scratch buffer ``G`` (fp32), from which each
row gathers its reference points by pointer: no register shuffles between layouts.

Channels are processed in slices of ``BK`` (any ``K`` up to 256, no unrolled blocks).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..torch_chunk.intra import CHUNK_LIMIT, HALF_LIMIT
from .structure import DECAY_CHANNEL, DECAY_SCALAR, LOWRANK_GENERAL, LOWRANK_NONE, LOWRANK_TIED

LIMIT = tl.constexpr(HALF_LIMIT)
WHOLE = tl.constexpr(CHUNK_LIMIT)  # a chunk decaying less in every channel is factorised whole


@triton.jit
def _mm(x, y, PREC: tl.constexpr):
    """``x @ y``, summed in fp32. Operands of one 16-bit dtype (tiles as stored) take the 16-bit
    tensor cores: their products are exact, as on tf32. Other pairs are widened to fp32 and
    multiplied at ``PREC`` (tf32 for 16-bit inputs). Rounding those fp32 operands to bf16 as well
    took 7-16% off the backward (H200, (4, 8192, 16, 128), forward+backward: DeltaNet 7.02 ->
    5.82 ms with bf16 states) but raised the worst gradient error from 3.5e-3 to 4.1e-3 of the
    5e-3 allowed, the gates' to 5.3-7.1e-3 (benchmarks/results/gpu_backward_precision_H200.json)."""
    if x.dtype == y.dtype:
        return tl.dot(x, y, input_precision=PREC)
    else:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision=PREC)


@triton.jit
def _dot_t(x, y, PREC: tl.constexpr):
    """``x yᵀ`` for ``[C, BK]`` tiles (see :func:`_mm`)."""
    return _mm(x, tl.trans(y), PREC)


@triton.jit
def _load_rows(ptr, row0, rows, valid, stride, cols, ncols):
    """A ``[len(rows), len(cols)]`` tile of a token-major tensor, zero outside the chunk/width."""
    mask = valid[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + (row0 + rows)[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _key_slices(q, k, a, b, h, row0, rows, valid, H, cols, K, LOWRANK: tl.constexpr):
    """Channel slice ``cols`` of a chunk's ``q, k`` and (general form) ``a, b``, in fp32; without
    ``a, b`` the returned pair stands in for them unused."""
    q_t = _load_rows(q + h * K, row0, rows, valid, H * K, cols, K).to(tl.float32)
    k_t = _load_rows(k + h * K, row0, rows, valid, H * K, cols, K).to(tl.float32)
    a_t, b_t = q_t, k_t
    if LOWRANK == LOWRANK_GENERAL:
        a_t = _load_rows(a + h * K, row0, rows, valid, H * K, cols, K).to(tl.float32)
        b_t = _load_rows(b + h * K, row0, rows, valid, H * K, cols, K).to(tl.float32)
    return q_t, k_t, a_t, b_t


@triton.jit
def _chunk_rows(chunk_bos, chunk_len, C: tl.constexpr):
    """A per-chunk program's chunk and value head (grid axes 0 and 1): ``(cid, hv, bos, n, i,
    valid)`` with the chunk's first token ``bos`` (int64), its length ``n`` and its rows ``i < n``."""
    cid = tl.program_id(0)
    bos = tl.load(chunk_bos + cid).to(tl.int64)
    n = tl.load(chunk_len + cid)
    i = tl.arange(0, C)
    return cid, tl.program_id(1), bos, n, i, i < n


@triton.jit
def _store_rows(ptr, value, row0, rows, valid, stride, cols, ncols):
    mask = valid[:, None] & (cols < ncols)[None, :]
    offsets = (row0 + rows)[:, None].to(tl.int64) * stride + cols[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_G(G_ptr, row0, ref, n, stride, cols, ncols):
    """``G`` at row ``ref[i]`` of the chunk for every row ``i`` (``[C, BK]``). Rows past the
    chunk's end read its last row (padding has no decay); ``ref < 0`` reads 0 (before the chunk)."""
    ref = tl.minimum(ref, n - 1)
    return _load_rows(G_ptr, row0, ref, ref >= 0, stride, cols, ncols)


@triton.jit
def _store_intra(
    A_qk, A_kk, A_ab, A_ak, A_qb, beta, A_QK, A_QB, A_AK, A_KK, scratch, hv, bos, rows, valid,
    HV: tl.constexpr, C: tl.constexpr, LOWRANK: tl.constexpr, STORE_AKK: tl.constexpr,
):  # fmt: skip
    """Store rows ``rows`` of a chunk's masked intra-chunk matrices and of the solve's ``N`` (tied
    ``beta ⊙ A_kk``, general ``-A_ab``; in the first ``C x C`` of ``scratch``), which it returns."""
    j = tl.arange(0, C)
    _store_rows(A_QK + hv * C, A_qk, bos, rows, valid, HV * C, j, C)
    N = A_qk  # a stand-in without a rank-one part
    if LOWRANK == LOWRANK_TIED:
        beta_t = tl.load(beta + (bos + rows) * HV + hv, mask=valid, other=0.0).to(tl.float32)
        N = beta_t[:, None] * A_kk
        if STORE_AKK:
            _store_rows(A_KK + hv * C, A_kk, bos, rows, valid, HV * C, j, C)
    if LOWRANK == LOWRANK_GENERAL:
        _store_rows(A_QB + hv * C, A_qb, bos, rows, valid, HV * C, j, C)
        _store_rows(A_AK + hv * C, A_ak, bos, rows, valid, HV * C, j, C)
        N = -A_ab
    if LOWRANK != LOWRANK_NONE:
        tl.store(scratch + rows[:, None] * C + j[None, :], N)
    return N


@triton.jit
def _whole_chunk(
    q, k, a, b, G_ptr, h, bos, n, i, valid, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, LOWRANK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The intra-chunk matrices (unmasked) of a chunk that decays by at most ``CHUNK_LIMIT`` in
    every channel: one product per matrix, both sides taken against the chunk's middle ``m``,
    ``exp(G_i - m) · exp(m - G_j)``, factors in ``[exp(-60), exp(60)]`` (normal fp32 numbers;
    the masked pairs stay finite), as on the PyTorch path. Trained gates (about -0.1 to -0.5 per
    step) decay a chunk of 64 by 5 to 30, so this is the usual case."""
    A_qk = tl.zeros((C, C), dtype=tl.float32)
    A_kk = tl.zeros((C, C), dtype=tl.float32)
    A_ab = tl.zeros((C, C), dtype=tl.float32)
    A_ak = tl.zeros((C, C), dtype=tl.float32)
    A_qb = tl.zeros((C, C), dtype=tl.float32)
    stride = HV * K
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        q_t, k_t, a_t, b_t = _key_slices(q, k, a, b, h, bos, i, valid, H, cols, K, LOWRANK)
        G = _gather_G(G_ptr, bos, i, n, stride, cols, K)
        mid = _gather_G(G_ptr, bos, tl.full((1,), C // 2 - 1, tl.int32), n, stride, cols, K)
        x = tl.exp(G - mid)
        k_col = k_t * tl.exp(mid - G)
        A_qk += _dot_t(q_t * x, k_col, PREC)
        if LOWRANK == LOWRANK_TIED:
            A_kk += _dot_t(k_t * x, k_col, PREC)
        if LOWRANK == LOWRANK_GENERAL:
            # a reads the state before its own token's decay: G_{i-1}, the row above (0 on the first)
            Gp = _gather_G(G_ptr, bos, i - 1, n, stride, cols, K)
            a_row = a_t * tl.exp(Gp - mid)
            b_col = b_t * tl.exp(mid - G)
            A_ab += _dot_t(a_row, b_col, PREC)
            A_ak += _dot_t(a_row, k_col, PREC)
            A_qb += _dot_t(q_t * x, b_col, PREC)
    return A_qk, A_kk, A_ab, A_ak, A_qb


@triton.jit
def _channel_intra(
    q, k, a, b, g, beta, G_ptr, A_QK, A_QB, A_AK, A_KK, N_ptr, h, hv, bos, n,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
    LOWRANK: tl.constexpr, PREC: tl.constexpr, STORE_AKK: tl.constexpr,
):  # fmt: skip
    """The intra-chunk matrices of a chunk that decays by more than ``CHUNK_LIMIT`` in some channel
    (else :func:`_whole_chunk`), one block of ``L`` rows at a time, from the cumulative decays
    already stored at ``G_ptr``. Row ``i`` of block ``p`` meets every
    column ``j <= i`` in one product, both sides taken against the block's middle ``m_p``:
    ``exp(G_i - m_p) · exp(m_p - G_j)``. For ``j`` in an earlier block the column factor is
    ``<= 1``; inside the block both are at most ``exp(HALF_LIMIT)`` on a slice whose rows stay
    within ``HALF_LIMIT`` of the middle. A slice that does not takes the block's start as its
    reference for the earlier columns (both factors ``<= 1``) and the exact element-wise product
    for the block's own pairs. One product per block and matrix covers all its columns: the
    ``C/L`` products of ``[L, BK] x [BK, C]`` do the work of one ``C x C`` product.
    Stores ``A_QK`` (and ``A_QB, A_AK``, general; ``A_KK`` when ``STORE_AKK``) and the solve's
    matrix ``N`` (tied ``beta ⊙ A_kk``, general ``-A_ab``) at ``N_ptr`` (``[C, C]`` fp32)."""
    j = tl.arange(0, C)  # the columns: every token of the chunk
    r = tl.arange(0, L)
    stride = HV * K
    for p in tl.static_range(C // L):
        rows = p * L + r
        valid = rows < n
        A_qk = tl.zeros((L, C), dtype=tl.float32)
        A_kk = tl.zeros((L, C), dtype=tl.float32)
        A_ab = tl.zeros((L, C), dtype=tl.float32)
        A_ak = tl.zeros((L, C), dtype=tl.float32)
        A_qb = tl.zeros((L, C), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            q_r, k_r, a_r, b_r = _key_slices(q, k, a, b, h, bos, rows, valid, H, cols, K, LOWRANK)
            k_c = _load_rows(k + h * K, bos, j, j < n, H * K, cols, K).to(tl.float32)
            G_r = _gather_G(G_ptr, bos, rows, n, stride, cols, K)  # rows past the end: the last row's G
            g_r = _load_rows(g + hv * K, bos, rows, valid, stride, cols, K).to(tl.float32)
            Gp_r = G_r - g_r  # G_{i-1}: the rank-one rows read the state before this token's decay
            G_c = _gather_G(G_ptr, bos, j, n, stride, cols, K)
            mid = _gather_G(G_ptr, bos, tl.full((1,), p * L + L // 2 - 1, tl.int32), n, stride, cols, K)
            unsafe = tl.max(tl.maximum(Gp_r - mid, mid - G_r)) > LIMIT
            # the block's start (G of the row before it; 0 before the chunk) when unsafe
            start = _gather_G(G_ptr, bos, tl.full((1,), p * L - 1, tl.int32), n, stride, cols, K)
            ref = tl.where(unsafe, start, mid)
            reach = j[None, :] < tl.where(unsafe, p * L, C)  # the columns this product covers
            incl = reach & (rows[:, None] >= j[None, :])
            strict = reach & (rows[:, None] > j[None, :])
            # Clamped so that the masked pairs stay finite; the kept ones are within ±LIMIT already.
            x = tl.exp(tl.minimum(G_r - ref, LIMIT))
            k_col = k_c * tl.exp(tl.minimum(ref - G_c, LIMIT))
            A_qk += tl.where(incl, _dot_t(q_r * x, k_col, PREC), 0.0)
            if LOWRANK == LOWRANK_TIED:
                A_kk += tl.where(strict, _dot_t(k_r * x, k_col, PREC), 0.0)
            if LOWRANK == LOWRANK_GENERAL:
                b_col = _load_rows(b + h * K, bos, j, j < n, H * K, cols, K).to(tl.float32)
                b_col = b_col * tl.exp(tl.minimum(ref - G_c, LIMIT))
                a_row = a_r * tl.exp(tl.minimum(Gp_r - ref, LIMIT))
                A_ab += tl.where(strict, _dot_t(a_row, b_col, PREC), 0.0)
                A_ak += tl.where(strict, _dot_t(a_row, k_col, PREC), 0.0)
                A_qb += tl.where(incl, _dot_t(q_r * x, b_col, PREC), 0.0)
            if unsafe:
                # The block's own pairs, exact, column by column: exp(Gx_i - G_j) with j <= i is
                # <= 1. The differences come from fp64 sums inside the block: at these decays
                # |G| reaches hundreds inside a chunk, and fp32 G would give exp(G_i - G_j) a
                # relative error of |G| · 6e-8 (1e-4 here), which the backward's gate gradient,
                # made of such factors alone, would show.
                g64 = g_r.to(tl.float64)
                G64 = tl.cumsum(g64, axis=0)
                Gp64 = G64 - g64
                for t in range(L):
                    at_t = (r == t)[:, None]
                    col = (j == p * L + t)[None, :]
                    kt = tl.sum(tl.where(at_t, k_r, 0.0), axis=0)
                    Gt = tl.sum(tl.where(at_t, G64, 0.0), axis=0)
                    ex = tl.exp(tl.where((r >= t)[:, None], (G64 - Gt[None, :]).to(tl.float32), float("-inf")))
                    A_qk = tl.where(col, A_qk + tl.sum(q_r * kt[None, :] * ex, axis=1)[:, None], A_qk)
                    if LOWRANK == LOWRANK_TIED:
                        ex_s = tl.where((r > t)[:, None], ex, 0.0)
                        A_kk = tl.where(col, A_kk + tl.sum(k_r * kt[None, :] * ex_s, axis=1)[:, None], A_kk)
                    if LOWRANK == LOWRANK_GENERAL:
                        bt = tl.sum(tl.where(at_t, b_r, 0.0), axis=0)
                        ex_p = tl.exp(tl.where((r > t)[:, None], (Gp64 - Gt[None, :]).to(tl.float32), float("-inf")))
                        A_ab = tl.where(col, A_ab + tl.sum(a_r * bt[None, :] * ex_p, axis=1)[:, None], A_ab)
                        A_ak = tl.where(col, A_ak + tl.sum(a_r * kt[None, :] * ex_p, axis=1)[:, None], A_ak)
                        A_qb = tl.where(col, A_qb + tl.sum(q_r * bt[None, :] * ex, axis=1)[:, None], A_qb)
        _store_intra(A_qk, A_kk, A_ab, A_ak, A_qb, beta, A_QK, A_QB, A_AK, A_KK, N_ptr, hv, bos, rows, valid,
                     HV, C, LOWRANK, STORE_AKK)  # fmt: skip


@triton.jit
def _unit_lower_inverse(N, scratch, C: tl.constexpr, L: tl.constexpr, LEVELS: tl.constexpr, PREC: tl.constexpr):
    """``(I + N)⁻¹`` for a strictly lower ``N [C, C]`` (fp32), which the program has also stored in
    the first half of ``scratch`` (``2 C²`` fp32 of its own). The ``L × L`` diagonal blocks by
    forward substitution, all blocks at once, reading rows of ``N`` back; then
    ``M ← M - M (N ⊙ off) M``, doubling the block size."""
    i = tl.arange(0, C)
    NB: tl.constexpr = C // L
    first = tl.arange(0, NB)[:, None] * L  # each block's first row, [NB, 1]
    blk = first[:, :, None]
    r = tl.arange(0, L)
    tl.debug_barrier()  # N's rows come from other threads
    Mb = tl.where((r[:, None] == r[None, :])[None, :, :], 1.0, 0.0) + tl.zeros((NB, L, L), tl.float32)
    for row in tl.static_range(1, L):
        n_row = tl.load(scratch + (first + row) * C + first + r[None, :])  # [NB, L]: row `row` of each block
        update = -tl.sum(n_row[:, :, None] * Mb, axis=1)  # -Σ_k N[row, k] M[k, :]
        Mb = tl.where((r == row)[None, :, None], Mb + update[:, None, :], Mb)
    diag = scratch + C * C
    tl.store(diag + (blk + r[None, :, None]) * C + blk + r[None, None, :], Mb)
    tl.debug_barrier()
    same_block = (i[:, None] // L) == (i[None, :] // L)
    M = tl.load(diag + i[:, None] * C + i[None, :], mask=same_block, other=0.0)
    for level in tl.static_range(LEVELS):
        half = L << level
        meet = ((i[:, None] // (2 * half)) == (i[None, :] // (2 * half))) & ((i[:, None] % (2 * half)) >= half)
        meet = meet & ((i[None, :] % (2 * half)) < half)
        M = M - tl.dot(tl.dot(M, tl.where(meet, N, 0.0), input_precision=PREC), M, input_precision=PREC)
    return M


@triton.jit
def chunk_prepare_kernel(
    q, k, g, beta, a, b,
    X_START, M_SOLVE, A_AK, A_KK, Q_START, K_END, B_END, A_QK, A_QB, DECAY_END, G_CUM, SCRATCH,
    chunk_bos, chunk_len,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, LEVELS: tl.constexpr, BK: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, PREC: tl.constexpr,
    STORE_AKK: tl.constexpr,
):  # fmt: skip
    """One (chunk, value head). Inputs token-major: ``q, k, a, b [BT, H, K]``,
    ``g [BT, HV, K]`` or ``[BT, HV]``, ``beta [BT, HV]``. Outputs token-major per value head:
    ``X_START, Q_START, K_END, B_END [BT, HV, K]`` (the rank-one rows as they read the chunk's
    initial state, ...), ``A_QK, A_QB, A_AK [BT, HV, C]`` (and for the backward ``A_KK``, when
    ``STORE_AKK``) and the solve ``M_SOLVE [BT, HV, C]``
    fp32 (row i of the chunk's matrix at token i), ``DECAY_END [NT, HV, K] = exp(G_C)`` and (channel decay)
    the cumulative decays ``G_CUM [BT, HV, K]`` fp32; ``SCRATCH [NT, HV, 2, C, C]`` fp32 serves the solve.
    The value-side decay ``gv`` does not reach this kernel: it leaves the key side as it is
    (docs/value-decay.md); its sums come from :func:`~dplr.triton.columns.chunk_value_sums_kernel`.
    """
    cid, hv, bos, n, i, valid = _chunk_rows(chunk_bos, chunk_len, C)
    h = hv // (HV // H)
    incl = i[:, None] >= i[None, :]
    strict = i[:, None] > i[None, :]

    A_qk = tl.zeros((C, C), dtype=tl.float32)
    A_kk = tl.zeros((C, C), dtype=tl.float32)
    A_ab = tl.zeros((C, C), dtype=tl.float32)
    A_ak = tl.zeros((C, C), dtype=tl.float32)
    A_qb = tl.zeros((C, C), dtype=tl.float32)
    if DECAY == DECAY_SCALAR:
        # fp64 sums (a C-vector: cheap), for the reason given in _channel_intra's exact path
        gs = tl.load(g + (bos + i) * HV + hv, mask=valid, other=0.0).to(tl.float64)
        Gs = tl.cumsum(gs, axis=0)
        Gs_end = tl.sum(tl.where(i == C - 1, Gs, 0.0), axis=0)  # the cumsum's own last value: exp(0) for the last token

    least = 0.0  # channel decay: the least cumulative decay at the chunk's end, over all channels
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        q_t, k_t, a_t, b_t = _key_slices(q, k, a, b, h, bos, i, valid, H, cols, K, LOWRANK)
        if DECAY == DECAY_CHANNEL:
            g_t = _load_rows(g + hv * K, bos, i, valid, HV * K, cols, K).to(tl.float32)
            G = tl.cumsum(g_t, axis=0)
            _store_rows(G_CUM + hv * K, G, bos, i, valid, HV * K, cols, K)
            G_end = tl.sum(tl.where((i == C - 1)[:, None], G, 0.0), axis=0)  # not sum(g): see Gs_end
            least = tl.minimum(least, tl.min(G_end))
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
                start = start * tl.exp(Gs.to(tl.float32))[:, None]
                to_end = to_end * tl.exp((Gs_end - Gs).to(tl.float32))[:, None]
                tl.store(
                    DECAY_END + (cid * HV + hv) * K + cols,
                    tl.zeros((BK,), tl.float32) + tl.exp(Gs_end.to(tl.float32)),
                    mask=cols < K,
                )
        _store_rows(Q_START + hv * K, q_t * start, bos, i, valid, HV * K, cols, K)
        _store_rows(K_END + hv * K, k_t * to_end, bos, i, valid, HV * K, cols, K)
        if LOWRANK == LOWRANK_TIED:
            _store_rows(X_START + hv * K, k_t * start, bos, i, valid, HV * K, cols, K)
        if LOWRANK == LOWRANK_GENERAL:
            _store_rows(B_END + hv * K, b_t * to_end, bos, i, valid, HV * K, cols, K)
            # a reads the state before its own token's decay: exp(G_{i-1})
            if DECAY == DECAY_CHANNEL:
                a_start = a_t * tl.exp(G - g_t)
            elif DECAY == DECAY_SCALAR:
                a_start = a_t * tl.exp((Gs - gs).to(tl.float32))[:, None]
            else:
                a_start = a_t
            _store_rows(X_START + hv * K, a_start, bos, i, valid, HV * K, cols, K)

    scratch = SCRATCH + (cid * HV + hv).to(tl.int64) * (2 * C * C)  # the solve's, N in its first C x C
    if DECAY == DECAY_CHANNEL:
        tl.debug_barrier()  # the gathers read rows of G that other threads stored
        if least >= -WHOLE:
            A_qk, A_kk, A_ab, A_ak, A_qb = _whole_chunk(q, k, a, b, G_CUM + hv * K, h, bos, n, i, valid,
                                                        H, HV, K, C, BK, LOWRANK, PREC)  # fmt: skip
            _store_intra(
                tl.where(incl, A_qk, 0.0), tl.where(strict, A_kk, 0.0), tl.where(strict, A_ab, 0.0),
                tl.where(strict, A_ak, 0.0), tl.where(incl, A_qb, 0.0),
                beta, A_QK, A_QB, A_AK, A_KK, scratch, hv, bos, i, valid, HV, C, LOWRANK, STORE_AKK,
            )  # fmt: skip
        else:
            _channel_intra(
                q, k, a, b, g, beta, G_CUM + hv * K, A_QK, A_QB, A_AK, A_KK, scratch, h, hv, bos, n,
                H, HV, K, C, L, BK, LOWRANK, PREC, STORE_AKK,
            )  # fmt: skip
        if LOWRANK != LOWRANK_NONE:
            tl.debug_barrier()  # N's rows come from other threads
            N = tl.load(scratch + i[:, None] * C + i[None, :])
    else:
        if DECAY == DECAY_SCALAR:
            # One decay per token: the pairwise factors form a C x C matrix, exp(G_i - G_j) <= 1.
            diff = (Gs[:, None] - Gs[None, :]).to(tl.float32)
            A_qk = A_qk * tl.exp(tl.where(incl, diff, float("-inf")))
            A_kk = A_kk * tl.exp(tl.where(strict, diff, float("-inf")))
            diff_prev = ((Gs - gs)[:, None] - Gs[None, :]).to(tl.float32)
            A_ab = A_ab * tl.exp(tl.where(strict, diff_prev, float("-inf")))
            A_ak = A_ak * tl.exp(tl.where(strict, diff_prev, float("-inf")))
            A_qb = A_qb * tl.exp(tl.where(incl, diff, float("-inf")))
        else:
            A_qk = tl.where(incl, A_qk, 0.0)
            A_kk = tl.where(strict, A_kk, 0.0)
            A_ab = tl.where(strict, A_ab, 0.0)
            A_ak = tl.where(strict, A_ak, 0.0)
            A_qb = tl.where(incl, A_qb, 0.0)
        N = _store_intra(A_qk, A_kk, A_ab, A_ak, A_qb, beta, A_QK, A_QB, A_AK, A_KK, scratch, hv, bos, i, valid,
                         HV, C, LOWRANK, STORE_AKK)  # fmt: skip

    if LOWRANK != LOWRANK_NONE:
        # The state pass forms P = M (beta ⊙ (v - X S)) (tied) or M (X S + A_ak v) (general).
        M = _unit_lower_inverse(N, scratch, C, L, LEVELS, PREC)
        _store_rows(M_SOLVE + hv * C, M, bos, i, valid, HV * C, i, C)
