"""Stage 5: the output of every chunk, in parallel once the chunk's initial state is known.

``O = scale · (q_start S + A_qk v)`` (no rank-one part), ``scale · (q_start S + A_qk P)``
(tied), or ``scale · (q_start S + A_qk v + A_qb P)`` (general). With a value-side decay the
state term is scaled by ``exp(GV_i)`` per column and each ``A Z`` becomes the column-decayed
product (:meth:`ColumnDecay.product`).
"""

from __future__ import annotations

import torch

from ..transition import LowRank, Transition
from .intra import ColumnDecay, Intra
from .state import States, accumulate


def chunk_output(
    transition: Transition,
    *,
    intra: Intra,
    states: States,
    v: torch.Tensor,
    scale: float,
    columns: ColumnDecay | None = None,
) -> torch.Tensor:
    out = intra.q_start @ states.initial
    if columns is not None:
        out = columns.from_start(out)
        out = out + columns.product(intra.A_qk, states.pseudo if transition.lowrank is LowRank.TIED else v)
        if transition.lowrank is LowRank.GENERAL:
            out = out + columns.product(intra.A_qb, states.pseudo)
        return out * scale  # the query scale, applied once here rather than to q
    # The sums and the query scale ride on the products: out = scale · (out + A Z) in one call.
    Z = states.pseudo if transition.lowrank is LowRank.TIED else v
    out = accumulate(out, intra.A_qk, Z, beta=scale, alpha=scale)
    if transition.lowrank is LowRank.GENERAL:
        out = accumulate(out, intra.A_qb, states.pseudo, alpha=scale)
    return out
