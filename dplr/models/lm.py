"""A small causal language model on the dplr layers, in one file.

    tokens → embedding → [block] × num_layers → RMSNorm → logits (tied to the embedding)
    block:  x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))

The mixer of each layer is chosen by name (:data:`MIXERS`). With ``attention_every = n`` every
n-th layer is softmax attention instead (``n = 4`` is Kimi Linear's 3:1 hybrid). The cache is
one entry per layer: a :class:`~dplr.layers.LayerCache` (recurrent state and short-convolution
tails) for the linear mixers, a :class:`KVCache` for attention. ``forward`` runs the chunk ops
(training, prefill); ``step`` decodes one token with the recurrent ops; ``generate`` does both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dplr.layers import (
    DeltaNet,
    GatedDeltaNet,
    GatedLinearAttention,
    KimiDeltaAttention,
    LayerCache,
    Mixer,
    MixerOutput,
    RMSNorm,
    RWKV7TimeMix,
)
from dplr.layers.common import INIT_STD, init_linear_, sequence_positions, split_heads

MIXERS = ("kda", "gdn", "delta_net", "gla", "rwkv7", "attention")


@dataclass
class LMConfig:
    """The model's shape. Every linear mixer gets ``num_heads`` heads of ``head_dim`` for keys
    and ``head_dim * expand_v`` for values, so mixers compare at equal state size; softmax
    attention uses the same heads. ``intermediate_size`` defaults to ``8/3 · hidden_size``
    rounded up to a multiple of 64 (SwiGLU at the parameter count of a 4× MLP)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 6
    head_dim: int = 128
    expand_v: float = 1.0
    mixer: str = "kda"
    attention_every: int = 0
    intermediate_size: int | None = None
    short_conv: bool = True
    conv_size: int = 4
    rope_theta: float | None = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = INIT_STD

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        every = self.attention_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"attention_every must be an int >= 0 (0: no attention layers), got {every!r}")
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive or None (no positional encoding), got {self.rope_theta!r}")
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    def layer_mixer(self, layer_idx: int) -> str:
        """The mixer of a layer: attention on every ``attention_every``-th layer, else ``mixer``."""
        if self.attention_every and (layer_idx + 1) % self.attention_every == 0:
            return "attention"
        return self.mixer

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2, head_dim=16),  # tests
    "125m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=6, head_dim=128),
    "350m": dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=8, head_dim=128),
}


def preset(name: str, **overrides) -> LMConfig:
    """A named configuration (:data:`PRESETS`) with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LMConfig fields {unknown}; the fields are {sorted(fields)}")
    return LMConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Softmax attention (the hybrid's global layers and the quality baseline).


class KVCache(NamedTuple):
    """Keys and values seen so far, ``[B, num_heads, S, head_dim]`` each."""

    k: torch.Tensor
    v: torch.Tensor


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of ``x [B, T, H, d]`` at ``positions [T]``,
    computed in fp32: angles of up to ``T`` radians lose their phase in bf16."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = (positions.to(torch.float32)[:, None] * inv_freq)[None, :, None, :]  # [1, T, 1, d/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SoftmaxAttention(Mixer):
    """Causal multi-head softmax attention with rotary positions (``rope_theta=None``: none, as
    Kimi Linear's global layers) through ``F.scaled_dot_product_attention``."""

    cache_type = KVCache

    def __init__(self, hidden_size: int, *, num_heads: int, head_dim: int, rope_theta: float | None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
        self.hidden_size, self.num_heads, self.head_dim, self.rope_theta = hidden_size, num_heads, head_dim, rope_theta
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self)

    def mix(
        self, x: torch.Tensor, cache: KVCache | None, cu_seqlens: torch.Tensor | None, *, recurrent: bool
    ) -> MixerOutput:
        B, T, _ = x.shape
        q, k, v = (split_heads(proj(x), self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        past = 0 if cache is None else cache.k.shape[2]
        mask = None
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("attention takes cu_seqlens or a cache, not both")
            _, seq, pos = sequence_positions(B, T, cu_seqlens, x.device)
            mask = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])  # causal within each sequence
        else:
            pos = torch.arange(past, past + T, device=x.device)
            if past:
                mask = torch.arange(past + T, device=x.device)[None, :] <= pos[:, None]
        if self.rope_theta is not None:
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, H, T, d]
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return MixerOutput(self.o_proj(o.transpose(1, 2).flatten(-2)), KVCache(k, v))


# ---------------------------------------------------------------------------------------------
# The model.


def build_mixer(config: LMConfig, layer_idx: int) -> Mixer:
    """The mixer of layer ``layer_idx`` as ``config`` names it."""
    name, D = config.layer_mixer(layer_idx), config.hidden_size
    heads = dict(num_heads=config.num_heads, head_dim=config.head_dim)
    conv = dict(use_short_conv=config.short_conv, conv_size=config.conv_size)
    if name == "attention":
        return SoftmaxAttention(D, **heads, rope_theta=config.rope_theta)
    if name == "rwkv7":  # token shift instead of short convolutions; low ranks capped by the width
        return RWKV7TimeMix(
            D, **heads, layer_idx=layer_idx, num_layers=config.num_layers, decay_low_rank_dim=min(64, D),
            a_low_rank_dim=min(64, D), v_low_rank_dim=min(16, D), gate_low_rank_dim=min(128, D),
        )  # fmt: skip
    layer = {"kda": KimiDeltaAttention, "gdn": GatedDeltaNet, "delta_net": DeltaNet, "gla": GatedLinearAttention}
    return layer[name](D, **heads, **conv, expand_v=config.expand_v, norm_eps=config.norm_eps)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = build_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cache,
        cu_seqlens: torch.Tensor | None,
        v_first: torch.Tensor | None,
        *,
        recurrent: bool,
    ) -> tuple[torch.Tensor, LayerCache | KVCache, torch.Tensor | None]:
        h = self.mixer_norm(x)
        if isinstance(self.mixer, RWKV7TimeMix):  # RWKV-7 hands its first layer's value on
            out, cache, v_first = self.mixer.mix(h, cache, cu_seqlens, recurrent=recurrent, v_first=v_first)
        else:
            out, cache = self.mixer.mix(h, cache, cu_seqlens, recurrent=recurrent)
        x = x + out
        return x + self.mlp(self.mlp_norm(x)), cache, v_first


class LMOutput(NamedTuple):
    """``logits [B, T, vocab_size]`` (fp32) and the cache: one entry per layer."""

    logits: torch.Tensor
    cache: list


class LM(nn.Module):
    """The causal LM. ``forward(input_ids [B, T], cache=None, cu_seqlens=None)`` →
    :class:`LMOutput`; packed batches have ``B == 1`` and ``cu_seqlens [N + 1]``."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections and embeddings ``N(0, initializer_range²)``; the mixers' own parameters
        (gates, decays, token-shift mixes) as each layer sets them; the projections that write to
        the residual stream scaled by ``1/sqrt(2 num_layers)`` so that its variance stays O(1)."""
        std = self.config.initializer_range
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            block.mixer.reset_parameters()
            init_linear_(block.mlp, std)
            for norm in (block.mixer_norm, block.mlp_norm):
                nn.init.ones_(norm.weight)
            with torch.no_grad():
                for proj in (block.mixer.o_proj, block.mlp.down):
                    nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.config.num_layers))
        nn.init.ones_(self.norm.weight)

    def forward(
        self, input_ids: torch.Tensor, *, cache: list | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> LMOutput:
        """``input_ids [B, T]`` (int) → logits ``[B, T, vocab_size]`` and the cache after them."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of shape [B, T], got {got}")
        return self._run(input_ids, cache, cu_seqlens, recurrent=False)

    def step(self, tokens: torch.Tensor, cache: list | None) -> LMOutput:
        """One token per sequence with the recurrent ops: ``tokens [B]`` → logits ``[B, vocab_size]``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor of shape [B], got {got}")
        logits, cache = self._run(tokens[:, None], cache, None, recurrent=True)
        return LMOutput(logits[:, 0], cache)

    def _run(
        self, ids: torch.Tensor, cache: list | None, cu_seqlens: torch.Tensor | None, *, recurrent: bool
    ) -> LMOutput:
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache must have one entry per layer ({len(self.blocks)}), got {len(cache)}")
        x = self.embed(ids)
        v_first, new_cache = None, []
        for i, block in enumerate(self.blocks):
            x, layer_cache, v_first = block(
                x, None if cache is None else cache[i], cu_seqlens, v_first, recurrent=recurrent
            )
            new_cache.append(layer_cache)
        logits = F.linear(self.norm(x), self.embed.weight)  # tied embeddings
        return LMOutput(logits.float(), new_cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids [B, T]`` (``T >= 1``) by ``max_new_tokens``: the prompt runs through
        the chunk ops, then one recurrent step per token (``use_cache=False`` recomputes the whole
        sequence instead, the slow reference). ``temperature = 0`` is greedy. Returns ``[B, T + new]``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {getattr(input_ids, 'shape', None)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        logits, cache = self(input_ids)
        tokens = input_ids
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1] if logits.dim() == 3 else logits, temperature, top_k, generator)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if i + 1 == max_new_tokens:
                break
            logits, cache = self.step(nxt, cache) if use_cache else self(tokens)
        return tokens


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """``logits [B, V]`` → tokens ``[B]``: argmax at temperature 0, else softmax sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
