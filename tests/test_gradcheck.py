"""torch.autograd.gradcheck in fp64 on tiny shapes: the PyTorch paths' gradients are the
derivatives of their forward, for every family and every tensor argument."""

from __future__ import annotations

import pytest
import torch

from dplr.testing import MODES, float_tensors, make_inputs, op
from dplr.transition import FAMILIES


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradcheck(name, mode):
    # Gates well below 0 so that finite differences stay inside the valid range g <= 0.
    args = make_inputs(name, B=1, T=19, H=1, HV=2, K=4, V=3, dtype=torch.float64, gate="normal", chunk_size=16)
    if mode != "chunk":
        args.pop("chunk_size")
    names = float_tensors(args)

    def fn(*tensors):
        o, final = op(name, mode)(**dict(args, **dict(zip(names, tensors, strict=True))), output_final_state=True)
        return o, final

    inputs = tuple(args[n].detach().clone().requires_grad_(True) for n in names)
    gate = {"g", "gk", "w"} & set(names)
    if gate:  # keep every gate strictly negative under the finite-difference steps
        i = names.index(gate.pop())
        inputs[i].data.clamp_(max=-0.05)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name", ["kda", "gated_delta_rule"])
def test_gradcheck_in_kernel_options(name):
    """Through l2-norm, beta sigmoid (2·sigmoid) and the in-kernel gate to A_log and dt_bias."""
    options = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
                   use_gate_in_kernel=True)  # fmt: skip
    args = make_inputs(name, B=1, T=18, H=1, HV=2, K=4, V=3, dtype=torch.float64, chunk_size=16, **options)
    names = float_tensors(args)

    def fn(*tensors):
        return op(name, "chunk")(**dict(args, **dict(zip(names, tensors, strict=True))), output_final_state=True)

    inputs = tuple(args[n].detach().clone().requires_grad_(True) for n in names)
    assert {"A_log", "dt_bias"} <= set(names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
