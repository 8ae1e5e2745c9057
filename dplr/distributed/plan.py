"""What each rank of a context-parallel call computes, planned on the host from the shapes and the
global ``cu_seqlens``, and the checks of the group and the boundaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import checks


@dataclass(frozen=True)
class Plan:
    """What this rank computes, planned on the host from the shapes and the global ``cu_seqlens``.

    The *head* is the piece that continues from the previous rank (tokens ``[0, head_len)``,
    run with the widened values); the *rest* are the other pieces (tokens ``[head_len, T)``,
    run as usual). ``rows`` is the number of carries (``B``, or 1 with ``cu_seqlens``).
    """

    world: int
    rank: int
    rows: int
    num_seqs: int
    head: bool
    head_len: int
    head_ends: bool  # the head's sequence ends in this slice: its final state is a result here
    head_out: bool  # the head's sequence continues into the next rank
    rest: bool
    rest_seqs: list[int] | None  # global indices of the rest pieces (None: all B rows)
    rest_cu: list[int] | None  # their boundaries in tokens [head_len, T), from 0
    rest_out: bool  # the last rest piece continues into the next rank
    ends_here: list[int]  # sequences whose final state is produced here: head first, then rest
    collected: list[int]  # sequences whose final state travels to the last rank
    output_final_state: bool


def batch_plan(world: int, rank: int, B: int, T: int, output_final_state: bool) -> Plan:
    last = rank == world - 1
    return Plan(
        world=world, rank=rank, rows=B, num_seqs=B,
        head=rank > 0, head_len=T if rank > 0 else 0, head_ends=rank > 0 and last, head_out=rank > 0 and not last,
        rest=rank == 0, rest_seqs=None, rest_cu=None, rest_out=rank == 0 and not last,
        ends_here=list(range(B)) if last else [], collected=[], output_final_state=output_final_state,
    )  # fmt: skip


def varlen_plan(world: int, rank: int, bounds: list[int], T: int, output_final_state: bool) -> Plan:
    """``bounds``: the global ``cu_seqlens``. A sequence lives on the ranks from the one holding
    its first token to the one holding its last; an empty one on the rank holding its position
    (the last rank for one at the very end)."""

    def holder(position: int) -> int:
        return min(position // T, world - 1) if T else world - 1

    N = len(bounds) - 1
    first = [holder(bounds[n]) for n in range(N)]
    last = [holder(bounds[n + 1] - 1) if bounds[n + 1] > bounds[n] else first[n] for n in range(N)]
    local = [n for n in range(N) if first[n] <= rank <= last[n]]
    start, stop = rank * T, rank * T + T
    head = bool(local) and first[local[0]] < rank
    head_len = min(bounds[local[0] + 1], stop) - start if head else 0
    rest_seqs = local[1:] if head else local
    rest_cu = [0] + [min(bounds[n + 1], stop) - start - head_len for n in rest_seqs]
    out = bool(local) and last[local[-1]] > rank
    return Plan(
        world=world, rank=rank, rows=1, num_seqs=N,
        head=head, head_len=head_len, head_ends=head and last[local[0]] == rank,
        head_out=head and out and len(local) == 1,
        rest=bool(rest_seqs), rest_seqs=rest_seqs, rest_cu=rest_cu, rest_out=out and bool(rest_seqs),
        ends_here=[n for n in local if last[n] == rank],
        collected=[n for n in range(N) if last[n] < world - 1], output_final_state=output_final_state,
    )  # fmt: skip


def group_position(group) -> tuple[dist.ProcessGroup, int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "dplr.distributed needs torch.distributed initialised (torch.distributed.init_process_group)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group must contain this rank")
    return group, dist.get_world_size(group), rank


def global_bounds(cu_seqlens, cu_seqlens_cpu, *, world: int, B: int, T: int, device: torch.device) -> list[int]:
    """The global ``cu_seqlens`` as host integers, checked against the ``world·T`` tokens of the group."""
    checks.require_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64))
    if cu_seqlens_cpu is not None:
        checks.require_tensor("cu_seqlens_cpu", cu_seqlens_cpu, dtypes=(torch.int32, torch.int64))
    host_tensor = cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu
    if host_tensor.dim() == 1 and host_tensor.numel() and int(host_tensor[-1]) != world * T:
        raise ValueError(
            f"cu_seqlens must hold the boundaries of the whole sequence, every rank passing the same, and end "
            f"at world_size * T = {world} * {T} = {world * T} (each rank holds T tokens), got {int(host_tensor[-1])}"
        )
    host = checks.check_cu_seqlens(cu_seqlens, cu_seqlens_cpu, B=B, T=world * T, device=device)
    return host if host is not None else cu_seqlens.tolist()  # the split is planned on the host
