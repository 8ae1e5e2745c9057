"""Context parallelism over ``torch.distributed``: one sequence split across the ranks of a group.

Each rank holds a contiguous slice of the sequence (rank ``r`` of ``W`` holds tokens
``[r·T, (r+1)·T)``) and calls the same-named op of this module instead of :mod:`dplr.api`,
with the same tensors and options plus ``group``::

    from dplr.distributed import chunk_kda

    o, ht = chunk_kda(q, k, v, g, beta, group=cp_group, output_final_state=True)
    # o: this rank's slice of the output; ht: the final state on the last rank, None elsewhere

The result equals what one process computes on the whole sequence, forward and backward.

How. The state recurrence is linear in the initial state ``S₀`` for every structure: over a
slice, ``o_t = o⁰_t + S₀ᵀ y_t`` and ``S_end = S⁰ + P S₀``, where ``o⁰, S⁰`` are the results from
a zero start, ``y_t`` (``[K]`` per head) is the output of a ``K×K`` state started from the
identity with zero values, and ``P`` (``K×K``) is the product of the slice's transitions, which
depends on ``k, g, beta, a, b`` but not on ``v``. One call of the ordinary chunk op gives all
of them: the values widened to ``[v | 0]`` (``V + K`` columns) and the initial state
``[0 | I_K]``; the output is ``[o⁰ | y]`` and the final state ``[S⁰ | P]``. The ranks
all-gather their summaries ``(S⁰, P)`` (``[rows, HV, K, V + K]``), each folds those before it
into its true initial state ``c_r`` (``c_{r+1} = S⁰_r + P_r c_r``) and finishes with small
matmuls: ``o_t = o⁰_t + c_rᵀ y_t``. The backward is the mirror image: each rank's gradient
with respect to its ``c_r`` is all-gathered and folded from the last rank back
(``G_r = ∂L/∂c_r + P_rᵀ G_{r+1}``). So one all-gather forward and one backward, whatever ``T``;
with ``cu_seqlens`` and ``output_final_state=True``, one reduce to the last rank (and its
broadcast in the backward) brings the final states of sequences that end on earlier ranks.
Only the piece that continues from the previous rank runs with the widened values; the first
rank, and every other sequence, run the op as usual. So the first rank has less to do: without
``cu_seqlens`` a longer slice there evens out the ranks (``benchmarks/gpu_cp.py`` measures one).

With a value-side decay ``gv`` a slice maps ``S_end = S⁰ + P S₀ Diag(q)`` and
``o_t = o⁰_t + (S₀ᵀ y_t) ⊙ Q_t`` (``Q_t`` the product of ``exp(gv)`` from the slice's start to
``t``, ``q`` at its end; the widened columns run with ``gv = 0``): the summaries carry ``q`` as one
more row, so the exchange stays one all-gather each way (docs/value-decay.md §5).

Contract:

* ``gv`` is given on every rank or on none (the summaries' layout must agree).
* Without ``cu_seqlens``: ``B`` sequences span all ranks; slices may differ in length, ``B``
  and the head sizes must agree. ``initial_state [B, HV, K, V]`` is read on the first rank only.
* With ``cu_seqlens``: ``B == 1``, every rank holds ``T`` tokens and passes the *same* global
  ``cu_seqlens`` (``[N + 1]``, ending at ``W·T``). Sequences may span any number of ranks,
  start or end inside one, or be empty. ``initial_state [N, HV, K, V]`` is the same tensor on
  every rank (or ``None`` on all); each rank reads the rows of the sequences that start in its
  slice, so its gradient there holds those rows: sum it over the group.
* The final state ``[N, HV, K, V]`` comes back on the last rank; the others get ``None``.
* Parameters outside the per-token tensors (``A_log``, ``dt_bias``, ``g_gamma``) get this
  slice's share of their gradient; sum over the group, as for any replicated parameter.
* Every rank of the group makes the same calls in the same order and backpropagates through
  its output (as any loss over the output does), since the collectives pair up across ranks.
* Numerics: the exchange runs in the state dtype (fp32; fp64 for fp64 inputs). ``o⁰`` and
  ``Y`` come out of the op in ``v``'s dtype, so low-precision outputs see one more rounding.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from .. import api, checks
from ..reference import Output
from ..transition import FAMILIES
from .exchange import Exchange
from .halo import previous_tokens
from .plan import batch_plan, global_bounds, group_position, varlen_plan

__all__ = [*(f"chunk_{name}" for name in FAMILIES), "previous_tokens"]

DEFAULT_CHUNK_SIZE = api.DEFAULT_CHUNK_SIZE


def _context_parallel(name: str, args: dict) -> Output:
    """Check the call, split this rank's slice into head and rest, run the op on each, exchange."""
    op = getattr(api, f"chunk_{name}")
    names = _TENSOR_NAMES[name]
    group = args.pop("group")
    initial_state, output_final_state = args.pop("initial_state"), args.pop("output_final_state")
    cu_seqlens, cu_seqlens_cpu = args.pop("cu_seqlens"), args.pop("cu_seqlens_cpu")
    tensors = {n: args.pop(n) for n in names}
    if "gv" in args:  # the families with a value decay: a per-token tensor, sliced like the others
        tensors["gv"] = args.pop("gv")
    options = args
    checks.check_flag("output_final_state", output_final_state)

    qname = names[0]
    B, T, H, HV, K, V = checks.check_core(tensors[qname], tensors["k"], tensors["v"], names=(qname, "k", "v"))
    group, world, rank = group_position(group)
    if cu_seqlens is None:
        if cu_seqlens_cpu is not None:
            raise ValueError("cu_seqlens_cpu was given without cu_seqlens")
        plan = batch_plan(world, rank, B, T, output_final_state)
    else:
        bounds = global_bounds(cu_seqlens, cu_seqlens_cpu, world=world, B=B, T=T, device=tensors[qname].device)
        plan = varlen_plan(world, rank, bounds, T, output_final_state)
    dims = checks.Dims(B=B, T=T, H=H, HV=HV, K=K, V=V, N=plan.num_seqs)
    checks.check_initial_state(initial_state, dims, tensors[qname])
    decayed = tensors.get("gv") is not None
    if decayed:  # checked whole here: the pieces' checks would name the widened or sliced shapes
        checks.check_shaped("gv", tensors["gv"], "B T HV V", dims, tensors[qname])

    v = tensors["v"]
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32  # states are fp32 (fp64)
    head_wide = head_decay = head_final = rest_o = rest_finals = summary = None
    if plan.head:
        piece = _slice(tensors, 0, plan.head_len)
        widened = torch.cat([piece["v"], piece["v"].new_zeros(*piece["v"].shape[:3], K)], -1)
        identity = torch.eye(K, dtype=state_dtype, device=v.device).expand(plan.rows, HV, K, K)
        start = torch.cat([identity.new_zeros(plan.rows, HV, K, V), identity], -1)  # [0 | I]: S⁰ and P at once
        piece["v"] = widened
        if decayed:
            gv = piece["gv"]
            piece["gv"] = torch.cat([gv, gv.new_zeros(*gv.shape[:3], K)], -1)  # P's columns: the key side only
        head_wide, head_final = op(**piece, initial_state=start, output_final_state=True, **options)
        if decayed:
            head_decay, total = _value_decays(gv, state_dtype)
            head_final = torch.cat([head_final, _decay_row(total, K)], -2)
        if plan.head_out:
            summary = head_final
    if plan.rest:
        piece = _slice(tensors, plan.head_len, T)
        rows = initial_state
        if initial_state is not None and plan.rest_seqs is not None:
            rows = initial_state[plan.rest_seqs]
        cu = None if plan.rest_cu is None else torch.tensor(plan.rest_cu, dtype=torch.int64)
        rest_o, finals = op(**piece, initial_state=rows, output_final_state=True, cu_seqlens=cu, **options)
        if plan.rest_out:
            carried = finals[-plan.rows :]
            summary = torch.cat([carried, carried.new_zeros(plan.rows, HV, K, K)], -1)  # P = 0: starts here
            if decayed:  # q multiplies P c = 0: any value serves
                summary = torch.cat([summary, summary.new_zeros(plan.rows, HV, 1, V + K)], -2)
            finals = finals[: -plan.rows]
        rest_finals = finals if finals.shape[0] else None
    if summary is None:  # nothing continues out of this slice
        summary = v.new_zeros(plan.rows, HV, K + decayed, V + K, dtype=state_dtype)
    if rest_o is None:
        rest_o = v.new_empty(B, T - plan.head_len, HV, V)

    o, final = Exchange.apply(plan, group, head_wide, head_decay, head_final, rest_o, summary, rest_finals)
    return Output(o, final if output_final_state and plan.rank == world - 1 else None)


def _slice(tensors: dict, start: int, stop: int) -> dict:
    return {n: None if x is None else x[:, start:stop] for n, x in tensors.items()}


def _value_decays(gv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q [rows, L, HV, V]``, the product of ``exp(gv)`` from a piece's start to each token, and
    ``q [rows, HV, V]``, over the whole piece (1 for an empty one), in the state ``dtype``. The
    sums run in fp64: a prefix over a slice of thousands of tokens would lose ``~sqrt(L)·eps·|sum|``
    in fp32; each sum is ``<= 0``, so its exponential is in ``[0, 1]``."""
    wide = gv.to(torch.float64)
    return torch.exp(wide.cumsum(1)).to(dtype), torch.exp(wide.sum(1)).to(dtype)


def _decay_row(q: torch.Tensor, K: int) -> torch.Tensor:
    """A summary's value-decay row ``[q | 0]``: ``[rows, HV, 1, V + K]`` from ``q [rows, HV, V]``."""
    return torch.cat([q, q.new_zeros(*q.shape[:-1], K)], -1)[..., None, :]


def _positional(name: str) -> tuple[str, ...]:
    params = inspect.signature(getattr(api, f"chunk_{name}")).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)


_TENSOR_NAMES = {name: _positional(name) for name in FAMILIES}


# ---------------------------------------------------------------------------------------------
# The front-ends: the chunk ops of dplr.api with the same tensors and options, plus ``group``.
# Shapes are per rank: ``T`` is this rank's slice; ``cu_seqlens`` and ``initial_state`` are global.


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Output:
    """:func:`dplr.chunk_simple_gla` on this rank's slice ``[B, T, ...]`` of a sequence split over
    ``group``: returns ``o [B, T, HV, V]`` and, on the last rank, the final state ``[N, HV, K, V]``."""
    return _context_parallel("simple_gla", locals())


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Output:
    """:func:`dplr.chunk_gla` on this rank's slice ``[B, T, ...]`` of a sequence split over ``group``:
    returns ``o [B, T, HV, V]`` and, on the last rank, the final state ``[N, HV, K, V]``.
    ``gv [B, T, HV, V]`` (this rank's slice) as there, given on every rank or on none."""
    return _context_parallel("gla", locals())


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Output:
    """:func:`dplr.chunk_delta_rule` on this rank's slice ``[B, T, ...]`` of a sequence split over
    ``group``: returns ``o [B, T, HV, V]`` and, on the last rank, the final state ``[N, HV, K, V]``."""
    return _context_parallel("delta_rule", locals())


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Output:
    """:func:`dplr.chunk_gated_delta_rule` on this rank's slice ``[B, T, ...]`` of a sequence split over
    ``group``: returns ``o [B, T, HV, V]`` and, on the last rank, the final state ``[N, HV, K, V]``."""
    return _context_parallel("gated_delta_rule", locals())


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    safe_gate: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Output:
    """:func:`dplr.chunk_kda` on this rank's slice ``[B, T, ...]`` of a sequence split over ``group``:
    returns ``o [B, T, HV, V]`` and, on the last rank, the final state ``[N, HV, K, V]``.
    ``gv [B, T, HV, V]`` (this rank's slice) as there, given on every rank or on none."""
    return _context_parallel("kda", locals())


def chunk_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    lower_bound: float | None = None,
    safe_gate: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Output:
    """:func:`dplr.chunk_dplr_delta_rule` on this rank's slice ``[B, T, ...]`` of a sequence split over
    ``group``: returns ``o [B, T, HV, V]`` and, on the last rank, the final state ``[N, HV, K, V]``.
    ``gv [B, T, HV, V]`` (this rank's slice) as there, given on every rank or on none."""
    return _context_parallel("dplr_delta_rule", locals())


def chunk_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    lower_bound: float | None = None,
    safe_gate: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Output:
    """:func:`dplr.chunk_rwkv7` on this rank's slice ``[B, T, ...]`` of a sequence split over ``group``:
    returns ``o [B, T, HV, V]`` and, on the last rank, the final state ``[N, HV, K, V]``."""
    return _context_parallel("rwkv7", locals())
