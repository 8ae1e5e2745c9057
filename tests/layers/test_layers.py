"""The mixer layers: the decode path equals the full forward token by token, caches chain,
packed batches equal separate calls, gradients reach every parameter, inputs are checked."""

from __future__ import annotations

import itertools

import pytest
import torch

from dplr.layers import (
    S4DPLR,
    DeltaNet,
    GatedDeltaNet,
    GatedLinearAttention,
    KimiDeltaAttention,
    LayerCache,
    RWKV7TimeMix,
)

D = 32

# Tiny layers of every kind; grouped value heads where the layer has them.
LAYERS = {
    "kda": lambda: KimiDeltaAttention(D, num_heads=2, head_dim=16, num_v_heads=4, expand_v=0.5),
    "kda_bounded": lambda: KimiDeltaAttention(D, num_heads=2, head_dim=16, gate_lower_bound=-5.0),
    "gdn": lambda: GatedDeltaNet(D, num_heads=2, head_dim=16, num_v_heads=4),
    "delta_net": lambda: DeltaNet(D, num_heads=2, head_dim=16),
    "delta_net_gated_noconv": lambda: DeltaNet(D, num_heads=2, head_dim=16, use_gate=True, use_short_conv=False),
    "gla": lambda: GatedLinearAttention(D, num_heads=2, head_dim=16),
    "gla_conv": lambda: GatedLinearAttention(D, num_heads=2, head_dim=16, use_short_conv=True),
    "rwkv7_first": lambda: RWKV7TimeMix(D, head_dim=16, layer_idx=0, num_layers=2),
    "rwkv7_later": lambda: RWKV7TimeMix(D, head_dim=16, layer_idx=1, num_layers=2),
    "s4dplr": lambda: S4DPLR(D, num_heads=2, head_dim=16, use_short_conv=True),
}


def make(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    return LAYERS[name]().to(dtype)


def call(layer, x, cache=None, cu_seqlens=None, v_first=None):
    """``forward`` as ``(output, cache)``; RWKV-7 layers after the first read ``v_first``."""
    if isinstance(layer, RWKV7TimeMix):
        out = layer(x, cache, cu_seqlens, v_first=v_first if layer.layer_idx else None)
    else:
        out = layer(x, cache, cu_seqlens)
    return out.output, out.cache


def step(layer, x, cache, v_first=None):
    if isinstance(layer, RWKV7TimeMix):
        out = layer.step(x, cache, v_first=v_first if layer.layer_idx else None)
    else:
        out = layer.step(x, cache)
    return out.output, out.cache


def assert_cache_close(a: LayerCache, b: LayerCache, **tol) -> None:
    torch.testing.assert_close(a.state, b.state, **tol)
    assert len(a.tails) == len(b.tails)
    for x, y in zip(a.tails, b.tails, strict=True):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("name", list(LAYERS))
def test_decode_equals_forward(name):
    """Prefill a prefix with the chunk op, then one recurrent step per token: the same outputs
    and the same final cache as one forward over the whole sequence (fp64, so exact)."""
    layer = make(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 23, D, generator=gen, dtype=torch.float64)
    v_first = torch.randn(2, 23, D, generator=gen, dtype=torch.float64)
    full, full_cache = call(layer, x, v_first=v_first)
    assert full.shape == x.shape and full.dtype == x.dtype

    prefix, cache = call(layer, x[:, :9], v_first=v_first[:, :9])
    outs = [prefix]
    for t in range(9, 23):
        o, cache = step(layer, x[:, t], cache, v_first[:, t])
        outs.append(o[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)
    assert_cache_close(cache, full_cache, rtol=1e-9, atol=1e-10)

    cache = None  # decoding from nothing, token by token
    for t in range(3):
        o, cache = step(layer, x[:, t], cache, v_first[:, t])
        torch.testing.assert_close(o, full[:, t], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["kda", "gdn", "gla_conv", "rwkv7_later"])
def test_fp32_decode_matches_forward(name):
    """The same in fp32: chunk and recurrent paths agree to fp32 rounding."""
    layer = make(name, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, D, generator=gen)
    v_first = torch.randn(2, 12, D, generator=gen)
    full, _ = call(layer, x, v_first=v_first)
    cache, outs = None, []
    for t in range(12):
        o, cache = step(layer, x[:, t], cache, v_first[:, t])
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["kda", "gdn", "delta_net", "gla_conv", "rwkv7_later", "s4dplr"])
def test_packed_equals_separate(name):
    """``cu_seqlens`` (with an empty and a one-token sequence, and a starting cache per sequence)
    equals one call per sequence: nothing leaks across boundaries, convolutions included."""
    layer = make(name)
    gen = torch.Generator().manual_seed(3)
    bounds = [0, 7, 7, 8, 20]
    x = torch.randn(1, 20, D, generator=gen, dtype=torch.float64)
    v_first = torch.randn(1, 20, D, generator=gen, dtype=torch.float64)
    _, start = call(
        layer, torch.randn(4, 5, D, generator=gen, dtype=torch.float64), v_first=v_first[:, :5].expand(4, 5, D)
    )
    out, cache = call(layer, x, start, torch.tensor(bounds), v_first=v_first)
    for n, (a, b) in enumerate(itertools.pairwise(bounds)):
        single = LayerCache(start.state[n : n + 1], tuple(t[n : n + 1] for t in start.tails))
        o, c = call(layer, x[:, a:b], single, v_first=v_first[:, a:b])
        torch.testing.assert_close(out[:, a:b], o, rtol=1e-9, atol=1e-10)
        assert_cache_close(
            LayerCache(cache.state[n : n + 1], tuple(t[n : n + 1] for t in cache.tails)), c, rtol=1e-9, atol=1e-10
        )


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradients_reach_every_parameter(name):
    layer = make(name, torch.float32)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 19, D, generator=gen, requires_grad=True)
    v_first = torch.randn(2, 19, D, generator=gen, requires_grad=True)
    out, cache = call(layer, x, v_first=v_first)
    (out.square().mean() + cache.state.square().mean()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient reached {pname}"
        assert torch.isfinite(p.grad).all(), f"{pname}.grad is not finite"
        assert p.grad.abs().sum() > 0, f"{pname}.grad is zero"
    assert x.grad.abs().sum() > 0


def test_state_shapes_and_bf16():
    """Caches have the documented shapes; bf16 activations keep bf16 outputs and fp32 states."""
    layer = make("kda", torch.float32).to(torch.bfloat16)
    x = torch.randn(3, 10, D, dtype=torch.bfloat16)
    out, cache = call(layer, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert cache.state.shape == (3, 4, 16, 8) and cache.state.dtype == torch.float32
    assert [tuple(t.shape) for t in cache.tails] == [(3, 3, 32), (3, 3, 32), (3, 3, 32)]
    rwkv = make("rwkv7_first", torch.float32)
    _, cache = call(rwkv, x.float())
    assert cache.state.shape == (3, 2, 16, 16) and [tuple(t.shape) for t in cache.tails] == [(3, 1, D)]


def test_input_errors_name_the_argument():
    layer = make("gdn", torch.float32)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 32\]"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"x must have shape \[N, 32\]"):
        layer.step(torch.randn(2, 1, D))
    with pytest.raises(TypeError, match="cache must be a LayerCache"):
        layer(torch.randn(2, 5, D), cache=(torch.zeros(1),))
    with pytest.raises(ValueError, match="v_first"):
        make("rwkv7_later", torch.float32)(torch.randn(1, 4, D))
    with pytest.raises(ValueError, match="num_v_heads"):
        KimiDeltaAttention(D, num_heads=2, head_dim=16, num_v_heads=3)
    with pytest.raises(ValueError, match="gate_lower_bound"):
        KimiDeltaAttention(D, num_heads=2, head_dim=16, gate_lower_bound=1.0)
