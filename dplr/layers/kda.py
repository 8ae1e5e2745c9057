"""Kimi Delta Attention as Kimi Linear builds it.

q, k, v: linear projections, each through a short causal convolution and SiLU; q and k are
l2-normalised per head. The channel gate comes from a low-rank projection ``f = W_up W_down x``
(rank ``head_v_dim``) through the Kimi gate ``g = -exp(A_log) softplus(f + dt_bias)``, or with a
lower bound ``lb`` (Kimi Linear: -5) ``g = lb sigmoid(exp(A_log) (f + dt_bias))``. ``beta`` is a
sigmoid of a linear projection. The output goes through a gated RMSNorm whose gate is another
low-rank projection (sigmoid activation), then the output projection. Value heads may be
grouped (``num_v_heads > num_heads``): gates and ``beta`` are per value head.
"""

from __future__ import annotations

import torch
from torch import nn

from dplr import chunk_kda, fused_recurrent_kda

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
    inverse_softplus_time_steps,
    project_qkv,
    split_heads,
    state_options,
)


class KimiDeltaAttention(Mixer):
    """KDA layer: ``x [B, T, hidden_size]`` → ``[B, T, hidden_size]`` with a recurrent state
    ``[N, num_v_heads, head_dim, head_dim * expand_v]``."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int = 16,
        head_dim: int = 128,
        num_v_heads: int | None = None,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        gate_lower_bound: float | None = None,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.heads = h = Heads.build(num_heads=num_heads, head_dim=head_dim, num_v_heads=num_v_heads, expand_v=expand_v)
        if gate_lower_bound is not None and not gate_lower_bound < 0:
            raise ValueError(f"gate_lower_bound must be negative (a log decay) or None, got {gate_lower_bound!r}")
        self.gate_lower_bound, self.allow_neg_eigval = gate_lower_bound, allow_neg_eigval

        add_qkv(self, hidden_size, h, use_short_conv=use_short_conv, conv_size=conv_size)
        self.f_proj = LowRank(hidden_size, h.head_v_dim, h.num_v_heads * h.head_k_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, h.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(h.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(h.num_v_heads * h.head_k_dim))
        self.g_proj = LowRank(hidden_size, h.head_v_dim, h.value_dim, bias=True)
        self.o_norm = GatedRMSNorm(h.head_v_dim, norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(h.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())  # Kimi Linear's rates, in [1, 16]
            # Mamba-2 / GDN time steps (softplus(dt_bias) in [1e-3, 0.1]) rather than Kimi Linear's zero
            # dt_bias, whose softplus(0) · exp(A_log) >= 0.69 per step forgets within a few tokens at init.
            self.dt_bias.copy_(inverse_softplus_time_steps(self.dt_bias.numel()))

    def mix(
        self, x: torch.Tensor, cache: LayerCache | None, cu_seqlens: torch.Tensor | None, *, recurrent: bool
    ) -> MixerOutput:
        h = self.heads
        q, k, v, tails = project_qkv(self, x, cache, cu_seqlens)
        f = split_heads(self.f_proj(x), h.head_k_dim)
        op = fused_recurrent_kda if recurrent else chunk_kda
        o, state = op(
            split_heads(q, h.head_k_dim),
            split_heads(k, h.head_k_dim),
            split_heads(v, h.head_v_dim),
            f,
            self.b_proj(x),
            use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            allow_neg_eigval=self.allow_neg_eigval,
            use_gate_in_kernel=True,
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            lower_bound=self.gate_lower_bound,
            **state_options(cache, cu_seqlens),
        )
        return gated_output(self, o, x, LayerCache(state, tails))
