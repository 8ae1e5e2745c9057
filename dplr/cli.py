"""``python -m dplr {check, info}``."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import __version__, accounting, settings, tasks
from .testing import MODES, float_tensors, make_inputs, op, reference, rel_err
from .transition import FAMILIES

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Relative-norm tolerance against the fp64 reference (DESIGN §6)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5 if device.type == "cpu" else 1e-3  # GPU matmuls may run in tf32 (~3e-4)
    return 5e-3


def check_one(name: str, mode: str, *, device, dtype, shape: dict, seed: int) -> dict:
    """Forward and backward of one op against the fp64 reference; the worst relative error."""
    args = make_inputs(name, dtype=dtype, device=device, seed=seed, output_final_state=True, **shape)
    grads = float_tensors(args)
    for key in grads:
        args[key].requires_grad_(True)
    ref_args = {k: x.detach().double().requires_grad_(True) if k in grads else x for k, x in args.items()}

    start = time.perf_counter()
    o, final = op(name, mode)(**args)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(device)
    ((o.double() * do).sum() + (final.double() * dfinal).sum()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    ro, rfinal = reference(name, ref_args)
    ((ro * do).sum() + (rfinal * dfinal).sum()).backward()
    errors = {"o": rel_err(o.detach(), ro.detach()), "final_state": rel_err(final.detach(), rfinal.detach())}
    errors.update({f"d{k}": rel_err(args[k].grad, ref_args[k].grad) for k in grads})
    worst = max(errors, key=errors.get)
    return dict(family=name, path=mode, worst=worst, error=errors[worst], seconds=elapsed)


def cmd_check(ns) -> int:
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[ns.dtype]
    tol = tolerance(dtype, device)
    shape = dict(B=ns.batch, T=ns.seq_len, H=ns.heads, HV=ns.heads * ns.gva, K=ns.head_dim, V=ns.head_dim)
    families = ns.family or list(FAMILIES)
    print(f"dplr {__version__} check on {device} ({_device_name(device)}), {ns.dtype}, backend={settings.backend()}")
    print(
        f"shape B={shape['B']} T={shape['T']} H={shape['H']} HV={shape['HV']} K=V={shape['K']}, "
        f"initial state, forward + backward; tolerance {tol:.0e} relative norm\n"
    )
    print(f"{'family':18s} {'path':10s} {'worst':>16s} {'rel. error':>11s} {'time':>9s}  verdict")
    failed = 0
    for name in families:
        for mode in MODES:
            row = check_one(name, mode, device=device, dtype=dtype, shape=shape, seed=ns.seed)
            ok = row["error"] <= tol
            failed += not ok
            print(
                f"{name:18s} {mode:10s} {row['worst']:>16s} {row['error']:11.2e} "
                f"{row['seconds'] * 1e3:7.1f}ms  {'pass' if ok else 'FAIL'}"
            )
    total = len(families) * len(MODES)
    print(f"\n{total - failed}/{total} passed" + ("" if not failed else f", {failed} FAILED"))
    return 1 if failed else 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cmd_info(ns) -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"dplr {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}")
    print(
        f"cuda available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
    )
    print(
        f"DPLR_BACKEND={settings.backend()} DPLR_CHECK={int(settings.check_values())} "
        f"DPLR_DETERMINISTIC={int(settings.deterministic())}"
    )
    print("families: " + ", ".join(f"{n} ({f.transition})" for n, f in FAMILIES.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dplr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="every family against the fp64 reference, forward and backward")
    check.add_argument("--family", action="append", choices=list(FAMILIES), help="repeatable; default all")
    check.add_argument("--device", help="default: cuda when available, else cpu")
    check.add_argument("--dtype", choices=list(DTYPES), default="float32")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--seq-len", type=int, default=200)
    check.add_argument("--heads", type=int, default=2)
    check.add_argument("--gva", type=int, default=2, help="value heads per key head")
    check.add_argument("--head-dim", type=int, default=64)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_check)

    info = sub.add_parser("info", help="versions, devices and settings")
    info.set_defaults(func=cmd_info)

    # Subcommands that live with their code register here, one line each: module.add_subcommand(sub)
    accounting.add_subcommand(sub)
    accounting.bench.add_subcommand(sub)
    tasks.mqar.add_subcommand(sub)

    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
