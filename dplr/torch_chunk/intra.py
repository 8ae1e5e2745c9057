"""Stage 2: the intra-chunk matrices and the decayed key/query vectors.

``A_xy[i, j] = Σ_d x_{i,d} y_{j,d} exp(G^x_{i,d} - G_{j,d})`` over ``j < i`` (the rows of the
rank-one part, which read ``G^x = G_{i-1}``) or ``j <= i`` (query rows, ``G^x = G_i``).

With a decay per channel the pairwise factor cannot be split as ``exp(G_i) · exp(-G_j)`` over a
whole chunk: ``exp(-G_j)`` overflows once the chunk has decayed by more than ~88 (fp32). So the
chunk is cut into sub-blocks of ``SUB`` tokens, and every factor is taken against a reference
point that keeps it in range (see :class:`_Blocks`): between blocks all exponents are ``<= 0``
(anything that underflows is truly negligible); inside a block the factors are at most
``exp(HALF_LIMIT)``. The rare blocks that decay faster (a gate of -60 per step) take an exact
element-wise product.

A value-side decay ``gv`` (:class:`ColumnDecay`) scales the state's columns. Its pair factors
``exp(GV_{i,c} - GV_{j,c})`` sit on the value channel ``c`` of a product ``A Z`` over tokens,
not inside a key contraction, so they cannot be folded into ``A``; they use the same sub-blocks
and reference points on the ``[C, V]`` side (docs/value-decay.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import Decay, LowRank, Transition
from .cumsum import Decays, decay_factor, prefix_sums, suffix_sums

SUB = 16
# Inside a sub-block factors reach exp(HALF_LIMIT) ≈ 2e17, leaving fp32 (max ≈ 3e38) a margin of
# exp(48) for the products and their gradients. A gate of -5 per step (Kimi Linear's bound)
# decays a half-block of 8 tokens by exactly 40, so such gates always take the fast path.
HALF_LIMIT = 40.0


class Intra(NamedTuple):
    """Per chunk, ``[M, HV, C, ·]``; the fields a transition does not use are ``None``."""

    q_start: torch.Tensor  # q ⊙ exp(G): reads the chunk's initial state (scale applied later)
    k_end: torch.Tensor  # k ⊙ exp(G_C - G): the keys as the chunk's final state sees them
    A_qk: torch.Tensor  # [C, C], j <= i
    k_start: torch.Tensor | None = None  # tied: k ⊙ exp(G)
    A_kk: torch.Tensor | None = None  # tied: [C, C], j < i
    a_start: torch.Tensor | None = None  # general: a ⊙ exp(G_{i-1})
    b_end: torch.Tensor | None = None  # general: b ⊙ exp(G_C - G)
    A_ab: torch.Tensor | None = None  # general: j < i
    A_ak: torch.Tensor | None = None  # general: j < i
    A_qb: torch.Tensor | None = None  # general: j <= i


def intra_chunk(
    transition: Transition,
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    decays: Decays,
) -> Intra:
    """Chunked ``q, k, a, b [M, HV, C, K]`` and the chunk's cumulative decays → :class:`Intra`."""
    pairs = Pairwise(decays, transition.decay, q.dtype)
    q_rows, k_cols = pairs.rows(q), pairs.cols(k)
    fields = dict(
        q_start=pairs.from_start(q_rows),
        k_end=pairs.to_end(k),
        A_qk=pairs.product(q_rows, k_cols, strict=False),
    )
    if transition.lowrank is LowRank.TIED:
        k_rows = pairs.rows(k)
        fields.update(k_start=pairs.from_start(k_rows), A_kk=pairs.product(k_rows, k_cols, strict=True))
    elif transition.lowrank is LowRank.GENERAL:
        a_rows, b_cols = pairs.rows(a, prev=True), pairs.cols(b)
        fields.update(
            a_start=pairs.from_start(a_rows),
            b_end=pairs.to_end(b),
            A_ab=pairs.product(a_rows, b_cols, strict=True),
            A_ak=pairs.product(a_rows, k_cols, strict=True),
            A_qb=pairs.product(q_rows, b_cols, strict=False),
        )
    return Intra(**fields)


def _causal_mask(n: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


class Pairwise:
    """Forms ``A_xy`` and the decayed vectors for one decay structure.

    ``rows(x)`` and ``cols(y)`` prepare a tensor once for every matrix that uses it (``A_qk``
    and ``A_kk`` share the key columns); ``rows(a, prev=True)`` reads ``G_{i-1}``.
    """

    def __init__(self, decays: Decays, decay: Decay, dtype: torch.dtype):
        self.decay, self.dtype = decay, dtype
        self.G, self.G_to_end = decays.G, decays.to_end
        self._scalar_factors: dict[bool, torch.Tensor] = {}  # one C x C factor per row kind
        if decay is Decay.CHANNEL:
            self.blocks = _Blocks(decays, dtype)

    def rows(self, x: torch.Tensor, *, prev: bool = False):
        if self.decay is Decay.CHANNEL:
            return self.blocks.rows(x, prev)
        if self.decay is Decay.NONE:
            return _Rows(x, prev, None)
        G_rows = torch.cat([torch.zeros_like(self.G[..., :1]), self.G[..., :-1]], dim=-1) if prev else self.G
        return _Rows(x, prev, G_rows)

    def cols(self, y: torch.Tensor):
        return self.blocks.cols(y) if self.decay is Decay.CHANNEL else y

    def from_start(self, rows) -> torch.Tensor:
        """``x ⊙ exp(G_i)`` (``G_{i-1}`` for ``prev`` rows)."""
        if self.decay is Decay.CHANNEL:
            return self.blocks.from_start(rows)
        return rows.x if rows.hat is None else rows.x * decay_factor(rows.hat, self.dtype)[..., None]

    def to_end(self, y: torch.Tensor) -> torch.Tensor:
        """``y ⊙ exp(G_C - G_j)``."""
        if self.decay is Decay.NONE:
            return y
        if self.decay is Decay.CHANNEL:
            return self.blocks.to_end(y)
        factor = decay_factor(self.G_to_end, self.dtype)
        return y * (factor[..., None] if self.decay is Decay.SCALAR else factor)

    def product(self, rows, cols, *, strict: bool) -> torch.Tensor:
        """``A_xy``, over ``j < i`` (strict) or ``j <= i``; ``prev`` rows are always strict."""
        if self.decay is Decay.NONE:
            return (rows.x @ cols.transpose(-1, -2)) * _causal_mask(rows.x.shape[-2], strict, rows.x.device)
        if self.decay is Decay.CHANNEL:
            A = self.blocks.product(rows, cols)
            x, y = rows.x.flatten(-3, -2), cols.y.flatten(-3, -2)
        else:
            x, y = rows.x, cols
            A = (x @ y.transpose(-1, -2)) * self._scalar_factor(rows)
        # The pairs whose decay is exp(0) exactly (j = i; j = i - 1 for prev rows) are taken apart
        # and added without the gate: as a product of factors they would pass O(1) gradients into
        # the gate that cancel only up to rounding, swamping its true gradient under strong decay.
        # (A is a fresh product, so its diagonals can take the terms in place.)
        if rows.prev:
            C = A.shape[-1]
            A = A * torch.ones(C, C, dtype=A.dtype, device=A.device).tril(-2)
            A.diagonal(-1, -2, -1).add_((x[..., 1:, :] * y[..., :-1, :]).sum(-1))
        elif not strict:
            A.diagonal(0, -2, -1).add_((x * y).sum(-1))
        return A

    def _scalar_factor(self, rows) -> torch.Tensor:
        """``exp(G^x_i - G_j)`` for ``j < i``, shared by the matrices whose rows read the same decay."""
        if rows.prev not in self._scalar_factors:
            mask = _causal_mask(rows.x.shape[-2], True, rows.x.device)
            exponent = (rows.hat[..., :, None] - self.G[..., None, :]).masked_fill(~mask, float("-inf"))
            self._scalar_factors[rows.prev] = decay_factor(exponent, self.dtype)
        return self._scalar_factors[rows.prev]


class _Rows(NamedTuple):
    x: torch.Tensor  # raw rows ([.., nb, L, K] by sub-block for channel decay)
    prev: bool  # rows read G_{i-1}
    hat: torch.Tensor | None  # channel: x ⊙ exp(G_i - s_p) <= |x|; scalar: the rows' log decay


class _Cols(NamedTuple):
    y: torch.Tensor  # [.., nb, L, K] raw columns by sub-block
    up: torch.Tensor  # y ⊙ exp(m_p - G_j): scaled to the block middle (clamped)
    down: torch.Tensor  # y ⊙ exp(e_p - G_j): decayed to the block end, <= |y|


class _Blocks:
    """Sub-blocks of ``SUB`` tokens of a channel-decayed chunk and their reference points.

    Per block ``p``: ``s_p`` the decay just before it, ``m_p`` at the end of its first half,
    ``e_p`` at its last token. All factors come from block-local sums (stage 1): three ``exp``
    per token and channel, ``exp(G_i - s_p) <= 1`` for rows, ``exp(m_p - G_j)`` and
    ``exp(e_p - G_j) <= 1`` for columns; every other factor is one ``exp`` per block.

    * Inside a block: ``x ⊙ exp(G_i - m_p)`` against ``y ⊙ exp(m_p - G_j)``. Both factors are at
      most ``exp(HALF_LIMIT)`` when neither half of the block decays by more than ``HALF_LIMIT``,
      which keeps values *and* their gradients (``exp``'s derivative is itself) inside fp32.
      Blocks that decay faster (a gate below about -5 per step) are redone exactly.
    * Between blocks, merged pairwise level by level: the lower half's rows and the upper half's
      columns meet at ``c``, the decay at the end of the upper half, through
      ``x ⊙ exp(G_i - s_p) ⊙ exp(s_p - c)`` and ``y ⊙ exp(e_q - G_j) ⊙ exp(c - e_q)``; every
      exponent ``<= 0`` and a sum over whole blocks between the two.
    """

    def __init__(self, decays: Decays, dtype: torch.dtype):
        *self.lead, self.nb, self.L, _ = decays.local.shape
        self.local, self.totals, self.gates = decays.local, decays.totals, decays.gates
        mid = self.local[..., max(self.L // 2 - 1, 0), :]  # m_p - s_p   [.., nb, K]
        self.E = torch.exp(self.local)  # exp(G_i - s_p)
        # The clamps only bite in unsafe blocks, whose results are replaced (values and gradients).
        self.col_up = torch.exp((mid[..., None, :] - self.local).clamp(max=HALF_LIMIT))
        self.row_to_mid = torch.exp((-mid).clamp(max=HALF_LIMIT))[..., None, :]
        self.down = torch.exp(decays.rest)  # exp(e_p - G_j)
        self.starts = prefix_sums(self.totals, -2)  # s_p, from the chunk's start
        self.to_chunk_end = suffix_sums(self.totals, -2)  # from e_p to the chunk's end
        unsafe = torch.maximum(-mid, mid - self.totals).amax(-1) > HALF_LIMIT  # [.., nb]
        self.unsafe = unsafe.nonzero(as_tuple=True) if bool(unsafe.any()) else None

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*self.lead, self.nb, self.L, t.shape[-1])

    def _join(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*self.lead, self.nb * self.L, t.shape[-1])

    def rows(self, x: torch.Tensor, prev: bool) -> _Rows:
        x = self._split(x)
        # exp(G_{i-1} - s_p) is E shifted by one inside the block (exactly 1 at its first token).
        E = torch.cat([torch.ones_like(self.E[..., :1, :]), self.E[..., :-1, :]], dim=-2) if prev else self.E
        return _Rows(x, prev, x * E)

    def cols(self, y: torch.Tensor) -> _Cols:
        y = self._split(y)
        return _Cols(y, y * self.col_up, y * self.down)

    def from_start(self, rows: _Rows) -> torch.Tensor:
        return self._join(rows.hat * torch.exp(self.starts)[..., None, :])

    def to_end(self, y: torch.Tensor) -> torch.Tensor:
        return self._join(self._split(y) * self.down * torch.exp(self.to_chunk_end)[..., None, :])

    def product(self, rows: _Rows, cols: _Cols) -> torch.Tensor:
        """The strictly lower part (``j < i``) of ``A``."""
        C = self.nb * self.L
        # One full product; only its diagonal blocks are right (there both sides share m_p).
        A = self._join(rows.hat * self.row_to_mid) @ self._join(cols.up).transpose(-1, -2)
        A = A * self._block_mask(A.device)
        if self.unsafe is not None:
            A = self._repair(A, rows, cols)
        size = self.L  # the blocks of this size on the diagonal are done; merge pairs of them
        while size < C:
            m = size // self.L  # sub-blocks per half
            pairs = C // (2 * size)

            def halves(t: torch.Tensor) -> torch.Tensor:  # split the block axis into pairs of halves
                return t.reshape(*self.lead, pairs, 2, m, *t.shape[len(self.lead) + 1 :])  # noqa: B023

            totals = halves(self.totals)  # [.., pairs, 2, m, K]
            below = torch.exp(prefix_sums(totals[..., 1, :, :], -2))  # exp(s_p - c), lower half
            above = torch.exp(suffix_sums(totals[..., 0, :, :], -2))  # exp(c - e_q), upper half
            lower = halves(rows.hat)[..., 1, :, :, :] * below[..., None, :]
            upper = halves(cols.down)[..., 0, :, :, :] * above[..., None, :]
            off = lower.flatten(-3, -2) @ upper.flatten(-3, -2).transpose(-1, -2)  # [.., pairs, size, size]
            for r in range(pairs):
                top = 2 * r * size
                A[..., top + size : top + 2 * size, top : top + size] = off[..., r, :, :]
            size *= 2
        return A

    def _block_mask(self, device) -> torch.Tensor:
        """Strictly causal inside each diagonal block, zero elsewhere."""
        blocks = torch.block_diag(*[_causal_mask(self.L, True, device)] * self.nb)
        return blocks.to(self.E.dtype)

    def _repair(self, A, rows: _Rows, cols: _Cols) -> torch.Tensor:
        """Blocks whose halves decay by more than HALF_LIMIT: the exact element-wise product, in place."""
        w = self.unsafe
        # These blocks decay by hundreds: the pairwise sums G_i - G_j of neighbours (≈ g_i) must
        # not be differences of fp32 sums that large, so the sums are redone in fp64 here.
        gy = torch.cumsum(self.gates[w].double(), dim=1)
        gx = torch.cat([torch.zeros_like(gy[:, :1, :]), gy[:, :-1, :]], dim=1) if rows.prev else gy
        mask = _causal_mask(self.L, True, A.device)[..., None]
        exponent = (gx[:, :, None, :] - gy[:, None, :, :]).masked_fill(~mask, float("-inf"))
        factor = decay_factor(exponent, A.dtype)
        exact = (rows.x[w][:, :, None, :] * cols.y[w][:, None, :, :] * factor).sum(-1)
        blocks = A.view(*self.lead, self.nb, self.L, self.nb, self.L).diagonal(dim1=-4, dim2=-2)
        blocks.movedim(-1, -3)[w] = exact  # [.., nb, L, L]: a view of A's diagonal blocks
        return A


def column_decay(decays: Decays, *, dtype: torch.dtype) -> ColumnDecay | None:
    """The value-side factors of a chunk from the sums of ``gv`` (stage 1); ``None`` without ``gv``."""
    return None if decays.G_end is None else ColumnDecay(decays, dtype)


class ColumnDecay:
    """The value-side decay of each chunk, ``GV_{i,c}`` (inclusive sums of ``gv``): column ``c``
    of the state is scaled by ``exp(gv_{t,c})`` at every token, after the key-side transition.

    Tensors ``[M, HV, C, V]``; ``A`` a ``[M, HV, C, C]`` lower-triangular intra-chunk matrix.
    All factors are ``<= 1`` except inside a sub-block, where they are taken against the block's
    middle as on the key side (at most ``exp(HALF_LIMIT)``; faster blocks are redone exactly).
    """

    def __init__(self, decays: Decays, dtype: torch.dtype):
        self.blocks = bl = _Blocks(decays, dtype)
        self.end = torch.exp(decays.G_end)  # exp(GV_C)  [M, HV, V]
        self._from_start = bl._join(bl.E * torch.exp(bl.starts)[..., None, :])  # exp(GV_i)
        self._to_end = bl._join(bl.down * torch.exp(bl.to_chunk_end)[..., None, :])  # exp(GV_C - GV_j)
        self._between = _between_blocks(bl.totals) if bl.nb > 1 else None

    def from_start(self, y: torch.Tensor) -> torch.Tensor:
        """``y ⊙ exp(GV_i)``: a row that reads the chunk's initial state."""
        return y * self._from_start

    def to_end(self, z: torch.Tensor) -> torch.Tensor:
        """``z ⊙ exp(GV_C - GV_j)``: a row as the chunk's final state sees it."""
        return z * self._to_end

    def product(self, A: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        """``Y[i, c] = Σ_{j <= i} A[i, j] exp(GV_{i,c} - GV_{j,c}) Z[j, c]``."""
        bl = self.blocks
        Zb = bl._split(Z)
        Ab = A.reshape(*bl.lead, bl.nb, bl.L, bl.nb, bl.L)
        # Inside a sub-block p: exp(GV_i - m_p) · (A (Z ⊙ exp(m_p - GV_j))), strictly below the diagonal.
        inner = Ab.diagonal(dim1=-4, dim2=-2).movedim(-1, -3) * _causal_mask(bl.L, True, A.device)
        Y = bl.E * bl.row_to_mid * (inner @ (Zb * bl.col_up))
        if bl.unsafe is not None:
            Y = self._repair(Y, inner, Zb)
        if self._between is not None:
            # Between sub-blocks q < p: exp(GV_i - s_p) · exp(s_p - e_q) · (A_pq (Z_q ⊙ exp(e_q - GV_j))).
            off = Ab.transpose(-3, -2) @ (Zb * bl.down).unsqueeze(-4)  # [.., p, q, L, V]
            Y = Y + bl.E * (off * self._between[..., None, :]).sum(-3)
        # The pairs j = i have the factor exp(0): added without the gate, as in Pairwise.product.
        return bl._join(Y) + A.diagonal(0, -2, -1)[..., None] * Z

    def _repair(self, Y: torch.Tensor, inner: torch.Tensor, Zb: torch.Tensor) -> torch.Tensor:
        """Sub-blocks whose halves decay by more than HALF_LIMIT: the exact element-wise product, in place."""
        bl, w = self.blocks, self.blocks.unsafe
        gy = torch.cumsum(bl.gates[w].double(), dim=1)  # fp64 sums, as in _Blocks._repair
        mask = _causal_mask(bl.L, True, Y.device)[..., None]
        factor = decay_factor((gy[:, :, None, :] - gy[:, None, :, :]).masked_fill(~mask, float("-inf")), Y.dtype)
        Y[w] = (inner[w][..., None] * factor * Zb[w][:, None, :, :]).sum(-2)  # Y is a fresh product
        return Y


def _between_blocks(totals: torch.Tensor) -> torch.Tensor:
    """``exp(s_p - e_q)`` for sub-blocks ``q < p`` (0 elsewhere), ``[.., nb, nb, V]`` from the
    blocks' totals ``[.., nb, V]``: the decay of the whole blocks strictly between them, summed
    as such (a difference of prefix sums would lose the small terms)."""
    r = torch.arange(totals.shape[-2], device=totals.device)
    between = (r[None, None, :] > r[None, :, None]) & (r[None, None, :] < r[:, None, None])  # [p, q, r]
    exponent = torch.einsum("pqr,...rv->...pqv", between.to(totals.dtype), totals)
    return torch.exp(exponent.masked_fill(~(r[:, None] > r[None, :])[..., None], float("-inf")))
