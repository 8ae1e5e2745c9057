"""The serving decode step: a few new tokens per sequence against a pool of recurrent states.

A serving engine keeps one state per live sequence in a pool ``[P, HV, K, V]`` (fp32) and, at
every step, hands over the new token(s) of ``N`` sequences and the pool slot of each. The
``decode_<family>`` functions run those tokens from the slot's state and write the new state
back into the same slot, in place; nothing else in the pool is touched.

* ``state_indices [N]``: the pool slot of each sequence; ``-1`` marks a padding row (its
  slot is neither read nor written, its outputs are zeros). Slots outside ``[-1, P)`` and a
  slot used twice are errors, checked on CPU tensors always and on GPU tensors with
  ``DPLR_CHECK=1``; unchecked, the kernel still never reads or writes outside the pool (an
  out-of-range slot is treated as padding).
* ``q, k [N, T, H, K]``, ``v [N, T, HV, V]`` and the family's gates as in the ``fused_recurrent_*``
  op: ``T`` new tokens per sequence (1 for plain decoding, more to verify draft tokens).
  ``decode_gla``, ``decode_kda`` and ``decode_dplr_delta_rule`` take the value-side decay
  ``gv [N, T, HV, V]`` as their ops do (docs/value-decay.md).
* ``return_intermediate_states=True`` also returns the state after each new token,
  ``[N, T, HV, K, V]``, so an engine can roll a sequence back to its last accepted draft token
  (see :func:`accept_tokens`).
* ``state_v_first=True``: the pool (and the intermediate states) hold each state transposed,
  ``[P, HV, V, K]``, as some engines store it.

The step is inference only (no gradients). On CUDA it is one Triton launch
(:func:`dplr.triton.recurrent.decode`); elsewhere the PyTorch token step of
:mod:`dplr.torch_recurrent`. Under ``torch.compile`` it is a ``torch.library`` op that mutates
the pool (one node in the graph); eager calls run the step directly, and a CUDA graph captures
the one launch either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import api, checks
from .engine import Problem
from .torch_recurrent import step
from .transition import Decay, LowRank, Transition, expand_heads

__all__ = [
    "DecodeOutput",
    "accept_tokens",
    "decode_delta_rule",
    "decode_dplr_delta_rule",
    "decode_gated_delta_rule",
    "decode_gla",
    "decode_kda",
    "decode_rwkv7",
    "decode_simple_gla",
]


class DecodeOutput(NamedTuple):
    output: torch.Tensor  # [N, T, HV, V] in v's dtype
    intermediate_states: torch.Tensor | None  # [N, T, HV, K, V] (or [.., V, K]) in the pool's dtype


def _run(name: str, args: dict) -> DecodeOutput:
    pool, indices = args.pop("state_pool"), args.pop("state_indices")
    state_v_first, intermediate = args.pop("state_v_first"), args.pop("return_intermediate_states")
    checks.check_flag("state_v_first", state_v_first)
    checks.check_flag("return_intermediate_states", intermediate)
    call = dict(args, initial_state=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None)
    problem = api.prepare(name, api.RECURRENT, call)
    _check_pool(pool, indices, problem, state_v_first=state_v_first)
    p, backend = problem, _backend(problem.q, value_decay=problem.transition.value_decay)
    with torch.no_grad():
        if torch.compiler.is_compiling():  # one node for the compiler: the op
            o, states = decode_op(
                p.q, p.k, p.v, p.g, p.beta, p.a, p.b, p.gv, pool, indices, p.scale,
                p.transition.decay.value, p.transition.lowrank.value, state_v_first, intermediate, backend,
            )  # fmt: skip
        else:
            # Eager: the step itself. The op's dispatch (defaults, redispatch, the autograd key)
            # cost about 0.05 ms of host time per call on a 2-core CPU, where a serving step's
            # whole kernel takes a few microseconds; CUDA graphs capture the kernel either way.
            o, states = _decode(
                p, pool, indices, state_v_first=state_v_first, intermediate=intermediate, backend=backend
            )
    return DecodeOutput(o, states if intermediate else None)


def _backend(x: torch.Tensor, *, value_decay: bool) -> str:
    def triton_suits() -> bool:  # CUDA; gv runs on the kernel once it passed a GPU check
        if not (x.is_cuda and api.triton_available()):
            return False
        if not value_decay:
            return True
        from . import triton as triton_path

        return triton_path.value_decay_checked(triton_path.RECURRENT_CHUNK)

    return api.resolve_backend(triton_suits)


def _check_pool(pool, indices, problem: Problem, *, state_v_first: bool) -> None:
    """``state_pool [P, HV, K, V]`` (``[P, HV, V, K]`` when ``state_v_first``) on q's device;
    ``state_indices [N]`` integers in ``[-1, P)``, each slot at most once (checked when the
    values are at hand: CPU tensors, or ``DPLR_CHECK=1``)."""
    q = problem.q
    N, HV, K, V = q.shape[0], problem.v.shape[2], q.shape[3], problem.v.shape[3]
    checks.require_tensor("state_pool", pool, dtypes=checks.STATE_DTYPES)
    inner = (HV, V, K) if state_v_first else (HV, K, V)
    if pool.dim() != 4 or tuple(pool.shape[1:]) != inner:
        layout = "[P, HV, V, K]" if state_v_first else "[P, HV, K, V]"
        raise ValueError(
            f"state_pool must have shape {layout} = (P, {', '.join(map(str, inner))}), got {tuple(pool.shape)}"
        )
    checks.same_device("state_pool", pool, "q", q)
    checks.require_tensor("state_indices", indices, dtypes=(torch.int32, torch.int64))
    if tuple(indices.shape) != (N,):
        raise ValueError(
            f"state_indices must have shape [N] = ({N},) (one pool slot per sequence), got {tuple(indices.shape)}"
        )
    checks.same_device("state_indices", indices, "q", q)
    if not checks.values_checkable(indices) or N == 0:
        return
    P = pool.shape[0]
    outside = (indices < -1) | (indices >= P)
    if bool(outside.any()):
        raise ValueError(
            f"state_indices must be pool slots in [0, {P}) or -1 for padding, got {int(indices[outside][0])} "
            f"at position {int(outside.nonzero()[0, 0])}"
        )
    used = indices[indices >= 0]
    if used.unique().numel() != used.numel():
        raise ValueError("state_indices must not name a pool slot twice (two sequences would write one state)")


@torch.library.custom_op("dplr::decode", mutates_args=("state_pool",))
def decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    gv: torch.Tensor | None,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float,
    decay: str,
    lowrank: str,
    state_v_first: bool,
    intermediate: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode step on canonical tensors; returns ``(o, intermediate states or an empty tensor)``."""
    problem = Problem(
        transition=Transition(Decay(decay), LowRank(lowrank), value_decay=gv is not None), q=q, k=k, v=v, g=g,
        beta=beta, a=a, b=b, scale=scale, initial_state=None, cu_seqlens=None, gv=gv,
    )  # fmt: skip
    o, states = _decode(
        problem, state_pool, state_indices, state_v_first=state_v_first, intermediate=intermediate, backend=backend
    )
    return o, states if states is not None else state_pool.new_empty(0)


def _decode(
    problem: Problem,
    pool: torch.Tensor,
    indices: torch.Tensor,
    *,
    state_v_first: bool,
    intermediate: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step on the backend's kernel: ``(o, intermediate states or None)``."""
    if backend == "triton":
        from .triton import recurrent

        return recurrent.decode(problem, pool, indices, state_v_first=state_v_first, intermediate=intermediate)
    return _torch_decode(problem, pool, indices, state_v_first=state_v_first, intermediate=intermediate)


@decode_op.register_fake
def _(q, k, v, g, beta, a, b, gv, state_pool, state_indices, scale, decay, lowrank, state_v_first, intermediate,
      backend):  # fmt: skip
    N, T = q.shape[:2]
    o = v.new_empty(v.shape)
    states = state_pool.new_empty(N, T, *state_pool.shape[1:]) if intermediate else state_pool.new_empty(0)
    return o, states


def _torch_decode(
    problem: Problem, pool: torch.Tensor, indices: torch.Tensor, *, state_v_first: bool, intermediate: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch decode step: the rows with a slot in ``[0, P)`` run :func:`step` token by token."""
    p = problem
    N, T = p.q.shape[:2]
    HV = p.v.shape[2]
    # fp64 pools or inputs (the tests' exact mode) are computed in fp64, everything else in fp32.
    dtype = torch.float64 if torch.float64 in (pool.dtype, p.compute_dtype) else torch.float32
    rows = ((indices >= 0) & (indices < pool.shape[0])).nonzero().squeeze(1)
    slots = indices[rows].long()

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else expand_heads(x[rows].to(dtype), HV)

    q, k, v, g, beta, a, b, gv = (pick(x) for x in (p.q, p.k, p.v, p.g, p.beta, p.a, p.b, p.gv))
    state = pool[slots].to(dtype)
    if state_v_first:
        state = state.transpose(-1, -2)
    o = p.v.new_zeros(p.v.shape)
    states = pool.new_zeros(N, T, *pool.shape[1:]) if intermediate else None
    for t in range(T):
        o_t, state = step(
            p.transition,
            state,
            q=q[:, t],
            k=k[:, t],
            v=v[:, t],
            g=None if g is None else g[:, t],
            beta=None if beta is None else beta[:, t],
            a=None if a is None else a[:, t],
            b=None if b is None else b[:, t],
            scale=p.scale,
            gv=None if gv is None else gv[:, t],
        )
        o[rows, t] = o_t.to(o.dtype)
        if states is not None:
            states[rows, t] = (state.transpose(-1, -2) if state_v_first else state).to(pool.dtype)
    final = state.transpose(-1, -2) if state_v_first else state
    pool.index_copy_(0, slots, final.to(pool.dtype))
    return o, states


def accept_tokens(
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    intermediate_states: torch.Tensor,
    num_accepted: torch.Tensor,
) -> None:
    """Roll each sequence's pool state back to its last accepted token after a verify step.

    ``intermediate_states [N, T, HV, ·, ·]`` from a decode call with
    ``return_intermediate_states=True``; ``num_accepted [N]`` in ``[1, T]``: sequence ``n``
    keeps the state after its ``num_accepted[n]``-th new token. Padding rows (slot ``-1``)
    are skipped. In place on ``state_pool``; reads the row mask on the host (one sync).
    """
    checks.require_tensor("num_accepted", num_accepted, dtypes=(torch.int32, torch.int64))
    N, T = intermediate_states.shape[:2]
    if tuple(num_accepted.shape) != (N,):
        raise ValueError(f"num_accepted must have shape [N] = ({N},), got {tuple(num_accepted.shape)}")
    if tuple(state_indices.shape) != (N,):
        raise ValueError(f"state_indices must have shape [N] = ({N},), got {tuple(state_indices.shape)}")
    if checks.values_checkable(num_accepted) and N and bool(((num_accepted < 1) | (num_accepted > T)).any()):
        raise ValueError(f"num_accepted must lie in [1, T={T}] (the first new token is always kept)")
    rows = (state_indices >= 0).nonzero().squeeze(1)
    kept = intermediate_states[rows, num_accepted[rows].long() - 1]
    state_pool.index_copy_(0, state_indices[rows].long(), kept.to(state_pool.dtype))


def decode_simple_gla(
    q,
    k,
    v,
    g,
    state_pool,
    state_indices,
    *,
    g_gamma=None,
    scale=None,
    state_v_first=False,
    return_intermediate_states=False,
) -> DecodeOutput:
    """:func:`dplr.fused_recurrent_simple_gla` from pool states: ``g [N, T, HV]`` or ``None``
    (with ``g_gamma [HV]``, or no decay at all)."""
    return _run("simple_gla", locals())


def decode_gla(
    q,
    k,
    v,
    g,
    state_pool,
    state_indices,
    *,
    gv=None,
    scale=None,
    state_v_first=False,
    return_intermediate_states=False,
) -> DecodeOutput:
    """:func:`dplr.fused_recurrent_gla` from pool states: ``g [N, T, HV, K]``, optional
    ``gv [N, T, HV, V]``."""
    return _run("gla", locals())


def decode_delta_rule(
    q,
    k,
    v,
    beta,
    state_pool,
    state_indices,
    *,
    scale=None,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    state_v_first=False,
    return_intermediate_states=False,
) -> DecodeOutput:
    """:func:`dplr.fused_recurrent_delta_rule` from pool states: ``beta [N, T, HV]``."""
    return _run("delta_rule", locals())


def decode_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    state_pool,
    state_indices,
    *,
    scale=None,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    state_v_first=False,
    return_intermediate_states=False,
) -> DecodeOutput:
    """:func:`dplr.fused_recurrent_gated_delta_rule` from pool states: ``g, beta [N, T, HV]``."""
    return _run("gated_delta_rule", locals())


def decode_kda(
    q,
    k,
    v,
    g,
    beta,
    state_pool,
    state_indices,
    *,
    gv=None,
    scale=None,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    lower_bound=None,
    safe_gate=False,
    state_v_first=False,
    return_intermediate_states=False,
) -> DecodeOutput:
    """:func:`dplr.fused_recurrent_kda` from pool states: ``g [N, T, HV, K]``, ``beta [N, T, HV]``,
    optional ``gv [N, T, HV, V]``."""
    return _run("kda", locals())


def decode_dplr_delta_rule(
    q,
    k,
    v,
    a,
    b,
    gk,
    state_pool,
    state_indices,
    *,
    gv=None,
    scale=None,
    lower_bound=None,
    safe_gate=False,
    state_v_first=False,
    return_intermediate_states=False,
) -> DecodeOutput:
    """:func:`dplr.fused_recurrent_dplr_delta_rule` from pool states: ``a, b [N, T, H, K]``,
    ``gk [N, T, HV, K]``, optional ``gv [N, T, HV, V]``."""
    return _run("dplr_delta_rule", locals())


def decode_rwkv7(
    r,
    w,
    k,
    v,
    a,
    b,
    state_pool,
    state_indices,
    *,
    scale=1.0,
    lower_bound=None,
    safe_gate=False,
    state_v_first=False,
    return_intermediate_states=False,
) -> DecodeOutput:
    """:func:`dplr.fused_recurrent_rwkv7` from pool states (``scale`` 1 by default)."""
    return _run("rwkv7", locals())
