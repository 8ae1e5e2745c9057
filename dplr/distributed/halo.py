"""The halo of a short convolution or token shift: the last tokens of the previous rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .exchange import gather
from .plan import group_position


class _PreviousTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, last, group, rank, world):
        parts = gather(last, group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return parts[rank - 1] if rank > 0 else torch.zeros_like(last)

    @staticmethod
    def backward(ctx, d_tail):
        parts = gather(d_tail, ctx.group)  # the gradient of the tail each rank received
        rank = ctx.rank
        return (parts[rank + 1] if rank < ctx.world - 1 else torch.zeros_like(d_tail)), None, None, None


def previous_tokens(x: torch.Tensor, count: int, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The last ``count`` tokens of the previous rank's slice, zeros on the first rank, with the
    gradient sent back to that rank: ``x [B, T, ...]`` → ``[B, count, ...]``.

    This is the ``tail`` that a short causal convolution of width ``count + 1`` (or a token shift,
    ``count = 1``) needs at the start of a slice, e.g. ``ShortConvolution(y, previous_tokens(y, 3))``
    for width 4. Every rank must hold at least ``count`` tokens. One all-gather each way.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise TypeError(f"x must be a tensor [B, T, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if x.shape[1] < count:
        raise ValueError(f"x holds T={x.shape[1]} tokens on this rank; previous_tokens needs at least count={count}")
    group, world, rank = group_position(group)
    return _PreviousTokens.apply(x[:, x.shape[1] - count :], group, rank, world)
