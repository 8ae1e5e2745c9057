"""Where each chunk's tokens live: the gather into chunks and the scatter back.

Every sequence (a batch row, or a ``cu_seqlens`` span) is cut into chunks of ``C`` tokens, the
last one padded. Padding tokens read as zeros (no decay, no key, no value), so they leave the
state as it is. Chunks are stored *step-major*: first the first chunk of every sequence, then
the second chunk of every sequence that has one, and so on. Sequences are ordered by their
chunk count, longest first, so the sequences still running at step ``j`` are always a prefix:
the sequential state pass works on contiguous slices and needs no gather inside its loop.
Equal-length batches and packed variable-length batches go through the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..transition import broadcast_source


def sequence_spans(batch: int, seq_len: int, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, lengths)`` of every sequence in the flat token axis (host int64): the ``batch``
    rows of ``seq_len`` tokens, or the spans of ``cu_seqlens`` (host integers)."""
    if cu_seqlens is None:
        return torch.arange(batch, dtype=torch.long) * seq_len, torch.full((batch,), seq_len, dtype=torch.long)
    bounds = torch.tensor(cu_seqlens, dtype=torch.long)
    return bounds[:-1], bounds[1:] - bounds[:-1]


@dataclass(frozen=True)
class ChunkLayout:
    chunk_size: int
    num_tokens: int  # B * T: flat token positions; this index marks padding
    token_index: torch.Tensor  # [M, C] flat token position of each chunk slot
    steps: tuple[int, ...]  # sequences still running at each step (a prefix of `order`)
    order: torch.Tensor  # [N] sequence ids, longest first
    dense: tuple[int, int] | None = None  # (B, chunks per row) when rows are whole chunks: no index

    @property
    def num_chunks(self) -> int:
        return self.token_index.shape[0]

    @classmethod
    def build(cls, *, batch: int, seq_len: int, cu_seqlens: list[int] | None, chunk_size: int, device) -> ChunkLayout:
        """``cu_seqlens`` as host integers (already validated), or ``None`` for ``batch`` rows."""
        starts, lengths = sequence_spans(batch, seq_len, cu_seqlens)
        counts = (lengths + chunk_size - 1) // chunk_size
        order = torch.argsort(counts, descending=True, stable=True)
        max_count = int(counts.max()) if counts.numel() else 0
        running = torch.arange(max_count)[:, None] < counts[order][None, :]  # [steps, N]
        step, rank = running.nonzero(as_tuple=True)  # row-major: step-major chunk order
        seq = order[rank]
        first = starts[seq] + step * chunk_size
        index = first[:, None] + torch.arange(chunk_size)
        num_tokens = batch * seq_len
        index = torch.where(index < (starts[seq] + lengths[seq])[:, None], index, num_tokens)
        whole = cu_seqlens is None and seq_len % chunk_size == 0 and batch * seq_len > 0
        return cls(
            chunk_size=chunk_size,
            num_tokens=num_tokens,
            token_index=index.to(device),
            steps=tuple(int(c) for c in running.sum(1).tolist()),
            order=order.to(device),
            dense=(batch, seq_len // chunk_size) if whole else None,
        )

    def parts(self, max_chunks: int) -> list[tuple[slice, ChunkLayout]]:
        """Consecutive runs of whole steps, each of at most ``max_chunks`` chunks (or one step):
        ``(rows, layout)`` with ``rows`` the run's chunks (step-major, so a slice) and ``layout`` the
        run as a layout of its own (its ``steps``, the same ``order``), for the state pass to go on
        from where the run before it stopped. Always at least one part (it may have no chunks)."""
        parts, start, first = [], 0, 0
        for step in range(len(self.steps) + 1):
            end = start + sum(self.steps[first:step])
            close = step == len(self.steps) or (step > first and end + self.steps[step] - start > max_chunks)
            if close and (step > first or not parts):
                rows = slice(start, end)
                steps = self.steps[first:step]
                parts.append((rows, dataclasses.replace(self, token_index=self.token_index[rows], steps=steps)))
                start, first = end, step
        return parts

    def gather(
        self, x: torch.Tensor | None, dtype: torch.dtype, rows: slice | None = None, *, copy: bool = True
    ) -> torch.Tensor | None:
        """``[B, T, heads, *rest]`` → ``[M, heads, C, *rest]`` in ``dtype``, zeros in padding; with
        ``rows`` (a slice of whole steps, see :meth:`parts`) those chunks only.

        A stride-0 (time-invariant) input stays a stride-0 view on the dense path, in either
        dtype; the indexed path copies it (its padding slots need zeros). With ``copy=False`` the
        dense path hands out the chunks as a strided view of ``x`` (cast if need be), for an input
        that a stage reads only element-wise: its products make the contiguous tensors anyway."""
        if x is None:
            return None
        # The chunks are made contiguous once here: every later product would otherwise copy
        # its permuted operands (matmul folds [M, heads] into one batch dimension).
        if self.dense is not None:  # step-major chunks of equal rows: one permuted copy
            B, n = self.dense
            chunks = x.reshape(B, n, self.chunk_size, *x.shape[2:]).transpose(0, 1).movedim(2, 3)
            if rows is not None:  # whole steps: B chunks each
                chunks = chunks[rows.start // B : rows.stop // B]
            chunks = _cast(chunks, dtype)
            if not copy:
                return chunks.flatten(0, 1)  # [steps, B] → chunks: a view for B = 1, else a copy
            chunks = chunks.reshape(-1, *chunks.shape[2:])
            return chunks if 0 in chunks.stride() else chunks.contiguous()
        flat = x.reshape(self.num_tokens, *x.shape[2:])
        index = self.token_index if rows is None else self.token_index[rows]
        padding = (index >= self.num_tokens).view(*index.shape, *[1] * (flat.dim() - 1))
        # Padding slots read the last token and are zeroed (no copy of the whole input with a zero row).
        picked = flat[index.clamp(max=max(self.num_tokens - 1, 0))].masked_fill(padding, 0)
        return _cast(picked.movedim(1, 2), dtype).contiguous()

    def scatter(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``[M, heads, C, D]`` → ``[B, T, heads, D]``; padding slots are dropped."""
        return self.scatter_into(None, y, shape=shape)

    def scatter_into(
        self, out: torch.Tensor | None, y: torch.Tensor, rows: slice | None = None, *, shape: torch.Size
    ) -> torch.Tensor:
        """Writes ``y [chunks, heads, C, D]``, the chunks ``rows`` (whole steps, see :meth:`parts`;
        all by default), into their tokens of ``out [B, T, heads, D]`` (``shape``), in place, and
        returns ``out``; ``out=None`` makes it, uninitialised: every token is a slot of one chunk,
        so the parts written one after another fill it, with no concatenation of the parts. (Made
        when the first part is done, it adds nothing to that part's peak memory.)"""
        out = y.new_empty(shape) if out is None else out
        rows = slice(0, self.num_chunks) if rows is None else rows
        if self.dense is not None:
            B, n = self.dense
            heads, C, D = y.shape[1:]
            target = out.view(B, n, C, heads, D)[:, rows.start // B : rows.stop // B]
            target.copy_(y.view(-1, B, heads, C, D).permute(1, 0, 3, 2, 4))
            return out
        flat_rows = y.movedim(2, 1).reshape(-1, *y.shape[1:2], *y.shape[3:])
        index = self.token_index[rows].reshape(-1)
        keep = index < self.num_tokens
        out.view(self.num_tokens, *flat_rows.shape[1:]).index_copy_(0, index[keep], flat_rows[keep])
        return out


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` that converts a broadcast input's distinct elements only and broadcasts
    them again (``Tensor.to`` would write every repeat)."""
    return x if x.dtype == dtype else broadcast_source(x).to(dtype).expand(x.shape)
