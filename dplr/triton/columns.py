"""The value-side decay ``gv`` on the GPU (docs/value-decay.md): the factors of a chunk's state
columns and the column-decayed product ``Y = (A ∘ F) Z``, forward and backward.

``GV`` is a chunk's inclusive sum of ``gv`` from the chunk's start, stored in fp64 by
:func:`~dplr.triton.intra.chunk_prepare_kernel` (``[BT, HV, V]``). Every factor is an ``exp``
of a *difference* of these sums, rounded to fp32 only then: under strong gates ``|GV|`` reaches
thousands inside a chunk, and fp32 sums would give ``exp(GV_i - GV_j)`` a relative error of
``|GV| · 6e-8`` where that factor is what the gate's gradient is made of. No ``exp(-GV)`` is
ever formed, and every factor is ``<= 1``:

* ``exp(GV_i)``, ``exp(GV_C - GV_j)``, ``exp(GV_C)``;
* ``((A ∘ F) Z)[i, c] = Σ_{j <= i} A[i, j] exp(GV_ic - GV_jc) Z[j, c]`` by pairwise merges, level
  by level from the chunk's halves down to single tokens: at a level of halves of ``h`` tokens,
  the lower half's rows meet the upper half's columns at ``c``, the sum at the upper half's end,
  as ``exp(GV_i - c) · exp(c - GV_j)``, one tensor-core product per level (``log2 C`` in all;
  every pair ``j < i`` meets at exactly one level, the highest bit in which ``i`` and ``j``
  differ). Unlike the key side (:mod:`dplr.triton.intra`) there are no sub-blocks against a
  middle, so no clamps and no exact fallback for fast-decaying blocks: every gate takes the
  same path, for ``log2 C`` masked products where the sub-blocks take ``1 + log2(C / 16)``
  (sm_90, KDA's forward state pass at BV = 32: 2.4 KiB of stack per thread against 1.6 KiB
  for sub-blocks with the fallback; the state passes run ``gv`` on blocks of 16 for it);
* the pairs ``j = i`` (factor ``exp(0)``) are added apart and pass nothing to the gate, as on
  the key side.

The backward of ``Y`` gives ``dZ = (A ∘ F)ᵀ dY``, ``dA = Σ_c F ⊙ (dY Zᵀ)`` and the gradient of
``GV`` through the factors: ``+dY ⊙ Y`` on the rows, ``-Z ⊙ dZ`` on the columns (over the pairs
that carry a factor).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .intra import _gather_G


@triton.jit
def _sums(GV, row0, n, vcols, stride, V, C: tl.constexpr):
    """The chunk's cumulative decays ``GV [C, BV]`` (fp64), rows past the end at the last."""
    return _gather_G(GV, row0, tl.arange(0, C), n, stride, vcols, V)


@triton.jit
def column_ends(GV, row0, n, vcols, stride, V, C: tl.constexpr):
    """``(exp(GV_i), exp(GV_C - GV_i), exp(GV_C))`` of the columns ``vcols`` of a chunk of ``n``
    tokens, fp32 ``[C, BV], [C, BV], [BV]``. Rows past the end read the last (no decay there)."""
    G = _sums(GV, row0, n, vcols, stride, V, C)
    G_end = tl.load(GV + (row0 + n - 1) * stride + vcols, mask=vcols < V, other=0.0)
    return tl.exp(G.to(tl.float32)), tl.exp((G_end[None, :] - G).to(tl.float32)), tl.exp(G_end.to(tl.float32))


@triton.jit
def _level(GV, row0, n, vcols, stride, V, C: tl.constexpr, level: tl.constexpr):
    """Merge ``level`` (halves of ``C >> (level + 1)`` tokens): the row factors ``exp(GV_i - c)``
    of the lower halves, the column factors ``exp(c - GV_j)`` of the upper halves (one ``exp``
    per element: both are ``exp(-|GV - c|)``) and the pairs they serve. The fp64 sums are
    gathered here, where they are used, rather than held across the levels: they are read from
    L1, and registers are what the state pass lacks."""
    i = tl.arange(0, C)
    half = C >> (level + 1)
    c = _gather_G(GV, row0, (i // (2 * half)) * (2 * half) + half - 1, n, stride, vcols, V)
    f = tl.exp(-tl.abs((_sums(GV, row0, n, vcols, stride, V, C) - c).to(tl.float32)))
    lower = ((i % (2 * half)) >= half)[:, None]
    meet = ((i[:, None] // (2 * half)) == (i[None, :] // (2 * half))) & ((i[:, None] % (2 * half)) >= half)
    meet = meet & ((i[None, :] % (2 * half)) < half)
    return tl.where(lower, f, 0.0), tl.where(lower, 0.0, f), meet


@triton.jit
def _diagonal(A):
    i = tl.arange(0, A.shape[0])
    return tl.sum(tl.where(i[:, None] == i[None, :], A, 0.0), axis=1)


@triton.jit
def column_product(A, Z, GV, row0, n, vcols, stride, V, C: tl.constexpr, MERGES: tl.constexpr, PREC: tl.constexpr):
    """``(A ∘ F) Z`` for a lower-triangular ``A [C, C]`` and ``Z [C, BV]``, fp32; ``MERGES = log2(C)``."""
    A = A.to(tl.float32)
    Z = Z.to(tl.float32)
    Y = _diagonal(A)[:, None] * Z
    for level in tl.static_range(MERGES):
        x_f, y_f, meet = _level(GV, row0, n, vcols, stride, V, C, level)
        Y += x_f * tl.dot(tl.where(meet, A, 0.0), Z * y_f, input_precision=PREC)
    return Y


@triton.jit
def column_product_bwd(
    A, Z, dY, GV, row0, n, vcols, stride, V,
    C: tl.constexpr, MERGES: tl.constexpr, PREC: tl.constexpr, GRADS: tl.constexpr,
):  # fmt: skip
    """``dZ = (A ∘ F)ᵀ dY``; with ``GRADS`` also ``dA [C, C]`` (every pair, the diagonal included)
    and ``dGV [C, BV]``, the gradient of the cumulative decays through the factors (without
    ``GRADS``, ``Z`` goes unused and the two come back as zeros)."""
    i = tl.arange(0, C)
    A = A.to(tl.float32)
    dY = dY.to(tl.float32)
    Z = Z.to(tl.float32)
    dZ = _diagonal(A)[:, None] * dY  # the pairs j = i: factor exp(0), nothing to the gate
    dA = tl.zeros((C, C), tl.float32)
    dG = tl.zeros_like(dY)
    if GRADS:
        dA = tl.where(i[:, None] == i[None, :], tl.sum(dY * Z, axis=1)[:, None], 0.0)
    for level in tl.static_range(MERGES):
        x_f, y_f, meet = _level(GV, row0, n, vcols, stride, V, C, level)
        A_m = tl.where(meet, A, 0.0)
        dZ_l = y_f * tl.dot(tl.trans(A_m), x_f * dY, input_precision=PREC)
        dZ += dZ_l
        if GRADS:
            Z_f = Z * y_f
            dA += tl.where(meet, tl.dot(x_f * dY, tl.trans(Z_f), input_precision=PREC), 0.0)
            dG += dY * x_f * tl.dot(A_m, Z_f, input_precision=PREC) - Z * dZ_l
    return dZ, dA, dG
