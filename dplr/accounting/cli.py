"""``python -m dplr accounting``: the per-stage cost table, DPLR/KDA ratios, JSON and chart."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..transition import FAMILIES
from .model import Shape
from .report import build, chart, text
from .roofline import DEVICES, measure_device

DEFAULT_SHAPE = "1,65536,16,128,128"


def parse_shape(value: str, chunk: int) -> Shape:
    """``B,T,H,K,V`` or ``B,T,H,HV,K,V``."""
    try:
        numbers = [int(x) for x in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (5, 6):
        raise ValueError(f"--shape must be B,T,H,K,V or B,T,H,HV,K,V (integers), got {value!r}")
    if len(numbers) == 5:
        B, T, H, K, V = numbers
        HV = H
    else:
        B, T, H, HV, K, V = numbers
    return Shape(B=B, T=T, H=H, HV=HV, K=K, V=V, C=chunk)


def add_subcommand(sub) -> None:
    """Register ``accounting`` on the parser's subcommands."""
    p = sub.add_parser("accounting", help="FLOPs, exponentials, bytes and roofline floors per stage and family")
    p.add_argument("--shape", default=DEFAULT_SHAPE, help=f"B,T,H,K,V or B,T,H,HV,K,V (default {DEFAULT_SHAPE})")
    p.add_argument("--chunk", type=int, default=64, help="chunk size C (default 64)")
    p.add_argument("--device", default="h100", choices=[*DEVICES, "measure"], help="roofline rates (default h100)")
    p.add_argument("--matmul-tflops", type=float, help="override the peak matmul rate (TFLOP/s)")
    p.add_argument("--bandwidth-tbs", type=float, help="override the memory bandwidth (TB/s)")
    p.add_argument("--family", action="append", choices=list(FAMILIES), help="repeatable; default all")
    p.add_argument("--no-recompute", action="store_true", help="backward keeps the chunk states (no state rerun)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG (default %(default)s)")
    p.add_argument("--no-chart", action="store_true", help="write the JSON only")
    p.set_defaults(func=cmd_accounting)


def cmd_accounting(ns: argparse.Namespace) -> int:
    """Print the report, write it as JSON under ``--out`` and draw the chart from that JSON."""
    shape = parse_shape(ns.shape, ns.chunk)
    device = measure_device() if ns.device == "measure" else DEVICES[ns.device]
    overrides = {}
    if ns.matmul_tflops is not None:
        overrides["matmul"] = ns.matmul_tflops * 1e12
    if ns.bandwidth_tbs is not None:
        overrides["bandwidth"] = ns.bandwidth_tbs * 1e12
    if overrides:
        device = replace(device, **overrides, source=f"{device.source}; {', '.join(overrides)} overridden")
    report = build(shape, device, families=ns.family, recompute=not ns.no_recompute)
    print(text(report))

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"accounting_{ns.device}_B{shape.B}_T{shape.T}_H{shape.H}_HV{shape.HV}_K{shape.K}_V{shape.V}_C{shape.C}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {path}")
    if not ns.no_chart:
        print(f"wrote {chart(json.loads(path.read_text()), out / f'{stem}.png')}")
    return 0
