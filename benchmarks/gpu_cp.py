"""Context parallelism on 2 GPUs: KDA forward + backward, one sequence split over the ranks.

    torchrun --nproc-per-node 2 benchmarks/gpu_cp.py            # 2 GPUs, NCCL: the issue's size
    torchrun --nproc-per-node 2 benchmarks/gpu_cp.py --tiny     # anywhere (CPU: gloo, PyTorch path)

1. Correctness, before any timing. (a) Small KDA problems (fp32 and bf16; one sequence, and
   packed sequences spanning the ranks) through :mod:`dplr.distributed` against the fp64
   reference: every output slice, the final state and every gradient must be within 2x the
   single-process error in the same precision plus one rounding band. (b) At the timed size,
   the context-parallel output and gradients against the single-GPU run of the same inputs.
2. Timing at T = 262144, B = 1, H = 16, K = V = 128, bf16, forward + backward: one GPU on the
   whole sequence against ``W`` ranks on ``T / W`` tokens each. Every timed run starts on all
   ranks together (a barrier) and lasts until the slowest rank finishes; the median of
   ``--iters`` runs (a fixed count, so that the ranks' collectives pair up; ``do_bench``
   chooses its own count per process). The single-GPU time is also given by
   ``triton.testing.do_bench`` (median) as a cross-check. Communication is timed on its own:
   the forward and backward all-gathers at the sizes the call exchanges. Each rank's local
   work alone (its chunk op calls, no exchange) is timed with ``do_bench``.

Writes ``benchmarks/results/gpu_cp_<card>_x<W>.json`` (the cards' names, versions, commit, every
number) and prints the table last. Exit status 1 when a check fails (nothing is timed then).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton

import dplr
import dplr.distributed as cp
from dplr import provenance
from dplr.testing import float_tensors, make_inputs, reference, rel_err

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(T=262144, H=16, K=128, V=128, dtype=torch.bfloat16, iters=10, check_T=256, check_K=64)
TINY = dict(T=512, H=2, K=16, V=16, dtype=torch.bfloat16, iters=3, check_T=32, check_K=16)
TARGET_RATIO = 0.6  # the bar for 2 ranks
CHUNK = 64  # the default chunk size; slices are whole chunks
ROUNDING_BAND = {torch.float32: 1e-6, torch.bfloat16: 2**-8}  # one rounding of the output, relative
CONSISTENCY = 1e-2  # bf16 context-parallel vs single-GPU results: a few roundings apart, relative
WARMUP = 2


def environment(device: torch.device, backend: str) -> dict:
    env = provenance.environment(device)
    cards = [None] * dist.get_world_size()
    dist.all_gather_object(cards, env.pop("card") or env["cpu"])
    return dict(env, cards=cards, world_size=dist.get_world_size(), comm_backend=dist.get_backend(),
                chunk_backend=backend, dplr=dplr.__version__)  # fmt: skip


def chunk_backend(device: torch.device) -> str:
    """What ``DPLR_BACKEND=auto`` runs a differentiable chunk call on here."""
    if device.type != "cuda":
        return "torch"
    from dplr import triton as triton_path

    return "triton" if triton_path.has_backward(64) else "torch"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, *, iters: int, leaves: tuple = ()) -> float:
    """Median milliseconds over the ranks' slowest: every run starts after a barrier."""
    for _ in range(WARMUP):
        fn()
    runs = []
    for _ in range(iters):
        for leaf in leaves:
            leaf.grad = None
        sync(device)
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - start)
    slowest = torch.tensor(runs, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist()) * 1e3


def bench_local(fn, device: torch.device, *, leaves: tuple = ()) -> float:
    """Median milliseconds of work without collectives: do_bench on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=list(leaves), return_mode="median")
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


# ---------------------------------------------------------------------------------------------
# 1. Correctness


def check_small(
    device: torch.device, dtype: torch.dtype, *, T: int, K: int, varlen: bool, value_decay: bool = False
) -> dict:
    """A small KDA problem (with ``gv`` if ``value_decay``) over the group against the fp64
    reference, beside one process."""
    world, rank = dist.get_world_size(), dist.get_rank()
    total = world * T
    cu = [0, T // 3, T + T // 2, total - 5, total] if varlen else None
    args = make_inputs(
        "kda", B=1, T=total, H=2, HV=2, K=K, V=K, dtype=dtype, device=device, cu_seqlens=cu, value_decay=value_decay
    )
    names = float_tensors(args)
    gen = torch.Generator().manual_seed(5)

    def run(fn, mine: dict, start: int, stop: int):
        leaves = {
            n: x.detach().clone().requires_grad_(True) if n in names and x is not None else x for n, x in mine.items()
        }
        o, final = fn(**leaves, output_final_state=True)
        loss = (o.double() * do[:, start:stop]).sum()
        if final is not None:
            loss = loss + (final.double() * d_final).sum()
        loss.backward()
        return o.detach(), final, {n: None if leaves[n] is None else leaves[n].grad for n in names}

    ref_args = {n: x.detach().double().requires_grad_(True) if n in names else x for n, x in args.items()}
    ref_o, ref_final = reference("kda", ref_args)
    do = torch.randn(ref_o.shape, generator=gen, dtype=torch.float64).to(device)
    d_final = torch.randn(ref_final.shape, generator=gen, dtype=torch.float64).to(device)
    ((ref_o * do).sum() + (ref_final * d_final).sum()).backward()
    ref_o, ref_final = ref_o.detach(), ref_final.detach()

    start, stop = rank * T, rank * T + T
    single = run(dplr.chunk_kda, args, 0, total)
    mine = {n: x[:, start:stop] if n in ("q", "k", "v", "g", "beta", "gv") else x for n, x in args.items()}
    if not varlen and rank > 0:
        mine["initial_state"] = None  # one sequence: its initial state lives on the first rank
    split = run(cp.chunk_kda, mine, start, stop)

    def errors(result, lo: int, hi: int, *, last: bool) -> dict:
        o, final, grads = result
        errs = {"o": rel_err(o, ref_o[:, lo:hi])}
        if last:
            errs["final_state"] = rel_err(final.detach(), ref_final)
        for n, grad in grads.items():
            if n == "initial_state":
                if lo != 0 or hi != total:  # each rank holds its share of a replicated tensor's gradient
                    grad = torch.zeros_like(ref_args[n].grad, dtype=torch.float32) if grad is None else grad.clone()
                    dist.all_reduce(grad)
                errs[f"d{n}"] = rel_err(grad, ref_args[n].grad)
            else:
                errs[f"d{n}"] = rel_err(grad, ref_args[n].grad[:, lo:hi])
        return errs

    single_err = errors(single, 0, total, last=True)
    split_err = errors(split, start, stop, last=rank == world - 1)
    band = ROUNDING_BAND[dtype]
    bad = {k: e for k, e in split_err.items() if not e <= 2 * single_err[k] + band}
    everyone = [None] * world
    dist.all_gather_object(everyone, dict(worst=max(split_err.values()), bad=bad))
    return dict(
        check="kda vs fp64 reference"
        + (", packed sequences across ranks" if varlen else "")
        + (", with gv" if value_decay else ""),
        dtype=str(dtype).replace("torch.", ""),
        single_worst=max(single_err.values()),
        split_worst=max(r["worst"] for r in everyone),
        ok=all(not r["bad"] for r in everyone),
        failures=[r["bad"] for r in everyone if r["bad"]],
    )


# ---------------------------------------------------------------------------------------------
# 2. The timed problem


def kda_inputs(device: torch.device, *, T: int, H: int, K: int, V: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """The whole sequence's KDA tensors, made on the device (the same on every rank): l2-normalised
    keys, log decays of a trained model, beta in (0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    q, k, v = randn(1, T, H, K), F.normalize(randn(1, T, H, K), dim=-1), randn(1, T, H, V)
    g = F.logsigmoid(randn(1, T, H, K) + 2.0)
    beta = torch.sigmoid(randn(1, T, H))
    return {n: x.to(dtype) for n, x in dict(q=q, k=k, v=v, g=g, beta=beta).items()}


def forward_backward(fn, leaves: dict, do: torch.Tensor):
    def step():
        o, _ = fn(**leaves)
        o.backward(do)
        return o

    return step


def widened_call(leaves: dict, do: torch.Tensor, K: int, V: int):
    """What a rank after the first runs locally: values widened by K zero columns, started from
    ``[0 | I]`` (see :mod:`dplr.distributed`), forward and backward, no exchange."""
    v = leaves["v"]
    widened = torch.cat([v, v.new_zeros(*v.shape[:3], K)], -1).detach().requires_grad_(True)
    eye = torch.eye(K, device=v.device).expand(1, v.shape[2], K, K)
    start = torch.cat([eye.new_zeros(1, v.shape[2], K, V), eye], -1)
    d_wide = torch.cat([do, torch.randn_like(do[..., :1]).expand(*do.shape[:3], K)], -1)
    args = dict(leaves, v=widened)

    def step():
        o, final = dplr.chunk_kda(**args, initial_state=start, output_final_state=True)
        torch.autograd.backward((o, final), (d_wide, torch.ones_like(final)))

    return step, (*leaves.values(), widened)


def comm_step(device: torch.device, *, H: int, K: int, V: int):
    """The collectives of one call alone: the forward all-gather of ``[1, H, K, V + K]`` and the
    backward all-gather of ``[1, H, K, V]`` (fp32 states)."""
    forward, backward = (torch.zeros(1, H, K, width, device=device) for width in (V + K, V))
    world = dist.get_world_size()
    bufs = [[torch.empty_like(x) for _ in range(world)] for x in (forward, backward)]

    def step():
        dist.all_gather(bufs[0], forward)
        dist.all_gather(bufs[1], backward)

    return step


class Split:
    """The timed problem split over the ranks: slice ``lengths[r]`` on rank ``r``, leaves and a
    forward + backward step through :mod:`dplr.distributed`."""

    def __init__(self, inputs: dict, do: torch.Tensor, lengths: list[int]):
        rank = dist.get_rank()
        self.lengths = lengths
        self.start = sum(lengths[:rank])
        self.stop = self.start + lengths[rank]
        mine = slice(self.start, self.stop)
        self.part = {n: x[:, mine].clone().requires_grad_(True) for n, x in inputs.items()}
        self.do = do[:, mine]
        self.step = forward_backward(cp.chunk_kda, self.part, self.do)

    def check(self, single: tuple, label: str) -> dict:
        """This split's output and gradients against the single-device run (each rank its slice)."""
        for leaf in self.part.values():
            leaf.grad = None
        o = self.step().detach()
        mine = slice(self.start, self.stop)
        errors = {"o": rel_err(o, single[0][:, mine])}
        errors.update({f"d{n}": rel_err(x.grad, single[1][n][:, mine]) for n, x in self.part.items()})
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, errors)
        errors = {k: max(r[k] for r in everyone) for k in errors}
        worst = max(errors.values())
        dtype = str(o.dtype).replace("torch.", "")
        return dict(check=label, dtype=dtype, lengths=self.lengths, split_worst=worst, errors=errors,
                    tolerance=CONSISTENCY, ok=worst <= CONSISTENCY)  # fmt: skip

    def time(self, device: torch.device, iters: int) -> dict:
        return dict(lengths=self.lengths, ms=timed(self.step, device, iters=iters, leaves=tuple(self.part.values())))

    def local_work(self, device: torch.device) -> list[dict]:
        """Each rank's chunk op calls alone (no exchange): the plain call on its slice, and on the
        ranks after the first the widened call that they run instead."""
        leaves = tuple(self.part.values())
        local = {"plain": bench_local(forward_backward(dplr.chunk_kda, self.part, self.do), device, leaves=leaves)}
        if dist.get_rank() > 0:
            V = self.do.shape[-1]
            K = self.part["k"].shape[-1]
            step, widened_leaves = widened_call(self.part, self.do, K, V)
            local["widened"] = bench_local(step, device, leaves=widened_leaves)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, dict(local, tokens=self.stop - self.start))
        return per_rank


def balanced_lengths(T: int, local: list[dict], even_ms: float) -> list[int]:
    """Slices in proportion to each rank's speed, in whole chunks; the last takes the rest.

    A rank's time per token is its local work (plain on the first rank, widened on the others)
    plus, on the ranks after the first, their share of what the even split spent beyond its
    slowest rank's local work: the exchange's per-token arithmetic (the ``cᵀ y`` corrections and
    their gradients), which only the ranks with a head run."""
    work = [r["widened"] if "widened" in r else r["plain"] for r in local]
    extra = max(0.0, even_ms - max(work))
    cost = [(w + (extra if "widened" in r else 0.0)) / r["tokens"] for w, r in zip(work, local, strict=True)]
    speed = [1.0 / c for c in cost]
    lengths = [CHUNK * round(T * s / sum(speed) / CHUNK) for s in speed[:-1]]
    return [*lengths, T - sum(lengths)]


def profile(step, device: torch.device, rows: int = 12) -> list[str]:
    """Every rank's busiest GPU kernels over one step (after a warm step), as text lines."""
    from torch.profiler import ProfilerActivity

    step()
    sync(device)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)
    tables = [None] * dist.get_world_size()
    dist.all_gather_object(tables, table)
    return [f"rank {r}:\n{t}" for r, t in enumerate(tables)]


def default_path(env: dict, world: int, tiny: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", env["cards"][0].lower()).strip("_")
    return RESULTS / f"gpu_cp_{slug}_x{world}{'_tiny' if tiny else ''}.json"


def report(result: dict, out: Path) -> None:
    """Write the JSON, then print the tables."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}\n")
    print(f"{'check':62s} {'dtype':9s} {'worst rel. error':>16s}  verdict")
    for c in result["checks"]:
        print(f"{c['check']:62s} {c['dtype']:9s} {c['split_worst']:16.2e}  {'pass' if c['ok'] else 'FAIL'}")
    times = result["times"]
    if not times:
        return
    for text in times.get("profile", []):
        print(f"\nprofile, one step with balanced slices, {text}")
    s = result["shape"]
    print(f"\nKDA forward + backward, B=1 T={s['T']} H={s['H']} K={s['K']} V={s['V']} {s['dtype']}, "
          f"median of {result['iters']} (ms)")  # fmt: skip
    rows = [("1 device, whole sequence", f"{times['single_ms']:9.2f}  (do_bench {times['single_do_bench_ms']:.2f})")]
    for key in ("even", "balanced"):
        if key in times:
            ms, lengths = times[key]["ms"], times[key]["lengths"]
            value = f"{ms:9.2f}  (slices {lengths}, ratio {ms / times['single_ms']:.3f})"
            rows.append((f"{len(lengths)} ranks, {key} slices", value))
    rows.append(("communication alone", f"{times['comm_ms']:9.3f}"))
    for r, loc in enumerate(times["local_ms_per_rank"]):
        work = ", ".join(f"{k} {v:.2f}" for k, v in loc.items() if k != "tokens")
        rows.append((f"rank {r}: local work alone", f"{work}  ({loc['tokens']} tokens)"))
    for label, value in rows:
        print(f"  {label:30s} {value}")
    verdict = "meets" if result["meets_target"] else "misses"
    print(f"  ratio {times['ratio']:.3f} with {times['ratio_split']} slices ({verdict} the target <= {TARGET_RATIO})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes that run anywhere")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 10; 3 with --tiny)")
    parser.add_argument("--T", type=int, default=None, help="total tokens (default 262144; 512 with --tiny)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default: under benchmarks/results)")
    parser.add_argument("--profile", action="store_true", help="after timing: each rank's top GPU kernels in one step")
    args = parser.parse_args()
    size = TINY if args.tiny else FULL
    iters = args.iters or size["iters"]

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    backend = chunk_backend(device)
    env = environment(device, backend)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"context parallelism over {world} ranks: {', '.join(env['cards'])}; chunk backend {backend}", flush=True)

    # 1. Correctness
    checks = [
        check_small(device, dtype, T=size["check_T"], K=size["check_K"], varlen=varlen)
        for dtype in (torch.float32, torch.bfloat16)
        for varlen in (False, True)
    ]
    # gv: the exchange's value-decayed corrections, in 16 bits (the GPU's Triton products)
    checks.append(
        check_small(device, torch.bfloat16, T=size["check_T"], K=size["check_K"], varlen=True, value_decay=True)
    )
    T, H, K, V, dtype = args.T or size["T"], size["H"], size["K"], size["V"], size["dtype"]
    if T % (world * CHUNK):
        raise SystemExit(f"T={T} must be a multiple of {world} ranks x {CHUNK} tokens")
    inputs = kda_inputs(device, T=T, H=H, K=K, V=V, dtype=dtype)
    do = torch.randn(1, T, H, V, generator=torch.Generator(device=device).manual_seed(1), device=device).to(dtype)
    whole = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    single_step = forward_backward(dplr.chunk_kda, whole, do)
    single = (single_step().detach(), {n: x.grad.clone() for n, x in whole.items()})
    even = Split(inputs, do, [T // world] * world)
    checks.append(even.check(single, f"kda at T={T}: {world} ranks (even slices) vs one device"))
    failed = [c for c in checks if not c["ok"]]

    # 2. Timing
    times = {}
    if not failed:
        times["single_ms"] = timed(single_step, device, iters=iters, leaves=tuple(whole.values()))
        times["single_do_bench_ms"] = bench_local(single_step, device, leaves=tuple(whole.values()))
        del whole, single_step
        times["even"] = even.time(device, iters)
        times["comm_ms"] = timed(comm_step(device, H=H, K=K, V=V), device, iters=iters)
        times["local_ms_per_rank"] = even.local_work(device)
        # The first rank runs no widened columns and no corrections: a longer slice for it evens
        # out the ranks' work.
        balanced = Split(inputs, do, balanced_lengths(T, times["local_ms_per_rank"], times["even"]["ms"]))
        del even
        checks.append(balanced.check(single, f"kda at T={T}: {world} ranks (balanced slices) vs one device"))
        if checks[-1]["ok"]:
            times["balanced"] = balanced.time(device, iters)
        failed = [c for c in checks if not c["ok"]]
        if args.profile and "balanced" in times:
            times["profile"] = profile(balanced.step, device)
        best = min((times[k]["ms"], k) for k in ("even", "balanced") if k in times)
        times["ratio"], times["ratio_split"] = best[0] / times["single_ms"], best[1]

    result = dict(
        environment=env,
        shape=dict(B=1, T=T, H=H, HV=H, K=K, V=V, dtype=str(dtype).replace("torch.", ""), chunk_size=CHUNK),
        iters=iters,
        checks=checks,
        times=times,
        target_ratio=TARGET_RATIO,
        meets_target=bool(times) and times["ratio"] <= TARGET_RATIO,
    )
    if rank == 0:
        report(result, args.out or default_path(env, world, args.tiny))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
