"""The forward in parts (``ChunkLayout.parts``): each part's state pass goes on from the last, so
any split of the steps gives the whole sequence's outputs, final states and gradients."""

from __future__ import annotations

import pytest
import torch

from dplr import engine
from dplr.testing import float_tensors, make_inputs, op, reference
from dplr.torch_chunk.layout import ChunkLayout


def test_parts_are_whole_steps():
    layout = ChunkLayout.build(batch=1, seq_len=123, cu_seqlens=[0, 41, 41, 100, 123], chunk_size=16, device="cpu")
    assert layout.steps == (3, 3, 2, 1)
    for max_chunks in (1, 3, 5, 100):
        parts = layout.parts(max_chunks)
        assert [rows.start for rows, _ in parts] == [0] + [rows.stop for rows, _ in parts[:-1]]
        assert parts[-1][0].stop == layout.num_chunks
        assert sum((part.steps for _, part in parts), ()) == layout.steps
        for rows, part in parts:
            assert part.num_chunks == rows.stop - rows.start == sum(part.steps)
            assert part.num_chunks <= max_chunks or len(part.steps) == 1
    empty = ChunkLayout.build(batch=1, seq_len=0, cu_seqlens=None, chunk_size=16, device="cpu")
    assert [(rows, part.steps) for rows, part in empty.parts(4)] == [(slice(0, 0), ())]


@pytest.mark.parametrize("name", ["gla", "kda", "dplr_delta_rule", "simple_gla"])
@pytest.mark.parametrize("cu_seqlens", [None, [0, 37, 37, 90, 130]], ids=["batch", "varlen"])
def test_one_step_per_part_matches_the_reference(monkeypatch, name, cu_seqlens):
    """PART_ELEMENTS = 1: every step its own part (the default runs these shapes in one part)."""
    monkeypatch.setattr(engine, "PART_ELEMENTS", 1)
    B, T = (2, 70) if cu_seqlens is None else (1, 130)
    args = make_inputs(name, B=B, T=T, H=1, HV=2, K=8, V=4, dtype=torch.float64, cu_seqlens=cu_seqlens,
                       value_decay=name != "simple_gla")  # fmt: skip
    args = {k: x.requires_grad_(True) if k in float_tensors(args) else x for k, x in args.items()}
    o, final = op(name, "chunk")(**args, chunk_size=16, output_final_state=True)
    ref = reference(name, args)
    torch.testing.assert_close(o, ref.output, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-10, atol=1e-12)
    leaves = [args[k] for k in float_tensors(args)]
    grads = torch.autograd.grad((o.sum(), final.sum()), leaves)
    expected = torch.autograd.grad((ref.output.sum(), ref.final_state.sum()), leaves)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
