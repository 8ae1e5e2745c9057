"""``torch.nn.Module`` layers on the dplr ops, with the projections the field uses.

Each layer maps ``x [B, T, hidden_size]`` to the same shape: ``forward(x, cache=None,
cu_seqlens=None)`` runs the chunk op (training, prefill) and ``step(x, cache)`` one token per
sequence with the recurrent op; both return the output and the :class:`LayerCache` after it.
"""

from .common import GatedRMSNorm, LayerCache, LowRank, Mixer, MixerOutput, RMSNorm, ShortConvolution
from .delta_net import DeltaNet
from .gdn import GatedDeltaNet
from .gla import GatedLinearAttention
from .kda import KimiDeltaAttention
from .rwkv7 import RWKV7Output, RWKV7TimeMix
from .s4dplr import S4DPLR

__all__ = [
    "S4DPLR",
    "DeltaNet",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "GatedRMSNorm",
    "KimiDeltaAttention",
    "LayerCache",
    "LowRank",
    "Mixer",
    "MixerOutput",
    "RMSNorm",
    "RWKV7Output",
    "RWKV7TimeMix",
    "ShortConvolution",
]
