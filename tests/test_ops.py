"""Every family, both paths (chunk and recurrent), against the fp64 recurrence (DESIGN §6)."""

from __future__ import annotations

import pytest
import torch

from dplr.testing import MODES, make_inputs, op, reference, rel_err
from dplr.transition import FAMILIES
from tests.helpers import TOL, assert_chaining, assert_packed_equals_separate, run_and_compare

FAMILY_NAMES = list(FAMILIES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_matches_reference(name, mode, dtype):
    """Outputs, final state and every gradient (initial state included), grouped value heads,
    T not a multiple of the chunk."""
    args = make_inputs(name, B=2, T=75, H=2, HV=4, K=32, V=16, dtype=dtype)
    run_and_compare(name, mode, args, TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_strong_decay(name, mode):
    """A gate of -30..-60 per step: finite outputs and gradients, still exact (fp32)."""
    args = make_inputs(name, B=1, T=70, H=1, HV=2, K=32, V=16, gate="strong", dtype=torch.float32)
    run_and_compare(name, mode, args, TOL[torch.float32])


@pytest.mark.parametrize("gate", ["normal", "strong"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_forward_without_graph(name, gate):
    """Under no_grad (inference) the chunk path skips work only a graph needs; its outputs are
    as exact, for chunks that take the whole-chunk factorisation and for those that do not."""
    args = make_inputs(name, B=1, T=150, H=1, HV=2, K=32, V=16, gate=gate, dtype=torch.float32)
    with torch.no_grad():
        o, final = op(name, "chunk")(**args, output_final_state=True)
    ref = reference(name, args)
    assert rel_err(o, ref.output) < TOL[torch.float32] and rel_err(final, ref.final_state) < TOL[torch.float32]


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("T,chunk_size", [(0, 64), (1, 64), (15, 16), (40, 64), (64, 64), (130, 32), (129, 128)])
def test_lengths_and_chunk_sizes(name, T, chunk_size):
    """T = 0, T < C, T = C, T not a multiple of C, every chunk size."""
    args = make_inputs(name, B=2, T=T, H=1, HV=1, K=16, V=16, dtype=torch.float64, chunk_size=chunk_size)
    run_and_compare(name, "chunk", args, TOL[torch.float64], grads=T > 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_varlen_equals_separate_calls(name, mode):
    """Packed sequences (one of them empty, one across several chunks) equal one call per sequence."""
    bounds = [0, 30, 30, 100, 101, 150]
    args = make_inputs(name, B=1, T=150, H=2, HV=2, K=16, V=16, dtype=torch.float64, cu_seqlens=bounds)
    run_and_compare(name, mode, args, TOL[torch.float64])
    assert_packed_equals_separate(name, mode, args, bounds)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_state_chaining(name, mode):
    """Two halves, the second started from the first's final state, equal the whole."""
    args = make_inputs(name, B=2, T=90, H=2, HV=4, K=16, V=16, dtype=torch.float64)
    assert_chaining(name, mode, args, 37)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_grouped_value_heads_equal_repeated_keys(name):
    """GVA: HV value heads over H key heads equal the same op with the keys repeated per group."""
    args = make_inputs(name, B=1, T=50, H=2, HV=6, K=16, V=8, dtype=torch.float64, output_final_state=True)
    o, final = op(name, "chunk")(**args)
    key_heads = [k for k in ("q", "r", "k", "a", "b") if k in args]
    wide = dict(args, **{k: args[k].repeat_interleave(3, dim=2) for k in key_heads})
    o_wide, final_wide = op(name, "chunk")(**wide)
    torch.testing.assert_close(o, o_wide, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_wide, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_no_initial_state_no_final_state(name):
    args = make_inputs(name, B=1, T=20, H=1, K=16, V=16, initial_state=False)
    o, final = op(name, "chunk")(**args)
    assert final is None
    ref = op(name, "chunk")(**dict(args, initial_state=torch.zeros(1, 1, 16, 16)))
    torch.testing.assert_close(o, ref.output)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chunk_equals_recurrent_fp16(name):
    """fp16 inputs run (computed in fp32) and give v's dtype."""
    args = make_inputs(name, B=1, T=33, H=1, K=16, V=16, dtype=torch.float16)
    run_and_compare(name, "chunk", args, TOL[torch.float16])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["rwkv7", "kda"])
def test_caller_autocast_is_ignored(name, mode):
    """Under the caller's bf16 autocast the PyTorch path keeps its own precision: the same
    outputs as without it (the general form's triangular solve has no bf16 kernel at all)."""
    args = make_inputs(name, B=1, T=40, H=1, K=16, V=16, dtype=torch.float32, output_final_state=True)
    o, final = op(name, mode)(**args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_cast, final_cast = op(name, mode)(**args)
    assert o_cast.dtype == o.dtype and torch.equal(o_cast, o) and torch.equal(final_cast, final)


def test_triton_probe_runs_once(monkeypatch):
    """Whether Triton is installed is probed once per process, not on every call (the probe
    searches the import path: about 0.1 ms of host time, more than a decode step's kernel)."""
    import importlib.util

    from dplr import api, decode

    args = make_inputs("gla", B=1, T=4, H=1, K=8, V=8)
    api.triton_available()  # the probe, if it has not run yet

    def probe(*_args, **_kwargs):
        raise AssertionError("find_spec called again")

    monkeypatch.setattr(importlib.util, "find_spec", probe)
    op("gla", "chunk")(**args)
    monkeypatch.setenv("DPLR_BACKEND", "auto")
    assert decode._backend(args["q"], value_decay=False) == "torch"  # a CPU tensor
