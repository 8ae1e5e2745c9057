from __future__ import annotations

import torch

from dplr import chunk_dplr_delta_rule, chunk_rwkv7, fused_recurrent_rwkv7
from dplr.testing import make_inputs


def test_rwkv7_is_dplr_with_scale_one():
    args = make_inputs("rwkv7", B=1, T=40, H=2, K=16, V=16, dtype=torch.float64)
    rwkv = chunk_rwkv7(**args, output_final_state=True)
    dplr_args = {k: v for k, v in args.items() if k not in ("r", "w")}
    same = chunk_dplr_delta_rule(**dplr_args, q=args["r"], gk=args["w"], scale=1.0, output_final_state=True)
    torch.testing.assert_close(rwkv.output, same.output, rtol=0, atol=0)
    torch.testing.assert_close(rwkv.final_state, same.final_state, rtol=0, atol=0)


def test_fused_recurrent_rwkv7_defaults():
    """As fla-core, the recurrent op returns the final state by default; scale is 1 like the chunk op."""
    args = make_inputs("rwkv7", B=1, T=20, H=1, K=8, V=8, dtype=torch.float64)
    o, final = fused_recurrent_rwkv7(**args)
    assert final is not None
    torch.testing.assert_close(o, chunk_rwkv7(**args).output, rtol=1e-10, atol=1e-12)
