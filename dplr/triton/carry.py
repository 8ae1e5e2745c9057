"""The context-parallel exchange's per-token products on the GPU (:mod:`dplr.distributed.exchange`):
``out = (Y C) ⊙ M + A`` per head, one pass over the tokens.

``Y [rows, L, HV, DM]`` holds the tokens (the head's widened output ``y``, or ``dO``), ``C`` a
per-head fp32 ``[DM, DN]`` matrix (the carry, or a transposed view of it), ``M, A
[rows, L, HV, DN]`` are optional (``Q`` or ``dO``; ``o⁰``). Every tensor is read through its
strides (the two halves of ``[o⁰ | y]``, an expanded ``dO``): nothing is copied. In PyTorch the
same result takes a widening copy of ``Y``, a GEMM whose output is permuted, and one pass per
``⊙``, ``+`` and rounding, each over ``L · HV · DN`` fp32 values; on the last rank of a 2-GPU
run (H200, ``L`` = 111K tokens, 16 heads, K = V = 128) those copies and adds were the largest
items after the chunk kernels (aten::copy_ 3.8 ms, add_ 2.7 ms per step). Products run on TF32
(16-bit ``Y`` is exact there, ``C`` is rounded to 2⁻¹¹), sums in fp32, one rounding at the
store: the numerics of the PyTorch path it replaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BT, BM, BN = 64, 64, 64  # tokens, contraction and output columns per program


@triton.jit
def carry_product_kernel(
    Y, C, M, A, OUT,
    L, HV, DM, DN,
    y_r, y_t, y_h, y_d, c_r, c_h, c_m, c_n, m_r, m_t, m_h, m_d, a_r, a_t, a_h, a_d, o_r, o_t, o_h, o_d,
    HAS_M: tl.constexpr, HAS_A: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """One block of ``BT`` tokens, one (row, head), ``BN`` output columns."""
    rh = tl.program_id(1)
    r, h = rh // HV, rh % HV
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    t_ok, n_ok = t < L, n < DN
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for m0 in range(0, DM, BM):
        m = m0 + tl.arange(0, BM)
        y = tl.load(Y + r * y_r + h * y_h + t[:, None] * y_t + m[None, :] * y_d, mask=t_ok[:, None] & (m < DM)[None, :],
                    other=0.0)  # fmt: skip
        c = tl.load(C + r * c_r + h * c_h + m[:, None] * c_m + n[None, :] * c_n, mask=(m < DM)[:, None] & n_ok[None, :],
                    other=0.0)  # fmt: skip
        acc += tl.dot(y.to(tl.float32), c.to(tl.float32), input_precision="tf32")
    mask = t_ok[:, None] & n_ok[None, :]
    if HAS_M:
        acc *= tl.load(M + r * m_r + h * m_h + t[:, None] * m_t + n[None, :] * m_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_A:
        acc += tl.load(A + r * a_r + h * a_h + t[:, None] * a_t + n[None, :] * a_d, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + r * o_r + h * o_h + t[:, None] * o_t + n[None, :] * o_d, acc.to(OUT.dtype.element_ty), mask=mask)


def carry_product(
    y: torch.Tensor,
    carry: torch.Tensor,
    *,
    out: torch.Tensor,
    scale: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = (y @ carry) ⊙ scale + add`` per (row, head): ``y [rows, L, HV, DM]``,
    ``carry [rows, HV, DM, DN]`` (a transposed view gives ``y Cᵀ``), ``scale``, ``add`` and
    ``out`` ``[rows, L, HV, DN]``, all with any strides. Returns ``out``."""
    rows, L, HV, DM = y.shape
    DN = out.shape[-1]
    if carry.shape != (rows, HV, DM, DN) or out.shape != (rows, L, HV, DN):
        raise ValueError(
            f"carry_product: y {tuple(y.shape)}, carry {tuple(carry.shape)} and out {tuple(out.shape)} do not agree"
        )
    for name, x in (("scale", scale), ("add", add)):
        if x is not None and x.shape != out.shape:
            raise ValueError(f"carry_product: {name} {tuple(x.shape)} must match out {tuple(out.shape)}")
    strides = [*y.stride(), *carry.stride()]
    for x in (scale, add, out):
        strides += x.stride() if x is not None else (0, 0, 0, 0)
    if rows and L and HV and DN:
        grid = (triton.cdiv(L, BT), rows * HV, triton.cdiv(DN, BN))
        carry_product_kernel[grid](
            y, carry, out if scale is None else scale, out if add is None else add, out,
            L, HV, DM, DN, *strides,
            HAS_M=scale is not None, HAS_A=add is not None,
            BT=BT, BM=BM, BN=BN, num_warps=4,
        )  # fmt: skip
    return out
