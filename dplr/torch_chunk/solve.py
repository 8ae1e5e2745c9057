"""Stage 3: the triangular solve (UT transform) that resolves the rank-one part in a chunk.

The rank-one part makes each token read the state its predecessors in the chunk wrote. Solving
that lower-triangular system once per chunk gives "pseudo-values" ``P = U + W S`` that are
affine in the chunk's initial state ``S``:

* tied (delta rule): ``(I + diag(beta) A_kk) [-W, U] = diag(beta) [k ⊙ exp(G), v]``, and ``P``
  is the corrected value ``beta (v - kᵀ Diag(exp(G)) S_prev)`` that the state stores;
* general: ``(I - A_ab) [W, U] = [a ⊙ exp(G_prev), A_ak v]``, and ``P`` holds ``x_i = a_iᵀ S_{i-1}``.

With a value-side decay, state column ``c`` sees the system through its own pair factors
``exp(GV_{i,c} - GV_{j,c})``: a similarity transform ``E_c (I - A)⁻¹ E_c⁻¹`` that a shared
right-hand side could only use through ``exp(-GV)`` (which overflows). So the solve returns the
chunk's ``C x C`` operator ``N`` (``(I + diag(beta) A_kk)⁻¹ diag(beta)`` tied,
``(I - A_ab)⁻¹ A_ak`` general) in place of ``N v``, and ``U`` is the column-decayed product of
``N`` and ``v``; ``W`` does not change (its ``exp(GV)`` is applied with the state, see the state
pass). Derivation: docs/value-decay.md.

The solve runs in the compute dtype (fp32 or fp64) with a unit-diagonal triangular solver;
no explicit inverse is formed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import LowRank, Transition
from .intra import ColumnDecay, Intra


class Pseudo(NamedTuple):
    W: torch.Tensor  # [M, HV, C, K]
    U: torch.Tensor  # [M, HV, C, V]


def pseudo_values(
    transition: Transition,
    *,
    intra: Intra,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    columns: ColumnDecay | None = None,
) -> Pseudo | None:
    """``W, U`` with ``P = U + W S`` per chunk (``U + exp(GV) ⊙ (W S)`` with a value-side decay);
    ``None`` when there is no rank-one part."""
    if transition.lowrank is LowRank.NONE:
        return None
    eye = torch.eye(intra.A_qk.shape[-1], dtype=intra.A_qk.dtype, device=intra.A_qk.device)
    if transition.lowrank is LowRank.TIED:
        system = intra.A_kk * beta[..., :, None]
        rhs = beta[..., None] * torch.cat([intra.k_start, v if columns is None else eye.expand_as(system)], dim=-1)
        sign = -1.0
    else:
        system = -intra.A_ab
        rhs = torch.cat([intra.a_start, intra.A_ak @ v if columns is None else intra.A_ak], dim=-1)
        sign = 1.0
    solved = torch.linalg.solve_triangular(eye + system, rhs, upper=False, unitriangular=True)
    K = intra.k_end.shape[-1]
    U = solved[..., K:] if columns is None else columns.product(solved[..., K:], v)
    return Pseudo(W=sign * solved[..., :K], U=U)
