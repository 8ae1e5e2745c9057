"""KDA's options: each in-kernel option equals applying it by hand before the op."""

from __future__ import annotations

import pytest
import torch

from dplr import chunk_kda, fused_recurrent_kda
from dplr.preprocess import kda_gate, l2norm
from dplr.testing import make_inputs
from tests.helpers import TOL, run_and_compare


@pytest.mark.parametrize("op", [chunk_kda, fused_recurrent_kda])
@pytest.mark.parametrize("lower_bound,with_A", [(None, True), (-5.0, True), (-5.0, False)])
def test_gate_in_kernel_equals_gate_by_hand(op, lower_bound, with_A):
    args = make_inputs("kda", B=1, T=40, H=2, HV=4, K=16, V=8, dtype=torch.float64, use_gate_in_kernel=True)
    if not with_A:
        args["A_log"] = None
    fused = op(**args, lower_bound=lower_bound, output_final_state=True)
    g = kda_gate(args["g"], args["A_log"], args["dt_bias"], lower_bound)
    manual = {k: v for k, v in args.items() if k not in ("use_gate_in_kernel", "A_log", "dt_bias")}
    by_hand = op(**dict(manual, g=g), output_final_state=True)
    torch.testing.assert_close(fused.output, by_hand.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.final_state, by_hand.final_state, rtol=1e-12, atol=1e-12)


def test_l2norm_and_beta_sigmoid_in_kernel():
    args = make_inputs("kda", B=1, T=40, H=2, HV=2, K=16, V=8, dtype=torch.float64, use_qk_l2norm_in_kernel=True,
                       use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)  # fmt: skip
    fused = chunk_kda(**args)
    plain = {k: v for k, v in args.items() if not k.startswith(("use_", "allow_"))}
    plain.update(q=l2norm(args["q"]), k=l2norm(args["k"]), beta=2 * torch.sigmoid(args["beta"]))
    torch.testing.assert_close(fused.output, chunk_kda(**plain).output, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_kernel_options_against_reference(dtype):
    """Gradients reach A_log and dt_bias; bf16 inputs stay within the bf16 tolerance."""
    args = make_inputs("kda", B=1, T=70, H=2, HV=4, K=16, V=16, dtype=dtype, use_gate_in_kernel=True,
                       use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)  # fmt: skip
    errors = run_and_compare("kda", "chunk", dict(args, lower_bound=-5.0), TOL[dtype])
    assert {"dA_log", "ddt_bias"} <= set(errors)


def test_safe_gate_changes_nothing():
    args = make_inputs("kda", B=1, T=30, H=1, K=16, V=16, dtype=torch.float64)
    torch.testing.assert_close(chunk_kda(**args, safe_gate=True).output, chunk_kda(**args).output, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_l2norm_in_kernel_keeps_the_input_dtype(dtype, monkeypatch):
    """The normalised q and k reach the engine in the inputs' dtype (the Triton kernels choose
    their build from it: fp32 q/k from bf16 inputs would run the slow fp32 build)."""
    from dplr import api

    seen = {}

    def capture(problem, mode, chunk_size):
        seen.update(q=problem.q.dtype, k=problem.k.dtype)
        return problem.v.new_zeros(problem.v.shape), None

    monkeypatch.setattr(api, "_dispatch", capture)
    args = make_inputs("kda", B=1, T=8, H=1, K=16, V=8, dtype=dtype, use_qk_l2norm_in_kernel=True)
    chunk_kda(**args)
    assert seen == dict(q=dtype, k=dtype)
