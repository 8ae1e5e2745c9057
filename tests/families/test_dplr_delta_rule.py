from __future__ import annotations

import pytest
import torch

from dplr import chunk_dplr_delta_rule
from dplr.testing import make_inputs


def test_lower_bound_is_a_checked_promise():
    args = make_inputs("dplr_delta_rule", B=1, T=20, H=1, K=8, V=8)
    low = float(args["gk"].min())
    o = chunk_dplr_delta_rule(**args, lower_bound=low - 1.0).output  # kept: no effect on the result
    torch.testing.assert_close(o, chunk_dplr_delta_rule(**args).output, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gk must be >= lower_bound"):
        chunk_dplr_delta_rule(**args, lower_bound=low / 2)
