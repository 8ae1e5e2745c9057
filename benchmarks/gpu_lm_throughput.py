"""Training throughput (tokens/s) of the 125M-class LM of ``dplr.models.lm`` with each mixer.

One process, one card: for every mixer it first checks the model (the chunk forward against
token-by-token decoding, on a short sequence, in fp32), then times one full training step
(forward, backward, AdamW) in bf16 autocast with ``triton.testing.do_bench`` (median), and
writes JSON with the card, the versions and the commit.

    python benchmarks/gpu_lm_throughput.py                     # on a GPU: all mixers, B=8, T=2048
    python benchmarks/gpu_lm_throughput.py --smoke             # anywhere: a tiny model on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dplr.models.lm import LM, MIXERS, preset
from dplr.tasks.mqar import environment


def check(model: LM, device: torch.device, vocab: int) -> float:
    """The chunk forward vs one recurrent step per token (fp32 copy of the model): the largest
    relative difference of the logits. Both paths must agree before anything is timed."""
    ref = LM(model.config).to(device)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, vocab, (2, 40), device=device, generator=torch.Generator(device).manual_seed(0))
    # fp32 matmuls in full precision here. With TF32 on (as for the timing) the logits of the
    # chunk forward and of token-by-token decoding differed by 1.6-3.1e-3 on an H200 for every
    # linear-attention mixer: cuBLAS may round a [80, 768] projection's inputs to TF32 but run
    # the [2, 768] ones of a step in fp32, which would hide what this compares.
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    with torch.no_grad():
        full = ref(ids).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            logits, cache = ref.step(ids[:, t], cache)
            steps.append(logits)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return float((torch.stack(steps, 1) - full).norm() / full.norm())


def timer(device: torch.device):
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, a wall clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=1000, rep=3000, return_mode="median")

    def cpu(fn, reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu


def measure(mixer: str, args, device: torch.device) -> dict:
    overrides = dict(mixer=mixer, attention_every=args.attention_every)
    if args.smoke:
        overrides.update(vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = LM(preset(args.preset, **overrides)).to(device)
    error = check(model, device, model.config.vocab_size)
    tol = 1e-4
    if not error <= tol:  # reported and not timed; the other mixers still run
        print(f"{mixer}: chunk forward and recurrent decoding differ by {error:.2e} (> {tol:.0e}): not timed")
        return dict(mixer=mixer, check_rel_error=error, check_failed=True)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len + 1), device=device)
    forward = torch.compile(model) if args.compile else model

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = timer(device)(train_step)
    tokens = args.batch * args.seq_len
    row = dict(
        mixer=mixer,
        attention_every=args.attention_every,
        parameters=sum(p.numel() for p in model.parameters()),
        batch=args.batch,
        seq_len=args.seq_len,
        step_ms=round(ms, 3),
        tokens_per_second=round(tokens / ms * 1e3, 1),
        check_rel_error=error,
    )
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(
        f"{mixer:>10s}  {row['parameters'] / 1e6:6.1f}M  {ms:9.1f} ms/step  {row['tokens_per_second']:12,.0f} tok/s"
        f"  (check {error:.1e})",
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixer", action="append", choices=MIXERS, help="repeatable; default all")
    p.add_argument("--preset", default="125m")
    p.add_argument("--attention-every", type=int, default=0, help="hybrid: attention every n-th layer (4 = 3:1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), help="sets DPLR_BACKEND")
    p.add_argument("--smoke", action="store_true", help="a tiny model, B=2, T=64: checks the script on the CPU")
    p.add_argument("--out", help="JSON path (default benchmarks/results/gpu_lm_throughput[_smoke].json)")
    args = p.parse_args()
    if args.backend:
        os.environ["DPLR_BACKEND"] = args.backend
    if args.smoke:
        args.batch, args.seq_len = 2, 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    env = environment(device)
    print(
        f"LM training throughput on {env['card'] or env['cpu']}: preset {args.preset}, B={args.batch}, T={args.seq_len}"
    )
    rows = [measure(m, args, device) for m in (args.mixer or MIXERS)]
    report = dict(
        benchmark="lm_training_throughput",
        preset=args.preset,
        smoke=args.smoke,
        compile=args.compile,
        backend=os.environ.get("DPLR_BACKEND", "auto"),
        precision="bf16 autocast, fp32 weights and states, AdamW",
        environment=env,
        results=rows,
    )
    out = Path(args.out or f"benchmarks/results/gpu_lm_throughput{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n| mixer | params | ms/step | tokens/s |\n|---|---|---|---|")
    for r in rows:
        if r.get("check_failed"):
            print(f"| {r['mixer']} | check failed ({r['check_rel_error']:.1e}) | - | - |")
        else:
            millions, ms, rate = r["parameters"] / 1e6, r["step_ms"], r["tokens_per_second"]
            print(f"| {r['mixer']} | {millions:.1f}M | {ms:.1f} | {rate:,.0f} |")
    print(f"\nwrote {out}")
    return 1 if any(r.get("check_failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
