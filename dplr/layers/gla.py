"""Gated linear attention (GLA) as its paper and the field build it.

q, k, v: linear projections (optionally through short causal convolutions and SiLU; the field's
default has none). The channel decay comes from a low-rank projection (rank 16, with bias):
``g = logsigmoid(gk_proj(x)) / 16``, the division keeping most decays close to 1 (the GLA
paper's ``gate_logit_normalizer``). The output goes through a gated RMSNorm with a SiLU gate,
then the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dplr import chunk_gla, fused_recurrent_gla
from dplr.preprocess import compute_dtype

from .common import (
    GatedRMSNorm,
    Heads,
    LayerCache,
    LowRank,
    Mixer,
    MixerOutput,
    add_qkv,
    gated_output,
    init_linear_,
    init_silu_gate_,
    project_qkv,
    split_heads,
    state_options,
)


class GatedLinearAttention(Mixer):
    """GLA layer: ``x [B, T, hidden_size]`` → ``[B, T, hidden_size]`` with a recurrent state
    ``[N, num_v_heads, head_dim, head_dim * expand_v]``."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int = 4,
        head_dim: int = 128,
        num_v_heads: int | None = None,
        expand_v: float = 1.0,
        use_short_conv: bool = False,
        conv_size: int = 4,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.heads = h = Heads.build(num_heads=num_heads, head_dim=head_dim, num_v_heads=num_v_heads, expand_v=expand_v)
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be positive, got {gate_logit_normalizer!r}")
        self.gate_logit_normalizer = float(gate_logit_normalizer)

        add_qkv(self, hidden_size, h, use_short_conv=use_short_conv, conv_size=conv_size)
        self.gk_proj = LowRank(hidden_size, gate_low_rank_dim, h.num_v_heads * h.head_k_dim, bias=True)
        self.g_proj = nn.Linear(hidden_size, h.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(h.head_v_dim, norm_eps, activation="silu")
        self.o_proj = nn.Linear(h.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self)
        init_silu_gate_(self.g_proj)

    def mix(
        self, x: torch.Tensor, cache: LayerCache | None, cu_seqlens: torch.Tensor | None, *, recurrent: bool
    ) -> MixerOutput:
        h = self.heads
        q, k, v, tails = project_qkv(self, x, cache, cu_seqlens, silu_without_conv=False)
        # logsigmoid in fp32 (at least): the log decay feeds a cumulative sum over the sequence.
        g = F.logsigmoid(self.gk_proj(x).to(compute_dtype(x))) / self.gate_logit_normalizer
        op = fused_recurrent_gla if recurrent else chunk_gla
        o, state = op(
            split_heads(q, h.head_k_dim),
            split_heads(k, h.head_k_dim),
            split_heads(v, h.head_v_dim),
            split_heads(g, h.head_k_dim),
            **state_options(cache, cu_seqlens),
        )
        return gated_output(self, o, x, LayerCache(state, tails))
