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

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import api, checks
from .reference import Output
from .transition import FAMILIES

DEFAULT_CHUNK_SIZE = api.DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class _Plan:
    """What this rank computes, planned on the host from the shapes and the global ``cu_seqlens``.

    The *head* is the piece that continues from the previous rank (tokens ``[0, head_len)``,
    run with the widened values); the *rest* are the other pieces (tokens ``[head_len, T)``,
    run as usual). ``rows`` is the number of carries (``B``, or 1 with ``cu_seqlens``).
    """

    world: int
    rank: int
    rows: int
    num_seqs: int
    head: bool
    head_len: int
    head_ends: bool  # the head's sequence ends in this slice: its final state is a result here
    head_out: bool  # the head's sequence continues into the next rank
    rest: bool
    rest_seqs: list[int] | None  # global indices of the rest pieces (None: all B rows)
    rest_cu: list[int] | None  # their boundaries in tokens [head_len, T), from 0
    rest_out: bool  # the last rest piece continues into the next rank
    ends_here: list[int]  # sequences whose final state is produced here: head first, then rest
    collected: list[int]  # sequences whose final state travels to the last rank
    output_final_state: bool


def _batch_plan(world: int, rank: int, B: int, T: int, output_final_state: bool) -> _Plan:
    last = rank == world - 1
    return _Plan(
        world=world, rank=rank, rows=B, num_seqs=B,
        head=rank > 0, head_len=T if rank > 0 else 0, head_ends=rank > 0 and last, head_out=rank > 0 and not last,
        rest=rank == 0, rest_seqs=None, rest_cu=None, rest_out=rank == 0 and not last,
        ends_here=list(range(B)) if last else [], collected=[], output_final_state=output_final_state,
    )  # fmt: skip


def _varlen_plan(world: int, rank: int, bounds: list[int], T: int, output_final_state: bool) -> _Plan:
    """``bounds``: the global ``cu_seqlens``. A sequence lives on the ranks from the one holding
    its first token to the one holding its last; an empty one on the rank holding its position
    (the last rank for one at the very end)."""

    def holder(position: int) -> int:
        return min(position // T, world - 1) if T else world - 1

    N = len(bounds) - 1
    first = [holder(bounds[n]) for n in range(N)]
    last = [holder(bounds[n + 1] - 1) if bounds[n + 1] > bounds[n] else first[n] for n in range(N)]
    local = [n for n in range(N) if first[n] <= rank <= last[n]]
    start, stop = rank * T, rank * T + T
    head = bool(local) and first[local[0]] < rank
    head_len = min(bounds[local[0] + 1], stop) - start if head else 0
    rest_seqs = local[1:] if head else local
    rest_cu = [0] + [min(bounds[n + 1], stop) - start - head_len for n in rest_seqs]
    out = bool(local) and last[local[-1]] > rank
    return _Plan(
        world=world, rank=rank, rows=1, num_seqs=N,
        head=head, head_len=head_len, head_ends=head and last[local[0]] == rank,
        head_out=head and out and len(local) == 1,
        rest=bool(rest_seqs), rest_seqs=rest_seqs, rest_cu=rest_cu, rest_out=out and bool(rest_seqs),
        ends_here=[n for n in local if last[n] == rank],
        collected=[n for n in range(N) if last[n] < world - 1], output_final_state=output_final_state,
    )  # fmt: skip


def _gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    x = x.contiguous()
    # Contiguous buffers: empty_like would keep a permuted layout (einsum results, autograd
    # gradients), and the collective writes the sender's contiguous bytes.
    parts = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


def _apply(P: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``P c`` per head: ``[rows, HV, K, K] × [rows, HV, K, V]``."""
    return torch.einsum("bhij,bhjv->bhiv", P, c)


def _apply_transposed(P: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``Pᵀ G`` per head."""
    return torch.einsum("bhij,bhiv->bhjv", P, G)


# A summary ``[rows, HV, K, V + K] = [S⁰ | P]`` says how a slice maps the carry into it to the carry
# out of it; with a value decay it has one more row ``[q | 0]`` (``[rows, HV, K + 1, V + K]``).


def _advance(summary: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The carry out of a slice, ``S⁰ + P c Diag(q)``, from the carry ``c [rows, HV, K, V]`` into it."""
    K, V = c.shape[-2:]
    moved = _apply(summary[..., :K, V:], c)
    if summary.shape[-2] > K:
        moved = moved * summary[..., K:, :V]
    return summary[..., :K, :V] + moved


def _retreat(summary: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The mirror of :func:`_advance` for the carry: ``Pᵀ (G Diag(q))`` from ``G``, the gradient of the carry out."""
    K, V = G.shape[-2:]
    if summary.shape[-2] > K:
        G = G * summary[..., K:, :V]
    return _apply_transposed(summary[..., :K, V:], G)


def _summary_grad(summary: torch.Tensor, c: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`_advance` for the summary, laid out like it: ``[G | (G Diag(q)) cᵀ]``
    and, with a value decay, the row ``[Σ_k G ⊙ (P c) | 0]``."""
    K, V = c.shape[-2:]
    decayed = summary.shape[-2] > K
    Gq = G * summary[..., K:, :V] if decayed else G
    grad = torch.cat([G, torch.einsum("bhiv,bhjv->bhij", Gq, c)], -1)
    if decayed:
        d_q = (G * _apply(summary[..., :K, V:], c)).sum(-2, keepdim=True)
        grad = torch.cat([grad, torch.cat([d_q, d_q.new_zeros(*d_q.shape[:-1], K)], -1)], -2)
    return grad


class _Exchange(torch.autograd.Function):
    """Everything that crosses ranks, with its explicit mirror as the backward.

    Inputs: ``head_wide [rows,L,HV,V+K] = [o⁰ | y]`` (the head's widened output, None without a
    head), ``head_decay [rows,L,HV,V]`` (``Q``, with a value decay; else None) and ``head_final``,
    the head's summary, ``rest_o [B,T-L,HV,V]`` (the output of the rest pieces), ``summary`` (how
    the carry out of this rank depends on the carry in; both summaries laid out as
    :func:`_advance` reads them), ``rest_finals`` (final states of the rest pieces that end here).
    Outputs ``o`` and the final states (last rank; empty elsewhere). The widened output is taken
    whole and its gradient built in one piece: as two slices, autograd would zero-fill a
    full-size gradient for each and add them, which at long slices costs more than the exchange.
    Being one Function whose output ``o`` every rank uses, its backward, and so its collectives,
    run on every rank.
    """

    @staticmethod
    def forward(ctx, plan, group, head_wide, head_decay, head_final, rest_o, summary, rest_finals):
        V = rest_o.shape[-1]
        K = summary.shape[-1] - V
        parts = _gather(summary, group)
        carry = torch.zeros_like(summary[..., :K, :V])  # c_0: the first rank starts from its own initial state
        for j in range(plan.rank):
            carry = _advance(parts[j], carry)

        if plan.head:
            # o = o⁰ + (cᵀ y) ⊙ Q, summed in the state dtype and rounded once to the output's.
            with _tf32_matmuls(rest_o, carry):
                head = torch.einsum("bthk,bhkv->bthv", head_wide[..., V:].to(carry.dtype), carry)
            if head_decay is not None:
                head *= head_decay
            head += head_wide[..., :V]
            head = head.to(rest_o.dtype)
            o = torch.cat([head, rest_o], 1) if rest_o.shape[1] else head
        else:
            o = rest_o.clone()  # a Function's output must not be one of its inputs

        final = rest_o.new_empty(0)
        if plan.output_final_state:
            here = [rest_finals] if rest_finals is not None else []
            if plan.head_ends:
                here.insert(0, _advance(head_final, carry))
            here = torch.cat(here) if here else summary.new_empty(0, *carry.shape[1:])
            final = _collect_finals(plan, group, here)

        ctx.plan, ctx.group = plan, group
        ctx.save_for_backward(carry, head_wide, head_decay, head_final, *parts[plan.rank :])
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        plan, group = ctx.plan, ctx.group
        carry, head_wide, head_decay, head_final, own, *later = ctx.saved_tensors
        V, L = d_o.shape[-1], plan.head_len
        d_here = _spread_final_grads(plan, group, d_final, carry) if plan.output_final_state else None

        d_carry = torch.zeros_like(carry)  # ∂L/∂c_r through this rank's own results
        d_head_wide = d_head_decay = d_head_final = d_rest_finals = None
        if plan.head:
            y = head_wide[..., V:].to(carry.dtype)
            d_head = d_o[:, :L].to(carry.dtype)
            d_scaled = d_head * head_decay if head_decay is not None else d_head
            with _tf32_matmuls(d_o, carry):
                d_carry = d_carry + torch.einsum("bthk,bthv->bhkv", y, d_scaled)
        if d_here is not None:
            if plan.head_ends:
                d_head_end, d_here = d_here[: plan.rows], d_here[plan.rows :]
                d_carry = d_carry + _retreat(head_final, d_head_end)
                d_head_final = _summary_grad(head_final, carry, d_head_end)
            d_rest_finals = d_here if d_here.shape[0] else None

        # Carry gradients flow from later ranks to earlier ones: G_j = ∂L/∂c_j + P_jᵀ G_{j+1} Diag(q_j).
        # Gathered before this rank's per-token gradients below: the earlier ranks wait for it.
        direct = _gather(d_carry, group)
        G = torch.zeros_like(d_carry)
        for j in range(plan.world - 1, plan.rank, -1):
            G = direct[j] + _retreat(later[j - plan.rank - 1], G)
        d_summary = None
        if plan.rank < plan.world - 1:
            d_summary = _summary_grad(own, carry, G)  # c_{r+1} = _advance(summary, c_r)
        if plan.head:
            with _tf32_matmuls(d_o, carry):
                if head_decay is not None:
                    d_head_decay = d_head * torch.einsum("bthk,bhkv->bthv", y, carry)
                d_head_y = torch.einsum("bthv,bhkv->bthk", d_scaled, carry)
            d_head_wide = torch.cat([d_o[:, :L], d_head_y.to(d_o.dtype)], -1)  # o⁰ enters o as it is
        return None, None, d_head_wide, d_head_decay, d_head_final, d_o[:, L:], d_summary, d_rest_finals


def _tf32_matmuls(tokens: torch.Tensor, carry: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where the exchange's per-token products may run on TF32 tensor cores: CUDA, 16-bit
    per-token tensors and an fp32 carry. Then ``y`` and ``dO`` are exact in TF32 (bf16 keeps 8
    significant bits, fp16 11, TF32 11), the carry (and ``dO ⊙ Q``) is rounded to 2⁻¹¹, below
    the 2⁻⁹ of the bf16 output they feed, and products accumulate in fp32. The IEEE fp32 GEMMs
    these shapes get otherwise ([L, K] × [K, V] per head) ran at ~15 TFLOP/s on an H200, ~4 ms
    per product on the critical path at L = 110K tokens. fp32/fp64 tokens stay exact. The
    setting is process-wide, so it is set only around these products and restored after."""
    if (
        tokens.device.type != "cuda"
        or tokens.dtype not in (torch.bfloat16, torch.float16)
        or carry.dtype != torch.float32
    ):
        return contextlib.nullcontext()
    return _matmul_precision("tf32")


@contextlib.contextmanager
def _matmul_precision(precision: str):
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        previous, matmul.fp32_precision = matmul.fp32_precision, precision
    else:
        previous, matmul.allow_tf32 = matmul.allow_tf32, precision == "tf32"
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = previous
        else:
            matmul.allow_tf32 = previous


def _collect_finals(plan: _Plan, group, here: torch.Tensor) -> torch.Tensor:
    """The final states ``[N, HV, K, V]`` on the last rank (empty elsewhere): its own rows, and
    the rows of sequences that ended on earlier ranks, summed into place by one reduce."""
    is_last = plan.rank == plan.world - 1
    rows = {n: i for i, n in enumerate(plan.ends_here)}
    if plan.collected:
        buffer = here.new_zeros(len(plan.collected), *here.shape[1:])
        for i, n in enumerate(plan.collected):
            if n in rows:
                buffer[i] = here[rows[n]]
        dist.reduce(buffer, dst=dist.get_global_rank(group, plan.world - 1), op=dist.ReduceOp.SUM, group=group)
    if not is_last:
        return here.new_empty(0)
    final = here.new_zeros(plan.num_seqs, *here.shape[1:])
    for n, i in rows.items():
        final[n] = here[i]
    for i, n in enumerate(plan.collected):
        final[n] = buffer[i]
    return final


def _spread_final_grads(plan: _Plan, group, d_final: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """The mirror of :func:`_collect_finals`: the gradients of the final states produced here,
    in the order of ``plan.ends_here``, the collected ones broadcast from the last rank."""
    is_last = plan.rank == plan.world - 1
    shape = carry.shape[1:]
    if plan.collected:
        buffer = carry.new_zeros(len(plan.collected), *shape)
        if is_last:
            buffer.copy_(d_final[plan.collected])
        dist.broadcast(buffer, src=dist.get_global_rank(group, plan.world - 1), group=group)
        collected = {n: i for i, n in enumerate(plan.collected)}
    d_here = carry.new_zeros(len(plan.ends_here), *shape)
    for i, n in enumerate(plan.ends_here):
        d_here[i] = d_final[n] if is_last else buffer[collected[n]]
    return d_here


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
    group, world, rank = _group_position(group)
    if cu_seqlens is None:
        if cu_seqlens_cpu is not None:
            raise ValueError("cu_seqlens_cpu was given without cu_seqlens")
        plan = _batch_plan(world, rank, B, T, output_final_state)
    else:
        bounds = _global_bounds(cu_seqlens, cu_seqlens_cpu, world=world, B=B, T=T, device=tensors[qname].device)
        plan = _varlen_plan(world, rank, bounds, T, output_final_state)
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

    o, final = _Exchange.apply(plan, group, head_wide, head_decay, head_final, rest_o, summary, rest_finals)
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


def _group_position(group) -> tuple[dist.ProcessGroup, int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "dplr.distributed needs torch.distributed initialised (torch.distributed.init_process_group)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group must contain this rank")
    return group, dist.get_world_size(group), rank


def _global_bounds(cu_seqlens, cu_seqlens_cpu, *, world: int, B: int, T: int, device: torch.device) -> list[int]:
    """The global ``cu_seqlens`` as host integers, checked against the ``world·T`` tokens of the group."""
    checks.require_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64))
    if cu_seqlens_cpu is not None:
        checks.require_tensor("cu_seqlens_cpu", cu_seqlens_cpu, dtypes=(torch.int32, torch.int64))
    host_tensor = cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu
    if host_tensor.dim() == 1 and host_tensor.numel() and int(host_tensor[-1]) != world * T:
        raise ValueError(
            f"cu_seqlens must hold the boundaries of the whole sequence, every rank passing the same, and end "
            f"at world_size * T = {world} * {T} = {world * T} (each rank holds T tokens), got {int(host_tensor[-1])}"
        )
    host = checks.check_cu_seqlens(cu_seqlens, cu_seqlens_cpu, B=B, T=world * T, device=device)
    return host if host is not None else cu_seqlens.tolist()  # the split is planned on the host


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


# ---------------------------------------------------------------------------------------------
# The halo of a short convolution or token shift: the last tokens of the previous rank.


class _PreviousTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, last, group, rank, world):
        parts = _gather(last, group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return parts[rank - 1] if rank > 0 else torch.zeros_like(last)

    @staticmethod
    def backward(ctx, d_tail):
        parts = _gather(d_tail, ctx.group)  # the gradient of the tail each rank received
        rank = ctx.rank
        return (parts[rank + 1] if rank < ctx.world - 1 else torch.zeros_like(d_tail)), None, None, None


def previous_tokens(x: torch.Tensor, count: int, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The last ``count`` tokens of the previous rank's slice, zeros on the first rank, with the
    gradient sent back to that rank: ``x [B, T, ...]`` → ``[B, count, ...]``.

    This is the ``tail`` that a short causal convolution of width ``count + 1`` (or a token shift,
    ``count = 1``) needs at the start of a slice, e.g. ``ShortConvolution(y, previous_tokens(y, 3))``
    for width 4. Every rank must hold at least ``count`` tokens. One all-gather each way.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise TypeError(f"x must be a tensor [B, T, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if x.shape[1] < count:
        raise ValueError(f"x holds T={x.shape[1]} tokens on this rank; previous_tokens needs at least count={count}")
    group, world, rank = _group_position(group)
    return _PreviousTokens.apply(x[:, x.shape[1] - count :], group, rank, world)
