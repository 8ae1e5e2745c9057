"""Everything that crosses ranks in a context-parallel call: the summaries' all-gather and the
carries folded from them, the output corrections, the final states, and the mirror of each in the
backward."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .plan import Plan

try:  # the per-token products as one Triton pass on CUDA (dplr.triton.carry)
    from ..triton.carry import carry_product
except ImportError:  # a build without triton: PyTorch alone
    carry_product = None
# bf16 x bf16 -> fp32 batched GEMMs (CUDA; torch >= 2.8): exact products summed in fp32
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape on all), in rank order: one all-gather."""
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


class Exchange(torch.autograd.Function):
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
        parts = gather(summary, group)
        carry = torch.zeros_like(summary[..., :K, :V])  # c_0: the first rank starts from its own initial state
        for j in range(plan.rank):
            carry = _advance(parts[j], carry)

        if plan.head:  # o = o⁰ + (cᵀ y) ⊙ Q on the head's tokens, written into place
            L = head_wide.shape[1]
            o = rest_o.new_empty(rest_o.shape[0], L + rest_o.shape[1], *rest_o.shape[2:])
            _per_token(head_wide[..., V:], carry, out=o[:, :L], scale=head_decay, add=head_wide[..., :V], tokens=rest_o)
            o[:, L:] = rest_o
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
            y, d_head = head_wide[..., V:], d_o[:, :L]
            d_scaled = d_head if head_decay is None else d_head.to(carry.dtype) * head_decay
            d_carry = d_carry + _token_sums(y, d_scaled, carry, tokens=d_o)
        if d_here is not None:
            if plan.head_ends:
                d_head_end, d_here = d_here[: plan.rows], d_here[plan.rows :]
                d_carry = d_carry + _retreat(head_final, d_head_end)
                d_head_final = _summary_grad(head_final, carry, d_head_end)
            d_rest_finals = d_here if d_here.shape[0] else None

        # Carry gradients flow from later ranks to earlier ones: G_j = ∂L/∂c_j + P_jᵀ G_{j+1} Diag(q_j).
        # Gathered before this rank's per-token gradients below: the earlier ranks wait for it.
        direct = gather(d_carry, group)
        G = torch.zeros_like(d_carry)
        for j in range(plan.world - 1, plan.rank, -1):
            G = direct[j] + _retreat(later[j - plan.rank - 1], G)
        d_summary = None
        if plan.rank < plan.world - 1:
            d_summary = _summary_grad(own, carry, G)  # c_{r+1} = _advance(summary, c_r)
        if plan.head:  # dy = (dO ⊙ Q) c and dQ = dO ⊙ (cᵀ y), written into place; o⁰ enters o as it is
            d_head_wide = d_o.new_empty(*d_head.shape[:-1], head_wide.shape[-1])
            d_head_wide[..., :V] = d_head
            _per_token(d_scaled, carry.transpose(-1, -2), out=d_head_wide[..., V:], tokens=d_o)
            if head_decay is not None:
                d_head_decay = _per_token(y, carry, scale=d_head, out=torch.empty_like(head_decay), tokens=d_o)
        return None, None, d_head_wide, d_head_decay, d_head_final, d_o[:, L:], d_summary, d_rest_finals


def _sixteen_bit_on_cuda(tokens: torch.Tensor, carry: torch.Tensor) -> bool:
    """CUDA, 16-bit per-token tensors and an fp32 carry: where the per-token products may run on
    TF32 (:func:`_tf32_matmuls`) and, with Triton, as one pass (:func:`_fused`)."""
    sixteen = tokens.dtype in (torch.bfloat16, torch.float16)
    return tokens.device.type == "cuda" and sixteen and carry.dtype == torch.float32


def _fused(tokens: torch.Tensor, carry: torch.Tensor) -> bool:
    """Whether :func:`_per_token` runs as a Triton pass (:mod:`dplr.triton.carry`), where the
    PyTorch form spends more on copies than on math."""
    return carry_product is not None and _sixteen_bit_on_cuda(tokens, carry)


def _per_token(
    y: torch.Tensor,
    carry: torch.Tensor,
    *,
    out: torch.Tensor,
    scale: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """``out = (y @ carry) ⊙ scale + add`` per (row, head), ``y [rows, L, HV, M]``, ``carry
    [rows, HV, M, N]`` (a transposed view gives ``y cᵀ``): summed in the carry's dtype and rounded
    once into ``out``. One Triton pass (:mod:`dplr.triton.carry`) where :func:`_fused` allows,
    else PyTorch, its products on TF32 as :func:`_tf32_matmuls` (for ``tokens``) allows."""
    if _fused(tokens, carry):
        return carry_product(y, carry, out=out, scale=scale, add=add)
    with _tf32_matmuls(tokens, carry):
        result = torch.einsum("bthm,bhmn->bthn", y.to(carry.dtype), carry)
    if scale is not None:
        result *= scale
    if add is not None:
        result += add
    return out.copy_(result)


def _token_sums(y: torch.Tensor, d: torch.Tensor, carry: torch.Tensor, *, tokens: torch.Tensor) -> torch.Tensor:
    """``Σ_t y_t d_tᵀ`` per (row, head), in the carry's dtype: ``[rows, L, HV, K]`` and
    ``[rows, L, HV, V]`` to ``[rows, HV, K, V]``. Where :func:`_fused` allows, two 16-bit operands
    go straight to a GEMM on their strided views (exact products, fp32 sums); otherwise both
    are widened first."""
    sixteen = y.dtype == d.dtype and y.dtype in (torch.bfloat16, torch.float16)
    if _BMM_OUT_DTYPE and sixteen and _fused(tokens, carry):
        return torch.stack(
            [torch.bmm(y[r].permute(1, 2, 0), d[r].transpose(0, 1), out_dtype=carry.dtype) for r in range(y.shape[0])]
        )
    with _tf32_matmuls(tokens, carry):
        return torch.einsum("bthk,bthv->bhkv", y.to(carry.dtype), d.to(carry.dtype))


def _tf32_matmuls(tokens: torch.Tensor, carry: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where the exchange's per-token products may run on TF32 tensor cores: CUDA, 16-bit
    per-token tensors and an fp32 carry. Then ``y`` and ``dO`` are exact in TF32 (bf16 keeps 8
    significant bits, fp16 11, TF32 11), the carry (and ``dO ⊙ Q``) is rounded to 2⁻¹¹, below
    the 2⁻⁹ of the bf16 output they feed, and products accumulate in fp32. The IEEE fp32 GEMMs
    these shapes get otherwise ([L, K] × [K, V] per head) ran at ~15 TFLOP/s on an H200, ~4 ms
    per product on the critical path at L = 110K tokens. fp32/fp64 tokens stay exact. The
    setting is process-wide, so it is set only around these products and restored after."""
    return _matmul_precision("tf32") if _sixteen_bit_on_cuda(tokens, carry) else contextlib.nullcontext()


@contextlib.contextmanager
def _matmul_precision(precision: str):
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        name, value = "fp32_precision", precision
    else:
        name, value = "allow_tf32", precision == "tf32"
    previous = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def _collect_finals(plan: Plan, group, here: torch.Tensor) -> torch.Tensor:
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


def _spread_final_grads(plan: Plan, group, d_final: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
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
