from __future__ import annotations

import torch

from dplr import chunk_delta_rule
from dplr.testing import make_inputs
from tests.helpers import TOL, run_and_compare


def test_negative_eigenvalues():
    """beta in [0, 2): the transition I - beta k kᵀ may reflect; still exact against the reference."""
    args = make_inputs("delta_rule", B=1, T=80, H=2, K=16, V=16, dtype=torch.float32,
                       use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)  # fmt: skip
    run_and_compare("delta_rule", "chunk", args, TOL[torch.float32])
    plain = dict(args, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, beta=2 * torch.sigmoid(args["beta"]))
    torch.testing.assert_close(chunk_delta_rule(**args).output, chunk_delta_rule(**plain).output)
