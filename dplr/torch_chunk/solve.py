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

The solve runs in the compute dtype (fp32 or fp64) by blocks (:func:`unit_lower_solve`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import LowRank, Transition
from .intra import ColumnDecay, Intra

BLOCK = 16  # tokens per diagonal block of the triangular solve


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
    C, sign = intra.A_qk.shape[-1], 1.0
    if transition.lowrank is LowRank.TIED:
        system = intra.A_kk * beta[..., :, None]
        right = v if columns is None else torch.eye(C, dtype=v.dtype, device=v.device).expand_as(system)
        # W solves for -beta k_start: the sign goes into the right-hand side, not a pass over W.
        rhs = (intra.k_start * -beta[..., None], right * beta[..., None])
    else:
        system, sign = intra.A_ab, -1.0  # I - A_ab: the sign rides on the solve, not a pass over A_ab
        rhs = (intra.a_start, intra.A_ak @ v if columns is None else intra.A_ak)
    W, U = unit_lower_solve(system, rhs, sign=sign)
    return Pseudo(W=W, U=U if columns is None else columns.product(U, v))


def unit_lower_solve(N: torch.Tensor, rhs: tuple[torch.Tensor, ...], *, sign: float = 1.0) -> tuple[torch.Tensor, ...]:
    """``(I + sign · N)⁻¹ R`` for strictly lower-triangular ``N [.., C, C]``, each ``R [.., C, r]`` of
    ``rhs``, ``sign = ±1``.

    Forward substitution by blocks of ``BLOCK`` tokens: the diagonal blocks are inverted by the
    triangular solver (exact substitution, no growth from a series), everything else is batched
    products. A CPU's LAPACK solves many small ``C x C`` systems one at a time, each at a few
    GFLOP/s; this way most of the work runs as matrix products. The right-hand sides share the
    blocks' inverses but are solved apart: no ``[C, K + V]`` concatenation in and out (on a CPU
    every fresh page costs a fault, and each solution comes out contiguous for the state pass)."""
    C = N.shape[-1]
    b = BLOCK if C % BLOCK == 0 else C
    n = C // b
    N = N.reshape(-1, C, C)
    diagonal = N.view(-1, n, b, n, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [.., n, b, b]
    if sign < 0:
        diagonal = -diagonal  # the diagonal blocks alone (1/n of N)
    eye = torch.eye(b, dtype=N.dtype, device=N.device).expand_as(diagonal)
    # unitriangular: the solver reads the strictly lower part only (the identity is implied).
    inverse = torch.linalg.solve_triangular(diagonal, eye, upper=False, unitriangular=True)
    out = []
    for R in rhs:
        lead, flat = R.shape[:-2], R.reshape(-1, C, R.shape[-1])
        solved = []  # the solution's blocks (one concatenation at the end, not one per block)
        for p in range(n):
            rows = slice(p * b, (p + 1) * b)
            block = flat[:, rows]
            for q, x in enumerate(solved):
                block = torch.baddbmm(block, N[:, rows, q * b : (q + 1) * b], x, alpha=-sign)
            solved.append(inverse[:, p] @ block)
        out.append(torch.cat(solved, dim=1).view(*lead, C, R.shape[-1]))
    return tuple(out)
