"""Stage 3: the triangular solve (UT transform) that resolves the rank-one part in a chunk.

The rank-one part makes each token read the state its predecessors in the chunk wrote. Solving
that lower-triangular system once per chunk gives "pseudo-values" ``P = U + W S`` that are
affine in the chunk's initial state ``S``:

* tied (delta rule): ``(I + diag(beta) A_kk) [-W, U] = diag(beta) [k ⊙ exp(G), v]``, and ``P``
  is the corrected value ``beta (v - kᵀ Diag(exp(G)) S_prev)`` that the state stores;
* general: ``(I - A_ab) [W, U] = [a ⊙ exp(G_prev), A_ak v]``, and ``P`` holds ``x_i = a_iᵀ S_{i-1}``.

The solve runs in the compute dtype (fp32 or fp64) with a unit-diagonal triangular solver;
no explicit inverse is formed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import LowRank, Transition
from .intra import Intra


class Pseudo(NamedTuple):
    W: torch.Tensor  # [M, HV, C, K]
    U: torch.Tensor  # [M, HV, C, V]


def pseudo_values(transition: Transition, *, intra: Intra, v: torch.Tensor, beta: torch.Tensor | None) -> Pseudo | None:
    """``W, U`` with ``P = U + W S`` per chunk; ``None`` when there is no rank-one part."""
    if transition.lowrank is LowRank.NONE:
        return None
    if transition.lowrank is LowRank.TIED:
        system = intra.A_kk * beta[..., :, None]
        rhs = beta[..., None] * torch.cat([intra.k_start, v], dim=-1)
        sign = -1.0
    else:
        system = -intra.A_ab
        rhs = torch.cat([intra.a_start, intra.A_ak @ v], dim=-1)
        sign = 1.0
    eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
    solved = torch.linalg.solve_triangular(eye + system, rhs, upper=False, unitriangular=True)
    K = intra.k_end.shape[-1]
    return Pseudo(W=sign * solved[..., :K], U=solved[..., K:])
