"""Gated DeltaNet as its paper and the field build it.

q, k, v: linear projections through short causal convolutions and SiLU; q and k l2-normalised
per head. The scalar gate per value head is Mamba-2's: ``g = -exp(A_log) softplus(a_proj(x) +
dt_bias)``; ``beta = sigmoid(b_proj(x))``. The output goes through a gated RMSNorm with a SiLU
gate from a full-rank projection, then the output projection.
"""

from __future__ import annotations

import torch
from torch import nn

from dplr import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

from .common import (
    GatedRMSNorm,
    Heads,
    LayerCache,
    Mixer,
    MixerOutput,
    add_qkv,
    gated_output,
    init_linear_,
    init_silu_gate_,
    inverse_softplus_time_steps,
    project_qkv,
    split_heads,
    state_options,
)


class GatedDeltaNet(Mixer):
    """GDN layer: ``x [B, T, hidden_size]`` → ``[B, T, hidden_size]`` with a recurrent state
    ``[N, num_v_heads, head_dim, head_dim * expand_v]``."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int = 6,
        head_dim: int = 128,
        num_v_heads: int | None = None,
        expand_v: float = 2.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.heads = h = Heads.build(num_heads=num_heads, head_dim=head_dim, num_v_heads=num_v_heads, expand_v=expand_v)
        self.allow_neg_eigval = allow_neg_eigval

        add_qkv(self, hidden_size, h, use_short_conv=use_short_conv, conv_size=conv_size)
        self.a_proj = nn.Linear(hidden_size, h.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, h.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(h.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(h.num_v_heads))
        self.g_proj = nn.Linear(hidden_size, h.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(h.head_v_dim, norm_eps, activation="silu")
        self.o_proj = nn.Linear(h.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())  # Mamba-2's A in (0, 16]
            self.dt_bias.copy_(inverse_softplus_time_steps(self.dt_bias.numel()))
        init_silu_gate_(self.g_proj)

    def mix(
        self, x: torch.Tensor, cache: LayerCache | None, cu_seqlens: torch.Tensor | None, *, recurrent: bool
    ) -> MixerOutput:
        h = self.heads
        q, k, v, tails = project_qkv(self, x, cache, cu_seqlens)
        op = fused_recurrent_gated_delta_rule if recurrent else chunk_gated_delta_rule
        o, state = op(
            split_heads(q, h.head_k_dim),
            split_heads(k, h.head_k_dim),
            split_heads(v, h.head_v_dim),
            self.a_proj(x),
            self.b_proj(x),
            use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            allow_neg_eigval=self.allow_neg_eigval,
            use_gate_in_kernel=True,
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            **state_options(cache, cu_seqlens),
        )
        return gated_output(self, o, x, LayerCache(state, tails))
