"""The specification itself: the family table of DESIGN §2, written out independently here,
equals what the named ops compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dplr.reference import recurrence
from dplr.testing import make_inputs, op

B, T, H, HV, K, V = 2, 23, 2, 4, 8, 6


def _expand(x):  # key heads → value heads
    return x.repeat_interleave(HV // H, dim=2)


def _general_arguments(name: str, args: dict) -> dict:
    """DESIGN §2's table, row by row."""
    k, v = args["k"], args["v"]
    if name == "simple_gla":
        return dict(q=args["q"], k=k, v=v, g=args["g"])
    if name == "gla":
        return dict(q=args["q"], k=k, v=v, g=args["g"])
    if name == "delta_rule":  # b = -β k, a = k, input β k vᵀ
        beta = args["beta"][..., None]
        return dict(q=args["q"], k=k, v=beta * v, a=_expand(k), b=-beta * _expand(k))
    if name == "gated_delta_rule":  # scalar decay, a = exp(g) k
        beta, g = args["beta"][..., None], args["g"]
        return dict(q=args["q"], k=k, v=beta * v, g=g, a=torch.exp(g)[..., None] * _expand(k), b=-beta * _expand(k))
    if name == "kda":  # channel decay, a = exp(g) ⊙ k
        beta, g = args["beta"][..., None], args["g"]
        return dict(q=args["q"], k=k, v=beta * v, g=g, a=torch.exp(g) * _expand(k), b=-beta * _expand(k))
    if name == "dplr_delta_rule":
        return dict(q=args["q"], k=k, v=v, g=args["gk"], a=args["a"], b=args["b"])
    if name == "rwkv7":  # q = r, decay w, scale 1
        return dict(q=args["r"], k=k, v=v, g=args["w"], a=args["a"], b=args["b"])
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name", ["simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda", "dplr_delta_rule", "rwkv7"]
)
def test_named_op_is_the_general_recurrence(name):
    args = make_inputs(name, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=torch.float64, output_final_state=True)
    scale = 1.0 if name == "rwkv7" else K**-0.5
    expected = recurrence(**_general_arguments(name, args), scale=scale, initial_state=args["initial_state"])
    for mode in ("chunk", "recurrent"):
        got = op(name, mode)(**args)
        torch.testing.assert_close(got.output, expected.output, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.final_state, expected.final_state, rtol=1e-10, atol=1e-12)


def test_the_token_loop_by_hand():
    """Two tokens of the general recurrence written out: the undecayed state feeds aᵀS."""
    gen = torch.Generator().manual_seed(0)
    q, k, a, b = (torch.randn(1, 2, 1, 3, generator=gen, dtype=torch.float64) for _ in range(4))
    v = torch.randn(1, 2, 1, 2, generator=gen, dtype=torch.float64)
    g = -torch.rand(1, 2, 1, 3, generator=gen, dtype=torch.float64)
    S0 = torch.randn(1, 1, 3, 2, generator=gen, dtype=torch.float64)
    S = S0[0, 0]
    outs = []
    for t in range(2):
        x = a[0, t, 0] @ S
        S = torch.diag(torch.exp(g[0, t, 0])) @ S + torch.outer(b[0, t, 0], x) + torch.outer(k[0, t, 0], v[0, t, 0])
        outs.append(S.T @ (0.5 * q[0, t, 0]))
    o, final = recurrence(q, k, v, g, a, b, scale=0.5, initial_state=S0)
    torch.testing.assert_close(o[0, :, 0], torch.stack(outs), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(final[0, 0], S, rtol=1e-14, atol=1e-14)


def test_scalar_decay_broadcasts_over_channels():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 5, 1, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 5, 1, 3, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(1, 5, 1, generator=gen, dtype=torch.float64))
    scalar = recurrence(q, k, v, g)
    channel = recurrence(q, k, v, g[..., None].expand(1, 5, 1, 4))
    torch.testing.assert_close(scalar.output, channel.output, rtol=0, atol=0)


def test_empty_sequences():
    q = torch.zeros(1, 0, 1, 4, dtype=torch.float64)
    v = torch.zeros(1, 0, 2, 3, dtype=torch.float64)
    S0 = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    o, final = recurrence(q, q, v, initial_state=S0, cu_seqlens=torch.tensor([0, 0, 0]))
    assert o.shape == (1, 0, 2, 3)
    torch.testing.assert_close(final, S0)
