"""Recurrent kernels and the serving decode step on one GPU: verify, then time.

    python benchmarks/gpu_recurrent.py                 # on a GPU: the full run (a few minutes)
    python benchmarks/gpu_recurrent.py --tiny          # anywhere (CPU: the Triton interpreter)

1. Correctness (before any timing): every family's ``fused_recurrent`` forward and backward on
   the Triton kernels against the fp64 reference (tolerance: at most 2x the PyTorch path's
   error in the same precision, plus a rounding band), the chunk ops of KDA and GDN, and the
   decode step of every family in both state layouts (outputs, intermediate and written
   states; padding and untouched slots bit-identical); the same for the families that take the
   value-side decay ``gv`` with it (``fused_recurrent`` also with gates of -30..-60 per step).
   A family that fails is not timed.
2. (a) Chunk vs recurrent, forward + backward, T in {512, 2048, 8192, 32768}, B=4, H=16,
   K=V=128, bf16 inputs, for KDA and GDN: the chunk algorithm's speed-up over the recurrence.
3. (b) The decode step at P=1024 pool slots, N in {1, 64, 256} sequences, H=32, K=V=128, fp32
   state: latency and effective bandwidth (state bytes read + written / time) against the
   card's device-copy bandwidth, with fla-core's ``fused_recurrent_kda`` /
   ``fused_recurrent_gated_delta_rule`` on the same inputs in the same process (when fla
   imports).
4. A sweep of the tiles (dplr.triton.recurrent.TILES) of the decode step and of the recurrent
   forward + backward, to check or retune the defaults.

Writes ``benchmarks/results/gpu_recurrent_<card>.json`` (card, versions, commit, every number)
and prints the tables. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without an install

import triton  # noqa: E402

from dplr import api, decode, provenance  # noqa: E402
from dplr import triton as triton_path  # noqa: E402
from dplr.cli import check_one  # noqa: E402
from dplr.testing import make_inputs, op, reference, rel_err, tensor_names  # noqa: E402
from dplr.transition import FAMILIES  # noqa: E402
from dplr.triton import recurrent  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(
    scan=dict(B=4, H=16, K=128, T=(512, 2048, 8192, 32768)),
    decode=dict(P=1024, H=32, K=128, N=(1, 64, 256)),
    check=dict(B=2, T=100, H=2, HV=4, K=64, V=64),
)
TINY = dict(
    scan=dict(B=1, H=2, K=16, T=(16, 32)),
    decode=dict(P=16, H=2, K=16, N=(1, 4)),
    check=dict(B=1, T=6, H=1, HV=2, K=8, V=8),
)
TIMED = ("kda", "gated_delta_rule")
VALUE_DECAY = ("gla", "kda", "dplr_delta_rule")  # the families that take gv
ROUNDING_BAND = 1e-6  # fp32 rounding of the inputs themselves, relative
# Triton's fp32 exp on the GPU is exp2(x · log2 e): rounding that product errs by |x| · 2^-24 in
# the exponent, so a factor exp(x) carries a relative error of about |x| · 2^-24 that PyTorch's
# exp does not (3.6e-6 at x = -60). The strong gates of the gv checks reach -60 per step.
EXP_BAND = {"normal": 0.0, "strong": 60 * 2.0**-24}


def environment(device: torch.device) -> dict:
    env = provenance.environment(device)
    env["card"] = env["card"] or env["cpu"]
    return dict(env, fla=_fla_version(), chunk_backend=_chunk_backend())


def _fla_version() -> str | None:
    if importlib.util.find_spec("fla") is None:
        return None
    import fla

    return getattr(fla, "__version__", "unknown")


def _chunk_backend() -> str:
    """The backend the chunk ops run on here, forward and backward: Triton when this build has
    both chunk kernels, else the PyTorch path."""
    if not CUDA:
        return "torch"
    return "triton" if triton_path.has_backward(64) else "torch"


def timer(fn, *, grads: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU, a few wall-clock runs elsewhere."""
    if CUDA:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")
    fn()  # warm-up: compilation and first-call set-up are not timed
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return sorted(runs)[1]


def graph_timer(fn) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph, as a serving engine runs its
    decode step (no Python or launch overhead); None off the GPU or when capture fails."""
    if not CUDA:
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up outside the graph: compilation, allocator
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    except RuntimeError:
        return None


_START = time.perf_counter()


def progress(what: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {what}", flush=True)


def with_backend(backend: str):
    os.environ["DPLR_BACKEND"] = backend


# ---------------------------------------------------------------------------------------------
# 1. Correctness


def check_ops(device: torch.device, shape: dict) -> list[dict]:
    """fused_recurrent (Triton) for every family, and the chunk ops of the timed families."""
    rows = []
    cases = [(name, {}) for name in FAMILIES]
    cases += [(name, dict(value_decay=True, gate=gate)) for name in VALUE_DECAY for gate in ("normal", "strong")]
    for name, extra in cases:
        with_backend("torch")
        torch_row = check_one(name, api.RECURRENT, device=device, dtype=torch.float32, shape=shape | extra, seed=0)
        with_backend("triton")
        row = check_one(name, api.RECURRENT, device=device, dtype=torch.float32, shape=shape | extra, seed=0)
        row["tolerance"] = 2 * torch_row["error"] + ROUNDING_BAND + EXP_BAND[extra.get("gate", "normal")]
        if extra:
            row["variant"] = f"gv, {extra['gate']} gates"
        rows.append(row)
    with_backend(_chunk_backend())
    for name in TIMED:
        row = check_one(name, api.CHUNK, device=device, dtype=torch.float32, shape=shape, seed=0)
        row["tolerance"] = 1e-5 if device.type == "cpu" else 1e-3  # GPU chunk matmuls may use tf32
        rows.append(row)
    for row in rows:
        row["ok"] = row["error"] <= row["tolerance"]
    return rows


def check_decode(device: torch.device, shape: dict, *, state_v_first: bool, value_decay: bool = False) -> list[dict]:
    """The decode step of every family (with ``value_decay``: those that take ``gv``, with it):
    three tokens, padding rows, intermediate states."""
    rows = []
    H, HV, K, V = shape["H"], shape["HV"], shape["K"], shape["V"]
    slots = [5, -1, 0, 9, -1, 2]
    N, T, P = len(slots), 3, 12
    with_backend("triton")
    for name in VALUE_DECAY if value_decay else FAMILIES:
        args = make_inputs(
            name, B=N, T=T, H=H, HV=HV, K=K, V=V, device=device, initial_state=False, value_decay=value_decay
        )
        gen = torch.Generator().manual_seed(7)
        pool_kv = torch.randn(P, HV, K, V, generator=gen).to(device)
        pool = pool_kv.transpose(-1, -2).contiguous() if state_v_first else pool_kv.clone()
        before = pool.clone()
        index = torch.tensor(slots, device=device)
        out = _decode(name, args, pool, index, state_v_first=state_v_first, return_intermediate_states=True)
        as_kv = (lambda x: x.transpose(-1, -2)) if state_v_first else (lambda x: x)
        live = [n for n, s in enumerate(slots) if s >= 0]
        h0 = torch.zeros(N, HV, K, V, dtype=torch.float64, device=device)
        h0[live] = pool_kv[[slots[n] for n in live]].double()
        ref_o, ref_final = reference(name, dict(args, initial_state=h0))
        errors = [rel_err(out.output[live], ref_o[live])]
        errors += [rel_err(as_kv(pool[slots[n]]), ref_final[n]) for n in live]
        errors.append(rel_err(as_kv(out.intermediate_states[live, -1]), ref_final[live]))
        untouched = sorted(set(range(P)) - {slots[n] for n in live})
        padding = [n for n, s in enumerate(slots) if s < 0]
        exact = torch.equal(pool[untouched], before[untouched]) and not out.output[padding].any()
        error = max(errors)
        rows.append(
            dict(family=name, variant="gv" if value_decay else None, layout="vk" if state_v_first else "kv",
                 error=error, untouched_exact=exact, ok=exact and error <= 1e-5)
        )  # fmt: skip
    return rows


def _decode(name: str, args: dict, pool, index, **options) -> decode.DecodeOutput:
    args = dict(args)
    tensors = [args.pop(key, None) for key in tensor_names(name)]
    return getattr(decode, f"decode_{name}")(*tensors, pool, index, **args, **options)


# ---------------------------------------------------------------------------------------------
# 2. (a) chunk vs recurrent, forward + backward


def scan_inputs(name: str, *, B: int, T: int, H: int, K: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Training-like KDA / GDN inputs made on the device (the fp64 host generator of the tests
    would take a while at 32K tokens): l2-normalised keys, beta in (0, 1), log decays."""
    gen = torch.Generator(device=device).manual_seed(T)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    gate = (B, T, H, K) if name == "kda" else (B, T, H)
    args = dict(
        q=randn(B, T, H, K),
        k=torch.nn.functional.normalize(randn(B, T, H, K), dim=-1),
        v=randn(B, T, H, K),
        g=torch.nn.functional.logsigmoid(randn(*gate) + 2.0),
        beta=torch.sigmoid(randn(B, T, H)),
    )
    return {key: x.to(dtype).requires_grad_(True) for key, x in args.items()}


def _forward_backward(fn, args: dict, do: torch.Tensor) -> None:
    fn(**args).output.backward(do)


def bench_scan(device: torch.device, cfg: dict, families: list[str]) -> list[dict]:
    rows = []
    B, H, K = cfg["B"], cfg["H"], cfg["K"]
    dtype = torch.bfloat16 if CUDA else torch.float32  # the interpreter mishandles bf16
    for name in families:
        for T in cfg["T"]:
            args = scan_inputs(name, B=B, T=T, H=H, K=K, dtype=dtype, device=device)
            leaves = list(args.values())
            do = torch.randn(B, T, H, K, device=device, dtype=dtype)
            row = dict(family=name, T=T, B=B, H=H, K=K, V=K, dtype=str(dtype).replace("torch.", ""))
            for mode, backend in ((api.CHUNK, _chunk_backend()), (api.RECURRENT, "triton")):
                with_backend(backend)
                try:
                    row[f"{mode}_ms"] = timer(partial(_forward_backward, op(name, mode), args, do), grads=leaves)
                    row[f"{mode}_backend"] = backend
                except torch.OutOfMemoryError:
                    row[f"{mode}_ms"] = None
                    row[f"{mode}_backend"] = f"{backend} (out of memory)"
                if CUDA:
                    torch.cuda.empty_cache()
            if row["chunk_ms"] and row["recurrent_ms"]:
                row["chunk_speedup"] = row["recurrent_ms"] / row["chunk_ms"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. (b) the decode step


def copy_bandwidth(device: torch.device) -> float:
    """Device-copy bandwidth in GB/s: bytes read + written by ``dst.copy_(src)`` of 1 GiB."""
    numel = (1 << 28) if CUDA else (1 << 20)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def decode_inputs(name: str, N: int, cfg: dict, device: torch.device) -> dict:
    """One new token per sequence (bf16 q, k, v; fp32 gates), ready-made: l2-normalised keys,
    beta in (0, 1), log decays; the same tensors go to dplr and fla."""
    H, K = cfg["H"], cfg["K"]
    dtype = torch.bfloat16 if CUDA else torch.float32
    args = make_inputs(name, B=N, T=1, H=H, K=K, V=K, device=device, initial_state=False, seed=N)
    for key in ("q", "k", "v"):
        args[key] = args[key].to(dtype)
    return args


def bench_decode(device: torch.device, cfg: dict, families: list[str], copy_gbps: float) -> list[dict]:
    rows = []
    P, H, K = cfg["P"], cfg["H"], cfg["K"]
    with_backend("triton")
    for name in families:
        for N in cfg["N"]:
            args = decode_inputs(name, N, cfg, device)
            gen = torch.Generator().manual_seed(N)
            pool = torch.randn(P, H, K, K, generator=gen).to(device)
            slots = torch.randperm(P, generator=gen)[:N].to(device)
            state_bytes = 2 * N * H * K * K * 4
            row = dict(family=name, N=N, P=P, H=H, K=K, V=K, state_MB=state_bytes / 1e6)
            ms = timer(partial(_decode, name, args, pool, slots))
            row.update(dplr_ms=ms, dplr_GBps=state_bytes / (ms * 1e-3) / 1e9)
            graph_ms = graph_timer(partial(_decode, name, args, pool, slots))
            if graph_ms:
                row.update(dplr_graph_ms=graph_ms, dplr_graph_GBps=state_bytes / (graph_ms * 1e-3) / 1e9)
                row["dplr_graph_of_copy"] = row["dplr_graph_GBps"] / copy_gbps
            row["dplr_of_copy"] = row["dplr_GBps"] / copy_gbps
            row.update(_fla_decode(name, args, pool, slots, state_bytes))
            if row.get("fla_ms"):
                row["fla_over_dplr"] = row["fla_ms"] / row["dplr_ms"]
            if row.get("fla_graph_ms") and row.get("dplr_graph_ms"):
                row["fla_over_dplr_graph"] = row["fla_graph_ms"] / row["dplr_graph_ms"]
            rows.append(row)
    return rows


def _fla_decode(name: str, args: dict, pool, slots, state_bytes: int) -> dict:
    """fla-core's fused recurrent op on the same token inputs, the slots' states as its initial
    state and a new final state (the same bytes read and written); also its in-place pool
    variant for KDA. Checks that fla and dplr agree."""
    if _fla_version() is None:
        return {}
    h0 = pool[slots].contiguous()
    tokens = dict(q=args["q"], k=args["k"], v=args["v"], g=args["g"], beta=args["beta"])
    result = {}
    try:
        if name == "kda":
            from fla.ops.kda import fused_recurrent_kda as fla_op
            from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_pool_op
        else:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_op

            fla_pool_op = None
        o_fla, ht_fla = fla_op(**tokens, initial_state=h0, output_final_state=True)
        check_pool = pool.clone()
        o_dplr = _decode(name, args, check_pool, slots).output
        result["fla_vs_dplr_error"] = max(rel_err(o_fla, o_dplr), rel_err(ht_fla, check_pool[slots]))
        call = partial(fla_op, **tokens, initial_state=h0, output_final_state=True)
        ms = timer(call)
        result.update(fla_ms=ms, fla_GBps=state_bytes / (ms * 1e-3) / 1e9, fla_graph_ms=graph_timer(call))
        if fla_pool_op is not None:
            work = pool.clone()
            ms = timer(
                lambda: fla_pool_op(
                    **tokens, initial_state=work, inplace_final_state=True, ssm_state_indices=slots.to(torch.int32)
                )
            )
            result.update(fla_pool_ms=ms, fla_pool_GBps=state_bytes / (ms * 1e-3) / 1e9)
    except Exception as err:  # a comparison-library failure is reported, not fatal
        result["fla_error"] = f"{type(err).__name__}: {err}"[:300]
    return result


@contextmanager
def tile_setting(**kinds: tuple[int, int]):
    """Temporarily replace entries of :data:`dplr.triton.recurrent.TILES` (the tuning data)."""
    saved = dict(recurrent.TILES)
    recurrent.TILES.update(kinds)
    try:
        yield
    finally:
        recurrent.TILES.clear()
        recurrent.TILES.update(saved)


def sweep_tiles(device: torch.device, cfg: dict, families: list[str]) -> list[dict]:
    """The tile of each kernel kind, swept: the decode step at the largest N, and the recurrent
    forward + backward at one length. Rows name the effective split (BK, BV, warps)."""
    rows = []
    P, H, K, N = cfg["decode"]["P"], cfg["decode"]["H"], cfg["decode"]["K"], max(cfg["decode"]["N"])
    choices = [(e, w) for e in (1024, 2048, 4096, 8192) for w in (1, 2, 4, 8)] if CUDA else [(1024, 1), (4096, 4)]
    for name in families:
        args = decode_inputs(name, N, cfg["decode"], device)
        pool = torch.randn(P, H, K, K, device=device)
        slots = torch.randperm(P, device=device)[:N]
        seen, default = set(), recurrent.tiles(K, K, "decode")
        for elements, warps in choices:
            with tile_setting(decode=(elements, warps)):
                tile = recurrent.tiles(K, K, "decode")
                if tile in seen:
                    continue
                seen.add(tile)
                ms = timer(partial(_decode, name, args, pool, slots))
            rows.append(
                dict(kind="decode", family=name, N=N, BV=tile.BV, num_warps=tile.num_warps, ms=ms,
                     GBps=2 * N * H * K * K * 4 / (ms * 1e-3) / 1e9, default=tile == default)
            )  # fmt: skip
    scan = cfg["scan"]
    B, H, K, T = scan["B"], scan["H"], scan["K"], scan["T"][-2]
    with_backend("triton")
    for name in families:
        args = scan_inputs(name, B=B, T=T, H=H, K=K, dtype=torch.bfloat16 if CUDA else torch.float32, device=device)
        do = torch.randn(B, T, H, K, device=device, dtype=args["v"].dtype)
        seen, default = set(), recurrent.tiles(K, K, "forward")
        for elements, warps in ((1024, 1), (2048, 2), (4096, 4)):
            with tile_setting(forward=(elements, warps), backward=(elements, warps)):
                tile = recurrent.tiles(K, K, "forward")
                if tile in seen:
                    continue
                seen.add(tile)
                ms = timer(partial(_forward_backward, op(name, api.RECURRENT), args, do), grads=list(args.values()))
            rows.append(
                dict(kind="recurrent fwd+bwd", family=name, T=T, BV=tile.BV, num_warps=tile.num_warps, ms=ms,
                     default=tile == default)
            )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, heading, format spec); a missing value prints as ``-``."""
    cells = [[("-" if row.get(key) is None else format(row[key], fmt)) for key, _, fmt in columns] for row in rows]
    widths = [max([len(head)] + [len(line[i]) for line in cells]) for i, (_, head, _) in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(head.rjust(w) for (_, head, _), w in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))


def plot(path: Path) -> Path:
    """The figure, from the JSON alone: (a) fwd+bwd time against T, (b) decode bandwidth against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({row["family"] for row in data["chunk_vs_recurrent"]}):
        rows = [row for row in data["chunk_vs_recurrent"] if row["family"] == name]
        for mode, style in (("chunk", "-o"), ("recurrent", "--s")):
            points = [(row["T"], row[f"{mode}_ms"]) for row in rows if row.get(f"{mode}_ms")]
            if points:
                left.plot(*zip(*points, strict=True), style, label=f"{name} {mode}")
    left.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="forward + backward (ms)")
    left.set_title("(a) chunk vs recurrent")
    left.legend(fontsize=8)
    for name in sorted({row["family"] for row in data["decode"]}):
        rows = [row for row in data["decode"] if row["family"] == name]
        for key, style, label in (("dplr_GBps", "-o", "dplr"), ("fla_GBps", "--s", "fla-core")):
            points = [(row["N"], row[key]) for row in rows if row.get(key)]
            if points:
                right.plot(*zip(*points, strict=True), style, label=f"{name} {label}")
    right.axhline(data["copy_GBps"], color="gray", linestyle=":", label="device copy")
    right.set(xscale="log", xlabel="N sequences", ylabel="state GB/s (read + written)")
    right.set_title("(b) decode step")
    right.legend(fontsize=8)
    fig.suptitle(f"{data['environment']['card']} (commit {str(data['environment']['commit'])[:8]})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without a GPU)")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/gpu_recurrent_<card>.json)")
    parser.add_argument("--check-only", action="store_true", help="the correctness checks only, no timing")
    ns = parser.parse_args(argv)
    cfg = TINY if ns.tiny or not CUDA else FULL
    device = torch.device("cuda" if CUDA else "cpu")
    env = environment(device)
    print(f"{env['card']}: torch {env['torch']}, triton {env['triton']}, fla {env['fla']}, commit {env['commit']}")
    print(f"chunk ops run on: {env['chunk_backend']}")

    progress("correctness: fused_recurrent and chunk ops")
    ops = check_ops(device, cfg["check"])
    progress("correctness: decode")
    decodes = [*check_decode(device, cfg["check"], state_v_first=False)]
    decodes += check_decode(device, cfg["check"], state_v_first=True)
    decodes += check_decode(device, cfg["check"], state_v_first=False, value_decay=True)
    print_table("Correctness: fused_recurrent on Triton (and chunk) against the fp64 reference, fp32",
                ops, [("family", "family", "s"), ("path", "path", "s"), ("variant", "variant", "s"),
                      ("worst", "worst", "s"),
                      ("error", "rel. error", ".2e"), ("tolerance", "tolerance", ".1e"), ("ok", "ok", "")])  # fmt: skip
    print_table("Correctness: decode step against the fp64 reference", decodes,
                [("family", "family", "s"), ("variant", "variant", "s"), ("layout", "layout", "s"),
                 ("error", "rel. error", ".2e"),
                 ("untouched_exact", "untouched bit-exact", ""), ("ok", "ok", "")])  # fmt: skip
    failed = {r["family"] for r in ops + decodes if not r["ok"]}
    timed = [name for name in TIMED if name not in failed]
    if ns.check_only:
        timed = []

    progress("(a) chunk vs recurrent")
    scan = bench_scan(device, cfg["scan"], timed)
    progress("(b) decode")
    copy_gbps = copy_bandwidth(device)
    decoding = bench_decode(device, cfg["decode"], timed, copy_gbps)
    progress("tile sweep")
    tiles = sweep_tiles(device, cfg, timed)

    print_table("(a) forward + backward, ms: chunk vs recurrent", scan,
                [("family", "family", "s"), ("T", "T", "d"), ("chunk_ms", "chunk", ".3f"),
                 ("recurrent_ms", "recurrent", ".3f"), ("chunk_speedup", "chunk speed-up", ".1f"),
                 ("chunk_backend", "chunk backend", "s")])  # fmt: skip
    print(f"\ndevice copy: {copy_gbps:.0f} GB/s (read + write)")
    print_table("(b) decode step, one token per sequence, fp32 state", decoding,
                [("family", "family", "s"), ("N", "N", "d"), ("dplr_ms", "dplr ms", ".4f"),
                 ("dplr_GBps", "dplr GB/s", ".0f"), ("dplr_of_copy", "of copy", ".0%"),
                 ("fla_ms", "fla ms", ".4f"), ("fla_GBps", "fla GB/s", ".0f"),
                 ("fla_pool_ms", "fla pool ms", ".4f"), ("fla_over_dplr", "fla/dplr time", ".2f"),
                 ("fla_vs_dplr_error", "fla vs dplr", ".1e")])  # fmt: skip
    print_table("(b) decode step replayed from a CUDA graph (kernel time, no launch overhead)", decoding,
                [("family", "family", "s"), ("N", "N", "d"), ("dplr_graph_ms", "dplr ms", ".4f"),
                 ("dplr_graph_GBps", "dplr GB/s", ".0f"), ("dplr_graph_of_copy", "of copy", ".0%"),
                 ("fla_graph_ms", "fla ms", ".4f"), ("fla_over_dplr_graph", "fla/dplr time", ".2f")])  # fmt: skip
    print_table("tiles: the decode step at the largest N, the recurrent forward + backward at one T", tiles,
                [("kind", "kind", "s"), ("family", "family", "s"), ("BV", "BV", "d"), ("num_warps", "warps", "d"),
                 ("ms", "ms", ".4f"), ("GBps", "GB/s", ".0f"), ("default", "default", "")])  # fmt: skip

    slug = re.sub(r"[^a-z0-9]+", "_", env["card"].lower()).strip("_") + ("_tiny" if cfg is TINY else "")
    out = ns.out or RESULTS / f"gpu_recurrent_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(environment=env, config={k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                  for k, v in cfg.items()}, correctness_ops=ops, correctness_decode=decodes,
                  chunk_vs_recurrent=scan, copy_GBps=copy_gbps, decode=decoding, tiles=tiles)  # fmt: skip
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")
    if importlib.util.find_spec("matplotlib") is not None:
        print(f"wrote {plot(out)}")
    if failed:
        print(f"FAILED checks: {sorted(failed)} (not timed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
