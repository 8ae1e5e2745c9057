"""RWKV-7 time mixing ("Goose") on the general DPLR op.

Token shift: every projection reads ``x + (x_prev - x) * mu`` with a learned per-channel mix
``mu``. Receptance, key and value are linear projections; the decay
``w = -exp(-0.5) sigmoid(w_lora(x))`` keeps ``exp(w)`` in ``[0.545, 1)``; the in-context
learning rate ``a = sigmoid(a_lora(x))``; the removal key ``kk = l2norm(k * k_k)`` per head and
the key ``k <- k (1 + (a - 1) k_a)``. The op runs with ``a = -kk``, ``b = kk a`` and scale 1.
After it: a per-head GroupNorm, the bonus ``o += (Σ_d r k r_k) v`` and the output gate
``g_lora(x)``. Layers after the first mix their value with the first layer's (the value
residual): ``v <- v + (v_first - v) sigmoid(v_lora(x))``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dplr import chunk_rwkv7, fused_recurrent_rwkv7
from dplr.preprocess import compute_dtype, l2norm

from .common import Heads, LayerCache, LowRank, Mixer, init_linear_, split_heads, state_options, token_shift

DECAY_SCALE = math.exp(-0.5)  # w in (-exp(-0.5), 0): a per-step decay factor of at least 0.545


class RWKV7Output(NamedTuple):
    """``output [B, T, D]``, the cache after the last token, and the value residual source
    ``v_first [B, T, D]`` (this layer's value if it is the first, else the one passed in)."""

    output: torch.Tensor
    cache: LayerCache
    v_first: torch.Tensor


class RWKV7TimeMix(Mixer):
    """RWKV-7 time mixing: ``x [B, T, hidden_size]`` → ``[B, T, hidden_size]`` with a recurrent
    state ``[N, num_heads, head_dim, head_dim]`` and a one-token shift cache ``[N, 1, hidden_size]``.
    ``layer_idx == 0`` makes this the layer whose value the later ones mix in."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int | None = None,
        head_dim: int = 64,
        layer_idx: int = 0,
        num_layers: int = 1,
        decay_low_rank_dim: int = 64,
        a_low_rank_dim: int = 64,
        v_low_rank_dim: int = 16,
        gate_low_rank_dim: int = 128,
    ):
        super().__init__()
        if num_heads is None:
            if hidden_size % head_dim:
                raise ValueError(f"hidden_size={hidden_size} must be a multiple of head_dim={head_dim}")
            num_heads = hidden_size // head_dim
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        self.hidden_size, self.layer_idx, self.num_layers = hidden_size, layer_idx, num_layers
        self.heads = h = Heads.build(num_heads=num_heads, head_dim=head_dim, num_v_heads=None, expand_v=1.0)
        D, C = hidden_size, h.key_dim

        self.mu = nn.ParameterDict({name: nn.Parameter(torch.empty(D)) for name in "rwkvag"})
        self.k_k = nn.Parameter(torch.empty(C))
        self.k_a = nn.Parameter(torch.empty(C))
        self.r_k = nn.Parameter(torch.empty(h.num_heads, h.head_k_dim))
        self.r_proj = nn.Linear(D, C, bias=False)
        self.k_proj = nn.Linear(D, C, bias=False)
        self.v_proj = nn.Linear(D, C, bias=False)
        self.w_lora = LowRank(D, decay_low_rank_dim, C, activation="tanh", bias=True)
        self.a_lora = LowRank(D, a_low_rank_dim, C, bias=True)
        self.v_lora = LowRank(D, v_low_rank_dim, C, bias=True) if layer_idx > 0 else None
        self.g_lora = LowRank(D, gate_low_rank_dim, C, activation="sigmoid", bias=False)
        # GroupNorm's eps grows with head_dim: with scale 1 the output's size grows with it too.
        self.g_norm = nn.GroupNorm(h.num_heads, C, eps=h.head_k_dim * 1e-5)
        self.o_proj = nn.Linear(C, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        h, D = self.heads, self.hidden_size
        init_linear_(self)
        with torch.no_grad():
            # Token-shift mixes: across channels from the previous token (1) to the current one
            # (0), leaning to the current token in deeper layers.
            depth = 1.0 - self.layer_idx / self.num_layers
            ramp = torch.arange(D, dtype=torch.float32) / D
            for name, power in zip("rwkvag", (0.2, 0.9, 0.7, 0.7, 0.9, 0.2), strict=True):
                self.mu[name].copy_(1.0 - ramp.pow(power * depth))
            # Decays spread within each head, from slow (exp(w) ≈ 0.998) to fast (≈ 0.59).
            speeds = torch.linspace(-6.0, 2.0, h.head_k_dim).repeat(h.num_heads)
            self.w_lora.up.bias.copy_(speeds)
            self.k_k.fill_(0.85)  # the removal key leans on most of the key's channels
            self.k_a.fill_(1.0)  # the written key is scaled by the learning rate a at the start
            self.r_k.zero_()  # the bonus term starts off and is learned
            if self.v_lora is not None:
                self.v_lora.up.bias.zero_()  # half this layer's value, half the first layer's
            self.g_norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        *,
        v_first: torch.Tensor | None = None,
    ) -> RWKV7Output:
        """``x [B, T, D]`` → ``RWKV7Output``; ``v_first [B, T, D]`` is required after the first layer."""
        self.check_input(x, cache)
        return self.mix(x, cache, cu_seqlens, recurrent=False, v_first=v_first)

    def step(
        self, x: torch.Tensor, cache: LayerCache | None = None, *, v_first: torch.Tensor | None = None
    ) -> RWKV7Output:
        """One token per sequence: ``x [N, D]``, ``v_first [N, D]`` → ``output [N, D]``, cache, ``v_first``."""
        self.check_input(x, cache, one_token=True)
        out = self.mix(x[:, None], cache, None, recurrent=True, v_first=None if v_first is None else v_first[:, None])
        return RWKV7Output(out.output[:, 0], out.cache, out.v_first[:, 0])

    def mix(
        self,
        x: torch.Tensor,
        cache: LayerCache | None,
        cu_seqlens: torch.Tensor | None,
        *,
        recurrent: bool,
        v_first: torch.Tensor | None,
    ) -> RWKV7Output:
        h = self.heads
        if self.v_lora is not None and v_first is None:
            raise ValueError(f"v_first (the first layer's value) is required by layer_idx={self.layer_idx}")
        x_prev, tail = token_shift(x, None if cache is None else cache.tails[0], cu_seqlens)
        delta = x_prev - x
        xr, xw, xk, xv, xa, xg = (x + delta * self.mu[name].to(x.dtype) for name in "rwkvag")

        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        # The decay in fp32 (at least): it feeds a cumulative sum over the sequence.
        w = -DECAY_SCALE * torch.sigmoid(self.w_lora(xw).to(compute_dtype(x)))
        if self.v_lora is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v_lora(xv))
        a = torch.sigmoid(self.a_lora(xa))
        kk = l2norm(split_heads(k * self.k_k.to(k.dtype), h.head_k_dim)).to(k.dtype)
        k = k * (1 + (a - 1) * self.k_a.to(k.dtype))

        r, k, v, a = (split_heads(y, h.head_k_dim) for y in (r, k, v, a))
        op = fused_recurrent_rwkv7 if recurrent else chunk_rwkv7
        o, state = op(
            r,
            split_heads(w, h.head_k_dim),
            k,
            v,
            -kk,
            kk * a,
            scale=1.0,
            **state_options(cache, cu_seqlens),
        )
        # GroupNorm in fp32 (at least), as the RMSNorms of the other layers.
        dtype = compute_dtype(o)
        o = F.group_norm(
            o.flatten(0, 1).flatten(-2).to(dtype),
            h.num_heads,
            self.g_norm.weight.to(dtype),
            self.g_norm.bias.to(dtype),
            self.g_norm.eps,
        )
        o = split_heads(o.unflatten(0, x.shape[:2]).to(x.dtype), h.head_k_dim)
        o = o + (r * k * self.r_k.to(r.dtype)).sum(-1, keepdim=True) * v
        o = self.o_proj(o.flatten(-2) * self.g_lora(xg))
        return RWKV7Output(o, LayerCache(state, (tail,)), v_first)
