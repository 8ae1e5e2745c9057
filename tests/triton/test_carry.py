"""The context-parallel exchange's per-token products (dplr.triton.carry) against einsum."""

from __future__ import annotations

import pytest
import torch

from . import DEVICE, TRITON

pytestmark = pytest.mark.skipif(not TRITON, reason="triton is not installed")


def _expected(y, carry, scale, add):
    out = torch.einsum("bthm,bhmn->bthn", y.double(), carry.double())
    if scale is not None:
        out = out * scale.double()
    return out if add is None else out + add.double()


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_add", [False, True])
def test_matches_einsum_on_strided_views(with_scale, with_add):
    from dplr.triton.carry import carry_product

    gen = torch.Generator().manual_seed(0)
    rows, L, HV, DM, DN = 2, 70, 3, 48, 40  # sizes off the blocks of 64 in every direction
    wide = torch.randn(rows, L, HV, DN + DM, generator=gen).to(DEVICE)  # [o⁰ | y], as the exchange holds it
    y, add = wide[..., DN:], wide[..., :DN] if with_add else None
    carry = torch.randn(rows, HV, DN, DM, generator=gen).to(DEVICE).transpose(-1, -2)  # a transposed view
    scale = torch.rand(rows, L, HV, DN, generator=gen).to(DEVICE) if with_scale else None
    out = torch.full((rows, L, HV, DN + 8), float("nan"), device=DEVICE)[..., 8:]  # written through strides
    carry_product(y, carry, out=out, scale=scale, add=add)
    expected = _expected(y, carry, scale, add)
    # tf32 products on a GPU (the carry rounded to 2^-11); the interpreter computes in fp32
    tol = 1e-5 if DEVICE == "cpu" else 3e-3
    assert (out.double() - expected).norm() <= tol * expected.norm()


def test_expanded_scale_and_rejected_shapes():
    from dplr.triton.carry import carry_product

    y = torch.randn(1, 5, 2, 16, device=DEVICE)
    carry = torch.randn(1, 2, 16, 16, device=DEVICE)
    scale = torch.ones(1, 1, 1, 1, device=DEVICE).expand(1, 5, 2, 16)  # as autograd hands o.sum()'s gradient
    out = carry_product(y, carry, out=torch.empty(1, 5, 2, 16, device=DEVICE), scale=scale)
    expected = _expected(y, carry, None, None)
    assert (out.double() - expected).norm() <= (1e-5 if DEVICE == "cpu" else 3e-3) * expected.norm()
    with pytest.raises(ValueError, match="do not agree"):
        carry_product(y, carry[:, :, :8], out=torch.empty(1, 5, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="scale"):
        carry_product(y, carry, out=torch.empty(1, 5, 2, 16, device=DEVICE), scale=scale[:, :4])
