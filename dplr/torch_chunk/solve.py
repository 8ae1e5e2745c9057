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
from . import records_graph
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
    if transition.lowrank is LowRank.TIED:
        C = intra.A_qk.shape[-1]
        right = v if columns is None else torch.eye(C, dtype=v.dtype, device=v.device).expand_as(intra.A_kk)
        # (I + diag(beta) A_kk) [W, U] = diag(beta) [-k_start, right]: beta and W's sign ride on the
        # solve's block operators (no scaled copies of A_kk or of the right-hand sides).
        W, U = unit_lower_solve(intra.A_kk, ((intra.k_start, -1.0), (right, 1.0)), sign=1.0, beta=beta)
    else:
        # (I - A_ab) [W, U] = [a_start, A_ak v]: the sign rides on the solve, not a pass over A_ab.
        rhs = intra.A_ak @ v if columns is None else intra.A_ak
        W, U = unit_lower_solve(intra.A_ab, ((intra.a_start, 1.0), (rhs, 1.0)), sign=-1.0)
    return Pseudo(W=W, U=U if columns is None else columns.product(U, v))


def unit_lower_solve(
    N: torch.Tensor,
    rhs: tuple[tuple[torch.Tensor, float], ...],
    *,
    sign: float = 1.0,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``X = f (I + sign · diag(beta) N)⁻¹ diag(beta) R`` for strictly lower-triangular ``N [.., C, C]``,
    each ``(R [.., C, r], f)`` of ``rhs``, ``sign = ±1``, ``f = ±1``, ``beta [.., C]`` (ones if ``None``).

    Forward substitution by blocks of ``BLOCK`` tokens: the diagonal blocks are inverted by the
    triangular solver (exact substitution, no growth from a series), everything else is batched
    products. A CPU's LAPACK solves many small ``C x C`` systems one at a time, each at a few
    GFLOP/s; this way most of the work runs as matrix products. Block row ``p`` reads

        X_p = (f D_p diag(beta_p)) (R_p - sign · f · Σ_{q<p} N_pq X_q),  D_p = (I + sign diag(beta_p) N_pp)⁻¹

    so ``beta`` and ``f`` scale only the small ``[b, b]`` block operators, never ``N`` or ``R``.
    The right-hand sides share the blocks' inverses but are solved apart: no ``[C, K + V]``
    concatenation in and out (on a CPU every fresh page costs a fault, and each solution comes
    out contiguous for the state pass). Each block row takes one product against the rows solved so
    far: ``n - 1`` products instead of ``n (n - 1) / 2`` block by block (the loop is bound by
    per-op overhead). Where a graph is recorded the solution grows by concatenation (copies of
    ``n (n + 1) / 2 - 1`` blocks); without one each block row is written into the solution in place
    (``n`` blocks: on benchmarks/cpu_chunk.py's shape, 2 cores, the solve stage about 0.5 ms less
    per forward)."""
    C = N.shape[-1]
    b = BLOCK if C % BLOCK == 0 else C
    n = C // b
    lead = N.shape[:-2]
    N = N.reshape(-1, C, C)
    diagonal = N.view(-1, n, b, n, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [.., n, b, b]
    scales = None if beta is None else beta.reshape(-1, n, b)
    if scales is not None:
        diagonal = diagonal * scales[..., :, None]  # diag(beta_p) N_pp: the diagonal blocks alone (1/n of N)
    if sign < 0:
        diagonal = -diagonal
    eye = torch.eye(b, dtype=N.dtype, device=N.device).expand_as(diagonal)
    # unitriangular: the solver reads the strictly lower part only (the identity is implied).
    inverse = torch.linalg.solve_triangular(diagonal, eye, upper=False, unitriangular=True)
    if scales is not None:
        inverse = inverse * scales[..., None, :]  # D_p diag(beta_p)
    left = {p: N[:, p * b : (p + 1) * b, : p * b] for p in range(1, n)}  # N_p,<p  [.., b, p b]
    grown = records_graph(N, inverse, *(R for R, _ in rhs))
    out = []
    for R, f in rhs:
        operators = (inverse if f > 0 else -inverse).unbind(1)
        blocks = R.reshape(-1, n, b, R.shape[-1]).unbind(1)
        if grown:
            X = torch.bmm(operators[0], blocks[0])  # the solution so far, rows 0 .. (p + 1) b
            for p in range(1, n):
                block = torch.baddbmm(blocks[p], left[p], X, alpha=-sign * f)
                X = torch.cat([X, torch.bmm(operators[p], block)], dim=1)
        else:
            X = R.new_empty(R.shape[:-2].numel(), C, R.shape[-1])
            X[:, :b].copy_(torch.bmm(operators[0], blocks[0]))
            for p in range(1, n):
                block = torch.baddbmm(blocks[p], left[p], X[:, : p * b], alpha=-sign * f)
                X[:, p * b : (p + 1) * b].copy_(torch.bmm(operators[p], block))
        out.append(X.view(*lead, C, R.shape[-1]))
    return tuple(out)
