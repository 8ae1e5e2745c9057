from __future__ import annotations

import pytest
import torch

from dplr import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from dplr.preprocess import gdn_gate
from dplr.testing import make_inputs


@pytest.mark.parametrize("op", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule])
def test_gate_in_kernel_equals_gate_by_hand(op):
    args = make_inputs("gated_delta_rule", B=1, T=40, H=2, HV=4, K=16, V=8, dtype=torch.float64,
                       use_gate_in_kernel=True)  # fmt: skip
    fused = op(**args)
    g = gdn_gate(args["g"], args["A_log"], args["dt_bias"])
    manual = {k: v for k, v in args.items() if k not in ("use_gate_in_kernel", "A_log", "dt_bias")}
    torch.testing.assert_close(fused.output, op(**dict(manual, g=g)).output, rtol=1e-12, atol=1e-12)
