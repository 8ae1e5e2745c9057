"""The structure of a transition as Triton compile-time constants.

Kernels take ``DECAY`` and ``LOWRANK`` as ``tl.constexpr`` and branch on them with plain ``if``
statements, which Triton resolves at compile time: one source, one specialised binary per
structure.
"""

from __future__ import annotations

from ..transition import Decay, LowRank, Transition

DECAY_NONE, DECAY_SCALAR, DECAY_CHANNEL = 0, 1, 2
LOWRANK_NONE, LOWRANK_TIED, LOWRANK_GENERAL = 0, 1, 2

_DECAY = {Decay.NONE: DECAY_NONE, Decay.SCALAR: DECAY_SCALAR, Decay.CHANNEL: DECAY_CHANNEL}
_LOWRANK = {LowRank.NONE: LOWRANK_NONE, LowRank.TIED: LOWRANK_TIED, LowRank.GENERAL: LOWRANK_GENERAL}


def constexprs(transition: Transition) -> dict[str, int]:
    """``{"DECAY": ..., "LOWRANK": ...}`` for a kernel launch."""
    return {"DECAY": _DECAY[transition.decay], "LOWRANK": _LOWRANK[transition.lowrank]}
