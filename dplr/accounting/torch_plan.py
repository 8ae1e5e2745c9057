"""What the PyTorch chunk path (``dplr/torch_chunk``) does, stage by stage, as counters see it.

This is the one place that mirrors the PyTorch path's internals. ``tests/test_accounting.py``
runs every stage under ``torch.utils.flop_counter.FlopCounterMode`` and an ``aten.exp`` counter
and requires these numbers exactly, forward and backward; a change to the PyTorch path that
changes its work makes that test fail until this function is updated with it.

How the PyTorch path differs from the ideal plan of :mod:`dplr.accounting.model`:

* ``intra``: each matrix is one dense ``[C, K] x [K, C]`` tile, as in the ideal, for every
  chunk that decays by at most ``CHUNK_LIMIT`` (the whole-chunk factorisation). Chunks that
  decay faster take the sub-block path (channel) or a ``C x C`` factor tile (scalar); that work
  depends on the data and is not counted here (nor are the exps of the exact redo of sub-blocks).
* ``solve``: forward substitution by diagonal blocks of ``BLOCK = 16`` tokens on ``[K + V]``
  right-hand sides (``W``'s and ``U``'s solved apart against the same block inverses): the
  ``n = C / 16`` diagonal blocks are inverted by ``torch.linalg.solve_triangular``
  (``n · 16² · 15`` FLOPs), which FlopCounterMode does not count (it is not in
  ``torch.utils.flop_counter.flop_registry``), so it is reported apart as ``uncounted``; the
  rest is products (``n (n + 1) 16² (K + V)``, counted). The backward of each block inverse is a
  second triangular solve (uncounted) and one ``16 x 16 x 16`` product.
* ``cumsum``: channel decay sums each sub-block of ``SUB`` tokens by one product with a 0/1
  ``[2 SUB, SUB]`` matrix (prefixes and suffixes), ``4 SUB C K`` FLOPs per chunk, counted; the
  intra stage takes the sub-blocks' offsets (``s_p``, ``G_C - e_p``, ``-G_C``) from one more
  small 0/1 product (:func:`offsets`).
* exponentials: channel decay takes two per token and channel (``exp(G_i - s_p)``,
  ``exp(e_p - G_j)`` from sub-block sums) and a few per sub-block; start factors are shared by
  the rows of one kind (general ``a`` rows read the same factor shifted by one token).
* a forward that records no graph (``recording=False``: under ``torch.no_grad``, or on inputs
  that do not require grad) with channel decay, all chunks on the whole-chunk path: the columns
  come from the start factor by division, so the cumsum skips the suffix product (``2 SUB C K``
  FLOPs per chunk) and intra the second ``exp`` per token and channel.
* ``state``: as in the ideal plan, ``k_endᵀ V`` for all chunks at once, then per chunk
  ``P = U + W S`` and ``Bᵀ P`` (two small products per step of the loop).
* the backward (autograd) recomputes nothing and takes no ``exp`` (it reuses ``exp``'s output).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..torch_chunk.intra import SUB
from ..torch_chunk.solve import BLOCK
from ..transition import Decay, LowRank, Transition


@dataclass(frozen=True)
class PlanStage:
    """Counts for one stage over all chunks and heads."""

    counted_fwd: int  # matmul FLOPs FlopCounterMode reports for the forward
    counted_bwd: int  # ... for the backward (autograd of the stage's outputs)
    uncounted_fwd: int  # FLOPs of ops FlopCounterMode skips (the triangular solve)
    uncounted_bwd: int
    exps: int  # elements produced by aten.exp in the forward


def offsets(C: int, K: int) -> int:
    """FLOPs per chunk of channel decay's sub-block offsets: one ``[2 nb + 1, nb]`` 0/1 matrix
    times the ``[nb, K]`` sub-block totals (``nb = C / SUB``)."""
    nb = C // min(SUB, C)
    return 2 * (2 * nb + 1) * nb * K


def torch_plan(
    transition: Transition, *, chunks: int, heads: int, C: int, K: int, V: int, recording: bool = True
) -> dict[str, PlanStage]:
    """Per stage (``cumsum, intra, solve, state, output``), for ``chunks`` chunks (padding
    included) of ``C`` tokens and ``heads`` value heads, keys of width ``K``, values ``V``;
    ``recording``: whether the forward records a graph (the backward's counts assume it does)."""
    decay, lowrank = transition.decay, transition.lowrank
    general = lowrank is LowRank.GENERAL
    n = chunks * heads
    nb = C // min(SUB, C)
    matrices = {LowRank.NONE: 1, LowRank.TIED: 2, LowRank.GENERAL: 4}[lowrank]

    intra = matrices * 2 * C * C * K  # one dense tile per matrix (every chunk on the fast path)
    if decay is Decay.CHANNEL:
        intra += offsets(C, K)
        # per token and channel exp(G_i - s_p) and exp(e_p - G_j); per sub-block exp(s_p) and
        # exp(G_C - e_p); per chunk exp(-G_C) for the factorised columns.
        intra_exps = (2 if recording else 1) * C * K + 2 * nb * K + K
    elif decay is Decay.SCALAR:
        # start factors per row kind (q and k rows share one; general a rows read G_{i-1}), the
        # end factor, and exp(-G_C).
        intra_exps = (2 if general else 1) * C + C + 1
    else:
        intra_exps = 0
    state_exps = {Decay.NONE: 0, Decay.SCALAR: 1, Decay.CHANNEL: K}[decay]
    # channel decay: each sub-block's prefix and suffix sums as one [2 sub, sub] x [sub, K] product.
    cumsum = (4 if recording else 2) * min(SUB, C) * C * K if decay is Decay.CHANNEL else 0

    R = K + V  # right-hand sides of the solve
    b = BLOCK if C % BLOCK == 0 else C
    blocks = C // b
    solve = (2 * C * C * V if general else 0) + blocks * (blocks + 1) * b * b * R
    triangular, block_grad = 0, 0
    if lowrank is LowRank.NONE:
        solve = 0
    else:
        triangular = blocks * b * b * (b - 1)  # the diagonal blocks' inverses (uncounted)
        block_grad = blocks * 2 * b * b * b  # the backward's product for each block inverse
    # k_endᵀ v (none, general); with a rank-one part P = U + W S and Bᵀ P in the loop.
    state = 0 if lowrank is LowRank.TIED else 2 * C * K * V
    if lowrank is not LowRank.NONE:
        state += 2 * C * K * V + 2 * K * C * V
    output = 2 * C * K * V + 2 * C * C * V + (2 * C * C * V if general else 0)

    def stage(fwd: int, *, bwd_extra: int = 0, uncounted: int = 0, exps: int = 0) -> PlanStage:
        return PlanStage(n * fwd, n * (2 * fwd + bwd_extra), n * uncounted, n * uncounted, n * exps)

    return dict(
        cumsum=stage(cumsum, bwd_extra=-cumsum),  # the backward's one product: the 0/1 matrix takes no gradient
        # the offsets' 0/1 matrix takes no gradient: one product of theirs in the backward
        intra=stage(intra, bwd_extra=-offsets(C, K) if decay is Decay.CHANNEL else 0, exps=intra_exps),
        solve=stage(solve, bwd_extra=block_grad, uncounted=triangular),
        state=stage(state, exps=state_exps),
        output=stage(output),
    )
