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
from .state import States


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
    product = torch.matmul
    if columns is not None:
        out, product = columns.from_start(out), columns.product
    if transition.lowrank is LowRank.TIED:
        out = out + product(intra.A_qk, states.pseudo)
    else:
        out = out + product(intra.A_qk, v)
    if transition.lowrank is LowRank.GENERAL:
        out = out + product(intra.A_qb, states.pseudo)
    return out * scale  # the query scale, applied once here rather than to q
