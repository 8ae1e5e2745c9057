"""Stage 4: the state pass, the only sequential part: one step per chunk position.

``S_next = exp(G_C) ⊙ S + k_endᵀ v`` (no rank-one part), ``k_endᵀ P`` (tied: ``P`` replaces
``v``), or ``k_endᵀ v + b_endᵀ P`` (general), with ``P = U + W S`` from the solve stage.

Every chunk is an affine map of its initial state, ``S_next = T S + H`` with
``T = Diag(exp(G_C)) + Bᵀ W`` (``B`` = ``k_end`` tied, ``b_end`` general) and
``H = k_endᵀ v + Bᵀ U``. ``T`` and ``H`` are formed for all chunks at once, so the sequential
loop is one small product per step (the loop is bound by per-step overhead on a CPU); ``P`` of
every chunk follows afterwards in one batched product. Sequences that have run out of chunks
drop off the end of the running prefix (see layout).

A value-side decay scales the state's columns: ``S_next = T S Diag(exp(GV_C)) + H``, where
``H`` reads ``v`` and ``U`` decayed to the chunk's end and ``T`` is unchanged; then
``P = U + exp(GV) ⊙ (W S)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import Decay, LowRank, Transition
from .cumsum import Decays, decay_factor
from .intra import ColumnDecay, Intra
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
    columns: ColumnDecay | None = None,
) -> States:
    lowrank = transition.lowrank
    decay_end = _state_decay(decays.G_end, transition.decay, v.dtype)
    write_key = (intra.b_end if lowrank is LowRank.GENERAL else intra.k_end).transpose(-1, -2)
    to_end = (lambda z: z) if columns is None else columns.to_end
    column_end = None if columns is None else columns.end[..., None, :]  # exp(GV_C) per column
    H = None if lowrank is LowRank.TIED else intra.k_end.transpose(-1, -2) @ to_end(v)
    T = None
    if pseudo is not None:
        U_end = to_end(pseudo.U)
        H = write_key @ U_end if H is None else accumulate(H, write_key, U_end)
        T = write_key @ pseudo.W  # [M, HV, K, K]
        # + Diag(exp(G_C)) (the identity without decay); T is a fresh product, so in place.
        diagonal = T.diagonal(0, -2, -1)
        if decay_end is None:
            diagonal.add_(1.0)
        else:
            diagonal.add_(decay_end.squeeze(-1).expand(diagonal.shape))

    # The loop works on [chunks * HV, K, V] slices: one product per step and nothing else (it is
    # bound by per-op overhead on a CPU).
    N, HV, K, V = initial_state.shape
    sizes = [count * HV for count in layout.steps]
    # Per step, [count * HV, ...] views, split off once.
    T_, H_, decay_, column_ = (
        None if x is None else x.flatten(0, 1).split(sizes) for x in (T, H, decay_end, column_end)
    )
    state = initial_state[layout.order].flatten(0, 1)
    starts = []
    for step, n in enumerate(sizes):
        current = state if n == state.shape[0] else state[:n]
        starts.append(current)
        if column_ is not None:
            current = current * column_[step]  # T (S Diag(exp(GV_C))) = (T S) Diag(exp(GV_C))
        if T_ is not None:
            nxt = torch.baddbmm(H_[step], T_[step], current)
        elif decay_ is not None:
            nxt = torch.addcmul(H_[step], decay_[step], current)
        else:
            nxt = H_[step] + current
        state = nxt if n == state.shape[0] else torch.cat([nxt, state[n:]])

    state = state.view(N, HV, K, V)
    final = torch.empty_like(state).index_copy(0, layout.order, state)
    initial = torch.cat(starts).view(layout.num_chunks, HV, K, V) if starts else state.new_zeros(0, HV, K, V)
    P = None
    if pseudo is not None and columns is None:
        P = torch.baddbmm(pseudo.U.flatten(0, 1), pseudo.W.flatten(0, 1), initial.flatten(0, 1)).view_as(pseudo.U)
    elif pseudo is not None:
        P = pseudo.U + columns.from_start(pseudo.W @ initial)
    return States(initial=initial, pseudo=P, final=final)


def accumulate(acc: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, *, beta: float = 1.0, alpha: float = 1.0):
    """``beta · acc + alpha · b1 @ b2`` over ``[.., m, n]`` batches, for ``acc`` a fresh product the
    caller owns. Where no graph is recorded the sum is written over ``acc`` (a CPU saves a copy of
    it, and fresh pages for the result); a graph cannot be recorded through ``out=``, so there it
    is a new tensor."""
    args = (acc.flatten(0, -3), b1.flatten(0, -3), b2.flatten(0, -3))
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    if recording or not acc.is_contiguous():  # (only a contiguous acc is written by its flattened view)
        return torch.baddbmm(*args, beta=beta, alpha=alpha).view_as(acc)
    torch.baddbmm(*args, beta=beta, alpha=alpha, out=args[0])
    return acc


def _state_decay(G_end: torch.Tensor | None, decay: Decay, dtype: torch.dtype) -> torch.Tensor | None:
    """exp(G_C) shaped to scale a ``[K, V]`` state: rows per channel, or one scalar."""
    if decay is Decay.NONE:
        return None
    factor = decay_factor(G_end, dtype)
    return factor[..., None, None] if decay is Decay.SCALAR else factor[..., None]
