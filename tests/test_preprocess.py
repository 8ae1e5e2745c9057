"""The in-kernel options as formulas (fla-core's definitions, DESIGN §2 and REFERENCES.md)."""

from __future__ import annotations

import math

import torch

from dplr.preprocess import beta_activation, gdn_gate, kda_gate, l2norm


def test_l2norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.bfloat16)
    y = l2norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[0], torch.tensor([3 / math.sqrt(25 + 1e-6), 4 / math.sqrt(25 + 1e-6)]))
    assert torch.equal(y[1], torch.zeros(2))  # eps keeps a zero vector finite


def test_beta_activation():
    b = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.equal(beta_activation(b, sigmoid=False, allow_neg_eigval=False), b)
    torch.testing.assert_close(beta_activation(b, sigmoid=True, allow_neg_eigval=False), torch.sigmoid(b))
    torch.testing.assert_close(beta_activation(b, sigmoid=True, allow_neg_eigval=True), 2 * torch.sigmoid(b))


def test_kda_gate_softplus_form():
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    A_log = torch.randn(4, dtype=torch.float64)
    dt_bias = torch.randn(4 * 5, dtype=torch.float64)
    expected = -torch.exp(A_log)[:, None] * torch.log1p(torch.exp(f + dt_bias.view(4, 5)))
    torch.testing.assert_close(kda_gate(f, A_log, dt_bias), expected)
    assert (kda_gate(f, A_log, None) <= 0).all()


def test_kda_gate_lower_bound_form():
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    A_log = torch.randn(4, dtype=torch.float64)
    dt_bias = torch.randn(4, 5, dtype=torch.float64)
    expected = -5.0 * torch.sigmoid(torch.exp(A_log)[:, None] * (f + dt_bias))
    torch.testing.assert_close(kda_gate(f, A_log, dt_bias, -5.0), expected)
    torch.testing.assert_close(kda_gate(f, None, dt_bias, -5.0), -5.0 * torch.sigmoid(f + dt_bias))
    g = kda_gate(100 * f, A_log, dt_bias, -5.0)
    assert ((g >= -5.0) & (g <= 0)).all()


def test_gdn_gate():
    f = torch.randn(2, 3, 4, dtype=torch.float64)
    A_log = torch.randn(4, dtype=torch.float64)
    dt_bias = torch.randn(4, dtype=torch.float64)
    expected = -torch.exp(A_log) * torch.nn.functional.softplus(f + dt_bias)
    torch.testing.assert_close(gdn_gate(f, A_log, dt_bias), expected)
