"""Inputs and the fp64 reference for every family: shared by the tests, ``python -m dplr check``
and the benchmarks, so that all of them state correctness the same way."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from . import api
from .reference import Output, recurrence
from .transition import FAMILIES, Decay, LowRank, to_general

MODES = (api.CHUNK, api.RECURRENT)


def op(name: str, mode: str):
    """The public function for a family and a mode (``"chunk"`` or ``"recurrent"``)."""
    return getattr(api, f"{'chunk' if mode == api.CHUNK else 'fused_recurrent'}_{name}")


def tensor_names(name: str) -> list[str]:
    """The positional tensor arguments of a family, in order (``q, k, v, g, beta`` for KDA)."""
    params = inspect.signature(op(name, api.CHUNK)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def make_inputs(
    name: str,
    *,
    B: int = 2,
    T: int = 100,
    H: int = 2,
    HV: int | None = None,
    K: int = 32,
    V: int = 32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gate: str = "normal",
    cu_seqlens: list[int] | None = None,
    initial_state: bool = True,
    value_decay: bool = False,
    seed: int = 0,
    **options,
) -> dict:
    """Random keyword arguments for ``op(name, mode)``, typical of trained models.

    ``gate``: ``"normal"`` (log decays of a trained model), ``"strong"`` (-60 per step and
    around it, the numerics stress test) or ``"weak"`` (close to 0). Delta-rule keys are
    l2-normalised (the transition is a contraction only then); ``a, b`` follow RWKV-7
    (``a = -κ̂``, ``b = κ̂ ⊙ σ``). With ``cu_seqlens``, ``B`` must be 1 and ``T`` its end.
    ``value_decay`` adds ``gv [B, T, HV, V]`` drawn like the gate (after everything else, so the
    other tensors are those of the same call without it).
    """
    family = FAMILIES[name]
    HV = HV or H
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def log_decay(*shape):
        if gate == "strong":
            return -60.0 + 30.0 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        if gate == "weak":
            return -0.05 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        if name in ("rwkv7", "dplr_delta_rule"):
            return -(0.5**0.5) * torch.sigmoid(randn(*shape))  # RWKV-7's w in (-0.61, 0)
        return F.logsigmoid(randn(*shape) + 2.0)  # mostly slow, some fast channels

    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    args: dict = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, V))
    lowrank, decay = family.transition.lowrank, family.transition.decay
    if lowrank is LowRank.TIED and not options.get("use_qk_l2norm_in_kernel"):
        args["k"] = F.normalize(args["k"], dim=-1)
    if decay is Decay.CHANNEL:
        args["g"] = log_decay(B, T, HV, K)
    elif decay is Decay.SCALAR:
        args["g"] = log_decay(B, T, HV)
    if lowrank is LowRank.TIED:
        logits = randn(B, T, HV)
        args["beta"] = logits if options.get("use_beta_sigmoid_in_kernel") else torch.sigmoid(logits)
    elif lowrank is LowRank.GENERAL:
        kk = F.normalize(randn(B, T, H, K), dim=-1)
        args["a"], args["b"] = -kk, kk * torch.sigmoid(randn(B, T, H, 1))
    if options.get("use_gate_in_kernel"):
        args["g"] = randn(*args["g"].shape)
        args["A_log"] = torch.log(torch.rand(HV, generator=gen, dtype=torch.float64) * 4 + 1)
        args["dt_bias"] = 0.5 * randn(HV * K if decay is Decay.CHANNEL else HV)
    if initial_state:
        args["initial_state"] = 0.5 * randn(N, HV, K, V)
    if value_decay:
        args["gv"] = log_decay(B, T, HV, V)
    if name == "rwkv7":
        args["r"], args["w"] = args.pop("q"), args.pop("g")
    elif name == "dplr_delta_rule":
        args["gk"] = args.pop("g")

    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for key, x in args.items():
        small = key in ("A_log", "dt_bias", "initial_state")  # parameters and the state stay fp32
        args[key] = x.to(device=device, dtype=state_dtype if small else dtype)
    if cu_seqlens is not None:
        args["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int64, device=device)
    args.update(options)
    return args


def float_tensors(args: dict) -> list[str]:
    """The names of the differentiable arguments."""
    return [k for k, x in args.items() if isinstance(x, torch.Tensor) and x.is_floating_point()]


def reference(name: str, args: dict) -> Output:
    """The fp64 token-loop recurrence for a family's arguments (options applied in fp64).

    Differentiable: pass fp64 leaf tensors to get reference gradients.
    """
    wide = {k: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for k, x in args.items()}
    wide.setdefault("output_final_state", True)
    full = _with_defaults(name, wide)
    p = api.prepare(name, api.CHUNK, full)
    gen = to_general(p.transition, k=p.k, v=p.v, g=p.g, beta=p.beta, a=p.a, b=p.b, gv=p.gv)
    cu = None if p.cu_seqlens is None else torch.tensor(p.cu_seqlens)
    return recurrence(
        p.q,
        gen["k"],
        gen["v"],
        gen["g"],
        gen["a"],
        gen["b"],
        gv=gen["gv"],
        scale=p.scale,
        initial_state=p.initial_state,
        cu_seqlens=cu,
    )


def _with_defaults(name: str, args: dict) -> dict:
    """The front-end's full argument dict, as ``locals()`` would hold it inside ``chunk_<name>``."""
    sig = inspect.signature(op(name, api.CHUNK))
    bound = sig.bind_partial(**{k: v for k, v in args.items() if k in sig.parameters})
    bound.apply_defaults()
    return dict(bound.arguments)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x - ref‖ / ‖ref‖`` in fp64 (0 for two empty tensors; inf for NaN)."""
    x, ref = x.double(), ref.double().to(x.device)
    if ref.numel() == 0:
        return 0.0
    err = float((x - ref).norm() / ref.norm().clamp_min(1e-300))
    return err if err == err else float("inf")
