"""``python -m dplr bench``: each family's chunk op timed on this machine, beside the floors of
the compute account (the whole call against the fused floor: the least any implementation
can take on the chosen device).

On a GPU the ops run on dplr's kernels (``triton.testing.do_bench``, median); on a CPU they run
on the PyTorch path (median of wall-clock repeats), and the percentages then compare a CPU
time with a GPU's floor, which says how far the CPU is from that GPU and nothing more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..transition import FAMILIES
from .cli import DEFAULT_SHAPE, parse_shape
from .report import build, structures, with_measured
from .roofline import DEVICES, measure_device

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_subcommand(sub) -> None:
    """Register ``bench`` on the parser's subcommands."""
    p = sub.add_parser("bench", help="measured time of each chunk op beside its roofline floor")
    p.add_argument("--shape", default=None, help=f"B,T,H,K,V or B,T,H,HV,K,V (default {DEFAULT_SHAPE} on a GPU)")
    p.add_argument("--chunk", type=int, default=64, help="chunk size C (default 64)")
    floors = "floors of this preset, or 'measure' (GPU); default: measure on a GPU, h100 on CPU"
    p.add_argument("--device", default=None, choices=[*DEVICES, "measure"], help=floors)
    p.add_argument("--family", action="append", choices=list(FAMILIES), help="repeatable; default all")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (default 5)")
    p.add_argument("--out", default=None, help="write the measurements as JSON into this folder")
    p.set_defaults(func=cmd_bench)


def _timer(device: torch.device, repeats: int):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, return_mode="median") * 1e-3

    def wall(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return wall


def measure(name: str, shape, *, dtype: torch.dtype, device: torch.device, backward: bool, timer) -> dict:
    """Seconds of one forward (and forward + backward) of ``chunk_<name>`` at ``shape``."""
    from ..testing import float_tensors, make_inputs, op

    args = make_inputs(
        name, B=shape.B, T=shape.T, H=shape.H, HV=shape.HV, K=shape.K, V=shape.V,
        dtype=dtype, device=device, initial_state=False, chunk_size=shape.C,
    )  # fmt: skip
    fn = op(name, "chunk")
    result = {}
    with torch.no_grad():
        result["fwd"] = timer(lambda: fn(**args))
    if backward:
        for key in float_tensors(args):
            args[key].requires_grad_(True)
        grad = torch.randn_like(fn(**args)[0])
        result["fwd+bwd"] = timer(lambda: fn(**args)[0].backward(grad))
    return result


def cmd_bench(ns: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu and ns.shape is None:
        raise SystemExit(
            "python -m dplr bench: no GPU here, so give a --shape the PyTorch path can run on a CPU "
            "(for example --shape 1,4096,4,64,64); the default is the accounting shape of a GPU run"
        )
    shape = parse_shape(ns.shape or DEFAULT_SHAPE, ns.chunk)
    if ns.device == "measure" or (ns.device is None and on_gpu):
        rates = measure_device("h200" if on_gpu and "H200" in torch.cuda.get_device_name() else "h100")
    else:
        rates = DEVICES[ns.device or "h100"]
    dtype = DTYPES[ns.dtype or ("bfloat16" if on_gpu else "float32")]
    where = torch.cuda.get_device_name() if on_gpu else "CPU (PyTorch path)"
    report = build(shape, rates, families=ns.family)
    timer = _timer(device, ns.repeats)
    print(f"measured on {where}, {str(dtype).removeprefix('torch.')}; floors of {rates.name} ({rates.source})")
    print(f"shape B={shape.B} T={shape.T} H={shape.H} HV={shape.HV} K={shape.K} V={shape.V} C={shape.C}\n")
    measured = {}
    for label in structures(ns.family):
        name = label.split("/")[0]
        measured[label] = measure(name, shape, dtype=dtype, device=device, backward=not ns.no_backward, timer=timer)
        print(with_measured(report, label, measured[label]) + "\n", flush=True)
    if ns.out:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = where.replace("NVIDIA ", "").replace(" ", "_").replace("(", "").replace(")", "")
        path = out / f"bench_{slug}_B{shape.B}_T{shape.T}_H{shape.H}_K{shape.K}_V{shape.V}_C{shape.C}.json"
        floors = {label: report["families"][label]["totals"] for label in measured}
        path.write_text(json.dumps(dict(
            measured_on=where, dtype=str(dtype), floors_of=asdict(rates), shape=asdict(shape),
            seconds=measured, totals=floors, meta=report["meta"],
        ), indent=1) + "\n")  # fmt: skip
        print(f"wrote {path}")
    return 0
