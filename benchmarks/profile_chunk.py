"""Per-kernel times of the Triton chunk forward on one GPU, for launch-configuration variants:
where the time goes, and which of the two launches is far from its memory floor.

    python benchmarks/profile_chunk.py [--families kda,gated_delta_rule] [--shapes 0,2]

Prints, per family, shape and variant: the per-chunk kernel (stages 1-3) and the state pass
(stages 4-5) in ms, with registers and spills of each compiled variant at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_chunk import SHAPES, gpu_inputs  # noqa: E402
from dplr import api  # noqa: E402
from dplr.testing import _with_defaults  # noqa: E402
from dplr.triton import chunk, configs  # noqa: E402
from dplr.triton.intra import chunk_prepare_kernel  # noqa: E402
from dplr.triton.state import chunk_state_kernel  # noqa: E402

VARIANTS = {
    "default": {},
    "prep4w": dict(warps_prepare=4),
    "prepBK32": dict(BK=32),
    "prep4wBK32": dict(warps_prepare=4, BK=32),
    "prep2w": dict(warps_prepare=2),
    "prep8w": dict(warps_prepare=8),
    "prepBK128": dict(BK=128),
    "stages2": dict(stages_state=2),
    "state8w": dict(warps_state=8),
}


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="kda,gated_delta_rule")
    ap.add_argument("--shapes", default="0,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ns = ap.parse_args()
    print(torch.cuda.get_device_name())
    for index in (int(s) for s in ns.shapes.split(",")):
        B, T, H, K = SHAPES[index]
        for name in ns.families.split(","):
            args = _with_defaults(name, gpu_inputs(name, B, T, H, K))
            problem = api.prepare(name, api.CHUNK, args)
            lowrank = problem.transition.lowrank.value
            base = configs.chunk_forward(K=K, V=K, C=64, dtype=problem.q.dtype, device="cuda", lowrank=lowrank)
            for label in ns.variants.split(","):
                cfg = dataclasses.replace(base, **VARIANTS[label])
                prep = chunk.prepare(problem, 64, cfg)
                chunk.state_pass(problem, prep, 64, cfg)
                t1 = do_bench(lambda p=problem, c=cfg: chunk.prepare(p, 64, c), return_mode="median")
                t2 = do_bench(lambda p=problem, c=cfg, r=prep: chunk.state_pass(p, r, 64, c), return_mode="median")
                print(
                    f"{name:18s} {SHAPES[index]!s:22s} {label:10s} prepare {t1:7.3f} ms  state {t2:7.3f} ms", flush=True
                )
            del args, problem
            torch.cuda.empty_cache()
    for kernel in (chunk_prepare_kernel, chunk_state_kernel):
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                meta = compiled.metadata
                print(
                    f"{kernel.fn.__name__}: regs {compiled.n_regs} spills {compiled.n_spills} "
                    f"warps {meta.num_warps} shared {meta.shared}"
                )


if __name__ == "__main__":
    main()
