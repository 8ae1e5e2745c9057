"""CPU benchmark of the PyTorch chunk path (issue 2): fp32, B=1, T=4096, H=4, K=V=64.

1. Every family's chunk forward against the token-loop reference (``dplr.reference``, run in
   fp32 here, the same precision), after checking the chunk output against the fp64 reference.
2. Gated DeltaNet against the CPU fallback HF transformers ships in its Qwen3-Next model code
   (``torch_chunk_gated_delta_rule``), forward and forward+backward, after checking that both
   compute the same thing.

Times are medians over interleaved repeats (the two implementations alternate, so that drift
in a shared machine's speed hits both). With ``--stages``, each family's chunk forward is then
also timed stage by stage (``dplr.engine``'s stage functions wrapped in timers; warm forwards in a
row, apart from the interleaved measurement; "other" is the rest: layout, gathers, the scatter).
Writes ``benchmarks/results/cpu_chunk.json``.

    python benchmarks/cpu_chunk.py [--repeats 7] [--families kda,gla] [--stages]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dplr.reference import recurrence  # noqa: E402
from dplr.testing import make_inputs, op, reference, rel_err  # noqa: E402
from dplr.transition import FAMILIES, to_general  # noqa: E402

SHAPE = dict(B=1, T=4096, H=4, K=64, V=64)


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, running them in turn ``repeats`` times after a warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def token_loop(name: str, args: dict):
    """The reference recurrence in fp32 on the op's arguments (the timed baseline)."""
    from dplr import api

    p = api.prepare(name, api.CHUNK, {**_defaults(name), **args})
    gen = to_general(p.transition, k=p.k, v=p.v, g=p.g, beta=p.beta, a=p.a, b=p.b)
    return lambda: recurrence(p.q, gen["k"], gen["v"], gen["g"], gen["a"], gen["b"], scale=p.scale,
                              initial_state=p.initial_state, dtype=torch.float32)  # fmt: skip


def _defaults(name: str) -> dict:
    from dplr.testing import _with_defaults

    return _with_defaults(name, {})


STAGES = dict(cumsum="chunk_decays", intra="intra_chunk", solve="pseudo_values", state="state_pass",
              output="chunk_output")  # fmt: skip


def stage_times(fn, repeats: int) -> dict[str, float]:
    """Median milliseconds of each stage of ``fn`` (a chunk forward) and of the whole call."""
    from dplr import engine

    spent, originals = dict.fromkeys(STAGES, 0.0), {stage: getattr(engine, f) for stage, f in STAGES.items()}

    def timed(stage, f):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - start

        return run

    samples = {stage: [] for stage in (*STAGES, "other", "total")}
    try:
        for stage, f in STAGES.items():
            setattr(engine, f, timed(stage, originals[stage]))
        fn()  # warm-up
        for _ in range(repeats):
            spent.update(dict.fromkeys(STAGES, 0.0))
            start = time.perf_counter()
            fn()
            total = time.perf_counter() - start
            for stage in STAGES:
                samples[stage].append(spent[stage])
            samples["other"].append(total - sum(spent.values()))
            samples["total"].append(total)
    finally:
        for stage, f in STAGES.items():
            setattr(engine, f, originals[stage])
    return {stage: 1e3 * statistics.median(ts) for stage, ts in samples.items()}


def against_reference(families: list[str], repeats: int, *, stages: bool = False) -> list[dict]:
    rows = []
    for name in families:
        args = make_inputs(name, dtype=torch.float32, initial_state=False, **SHAPE)
        chunk = op(name, "chunk")
        with torch.no_grad():
            error = rel_err(chunk(**args).output, reference(name, args).output)
            times = interleaved({"chunk": lambda c=chunk, a=args: c(**a), "loop": token_loop(name, args)}, repeats)
        row = dict(family=name, rel_err_vs_fp64=error, chunk_s=times["chunk"], loop_s=times["loop"],
                   speedup=times["loop"] / times["chunk"])  # fmt: skip
        rows.append(row)
        print(f"{name:18s} chunk {1e3 * row['chunk_s']:8.1f} ms  token loop {1e3 * row['loop_s']:8.1f} ms  "
              f"x{row['speedup']:6.1f}  (error vs fp64 {error:.1e})", flush=True)  # fmt: skip
        if stages:
            with torch.no_grad():
                row["stages_ms"] = stage_times(lambda c=chunk, a=args: c(**a), repeats)
            print("    stages (ms): " + "  ".join(f"{k} {v:.1f}" for k, v in row["stages_ms"].items()), flush=True)
    return rows


def against_hf(repeats: int) -> dict:
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    except ImportError as err:
        print(f"transformers not importable ({err}): no HF comparison")
        return {}
    from dplr import chunk_gated_delta_rule

    args = make_inputs("gated_delta_rule", dtype=torch.float32, initial_state=False, **SHAPE)
    tensors = [args[k] for k in ("q", "k", "v", "g", "beta")]
    with torch.no_grad():
        ours = chunk_gated_delta_rule(*tensors).output
        theirs = torch_chunk_gated_delta_rule(*tensors)[0]
    agreement = rel_err(ours, theirs)

    def fwd_bwd(fn):
        def run():
            leaves = [t.detach().requires_grad_(True) for t in tensors]
            fn(*leaves)[0].sum().backward()

        return run

    ours, hf = chunk_gated_delta_rule, torch_chunk_gated_delta_rule
    with torch.no_grad():
        fwd = interleaved({"dplr": lambda: ours(*tensors), "hf": lambda: hf(*tensors)}, repeats)
    both = interleaved({"dplr": fwd_bwd(ours), "hf": fwd_bwd(hf)}, repeats)
    result = dict(agreement=agreement, fwd_dplr_s=fwd["dplr"], fwd_hf_s=fwd["hf"], fwd_speedup=fwd["hf"] / fwd["dplr"])
    result.update(fwdbwd_dplr_s=both["dplr"], fwdbwd_hf_s=both["hf"], fwdbwd_speedup=both["hf"] / both["dplr"])
    print(f"GDN vs HF torch_chunk_gated_delta_rule: forward {1e3 * fwd['dplr']:.1f} vs {1e3 * fwd['hf']:.1f} ms "
          f"(x{result['fwd_speedup']:.2f}), forward+backward {1e3 * both['dplr']:.1f} vs {1e3 * both['hf']:.1f} ms "
          f"(x{result['fwdbwd_speedup']:.2f}); outputs agree to {agreement:.1e}")  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--stages", action="store_true", help="also time each family's forward stage by stage")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_chunk.json"))
    ns = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    machine = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__)
    machine.update(threads=torch.get_num_threads(), python=platform.python_version(), commit=commit)
    machine.update(date=time.strftime("%Y-%m-%d %H:%M"), load=os.getloadavg()[0])
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, fp32, {SHAPE}")
    result = dict(machine=machine, shape=SHAPE, dtype="float32")
    result["reference"] = against_reference(ns.families.split(","), ns.repeats, stages=ns.stages)
    result["hf_gated_delta_rule"] = against_hf(ns.repeats)
    result["machine"]["load_after"] = os.getloadavg()[0]
    Path(ns.out).write_text(json.dumps(result, indent=1))
    worst = min(r["speedup"] for r in result["reference"])
    print(f"\nslowest family's speedup over the token loop: x{worst:.1f}; written {ns.out}")


if __name__ == "__main__":
    main()
