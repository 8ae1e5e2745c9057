"""Stage 4: the state pass, the only sequential part: one step per chunk position.

``S_next = exp(G_C) ⊙ S + k_endᵀ v`` (no rank-one part), ``k_endᵀ P`` (tied: ``P`` replaces
``v``), or ``k_endᵀ v + b_endᵀ P`` (general), with ``P = U + W S`` from the solve stage.

The part that does not depend on the state, ``k_endᵀ v``, is formed for all chunks at once;
each step then takes ``P`` of its chunks and the next state from it: two small products per
step with a rank-one part, one element-wise pass without. (Folding ``W`` into a ``K x K`` map
``T = exp(G_C) + Bᵀ W`` would leave one product per step, but costs three batched products more,
``T``, ``Bᵀ U`` and ``P`` afterwards, and a CPU runs those slower than the second product per
step: on benchmarks/cpu_chunk.py's shape, 2 cores, the state pass of GDN 10.6 -> 7.7 ms, RWKV-7
11.7 -> 9.9, KDA 9.9 -> 9.6.)
``P`` of every chunk is kept for the output stage. Sequences that have run out of chunks drop off
the end of the running prefix (see layout).

A value-side decay scales the state's columns: ``S_next = (exp(G_C) ⊙ S) Diag(exp(GV_C)) +
k_endᵀ v_end + Bᵀ P_end``, where ``v_end``, ``P_end`` are decayed to the chunk's end, and
``P = U + exp(GV) ⊙ (W S)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import Decay, LowRank, Transition
from . import records_graph
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
    # The input term that does not depend on the state, for all chunks at once.
    H = None if lowrank is LowRank.TIED else intra.k_end.mT @ (v if columns is None else columns.to_end(v))
    write_key = None if pseudo is None else (intra.b_end if lowrank is LowRank.GENERAL else intra.k_end).mT
    N, HV, K, V = initial_state.shape
    sizes = [count * HV for count in layout.steps]

    def steps(x):  # per step, [count * HV, ...] views, split off once
        return None if x is None else x.flatten(0, 1).split(sizes)

    H_, decay_, key_ = steps(H), steps(decay_end), steps(write_key)
    W_, U_ = (None, None) if pseudo is None else (steps(pseudo.W), steps(pseudo.U))
    column_, start_, end_ = (None, None, None) if columns is None else (
        steps(columns.end[..., None, :]), steps(columns.start), steps(columns.to_chunk_end))  # fmt: skip
    state = initial_state[layout.order].flatten(0, 1)
    # Where no graph is recorded, each step accumulates over tensors it owns: P over U (which only
    # this pass reads; U's steps then hold every P), the next state over H's step or the fresh
    # decayed state. A CPU saves a copy of the input and a fresh result per product (on
    # benchmarks/cpu_chunk.py's shape, 2 cores, the state pass about 1 ms less per forward with a
    # rank-one part).
    inputs = (H, write_key, decay_end, v, initial_state, *(() if pseudo is None else pseudo))
    over = not records_graph(*inputs)
    over_U = over and pseudo is not None and start_ is None
    starts, Ps = [], []
    for step, n in enumerate(sizes):
        current = state if n == state.shape[0] else state[:n]
        starts.append(current)
        nxt = current if column_ is None else current * column_[step]
        if decay_ is not None and H_ is None:
            nxt = nxt * decay_[step]
        elif decay_ is not None:  # (H is made here, for this pass only: without a graph its steps take the sums)
            nxt = torch.addcmul(H_[step], decay_[step], nxt, out=H_[step] if over else None)
        elif H_ is not None:
            nxt = torch.add(H_[step], nxt, out=H_[step] if over else None)
        if W_ is not None:
            if over_U:
                P = torch.baddbmm(U_[step], W_[step], current, out=U_[step])
            elif start_ is None:
                P = torch.baddbmm(U_[step], W_[step], current)
            else:
                P = torch.addcmul(U_[step], start_[step], W_[step] @ current)
            Ps.append(P)
            written = P if end_ is None else P * end_[step]
            if over and nxt is not current:
                nxt = torch.baddbmm(nxt, key_[step], written, out=nxt)
            else:
                nxt = torch.baddbmm(nxt, key_[step], written)
        state = nxt if n == state.shape[0] else torch.cat([nxt, state[n:]])

    state = state.view(N, HV, K, V)
    final = torch.empty_like(state).index_copy(0, layout.order, state)
    initial = torch.cat(starts).view(layout.num_chunks, HV, K, V) if starts else state.new_zeros(0, HV, K, V)
    P = None
    if pseudo is not None:
        P = pseudo.U if over_U or not Ps else torch.cat(Ps).view_as(pseudo.U)
    return States(initial=initial, pseudo=P, final=final)


def accumulate(acc: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, *, beta: float = 1.0, alpha: float = 1.0):
    """``beta · acc + alpha · b1 @ b2`` over ``[.., m, n]`` batches, for ``acc`` a fresh product the
    caller owns. Where no graph is recorded the sum is written over ``acc`` (a CPU saves a copy of
    it, and fresh pages for the result); a graph cannot be recorded through ``out=``, so there it
    is a new tensor."""
    args = (acc.flatten(0, -3), b1.flatten(0, -3), b2.flatten(0, -3))
    recording = records_graph(*args)
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
