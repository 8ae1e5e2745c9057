"""The cost of the chunk algorithm, stage by stage, as the math and a fused GPU kernel see it.

Every stage of DESIGN §3 is written down as *terms* (matmul FLOPs, other FLOPs, exponentials)
per chunk and value head, and as the *tensors* it reads and writes. A term knows its backward
cost; a tensor knows its size and dtype. :func:`account` turns both into totals for a shape.

Conventions (the derivation is in ``docs/accounting.md``):

* FLOPs: a product ``[m, k] x [k, n]`` costs ``2 m n k``. Matmuls are tensor-core eligible and
  counted as *dense tiles*: a causal ``C x C`` matrix costs the full ``2 C² K`` (its masked
  triangle is computed and thrown away, as a tiled kernel does).
* Backward: each forward product ``X = A B`` costs two products of the same size
  (``dA = dX Bᵀ``, ``dB = Aᵀ dX``); elementwise work doubles; decay factors are recomputed
  (same exponentials again). The triangular inverse is the exception (its gradient is two
  ``C x C x C`` products). With ``recompute=True`` the backward also reruns the forward state
  pass, because storing a ``K x V`` state per chunk is what exhausts memory at long T.
* Bytes, two views: *ideal* (the op fused: each input read once, each output written once)
  and *plan* (each stage a kernel that reads what it needs from memory and writes what it
  produces, with the stage boundaries of :func:`dplr.engine.chunk_fwd`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..transition import Decay, LowRank, Transition

FORWARD_STAGES = ("cumsum", "intra", "solve", "state", "output")
RECOMPUTE = "recompute"
# A causal C x C matrix is built from sub-blocks of this many tokens (DESIGN §3, secondary
# chunking); the triangular inverse inverts the diagonal sub-blocks by substitution.
SUB = 16


@dataclass(frozen=True)
class Shape:
    """One call: ``q, k [B, T, H, K]``, ``v [B, T, HV, V]``, chunk size ``C``."""

    B: int
    T: int
    H: int
    K: int
    V: int
    C: int = 64
    HV: int | None = None

    def __post_init__(self) -> None:
        for name in ("B", "T", "H", "K", "V", "C"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "T" else 1):
                floor = "a non-negative" if name == "T" else "a positive"
                raise ValueError(f"{name} must be {floor} integer, got {value!r}")
        if self.C & (self.C - 1):
            raise ValueError(f"C must be a power of two (sub-blocks are merged in halves), got {self.C}")
        if self.HV is None:
            object.__setattr__(self, "HV", self.H)
        if isinstance(self.HV, bool) or not isinstance(self.HV, int) or self.HV < 1 or self.HV % self.H:
            raise ValueError(f"HV must be a positive multiple of H={self.H}, got {self.HV!r}")

    @property
    def chunks(self) -> int:
        """Chunks per head, the last one of each sequence padded: ``B · ceil(T / C)``."""
        return self.B * math.ceil(self.T / self.C)

    @property
    def token_heads(self) -> int:
        """``B · T · HV``: the unit of the per-token, per-head figures."""
        return self.B * self.T * self.HV


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor in device memory."""

    io: int = 2  # q, k, v, a, b, g, beta, o and their gradients: bf16, as models train
    decay: int = 4  # cumulative log decays: fp32, as DESIGN §3 requires of the cumsum
    operand: int = 2  # decayed vectors, C x C matrices, W, U, P: tensor-core operands in bf16
    state: int = 4  # per-chunk states, initial and final state: fp32 (DESIGN §2)


@dataclass(frozen=True)
class Term:
    """One piece of work per chunk and value head: its forward and backward amounts."""

    label: str
    fwd: float
    bwd: float


def product(label: str, m: int, n: int, k: int, count: float = 1) -> Term:
    """``count`` products ``[m, k] x [k, n]``; the backward is two products of the same size."""
    flops = 2.0 * m * n * k * count
    return Term(label, flops, 2 * flops)


def elementwise(label: str, amount: float, *, bwd_factor: float = 2.0) -> Term:
    """Vector work; the backward of ``z = x y`` is two products, of a sum one copy (factor 1)."""
    return Term(label, amount, bwd_factor * amount)


def exps(label: str, amount: float) -> Term:
    """Exponentials; the backward recomputes the factor (``exp``'s derivative is itself)."""
    return Term(label, amount, amount)


@dataclass(frozen=True)
class TensorSpec:
    """``elements`` per unit (``token``, ``chunk`` or ``seq``) and head (``key`` or ``value``)."""

    name: str
    elements: int
    unit: str
    heads: str
    kind: str  # a field of Precision
    op_input: bool = False
    op_output: bool = False
    alias: str | None = None  # the same tensor as an op input (no decay: q_start is q)


@dataclass
class StageSpec:
    """A stage of the chunk algorithm: its work per chunk and value head, and its tensors."""

    name: str
    matmul: list[Term] = field(default_factory=list)
    other: list[Term] = field(default_factory=list)
    exps: list[Term] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # outputs the backward reads again


def _decay_width(transition: Transition, K: int) -> int:
    return {Decay.NONE: 0, Decay.SCALAR: 1, Decay.CHANNEL: K}[transition.decay]


def tensors(transition: Transition, *, C: int, K: int, V: int) -> dict[str, TensorSpec]:
    """Every tensor the chunk algorithm touches, named as the engine's stage results name them."""
    Kg, lowrank, decayed = _decay_width(transition, K), transition.lowrank, transition.decay is not Decay.NONE

    def token(name, n, heads="value", kind="operand", **kw):
        return TensorSpec(name, n, "token", heads, kind, **kw)

    specs = [
        token("q", K, "key", "io", op_input=True),
        token("k", K, "key", "io", op_input=True),
        token("v", V, kind="io", op_input=True),
        TensorSpec("initial_state", K * V, "seq", "value", "state", op_input=True),
        token("q_start", K, alias=None if decayed else "q"),
        token("k_end", K, alias=None if decayed else "k"),
        token("A_qk", C),  # a C x C matrix per chunk is C elements per token
        token("o", V, kind="io", op_output=True),
        TensorSpec("initial", K * V, "chunk", "value", "state"),
        TensorSpec("final", K * V, "seq", "value", "state", op_output=True),
    ]
    if decayed:
        specs += [token("g", Kg, kind="io", op_input=True), TensorSpec("G_end", Kg, "chunk", "value", "decay")]
    if transition.decay is Decay.SCALAR:  # chunk sums
        specs += [token("G", Kg, kind="decay"), token("to_end", Kg, kind="decay")]
    if transition.decay is Decay.CHANNEL:  # sums inside sub-blocks, and the sub-blocks' totals
        nb = C // min(SUB, C)
        specs += [token("local", Kg, kind="decay"), token("rest", Kg, kind="decay"), token("gates", Kg, alias="g")]
        specs += [TensorSpec("totals", nb * Kg, "chunk", "value", "decay")]
    if lowrank is not LowRank.NONE:
        specs += [token("W", K), token("U", V), token("pseudo", V)]
    if lowrank is LowRank.TIED:
        specs += [token("beta", 1, kind="io", op_input=True), token("A_kk", C)]
        specs += [token("k_start", K, alias=None if decayed else "k")]
    if lowrank is LowRank.GENERAL:
        specs += [token("a", K, "key", "io", op_input=True), token("b", K, "key", "io", op_input=True)]
        specs += [token("a_start", K, alias=None if decayed else "a")]
        specs += [token("b_end", K, alias=None if decayed else "b")]
        specs += [token(name, C) for name in ("A_ab", "A_ak", "A_qb")]
    return {s.name: s for s in specs}


def forward_stages(transition: Transition, *, C: int, K: int, V: int) -> list[StageSpec]:
    """The five stages of DESIGN §3 for one structure; every term is per chunk and value head."""
    decay, lowrank = transition.decay, transition.lowrank
    Kg = _decay_width(transition, K)
    general, tied = lowrank is LowRank.GENERAL, lowrank is LowRank.TIED
    L = min(SUB, C)
    nb = C // L
    names = {LowRank.NONE: ["A_qk"], LowRank.TIED: ["A_qk", "A_kk"], LowRank.GENERAL: ["A_qk", "A_ab", "A_ak", "A_qb"]}
    matrices = names[lowrank]
    row_ops = {LowRank.NONE: ["q"], LowRank.TIED: ["q", "k"], LowRank.GENERAL: ["q", "a"]}[lowrank]
    col_ops = ["k", "b"] if general else ["k"]

    cumsum = StageSpec("cumsum")
    sums = {Decay.NONE: [], Decay.SCALAR: ["G", "to_end"], Decay.CHANNEL: ["local", "rest", "totals", "gates"]}[decay]
    if decay is not Decay.NONE:
        cumsum.other.append(elementwise("G = cumsum(g) in the chunk", C * Kg, bwd_factor=1.0))
        cumsum.reads += ["g"]
        cumsum.writes += [*sums, "G_end"]

    intra = StageSpec("intra")
    intra.matmul += [product(f"{m} (dense C x C tile)", C, C, K) for m in matrices]
    intra.reads += [*row_ops, *[c for c in col_ops if c not in row_ops]]
    intra.reads += sums
    starts = [f"{x}_start" for x in row_ops]
    ends = [f"{y}_end" for y in col_ops]
    intra.writes += [*starts, *ends, *matrices]  # without decay the vectors are the inputs (aliases)
    if decay is Decay.CHANNEL:
        # Operands scaled once by their factor: rows, columns, start and end vectors.
        scaled = 2 * len(row_ops) + 2 * len(col_ops)
        intra.other.append(elementwise("decayed operands (rows, columns, start, end)", scaled * C * K))
        # One exp per token and channel for each distinct exponent: G_i - s_p (rows),
        # m_p - G_j (columns), G_C - G_j (end, summed as such); a rows read G_{i-1}: one more.
        intra.exps.append(exps("row, column and end factors", (3 + general) * C * K))
        # Per sub-block p: exp(s_p), exp(s_p - m_p), exp(m_p - e_p); per pair of sub-blocks one
        # shift exp(s_p - e_q) that moves a block's rows to an earlier block's reference point.
        intra.exps.append(exps("sub-block reference points", (3 * nb + nb * (nb - 1) // 2) * K))
    elif decay is Decay.SCALAR:
        # The pairwise factor exp(G_i - G_j) is one C x C tile per chunk, shared by the matrices
        # whose rows read G_i; rows that read G_{i-1} (general) need a second tile.
        intra.exps.append(exps("pairwise factor tile", (1 + general) * C * C))
        intra.exps.append(exps("start and end factors", (2 + general) * C))
        intra.other.append(elementwise("pairwise factor on each matrix", len(matrices) * C * C))
        intra.other.append(elementwise("start and end vectors", (len(starts) + len(ends)) * C * K))

    solve = StageSpec("solve")
    if lowrank is not LowRank.NONE:
        # (I + L)^-1 by blocks: diagonal L x L blocks by substitution, the rest by matmuls.
        diag = nb * L**3 / 3
        solve.matmul.append(Term("inverse (off-diagonal blocks)", C**3 / 3 - diag, 4.0 * C**3))
        solve.other.append(elementwise("inverse (diagonal blocks, substitution)", diag))
        solve.matmul.append(product("W = M (decayed a or k)", C, K, C))
        if tied:
            solve.matmul.append(product("U = M V", C, V, C))
            solve.other.append(elementwise("beta on the system and the right-hand sides", C * C + C * (K + V)))
            solve.reads += ["A_kk", "beta", "k_start", "v"]
        else:
            # U = (M A_ak) V costs 2C³ + 2C²V, M (A_ak V) costs 4C²V: a kernel takes the cheaper.
            if C < V:
                solve.matmul += [product("M A_ak", C, C, C), product("U = (M A_ak) V", C, V, C)]
            else:
                solve.matmul += [product("A_ak V", C, V, C), product("U = M (A_ak V)", C, V, C)]
            solve.reads += ["A_ab", "a_start", "A_ak", "v"]
        solve.writes += ["W", "U"]
        solve.saved += ["W", "U"]

    state = StageSpec("state")
    if lowrank is not LowRank.TIED:
        state.matmul.append(product("k_endᵀ V", K, V, C))
        state.reads += ["k_end", "v"]
    if lowrank is not LowRank.NONE:
        state.matmul.append(product("P = U + W S", C, V, K))
        state.matmul.append(product(f"{'b_end' if general else 'k_end'}ᵀ P", K, V, C))
        state.other.append(elementwise("P = U + W S (the add)", C * V))
        state.reads += ["W", "U", "b_end" if general else "k_end"]
        state.writes += ["pseudo"]
        state.saved += ["pseudo"]
    if decay is not Decay.NONE:
        state.other.append(elementwise("exp(G_C) ⊙ S", K * V))
        state.exps.append(exps("exp(G_C)", Kg))
        state.reads += ["G_end"]
    state.other.append(elementwise("state update adds", (2 if general else 1) * K * V))
    state.reads += ["initial_state"]
    state.writes += ["initial", "final"]
    state.saved += ["initial"]

    output = StageSpec("output")
    output.matmul.append(product("q_start S", C, V, K))
    output.matmul.append(product(f"A_qk {'P' if tied else 'V'}", C, V, C))
    output.reads += ["q_start", "initial", "A_qk", "pseudo" if tied else "v"]
    if general:
        output.matmul.append(product("A_qb P", C, V, C))
        output.reads += ["A_qb", "pseudo"]
    output.other.append(elementwise("sum of the terms and the scale", (3 if general else 2) * C * V))
    output.writes += ["o"]
    return [cumsum, intra, solve, state, output]


@dataclass(frozen=True)
class StageCost:
    """Totals of one stage for a shape. ``direction`` is ``fwd`` or ``bwd``."""

    stage: str
    direction: str
    matmul: float
    other: float
    exps: float
    bytes_ideal: float
    bytes_plan: float
    terms: tuple[tuple[str, str, float], ...] = ()  # (kind, label, total)

    @property
    def key(self) -> str:
        return f"{self.direction}/{self.stage}"


@dataclass(frozen=True)
class Account:
    """Every stage of one structure at one shape, forward then backward."""

    transition: Transition
    shape: Shape
    precision: Precision
    recompute: bool
    stages: tuple[StageCost, ...]

    def rows(self, direction: str | None = None) -> list[StageCost]:
        return [s for s in self.stages if direction is None or s.direction == direction]

    def total(self, direction: str | None = None) -> StageCost:
        """Sum over the stages of one direction (``None``: forward and backward)."""
        rows = self.rows(direction)
        sums = {f: sum(getattr(s, f) for s in rows) for f in ("matmul", "other", "exps", "bytes_ideal", "bytes_plan")}
        return StageCost("total", direction or "fwd+bwd", **sums)


def _bytes(spec: TensorSpec, shape: Shape, precision: Precision, *, plan: bool) -> float:
    """The plan works on padded chunks per value head (a key head's rows are read by each of
    its value heads, as the engine expands them); the ideal touches each real token once."""
    heads = shape.H if spec.heads == "key" and not plan else shape.HV
    per_unit = {"token": shape.chunks * shape.C if plan else shape.B * shape.T, "chunk": shape.chunks, "seq": shape.B}
    return float(spec.elements * per_unit[spec.unit] * heads * getattr(precision, spec.kind))


def account(
    transition: Transition, shape: Shape, *, precision: Precision | None = None, recompute: bool = True
) -> Account:
    """The per-stage cost of the chunk algorithm of ``transition`` at ``shape``.

    Forward stages in order; then the backward: (``recompute``) a rerun of the forward state
    pass for the per-chunk states, then the backward of each stage in reverse order.
    """
    precision = precision or Precision()
    specs = tensors(transition, C=shape.C, K=shape.K, V=shape.V)
    stages = forward_stages(transition, C=shape.C, K=shape.K, V=shape.V)
    units = shape.chunks * shape.HV

    def resolve(name: str) -> TensorSpec:
        spec = specs[name]
        return specs[spec.alias] if spec.alias else spec

    def size(spec: TensorSpec, *, plan: bool) -> float:
        return _bytes(spec, shape, precision, plan=plan)

    # Plan: reads go to memory (an alias reads its input); a write of an alias costs nothing.
    def plan_read(names) -> float:
        return sum(size(resolve(n), plan=True) for n in names)

    def plan_write(names) -> float:
        return sum(size(specs[n], plan=True) for n in names if not specs[n].alias)

    def ideal_write(names) -> float:
        return sum(size(specs[n], plan=False) for n in names if specs[n].op_output)

    # The ideal reads each op input once: charge it to the first stage that reads it.
    first_read, seen = {}, set()
    for stage in stages:
        names = [n for n in dict.fromkeys(resolve(r).name for r in stage.reads) if n not in seen]
        first_read[stage.name] = sum(size(specs[n], plan=False) for n in names if specs[n].op_input)
        seen.update(names)

    def cost(stage: StageSpec, direction: str, bytes_ideal: float, bytes_plan: float) -> StageCost:
        backward = direction == "bwd"
        groups = (("matmul", stage.matmul), ("other", stage.other), ("exps", stage.exps))
        terms = tuple((kind, t.label, (t.bwd if backward else t.fwd) * units) for kind, ts in groups for t in ts)
        sums = {kind: sum(total for k, _, total in terms if k == kind) for kind, _ in groups}
        return StageCost(stage.name, direction, **sums, bytes_ideal=bytes_ideal, bytes_plan=bytes_plan, terms=terms)

    forward = [
        cost(s, "fwd", first_read[s.name] + ideal_write(s.writes), plan_read(s.reads) + plan_write(s.writes))
        for s in stages
    ]
    backward = []
    if recompute:
        state = next(c for c in forward if c.stage == "state")
        backward.append(replace(state, stage=RECOMPUTE, direction="bwd", bytes_ideal=0.0))
    for s in reversed(stages):
        # The backward of a stage reads its inputs, the gradients of its outputs and what it
        # saved, and writes the gradients of its inputs (a partial gradient is written once).
        bytes_plan = 2 * plan_read(s.reads) + plan_write(s.writes) + plan_write(s.saved)
        bytes_ideal = 2 * first_read[s.name] + ideal_write(s.writes)
        backward.append(cost(s, "bwd", bytes_ideal, bytes_plan))
    return Account(transition, shape, precision, recompute, tuple(forward + backward))


def recurrent_cost(transition: Transition, shape: Shape, *, precision: Precision | None = None) -> dict[str, float]:
    """The token-by-token recurrence (DESIGN §2): matrix-vector work only, no tensor cores.

    Per token and value head: reads ``xᵀ S`` of the state (``q``; and ``k`` tied, ``a``
    general) at ``2 K V`` each, rank-one updates (``k vᵀ``; and ``b xᵀ`` general) at ``2 K V``
    each, the decay at ``K V``, the tied correction ``beta (v - kᵀ S)`` at ``2 V`` and the
    output scale at ``V``. The state stays on chip, so the bytes are the ideal ones; the
    backward is taken as twice the forward plus one recomputing pass (3x). ``serial_steps``
    is the dependency chain: ``T`` steps against ``T / C`` for the chunk algorithm.
    """
    precision = precision or Precision()
    K, V = shape.K, shape.V
    reads = 1 if transition.lowrank is LowRank.NONE else 2
    updates = 2 if transition.lowrank is LowRank.GENERAL else 1
    matvec = 2 * K * V * reads
    per_token = matvec + 2 * K * V * updates + V
    per_token += (0 if transition.decay is Decay.NONE else K * V) + (2 * V if transition.lowrank is LowRank.TIED else 0)
    n = shape.token_heads
    fwd_bytes = account(transition, shape, precision=precision, recompute=False).total("fwd").bytes_ideal
    return dict(
        matvec_fwd=matvec * n,
        other_fwd=per_token * n,
        other_fwd_bwd=3 * per_token * n,
        exps_fwd=_decay_width(transition, K) * n,
        bytes_ideal_fwd=fwd_bytes,
        serial_steps=shape.T,
    )


def attention_cost(shape: Shape) -> dict[str, float]:
    """Causal softmax attention with the same heads: ``T² (K + V)`` FLOPs per sequence and head
    forward (``2 T² d`` at ``K = V = d``: the two products, masked half skipped), and
    ``T² (3K + 2V)`` backward (the score product recomputed, four gradient products)."""
    pairs = shape.B * shape.HV * shape.T**2
    return dict(
        matmul_fwd=pairs * (shape.K + shape.V),
        matmul_fwd_bwd=pairs * (4 * shape.K + 3 * shape.V),
        exps_fwd=pairs / 2,
    )
