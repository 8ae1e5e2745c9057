"""Shared helpers: run an op and its fp64 reference, forward and backward, and compare."""

from __future__ import annotations

import itertools

import torch

from dplr.testing import float_tensors, op, reference, rel_err

# Tolerances of DESIGN §6, relative norm against the fp64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}

# The ops that take a value-side decay ``gv``, and the name of each one's key-side gate.
VALUE_DECAY_GATE = {"gla": "g", "kda": "g", "dplr_delta_rule": "gk"}


def run_and_compare(name: str, mode: str, args: dict, tol: float, *, grads: bool = True) -> dict:
    """Run ``op(name, mode)(**args)`` and the fp64 reference; assert every output and gradient
    agrees within ``tol`` (relative norm) and is finite. Returns the errors."""
    args = dict(args, output_final_state=True)
    names = float_tensors(args) if grads else []
    for key in names:
        args[key] = args[key].detach().clone().requires_grad_(True)
    ref_args = {k: x.detach().double().requires_grad_(True) if k in names else x for k, x in args.items()}

    o, final = op(name, mode)(**args)
    ro, rfinal = reference(name, ref_args)
    assert o.dtype == args["v"].dtype
    assert o.shape == ro.shape and final.shape == rfinal.shape
    errors = {"o": rel_err(o.detach(), ro.detach()), "final_state": rel_err(final.detach(), rfinal.detach())}
    if names:
        gen = torch.Generator().manual_seed(1234)
        do = torch.randn(ro.shape, generator=gen, dtype=torch.float64).to(ro.device)
        dfinal = torch.randn(rfinal.shape, generator=gen, dtype=torch.float64).to(rfinal.device)
        ((o.double() * do).sum() + (final.double() * dfinal).sum()).backward()
        ((ro * do).sum() + (rfinal * dfinal).sum()).backward()
        for key in names:
            assert args[key].grad is not None, f"no gradient reached {key}"
            assert args[key].grad.dtype == args[key].dtype
            assert torch.isfinite(args[key].grad).all(), f"d{key} is not finite"
            errors[f"d{key}"] = rel_err(args[key].grad, ref_args[key].grad)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= tol}
    assert not bad, f"{name}/{mode}: errors above {tol:.0e}: {bad}"
    return errors


def token_tensors(args: dict, T: int) -> dict:
    """The arguments with a token axis of length ``T`` (``[B, T, ...]``), the initial state excluded."""
    return {
        k: x
        for k, x in args.items()
        if isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[1] == T and k != "initial_state"
    }


def assert_packed_equals_separate(name: str, mode: str, args: dict, bounds: list[int]) -> None:
    """A packed call (``args`` with ``cu_seqlens = bounds``) equals one call per sequence (fp64)."""
    packed_o, packed_final = op(name, mode)(**dict(args, output_final_state=True))
    tokens = token_tensors(args, bounds[-1])
    for n, (bos, eos) in enumerate(itertools.pairwise(bounds)):
        single = dict(args, cu_seqlens=None, initial_state=args["initial_state"][n : n + 1], output_final_state=True)
        single.update({k: x[:, bos:eos] for k, x in tokens.items()})
        o, final = op(name, mode)(**single)
        torch.testing.assert_close(o, packed_o[:, bos:eos], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final, packed_final[n : n + 1], rtol=1e-12, atol=1e-12)


def assert_chaining(name: str, mode: str, args: dict, split: int) -> None:
    """Two calls, the second from the first's final state, equal one over the whole (fp64)."""
    args = dict(args, output_final_state=True)
    whole_o, whole_final = op(name, mode)(**args)
    tokens = token_tensors(args, whole_o.shape[1])
    o1, mid = op(name, mode)(**dict(args, **{k: x[:, :split] for k, x in tokens.items()}))
    o2, final = op(name, mode)(**dict(args, initial_state=mid, **{k: x[:, split:] for k, x in tokens.items()}))
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), whole_o, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, whole_final, rtol=1e-10, atol=1e-12)
