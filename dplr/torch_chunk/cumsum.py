"""Stage 1: the cumulative log decays of each chunk.

Every factor the later stages need, ``exp(G_i - G_j)`` for ``j <= i``, is a sum of gates over
a span of tokens. Taken as the difference of two chunk-long sums it would lose the small terms
(in fp32, ``G ≈ -3840`` after 64 steps of -60 carries an absolute error of ~2e-4), so sums are
kept short and, where two sums must be subtracted, held in fp64:

* channel decay: sums inside sub-blocks of ``L`` tokens (at most ``L · |g|``) and the
  sub-blocks' totals, in the compute dtype; the intra stage composes its factors from them (the
  sums to each sub-block's end are made here where a graph is recorded through ``g``, else on
  demand: :meth:`Decays.block_rest`);
* scalar decay: chunk sums in fp64 (``[M, HV, C]``, small), each exponent rounded once to the
  compute dtype just before its ``exp`` (:func:`decay_factor`).

Sums "to the end" are summed as such, never as ``G_C - G_i``: for the last tokens that
difference is 0 yet passes gradients of size O(1) to both terms, which cancel only up to
rounding and would swamp the true (tiny) gate gradient under a strong decay.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import records_graph


class Decays(NamedTuple):
    """Cumulative log decays of a chunk; all ``None`` when the transition has no decay."""

    G_end: torch.Tensor | None  # the whole chunk's decay  [M, HV] or [M, HV, K]
    G: torch.Tensor | None = None  # scalar, fp64: G_i = g_1 + ... + g_i  [M, HV, C]
    to_end: torch.Tensor | None = None  # scalar, fp64: g_{i+1} + ... + g_C  [M, HV, C]
    local: torch.Tensor | None = None  # channel: g from the sub-block's start to i (inclusive)  [M, HV, nb, L, K]
    rest: torch.Tensor | None = None  # channel: g after i to the sub-block's end  [M, HV, nb, L, K] (see block_rest)
    totals: torch.Tensor | None = None  # channel: each sub-block's decay  [M, HV, nb, K]
    gates: torch.Tensor | None = None  # channel: g itself by sub-block  [M, HV, nb, L, K]

    def chunk_ends(self) -> Decays:
        """The whole chunks' decays alone (all the state pass reads): the per-token sums can go."""
        return Decays(self.G_end)

    def block_rest(self) -> torch.Tensor:
        """``rest``, made here if stage 1 did not (no graph through ``g``): a forward without a graph
        whose chunks all take the whole-chunk factorisation never reads it (intra._ChannelFactors)."""
        if self.rest is not None:
            return self.rest
        return _sum_matrices(self.gates.shape[-2], self.gates, True) @ self.gates


def decay_factor(log_decay: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exp(log_decay)`` in the compute dtype (from an fp64 exponent for scalar decay)."""
    return torch.exp(log_decay.to(dtype))


def suffix_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x_{i+1} + ... + x_n`` along ``dim`` (exclusive, summed from the end)."""
    inclusive = torch.flip(torch.cumsum(torch.flip(x, dims=[dim]), dim=dim), dims=[dim])
    return torch.cat([inclusive.narrow(dim, 1, x.shape[dim] - 1), torch.zeros_like(inclusive.narrow(dim, 0, 1))], dim)


def prefix_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x_1 + ... + x_{i-1}`` along ``dim`` (exclusive)."""
    inclusive = torch.cumsum(x, dim=dim)
    return torch.cat([torch.zeros_like(inclusive.narrow(dim, 0, 1)), inclusive.narrow(dim, 0, x.shape[dim] - 1)], dim)


def chunk_decays(g: torch.Tensor | None, *, sub: int) -> Decays:
    """``g`` chunked, ``[M, HV, C]`` (scalar) or ``[M, HV, C, K]`` (channel), padding slots 0,
    in the compute dtype; ``sub`` the sub-block length of the channel case."""
    if g is None:
        return Decays(None)
    if g.dim() == 3:
        g = g.double()
        G = torch.cumsum(g, dim=2)
        return Decays(G_end=G[:, :, -1], G=G, to_end=suffix_sums(g, 2))
    M, HV, C, K = g.shape
    blocks = g.reshape(M, HV, C // sub, sub, K)
    # Both sums of every sub-block as products with 0/1 matrices (the inclusive prefixes, the
    # exclusive suffixes): each output is its own sum of at most ``sub`` gates (a suffix is summed
    # as such, as suffix_sums does), and a CPU runs a small product faster than a cumsum, two flips
    # and a concatenation. Two products, not one with the matrices stacked: each sum comes out
    # contiguous, and a CPU parallelises the ``exp`` the intra stage takes of it only then.
    local = _sum_matrices(sub, blocks, False) @ blocks  # [M, HV, nb, sub, K]
    recording = records_graph(g)
    rest = _sum_matrices(sub, blocks, True) @ blocks if recording else None
    totals = local[..., -1, :]
    return Decays(G_end=totals.sum(2), local=local, rest=rest, totals=totals, gates=blocks)


def _sum_matrices(n: int, like: torch.Tensor, suffix: bool) -> torch.Tensor:
    """``[n, n]``: row ``i`` sums entries ``0..i`` (prefix) or ``i+1..n-1`` (suffix)."""
    ones = torch.ones(n, n, dtype=like.dtype, device=like.device)
    return ones.triu(1) if suffix else ones.tril()
