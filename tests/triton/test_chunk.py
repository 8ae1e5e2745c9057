"""The Triton chunk kernels, forward and backward, against the fp64 reference. Without a GPU
they run under TRITON_INTERPRET=1 on CPU tensors in fp32, so the shapes are tiny;
benchmarks/gpu_chunk.py repeats the check at full size on the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dplr.testing import make_inputs
from dplr.transition import FAMILIES
from tests.helpers import TOL, run_and_compare
from tests.triton import DEVICE


def check(name: str, chunk_size: int, **shape) -> dict:
    """Output, final state and the gradient of every input (initial state included)."""
    args = make_inputs(name, dtype=torch.float32, device=DEVICE, **shape)
    return run_and_compare(name, "chunk", dict(args, chunk_size=chunk_size), TOL[torch.float32])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_varlen_gva_odd_lengths(name):
    """Packed sequences (one empty, one shorter than a chunk, one over several chunks), grouped
    value heads, an initial state per sequence."""
    check(name, 16, B=1, T=45, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 7, 7, 45])


@pytest.mark.parametrize("name", ["gla", "kda", "dplr_delta_rule", "gated_delta_rule"])
def test_strong_decay(name):
    """-30..-60 per step: the sub-blocks take the exact path; outputs and gradients stay finite
    and exact (the pairs at distance 0 pass no gradient to the gate)."""
    check(name, 32, B=1, T=40, H=1, HV=1, K=16, V=16, gate="strong")


@pytest.mark.parametrize("name", ["kda", "dplr_delta_rule"])
def test_strong_decay_in_one_block_and_slice(name):
    """-60 per step on a few channels of one sub-block: that block's first channel slice takes the
    exact path; the other blocks, and the other slice of the same block, keep the products."""
    args = make_inputs(name, dtype=torch.float32, device=DEVICE, B=1, T=70, H=1, HV=1, K=80, V=16)
    args["gk" if name == "dplr_delta_rule" else "g"][:, 20:26, :, :8] = -60.0
    run_and_compare(name, "chunk", dict(args, chunk_size=32), TOL[torch.float32])


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("name", ["kda", "rwkv7"])
def test_chunk_sizes_and_sliced_channels(name, chunk_size):
    """One sub-block (C = 16) and several merge levels; K = 80 runs as two masked channel slices,
    V = 40 as two masked blocks of value columns."""
    check(name, chunk_size, B=2, T=70, H=1, HV=1, K=80, V=40)


def test_batch_of_equal_sequences_without_initial_state():
    check("gated_delta_rule", 16, B=3, T=33, H=2, HV=4, K=16, V=8, initial_state=False)


def test_auto_backend_trains_only_on_backwards_checked_on_a_gpu():
    """``DPLR_BACKEND=auto`` picks a Triton backward only once it has passed on a GPU."""
    from dplr import triton as triton_path
    from dplr.triton import chunk, recurrent

    assert triton_path.has_backward(64, checked_on_gpu=False)
    assert triton_path.has_backward(64) == chunk.BACKWARD_CHECKED_ON_GPU
    assert triton_path.has_backward(triton_path.RECURRENT_CHUNK) == recurrent.BACKWARD_CHECKED_ON_GPU


def test_backward_chunk_size_fits_shared_memory(monkeypatch):
    """On a GPU the backward's chunk size is chosen so its kernels fit Hopper's shared memory
    (sizes from sm_90 compiles, see configs.chunk_backward)."""
    from dplr.triton import configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)

    def chosen(K, dtype, lowrank):
        return configs.chunk_backward(K=K, V=K, C=64, dtype=dtype, lowrank=lowrank).C

    assert chosen(128, torch.bfloat16, "tied") == 64
    assert chosen(256, torch.bfloat16, "tied") == 64
    assert chosen(128, torch.float32, "tied") == 32
    assert chosen(128, torch.bfloat16, "general") == 32
    assert chosen(256, torch.float16, "general") == 32
    assert chosen(256, torch.float32, "general") == 32
    assert configs.chunk_backward(K=256, V=256, C=16, dtype=torch.bfloat16, lowrank="general").C == 16
