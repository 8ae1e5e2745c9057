"""The value-side decay ``gv`` in the Triton chunk kernels (``VALUE_DECAY``): output, final state
and every gradient (dgv included) against the fp64 reference. Without a GPU they run under
TRITON_INTERPRET=1 in fp32 on tiny shapes; benchmarks/gpu_value_decay.py repeats the check at
full size on the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dplr.testing import make_inputs, op
from tests.helpers import TOL, VALUE_DECAY_GATE, run_and_compare
from tests.triton import DEVICE

NAMES = list(VALUE_DECAY_GATE)


def check(name: str, chunk_size: int, args: dict) -> dict:
    errors = run_and_compare(name, "chunk", dict(args, chunk_size=chunk_size), TOL[torch.float32])
    assert "dgv" in errors
    return errors


def inputs(name: str, **shape) -> dict:
    return make_inputs(name, dtype=torch.float32, device=DEVICE, value_decay=True, **shape)


@pytest.mark.parametrize("name", NAMES)
def test_varlen_gva_odd_lengths(name):
    """Packed sequences (one empty, one shorter than a chunk, one over several chunks), grouped
    value heads, an initial state per sequence."""
    check(name, 16, inputs(name, B=1, T=45, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 7, 7, 45]))


def test_chunks_of_64_and_sliced_values():
    """Chunks of 64 (six levels of merges on the value side; the strong-gate tests take chunks of
    32 and the others 16), V = 40 as masked blocks of value columns, T not a multiple of the
    chunk; the general form, whose backward has the most column-decayed products."""
    check("dplr_delta_rule", 64, inputs("dplr_delta_rule", B=1, T=70, H=1, HV=1, K=16, V=40))


@pytest.mark.parametrize("side", ["value", "both"])
def test_strong_gates(side):
    """-30..-60 per step on the value side (alone, or on both): the value side's sub-blocks take
    the exact path; outputs and gradients stay finite and exact."""
    args = inputs("kda", B=1, T=40, H=1, HV=1, K=16, V=16, gate="strong")
    if side == "value":
        args["g"] = inputs("kda", B=1, T=40, H=1, HV=1, K=16, V=16)["g"]
    check("kda", 32, args)


def test_mixed_gates_within_channels():
    """Steps of -60 between slow ones in the same value channel: the slow steps' factors are
    differences of cumulative sums of thousands, exact only because those sums are fp64."""
    args = inputs("gla", B=1, T=64, H=1, HV=1, K=16, V=16)
    gen = torch.Generator().manual_seed(3)
    fast = torch.rand(args["gv"].shape, generator=gen) < 0.3
    args["gv"] = torch.where(fast.to(DEVICE), torch.full_like(args["gv"], -60.0), args["gv"])
    check("gla", 64, args)


@pytest.mark.parametrize("name", NAMES)
def test_fast_and_slow_chunks_in_one_call(name):
    """Chunks that decay by at most CHUNK_LIMIT take one product against the chunk's start, the
    others the merges: here the second of three chunks of 32 holds one step of -70 in one value
    channel (so its whole block of columns takes the merges) and the rest decay slowly."""
    args = inputs(name, B=1, T=90, H=1, HV=1, K=16, V=16)
    args["gv"] = args["gv"].clone()
    args["gv"][0, 40, 0, 3] = -70.0
    check(name, 32, args)


def test_zero_value_decay_is_the_plain_op():
    """``gv = 0`` gives what the op without ``gv`` gives (the VALUE_DECAY kernels against the others)."""
    args = inputs("dplr_delta_rule", B=1, T=40, H=1, HV=1, K=16, V=16, chunk_size=32)
    with_zero = op("dplr_delta_rule", "chunk")(**dict(args, gv=torch.zeros_like(args["gv"]))).output
    without = op("dplr_delta_rule", "chunk")(**{k: x for k, x in args.items() if k != "gv"}).output
    torch.testing.assert_close(with_zero, without, rtol=1e-5, atol=1e-6)


def test_auto_backend_runs_gv_only_once_checked_on_a_gpu():
    """``DPLR_BACKEND=auto`` runs no gv call on the Triton kernels, forward or backward, chunked
    or recurrent, before ``VALUE_DECAY_CHECKED_ON_GPU`` says the GPU check passed."""
    from dplr import triton as triton_path
    from dplr.triton import chunk, recurrent

    for chunk_size, module in ((64, chunk), (triton_path.RECURRENT_CHUNK, recurrent)):
        assert triton_path.value_decay_checked(chunk_size) == module.VALUE_DECAY_CHECKED_ON_GPU
        expected = module.BACKWARD_CHECKED_ON_GPU and module.VALUE_DECAY_CHECKED_ON_GPU
        assert triton_path.has_backward(chunk_size, value_decay=True) == expected
        assert triton_path.has_backward(chunk_size, value_decay=True, checked_on_gpu=False)
