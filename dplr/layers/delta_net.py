"""DeltaNet as the field builds it (the chunkwise DeltaNet paper's layer).

q, k, v: linear projections through short causal convolutions and SiLU; q and k l2-normalised
per head; ``beta = sigmoid(b_proj(x))`` per value head; no decay. The output goes through a
per-head RMSNorm (or, with ``use_gate``, a gated RMSNorm with a SiLU gate), then the output
projection.
"""

from __future__ import annotations

import torch
from torch import nn

from dplr import chunk_delta_rule, fused_recurrent_delta_rule

from .common import (
    GatedRMSNorm,
    Heads,
    LayerCache,
    Mixer,
    MixerOutput,
    RMSNorm,
    add_qkv,
    gated_output,
    init_linear_,
    init_silu_gate_,
    project_qkv,
    split_heads,
    state_options,
)


class DeltaNet(Mixer):
    """DeltaNet layer: ``x [B, T, hidden_size]`` → ``[B, T, hidden_size]`` with a recurrent state
    ``[N, num_v_heads, head_dim, head_dim * expand_v]``."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int = 4,
        head_dim: int = 128,
        num_v_heads: int | None = None,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.heads = h = Heads.build(num_heads=num_heads, head_dim=head_dim, num_v_heads=num_v_heads, expand_v=expand_v)
        self.allow_neg_eigval = allow_neg_eigval

        add_qkv(self, hidden_size, h, use_short_conv=use_short_conv, conv_size=conv_size)
        self.b_proj = nn.Linear(hidden_size, h.num_v_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, h.value_dim, bias=False) if use_gate else None
        self.o_norm = GatedRMSNorm(h.head_v_dim, norm_eps) if use_gate else RMSNorm(h.head_v_dim, norm_eps)
        self.o_proj = nn.Linear(h.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self)
        if self.g_proj is not None:
            init_silu_gate_(self.g_proj)

    def mix(
        self, x: torch.Tensor, cache: LayerCache | None, cu_seqlens: torch.Tensor | None, *, recurrent: bool
    ) -> MixerOutput:
        h = self.heads
        q, k, v, tails = project_qkv(self, x, cache, cu_seqlens)
        op = fused_recurrent_delta_rule if recurrent else chunk_delta_rule
        o, state = op(
            split_heads(q, h.head_k_dim),
            split_heads(k, h.head_k_dim),
            split_heads(v, h.head_v_dim),
            self.b_proj(x),
            use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            allow_neg_eigval=self.allow_neg_eigval,
            **state_options(cache, cu_seqlens),
        )
        if self.g_proj is not None:
            return gated_output(self, o, x, LayerCache(state, tails))
        return MixerOutput(self.o_proj(self.o_norm(o).flatten(-2)), LayerCache(state, tails))
