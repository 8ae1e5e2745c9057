"""The value-side decay ``gv`` on the GPU (docs/value-decay.md): the factors of a chunk's state
columns and the column-decayed product ``Y = (A ∘ F) Z``, forward and backward.

``GV`` is a chunk's inclusive sum of ``gv`` from the chunk's start, stored in fp64 by
:func:`chunk_value_sums_kernel` (``[BT, HV, V]``). Every factor is an ``exp``
of a *difference* of these sums, rounded to fp32 only then: under strong gates ``|GV|`` reaches
thousands inside a chunk, and fp32 sums would give ``exp(GV_i - GV_j)`` a relative error of
``|GV| · 6e-8`` where that factor is what the gate's gradient is made of. Every factor is
``<= 1``, except ``exp(-GV)`` on a chunk that decays by at most ``CHUNK_LIMIT`` (below):

* ``exp(GV_i)``, ``exp(GV_C - GV_j)``, ``exp(GV_C)``;
* ``((A ∘ F) Z)[i, c] = Σ_{j <= i} A[i, j] exp(GV_ic - GV_jc) Z[j, c]``, in one of two ways per
  program (chunk, value head, block of columns), chosen at run time:

  - a chunk whose columns decay by at most ``CHUNK_LIMIT`` (60, as on the PyTorch path; trained
    gates decay a chunk of 64 by about 5 to 30) is factorised whole against its start:
    ``exp(GV_i) · [A (Z ⊙ exp(-GV_j))]``, one tensor-core product, with row factors ``<= 1`` and
    column factors ``<= exp(60)``: normal fp32 numbers, far from overflow in the products;
  - any other chunk takes pairwise merges, level by level from the chunk's halves down to single
    tokens: at a level of halves of ``h`` tokens, the lower half's rows meet the upper half's
    columns at ``c``, the sum at the upper half's end, as ``exp(GV_i - c) · exp(c - GV_j)``, both
    ``<= 1``, one product per level (``log2 C`` in all; every pair ``j < i`` meets at exactly one
    level, the highest bit in which ``i`` and ``j`` differ). Every gate takes this path safely,
    -60 per step included; it costs ``log2 C`` products and exponentials per element where the
    whole chunk takes one of each;
* the pairs ``j = i`` (factor ``exp(0)``) are added apart and pass nothing to the gate, as on
  the key side.

The backward of ``Y`` gives ``dZ = (A ∘ F)ᵀ dY``, ``dA = Σ_c F ⊙ (dY Zᵀ)`` and the gradient of
``GV`` through the factors: ``+dY ⊙ Y`` on the rows, ``-Z ⊙ dZ`` on the columns (over the pairs
that carry a factor).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..torch_chunk.intra import CHUNK_LIMIT as _CHUNK_LIMIT
from .intra import _chunk_rows, _gather_G, _load_rows, _store_rows
from .structure import LOWRANK_GENERAL, LOWRANK_NONE, LOWRANK_TIED

CHUNK_LIMIT = tl.constexpr(_CHUNK_LIMIT)  # as on the PyTorch path: a chunk decaying less is factorised whole


@triton.jit
def _sums(GV, row0, n, vcols, stride, V, C: tl.constexpr):
    """The chunk's cumulative decays ``GV [C, BV]`` (fp64), rows past the end at the last."""
    return _gather_G(GV, row0, tl.arange(0, C), n, stride, vcols, V)


@triton.jit
def column_factors(GV, row0, n, vcols, stride, V, C: tl.constexpr):
    """The factors of the columns ``vcols`` of a chunk of ``n`` tokens, computed once per block of
    columns and shared by every product that reads them: ``exp(GV_i)`` and ``exp(GV_C - GV_i)``
    (fp32 ``[C, BV]``), ``exp(GV_C)`` (``[BV]``); whether the chunk is factorised whole (it decays
    by at most ``CHUNK_LIMIT`` in every column: ``GV`` decreases down the chunk, so its least is
    the chunk's decay) and, for that path, ``exp(-GV_j) <= exp(CHUNK_LIMIT)`` (its exponent clamped
    only so that it stays finite where the path is not taken). Rows past the end read the last
    (no decay there). Callers that only scale by the first three leave the rest unused."""
    G = _sums(GV, row0, n, vcols, stride, V, C)
    G_end = tl.load(GV + (row0 + n - 1) * stride + vcols, mask=vcols < V, other=0.0)
    whole = tl.min(G) >= -CHUNK_LIMIT
    rise = tl.exp(tl.minimum(-G, CHUNK_LIMIT).to(tl.float32))
    start = tl.exp(G.to(tl.float32))
    to_end = tl.exp((G_end[None, :] - G).to(tl.float32))
    return start, to_end, tl.exp(G_end.to(tl.float32)), whole, rise


@triton.jit
def _level(GV, row0, n, vcols, stride, V, C: tl.constexpr, MERGES: tl.constexpr, level):
    """Merge ``level`` (a run-time value: the merges are a loop, not unrolled, see below): pairs of
    halves of ``h = C >> (level + 1)`` tokens. Returns the row factors ``exp(GV_i - c)`` of the
    lower halves, the column factors ``exp(c - GV_j)`` of the upper halves (one ``exp`` per element:
    both are ``exp(-|GV - c|)``) and the pairs they serve. Halves and pairs are bits of the token
    index: ``i >> (MERGES - level)`` names the pair, bit ``h`` of ``i`` the half. The fp64 sums are
    gathered here, where they are used, rather than held across the levels: they are read from
    L1, and registers are what the kernels lack.

    Unrolled, the ``log2 C`` merges of each product made the backward's values kernel take 200 s
    to compile for sm_90 (bf16 KDA, K = V = 128, C = 64) and longer in fp32; as a loop, its code
    holds one merge per product."""
    i = tl.arange(0, C)
    pair_shift = MERGES - level  # log2 of a pair's length
    half = 1 << (pair_shift - 1)
    c = _gather_G(GV, row0, ((i >> pair_shift) << pair_shift) + half - 1, n, stride, vcols, V)
    f = tl.exp(-tl.abs((_sums(GV, row0, n, vcols, stride, V, C) - c).to(tl.float32)))
    lower = ((i & half) != 0)[:, None]  # the later half of a pair: its rows read the earlier half
    meet = ((i[:, None] >> pair_shift) == (i[None, :] >> pair_shift)) & lower & ((i[None, :] & half) == 0)
    return tl.where(lower, f, 0.0), tl.where(lower, 0.0, f), meet


@triton.jit
def _diagonal(A):
    i = tl.arange(0, A.shape[0])
    return tl.sum(tl.where(i[:, None] == i[None, :], A, 0.0), axis=1)


@triton.jit
def column_product(
    A, Z, whole, start, rise, GV, row0, n, vcols, stride, V,
    C: tl.constexpr, MERGES: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``(A ∘ F) Z`` for a lower-triangular ``A [C, C]`` and ``Z [C, BV]``, fp32; ``MERGES = log2(C)``;
    ``whole, start, rise`` from :func:`column_factors`. A chunk that decays by at most
    ``CHUNK_LIMIT`` takes one product (``exp(GV_i) · [A (Z ⊙ exp(-GV_j))]``); a faster one the merges."""
    A = A.to(tl.float32)
    Z = Z.to(tl.float32)
    i = tl.arange(0, C)
    Y = _diagonal(A)[:, None] * Z
    if whole:
        Y += start * tl.dot(tl.where(i[:, None] > i[None, :], A, 0.0), Z * rise, input_precision=PREC)
    else:
        for level in tl.range(MERGES):
            x_l, y_l, meet = _level(GV, row0, n, vcols, stride, V, C, MERGES, level)
            Y += x_l * tl.dot(tl.where(meet, A, 0.0), Z * y_l, input_precision=PREC)
    return Y


@triton.jit
def _pairs_bwd(A, Z, dY, pairs, x_f, y_f, dZ, dA, dG, PREC: tl.constexpr, GRADS: tl.constexpr):
    """Adds to ``(dZ, dA, dG)`` (see :func:`column_product_bwd`) the backward of
    ``x_f ⊙ [(A ⊙ pairs) (Z ⊙ y_f)]``, the share of ``(A ∘ F) Z`` of the pairs ``pairs`` whose
    factor is ``x_f[i] · y_f[j]`` (``dA``, ``dG`` only with ``GRADS``; ``dG`` gets ``+dY ⊙ Y`` on
    the rows, ``-Z ⊙ dZ`` on the columns)."""
    A_p = tl.where(pairs, A, 0.0)
    dZ_p = y_f * tl.dot(tl.trans(A_p), x_f * dY, input_precision=PREC)
    dZ += dZ_p
    if GRADS:
        Z_f = Z * y_f
        dA += tl.where(pairs, tl.dot(x_f * dY, tl.trans(Z_f), input_precision=PREC), 0.0)
        dG += dY * x_f * tl.dot(A_p, Z_f, input_precision=PREC) - Z * dZ_p
    return dZ, dA, dG


@triton.jit
def column_product_bwd(
    A, Z, dY, whole, start, rise, GV, row0, n, vcols, stride, V,
    C: tl.constexpr, MERGES: tl.constexpr, PREC: tl.constexpr, GRADS: tl.constexpr,
):  # fmt: skip
    """``dZ = (A ∘ F)ᵀ dY``; with ``GRADS`` also ``dA [C, C]`` (every pair, the diagonal included)
    and ``dGV [C, BV]``, the gradient of the cumulative decays through the factors (without
    ``GRADS``, ``Z`` goes unused and the two come back as zeros). The same two paths as
    :func:`column_product`."""
    i = tl.arange(0, C)
    A = A.to(tl.float32)
    dY = dY.to(tl.float32)
    Z = Z.to(tl.float32)
    dZ = _diagonal(A)[:, None] * dY  # the pairs j = i: factor exp(0), nothing to the gate
    dA = tl.zeros((C, C), tl.float32)
    dG = tl.zeros_like(dY)
    if GRADS:
        dA = tl.where(i[:, None] == i[None, :], tl.sum(dY * Z, axis=1)[:, None], 0.0)
    if whole:
        dZ, dA, dG = _pairs_bwd(A, Z, dY, i[:, None] > i[None, :], start, rise, dZ, dA, dG, PREC, GRADS)
    else:
        for level in tl.range(MERGES):
            x_l, y_l, meet = _level(GV, row0, n, vcols, stride, V, C, MERGES, level)
            dZ, dA, dG = _pairs_bwd(A, Z, dY, meet, x_l, y_l, dZ, dA, dG, PREC, GRADS)
    return dZ, dA, dG


@triton.jit
def chunk_value_sums_kernel(
    gv, GV_CUM, chunk_bos, chunk_len, HV: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr
):
    """``GV_CUM [BT, HV, V]`` fp64, each chunk's inclusive sums of ``gv [BT, HV, V]``, one program per
    (chunk, value head, block of value columns): a pass over memory alone, every chunk in parallel.
    (Inside the per-chunk kernel of the key side it cost an H200 about 1 ms of KDA's 6 ms forward
    at (4, 8192, 16, 128): that kernel's programs run few at a time and one after another.)"""
    _, hv, bos, _, i, valid = _chunk_rows(chunk_bos, chunk_len, C)
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)
    gv_t = _load_rows(gv + hv * V, bos, i, valid, HV * V, vcols, V).to(tl.float64)
    _store_rows(GV_CUM + hv * V, tl.cumsum(gv_t, axis=0), bos, i, valid, HV * V, vcols, V)


@triton.jit
def chunk_columns_kernel(
    M_SOLVE, A_AK, A_QK, A_QB, GV_CUM, v, beta, U_COL, O_COL,
    chunk_bos, chunk_len,
    HV: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, MERGES: tl.constexpr,
    LOWRANK: tl.constexpr, STORE_O: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The column-decayed products of a chunk that do not read its initial state, one program per
    (chunk, value head, block of value columns), all chunks in parallel, so that the sequential
    state pass (:mod:`dplr.triton.state`) is left with plain products:

    * ``U_COL = (N ∘ F) Z``, the part of the pseudo-values ``P = exp(GV) ⊙ (W S) + U`` that
      the state does not reach (tied: ``N = M``, ``Z = beta ⊙ v``; general: ``N = M A_ak``, ``Z = v``);
    * with ``STORE_O``, ``O_COL = (A_qk ∘ F) U`` (tied), ``(A_qk ∘ F) v`` (none), or
      ``(A_qk ∘ F) v + (A_qb ∘ F) U`` (general). The state's share of the output needs no column
      product: ``(A ∘ F) (exp(GV) ⊙ W S) = exp(GV) ⊙ (A (W S))``, the factors cancelling.

    Both ``[BT, HV, V]`` fp32."""
    _, hv, bos, n, i, valid = _chunk_rows(chunk_bos, chunk_len, C)
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)
    GV = GV_CUM + hv * V
    start, _, _, whole, rise = column_factors(GV, bos, n, vcols, HV * V, V, C)
    v_c = _load_rows(v + hv * V, bos, i, valid, HV * V, vcols, V).to(tl.float32)
    U = v_c
    if LOWRANK != LOWRANK_NONE:
        m_c = _load_rows(M_SOLVE + hv * C, bos, i, valid, HV * C, i, C).to(tl.float32)
        if LOWRANK == LOWRANK_TIED:
            beta_c = tl.load(beta + (bos + i) * HV + hv, mask=valid, other=0.0).to(tl.float32)
            Z = beta_c[:, None] * v_c
            U = column_product(m_c, Z, whole, start, rise, GV, bos, n, vcols, HV * V, V, C, MERGES, PREC)
        else:
            a_ak = _load_rows(A_AK + hv * C, bos, i, valid, HV * C, i, C).to(tl.float32)
            N = tl.dot(m_c, a_ak, input_precision=PREC)
            U = column_product(N, v_c, whole, start, rise, GV, bos, n, vcols, HV * V, V, C, MERGES, PREC)
        _store_rows(U_COL + hv * V, U, bos, i, valid, HV * V, vcols, V)
    if STORE_O:
        A_qk = _load_rows(A_QK + hv * C, bos, i, valid, HV * C, i, C)
        Z = U if LOWRANK == LOWRANK_TIED else v_c
        out = column_product(A_qk, Z, whole, start, rise, GV, bos, n, vcols, HV * V, V, C, MERGES, PREC)
        if LOWRANK == LOWRANK_GENERAL:
            A_qb = _load_rows(A_QB + hv * C, bos, i, valid, HV * C, i, C)
            out += column_product(A_qb, U, whole, start, rise, GV, bos, n, vcols, HV * V, V, C, MERGES, PREC)
        _store_rows(O_COL + hv * V, out, bos, i, valid, HV * V, vcols, V)


@triton.jit
def chunk_columns_bwd_kernel(
    A_READ, GV_CUM, do, D_COL,
    chunk_bos, chunk_len, scale,
    HV: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, MERGES: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``D_COL = (A ∘ F)ᵀ (scale · dO)`` ``[BT, HV, V]`` fp32 for a lower-triangular ``A [BT, HV, C]``
    (``A_qk`` tied, ``A_qb`` general): the gradient of the pseudo-values through the output,
    which the state pass backwards (:func:`~dplr.triton.state.chunk_state_bwd_kernel`) would
    otherwise form chunk after chunk. One program per (chunk, value head, block of value columns)."""
    _, hv, bos, n, i, valid = _chunk_rows(chunk_bos, chunk_len, C)
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)
    A = _load_rows(A_READ + hv * C, bos, i, valid, HV * C, i, C)
    do_c = _load_rows(do + hv * V, bos, i, valid, HV * V, vcols, V).to(tl.float32) * scale
    GV = GV_CUM + hv * V
    start, _, _, whole, rise = column_factors(GV, bos, n, vcols, HV * V, V, C)
    D, _, _ = column_product_bwd(
        A, do_c, do_c, whole, start, rise, GV, bos, n, vcols, HV * V, V, C, MERGES, PREC, False
    )  # fmt: skip
    _store_rows(D_COL + hv * V, D, bos, i, valid, HV * V, vcols, V)
