from __future__ import annotations

import pytest
import torch

from dplr import chunk_simple_gla, fused_recurrent_simple_gla
from dplr.reference import recurrence
from dplr.testing import make_inputs


@pytest.mark.parametrize("op", [chunk_simple_gla, fused_recurrent_simple_gla])
def test_g_gamma_is_a_constant_gate(op):
    args = make_inputs("simple_gla", B=2, T=50, H=2, HV=4, K=8, V=8, dtype=torch.float64)
    gamma = -torch.rand(4, dtype=torch.float64)
    with_gamma = op(**dict(args, g=None), g_gamma=gamma, output_final_state=True)
    expanded = op(**dict(args, g=gamma.expand(2, 50, 4).clone()), output_final_state=True)
    torch.testing.assert_close(with_gamma.output, expanded.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_gamma.final_state, expanded.final_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", [chunk_simple_gla, fused_recurrent_simple_gla])
def test_no_gate_is_linear_attention(op):
    args = make_inputs("simple_gla", B=1, T=70, H=1, K=8, V=8, dtype=torch.float64)
    o, final = op(**dict(args, g=None), output_final_state=True)
    ref = recurrence(args["q"], args["k"], args["v"], initial_state=args["initial_state"])
    torch.testing.assert_close(o, ref.output, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-10, atol=1e-12)
