"""Shape fuzz: any length (0..300), chunk size, head count, GVA ratio, head dims, varlen split."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dplr.testing import make_inputs, op, reference, rel_err
from dplr.transition import FAMILIES


@st.composite
def calls(draw):
    name = draw(st.sampled_from(list(FAMILIES)))
    T = draw(st.integers(0, 300))
    H = draw(st.integers(1, 2))
    shape = dict(
        T=T, H=H, HV=H * draw(st.sampled_from([1, 2, 3])), K=draw(st.sampled_from([1, 4, 16, 24])),
        V=draw(st.sampled_from([1, 5, 16])),
    )  # fmt: skip
    cu = None
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, T), max_size=4)))
        cu = [0, *cuts, T]
    B = 1 if cu is not None else draw(st.integers(1, 2))
    chunk = draw(st.sampled_from([16, 32, 64, 128]))
    gate = draw(st.sampled_from(["normal", "strong", "weak"]))
    return name, dict(B=B, cu_seqlens=cu, gate=gate, **shape), chunk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls(), st.integers(0, 2**16))
def test_chunk_matches_reference_on_any_shape(call, seed):
    name, shape, chunk = call
    args = make_inputs(name, dtype=torch.float64, seed=seed, output_final_state=True, **shape)
    o, final = op(name, "chunk")(**args, chunk_size=chunk)
    ref_o, ref_final = reference(name, args)
    assert o.shape == ref_o.shape and final.shape == ref_final.shape
    assert rel_err(o, ref_o) < 1e-10
    assert rel_err(final, ref_final) < 1e-10
