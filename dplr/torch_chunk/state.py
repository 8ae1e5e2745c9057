"""Stage 4: the state pass, the only sequential part: one step per chunk position.

``S_next = exp(G_C) ⊙ S + k_endᵀ v`` (no rank-one part), ``k_endᵀ P`` (tied: ``P`` replaces
``v``), or ``k_endᵀ v + b_endᵀ P`` (general), with ``P = U + W S`` from the solve stage.
Sequences that have run out of chunks drop off the end of the running prefix (see layout).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import Decay, LowRank, Transition
from .cumsum import Decays, decay_factor
from .intra import Intra
from .layout import ChunkLayout
from .solve import Pseudo


class States(NamedTuple):
    initial: torch.Tensor  # [M, HV, K, V] the state each chunk starts from
    pseudo: torch.Tensor | None  # [M, HV, C, V] P = U + W S of each chunk
    final: torch.Tensor  # [N, HV, K, V] in sequence order


def state_pass(
    transition: Transition,
    *,
    layout: ChunkLayout,
    decays: Decays,
    intra: Intra,
    v: torch.Tensor,
    pseudo: Pseudo | None,
    initial_state: torch.Tensor,
) -> States:
    lowrank = transition.lowrank
    decay_end = _state_decay(decays.G_end, transition.decay, v.dtype)
    # What the chunk writes regardless of its initial state, computed for all chunks at once.
    written = None if lowrank is LowRank.TIED else intra.k_end.transpose(-1, -2) @ v
    write_key = (intra.b_end if lowrank is LowRank.GENERAL else intra.k_end).transpose(-1, -2)

    state = initial_state[layout.order]
    _, HV, K, V = state.shape
    starts, pseudos, row = [], [], 0
    for count in layout.steps:
        rows = slice(row, row + count)
        row += count
        current = state[:count]
        starts.append(current)
        nxt = current if decay_end is None else decay_end[rows] * current
        if written is not None:
            nxt = nxt + written[rows]
        if pseudo is not None:
            # (count·HV) small matmuls per step; baddbmm fuses the add (the loop is overhead-bound).
            flat = current.reshape(-1, K, V)
            p = torch.baddbmm(pseudo.U[rows].flatten(0, 1), pseudo.W[rows].flatten(0, 1), flat)
            pseudos.append(p.view(count, HV, -1, V))
            nxt = torch.baddbmm(nxt.reshape(-1, K, V), write_key[rows].flatten(0, 1), p).view(count, HV, K, V)
        state = torch.cat([nxt, state[count:]]) if count < state.shape[0] else nxt

    final = torch.empty_like(state).index_copy(0, layout.order, state)
    initial = torch.cat(starts) if starts else state.new_zeros(0, HV, K, V)
    P = None
    if pseudo is not None:
        P = torch.cat(pseudos) if pseudos else pseudo.U
    return States(initial=initial, pseudo=P, final=final)


def _state_decay(G_end: torch.Tensor | None, decay: Decay, dtype: torch.dtype) -> torch.Tensor | None:
    """exp(G_C) shaped to scale a ``[K, V]`` state: rows per channel, or one scalar."""
    if decay is Decay.NONE:
        return None
    factor = decay_factor(G_end, dtype)
    return factor[..., None, None] if decay is Decay.SCALAR else factor[..., None]
