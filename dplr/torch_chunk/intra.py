"""Stage 2: the intra-chunk matrices and the decayed key/query vectors.

``A_xy[i, j] = Σ_d x_{i,d} y_{j,d} exp(G^x_{i,d} - G_{j,d})`` over ``j < i`` (the rows of the
rank-one part, which read ``G^x = G_{i-1}``) or ``j <= i`` (query rows, ``G^x = G_i``).

The pairwise factor splits as ``exp(G_i - r) · exp(r - G_j)`` for any reference point ``r``,
so ``A`` is one matrix product of decayed rows and columns, as long as neither factor leaves
the floating-point range. A chunk that decays by at most ``CHUNK_LIMIT`` (per channel) is
factorised whole, against its middle (:class:`Pairwise`). The others are not:
``exp(-G_j)`` overflows once a chunk has decayed by more than ~88 (fp32). With a decay per
channel such a chunk is cut into sub-blocks of ``SUB`` tokens, and every factor is taken
against a reference point that keeps it in range (see :class:`_Blocks`): between blocks all
exponents are ``<= 0`` (anything that underflows is truly negligible); inside a block the
factors are at most ``exp(HALF_LIMIT)``. The rare blocks that decay faster (a gate of -60 per
step) take an exact element-wise product. With a scalar decay such a chunk takes the
``C x C`` factor tile ``exp(G_i - G_j)`` from fp64 sums.

A value-side decay ``gv`` (:class:`ColumnDecay`) scales the state's columns. Its pair factors
``exp(GV_{i,c} - GV_{j,c})`` sit on the value channel ``c`` of a product ``A Z`` over tokens,
not inside a key contraction, so they cannot be folded into ``A``; they use the same sub-blocks
and reference points on the ``[C, V]`` side (docs/value-decay.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..transition import Decay, LowRank, Transition
from . import records_graph
from .cumsum import Decays, decay_factor, prefix_sums, suffix_sums

SUB = 16
# Inside a sub-block factors reach exp(HALF_LIMIT) ≈ 2e17, leaving fp32 (max ≈ 3e38) a margin of
# exp(48) for the products and their gradients. A gate of -5 per step (Kimi Linear's bound)
# decays a half-block of 8 tokens by exactly 40, so such gates always take the fast path.
HALF_LIMIT = 40.0
# A chunk whose every channel decays by at most CHUNK_LIMIT is factorised whole: its factors lie in
# [exp(-60), exp(60)] ≈ [1e-26, 1e26], normal fp32 numbers, and a masked pair of its product is at
# most 1e26 Σ|x||y| (finite for any realistic input). Typical trained gates (about -0.1 to -0.5 per
# step) decay a 64-token chunk by 5 to 30.
CHUNK_LIMIT = 60.0


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

    def after_solve(self) -> Intra:
        """The fields the state pass and the output read; those only the solve reads are dropped."""
        return self._replace(k_start=None, A_kk=None, a_start=None, A_ab=None, A_ak=None)


def intra_chunk(
    transition: Transition,
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    decays: Decays,
) -> Intra:
    """Chunked ``q, k, a, b [M, HV, C, K]`` and the chunk's cumulative decays → :class:`Intra`.

    ``q, k, a, b`` may be strided views of the caller's tensors (:meth:`ChunkLayout.gather` with
    ``copy=False``): they are read once, by the products that make the row and column sets, and
    every field comes out contiguous for the batched products of the later stages."""
    # Every row and column set first; then the per-token factors go, and each factorised column set
    # is made just before its products and goes after the last. What the stage holds at once is the
    # forward's peak memory, and on a CPU fresh pages cost time (see engine.chunk_fwd).
    if transition.decay is Decay.NONE:  # the inputs are the rows and columns themselves: made contiguous once
        q, k, a, b = (None if x is None else x.contiguous() for x in (q, k, a, b))
    recording = records_graph(q, k, a, b, *decays)
    pairs = Pairwise(decays, transition.decay, q.dtype, recording=recording)
    lowrank = transition.lowrank
    q_rows, k_cols = pairs.rows(q), pairs.cols(k)
    k_rows = pairs.rows(k) if lowrank is LowRank.TIED else None
    a_rows, b_cols = (pairs.rows(a, prev=True), pairs.cols(b)) if lowrank is LowRank.GENERAL else (None, None)
    pairs.release_factors()
    k_cols = pairs.factorised(k_cols)
    fields = dict(q_start=q_rows.start, k_end=k_cols.end, A_qk=pairs.product(q_rows, k_cols, strict=False))
    if lowrank is LowRank.TIED:
        fields.update(k_start=k_rows.start, A_kk=pairs.product(k_rows, k_cols, strict=True))
    elif lowrank is LowRank.GENERAL:
        fields.update(a_start=a_rows.start, b_end=b_cols.end, A_ak=pairs.product(a_rows, k_cols, strict=True))
        del k_cols
        b_cols = pairs.factorised(b_cols)
        fields.update(A_ab=pairs.product(a_rows, b_cols, strict=True), A_qb=pairs.product(q_rows, b_cols, strict=False))
    return Intra(**fields)


def _causal_mask(n: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


class _Rows(NamedTuple):
    x: torch.Tensor  # raw rows [.., C, K]
    prev: bool  # rows read G_{i-1}
    start: torch.Tensor  # x ⊙ exp(G^x_i): the rows as they read the chunk's initial state
    slow: object = None  # the slow chunks' rows, in their own path's form


class _Cols(NamedTuple):
    y: torch.Tensor  # raw columns [.., C, K]
    end: torch.Tensor  # y ⊙ exp(G_C - G_j): as the chunk's final state sees them, <= |y|
    hat: torch.Tensor | None = None  # y ⊙ exp(-G_j): the fast chunks' factorised columns (Pairwise.factorised)
    slow: object = None


class Pairwise:
    """Forms ``A_xy`` and the decayed vectors for one decay structure.

    ``rows(x)`` and ``cols(y)`` prepare a tensor once for every matrix that uses it (``A_qk``
    and ``A_kk`` share the key columns); ``rows(a, prev=True)`` reads ``G_{i-1}``.

    With a decay, a chunk is *fast* when it decays by at most ``CHUNK_LIMIT`` (in every channel):
    then ``exp(G_i - G_j) = exp(G_i) · exp(-G_j)``, and ``A`` is one product ``[C, K] x [K, C]``
    of the start vectors (``x ⊙ exp(G_i)``, needed anyway) against the columns scaled by
    ``exp(-G_j) = exp(G_C - G_j) · exp(-G_C) <= exp(CHUNK_LIMIT)``. All factors are normal fp32
    numbers (``>= exp(-CHUNK_LIMIT)``); the columns carry the large one, so KDA's ``q`` and ``k``
    rows share one scaled column set. The masked pairs ``j > i`` of the product reach
    ``exp(CHUNK_LIMIT) Σ|x||y|`` at most, far from overflow, and are set to zero.
    A pair ``j < i`` passes gradients to the gates before ``j`` through both factors, which cancel
    up to rounding (a residual of order eps times the pair's term, as inside a sub-block of the
    safe path); only the exp(0) pairs, whose true gate gradient is zero, are taken apart below.
    The other chunks (a decay of more than ``CHUNK_LIMIT``, e.g. gates of -1 per step over 64
    tokens) take the safe path on their own: sub-blocks with local reference points (channel) or
    the ``C x C`` factor tile from fp64 sums (scalar). The split is decided on the host per chunk
    and head (one sync; the PyTorch path runs on the CPU).
    """

    def __init__(self, decays: Decays, decay: Decay, dtype: torch.dtype, *, recording: bool = True):
        self.recording = recording  # a graph is recorded through the inputs (see product)
        self.factors = None
        if decay is Decay.CHANNEL:
            self.factors = _ChannelFactors(decays, dtype, recording=recording)
        elif decay is Decay.SCALAR:
            self.factors = _ScalarFactors(decays, dtype)

    def rows(self, x: torch.Tensor, *, prev: bool = False) -> _Rows:
        f = self.factors
        if f is None:
            return _Rows(x, prev, x)
        return _Rows(x, prev, f.scale_start(x, prev), None if f.slow is None else f.slow.rows(f.take(x), prev))

    def cols(self, y: torch.Tensor) -> _Cols:
        f = self.factors
        if f is None:
            return _Cols(y, y)
        if f.quick:  # factorised and end columns from y alone (see _ChannelFactors)
            hat = torch.div(y, f.start, out=torch.empty_like(f.start))  # into the factor's (contiguous) layout
            return _Cols(y, hat * f.chunk_decay, hat)
        # The factor first: the product takes its (contiguous) layout when y is a strided view.
        end = f.end_factor * y
        return _Cols(y, end, None, None if f.slow is None else f.slow.cols(f.take(y)))

    def factorised(self, cols: _Cols) -> _Cols:
        """``cols`` with the fast chunks' factorised columns ``y ⊙ exp(-G_j) = end ⊙ exp(-G_C)``, made
        from ``end`` (one factor per chunk and channel, kept after the per-token ones are released)
        just before the products that read them, so that only one such set is held at a time."""
        f = self.factors
        if f is None or not f.any_fast or cols.hat is not None:
            return cols
        return cols._replace(hat=cols.end * f.from_end)

    def release_factors(self) -> None:
        """Drops the per-token factors once every row and column set is made (products need them no more)."""
        if self.factors is not None:
            self.factors.release()

    def from_start(self, rows: _Rows) -> torch.Tensor:
        """``x ⊙ exp(G_i)`` (``G_{i-1}`` for ``prev`` rows)."""
        return rows.start

    def to_end(self, cols: _Cols) -> torch.Tensor:
        """``y ⊙ exp(G_C - G_j)``."""
        return cols.end

    def product(self, rows: _Rows, cols: _Cols, *, strict: bool) -> torch.Tensor:
        """``A_xy``, over ``j < i`` (strict) or ``j <= i``; ``prev`` rows are always strict."""
        x, y, f = rows.x, cols.y, self.factors
        # Every product is fresh: masked in place, its pairs j > i set to zero (whatever their value).
        if f is None:
            return (rows.start @ cols.end.transpose(-1, -2)).tril_(-1 if strict else 0)
        # The pairs whose decay is exp(0) exactly (j = i; j = i - 1 for prev rows) are left out
        # of the factorised product and added without the gate: as a product of factors they
        # would pass O(1) gradients into the gate that cancel only up to rounding, swamping its
        # true gradient under strong decay; taken exactly, they are also the most accurate pairs
        # (a product of factors rounds to 1 only within eps |G|). (A is a fresh tensor, so its
        # diagonals take them in place.)
        # Where no graph is recorded (through the inputs) they stay in the whole-chunk product: their
        # value rounds like every other pair's, and there is no gradient to protect. The safe path's products never
        # hold them (the scalar tile and the sub-blocks' strictly lower parts), so with a slow chunk
        # they are taken exactly for every chunk.
        exact = None
        if self.recording or f.slow is not None:
            if rows.prev:
                exact = torch.linalg.vecdot(x[..., 1:, :], y[..., :-1, :])
            elif not strict:
                exact = torch.linalg.vecdot(x, y)
        offset = (-1 if rows.prev or strict else 0) - (exact is not None)
        A = None
        if f.any_fast:
            A = (rows.start @ self.factorised(cols).hat.transpose(-1, -2)).tril_(offset)
        if f.slow is not None:
            slow = f.slow.product(rows.slow, cols.slow)
            A = f.merge(A, slow.tril_(offset))
        if exact is not None:
            A.diagonal(offset + 1, -2, -1).add_(exact)
        return A


class _Split:
    """Which chunks (and heads) are fast, decided once on the host; the slow ones are gathered
    from the flattened leading dimensions and their results put back."""

    quick = False  # columns straight from the start factor (channel decay without a graph)

    def release(self) -> None:
        """Drops the per-token factors (the slow path keeps its own)."""
        self.start = self.end_factor = self._starts = None

    def _split(self, G_end: torch.Tensor) -> None:
        """``G_end [..]`` (scalar) or ``[.., K]`` (channel): the chunks' whole decays."""
        slow = G_end < -CHUNK_LIMIT
        slow = (slow if G_end.dim() == self.lead_dims else slow.any(-1)).flatten()
        count = int(slow.sum())  # one sync; in the common case (no slow chunk) the only op here
        self.any_fast = count < slow.numel()
        self.index = slow.nonzero().squeeze(1) if self.any_fast and count else None  # None: all or none slow

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.index is None else x.flatten(0, self.lead_dims - 1)[self.index]

    def merge(self, fast: torch.Tensor | None, slow: torch.Tensor) -> torch.Tensor:
        if fast is None:
            return slow
        return fast.flatten(0, self.lead_dims - 1).index_copy(0, self.index, slow).view_as(fast)


class _ChannelFactors(_Split):
    """Per-channel factors of a chunk from its sub-block sums (stage 1): ``exp(G_i - s_p) <= 1``
    per token and channel, ``s_p`` the decay just before sub-block ``p``; every other factor is
    one ``exp`` per sub-block or chunk.

    Columns read ``exp(G_C - G_j)`` and, factorised, ``exp(-G_j)``. Where a graph is recorded, or
    some chunk decays too fast for the whole-chunk factorisation, the first is made from sums to
    each sub-block's end (``exp(e_p - G_j)``, a second ``exp`` per token and channel) and the
    second from it: each then passes gradients only to the gates it depends on. Without a graph
    and with every chunk fast (:attr:`quick`), ``y ⊙ exp(-G_j)`` is ``y / exp(G_j)`` and
    ``y ⊙ exp(G_C - G_j)`` that times ``exp(G_C)``: no second ``exp``, no sums to the block ends,
    two passes fewer over ``[C, K]``. The values are as accurate (a pair's factor
    ``exp(G_i) / exp(G_j)`` inside a sub-block shares ``exp(s_p)`` exactly); only their gradients
    would differ, by terms that cancel up to rounding (for the last token, O(1) ones)."""

    def __init__(self, decays: Decays, dtype: torch.dtype, *, recording: bool = True):
        *lead, nb, L, K = decays.local.shape
        self.lead_dims, self.shape = len(lead), (*lead, nb * L, K)
        self._split(decays.G_end)
        self.recording = recording  # a graph is recorded through the inputs
        self.quick = self.any_fast and self.index is None and not recording
        # Per sub-block s_p and G_C - e_p, and -G_C, each summed as such over whole sub-blocks:
        # one small product with a 0/1 matrix and one exp for all three (the clamp bites only on
        # -G_C of slow chunks, whose products are replaced; s_p, G_C - e_p <= 0 pass through).
        offsets = torch.exp((_offset_matrix(nb, decays.totals) @ decays.totals).clamp(max=CHUNK_LIMIT))
        exp_starts, to_chunk_end = offsets[..., :nb, None, :], offsets[..., nb : 2 * nb, None, :]
        self.start = _times(torch.exp(decays.local), exp_starts, recording).reshape(self.shape)  # exp(G_i)
        self.from_end = offsets[..., 2 * nb :, :]  # exp(-G_C)  [.., 1, K]
        if self.quick:
            self.chunk_decay = torch.reciprocal(self.from_end)  # exp(G_C)
        else:
            self.end_factor = _times(torch.exp(decays.block_rest()), to_chunk_end, recording).reshape(self.shape)
        self.slow = None
        if not self.any_fast or self.index is not None:
            subset = decays if self.index is None else Decays(*(None if t is None else self.take(t) for t in decays))
            self.slow = _Blocks(subset, dtype)

    def scale_start(self, x: torch.Tensor, prev: bool) -> torch.Tensor:
        """``x ⊙ exp(G_i)`` (``exp(G_{i-1})`` for ``prev`` rows); contiguous even for a strided ``x``
        (the factor comes first, so the product takes its layout)."""
        if not prev:
            return self.start * x
        # exp(G_{i-1}) is exp(G_i) shifted by one token (exactly 1 at the first): the rows are shifted
        # against it rather than a shifted copy of the factor made (one [C, K] tensor less to hold).
        if self.recording:
            return torch.cat([x[..., :1, :], self.start[..., :-1, :] * x[..., 1:, :]], dim=-2)
        out = torch.empty_like(self.start)  # no graph: written in place, no concatenation
        out[..., :1, :] = x[..., :1, :]
        torch.mul(self.start[..., :-1, :], x[..., 1:, :], out=out[..., 1:, :])
        return out


def _times(x: torch.Tensor, factor: torch.Tensor, recording: bool) -> torch.Tensor:
    """``x ⊙ factor`` for a fresh ``x``: over ``x`` itself where no graph is recorded (a CPU saves
    the fresh pages of a second tensor); a graph needs ``x`` (an ``exp``'s output) as it was."""
    return x * factor if recording else x.mul_(factor)


def _offset_matrix(nb: int, like: torch.Tensor) -> torch.Tensor:
    """``[2 nb + 1, nb]``: its product with sub-block totals gives, per sub-block ``p``, the decay
    of the blocks before it (``s_p``), of the blocks after it (``G_C - e_p``), and ``-G_C``."""
    ones = torch.ones(nb, nb, dtype=like.dtype, device=like.device)
    return torch.cat([ones.tril(-1), ones.triu(1), -ones[:1]])


class _ScalarFactors(_Split):
    """One log decay per head: chunk sums in fp64 (stage 1), each exponent rounded once to the
    compute dtype just before its ``exp``."""

    def __init__(self, decays: Decays, dtype: torch.dtype):
        self.G, self.dtype, self.lead_dims = decays.G, dtype, decays.G.dim() - 1
        self.end_factor = decay_factor(decays.to_end, dtype)[..., None]
        self._split(decays.G_end)
        if self.any_fast:  # the clamp: as for channel decay
            self.from_end = decay_factor((-decays.G_end).clamp(max=CHUNK_LIMIT), dtype)[..., None, None]
        self.slow = None
        if not self.any_fast or self.index is not None:
            self.slow = _ScalarTile(self.take(self.G), dtype)
        self._starts: dict[bool, torch.Tensor] = {}

    def scale_start(self, x: torch.Tensor, prev: bool) -> torch.Tensor:
        """``x ⊙ exp(G_i)`` (``exp(G_{i-1})`` for ``prev`` rows), contiguous (the factor first)."""
        return self.start_factor(prev) * x

    def start_factor(self, prev: bool) -> torch.Tensor:
        """``exp(G_i)`` (``exp(G_{i-1})``), shared by the rows of the same kind."""
        if prev not in self._starts:
            G = torch.cat([torch.zeros_like(self.G[..., :1]), self.G[..., :-1]], dim=-1) if prev else self.G
            self._starts[prev] = decay_factor(G, self.dtype)[..., None]
        return self._starts[prev]


class _ScalarTile:
    """The slow path of scalar decay: the ``C x C`` factor ``exp(G^x_i - G_j)`` (fp64 exponent),
    shared by the matrices whose rows read the same decay."""

    def __init__(self, G: torch.Tensor, dtype: torch.dtype):
        self.G, self.dtype = G, dtype
        self._tiles: dict[bool, torch.Tensor] = {}

    def rows(self, x: torch.Tensor, prev: bool) -> tuple[torch.Tensor, bool]:
        return x, prev

    def cols(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def product(self, rows: tuple[torch.Tensor, bool], y: torch.Tensor) -> torch.Tensor:
        x, prev = rows
        if prev not in self._tiles:
            G_rows = torch.cat([torch.zeros_like(self.G[..., :1]), self.G[..., :-1]], dim=-1) if prev else self.G
            mask = _causal_mask(x.shape[-2], True, x.device)
            exponent = (G_rows[..., :, None] - self.G[..., None, :]).masked_fill(~mask, float("-inf"))
            self._tiles[prev] = decay_factor(exponent, self.dtype)
        return (x @ y.transpose(-1, -2)) * self._tiles[prev]


class _BlockRows(NamedTuple):
    x: torch.Tensor  # raw rows by sub-block [.., nb, L, K]
    prev: bool  # rows read G_{i-1}
    hat: torch.Tensor  # x ⊙ exp(G_i - s_p) <= |x|


class _BlockCols(NamedTuple):
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
        self.down = torch.exp(decays.block_rest())  # exp(e_p - G_j)
        self.starts = prefix_sums(self.totals, -2)  # s_p, from the chunk's start
        self.to_chunk_end = suffix_sums(self.totals, -2)  # from e_p to the chunk's end
        unsafe = torch.maximum(-mid, mid - self.totals).amax(-1) > HALF_LIMIT  # [.., nb]
        self.unsafe = unsafe.nonzero(as_tuple=True) if bool(unsafe.any()) else None

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*self.lead, self.nb, self.L, t.shape[-1])

    def _join(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*self.lead, self.nb * self.L, t.shape[-1])

    def rows(self, x: torch.Tensor, prev: bool) -> _BlockRows:
        x = self._split(x)
        # exp(G_{i-1} - s_p) is E shifted by one inside the block (exactly 1 at its first token).
        E = torch.cat([torch.ones_like(self.E[..., :1, :]), self.E[..., :-1, :]], dim=-2) if prev else self.E
        return _BlockRows(x, prev, x * E)

    def cols(self, y: torch.Tensor) -> _BlockCols:
        y = self._split(y)
        return _BlockCols(y, y * self.col_up, y * self.down)

    def product(self, rows: _BlockRows, cols: _BlockCols) -> torch.Tensor:
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

    def _repair(self, A, rows: _BlockRows, cols: _BlockCols) -> torch.Tensor:
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
        self.start = bl._join(bl.E * torch.exp(bl.starts)[..., None, :])  # exp(GV_i)
        self.to_chunk_end = bl._join(bl.down * torch.exp(bl.to_chunk_end)[..., None, :])  # exp(GV_C - GV_j)
        self._between = _between_blocks(bl.totals) if bl.nb > 1 else None

    def from_start(self, y: torch.Tensor) -> torch.Tensor:
        """``y ⊙ exp(GV_i)``: a row that reads the chunk's initial state."""
        return y * self.start

    def to_end(self, z: torch.Tensor) -> torch.Tensor:
        """``z ⊙ exp(GV_C - GV_j)``: a row as the chunk's final state sees it."""
        return z * self.to_chunk_end

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
