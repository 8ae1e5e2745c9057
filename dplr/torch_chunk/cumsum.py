"""Stage 1: cumulative log decays inside each chunk, held in fp64.

A chunk decays by up to ``C · |g|`` (3840 at a gate of -60): in fp32 the difference of two such
sums, ``G_i - G_j``, would carry an absolute error of ~2e-4, a relative error of 2e-4 in every
pairwise factor ``exp(G_i - G_j)``. So the sums and their differences are taken in fp64 and each
exponent is rounded once to the compute dtype just before its ``exp`` (:func:`decay_factor`),
which leaves a relative error of ``|x| · 6e-8`` in the fp32 factor ``exp(x)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Decays(NamedTuple):
    """Cumulative log decays of a chunk; all ``None`` when the transition has no decay.

    Shapes ``[M, HV, C]`` (scalar decay) or ``[M, HV, C, K]`` (channel decay).
    """

    G: torch.Tensor | None  # G_i = g_1 + ... + g_i  (inclusive; the rank-one rows read G_{i-1})
    G_end: torch.Tensor | None  # G_C, the whole chunk  [M, HV] or [M, HV, K]
    to_end: torch.Tensor | None  # G_C - G_i = g_{i+1} + ... + g_C, summed as such (see below)


def decay_factor(log_decay: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exp(log_decay)`` in the compute dtype, from an fp64 exponent."""
    return torch.exp(log_decay.to(dtype))


def chunk_decays(g: torch.Tensor | None) -> Decays:
    """``g`` chunked ``[M, HV, C(, K)]`` in fp64 (padding slots hold 0) → its cumulative sums."""
    if g is None:
        return Decays(None, None, None)
    G = torch.cumsum(g, dim=2)
    # The decay to the chunk end as its own sum, not G_C - G_i: for the last tokens that
    # difference is ~0 yet passes gradients of size O(1) to both G_C and G_i, which cancel only
    # up to rounding, swamping the true (tiny) gate gradient under a strong decay.
    suffix = torch.flip(torch.cumsum(torch.flip(g, dims=[2]), dim=2), dims=[2])  # g_i + ... + g_C
    to_end = torch.cat([suffix[:, :, 1:], torch.zeros_like(suffix[:, :, :1])], dim=2)
    return Decays(G, G[:, :, -1], to_end)
