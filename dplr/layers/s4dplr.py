"""A time-invariant DPLR layer in the spirit of S4: the transition is a learned parameter, the
same at every token; only the input and output maps (k, v, q) depend on the input.

Per head, with a state ``S [K, V]``::

    S_t = (I - σ κ̂ κ̂ᵀ) Diag(exp(w)) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t / √K

``w = -exp(log_rate)`` is a learned log decay per head and key channel, ``κ̂`` a learned unit
direction per head and ``σ = sigmoid(strength)`` in ``(0, 1)``. As the general DPLR recurrence
``S ← Diag(exp(w)) S + b (aᵀ S) + k vᵀ`` this is ``a = exp(w) ⊙ κ̂`` and ``b = -σ κ̂``: the
rank-one part is a pair of parameters, not a function of the token. The parametrisation keeps
the transition a contraction for any parameter values (``I - σ κ̂ κ̂ᵀ`` has norm 1, the decay
less), so no setting of the parameters makes the state grow without bound.

The op receives ``w``, ``a`` and ``b`` as stride-0 broadcasts of their ``[H, K]`` tensors over
``B`` and ``T`` (never materialised per token); autograd sums their gradients back to the
parameters' shapes. The output goes through a per-head RMSNorm and the output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dplr import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule
from dplr.preprocess import compute_dtype

from .common import (
    Heads,
    LayerCache,
    Mixer,
    MixerOutput,
    RMSNorm,
    add_qkv,
    init_linear_,
    project_qkv,
    split_heads,
    state_options,
)


class S4DPLR(Mixer):
    """Time-invariant DPLR mixer: ``x [B, T, hidden_size]`` → ``[B, T, hidden_size]`` with a
    recurrent state ``[N, num_heads, head_dim, head_dim * expand_v]``.

    ``decay_range``: the per-step decay rates ``-w`` start log-uniform in this interval (S4D's
    time steps), so heads begin with memories from a few to about a thousand tokens.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int = 4,
        head_dim: int = 64,
        expand_v: float = 1.0,
        use_short_conv: bool = False,
        conv_size: int = 4,
        decay_range: tuple[float, float] = (1e-3, 0.5),
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        low, high = decay_range
        if not 0 < low <= high:
            raise ValueError(f"decay_range must be (low, high) with 0 < low <= high, got {decay_range!r}")
        self.hidden_size, self.decay_range = hidden_size, (float(low), float(high))
        # One decay per value head and one direction per key head must meet in a = exp(w) ⊙ κ̂:
        # so no grouped value heads here.
        self.heads = h = Heads.build(num_heads=num_heads, head_dim=head_dim, num_v_heads=None, expand_v=expand_v)
        add_qkv(self, hidden_size, h, use_short_conv=use_short_conv, conv_size=conv_size)
        self.log_rate = nn.Parameter(torch.empty(h.num_heads, h.head_k_dim))
        self.kappa = nn.Parameter(torch.empty(h.num_heads, h.head_k_dim))
        self.strength = nn.Parameter(torch.empty(h.num_heads))
        self.o_norm = RMSNorm(h.head_v_dim, norm_eps)
        self.o_proj = nn.Linear(h.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self)
        low, high = self.decay_range
        with torch.no_grad():
            self.log_rate.uniform_(math.log(low), math.log(high))
            self.kappa.normal_()
            self.strength.zero_()

    def transition(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w, a, b)``, each ``[H, K]``: the log decay in fp32 (fp64 for fp64 ``like``), since it
        feeds cumulative sums, and the rank-one vectors in ``like``'s dtype, as the op takes them."""
        w = -torch.exp(self.log_rate.to(compute_dtype(like)))
        direction = F.normalize(self.kappa.to(w.dtype), dim=-1)
        a = torch.exp(w) * direction
        b = -torch.sigmoid(self.strength.to(w.dtype))[:, None] * direction
        return w, a.to(like.dtype), b.to(like.dtype)

    def mix(
        self, x: torch.Tensor, cache: LayerCache | None, cu_seqlens: torch.Tensor | None, *, recurrent: bool
    ) -> MixerOutput:
        h = self.heads
        q, k, v, tails = project_qkv(self, x, cache, cu_seqlens, silu_without_conv=False)
        w, a, b = self.transition(q)
        shape = (*x.shape[:2], h.num_heads, h.head_k_dim)
        op = fused_recurrent_dplr_delta_rule if recurrent else chunk_dplr_delta_rule
        o, state = op(
            split_heads(q, h.head_k_dim),
            split_heads(k, h.head_k_dim),
            split_heads(v, h.head_v_dim),
            a.expand(shape),  # stride-0 views: the same transition at every token
            b.expand(shape),
            w.expand(shape),
            **state_options(cache, cu_seqlens),
        )
        return MixerOutput(self.o_proj(self.o_norm(o).flatten(-2)), LayerCache(state, tails))
