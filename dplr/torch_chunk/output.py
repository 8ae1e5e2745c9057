"""Stage 5: the output of every chunk, in parallel once the chunk's initial state is known.

``O = scale · (q_start S + A_qk v)`` (no rank-one part), ``scale · (q_start S + A_qk P)``
(tied), or ``scale · (q_start S + A_qk v + A_qb P)`` (general).
"""

from __future__ import annotations

import torch

from ..transition import LowRank, Transition
from .intra import Intra
from .state import States


def chunk_output(
    transition: Transition, *, intra: Intra, states: States, v: torch.Tensor, scale: float
) -> torch.Tensor:
    out = intra.q_start @ states.initial
    if transition.lowrank is LowRank.TIED:
        out = out + intra.A_qk @ states.pseudo
    else:
        out = out + intra.A_qk @ v
    if transition.lowrank is LowRank.GENERAL:
        out = out + intra.A_qb @ states.pseudo
    return out * scale  # the query scale, applied once here rather than to q
