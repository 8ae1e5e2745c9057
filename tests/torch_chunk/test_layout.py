from __future__ import annotations

import torch

from dplr.torch_chunk.layout import ChunkLayout


def test_gather_scatter_round_trip_varlen():
    bounds = [0, 5, 5, 40, 41]
    layout = ChunkLayout.build(batch=1, seq_len=41, cu_seqlens=bounds, chunk_size=16, device="cpu")
    assert layout.num_chunks == 1 + 3 + 1  # empty sequence: no chunk
    # Steps: the running sequences are a prefix of `order`, longest first.
    assert layout.steps == (3, 1, 1)
    assert layout.order.tolist()[0] == 2
    x = torch.randn(1, 41, 3, 4)
    chunks = layout.gather(x, torch.float64)
    assert chunks.shape == (5, 3, 16, 4) and chunks.dtype == torch.float64
    back = layout.scatter(chunks, torch.Size([1, 41, 3, 4]))
    torch.testing.assert_close(back, x.double(), rtol=0, atol=0)
    padding = layout.token_index == layout.num_tokens
    assert padding.sum() == 5 * 16 - 41
    assert torch.all(chunks.movedim(2, 1)[padding] == 0)


def test_dense_batch_is_step_major():
    layout = ChunkLayout.build(batch=2, seq_len=20, cu_seqlens=None, chunk_size=16, device="cpu")
    assert layout.steps == (2, 2)
    starts = layout.token_index[:, 0].tolist()
    assert starts == [0, 20, 16, 36]  # step 0: both sequences' first chunk, then their second
