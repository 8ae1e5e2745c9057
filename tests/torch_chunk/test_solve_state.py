"""The solve stage produces pseudo-values that satisfy the token recurrence, and the state pass
with the output stage reproduces the reference; checked on one chunk against a token loop."""

from __future__ import annotations

import pytest
import torch

from dplr.engine import Problem, chunk_fwd
from dplr.reference import recurrence
from dplr.testing import make_inputs
from dplr.torch_chunk.cumsum import chunk_decays
from dplr.torch_chunk.intra import intra_chunk
from dplr.torch_chunk.layout import ChunkLayout
from dplr.torch_chunk.solve import pseudo_values
from dplr.transition import ALL_TRANSITIONS, Decay, LowRank, Transition, to_general


def test_tied_pseudo_values_are_the_corrected_values():
    """Tied: P_i = beta_i (v_i - kᵢᵀ Diag(exp(g_i)) S_{i-1}), with S from the token loop."""
    gen = torch.Generator().manual_seed(0)
    C, K, V = 16, 6, 5
    k = torch.nn.functional.normalize(torch.randn(1, 1, C, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(1, 1, C, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(1, 1, C, K, generator=gen, dtype=torch.float64)
    beta = torch.rand(1, 1, C, generator=gen, dtype=torch.float64)
    S0 = torch.randn(1, 1, K, V, generator=gen, dtype=torch.float64)
    tr = Transition(Decay.CHANNEL, LowRank.TIED)
    decays = chunk_decays(g, sub=16)
    intra = intra_chunk(tr, q=k, k=k, a=None, b=None, decays=decays)
    pseudo = pseudo_values(tr, intra=intra, v=v, beta=beta)
    P = pseudo.U + pseudo.W @ S0
    S = S0[0, 0]
    for i in range(C):
        S = torch.exp(g[0, 0, i])[:, None] * S
        expected = beta[0, 0, i] * (v[0, 0, i] - k[0, 0, i] @ S)
        torch.testing.assert_close(P[0, 0, i], expected, rtol=1e-12, atol=1e-12)
        S = S + torch.outer(k[0, 0, i], expected)


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=str)
def test_every_structure_end_to_end(transition):
    """All nine (decay, low rank) combinations, not only the named ones."""
    name = {LowRank.NONE: "gla", LowRank.TIED: "kda", LowRank.GENERAL: "dplr_delta_rule"}[transition.lowrank]
    args = make_inputs(name, B=2, T=45, H=1, HV=2, K=8, V=4, dtype=torch.float64)
    g = args.get("g", args.get("gk"))
    if transition.decay is Decay.SCALAR:
        g = g[..., 0]
    elif transition.decay is Decay.NONE:
        g = None
    beta = args.get("beta")
    problem = Problem(transition, args["q"], args["k"], args["v"], g, beta, args.get("a"), args.get("b"), 0.5,
                      args["initial_state"], None)  # fmt: skip
    o, final = chunk_fwd(problem, chunk_size=16)
    gen = to_general(transition, k=args["k"], v=args["v"], g=g, beta=beta, a=args.get("a"), b=args.get("b"))
    ref = recurrence(args["q"], gen["k"], gen["v"], gen["g"], gen["a"], gen["b"], scale=0.5,
                     initial_state=args["initial_state"])  # fmt: skip
    torch.testing.assert_close(o, ref.output, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-10, atol=1e-12)


def test_layout_steps_drive_the_state_pass():
    """Sequences of different lengths leave the running prefix at different steps."""
    bounds = [0, 3, 40, 41]
    layout = ChunkLayout.build(batch=1, seq_len=41, cu_seqlens=bounds, chunk_size=16, device="cpu")
    assert layout.steps == (3, 1, 1)
