"""dplr: chunk-parallel linear attention for the diagonal-plus-low-rank family.

Every op runs ``S_t = Diag(exp(g_t)) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ``,
``o_t = S_tᵀ (scale q_t)`` with a particular structure; see :mod:`dplr.transition`.
"""

from .api import (
    chunk_delta_rule,
    chunk_dplr_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_kda,
    chunk_rwkv7,
    chunk_simple_gla,
    fused_recurrent_delta_rule,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
    fused_recurrent_kda,
    fused_recurrent_rwkv7,
    fused_recurrent_simple_gla,
)
from .reference import Output
from .transition import FAMILIES, Decay, LowRank, Transition

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Decay",
    "LowRank",
    "Output",
    "Transition",
    "chunk_delta_rule",
    "chunk_dplr_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_kda",
    "chunk_rwkv7",
    "chunk_simple_gla",
    "fused_recurrent_delta_rule",
    "fused_recurrent_dplr_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
    "fused_recurrent_kda",
    "fused_recurrent_rwkv7",
    "fused_recurrent_simple_gla",
]
