"""Shared helpers: run an op and its fp64 reference, forward and backward, and compare."""

from __future__ import annotations

import torch

from dplr.testing import float_tensors, op, reference, rel_err

# Tolerances of DESIGN §6, relative norm against the fp64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}


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
        do = torch.randn(ro.shape, generator=gen, dtype=torch.float64)
        dfinal = torch.randn(rfinal.shape, generator=gen, dtype=torch.float64)
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
