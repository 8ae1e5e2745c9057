"""The S4-style time-invariant DPLR layer against a direct token-by-token scan written here
from the layer's docstring, forward and gradients; its transition is a contraction."""

from __future__ import annotations

import pytest
import torch

from dplr.layers import S4DPLR

D = 32


def make(dtype=torch.float64, **options) -> S4DPLR:
    torch.manual_seed(0)
    layer = S4DPLR(D, num_heads=2, head_dim=8, **options).to(dtype)
    with torch.no_grad():  # away from the initial values, so every parameter matters
        layer.strength.normal_()
        layer.log_rate.add_(torch.randn_like(layer.log_rate))
    return layer


def transition_matrix(layer: S4DPLR) -> torch.Tensor:
    """``(I - σ κ̂ κ̂ᵀ) Diag(exp(w))`` per head, ``[H, K, K]``."""
    decay = torch.exp(-torch.exp(layer.log_rate))
    kappa = layer.kappa / layer.kappa.norm(dim=-1, keepdim=True)
    sigma = torch.sigmoid(layer.strength)[:, None, None]
    eye = torch.eye(kappa.shape[-1], dtype=kappa.dtype)
    return (eye - sigma * kappa[:, :, None] * kappa[:, None, :]) @ torch.diag_embed(decay)


def scan(layer: S4DPLR, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_t = A S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t / √K``, then norm and output projection."""
    h = layer.heads
    B, T, _ = x.shape
    q, k = (proj(x).view(B, T, h.num_heads, h.head_k_dim) for proj in (layer.q_proj, layer.k_proj))
    v = layer.v_proj(x).view(B, T, h.num_heads, h.head_v_dim)
    A = transition_matrix(layer)
    S = x.new_zeros(B, h.num_heads, h.head_k_dim, h.head_v_dim)
    outs = []
    for t in range(T):
        S = A @ S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * h.head_k_dim**-0.5)
    o = torch.stack(outs, dim=1)
    return layer.o_proj(layer.o_norm(o).flatten(-2)), S


@pytest.mark.parametrize("expand_v", [1.0, 0.5])
@pytest.mark.parametrize("T", [1, 37, 70])
def test_matches_scan_forward_and_gradients(T, expand_v):
    layer = make(expand_v=expand_v)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    out, cache = layer(x)
    ref, ref_state = scan(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache.state, ref_state, rtol=1e-10, atol=1e-12)

    names = [n for n, _ in layer.named_parameters()]
    leaves = [x, *layer.parameters()]
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    d_state = torch.randn(ref_state.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out, cache.state), leaves, (d_out, d_state))
    ref_grads = torch.autograd.grad((ref, ref_state), leaves, (d_out, d_state))
    for name, got, expected in zip(["x", *names], grads, ref_grads, strict=True):
        assert got.abs().sum() > 0 or T == 1, name  # one token from a zero state: no transition yet
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, msg=name)


def test_transition_is_a_contraction():
    """For any parameters, including extreme ones, the per-head transition has norm < 1."""
    layer = make()
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in (layer.log_rate, layer.kappa, layer.strength):
                p.copy_(10 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        assert torch.linalg.matrix_norm(transition_matrix(layer), ord=2).max() < 1


def test_fp32_and_compile():
    """fp32 within tolerance of the fp64 scan; ``torch.compile(fullgraph=True)`` traces the
    stride-0 broadcasts into the op and gives the eager output and gradients."""
    layer = make(torch.float32)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(2))
    out, _ = layer(x)
    wide = make(torch.float64)
    wide.load_state_dict({k: p.double() for k, p in layer.state_dict().items()})
    torch.testing.assert_close(out.double(), scan(wide, x.double())[0], rtol=1e-4, atol=1e-5)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).output.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x).output.square().mean().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_decay_range_is_checked():
    with pytest.raises(ValueError, match="decay_range"):
        S4DPLR(D, decay_range=(0.5, 0.1))
