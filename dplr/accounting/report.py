"""The account of several structures as one JSON-ready report, its tables, ratios and chart.

:func:`build` computes; everything else reads the report dict (so the chart is made from the
JSON, and a report saved on one machine prints the same on another).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..provenance import git_commit
from ..transition import FAMILIES, Transition
from .model import FORWARD_STAGES, RECOMPUTE, Account, Precision, Shape, account, attention_cost, recurrent_cost
from .roofline import Device, floor, fused_floor, staged_floor

QUANTITIES = ("matmul", "other", "exps", "bytes_ideal", "bytes_plan")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def structures(names: list[str] | None = None) -> dict[str, Transition]:
    """Families grouped by structure, labelled by their names (``dplr_delta_rule/rwkv7``)."""
    chosen = [n for n in FAMILIES if names is None or n in names]
    groups: dict[Transition, list[str]] = {}
    for name in chosen:
        groups.setdefault(FAMILIES[name].transition, []).append(name)
    return {"/".join(members): transition for transition, members in groups.items()}


def _family(acc: Account, device: Device) -> dict:
    def row(cost, seconds, binds):
        return {**{q: getattr(cost, q) for q in QUANTITIES}, "floor_s": seconds, "binds": binds}

    stages = []
    for s in acc.stages:
        f = floor(s, device)
        terms = [dict(kind=kind, term=label, total=total) for kind, label, total in s.terms]
        stages.append(dict(stage=s.stage, direction=s.direction, **row(s, f.seconds, f.binds), terms=terms))
    totals = {}
    for direction in DIRECTIONS:
        key = None if direction == "fwd+bwd" else direction
        fused = fused_floor(acc, device, key)
        totals[direction] = row(acc.total(key), staged_floor(acc, device, key), "")
        totals[direction].update(fused_floor_s=fused.seconds, fused_binds=fused.binds)
    return dict(
        transition=str(acc.transition),
        stages=stages,
        totals=totals,
        recurrent=recurrent_cost(acc.transition, acc.shape, precision=acc.precision),
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def ratios(report: dict, numerator: str, denominator: str) -> dict:
    """``numerator / denominator`` per stage and in total, for every quantity and the floor."""
    fams = report["families"]
    num, den = fams[numerator], fams[denominator]
    index = {(s["direction"], s["stage"]): s for s in den["stages"]}
    quantities = (*QUANTITIES, "floor_s")
    stages = {}
    for s in num["stages"]:
        other = index.get((s["direction"], s["stage"]))
        if other is not None:
            stages[f"{s['direction']}/{s['stage']}"] = {q: _ratio(s[q], other[q]) for q in quantities}
    totals = {
        d: {q: _ratio(num["totals"][d][q], den["totals"][d][q]) for q in (*quantities, "fused_floor_s")}
        for d in DIRECTIONS
    }
    return dict(numerator=numerator, denominator=denominator, stages=stages, totals=totals)


def build(
    shape: Shape,
    device: Device,
    *,
    families: list[str] | None = None,
    precision: Precision | None = None,
    recompute: bool = True,
) -> dict:
    """The report: per structure every stage's cost and floor, totals, the recurrence, the
    attention comparison, and DPLR/KDA ratios when both are present."""
    precision = precision or Precision()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    fams = {
        label: _family(account(t, shape, precision=precision, recompute=recompute), device)
        for label, t in structures(families).items()
    }
    report = dict(
        meta=dict(
            dplr=__version__,
            torch=torch.__version__,
            triton=triton_version,
            python=platform.python_version(),
            commit=git_commit(),
            device=asdict(device),
            shape=asdict(shape),
            precision=asdict(precision),
            recompute=recompute,
        ),
        families=fams,
        attention=attention_cost(shape),
    )
    kda = next((label for label in fams if "kda" in label.split("/")), None)
    dplr = next((label for label in fams if "dplr_delta_rule" in label.split("/")), None)
    report["ratios"] = ratios(report, dplr, kda) if kda and dplr else None
    return report


# ---------------------------------------------------------------------------------------------
# Text


def _n(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}f}{suffix}"
    return f"{x:.{digits}f}" if x != int(x) else f"{int(x)}"


def _header() -> str:
    return (
        f"{'stage':16s} {'matmul':>9s} {'other':>8s} {'exps':>7s} {'B ideal':>8s} {'B plan':>8s} "
        f"{'floor µs':>10s}  binds"
    )


def _line(label: str, row: dict, per: float) -> str:
    return (
        f"{label:16s} {_n(row['matmul'] / per):>9s} {_n(row['other'] / per):>8s} {_n(row['exps'] / per):>7s} "
        f"{_n(row['bytes_ideal'] / per):>8s} {_n(row['bytes_plan'] / per):>8s} {row['floor_s'] * 1e6:10.1f}  "
        f"{row['binds']}"
    )


def family_table(report: dict, label: str) -> str:
    """One structure: each stage per token and head (FLOPs, exps, bytes) and its floor."""
    meta, fam = report["meta"], report["families"][label]
    shape = meta["shape"]
    per = shape["B"] * shape["T"] * shape["HV"]
    lines = [f"{label}  ({fam['transition']})", _header()]
    for s in fam["stages"]:
        lines.append(_line(f"{s['direction']} {s['stage']}", s, per))
    for direction in DIRECTIONS:
        t = fam["totals"][direction]
        lines.append(_line(f"total {direction}", t, per) + f"   fused {t['fused_floor_s'] * 1e6:.1f} µs")
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """Every structure side by side: per token and head, and the floors of the whole call."""
    shape = report["meta"]["shape"]
    per = shape["B"] * shape["T"] * shape["HV"]
    lines = [
        f"{'structure':22s} {'fwd FLOP':>9s} {'f+b FLOP':>9s} {'fwd exp':>8s} {'fwd B':>7s} {'plan B':>7s} "
        f"{'fwd µs':>9s} {'f+b µs':>9s} {'fused f+b':>9s} {'recurrent':>9s}",
    ]
    for label, fam in report["families"].items():
        f, fb = fam["totals"]["fwd"], fam["totals"]["fwd+bwd"]
        lines.append(
            f"{label:22s} {_n((f['matmul'] + f['other']) / per):>9s} {_n((fb['matmul'] + fb['other']) / per):>9s} "
            f"{_n(f['exps'] / per):>8s} {_n(f['bytes_ideal'] / per):>7s} {_n(f['bytes_plan'] / per):>7s} "
            f"{f['floor_s'] * 1e6:9.1f} {fb['floor_s'] * 1e6:9.1f} {fb['fused_floor_s'] * 1e6:9.1f} "
            f"{_n(fam['recurrent']['other_fwd'] / per):>9s}"
        )
    att = report["attention"]
    lines.append(f"{'softmax attention':22s} {_n(att['matmul_fwd'] / per):>9s} {_n(att['matmul_fwd_bwd'] / per):>9s}")
    return "\n".join(lines)


def ratio_table(report: dict) -> str:
    """DPLR over KDA per stage and in total: matmul, other, exps, plan bytes and floor."""
    r = report["ratios"]
    if r is None:
        return "(no ratios: pass both kda and dplr_delta_rule to --family)"
    lines = [
        f"{r['numerator']} / {r['denominator']}",
        f"{'stage':16s} {'matmul':>7s} {'other':>7s} {'exps':>7s} {'B plan':>7s} {'floor':>7s}",
    ]

    def fmt(x):
        return f"{x:7.2f}" if x is not None else f"{'-':>7s}"

    for key, q in r["stages"].items():
        lines.append(
            f"{key.replace('/', ' '):16s} {fmt(q['matmul'])} {fmt(q['other'])} {fmt(q['exps'])} "
            f"{fmt(q['bytes_plan'])} {fmt(q['floor_s'])}"
        )
    for d in DIRECTIONS:
        q = r["totals"][d]
        lines.append(
            f"{'total ' + d:16s} {fmt(q['matmul'])} {fmt(q['other'])} {fmt(q['exps'])} {fmt(q['bytes_plan'])} "
            f"{fmt(q['floor_s'])}   fused floor {fmt(q['fused_floor_s']).strip()}, ideal bytes "
            f"{fmt(q['bytes_ideal']).strip()}"
        )
    return "\n".join(lines)


def with_measured(report: dict, label: str, measured: Mapping[str, float]) -> str:
    """Measured seconds beside the model's floors, for ``python -m dplr bench``.

    ``measured`` maps stage keys (``"fwd/intra"``, ``"bwd/recompute"``) to the time of that
    stage, or ``"fwd"``, ``"bwd"``, ``"fwd+bwd"`` to the time of the whole call. A stage is set
    against its own floor (plan bytes); a whole call against the fused floor (ideal bytes),
    the least any implementation can take. Keys the model does not know raise ``KeyError``.
    """
    fam = report["families"][label]
    floors = {f"{s['direction']}/{s['stage']}": (s["floor_s"], s["binds"]) for s in fam["stages"]}
    floors.update({d: (t["fused_floor_s"], t["fused_binds"]) for d, t in fam["totals"].items()})
    unknown = sorted(set(measured) - set(floors))
    if unknown:
        raise KeyError(f"no model row for {unknown}; known: {sorted(floors)}")
    lines = [
        f"{label}: measured against the floor",
        f"{'row':18s} {'floor µs':>10s} {'measured µs':>12s} {'% of floor':>10s}  binds",
    ]
    for key, seconds in measured.items():
        bound, binds = floors[key]
        pct = 100.0 * bound / seconds if seconds > 0 else float("nan")
        lines.append(f"{key:18s} {bound * 1e6:10.1f} {seconds * 1e6:12.1f} {pct:9.1f}%  {binds}")
    return "\n".join(lines)


def text(report: dict) -> str:
    """The whole report as the CLI prints it: header, summary, one table per structure, ratios."""
    meta = report["meta"]
    s, d = meta["shape"], meta["device"]
    head = [
        f"dplr {meta['dplr']} compute accounting, commit {meta['commit'][:12]}",
        f"shape B={s['B']} T={s['T']} H={s['H']} HV={s['HV']} K={s['K']} V={s['V']}, chunk C={s['C']}; "
        f"bytes per element {meta['precision']}",
        f"device {d['name']} ({d['source']}): matmul {d['matmul'] / 1e12:.0f} TFLOP/s, memory "
        f"{d['bandwidth'] / 1e12:.2f} TB/s, vector {d['vector'] / 1e12:.0f} TFLOP/s, exp {d['exp'] / 1e12:.2f} T/s",
        "Per token and value head: FLOPs, exponentials, bytes (ideal = fused op, plan = staged); floors for the"
        " whole call (plan bytes; 'fused' = ideal bytes). Matmul FLOPs count dense C x C tiles.",
    ]
    parts = ["\n".join(head), summary_table(report)]
    parts += [family_table(report, label) for label in report["families"]]
    parts.append(ratio_table(report))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Chart


def chart(report: dict, path: str | Path) -> Path:
    """Stacked bars per stage, one bar per structure: FLOPs and plan bytes per token and head,
    and the floor of the whole call (fwd+bwd); the fused floor as a marker."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("the accounting chart needs matplotlib: pip install 'dplr[bench]'") from err

    shape, device = report["meta"]["shape"], report["meta"]["device"]
    per = shape["B"] * shape["T"] * shape["HV"]
    labels = list(report["families"])
    order = [("fwd", s) for s in FORWARD_STAGES] + [("bwd", RECOMPUTE)] + [("bwd", s) for s in FORWARD_STAGES[::-1]]
    colours = dict(zip((*FORWARD_STAGES, RECOMPUTE), plt.get_cmap("tab10").colors, strict=False))
    panels = (
        ("FLOPs per token and head (matmul + other)", lambda s: (s["matmul"] + s["other"]) / per),
        ("bytes per token and head (staged plan)", lambda s: s["bytes_plan"] / per),
        (f"floor on {device['name']} (ms)", lambda s: s["floor_s"] * 1e3),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for ax, (title, value) in zip(axes, panels, strict=True):
        bottoms = [0.0] * len(labels)
        for direction, stage in order:
            heights = []
            for label in labels:
                rows = report["families"][label]["stages"]
                row = next((s for s in rows if (s["direction"], s["stage"]) == (direction, stage)), None)
                heights.append(value(row) if row else 0.0)
            ax.bar(
                range(len(labels)), heights, bottom=bottoms, color=colours[stage],
                hatch="//" if direction == "bwd" else None, edgecolor="white", linewidth=0.5,
                label=f"{direction} {stage}",
            )  # fmt: skip
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        if title.startswith("floor"):
            fused = [report["families"][label]["totals"]["fwd+bwd"]["fused_floor_s"] * 1e3 for label in labels]
            ax.scatter(range(len(labels)), fused, marker="_", s=600, color="black", zorder=3, label="fused floor")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([label.replace("/", "/\n") for label in labels], rotation=30, ha="right", fontsize=8)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        f"dplr chunk algorithm, forward (solid) + backward (hatched): B={shape['B']} T={shape['T']} "
        f"H={shape['H']} K={shape['K']} V={shape['V']} C={shape['C']}",
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
