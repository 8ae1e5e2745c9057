"""What the PyTorch chunk path (``dplr/torch_chunk``) does, stage by stage, as counters see it.

This is the one place that mirrors the PyTorch path's internals. ``tests/test_accounting.py``
runs every stage under ``torch.utils.flop_counter.FlopCounterMode`` and an ``aten.exp`` counter
and requires these numbers exactly, forward and backward; a change to the PyTorch path that
changes its work makes that test fail until this function is updated with it.

How the PyTorch path differs from the ideal plan of :mod:`dplr.accounting.model`:

* ``intra``, channel decay: each matrix is one full ``[C, K] x [K, C]`` product whose diagonal
  sub-blocks (``SUB`` tokens) are kept, plus the pairwise merges of sub-blocks level by level,
  each level ``C · size · K``: in all ``C K (3C - L)`` against the ideal ``2 C² K``.
* ``solve``: ``torch.linalg.solve_triangular`` on ``[K + V]`` right-hand sides
  (``C (C - 1) (K + V)`` FLOPs) instead of forming the inverse; FlopCounterMode does not count
  it (it is not in ``torch.utils.flop_counter.flop_registry``), so it is reported apart as
  ``uncounted``. Its backward is a second triangular solve (uncounted) and one product
  ``[C, K + V] x [K + V, C]`` for the gradient of the system matrix (counted).
* exponentials: each call that needs a factor takes its own ``exp`` (the end factor once per
  end vector; a scalar-decay factor tile once per kind of row); the ideal shares them.
* ``state``: each chunk as an affine map ``S_next = T S + H`` (``T = Diag + Bᵀ W``, ``K x K``),
  so the loop is one ``K x K`` by ``K x V`` product per chunk; ``T`` costs ``2 K² C`` more than
  applying ``W`` and ``Bᵀ`` to the state directly (equal at ``K = C``).
* the backward (autograd) recomputes nothing and takes no ``exp`` (it reuses ``exp``'s output).

Exponentials exclude the exact redo of sub-blocks whose halves decay by more than
``HALF_LIMIT`` (gates below about -5 per step), which depends on the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..torch_chunk.intra import SUB
from ..transition import Decay, LowRank, Transition


@dataclass(frozen=True)
class PlanStage:
    """Counts for one stage over all chunks and heads."""

    counted_fwd: int  # matmul FLOPs FlopCounterMode reports for the forward
    counted_bwd: int  # ... for the backward (autograd of the stage's outputs)
    uncounted_fwd: int  # FLOPs of ops FlopCounterMode skips (the triangular solve)
    uncounted_bwd: int
    exps: int  # elements produced by aten.exp in the forward


def torch_plan(transition: Transition, *, chunks: int, heads: int, C: int, K: int, V: int) -> dict[str, PlanStage]:
    """Per stage (``cumsum, intra, solve, state, output``), for ``chunks`` chunks (padding
    included) of ``C`` tokens and ``heads`` value heads, keys of width ``K``, values ``V``."""
    decay, lowrank = transition.decay, transition.lowrank
    general, tied = lowrank is LowRank.GENERAL, lowrank is LowRank.TIED
    n = chunks * heads
    L = min(SUB, C)
    nb = C // L
    matrices = {LowRank.NONE: 1, LowRank.TIED: 2, LowRank.GENERAL: 4}[lowrank]
    from_start_calls, to_end_calls = 2 if lowrank is not LowRank.NONE else 1, 2 if general else 1

    product = C * K * (3 * C - L) if decay is Decay.CHANNEL else 2 * C * C * K
    intra = matrices * product
    if decay is Decay.CHANNEL:
        # per token: the row factor, the clamped column factor and the column factor to the
        # block's end; per sub-block: row_to_mid, exp(s_p) per start vector, the factor to the
        # chunk's end per end vector, and two per merge level and matrix (half a block each side).
        levels = int(math.log2(nb))
        intra_exps = 3 * C * K + nb * K + from_start_calls * nb * K + to_end_calls * nb * K
        intra_exps += matrices * levels * nb * K
    elif decay is Decay.SCALAR:
        # one C x C factor per row kind: q and k rows share it, the general a rows take a second
        intra_exps = (2 if general else 1) * C * C + (from_start_calls + to_end_calls) * C
    else:
        intra_exps = 0
    state_exps = {Decay.NONE: 0, Decay.SCALAR: 1, Decay.CHANNEL: K}[decay]

    solve = 2 * C * C * V if general else 0  # A_ak @ v
    triangular = C * (C - 1) * (K + V) if lowrank is not LowRank.NONE else 0
    system_grad = 2 * C * C * (K + V) if lowrank is not LowRank.NONE else 0
    # k_endᵀ v (none, general); with a rank-one part the affine map T = Diag + Bᵀ W, H += Bᵀ U,
    # one K x K by K x V product per chunk in the loop, and P = U + W S afterwards.
    state = 0 if tied else 2 * C * K * V
    if lowrank is not LowRank.NONE:
        state += 2 * K * C * K + 2 * K * C * V + 2 * K * K * V + 2 * C * K * V
    output = 2 * C * K * V + 2 * C * C * V + (2 * C * C * V if general else 0)

    def stage(fwd: int, *, bwd_extra: int = 0, uncounted: int = 0, exps: int = 0) -> PlanStage:
        return PlanStage(n * fwd, n * (2 * fwd + bwd_extra), n * uncounted, n * uncounted, n * exps)

    return dict(
        cumsum=stage(0),
        intra=stage(intra, exps=intra_exps),
        solve=stage(solve, bwd_extra=system_grad, uncounted=triangular),
        state=stage(state, exps=state_exps),
        output=stage(output),
    )
