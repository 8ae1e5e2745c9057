"""Time-invariant transitions: gates and rank-one vectors given as stride-0 broadcasts of a
per-head parameter (``w.expand(B, T, H, K)``) are accepted, consumed as views, and give the
results and gradients of the same tensors materialised, the gradients in the parameter's shape."""

from __future__ import annotations

import pytest
import torch

from dplr.testing import MODES, make_inputs, op, rel_err
from dplr.torch_chunk.layout import ChunkLayout
from tests.helpers import TOL

# Which arguments of each op are made time-invariant (value_decay: with gv).
CASES = {
    "dplr_delta_rule": (("gk", "a", "b"), False),
    "kda": (("g", "beta"), False),
    "gated_delta_rule": (("g",), False),
    "gla": (("g", "gv"), True),
}


def split(args: dict, names) -> tuple[dict, dict]:
    """Per-head parameters (token 0 of sequence 0 of each named tensor), as leaves."""
    params = {n: args[n][0, 0].detach().clone().requires_grad_(True) for n in names}
    return params, {n: args[n].shape for n in names}


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_broadcast_equals_materialised(name, mode, dtype, varlen):
    names, value_decay = CASES[name]
    shape = dict(B=1, T=70, cu_seqlens=[0, 20, 20, 70]) if varlen else dict(B=2, T=70)
    args = make_inputs(name, **shape, H=2, HV=4, K=16, V=8, dtype=dtype, value_decay=value_decay)
    params, shapes = split(args, names)
    copies = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}

    broadcast = {n: p.expand(shapes[n]) for n, p in params.items()}
    assert all(0 in x.stride() for x in broadcast.values())
    dense = {n: p.expand(shapes[n]).contiguous() for n, p in copies.items()}  # the per-token tensors

    o, final = op(name, mode)(**dict(args, **broadcast, output_final_state=True))
    o_ref, final_ref = op(name, mode)(**dict(args, **dense, output_final_state=True))
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: TOL[torch.bfloat16]}[dtype]
    assert rel_err(o.detach(), o_ref.detach()) <= tol and rel_err(final.detach(), final_ref.detach()) <= tol

    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    torch.autograd.backward((o, final), (do, torch.ones_like(final)))
    torch.autograd.backward((o_ref, final_ref), (do, torch.ones_like(final_ref)))
    for n, p in params.items():
        assert p.grad.shape == p.shape, n  # autograd sums over the broadcast B, T back to the parameter
        assert torch.isfinite(p.grad).all(), n
        assert rel_err(p.grad, copies[n].grad) <= tol, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_keeps_broadcast_views(dtype):
    """The chunk gather of a stride-0 input is a view of the parameter (same dtype) or of its
    distinct elements cast once (fp32 from bf16), never a tensor per token."""
    w = -torch.rand(4, 16).to(dtype)
    x = w.expand(2, 64, 4, 16)
    layout = ChunkLayout.build(batch=2, seq_len=64, cu_seqlens=None, chunk_size=16, device="cpu")
    chunks = layout.gather(x, torch.float32)
    assert chunks.shape == (8, 4, 16, 16) and chunks.stride()[0] == 0 and chunks.stride()[2] == 0
    assert chunks.untyped_storage().nbytes() == w.numel() * 4
    if dtype == torch.float32:
        assert chunks.data_ptr() == w.data_ptr()
    torch.testing.assert_close(chunks, layout.gather(x.contiguous(), torch.float32), rtol=0, atol=0)


def test_value_checks_read_broadcasts():
    """Value checks on a broadcast gate look at its distinct elements and still name it."""
    args = make_inputs("dplr_delta_rule", B=2, T=30, H=2, K=8, V=8)
    bad = args["gk"][0, 0].clone()
    bad[1, 3] = 0.5
    with pytest.raises(ValueError, match=r"gk is a log decay and must be <= 0, got a maximum of 0\.5"):
        op("dplr_delta_rule", "chunk")(**dict(args, gk=bad.expand(args["gk"].shape)))
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="gk must be finite"):
        op("dplr_delta_rule", "chunk")(**dict(args, gk=bad.expand(args["gk"].shape)))
    low = float(args["gk"].min())
    with pytest.raises(ValueError, match="gk must be >= lower_bound"):
        op("dplr_delta_rule", "chunk")(**dict(args, gk=args["gk"][0, 0].expand(args["gk"].shape), lower_bound=low / 4))
