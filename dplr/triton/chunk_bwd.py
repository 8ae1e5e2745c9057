"""The chunk backward's keys stage (stages 3 to 1 in reverse), one program per (chunk, value
head), after :mod:`dplr.triton.values_bwd` has left the gradients of the chunk matrices and of
the decayed key vectors:

* :func:`chunk_grad_keys_kernel` (over channel slices): the solve backwards
  (``dN = -Mᵀ dM Mᵀ``), the intra-chunk products backwards (against the chunk's middle where
  the slice decays by at most ``CHUNK_LIMIT``, as the forward; else by sub-blocks merged pairwise),
  the decayed vectors, and the gate: ``dg_t = Σ_{i>=t} dG_i + Σ_{i>t} dG^prev_i +
  Σ_{i<t} (dK_end ⊙ K_end + dB_end ⊙ B_end)_i + d exp(G_C) exp(G_C)``. Pairs whose decay is
  exactly ``exp(0)`` (``j = i``; ``j = i - 1`` for the rank-one rows) pass no gradient to the
  gate: they are added apart from the others.

Numerics: the gate's gradient is made of the small factors alone (the distance-0 pairs drop
out), so their relative precision shows. The keys kernel sums the decays in fp64 (rounding each
difference to fp32 before ``exp``) and forms the exclusive sums over rows by shifted scans,
never by subtracting a row from a total.

The formulas are those of autograd through the forward's math (checked to 1e-16 in fp64 when
they were derived); the tests compare the kernels with the fp64 reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .intra import LIMIT, WHOLE, _chunk_rows, _gather_G, _key_slices, _load_rows, _mm, _store_rows
from .structure import DECAY_CHANNEL, DECAY_NONE, DECAY_SCALAR, LOWRANK_GENERAL, LOWRANK_NONE, LOWRANK_TIED


@triton.jit
def _pair_bwd(E, x, x_f, y, y_f, PREC: tl.constexpr):
    """Through ``A = (x ⊙ x_f)(y ⊙ y_f)ᵀ`` kept where ``E`` (the masked ``dA``) is: ``(dx, dy)``;
    the gate takes ``+x ⊙ dx`` on the rows' decay and ``-y ⊙ dy`` on the columns'."""
    dx = _mm(E, y * y_f, PREC) * x_f
    dy = _mm(tl.trans(E), x * x_f, PREC) * y_f
    return dx, dy


@triton.jit
def _pairs_bwd(
    keep, E_qk, E_kk, E_qb, E_ab, E_ak, q, k, a, b, x_f, xp_f, y_f, LOWRANK: tl.constexpr, PREC: tl.constexpr
):
    """Every intra matrix backwards over the pairs ``keep`` with row factors ``x_f`` (rows at
    ``G``), ``xp_f`` (the rank-one rows, at ``G_prev``) and column factors ``y_f``:
    ``(dq, dk, da, db, dG, dGp)``."""
    dq, dk = _pair_bwd(tl.where(keep, E_qk, 0.0), q, x_f, k, y_f, PREC)
    dG = q * dq - k * dk
    da = tl.zeros_like(dq)
    db = tl.zeros_like(dq)
    dGp = tl.zeros_like(dq)
    if LOWRANK == LOWRANK_TIED:
        dx, dy = _pair_bwd(tl.where(keep, E_kk, 0.0), k, x_f, k, y_f, PREC)
        dk += dx + dy
        dG += k * dx - k * dy
    if LOWRANK == LOWRANK_GENERAL:
        dx, db = _pair_bwd(tl.where(keep, E_qb, 0.0), q, x_f, b, y_f, PREC)
        dq += dx
        dG += q * dx - b * db
        da, dy = _pair_bwd(tl.where(keep, E_ab, 0.0), a, xp_f, b, y_f, PREC)
        db += dy
        dG -= b * dy
        dx, dy = _pair_bwd(tl.where(keep, E_ak, 0.0), a, xp_f, k, y_f, PREC)
        da += dx
        dk += dy
        dG -= k * dy
        dGp = a * da
    return dq, dk, da, db, dG, dGp


@triton.jit
def _column(M, j):
    """Column ``j`` of a ``[C, C]`` tile, as ``[C]``."""
    return tl.sum(tl.where((tl.arange(0, M.shape[1]) == j)[None, :], M, 0.0), axis=1)


@triton.jit
def _channel_slice_bwd(
    q, k, a, b, G, Gp, G_ptr, row0, n, E_qk, E_kk, E_qb, E_ab, E_ak, stride, cols, ncols,
    C: tl.constexpr, L: tl.constexpr, LEVELS: tl.constexpr, LOWRANK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The channel slice's share of the intra products backwards: ``(dq, dk, da, db, dG, dGp)``.
    The ``E_*`` hold the gradients of the pairs that go through a decay factor (none at distance
    0). ``G, Gp`` are fp64; the reference points gathered from ``G_ptr`` are fp32, and their
    rounding cancels between a pair's two factors. A slice that decays by at most
    ``CHUNK_LIMIT`` over the chunk (the usual case) takes one pair-backward per matrix against
    the chunk's middle, as the forward does (:func:`dplr.triton.intra._whole_chunk`); others go
    by sub-blocks (:func:`_sub_blocks_bwd`)."""
    i = tl.arange(0, C)
    if tl.min(G) >= -WHOLE:  # G decreases down the chunk: its least is the chunk's decay
        mid = _gather_G(G_ptr, row0, tl.full((1,), C // 2 - 1, tl.int32), n, stride, cols, ncols)
        dq, dk, da, db, dG, dGp = _pairs_bwd(
            i[:, None] > i[None, :], E_qk, E_kk, E_qb, E_ab, E_ak, q, k, a, b,
            tl.exp((G - mid).to(tl.float32)), tl.exp((Gp - mid).to(tl.float32)), tl.exp((mid - G).to(tl.float32)),
            LOWRANK, PREC,
        )  # fmt: skip
    else:
        dq, dk, da, db, dG, dGp = _sub_blocks_bwd(
            q, k, a, b, G, Gp, G_ptr, row0, n, E_qk, E_kk, E_qb, E_ab, E_ak, stride, cols, ncols,
            C, L, LEVELS, LOWRANK, PREC,
        )  # fmt: skip
    return dq, dk, da, db, dG, dGp


@triton.jit
def _sub_blocks_bwd(
    q, k, a, b, G, Gp, G_ptr, row0, n, E_qk, E_kk, E_qb, E_ab, E_ak, stride, cols, ncols,
    C: tl.constexpr, L: tl.constexpr, LEVELS: tl.constexpr, LOWRANK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """:func:`_channel_slice_bwd` on a slice that decays by more than ``CHUNK_LIMIT``: sub-blocks
    of ``L`` rows against their middles (the exact element-wise product where a block strays
    past ``HALF_LIMIT``), merged pairwise level by level at ``c``, the decay at the end of the
    upper half: ``exp(G_i - c) · exp(c - G_j)``, both ``<= 1``."""
    i = tl.arange(0, C)
    start = (i // L) * L
    mid = _gather_G(G_ptr, row0, start + L // 2 - 1, n, stride, cols, ncols)
    unsafe = tl.max(tl.maximum(Gp - mid, mid - G)) > LIMIT
    same_block = (i[:, None] // L) == (i[None, :] // L)
    if unsafe:
        zero = tl.zeros_like(q)
        dq, dk, da, db, dG, dGp = zero, zero, zero, zero, zero, zero
        for j in range(C):  # exact, column by column (blocks decaying faster than LIMIT per half)
            at_j = (i == j)[:, None]
            live = ((i // L) == (j // L)) & (i > j)
            Gj = tl.sum(tl.where(at_j, G, 0.0), axis=0)
            kj = tl.sum(tl.where(at_j, k, 0.0), axis=0)
            ex = tl.exp(tl.where(live[:, None], (G - Gj[None, :]).to(tl.float32), float("-inf")))
            e = _column(E_qk, j)[:, None] * ex
            dq += e * kj[None, :]
            dk_j = tl.sum(e * q, axis=0)
            dG += e * kj[None, :] * q
            if LOWRANK == LOWRANK_TIED:
                e = _column(E_kk, j)[:, None] * ex
                dk += e * kj[None, :]
                dk_j += tl.sum(e * k, axis=0)
                dG += e * kj[None, :] * k
            dG_j = -kj * dk_j
            if LOWRANK == LOWRANK_GENERAL:
                bj = tl.sum(tl.where(at_j, b, 0.0), axis=0)
                e = _column(E_qb, j)[:, None] * ex
                dq += e * bj[None, :]
                db_j = tl.sum(e * q, axis=0)
                dG += e * bj[None, :] * q
                ex_p = tl.exp(tl.where(live[:, None], (Gp - Gj[None, :]).to(tl.float32), float("-inf")))
                e_ab = _column(E_ab, j)[:, None] * ex_p
                e_ak = _column(E_ak, j)[:, None] * ex_p
                da += e_ab * bj[None, :] + e_ak * kj[None, :]
                dGp += a * (e_ab * bj[None, :] + e_ak * kj[None, :])
                db_j += tl.sum(e_ab * a, axis=0)
                dk_ak = tl.sum(e_ak * a, axis=0)
                dk_j += dk_ak
                dG_j += -bj * db_j - kj * dk_ak
                db = tl.where(at_j, db + db_j[None, :], db)
            dk = tl.where(at_j, dk + dk_j[None, :], dk)
            dG = tl.where(at_j, dG + dG_j[None, :], dG)
    else:
        y_mid = tl.exp(tl.minimum((mid - G).to(tl.float32), LIMIT))
        dq, dk, da, db, dG, dGp = _pairs_bwd(
            same_block, E_qk, E_kk, E_qb, E_ab, E_ak, q, k, a, b,
            tl.exp(tl.minimum((G - mid).to(tl.float32), LIMIT)), tl.exp(tl.minimum((Gp - mid).to(tl.float32), LIMIT)),
            y_mid, LOWRANK, PREC,
        )  # fmt: skip

    for level in tl.static_range(LEVELS):
        half = C >> (level + 1)
        c = _gather_G(G_ptr, row0, (i // (2 * half)) * (2 * half) + half - 1, n, stride, cols, ncols)
        lower = ((i % (2 * half)) >= half)[:, None]
        meet = ((i[:, None] // (2 * half)) == (i[None, :] // (2 * half))) & ((i[:, None] % (2 * half)) >= half)
        meet = meet & ((i[None, :] % (2 * half)) < half)
        x_f = tl.exp(tl.where(lower, (G - c).to(tl.float32), float("-inf")))
        xp_f = tl.exp(tl.where(lower, (Gp - c).to(tl.float32), float("-inf")))
        y_f = tl.exp(tl.where(lower, float("-inf"), (c - G).to(tl.float32)))
        dq_l, dk_l, da_l, db_l, dG_l, dGp_l = _pairs_bwd(
            meet, E_qk, E_kk, E_qb, E_ab, E_ak, q, k, a, b, x_f, xp_f, y_f, LOWRANK, PREC
        )
        dq += dq_l
        dk += dk_l
        da += da_l
        db += db_l
        dG += dG_l
        dGp += dGp_l
    return dq, dk, da, db, dG, dGp


@triton.jit
def _diagonal(M, offset: tl.constexpr, axis: tl.constexpr):
    """``M[i, i - offset]`` by rows (``axis=1``) or ``M[j + offset, j]`` by columns (``axis=0``)."""
    i = tl.arange(0, M.shape[0])
    return tl.sum(tl.where(i[:, None] - i[None, :] == offset, M, 0.0), axis=axis)


@triton.jit
def _exclusive_sums(ptrs, step, rows, n, cols_ok, after, before):
    """``(Σ_{r>i} after_r, Σ_{r<i} before_r)`` over a chunk's rows (axis 0): the inclusive scans,
    shifted by one row through memory the program owns and overwrites later (``ptrs``, the
    rows' addresses; ``step`` apart). Subtracting a row from an inclusive scan instead would
    cancel: under strong decay one row can exceed the sum of the others by orders of magnitude."""
    tl.store(ptrs, tl.cumsum(after, axis=0, reverse=True), mask=(rows < n) & cols_ok)
    tl.debug_barrier()
    later = tl.load(ptrs + step, mask=(rows + 1 < n) & cols_ok, other=0.0)
    tl.debug_barrier()
    tl.store(ptrs, tl.cumsum(before, axis=0), mask=(rows < n) & cols_ok)
    tl.debug_barrier()
    earlier = tl.load(ptrs - step, mask=(rows >= 1) & (rows - 1 < n) & cols_ok, other=0.0)
    tl.debug_barrier()
    return later, earlier


@triton.jit
def chunk_grad_keys_kernel(
    q, k, g, a, b, beta, G_CUM, M_SOLVE, A_KK, DA_QK, DA_QB, DA_AK, DM,
    DQ_START, DK_END, DB_END, DX, DDECAY, DECAY_END, DBETA, dq, dk, da, db, dg,
    chunk_bos, chunk_len,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, LEVELS: tl.constexpr, BK: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One (chunk, value head), over channel slices of ``BK``. Writes ``dq, dk, da, db [BT, HV, K]``
    (in the inputs' dtype, or fp32 to be summed over a key head's value heads on the host),
    ``dg [BT, HV(, K)]`` fp32 (its scans pass through it) and adds the solve's share to ``DBETA``."""
    cid, hv, bos, n, i, valid = _chunk_rows(chunk_bos, chunk_len, C)
    h = hv // (HV // H)
    incl = i[:, None] >= i[None, :]
    strict = i[:, None] > i[None, :]
    apart = i[:, None] > i[None, :] + 1  # G_prev_i - G_j spans at least one decay only here

    # The matrices' gradients, masked to the pairs they hold. Pairs at distance 0 (the diagonal;
    # (i, i - 1) for the rank-one rows) have the factor exp(0): they are added directly, below,
    # and pass nothing to the gate.
    dA_qk = tl.where(incl, _load_rows(DA_QK + hv * C, bos, i, valid, HV * C, i, C), 0.0)
    E_qk = tl.where(strict, dA_qk, 0.0)
    e_qk = _diagonal(dA_qk, 0, 1)
    E_kk = E_qk
    E_qb = E_qk
    E_ab = E_qk
    E_ak = E_qk
    if LOWRANK != LOWRANK_NONE:
        M = _load_rows(M_SOLVE + hv * C, bos, i, valid, HV * C, i, C)
        dM = _load_rows(DM + hv * C, bos, i, valid, HV * C, i, C)
        # M = (I + N)⁻¹: dN = -Mᵀ dM Mᵀ (N strictly lower)
        minus_dN = tl.where(strict, _mm(_mm(tl.trans(M), dM, PREC), tl.trans(M), PREC), 0.0)
    if LOWRANK == LOWRANK_TIED:  # N = beta ⊙ A_kk
        A_kk = _load_rows(A_KK + hv * C, bos, i, valid, HV * C, i, C)
        beta_c = tl.load(beta + (bos + i) * HV + hv, mask=valid, other=0.0).to(tl.float32)
        dbeta = tl.load(DBETA + (bos + i) * HV + hv, mask=valid, other=0.0) - tl.sum(A_kk * minus_dN, axis=1)
        tl.store(DBETA + (bos + i) * HV + hv, dbeta, mask=valid)
        E_kk = -beta_c[:, None] * minus_dN
    if LOWRANK == LOWRANK_GENERAL:  # N = -A_ab: dA_ab = -dN
        dA_qb = tl.where(incl, _load_rows(DA_QB + hv * C, bos, i, valid, HV * C, i, C), 0.0)
        dA_ak = tl.where(strict, _load_rows(DA_AK + hv * C, bos, i, valid, HV * C, i, C), 0.0)
        E_qb = tl.where(strict, dA_qb, 0.0)
        E_ab = tl.where(apart, minus_dN, 0.0)
        E_ak = tl.where(apart, dA_ak, 0.0)
        e_qb = _diagonal(dA_qb, 0, 1)
        e_ab_row, e_ab_col = _diagonal(minus_dN, 1, 1), _diagonal(minus_dN, 1, 0)
        e_ak_row, e_ak_col = _diagonal(dA_ak, 1, 1), _diagonal(dA_ak, 1, 0)

    if DECAY == DECAY_SCALAR:
        # One decay per token: the pair factors are a C x C matrix, applied to the E once.
        gs = tl.load(g + (bos + i) * HV + hv, mask=valid, other=0.0).to(tl.float64)
        Gs = tl.cumsum(gs, axis=0)  # fp64: see the channel decays below
        Gs_end = tl.sum(tl.where(i == C - 1, Gs, 0.0), axis=0)
        diff = (Gs[:, None] - Gs[None, :]).to(tl.float32)
        diff_prev = ((Gs - gs)[:, None] - Gs[None, :]).to(tl.float32)
        E_qk = E_qk * tl.exp(tl.where(strict, diff, float("-inf")))
        E_kk = E_kk * tl.exp(tl.where(strict, diff, float("-inf")))
        E_qb = E_qb * tl.exp(tl.where(strict, diff, float("-inf")))
        E_ab = E_ab * tl.exp(tl.where(apart, diff_prev, float("-inf")))
        E_ak = E_ak * tl.exp(tl.where(apart, diff_prev, float("-inf")))
    dG_s = tl.zeros((C,), tl.float32)
    dGp_s = tl.zeros((C,), tl.float32)
    to_end_s = tl.zeros((C,), tl.float32)
    ddecay_s = 0.0

    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        q_t, k_t, a_t, b_t = _key_slices(q, k, a, b, h, bos, i, valid, H, cols, K, LOWRANK)
        if DECAY == DECAY_CHANNEL:
            g_t = _load_rows(g + hv * K, bos, i, valid, HV * K, cols, K).to(tl.float64)
            # fp64 sums: the gate's gradient isolates the factors of a pair or of a token's way
            # to the chunk's end, exp(G_i - G_j), which can be far from 0 while G_i and G_j are
            # not (fp32 G would give them a relative error of |G| · 6e-8). Every exp stays fp32.
            G = tl.cumsum(g_t, axis=0)
            Gp = G - g_t
            dq_t, dk_t, da_t, db_t, dG, dGp = _channel_slice_bwd(
                q_t, k_t, a_t, b_t, G, Gp, G_CUM + hv * K, bos, n, E_qk, E_kk, E_qb, E_ab, E_ak,
                HV * K, cols, K, C, L, LEVELS, LOWRANK, PREC,
            )  # fmt: skip
            G_end = tl.sum(tl.where((i == C - 1)[:, None], G, 0.0), axis=0)
            start = tl.exp(G.to(tl.float32))
            to_end = tl.exp((G_end[None, :] - G).to(tl.float32))
            prev = tl.exp(Gp.to(tl.float32))
        else:
            one = tl.full((C, BK), 1.0, tl.float32)
            dq_t, dk_t, da_t, db_t, dG, dGp = _pairs_bwd(
                strict, E_qk, E_kk, E_qb, E_ab, E_ak, q_t, k_t, a_t, b_t, one, one, one, LOWRANK, PREC
            )
            start = one
            to_end = one
            prev = one
            if DECAY == DECAY_SCALAR:
                start = one * tl.exp(Gs.to(tl.float32))[:, None]
                to_end = one * tl.exp((Gs_end - Gs).to(tl.float32))[:, None]
                prev = one * tl.exp((Gs - gs).to(tl.float32))[:, None]

        # distance-0 pairs: factor 1, no gate
        dq_t += e_qk[:, None] * k_t
        dk_t += e_qk[:, None] * q_t
        if LOWRANK == LOWRANK_GENERAL:
            dq_t += e_qb[:, None] * b_t
            db_t += e_qb[:, None] * q_t
            above = (i >= 1) & (i - 1 < n)
            b_prev = _load_rows(b + h * K, bos, i - 1, above, H * K, cols, K).to(tl.float32)
            k_prev = _load_rows(k + h * K, bos, i - 1, above, H * K, cols, K).to(tl.float32)
            a_next = _load_rows(a + h * K, bos, i + 1, i + 1 < n, H * K, cols, K).to(tl.float32)
            da_t += e_ab_row[:, None] * b_prev + e_ak_row[:, None] * k_prev
            db_t += e_ab_col[:, None] * a_next
            dk_t += e_ak_col[:, None] * a_next

        # the decayed vectors: Q_START = q ⊙ exp(G), K_END = k ⊙ exp(G_C - G), X, B_END
        d_qs = _load_rows(DQ_START + hv * K, bos, i, valid, HV * K, cols, K)
        d_ke = _load_rows(DK_END + hv * K, bos, i, valid, HV * K, cols, K)
        dq_t += d_qs * start
        dG += d_qs * q_t * start
        dk_t += d_ke * to_end
        to_end_grad = d_ke * k_t * to_end  # passes to every decay before the token's end
        if LOWRANK == LOWRANK_TIED:
            d_x = _load_rows(DX + hv * K, bos, i, valid, HV * K, cols, K)
            dk_t += d_x * start
            dG += d_x * k_t * start
        if LOWRANK == LOWRANK_GENERAL:
            d_x = _load_rows(DX + hv * K, bos, i, valid, HV * K, cols, K)
            d_be = _load_rows(DB_END + hv * K, bos, i, valid, HV * K, cols, K)
            da_t += d_x * prev
            dGp += d_x * a_t * prev
            db_t += d_be * to_end
            to_end_grad += d_be * b_t * to_end
            _store_rows(da + hv * K, da_t, bos, i, valid, HV * K, cols, K)
            _store_rows(db + hv * K, db_t, bos, i, valid, HV * K, cols, K)
        _store_rows(dq + hv * K, dq_t, bos, i, valid, HV * K, cols, K)
        _store_rows(dk + hv * K, dk_t, bos, i, valid, HV * K, cols, K)

        if DECAY != DECAY_NONE:
            # G_i = Σ_{t<=i} g_t, G_prev_i = Σ_{t<i} g_t, G_C - G_i = Σ_{t>i} g_t:
            # dg_t = Σ_{i>=t} dG_i + Σ_{i>t} dGp_i + Σ_{i<t} dTo_end_i + exp(G_C) d exp(G_C).
            ddecay = tl.load(DDECAY + (cid * HV + hv) * K + cols, mask=cols < K, other=0.0)
            ddecay *= tl.load(DECAY_END + (cid * HV + hv) * K + cols, mask=cols < K, other=0.0)
            if DECAY == DECAY_CHANNEL:
                ptrs = dg + hv * K + (bos + i)[:, None] * (HV * K) + cols[None, :]
                later, earlier = _exclusive_sums(ptrs, HV * K, i[:, None], n, (cols < K)[None, :], dGp, to_end_grad)
                dg_t = tl.cumsum(dG, axis=0, reverse=True) + later + earlier + ddecay[None, :]
                _store_rows(dg + hv * K, dg_t, bos, i, valid, HV * K, cols, K)
            else:  # one gate for all channels
                dG_s += tl.sum(dG, axis=1)
                dGp_s += tl.sum(dGp, axis=1)
                to_end_s += tl.sum(to_end_grad, axis=1)
                ddecay_s += tl.sum(ddecay, axis=0)
    if DECAY == DECAY_SCALAR:
        ptrs = dg + hv + (bos + i) * HV
        later, earlier = _exclusive_sums(ptrs, HV, i, n, True, dGp_s, to_end_s)
        tl.store(ptrs, tl.cumsum(dG_s, axis=0, reverse=True) + later + earlier + ddecay_s, mask=valid)
