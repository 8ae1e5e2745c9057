"""The Triton chunk kernels (forward) against the fp64 reference. Without a GPU they run under
TRITON_INTERPRET=1 on CPU tensors in fp32, so the shapes are tiny; benchmarks/gpu_chunk.py
repeats the check at full size on the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dplr.testing import make_inputs, op, reference, rel_err
from dplr.transition import FAMILIES
from tests.helpers import TOL
from tests.triton import INTERPRET

DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("DPLR_BACKEND", "triton")


def check(name: str, chunk_size: int, **shape) -> None:
    args = make_inputs(name, dtype=torch.float32, device=DEVICE, output_final_state=True, **shape)
    o, final = op(name, "chunk")(**args, chunk_size=chunk_size)
    ref_o, ref_final = reference(name, {k: x.cpu() if isinstance(x, torch.Tensor) else x for k, x in args.items()})
    assert o.dtype == args["v"].dtype and final.dtype == torch.float32
    assert rel_err(o.cpu(), ref_o) < TOL[torch.float32]
    assert rel_err(final.cpu(), ref_final) < TOL[torch.float32]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_varlen_gva_odd_lengths(name):
    """Packed sequences (one empty, one shorter than a chunk, one over several chunks), grouped
    value heads, an initial state per sequence."""
    check(name, 16, B=1, T=45, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 7, 7, 45])


@pytest.mark.parametrize("name", ["gla", "kda", "dplr_delta_rule", "gated_delta_rule"])
def test_strong_decay(name):
    """-30..-60 per step: the sub-blocks take the exact path; outputs stay finite and exact."""
    check(name, 32, B=1, T=40, H=1, HV=1, K=16, V=16, gate="strong")


@pytest.mark.parametrize("chunk_size", [32, 64])
def test_chunk_sizes_and_sliced_channels(chunk_size):
    """Several sub-block merge levels; K = 80 runs as two masked channel slices."""
    check("kda", chunk_size, B=2, T=70, H=1, HV=1, K=80, V=24)
