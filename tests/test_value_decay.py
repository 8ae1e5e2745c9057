"""The value-side decay ``gv``: ``S_t = (Diag(exp(g_t)) + b_t a_tᵀ) S_{t-1} Diag(exp(gv_t)) + k_t v_tᵀ``.

The chunk path and the recurrent path against the fp64 token loop, forward and backward, for
the three ops that take ``gv`` and for every structure of the engine; varlen, grouped value
heads, strong gates, gradcheck, compile, the checks and the backend rule.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dplr import api
from dplr.engine import Problem, chunk_fwd
from dplr.reference import recurrence
from dplr.testing import MODES, float_tensors, make_inputs, op
from dplr.torch_recurrent import recurrent_fwd
from dplr.transition import ALL_TRANSITIONS, Decay, LowRank, to_general
from tests.helpers import TOL, VALUE_DECAY_GATE, assert_chaining, assert_packed_equals_separate, run_and_compare

NAMES = list(VALUE_DECAY_GATE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name, mode, dtype):
    """Outputs, final state and every gradient (dgv included), grouped value heads, T not a
    multiple of the chunk."""
    args = make_inputs(name, B=2, T=75, H=2, HV=4, K=16, V=16, dtype=dtype, value_decay=True)
    errors = run_and_compare(name, mode, args, TOL[dtype])
    assert "dgv" in errors


@pytest.mark.parametrize("gates", ["both", "value", "key"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_strong_gates(name, mode, gates):
    """-30..-60 per step on either side or both: finite outputs and gradients, still exact (fp32)."""
    args = make_inputs(name, B=1, T=70, H=1, HV=2, K=16, V=16, dtype=torch.float32, gate="strong", value_decay=True)
    mild = make_inputs(name, B=1, T=70, H=1, HV=2, K=16, V=16, dtype=torch.float32, value_decay=True)
    if gates == "value":
        args[VALUE_DECAY_GATE[name]] = mild[VALUE_DECAY_GATE[name]]
    elif gates == "key":
        args["gv"] = mild["gv"]
    run_and_compare(name, mode, args, TOL[torch.float32])


def test_mixed_gates_per_channel():
    """Some value channels at -60 per step beside slow ones, and gates near the sub-block
    threshold (halves of 8 tokens decaying by ~40): the exact and the fast sub-block paths meet."""
    gen = torch.Generator().manual_seed(5)
    args = make_inputs("kda", B=1, T=90, H=1, HV=2, K=16, V=16, dtype=torch.float32, value_decay=True)
    fast = torch.rand(args["gv"].shape, generator=gen) < 0.3
    args["gv"] = torch.where(fast, -60 + 30 * torch.rand(args["gv"].shape, generator=gen), args["gv"])
    args["gv"][:, 40:60] = -4.0 - 2.0 * torch.rand(1, 20, 2, 16, generator=gen)
    run_and_compare("kda", "chunk", args, TOL[torch.float32])


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=str)
def test_every_structure(transition):
    """gv on all nine (decay, low rank) structures, not only the named ones: chunk engine and
    token loop against the reference."""
    name = {LowRank.NONE: "gla", LowRank.TIED: "kda", LowRank.GENERAL: "dplr_delta_rule"}[transition.lowrank]
    args = make_inputs(name, B=2, T=45, H=1, HV=2, K=8, V=4, dtype=torch.float64, value_decay=True)
    g = args.get("g", args.get("gk"))
    g = {Decay.NONE: None, Decay.SCALAR: g[..., 0], Decay.CHANNEL: g}[transition.decay]
    structure = dataclasses.replace(transition, value_decay=True)
    problem = Problem(structure, args["q"], args["k"], args["v"], g, args.get("beta"), args.get("a"), args.get("b"),
                      0.5, args["initial_state"], None, gv=args["gv"])  # fmt: skip
    gen = to_general(structure, k=args["k"], v=args["v"], g=g, beta=args.get("beta"), a=args.get("a"),
                     b=args.get("b"), gv=args["gv"])  # fmt: skip
    ref = recurrence(args["q"], gen["k"], gen["v"], gen["g"], gen["a"], gen["b"], gv=gen["gv"], scale=0.5,
                     initial_state=args["initial_state"])  # fmt: skip
    for o, final in (chunk_fwd(problem, chunk_size=16), recurrent_fwd(problem)):
        torch.testing.assert_close(o, ref.output, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(final, ref.final_state, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T,chunk_size", [(0, 64), (5, 16), (40, 32), (129, 128)])
def test_lengths_and_chunk_sizes(name, T, chunk_size):
    args = make_inputs(name, B=2, T=T, H=1, HV=1, K=16, V=8, dtype=torch.float64, value_decay=True,
                       chunk_size=chunk_size)  # fmt: skip
    run_and_compare(name, "chunk", args, TOL[torch.float64], grads=T > 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_varlen_equals_separate_calls(name, mode):
    """Packed sequences (one empty, one across several chunks) against the reference and equal
    to one call per sequence."""
    bounds = [0, 30, 30, 100, 101, 150]
    args = make_inputs(name, B=1, T=150, H=1, HV=2, K=16, V=8, dtype=torch.float64, cu_seqlens=bounds,
                       value_decay=True)  # fmt: skip
    run_and_compare(name, mode, args, TOL[torch.float64])
    assert_packed_equals_separate(name, mode, args, bounds)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_state_chaining(name, mode):
    """Two halves, the second from the first's final state, equal the whole."""
    args = make_inputs(name, B=2, T=90, H=2, HV=4, K=16, V=8, dtype=torch.float64, value_decay=True)
    assert_chaining(name, mode, args, 37)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_zero_value_decay_changes_nothing(name, mode):
    args = make_inputs(name, B=1, T=40, H=1, K=16, V=8, dtype=torch.float64, value_decay=True)
    with_zero = op(name, mode)(**dict(args, gv=torch.zeros_like(args["gv"]))).output
    without = op(name, mode)(**{k: x for k, x in args.items() if k != "gv"}).output
    torch.testing.assert_close(with_zero, without, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name, mode):
    args = make_inputs(name, B=1, T=19, H=1, HV=2, K=4, V=3, dtype=torch.float64, value_decay=True)
    if mode == "chunk":
        args["chunk_size"] = 16
    names = float_tensors(args)

    def fn(*tensors):
        return tuple(op(name, mode)(**dict(args, **dict(zip(names, tensors, strict=True))), output_final_state=True))

    inputs = tuple(args[n].detach().clone().requires_grad_(True) for n in names)
    for gate in (VALUE_DECAY_GATE[name], "gv"):  # strictly negative under the finite-difference steps
        inputs[names.index(gate)].data.clamp_(max=-0.05)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_compiled_op_carries_gv():
    """Under ``torch.compile(fullgraph=True)`` the call is one custom-op node, gv among its
    inputs; forward and gradients equal eager."""
    torch._dynamo.reset()
    args = make_inputs("kda", B=1, T=40, H=1, HV=2, K=8, V=8, dtype=torch.float32, value_decay=True)
    leaves = {k: args[k].clone().requires_grad_(True) for k in ("q", "gv")}

    def run(q, gv):
        return op("kda", "chunk")(**dict(args, q=q, gv=gv, output_final_state=True))

    o, final = torch.compile(run, fullgraph=True, backend="aot_eager")(**leaves)
    (o.square().sum() + final.sum()).backward()
    eager = {k: x.detach().clone().requires_grad_(True) for k, x in leaves.items()}
    o_ref, final_ref = run(**eager)
    (o_ref.square().sum() + final_ref.sum()).backward()
    torch.testing.assert_close(o, o_ref)
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad, eager[k].grad, msg=k)


def test_checks_name_gv():
    args = make_inputs("gla", B=1, T=10, H=1, K=8, V=4, value_decay=True)
    with pytest.raises(ValueError, match=r"gv must have shape \[B, T, HV, V\]"):
        op("gla", "chunk")(**dict(args, gv=args["gv"][..., :2]))
    with pytest.raises(ValueError, match="gv is a log decay and must be <= 0"):
        op("gla", "chunk")(**dict(args, gv=args["gv"].abs() + 0.1))
    with pytest.raises(TypeError, match="gv must have dtype"):
        op("gla", "chunk")(**dict(args, gv=args["gv"].to(torch.int32)))
    with pytest.raises(TypeError, match="gv"):  # keyword-only, on the ops that have it only
        api.chunk_delta_rule(args["q"], args["k"], args["v"], torch.ones(1, 10, 1), gv=args["gv"])


def test_backend_rule(monkeypatch):
    """CPU tensors: auto runs gv on the PyTorch path. Both Triton engines take gv too, forced or
    on CUDA tensors (tests/triton/test_value_decay.py, tests/triton/test_recurrent_value_decay.py)."""
    args = make_inputs("kda", B=1, T=10, H=1, K=8, V=4, value_decay=True)
    expected = op("kda", "chunk")(**args).output  # the tests pin DPLR_BACKEND=torch
    monkeypatch.setenv("DPLR_BACKEND", "auto")
    torch.testing.assert_close(op("kda", "chunk")(**args).output, expected, rtol=0, atol=0)
