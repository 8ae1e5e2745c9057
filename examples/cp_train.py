"""Train the small LM of :mod:`dplr.models.lm` (KDA mixers) with data parallel × context parallel.

    torchrun --nproc-per-node 2 examples/cp_train.py --steps 2                  # CPU, gloo: 1 replica × 2 slices
    torchrun --nproc-per-node 4 examples/cp_train.py --cp 2 --steps 200         # 2 replicas × 2 slices
    torchrun --nproc-per-node 8 examples/cp_train.py --cp 4 --device cuda \\
        --preset 125m --seq-len 65536 --batch 1 --dtype bfloat16               # GPUs, NCCL

The ``W`` ranks form ``W / cp`` data-parallel replicas of ``cp`` consecutive ranks each. A replica
trains on its own batch of sequences; each of its ranks holds one contiguous slice of every
sequence (``seq_len / cp`` tokens), runs the model on it, and the KDA layers exchange their
states through :mod:`dplr.distributed` (their short convolutions take the previous slice's last
tokens through :func:`dplr.distributed.previous_tokens`). Each rank's loss is its share of the
global mean, so summing the gradients over all ranks (one all-reduce per step) gives the
gradient of the whole batch. Before the first step every rank checks that its replica's
context-parallel loss and gradients equal a single-process run of the same model on the whole
sequences (``--no-check`` skips it).

The data are a random Markov chain (each token has a few likely successors), so the loss falls
from ``log(vocab)`` within a few hundred steps.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dplr.distributed import chunk_kda, previous_tokens
from dplr.layers import KimiDeltaAttention
from dplr.layers.common import split_heads
from dplr.models.lm import LM, PRESETS, preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUCCESSORS = 4  # likely next tokens per token in the synthetic data


class ContextParallelKDA(nn.Module):
    """A :class:`KimiDeltaAttention` layer (its parameters, unchanged) whose sequence is split over
    ``group``: the layer's ``mix`` with the context-parallel op and the convolution halo. The
    dplr layers take no process group yet; this wrapper stands in for that option."""

    def __init__(self, layer: KimiDeltaAttention, group: dist.ProcessGroup):
        super().__init__()
        self.layer, self.group = layer, group

    def mix(self, x: torch.Tensor, cache, cu_seqlens, *, recurrent: bool):
        if cache is not None or cu_seqlens is not None or recurrent:
            raise ValueError("this layer trains on fixed-length slices: no cache, cu_seqlens or decoding")
        layer, h = self.layer, self.layer.heads
        q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
        if layer.convs is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        else:
            q, k, v = (
                conv(y, previous_tokens(y, conv.kernel_size - 1, group=self.group))[0]
                for conv, y in zip(layer.convs, (q, k, v), strict=True)
            )
        o, _ = chunk_kda(
            split_heads(q, h.head_k_dim),
            split_heads(k, h.head_k_dim),
            split_heads(v, h.head_v_dim),
            split_heads(layer.f_proj(x), h.head_k_dim),
            layer.b_proj(x),
            group=self.group,
            use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            allow_neg_eigval=layer.allow_neg_eigval,
            use_gate_in_kernel=True,
            A_log=layer.A_log,
            dt_bias=layer.dt_bias,
            lower_bound=layer.gate_lower_bound,
        )
        o = layer.o_norm(o, split_heads(layer.g_proj(x), h.head_v_dim))
        return layer.o_proj(o.flatten(-2)), None


def groups(world: int, cp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's context-parallel group (``cp`` consecutive ranks) and data-parallel group (the
    ranks at the same position of every replica). Every rank creates every group, in one order."""
    rank = dist.get_rank()
    mine = {}
    for replica in range(world // cp):
        ranks = list(range(replica * cp, (replica + 1) * cp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["cp"] = group
    for position in range(cp):
        ranks = list(range(position, world, cp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["dp"] = group
    return mine["cp"], mine["dp"]


def markov_batch(vocab: int, batch: int, length: int, *, seed: int, step: int, replica: int) -> torch.Tensor:
    """``[batch, length]`` tokens of a random Markov chain; the chain is fixed by ``seed``, the
    samples by ``(seed, step, replica)``: the same on every rank of a replica."""
    table = torch.randint(vocab, (vocab, SUCCESSORS), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + replica)
    choice = torch.randint(SUCCESSORS, (batch, length), generator=gen)
    tokens = [torch.randint(vocab, (batch,), generator=gen)]
    for t in range(1, length):
        tokens.append(table[tokens[-1], choice[:, t]])
    return torch.stack(tokens, 1)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()])


def all_reduce_grads(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Sum the gradients over ``group`` in one flat buffer."""
    flat = flat_grads(model)
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in model.parameters():
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def token_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy (fp32)."""
    logits = model(ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def check_against_single_process(model, reference, loss_sum, ids, targets, total, cp_group, tol) -> None:
    """This replica's context-parallel loss and gradients (the gradients already summed over its
    ranks) against the unsplit model on the whole sequences."""
    replica_sum = loss_sum.detach().clone()
    dist.all_reduce(replica_sum, group=cp_group)
    ref_sum = token_loss(reference, ids, targets)
    (ref_sum / total).backward()
    loss_err = abs(float(replica_sum) - float(ref_sum.detach())) / abs(float(ref_sum.detach()))
    ref_grads = flat_grads(reference)
    grad_err = float((flat_grads(model) - ref_grads).norm() / ref_grads.norm())
    print(f"[rank {dist.get_rank()}] check: context-parallel vs single process, relative difference "
          f"loss {loss_err:.1e}, gradients {grad_err:.1e}", flush=True)  # fmt: skip
    if not (loss_err <= tol and grad_err <= tol):
        raise SystemExit(f"context-parallel results differ from the single-process run by more than {tol:.0e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cp", type=int, default=None, help="ranks per sequence (default: all)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, split over the cp ranks")
    parser.add_argument("--batch", type=int, default=4, help="sequences per replica and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the check against one process")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = args.cp or world
    if world % cp or args.seq_len % cp:
        raise SystemExit(f"--cp={cp} must divide the world size ({world}) and --seq-len ({args.seq_len})")
    dp = world // cp
    cp_group, dp_group = groups(world, cp)
    replica, cp_rank, T = rank // cp, rank % cp, args.seq_len // cp

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    config = preset(args.preset, mixer="kda")
    model = LM(config).to(device=device, dtype=DTYPES[args.dtype])
    reference = copy.deepcopy(model)
    for block in model.blocks:
        block.mixer = ContextParallelKDA(block.mixer, cp_group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    total = dp * args.batch * args.seq_len  # tokens per step over all replicas: each rank's loss is its share
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{world} ranks = {dp} replica(s) x {cp} slices of {T} tokens; model {args.preset} ({params:,} "
              f"parameters, KDA), {args.dtype} on {device.type}; {total:,} tokens per step", flush=True)  # fmt: skip

    mine = slice(cp_rank * T, (cp_rank + 1) * T)
    start = time.perf_counter()
    for step in range(args.steps):
        data = markov_batch(config.vocab_size, args.batch, args.seq_len + 1, seed=args.seed, step=step, replica=replica)
        ids, targets = data[:, :-1].to(device), data[:, 1:].to(device)
        optimizer.zero_grad()
        loss_sum = token_loss(model, ids[:, mine], targets[:, mine])
        (loss_sum / total).backward()
        all_reduce_grads(model, cp_group)
        if step == 0 and not args.no_check:
            tol = 1e-4 if args.dtype == "float32" else 5e-2  # fp32 sums in another order; bf16 rounds more
            check_against_single_process(model, reference, loss_sum, ids, targets, total, cp_group, tol)
        all_reduce_grads(model, dp_group)
        optimizer.step()
        loss_sum = loss_sum.detach().clone()
        dist.all_reduce(loss_sum)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  loss {float(loss_sum) / total:.4f} (uniform {math.log(config.vocab_size):.2f})  "
                  f"{total * (step + 1) / elapsed:,.0f} tokens/s", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
