"""The structure of a transition as Triton compile-time constants.

Kernels take ``DECAY`` and ``LOWRANK`` as ``tl.constexpr`` and branch on them with plain ``if``
statements, which Triton resolves at compile time: one source, one specialised binary per
structure. The names below are ``tl.constexpr`` so that kernels can compare against them.
"""

from __future__ import annotations

import triton.language as tl

from ..transition import Decay, LowRank, Transition

DECAY_NONE, DECAY_SCALAR, DECAY_CHANNEL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
LOWRANK_NONE, LOWRANK_TIED, LOWRANK_GENERAL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

_DECAY = {Decay.NONE: DECAY_NONE, Decay.SCALAR: DECAY_SCALAR, Decay.CHANNEL: DECAY_CHANNEL}
_LOWRANK = {LowRank.NONE: LOWRANK_NONE, LowRank.TIED: LOWRANK_TIED, LowRank.GENERAL: LOWRANK_GENERAL}


def constexprs(transition: Transition) -> dict[str, int]:
    """``{"DECAY": ..., "LOWRANK": ...}`` for a kernel launch."""
    return {"DECAY": _DECAY[transition.decay].value, "LOWRANK": _LOWRANK[transition.lowrank].value}
