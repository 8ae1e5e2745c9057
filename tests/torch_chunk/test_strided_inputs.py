"""The engine hands the intra stage ``q, k, a, b`` as strided views of the inputs
(``ChunkLayout.gather(copy=False)``) and writes each part's output straight into the result
(``ChunkLayout.scatter_into``): the same numbers as the copies, and every intra field comes out
contiguous for the batched products of the later stages."""

from __future__ import annotations

import pytest
import torch

from dplr.torch_chunk.cumsum import chunk_decays
from dplr.torch_chunk.intra import SUB, intra_chunk
from dplr.torch_chunk.layout import ChunkLayout
from dplr.transition import ALL_TRANSITIONS, Decay, LowRank


@pytest.mark.parametrize("batch", [1, 2])
def test_gather_views_equal_copies(batch):
    layout = ChunkLayout.build(batch=batch, seq_len=64, cu_seqlens=None, chunk_size=16, device="cpu")
    x = torch.randn(batch, 64, 3, 8)
    for rows in (None, slice(batch, 3 * batch)):
        view = layout.gather(x, torch.float32, rows, copy=False)
        torch.testing.assert_close(view, layout.gather(x, torch.float32, rows), rtol=0, atol=0)
    if batch == 1:  # steps of one row lie evenly in x: the chunks are a view of it, no copy
        assert layout.gather(x, torch.float32, copy=False).data_ptr() == x.data_ptr()


@pytest.mark.parametrize("cu_seqlens", [None, [0, 5, 5, 40, 48]], ids=["dense", "varlen"])
def test_scatter_into_by_parts_equals_scatter(cu_seqlens):
    layout = ChunkLayout.build(batch=1, seq_len=48, cu_seqlens=cu_seqlens, chunk_size=16, device="cpu")
    y = torch.randn(layout.num_chunks, 3, 16, 4)
    shape = torch.Size([1, 48, 3, 4])
    out = None
    for rows, _ in layout.parts(1):
        out = layout.scatter_into(out, y[rows], rows, shape=shape)
    torch.testing.assert_close(out, layout.scatter(y, shape), rtol=0, atol=0)


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=str)
@pytest.mark.parametrize("gate", [-0.3, -3.0], ids=["fast", "slow"])
def test_intra_on_strided_views(transition, gate):
    """Same fields as from contiguous chunks, and each of them contiguous (fast chunks and the
    sub-block path of chunks that decay by more than CHUNK_LIMIT)."""
    B, T, HV, K, C = 2, 64, 3, 8, 32
    layout = ChunkLayout.build(batch=B, seq_len=T, cu_seqlens=None, chunk_size=C, device="cpu")
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(B, T, HV, K, generator=gen) for name in "qkab"}
    g = {Decay.NONE: None, Decay.SCALAR: (HV,), Decay.CHANNEL: (HV, K)}[transition.decay]
    g = None if g is None else gate * torch.rand(B, T, *g, generator=gen)
    decays = chunk_decays(layout.gather(g, torch.float32), sub=min(SUB, C))
    general = transition.lowrank is LowRank.GENERAL

    def fields(copy: bool):
        x = {name: layout.gather(t, torch.float32, copy=copy) for name, t in inputs.items()}
        return intra_chunk(transition, q=x["q"], k=x["k"], a=x["a"] if general else None,
                           b=x["b"] if general else None, decays=decays)  # fmt: skip

    strided, copied = fields(copy=False), fields(copy=True)
    for name, value in strided._asdict().items():
        if value is None:
            continue
        assert value.is_contiguous(), name
        torch.testing.assert_close(value, getattr(copied, name), rtol=0, atol=0, msg=name)
