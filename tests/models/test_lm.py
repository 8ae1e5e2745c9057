"""The causal LM: cached decoding equals recomputation, gradients reach every parameter,
packed batches, presets and config checks, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dplr.layers import GatedLinearAttention
from dplr.models import LM, MIXERS, PRESETS, KVCache, LMConfig, preset
from dplr.models.lm import SoftmaxAttention


def tiny(mixer: str, *, dtype=torch.float64, **overrides) -> LM:
    torch.manual_seed(0)
    return LM(preset("tiny", mixer=mixer, num_layers=3, **overrides)).to(dtype)


HYBRIDS = [(m, 0) for m in MIXERS] + [("kda", 2), ("rwkv7", 3)]  # attention every n-th layer


@pytest.mark.parametrize("mixer,attention_every", HYBRIDS)
def test_step_logits_equal_forward(mixer, attention_every):
    """Prefill with the chunk ops, then one recurrent step per token: the logits of a single
    forward over the whole sequence, at every position (fp64)."""
    model = tiny(mixer, attention_every=attention_every)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    logits, cache = model(ids[:, :6])
    outs = [logits]
    for t in range(6, 17):
        step_logits, cache = model.step(ids[:, t], cache)
        outs.append(step_logits[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mixer,attention_every", [("gdn", 0), ("gla", 2), ("rwkv7", 0), ("attention", 0)])
def test_generate_with_cache_equals_recomputation(mixer, attention_every):
    """Greedy generation through the cache picks the tokens that recomputing the whole sequence
    at every step picks; sampling with the same seed does too (fp32 model)."""
    model = tiny(mixer, dtype=torch.float32, attention_every=attention_every).eval()
    prompt = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, 8)
    recomputed = model.generate(prompt, 8, use_cache=False)
    assert cached.shape == (3, 13) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)
    sampled = [
        model.generate(prompt, 6, temperature=1.0, top_k=20, use_cache=c, generator=torch.Generator().manual_seed(3))
        for c in (True, False)
    ]
    assert torch.equal(*sampled)


def test_cache_chains_across_calls():
    """Two forward calls chained through the cache equal one call over both halves."""
    model = tiny("kda", attention_every=3)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    full = model(ids).logits
    first, cache = model(ids[:, :11])
    second, _ = model(ids[:, 11:], cache=cache)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-9, atol=1e-9)
    assert isinstance(cache[2], KVCache) and cache[2].k.shape == (2, 2, 11, 16)


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter(mixer):
    model = tiny(mixer, dtype=torch.float32, attention_every=0 if mixer == "attention" else 2)
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(5))
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}.grad is zero or not finite"


@pytest.mark.parametrize("mixer", ["kda", "attention"])
def test_packed_batch_equals_separate_sequences(mixer):
    model = tiny(mixer)
    bounds = [0, 5, 12, 12, 19]
    ids = torch.randint(0, 128, (1, 19), generator=torch.Generator().manual_seed(6))
    packed = model(ids, cu_seqlens=torch.tensor(bounds)).logits
    for a, b in itertools.pairwise(bounds):
        if b > a:
            torch.testing.assert_close(packed[:, a:b], model(ids[:, a:b]).logits, rtol=1e-9, atol=1e-9)


def test_hybrid_pattern_and_presets():
    config = preset("125m", attention_every=4)
    assert [config.layer_mixer(i) for i in range(8)] == ["kda", "kda", "kda", "attention"] * 2
    assert config.intermediate_size % 64 == 0 and config.intermediate_size >= 8 * 768 / 3
    with torch.device("meta"):
        params = sum(p.numel() for p in LM(preset("125m")).parameters())
    assert 100e6 < params < 130e6
    model = tiny("gla", attention_every=2)
    assert [type(b.mixer) for b in model.blocks] == [GatedLinearAttention, SoftmaxAttention, GatedLinearAttention]
    assert set(PRESETS) >= {"tiny", "125m"}


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="mixer must be one of"):
        LMConfig(mixer="mamba")
    with pytest.raises(ValueError, match="attention_every"):
        LMConfig(attention_every=-1)
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("7b")
    with pytest.raises(ValueError, match="unknown LMConfig fields"):
        preset("tiny", hidden=3)
    model = tiny("delta_net", dtype=torch.float32)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tokens must be an integer tensor of shape"):
        model.step(torch.zeros(2, 1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="one entry per layer"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=[None])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)


def test_compile_fullgraph_forward_and_backward():
    """``torch.compile(fullgraph=True)`` traces a whole hybrid model (every op a custom-op node,
    no graph break) and its backward; the AOT-autograd backend keeps the test quick (inductor
    adds minutes of C++ compilation on CPU), and loss and gradients are the eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LM(preset("tiny", mixer="kda", num_layers=2, attention_every=2))
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(ids).logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids).logits.square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_compile_fullgraph_every_layer():
    """The other linear mixers (RWKV-7 with its value residual) in one compiled module."""
    from dplr.layers import DeltaNet, GatedDeltaNet, GatedLinearAttention, RWKV7TimeMix

    torch._dynamo.reset()
    torch.manual_seed(0)
    D, heads = 32, dict(num_heads=2, head_dim=16)

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rwkv = torch.nn.ModuleList(RWKV7TimeMix(D, **heads, layer_idx=i, num_layers=2) for i in range(2))
            self.rest = torch.nn.ModuleList(
                [GatedDeltaNet(D, **heads), DeltaNet(D, **heads), GatedLinearAttention(D, **heads)]
            )

        def forward(self, x):
            x, _, v_first = self.rwkv[0](x)
            x, _, _ = self.rwkv[1](x, v_first=v_first)
            for layer in self.rest:
                x = layer(x).output
            return x

    stack = Stack()
    x = torch.randn(2, 12, D, requires_grad=True)
    out = torch.compile(stack, fullgraph=True, backend="aot_eager")(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, stack(x), rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in stack.parameters())
