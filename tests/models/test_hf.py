"""The transformers integration: Auto classes, save/load with safetensors, generate through the cache."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoConfig, AutoModelForCausalLM

from dplr.models.hf import DplrCache, DplrConfig, DplrForCausalLM

CONFIG = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, head_dim=16)


@pytest.mark.parametrize("mixer,attention_every", [("kda", 3), ("rwkv7", 0)])
def test_round_trip_and_generate(tmp_path, mixer, attention_every):
    """Save, load through the Auto classes: identical weights and logits; ``generate()`` runs
    the prompt once and then one recurrent step per token, and picks the tokens that the
    LM's own generate (and recomputation) picks."""
    torch.manual_seed(0)
    model = DplrForCausalLM(DplrConfig(**CONFIG, mixer=mixer, attention_every=attention_every)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DplrConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DplrForCausalLM)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out, again = model(ids), loaded(ids)
    assert torch.equal(out.logits, again.logits)

    steps = []
    original = loaded.model.step
    loaded.model.step = lambda tokens, cache: steps.append(tokens.shape) or original(tokens, cache)
    generated = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert steps == [torch.Size([2])] * 4, "generate() must decode through the cache, one token per step"
    assert torch.equal(generated, model.model.generate(ids, 5))
    assert torch.equal(generated, model.model.generate(ids, 5, use_cache=False))


def test_forward_loss_and_cache():
    torch.manual_seed(0)
    model = DplrForCausalLM(DplrConfig(**CONFIG, mixer="gdn"))
    ids = torch.randint(0, 64, (2, 9))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    cache = out.cache if "cache" in out else out.past_key_values
    assert isinstance(cache, DplrCache) and cache.get_seq_length() == 9 and len(cache) == 3
    with pytest.raises(ValueError, match="padding is not supported"):
        model(ids, attention_mask=torch.tensor([[1] * 9, [0] + [1] * 8]))
    with pytest.raises(ValueError, match="mixer must be one of"):
        DplrConfig(mixer="lstm")
