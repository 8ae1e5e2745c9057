"""GPU check and benchmark of the value-side decay ``gv`` in the Triton chunk kernels.

1. Correctness first: ``chunk_gla``, ``chunk_kda`` and ``chunk_dplr_delta_rule`` with ``gv`` on
   the GPU against the fp64 reference: output, final state and every gradient (``dgv``
   included), bf16 (within 5e-3 relative norm) and fp32 (1e-4), packed sequences, gates of -60
   per step; and tests/triton/test_value_decay.py on the card.
2. Speed: forward and forward+backward medians of ``triton.testing.do_bench`` for the same op
   with and without ``gv`` at (B, T, H, K = V) = (4, 8192, 16, 128) in bf16, and their ratio
   (the target: ``gv`` costs under 15%). ``--variants`` also times other value blocks of the
   state passes with ``gv``; ``--profile`` adds the device time of every kernel, with ``gv`` and
   without, to find where the difference goes.

Writes ``benchmarks/results/gpu_value_decay_<card>.json``; exits 1 if a check fails.
``--smoke`` runs the same code on CPU under TRITON_INTERPRET=1 (fp32, tiny shapes, wall-clock
times that mean nothing) and writes its JSON to a temporary directory unless ``--out`` is given.

    python benchmarks/gpu_value_decay.py [--families gla,kda] [--variants bv16,values16] [--smoke]
    CUDA_LAUNCH_BLOCKING=1 python benchmarks/gpu_value_decay.py --stages   # which launch faults
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv:  # before Triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu_chunk import bench, gpu_inputs, kernel_times  # noqa: E402
from dplr import provenance  # noqa: E402
from dplr.testing import float_tensors, make_inputs, op, reference, rel_err  # noqa: E402

FAMILIES = ["gla", "kda", "dplr_delta_rule"]
TOL = {torch.bfloat16: 5e-3, torch.float32: 1e-4}
SHAPE = (4, 8192, 16, 128)  # B, T, H, K = V
TARGET = 1.15  # with gv / without, at most
# (dtype, cu_seqlens, gate) of the checks; the smoke run keeps the fp32 ones (the interpreter
# mishandles bf16) on tiny shapes.
CASES = (
    (torch.bfloat16, None, "normal"),
    (torch.bfloat16, [0, 37, 37, 200], "normal"),
    (torch.float32, None, "normal"),
    (torch.float32, [0, 37, 37, 200], "strong"),
)
# Launch variants of the gv kernels, timed beside the default (``--variants``); with
# ``--check-only`` the checks run under the one variant given. Fields of the forward's
# configuration (dplr.triton.configs.ChunkForward) or of the backward's (ChunkBackward).
VARIANTS = {
    "bv16": dict(BV_state=16),
    "bv64": dict(BV_state=64),
    "values16": dict(BV_values=16),
    "values8": dict(warps_values=8),
    "values16x8": dict(BV_values=16, warps_values=8),
    "reload": dict(hold_values=False),
    "valuesS1": dict(stages_values=1),
    "stages2": dict(stages_state=2),
    "stages2S1": dict(stages_state=2, stages_values=1),
}


def check(name: str, dtype: torch.dtype, cu_seqlens: list[int] | None, gate: str, device: str, smoke: bool) -> dict:
    """Output, final state and every gradient against the fp64 reference; two backward passes
    bit-identical (the kernels use no atomics)."""
    if smoke:
        shape = dict(B=1, T=40, H=1, HV=2, K=16, V=16, cu_seqlens=cu_seqlens and [0, 9, 9, 40])
    else:
        shape = dict(B=1, T=200, H=2, HV=4, K=128, V=128, cu_seqlens=cu_seqlens)
        if cu_seqlens is None:
            shape.update(B=2)
    args = make_inputs(name, dtype=dtype, device=device, gate=gate, value_decay=True, output_final_state=True, **shape)
    names = float_tensors(args)
    for key in names:
        args[key].requires_grad_(True)
    o, final = op(name, "chunk")(**args)
    ref_args = {k: x.detach().double().requires_grad_(True) if k in names else x for k, x in args.items()}
    ro, rfinal = reference(name, ref_args)
    errors = {"o": rel_err(o.detach(), ro.detach()), "final_state": rel_err(final.detach(), rfinal.detach())}
    gen = torch.Generator(device=device).manual_seed(7)
    do = torch.randn(ro.shape, generator=gen, device=device, dtype=torch.float64)
    dfinal = torch.randn(rfinal.shape, generator=gen, device=device, dtype=torch.float64)
    loss = (o.double() * do).sum() + (final.double() * dfinal).sum()
    first = torch.autograd.grad(loss, [args[k] for k in names], retain_graph=True)
    second = torch.autograd.grad(loss, [args[k] for k in names])
    ((ro * do).sum() + (rfinal * dfinal).sum()).backward()
    errors.update({f"d{k}": rel_err(x, ref_args[k].grad) for k, x in zip(names, first, strict=True)})
    finite = all(bool(torch.isfinite(x).all()) for x in (o, final, *first))
    deterministic = all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    worst = max(errors, key=errors.get)
    return dict(
        family=name, dtype=str(dtype).replace("torch.", ""), varlen=bool(cu_seqlens), gate=gate, errors=errors,
        worst=worst, error=errors[worst], finite=finite, deterministic=deterministic,
        passed=errors[worst] <= TOL[dtype] and finite and deterministic,
    )  # fmt: skip


def correctness(families: list[str], device: str, smoke: bool) -> list[dict]:
    rows = []
    for name in families:
        for dtype, cu, gate in CASES:
            if smoke and dtype != torch.float32:
                continue
            try:
                row = check(name, dtype, cu, gate, device, smoke)
            except Exception as err:  # recorded, not hidden: the run goes on to the others
                traceback.print_exc()
                row = dict(family=name, dtype=str(dtype), varlen=bool(cu), gate=gate, passed=False, error=math.inf,
                           failure=f"{type(err).__name__}: {err}")  # fmt: skip
            rows.append(row)
            print(
                f"  {name:16s} {row['dtype']:9s} varlen={row['varlen']!s:5s} gate={gate:6s} worst "
                f"{row.get('worst', '-')} = {row['error']:.2e} {'pass' if row['passed'] else 'FAIL'}",
                flush=True,
            )
    return rows


def stages(families: list[str], device: str) -> list[dict]:
    """Each launch of the gv path on its own, synchronised after it, so that a launch that faults
    is named (run with CUDA_LAUNCH_BLOCKING=1, or under compute-sanitizer for the address)."""
    from dplr import api
    from dplr.testing import _with_defaults
    from dplr.triton import chunk, configs

    rows = []
    for name in families:
        for dtype in (torch.bfloat16, torch.float32):
            args = make_inputs(name, B=2, T=200, H=2, HV=4, K=128, V=128, dtype=dtype, device=device, value_decay=True)
            problem = api.prepare(name, api.CHUNK, _with_defaults(name, dict(args, output_final_state=True)))
            cfg = configs.chunk_forward(
                K=128, V=128, C=64, dtype=dtype, device=device, lowrank=problem.transition.lowrank.value,
                value_decay=True,
            )  # fmt: skip
            row, reached = dict(family=name, dtype=str(dtype).replace("torch.", "")), "prepare"
            try:
                prep = chunk.prepare(problem, 64, cfg)
                torch.cuda.synchronize()
                reached = "state pass"
                o, final = chunk.state_pass(problem, prep, 64, cfg)
                torch.cuda.synchronize()
                reached = "backward"
                chunk.backward(problem, torch.randn_like(o), torch.randn_like(final), 64)
                torch.cuda.synchronize()
                row["passed"] = True
            except Exception as err:
                row.update(passed=False, failed_in=reached, failure=f"{type(err).__name__}: {str(err)[:300]}")
                print(f"  {name} {row['dtype']}: {reached} failed: {row['failure']}", flush=True)
                rows.append(row)
                return rows  # a fault leaves the context unusable: the first is the one to read
            print(f"  {name} {row['dtype']}: prepare, state pass and backward ran", flush=True)
            rows.append(row)
    return rows


def timing_inputs(name: str, B: int, T: int, H: int, K: int, device: str) -> dict:
    """The timed op's inputs (as benchmarks/gpu_chunk.py draws them) and ``gv`` drawn like its gates."""
    if device == "cuda":
        args = gpu_inputs(name, B, T, H, K)
    else:
        args = make_inputs(name, B=B, T=T, H=H, K=K, V=K, device=device, initial_state=False)
    gen = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(B, T, H, K, generator=gen, device=device) + 2
    args["gv"] = F.logsigmoid(logits).to(args["v"].dtype)
    return args


@contextlib.contextmanager
def launch_variant(fields: dict):
    """The launch configurations with ``fields`` replaced where ``gv`` is present."""
    from dplr.triton import configs

    chosen = {"chunk_forward": configs.chunk_forward, "chunk_backward": configs.chunk_backward}
    kinds = {"chunk_forward": configs.ChunkForward, "chunk_backward": configs.ChunkBackward}

    def replacing(make, names):
        def replaced(**kw):
            cfg = make(**kw)
            mine = {k: v for k, v in fields.items() if k in names}
            return dataclasses.replace(cfg, **mine) if kw.get("value_decay") and mine else cfg

        return replaced

    for attr, make in chosen.items():
        setattr(configs, attr, replacing(make, {f.name for f in dataclasses.fields(kinds[attr])}))
    try:
        yield
    finally:
        for attr, make in chosen.items():
            setattr(configs, attr, make)


def timed(fn, *, backward: bool, device: str) -> float:
    """Median ms (do_bench on the GPU; one wall-clock call under the interpreter)."""
    if device == "cuda":
        return bench(fn, backward=backward)[0]
    started = time.perf_counter()
    o = fn()[0]
    if backward:
        o.sum().backward()
    return (time.perf_counter() - started) * 1e3


def speed(families: list[str], shape: tuple, variants: list[str], device: str, *, profile: bool = False) -> list[dict]:
    B, T, H, K = shape
    rows = []
    for name in families:
        args = timing_inputs(name, B, T, H, K, device)
        plain = {k: x for k, x in args.items() if k != "gv"}
        for backward in (False, True):
            for key in float_tensors(args) if backward else []:
                args[key].requires_grad_(True)
            row = dict(family=name, shape=list(shape), pass_="fwd+bwd" if backward else "fwd")
            try:
                row["plain_ms"] = timed(lambda a=plain, n=name: op(n, "chunk")(**a), backward=backward, device=device)
                row["gv_ms"] = timed(lambda a=args, n=name: op(n, "chunk")(**a), backward=backward, device=device)
                row["ratio"] = row["gv_ms"] / row["plain_ms"]
                if profile and device == "cuda":  # where the difference goes, kernel by kernel
                    for key, a in (("plain_kernels_ms", plain), ("gv_kernels_ms", args)):
                        row[key] = kernel_times(lambda a=a, n=name: op(n, "chunk")(**a), backward=backward)
                        print(f"    {key}:", {k: round(v, 3) for k, v in row[key].items()}, flush=True)
                for variant in variants:
                    with launch_variant(VARIANTS[variant]):
                        row.setdefault("variants_ms", {})[variant] = timed(
                            lambda a=args, n=name: op(n, "chunk")(**a), backward=backward, device=device
                        )
            except Exception as err:
                traceback.print_exc()
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(
                f"  {row['pass_']:7s} {name:16s} without gv {row.get('plain_ms', math.nan):8.3f} ms  with gv "
                f"{row.get('gv_ms', math.nan):8.3f} ms  x{row.get('ratio', math.nan):5.3f}"
                + (f"  variants {row['variants_ms']}" if row.get("variants_ms") else ""),
                flush=True,
            )
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, fp32, tiny shapes")
    ap.add_argument(
        "--variants", default="", help=f"launch variants to time (--check-only: one to check): {','.join(VARIANTS)}"
    )
    ap.add_argument("--no-pytest", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="correctness only (several can run side by side)")
    ap.add_argument("--speed-only", action="store_true", help="timing only, after a --check-only run passed")
    ap.add_argument("--stages", action="store_true", help="only run each launch alone, to name one that faults")
    ap.add_argument("--profile", action="store_true", help="per-kernel device times, with gv and without")
    ap.add_argument(
        "--out", default=None, help="results directory (default benchmarks/results; a temporary one for --smoke)"
    )
    ns = ap.parse_args()
    device = "cpu" if ns.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU (or with --smoke)")
        return 2
    # The Triton kernels themselves, forward and backward, whether or not auto would pick them.
    os.environ["DPLR_BACKEND"] = "triton"
    families = ns.families.split(",")
    variants = [v for v in ns.variants.split(",") if v]
    result = dict(provenance.environment(device), smoke=ns.smoke)
    card = result["card"] or "cpu_smoke"
    slug = card.replace("NVIDIA ", "").replace(" ", "_")
    out_dir = Path(ns.out or (tempfile.mkdtemp() if ns.smoke else ROOT / "benchmarks" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_value_decay_{slug}.json"
    started = time.time()

    if ns.stages:
        if ns.smoke:
            print("--stages runs on a GPU (the interpreter reports faults where they happen)")
            return 2
        print("each launch alone, synchronised:", flush=True)
        rows = stages(families, device)
        path.write_text(json.dumps(dict(result, stages=rows), indent=1))
        return 0 if all(r["passed"] for r in rows) else 1
    if ns.check_only and ns.speed_only:
        ap.error("--check-only and --speed-only exclude each other")
    if ns.check_only and len(variants) > 1:
        ap.error("--check-only takes at most one variant (the launches the checks run under)")
    checked = variants[0] if ns.check_only and variants else None
    result["correctness"], result["checked_variant"] = [], checked
    if not ns.speed_only:
        print(f"correctness against the fp64 reference{f' (variant {checked})' if checked else ''}:", flush=True)
        with launch_variant(VARIANTS[checked] if checked else {}):
            result["correctness"] = correctness(families, device, ns.smoke)
    if not ns.smoke and not ns.no_pytest and not ns.speed_only:
        test = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/triton/test_value_decay.py"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        lines = (test.stdout + test.stderr).strip().splitlines()
        result["pytest"] = dict(returncode=test.returncode, summary=lines[-1] if lines else "no output")
        print("pytest tests/triton/test_value_decay.py:", result["pytest"]["summary"], flush=True)
    print(f"({time.time() - started:.0f}s)", flush=True)

    if ns.check_only:
        failed = [r for r in result["correctness"] if not r["passed"]]
        path.write_text(json.dumps(result, indent=1))
        print(f"correctness: {len(result['correctness']) - len(failed)}/{len(result['correctness'])} passed; {path}")
        return 1 if failed or result.get("pytest", {}).get("returncode") else 0
    shape = (1, 64, 1, 16) if ns.smoke else SHAPE
    print(f"speed, (B, T, H, K = V) = {shape}, {'fp32 (interpreter)' if ns.smoke else 'bf16'}:", flush=True)
    result["speed"] = speed(families, shape, variants, device, profile=ns.profile)
    result["seconds"] = time.time() - started
    path.write_text(json.dumps(result, indent=1))

    print(f"\n{card}: the same op with gv against without, median ms (target: x{TARGET:.2f} at most)")
    for r in result["speed"]:
        mark = "" if "ratio" not in r else "ok" if r["ratio"] <= TARGET else "over target"
        print(
            f"{r['pass_']:8s} {r['family']:16s} {r.get('plain_ms', math.nan):8.3f} {r.get('gv_ms', math.nan):8.3f}"
            f"  x{r.get('ratio', math.nan):5.3f} {mark}"
        )
    failed = [r for r in result["correctness"] if not r["passed"]]
    print(f"correctness: {len(result['correctness']) - len(failed)}/{len(result['correctness'])} passed; {path}")
    return 1 if failed or result.get("pytest", {}).get("returncode") else 0


if __name__ == "__main__":
    sys.exit(main())
