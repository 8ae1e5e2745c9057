"""The intra-chunk matrices against their definition, element by element, in every regime."""

from __future__ import annotations

import pytest
import torch

from dplr.torch_chunk.cumsum import chunk_decays
from dplr.torch_chunk.intra import Pairwise
from dplr.transition import Decay


def brute(x, y, gx, gy, offset):
    """A[i, j] = Σ_d x_id y_jd exp(gx_id - gy_jd) for j <= i - offset (channel or scalar logs)."""
    C = x.shape[-2]
    if gx.dim() == x.dim() - 1:
        gx, gy = gx[..., None].expand_as(x), gy[..., None].expand_as(y)
    A = torch.zeros(*x.shape[:-2], C, C, dtype=torch.float64)
    for i in range(C):
        for j in range(i - offset + 1):
            A[..., i, j] = (x[..., i, :] * y[..., j, :] * torch.exp(gx[..., i, :] - gy[..., j, :])).sum(-1)
    return A


@pytest.mark.parametrize("decay", [Decay.SCALAR, Decay.CHANNEL])
# Twice the mean decay per step: mild, Kimi-bound-like, extreme, and a mix of them by chunk and head
# (whole-chunk factorisation and the safe path side by side).
@pytest.mark.parametrize("gate", [0.3, 4.0, 60.0, "mixed"])
@pytest.mark.parametrize("C", [16, 64])
def test_products_match_definition(decay, gate, C):
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, C, 8)
    x, y = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(2))
    if gate == "mixed":
        gate = torch.tensor([[0.3, 4.0, 60.0], [60.0, 0.3, 0.3]], dtype=torch.float64)[:, :, None]
        gate = gate[..., None] if decay is Decay.CHANNEL else gate
    g = -gate * torch.rand(*(shape if decay is Decay.CHANNEL else shape[:-1]), generator=gen, dtype=torch.float64)
    decays = chunk_decays(g, sub=min(16, C))
    G = torch.cumsum(g, dim=2)
    G_prev = torch.cat([torch.zeros_like(G[:, :, :1]), G[:, :, :-1]], dim=2)
    factor = torch.exp(G) if decay is Decay.CHANNEL else torch.exp(G)[..., None]
    to_end = torch.exp(G[:, :, -1:] - G)
    # With a graph the exp(0) pairs are taken apart; without one the columns may come from the start
    # factor by division (channel decay, every chunk fast): both against the definition.
    for recording in (True, False):
        pairs = Pairwise(decays, decay, torch.float64, recording=recording)
        rows, prev_rows, cols = pairs.rows(x), pairs.rows(x, prev=True), pairs.cols(y)
        torch.testing.assert_close(pairs.product(rows, cols, strict=False), brute(x, y, G, G, 0))
        torch.testing.assert_close(pairs.product(rows, cols, strict=True), brute(x, y, G, G, 1))
        torch.testing.assert_close(pairs.product(prev_rows, cols, strict=True), brute(x, y, G_prev, G, 1))
        torch.testing.assert_close(pairs.from_start(rows), x * factor)
        torch.testing.assert_close(pairs.to_end(cols), y * (to_end if decay is Decay.CHANNEL else to_end[..., None]))


def test_fp32_products_are_finite_under_extreme_gates():
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(4, 1, 64, 16, generator=gen, requires_grad=True) for _ in range(2))
    g = (-60.0 * torch.rand(4, 1, 64, 16, generator=gen, dtype=torch.float64)).requires_grad_(True)
    decays = chunk_decays(g.float(), sub=16)
    pairs = Pairwise(decays, Decay.CHANNEL, torch.float32)
    A = pairs.product(pairs.rows(x), pairs.cols(y), strict=False)
    A.square().sum().backward()
    assert torch.isfinite(A).all()
    assert all(torch.isfinite(t.grad).all() for t in (x, y, g))
