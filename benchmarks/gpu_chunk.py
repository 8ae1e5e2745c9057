"""GPU benchmark of the chunk ops, in one run on one card (issues 4 and 5).

1. Correctness first: every family on the GPU against the fp64 reference (bf16 and fp32
   inputs; outputs, final states and, where dplr has a Triton backward, every gradient), and the
   Triton pytest file (tests/triton/test_chunk.py), whose output is saved beside the results.
2. Speed: forward (and forward+backward) medians of ``triton.testing.do_bench`` for dplr and
   fla-core 0.6.0 in the same process, on the issue's shapes, with peak memory, and the
   fraction of the roofline floor (dplr.accounting, with the card's measured rates).

Writes ``benchmarks/results/gpu_chunk_<card>.json`` and a PNG made from it; prints a short
table last. fla-core is optional (``pip install --no-deps --target /tmp/site fla_core-0.6.0``);
its autotuning choices are cached under ``TRITON_CACHE_DIR`` (``TRITON_CACHE_AUTOTUNING=1``, set
unless given), so a later run on the same kind of card skips the tuning.

    python benchmarks/gpu_chunk.py [--families kda,dplr_delta_rule] [--shapes 0,1] [--no-fla]
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
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dplr import FAMILIES, provenance  # noqa: E402
from dplr.testing import float_tensors, make_inputs, op, reference, rel_err  # noqa: E402

SHAPES = [(4, 8192, 16, 128), (1, 32768, 32, 128), (1, 65536, 16, 128), (16, 2048, 16, 128)]
TIMED = ["kda", "dplr_delta_rule", "gated_delta_rule", "delta_rule", "gla", "simple_gla"]
TOL = {torch.bfloat16: 5e-3, torch.float16: 5e-3, torch.float32: 1e-4}


def load_fla():
    # fla-core's kernels autotune on their first call at each shape (minutes, cold), in every
    # process. Cached on disk (under TRITON_CACHE_DIR; Triton's own switch), the choices made by an
    # earlier process or run are reused: the timing measures the same kernels, only sooner. Set
    # before fla-core is imported: its autotuners read the switch when they are made.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        import fla.ops as ops
        from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule
        from fla.ops.kda import chunk_kda
    except ImportError as err:
        print(f"fla-core not importable ({err}); timing dplr alone")
        return None
    return {
        "kda": chunk_kda,
        "dplr_delta_rule": chunk_dplr_delta_rule,
        "gated_delta_rule": ops.gated_delta_rule.chunk_gated_delta_rule,
        "delta_rule": ops.delta_rule.chunk_delta_rule,
        "gla": ops.gla.chunk_gla,
        "simple_gla": ops.simple_gla.chunk_simple_gla,
    }


def gpu_inputs(name: str, B: int, T: int, H: int, K: int, *, seed: int = 0) -> dict:
    """Full-size inputs made on the GPU (bf16), distributed as dplr.testing.make_inputs makes them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

    args = dict(q=randn(B, T, H, K).to(dt), k=randn(B, T, H, K), v=randn(B, T, H, K).to(dt))
    family = FAMILIES[name]
    lowrank, decay = family.transition.lowrank.value, family.transition.decay.value
    if lowrank == "tied":
        args["k"] = F.normalize(args["k"], dim=-1)
        args["beta"] = torch.sigmoid(randn(B, T, H)).to(dt)
    args["k"] = args["k"].to(dt)
    if lowrank == "general":
        kk = F.normalize(randn(B, T, H, K), dim=-1)
        args["a"], args["b"] = (-kk).to(dt), (kk * torch.sigmoid(randn(B, T, H, 1))).to(dt)
    if decay == "channel":
        g = (
            -(0.5**0.5) * torch.sigmoid(randn(B, T, H, K))
            if lowrank == "general"
            else F.logsigmoid(randn(B, T, H, K) + 2)
        )
        args["gk" if name == "dplr_delta_rule" else "g"] = g.to(dt)
    elif decay == "scalar":
        args["g"] = F.logsigmoid(randn(B, T, H) + 2).to(dt)
    return args


def fla_call(fn, name: str, args: dict):
    order = {
        "kda": ("q", "k", "v", "g", "beta"),
        "gated_delta_rule": ("q", "k", "v", "g", "beta"),
        "delta_rule": ("q", "k", "v", "beta"),
        "dplr_delta_rule": ("q", "k", "v", "a", "b", "gk"),
        "gla": ("q", "k", "v", "g"),
        "simple_gla": ("q", "k", "v", "g"),
    }[name]
    tensors = [args[key] for key in order]
    return lambda: fn(*tensors)


# ---------------------------------------------------------------------------------------------
# 1. correctness


def check_family(name: str, dtype: torch.dtype, *, cu_seqlens=None, grads: bool, K: int = 128, V: int = 128) -> dict:
    shape = dict(B=1, T=200, cu_seqlens=cu_seqlens) if cu_seqlens else dict(B=2, T=200)
    args = make_inputs(name, H=2, HV=4, K=K, V=V, dtype=dtype, device="cuda", output_final_state=True, **shape)
    names = float_tensors(args) if grads else []
    for key in names:
        args[key].requires_grad_(True)
    o, final = op(name, "chunk")(**args)
    ref_args = {k: x.detach().double().requires_grad_(k in names) if k in names else x for k, x in args.items()}
    ro, rfinal = reference(name, ref_args)
    errors = {"o": rel_err(o.detach(), ro.detach()), "final_state": rel_err(final.detach(), rfinal.detach())}
    if names:
        gen = torch.Generator(device="cuda").manual_seed(7)
        do = torch.randn(ro.shape, generator=gen, device="cuda", dtype=torch.float64)
        dfinal = torch.randn(rfinal.shape, generator=gen, device="cuda", dtype=torch.float64)
        loss = (o.double() * do).sum() + (final.double() * dfinal).sum()
        first = torch.autograd.grad(loss, [args[k] for k in names], retain_graph=True)
        second = torch.autograd.grad(loss, [args[k] for k in names])
        ((ro * do).sum() + (rfinal * dfinal).sum()).backward()
        errors.update({f"d{k}": rel_err(x, ref_args[k].grad) for k, x in zip(names, first, strict=True)})
        # two backward passes on the same inputs: bit-identical (the kernels use no atomics)
        deterministic = all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    worst = max(errors, key=errors.get)
    return dict(
        family=name,
        dtype=str(dtype).replace("torch.", ""),
        varlen=bool(cu_seqlens),
        K=K,
        V=V,
        errors=errors,
        worst=worst,
        error=errors[worst],
        deterministic=deterministic if names else None,
        passed=errors[worst] <= TOL[dtype] and (deterministic if names else True),
    )


# (dtype, cu_seqlens, K, V): bf16 packed and not, fp32, fp16, the largest head size, and value
# heads narrower than the state pass's blocks of 64 (its fp32-tile build).
CASES = (
    (torch.bfloat16, None, 128, 128),
    (torch.bfloat16, [0, 37, 37, 200], 128, 128),
    (torch.float32, None, 128, 128),
    (torch.float16, None, 128, 128),
    (torch.bfloat16, None, 256, 256),
    (torch.bfloat16, None, 64, 32),
    (torch.float32, None, 256, 256),  # the values kernel's ptxas -O1 build (configs.ChunkBackward.ptxas_values)
)


def check_cases(name: str, grads: bool) -> list[dict]:
    """Every case of one family (a worker's job when the check runs in several processes)."""
    rows = []
    for dtype, cu, K, V in CASES:
        try:
            rows.append(check_family(name, dtype, cu_seqlens=cu, grads=grads, K=K, V=V))
        except Exception as err:  # recorded, not hidden: the run goes on to the others
            failure = f"{type(err).__name__}: {err}"
            rows.append(dict(family=name, dtype=str(dtype), varlen=bool(cu), K=K, V=V, passed=False, error=math.inf,
                             failure=failure))  # fmt: skip
            traceback.print_exc()
    return rows


def warm(name: str, H: int, K: int, variant: str, backward: bool) -> None:
    """Compile one family's kernels for a shape class (T and B are not compile-time constants)."""
    with backward_variant(variant):
        args = gpu_inputs(name, 1, 256, H, K)
        for key in float_tensors(args) if backward else []:
            args[key].requires_grad_(True)
        o, _ = op(name, "chunk")(**args)
        if backward:
            o.sum().backward()
        torch.cuda.synchronize()


def in_processes(jobs: int, calls: list[tuple]) -> list:
    """``fn(*args)`` for every ``(fn, args)``, in ``jobs`` fresh processes (each compiles on its own
    core; they share TRITON_CACHE_DIR, so the timing process finds the kernels compiled)."""
    if jobs <= 1:
        return [fn(*args) for fn, args in calls]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *args) for fn, args in calls]
        return [future.result() for future in futures]


def correctness(families: list[str], grads: bool, jobs: int, also: list[tuple] = ()) -> list[dict]:
    """The checks of every family, and ``also`` (compilations for the timing) beside them."""
    found = in_processes(jobs, [(check_cases, (n, grads)) for n in families] + list(also))
    rows = [row for rows in found[: len(families)] for row in rows]
    for row in rows:
        print(
            f"  {row['family']:18s} {row['dtype']:9s} K={row['K']:<3d} V={row['V']:<3d} varlen={row['varlen']!s:5s}"
            f" worst {row.get('worst', '-')}"
            f" = {row['error']:.2e} deterministic={row.get('deterministic')} {'pass' if row['passed'] else 'FAIL'}",
            flush=True,
        )
    return rows


# Launch configurations of the backward kernels to time beside the default (tuning runs).
VARIANTS = {
    "default": {},
    "chunk32": dict(C=32),
    "values8": dict(warps_values=8),
    "values16x8": dict(BV_values=16, warps_values=8),
    "values16": dict(BV_values=16),
    "values32": dict(BV_values=32),
    "valuesS1": dict(stages_values=1),
    "valuesS2": dict(stages_values=2),
    "values4": dict(warps_values=4),
    "keys32": dict(BK_keys=32),
    "keys8": dict(warps_keys=8),
    "keys32x8": dict(BK_keys=32, warps_keys=8),
    "hold": dict(hold_values=True),
    "reload": dict(hold_values=False),
    "sides8": dict(warps_sides=8),
    "sidesBV64": dict(BV_sides=64),
    "values64x8": dict(BV_values=64, warps_values=8),
    "states32": dict(states_bf16=False),  # chunk states and their gradients in fp32
    "stash16": dict(stash_bf16=True),  # the values kernel's factors for the key sides in bf16
    "keep": {},  # the default launches, with DPLR_KEEP_INTERMEDIATES=1 (see ENV_VARIANTS)
}
# Variants that set environment variables rather than launch configurations.
ENV_VARIANTS = {"keep": {"DPLR_KEEP_INTERMEDIATES": "1"}}


@contextlib.contextmanager
def backward_variant(name: str):
    from dplr.triton import configs

    chosen = configs.chunk_backward
    if VARIANTS[name]:
        configs.chunk_backward = lambda **kw: dataclasses.replace(chosen(**kw), **VARIANTS[name])
    saved = {key: os.environ.get(key) for key in ENV_VARIANTS.get(name, {})}
    os.environ.update(ENV_VARIANTS.get(name, {}))
    try:
        yield
    finally:
        configs.chunk_backward = chosen
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------
# 2. speed


def timed_step(fn, *, backward: bool):
    """fn(), or fn() and the backward of its output against a fixed random gradient."""
    if not backward:
        return fn
    grad = torch.randn_like(fn()[0])

    def step():
        fn()[0].backward(grad)

    return step


def bench(fn, *, backward: bool) -> tuple[float, float]:
    """Median ms and peak memory (GiB above the inputs) of fn() or fn() + backward."""
    from triton.testing import do_bench

    step = timed_step(fn, backward=backward)
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    return ms, peak


def kernel_times(fn, *, backward: bool, repeats: int = 3) -> dict:
    """Device time per kernel name (ms per call) of fn() or fn() + backward, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    step = timed_step(fn, backward=backward)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if total and event.device_type.name == "CUDA":
            times[event.key[:60]] = total / repeats / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:10])


def speed(
    families: list[str], shapes: list[int], fla: dict | None, device_rates, backward: bool, rows: list, save,
    variants: list[str] = (), profile: bool = False,
) -> list:  # fmt: skip
    """Appends one row per (shape, family) to ``rows`` and saves after each (a cut-off run keeps them)."""
    from dplr.accounting import Shape, account, fused_floor, staged_floor

    for index in shapes:
        B, T, H, K = SHAPES[index]
        for name in families:
            args = gpu_inputs(name, B, T, H, K)
            grads = [k for k in float_tensors(args)] if backward else []
            for key in grads:
                args[key].requires_grad_(True)
            row = dict(family=name, shape=[B, T, H, K], pass_="fwd+bwd" if backward else "fwd")
            acc = account(FAMILIES[name].transition, Shape(B=B, T=T, H=H, K=K, V=K, C=64))
            direction = None if backward else "fwd"
            row["floor_fused_ms"] = fused_floor(acc, device_rates, direction).seconds * 1e3
            row["floor_staged_ms"] = staged_floor(acc, device_rates, direction) * 1e3
            for lib, fn in (("dplr", lambda a=args, n=name: op(n, "chunk")(**a)), ("fla", None)):
                if lib == "fla":
                    if fla is None or name not in fla:
                        continue
                    fn = fla_call(fla[name], name, args)
                try:
                    ms, peak = bench(fn, backward=backward)
                    row[f"{lib}_ms"], row[f"{lib}_peak_gib"] = ms, peak
                except Exception as err:
                    row[f"{lib}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    print(f"  {lib} {name} {SHAPES[index]}: {row[f'{lib}_error']}", flush=True)
                torch.cuda.empty_cache()
            if profile:
                try:
                    row["kernels_ms"] = kernel_times(lambda a=args, n=name: op(n, "chunk")(**a), backward=backward)
                    print("   ", {k: round(v, 3) for k, v in row["kernels_ms"].items()}, flush=True)
                except Exception as err:
                    print(f"  profile: {type(err).__name__}: {str(err)[:200]}", flush=True)
            for variant in variants if backward else ():
                try:
                    with backward_variant(variant):
                        ms, peak = bench(lambda a=args, n=name: op(n, "chunk")(**a), backward=True)
                    row.setdefault("variants_ms", {})[variant] = ms
                    row.setdefault("variants_peak_gib", {})[variant] = peak
                except Exception as err:
                    print(f"  variant {variant}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                torch.cuda.empty_cache()
            if row.get("variants_ms"):
                print("   ", {k: round(v, 3) for k, v in row["variants_ms"].items()}, flush=True)
            if "dplr_ms" in row and "fla_ms" in row:
                row["speedup"] = row["fla_ms"] / row["dplr_ms"]
            if "dplr_ms" in row:
                row["fraction_of_fused_floor"] = row["floor_fused_ms"] / row["dplr_ms"]
            rows.append(row)
            save()
            print(
                f"  {row['pass_']:7s} {name:18s} {SHAPES[index]!s:22s} dplr {row.get('dplr_ms', math.nan):8.3f} ms"
                f"  fla {row.get('fla_ms', math.nan):8.3f} ms  x{row.get('speedup', math.nan):5.2f}",
                flush=True,
            )
            del args
            torch.cuda.empty_cache()
    return rows


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    rows = [r for r in result["speed"] if "dplr_ms" in r]
    passes = sorted({r["pass_"] for r in rows})
    fig, axes = plt.subplots(1, len(passes), figsize=(7 * len(passes), 5), squeeze=False)
    for ax, kind in zip(axes[0], passes, strict=True):
        sel = [r for r in rows if r["pass_"] == kind]
        labels = [f"{r['family']}\n{tuple(r['shape'])}" for r in sel]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r["dplr_ms"] for r in sel], 0.4, label="dplr")
        ax.bar([i + 0.2 for i in x], [r.get("fla_ms", 0) for r in sel], 0.4, label="fla-core 0.6.0")
        ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{kind} on {result['card']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(TIMED))
    ap.add_argument("--shapes", default="0,1,2,3", help='the timed shapes ("" for the correctness pass alone)')
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--fla-families", default=None, help="time fla-core for these only (its autotuning is slow)")
    ap.add_argument("--no-pytest", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass (only after one has passed)")
    ap.add_argument("--backward", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--profile", action="store_true", help="per-kernel device times of dplr's calls")
    ap.add_argument("--jobs", type=int, default=1, help="check and compile in this many processes first")
    ap.add_argument("--variants", default="", help=f"backward launch variants to time too: {','.join(VARIANTS)}")
    ns = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU")
        return 2
    from dplr import triton as triton_path
    from dplr.accounting import measure_device

    card = torch.cuda.get_device_name()
    slug = card.replace("NVIDIA ", "").replace(" ", "_")
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # The Triton kernels themselves, forward and backward, checked or not (the check is below);
    # set before any worker process starts, so the workers inherit it.
    os.environ["DPLR_BACKEND"] = "triton"
    has_bwd = triton_path.has_backward(64, checked_on_gpu=False)
    backward = {"auto": has_bwd, "yes": True, "no": False}[ns.backward]
    result = dict(provenance.environment("cuda"), triton_backward=has_bwd)
    started = time.time()

    pytest = None
    if not ns.no_pytest:  # beside the checks below
        pytest = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "tests/triton/test_chunk.py"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    families = ns.families.split(",")
    shapes = [int(s) for s in ns.shapes.split(",") if s]
    variants = [v for v in ns.variants.split(",") if v]
    print("correctness against the fp64 reference:", flush=True)
    checked = [*families, "rwkv7"] if "dplr_delta_rule" in families else families
    compile_first = []
    if ns.jobs > 1:  # the timed shape classes, compiled beside the checks
        classes = sorted({(SHAPES[i][2], SHAPES[i][3]) for i in shapes})
        runs = [(n, H, K, v) for n in families for H, K in classes for v in ["default", *variants]]
        compile_first = [(warm, (*run, backward)) for run in runs]
    if ns.no_check:
        in_processes(ns.jobs, compile_first)
        result["correctness"] = []
    else:
        result["correctness"] = correctness(checked, has_bwd, ns.jobs, compile_first)
    print(f"({time.time() - started:.0f}s)", flush=True)
    if pytest is not None:
        log = pytest.communicate()[0]
        (out_dir / f"gpu_chunk_pytest_{slug}.txt").write_text(log[-20000:])
        result["pytest"] = log.strip().splitlines()[-1] if log.strip() else "no output"
        print("pytest tests/triton/test_chunk.py:", result["pytest"], f"({time.time() - started:.0f}s)", flush=True)

    failed = [r for r in result["correctness"] if not r["passed"]]
    verdict = f"correctness: {len(result['correctness']) - len(failed)}/{len(result['correctness'])} passed"
    path = out_dir / f"gpu_chunk_{slug if shapes else 'check_' + slug}.json"

    def save():
        result["seconds"] = time.time() - started
        path.write_text(json.dumps(result, indent=1))

    if not shapes:  # the correctness pass alone
        save()
        print(verdict)
        return 1 if failed else 0

    rates = measure_device("h200" if "H200" in card else "h100")
    result["device_rates"] = dict(matmul_tflops=rates.matmul / 1e12, bandwidth_tbs=rates.bandwidth / 1e12)
    print(
        f"measured: {rates.matmul / 1e12:.0f} TFLOP/s bf16 matmul, {rates.bandwidth / 1e12:.2f} TB/s copy", flush=True
    )
    fla = None if ns.no_fla else load_fla()
    if fla is not None and ns.fla_families is not None:
        fla = {name: fn for name, fn in fla.items() if name in ns.fla_families.split(",")}
    result["speed"] = []
    save()
    for index in shapes:  # shape by shape, so that a run cut short keeps whole shapes
        speed(families, [index], fla, rates, False, result["speed"], save, profile=ns.profile)
        if backward:
            speed(families, [index], fla, rates, True, result["speed"], save, variants, ns.profile)
    save()
    plot(result, path.with_suffix(".png"))

    print(f"\n{card}: dplr vs fla-core 0.6.0, bf16, median ms")
    print(f"{'pass':8s} {'family':18s} {'shape':22s} {'dplr':>8s} {'fla':>8s} {'ratio':>6s} {'floor%':>7s}")
    for r in result["speed"]:
        print(
            f"{r['pass_']:8s} {r['family']:18s} {tuple(r['shape'])!s:22s} {r.get('dplr_ms', math.nan):8.3f} "
            f"{r.get('fla_ms', math.nan):8.3f} {r.get('speedup', math.nan):6.2f} "
            f"{100 * r.get('fraction_of_fused_floor', math.nan):6.1f}%"
        )
    print(verdict)
    if result.get("pytest"):
        print("pytest:", result["pytest"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
