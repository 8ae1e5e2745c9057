"""The public ops: ``chunk_<family>`` and ``fused_recurrent_<family>``.

Names, positional tensors and option names follow flash-linear-attention (fla-core 0.6.0), so
model code switches by changing an import. Options are keyword-only. Each front-end only
collects its arguments; :func:`_run` checks them (one place, :mod:`dplr.checks`), applies the
in-kernel options, writes the call in the canonical form of its transition
(:class:`dplr.engine.Problem`) and dispatches to a backend.

Common shapes: ``q, k [B, T, H, K]``; ``v [B, T, HV, V]`` (``HV`` a multiple of ``H``: grouped
value heads); ``initial_state`` and the final state ``[N, HV, K, V]`` (fp32; fp64 for fp64
inputs); ``cu_seqlens [N + 1]`` packs ``N`` sequences along ``T`` with ``B == 1``. Every op
returns ``Output(output [B, T, HV, V] in v's dtype, final_state or None)``.

Time-invariant gates and rank-one vectors may be stride-0 broadcasts (``w.expand(B, T, H, K)``
of a ``[H, K]`` parameter): they are checked and consumed as views, and their gradients flow
back through ``expand`` to the parameter's own shape.

``chunk_gla``, ``chunk_kda``, ``chunk_dplr_delta_rule`` and their ``fused_recurrent_*`` twins
take ``gv [B, T, HV, V]``, a log decay (``<= 0``) per value channel that scales the state's
columns after the key-side transition: ``S_t = (Diag(exp(g_t)) + b_t a_tᵀ) S_{t-1}
Diag(exp(gv_t)) + k_t v_tᵀ`` (docs/value-decay.md), on both backends.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable

import torch

from . import checks, library, settings
from .engine import Problem
from .preprocess import beta_activation, gdn_gate, kda_gate, l2norm
from .reference import Output
from .transition import FAMILIES, Decay, LowRank, Transition

CHUNK, RECURRENT = "chunk", "recurrent"
DEFAULT_CHUNK_SIZE = 64

# Argument names that differ from the canonical q, g of the engine.
_ALIASES = {"rwkv7": {"r": "q", "w": "g"}, "dplr_delta_rule": {"gk": "g"}}


def _run(name: str, mode: str, args: dict) -> Output:
    problem = prepare(name, mode, args)
    o, final = _dispatch(problem, mode, args.get("chunk_size", DEFAULT_CHUNK_SIZE))
    return Output(o.to(args["v"].dtype), final if args["output_final_state"] else None)


def prepare(name: str, mode: str, args: dict) -> Problem:
    """Check a front-end's arguments and write the call in its transition's canonical form."""
    family = FAMILIES[name]
    transition = family.transition
    user = {canon: alias for alias, canon in _ALIASES.get(name, {}).items()}  # canonical → user name
    gname, qname = user.get("g", "g"), user.get("q", "q")
    q, k, v = args[qname], args["k"], args["v"]
    g = args.get(gname)

    for flag in (
        "output_final_state",
        "use_qk_l2norm_in_kernel",
        "use_gate_in_kernel",
        "use_beta_sigmoid_in_kernel",
        "allow_neg_eigval",
        "safe_gate",
    ):
        if flag in args:
            checks.check_flag(flag, args[flag])
    checks.check_scale(args["scale"])
    if mode == CHUNK:
        checks.check_chunk_size(args["chunk_size"])

    B, T, H, HV, K, V = checks.check_core(q, k, v, names=(qname, "k", "v"))
    host_cu = checks.check_cu_seqlens(args["cu_seqlens"], args.get("cu_seqlens_cpu"), B=B, T=T, device=q.device)
    cu_seqlens = args["cu_seqlens"]
    if cu_seqlens is not None and host_cu is None:
        host_cu = cu_seqlens.tolist()  # the PyTorch path loops over sequences on the host
    N = B if cu_seqlens is None else len(host_cu) - 1
    dims = checks.Dims(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N)
    checks.check_initial_state(args["initial_state"], dims, q)

    in_kernel_gate = args.get("use_gate_in_kernel", False)
    lower_bound = args.get("lower_bound")
    if lower_bound is not None and (
        isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)) or not lower_bound < 0
    ):
        raise ValueError(f"lower_bound must be a negative number (a log decay bound), got {lower_bound!r}")

    # The decay.
    if name == "simple_gla":
        g_gamma = args["g_gamma"]
        if g is not None and g_gamma is not None:
            raise ValueError("simple_gla takes g or g_gamma, not both")
        if g_gamma is not None:
            checks.check_shaped("g_gamma", g_gamma, "HV", dims, q)
            checks.check_log_decay("g_gamma", g_gamma)
            g = g_gamma.expand(B, T, HV)  # time-invariant: a stride-0 view, never materialised
            gname = "g_gamma"
        if g is None:
            transition = Transition(Decay.NONE, LowRank.NONE)  # plain linear attention
    if transition.decay is not Decay.NONE:
        template = "B T HV K" if transition.decay is Decay.CHANNEL else "B T HV"
        checks.check_shaped(gname, g, template, dims, q)
        if in_kernel_gate:
            checks.check_finite(gname, g)
            g = _in_kernel_gate(name, g, args, dims, q)
        else:
            checks.check_log_decay(gname, g)
            if lower_bound is not None:
                checks.check_lower_bound(gname, g, lower_bound)
    elif in_kernel_gate:
        raise ValueError(f"use_gate_in_kernel needs a gate; {name} has none")

    # The value-side decay (a plain log decay: no in-kernel gate, no lower_bound).
    gv = args.get("gv")
    if gv is not None:
        checks.check_shaped("gv", gv, "B T HV V", dims, q)
        checks.check_log_decay("gv", gv)
        transition = dataclasses.replace(transition, value_decay=True)

    # The rank-one part.
    beta = a = b = None
    if transition.lowrank is LowRank.TIED:
        if args.get("allow_neg_eigval") and not args.get("use_beta_sigmoid_in_kernel"):
            raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True (beta = 2 sigmoid(beta))")
        checks.check_shaped("beta", args["beta"], "B T HV", dims, q)
        beta = beta_activation(
            args["beta"], sigmoid=args["use_beta_sigmoid_in_kernel"], allow_neg_eigval=args["allow_neg_eigval"]
        )
        if args["use_qk_l2norm_in_kernel"]:
            # Normalised in fp32, stored back in the inputs' dtype (as fla-core does): the Triton
            # kernels pick their build from q's dtype, and fp32 q/k from bf16 inputs ran the fp32
            # build (tf32x3 products, C = 32 in the backward): a 125M KDA training step took
            # 338 ms instead of 176 on an H200.
            q, k = l2norm(q).to(q.dtype), l2norm(k).to(k.dtype)
    elif transition.lowrank is LowRank.GENERAL:
        a, b = args["a"], args["b"]
        for arg_name, x in (("a", a), ("b", b)):
            checks.check_shaped(arg_name, x, "B T H K", dims, q)
            checks.same_dtype(arg_name, x, qname, q)

    scale = args["scale"]
    if scale is None:
        scale = 1.0 if family.default_scale_one else K**-0.5
    return Problem(
        transition=transition,
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        a=a,
        b=b,
        scale=float(scale),
        initial_state=args["initial_state"],
        cu_seqlens=host_cu,
        gv=gv,
    )


def _in_kernel_gate(name: str, f: torch.Tensor, args: dict, dims: checks.Dims, q: torch.Tensor) -> torch.Tensor:
    A_log, dt_bias, lower_bound = args["A_log"], args["dt_bias"], args.get("lower_bound")
    if name == "kda":
        if A_log is None and lower_bound is None:
            raise ValueError("use_gate_in_kernel=True needs A_log (or lower_bound for the bounded sigmoid gate)")
        if args.get("safe_gate") and lower_bound is None:
            raise ValueError("safe_gate=True with use_gate_in_kernel=True needs lower_bound")
        if A_log is not None:
            checks.check_shaped("A_log", A_log, "HV", dims, q)
        if dt_bias is not None and tuple(dt_bias.shape) != (dims.HV * dims.K,):
            checks.check_shaped("dt_bias", dt_bias, "HV K", dims, q)
        return kda_gate(f, A_log, dt_bias, lower_bound)
    if A_log is None:
        raise ValueError("use_gate_in_kernel=True needs A_log")
    checks.check_shaped("A_log", A_log, "HV", dims, q)
    if dt_bias is not None:
        checks.check_shaped("dt_bias", dt_bias, "HV", dims, q)
    return gdn_gate(f, A_log, dt_bias)


def _dispatch(problem: Problem, mode: str, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    kernel_chunk = library.RECURRENT_CHUNK if mode == RECURRENT else chunk_size
    backend = resolve_backend(lambda: _triton_suits(problem, kernel_chunk))
    return library.dispatch(problem, kernel_chunk, backend)


def resolve_backend(triton_suits: Callable[[], bool]) -> str:
    """``DPLR_BACKEND``, with ``auto`` made ``triton`` where ``triton_suits()`` (asked only then)
    and ``torch`` elsewhere; ``triton`` without Triton installed is an error."""
    backend = settings.backend()
    if backend == "auto":
        return "triton" if triton_suits() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("DPLR_BACKEND=triton, but triton does not import")
    return backend


def _triton_suits(problem: Problem, chunk_size: int) -> bool:
    """CUDA tensors in 16/32-bit floats, kernels for this problem that have passed their check on
    a GPU, and a Triton backward (for this structure) if a gradient will be asked for."""
    if not (problem.q.is_cuda and problem.q.dtype != torch.float64 and triton_available()):
        return False
    from . import triton as triton_path

    p = problem
    if p.transition.value_decay and not triton_path.value_decay_checked(chunk_size):
        return False
    return not library.needs_grad(p) or triton_path.has_backward(chunk_size, value_decay=p.transition.value_decay)


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed, probed once: ``find_spec`` searches the import path on
    every call (about 0.1 ms on a 2-core CPU), host time a decode step cannot spare."""
    return importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------
# The front-ends. Each passes its own arguments, by name, to _run.


def chunk_simple_gla(
    q,
    k,
    v,
    g=None,
    *,
    g_gamma=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
) -> Output:
    """Simple GLA / RetNet / Mamba-2-like: one log decay per head. ``g [B, T, HV]`` (log decay,
    ``<= 0``) or ``g_gamma [HV]`` (the same decay at every step); neither: plain linear attention."""
    return _run("simple_gla", CHUNK, locals())


def chunk_gla(
    q,
    k,
    v,
    g,
    *,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
) -> Output:
    """Gated linear attention (GLA, RWKV-6-like): ``g [B, T, HV, K]``, a log decay per key channel.
    ``gv [B, T, HV, V]`` (optional) adds a log decay per value channel, ``S ← Diag(exp(g)) S
    Diag(exp(gv)) + k vᵀ`` (GLA's general outer-product gate)."""
    return _run("gla", CHUNK, locals())


def chunk_delta_rule(
    q,
    k,
    v,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
) -> Output:
    """DeltaNet: ``S ← (I - beta k kᵀ) S + beta k vᵀ``, ``beta [B, T, HV]``."""
    return _run("delta_rule", CHUNK, locals())


def chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
) -> Output:
    """Gated DeltaNet: ``S ← (I - beta k kᵀ) exp(g) S + beta k vᵀ``, ``g, beta [B, T, HV]``.
    With ``use_gate_in_kernel`` ``g`` is raw: ``g = -exp(A_log) softplus(g + dt_bias)``, ``A_log, dt_bias [HV]``."""
    return _run("gated_delta_rule", CHUNK, locals())


def chunk_kda(
    q,
    k,
    v,
    g,
    beta,
    *,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    lower_bound=None,
    safe_gate=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
) -> Output:
    """Kimi Delta Attention: ``S ← (I - beta k kᵀ) Diag(exp(g)) S + beta k vᵀ``, ``g [B, T, HV, K]``,
    ``beta [B, T, HV]``. With ``use_gate_in_kernel`` ``g`` is raw and goes through
    :func:`dplr.preprocess.kda_gate` (``A_log [HV]``, ``dt_bias [HV*K]``, optional ``lower_bound``).
    Without it, ``lower_bound`` is a promise ``g >= lower_bound`` (checked on CPU). dplr is exact for
    any gate; ``safe_gate`` is accepted for compatibility and changes nothing numerically.
    ``gv [B, T, HV, V]`` (optional, a plain log decay) decays the value channels too:
    ``S ← (I - beta k kᵀ) Diag(exp(g)) S Diag(exp(gv)) + beta k vᵀ``."""
    return _run("kda", CHUNK, locals())


def chunk_dplr_delta_rule(
    q,
    k,
    v,
    a,
    b,
    gk,
    *,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    lower_bound=None,
    safe_gate=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
) -> Output:
    """General DPLR: ``S ← Diag(exp(gk)) S + b (aᵀ S) + k vᵀ``, ``a, b [B, T, H, K]``, ``gk [B, T, HV, K]``.
    ``lower_bound`` is a promise ``gk >= lower_bound`` (checked on CPU); any gate is exact.
    ``gv [B, T, HV, V]`` (optional) decays the value channels too: ``S ← (Diag(exp(gk)) + b aᵀ) S
    Diag(exp(gv)) + k vᵀ``. Time-invariant (S4-style) ``gk``,
    ``a``, ``b`` may be stride-0 views, e.g. ``a0.expand(B, T, H, K)``."""
    return _run("dplr_delta_rule", CHUNK, locals())


def chunk_rwkv7(
    r,
    w,
    k,
    v,
    a,
    b,
    *,
    scale=1.0,
    initial_state=None,
    output_final_state=False,
    lower_bound=None,
    safe_gate=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
) -> Output:
    """RWKV-7: :func:`chunk_dplr_delta_rule` with ``q = r`` and ``gk = w`` (the caller's ``a = -κ̂``,
    ``b = κ̂ ⊙ a_icl``), scale 1 by default."""
    return _run("rwkv7", CHUNK, locals())


def fused_recurrent_simple_gla(
    q,
    k,
    v,
    g=None,
    *,
    g_gamma=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
) -> Output:
    """:func:`chunk_simple_gla`, token by token."""
    return _run("simple_gla", RECURRENT, locals())


def fused_recurrent_gla(
    q,
    k,
    v,
    g,
    *,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
) -> Output:
    """:func:`chunk_gla`, token by token (``gv`` as there)."""
    return _run("gla", RECURRENT, locals())


def fused_recurrent_delta_rule(
    q,
    k,
    v,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
) -> Output:
    """:func:`chunk_delta_rule`, token by token."""
    return _run("delta_rule", RECURRENT, locals())


def fused_recurrent_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
) -> Output:
    """:func:`chunk_gated_delta_rule`, token by token."""
    return _run("gated_delta_rule", RECURRENT, locals())


def fused_recurrent_kda(
    q,
    k,
    v,
    g,
    beta,
    *,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    lower_bound=None,
    safe_gate=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
) -> Output:
    """:func:`chunk_kda`, token by token (``gv`` as there)."""
    return _run("kda", RECURRENT, locals())


def fused_recurrent_dplr_delta_rule(
    q,
    k,
    v,
    a,
    b,
    gk,
    *,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    lower_bound=None,
    safe_gate=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
) -> Output:
    """:func:`chunk_dplr_delta_rule`, token by token (``gv`` as there)."""
    return _run("dplr_delta_rule", RECURRENT, locals())


def fused_recurrent_rwkv7(
    r,
    w,
    k,
    v,
    a,
    b,
    *,
    scale=1.0,
    initial_state=None,
    output_final_state=True,
    lower_bound=None,
    safe_gate=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
) -> Output:
    """:func:`chunk_rwkv7`, token by token. As in fla-core, ``output_final_state`` defaults to
    True here; unlike fla-core (``K**-0.5``), ``scale`` defaults to 1.0 as in the chunk op."""
    return _run("rwkv7", RECURRENT, locals())
