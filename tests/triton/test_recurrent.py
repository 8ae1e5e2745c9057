"""The Triton recurrent kernels (fused_recurrent_* forward and backward, and the decode step)
against the fp64 reference. Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors,
so the shapes are tiny; the GPU benchmark (benchmarks/gpu_recurrent.py) repeats the check at
full size."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dplr import settings
from dplr.engine import Problem
from dplr.testing import make_inputs, op
from dplr.transition import FAMILIES
from dplr.triton import recurrent
from tests.helpers import TOL, run_and_compare
from tests.test_decode import check_decode
from tests.triton import INTERPRET

FAMILY_NAMES = list(FAMILIES)
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("DPLR_BACKEND", "triton")


def _run(name: str, args: dict, tol: float, *, grads: bool = True) -> dict:
    args = {key: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for key, x in args.items()}
    return run_and_compare(name, "recurrent", args, tol, grads=grads)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_matches_reference(name):
    """fp32: output, final state and every gradient (initial state included), grouped value heads."""
    _run(name, make_inputs(name, B=2, T=7, H=1, HV=2, K=16, V=8), TOL[torch.float32])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_varlen_checkpoints_fp64(name, monkeypatch):
    """fp64 (exact): packed sequences, one empty; several checkpoint segments per sequence;
    head sizes that are not powers of two (masked tiles)."""
    monkeypatch.setattr(recurrent, "CHECKPOINT_EVERY", 4)
    args = make_inputs(name, B=1, T=11, H=1, HV=2, K=12, V=6, dtype=torch.float64, cu_seqlens=[0, 2, 2, 11])
    _run(name, args, 1e-12)


@pytest.mark.parametrize("name", ["kda", "dplr_delta_rule"])
def test_split_value_columns_deterministic(name, monkeypatch):
    """V split over several programs: partial gradients summed by atomics or, with
    DPLR_DETERMINISTIC=1, per-block slices summed in order (bit-reproducible)."""
    monkeypatch.setattr(recurrent, "tiles", lambda K, V, kind: recurrent.Tiles(BK=16, BV=4, num_warps=1))
    args = make_inputs(name, B=1, T=5, H=1, HV=2, K=16, V=8)
    monkeypatch.setenv("DPLR_DETERMINISTIC", "1")
    assert settings.deterministic()
    first = _run(name, args, TOL[torch.float32])
    assert _run(name, args, TOL[torch.float32]) == first
    monkeypatch.setenv("DPLR_DETERMINISTIC", "0")
    _run(name, args, TOL[torch.float32])


@pytest.mark.parametrize("name", ["kda", "gated_delta_rule", "rwkv7"])
def test_strong_decay(name):
    """A gate of -30..-60 per step: finite and exact, forward and backward."""
    _run(name, make_inputs(name, B=1, T=6, H=1, K=16, V=8, gate="strong"), TOL[torch.float32])


def test_empty_sequences():
    """T = 0 gives an empty output and the initial state back; its gradient passes through."""
    _run("kda", make_inputs("kda", B=2, T=0, H=1, K=8, V=8), TOL[torch.float32], grads=False)
    args = make_inputs("gla", B=1, T=0, H=1, K=8, V=8, device=DEVICE, cu_seqlens=[0, 0, 0], output_final_state=True)
    args["initial_state"].requires_grad_(True)
    o, final = op("gla", "recurrent")(**args)
    assert o.shape == (1, 0, 1, 8) and torch.equal(final, args["initial_state"])
    d_final = torch.randn_like(final)
    final.backward(d_final)
    assert torch.equal(args["initial_state"].grad, d_final)


def test_head_dim_limit():
    args = make_inputs("gla", B=1, T=2, H=1, K=512, V=8, device=DEVICE)
    with pytest.raises(ValueError, match="head dimensions up to 256"):
        op("gla", "recurrent")(**args)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_decode_matches_reference(name):
    """The pool decode kernel: two tokens, a padding row, intermediate states, both layouts."""
    check_decode(name, slots=[4, -1, 0], T=2, state_v_first=name in ("kda", "rwkv7", "gla"))


def test_decode_single_token_fp32():
    check_decode("gated_delta_rule", slots=[3, 0, -1, 5], T=1, H=2, HV=4, K=16, V=8, dtype=torch.float32, tol=1e-5)


def test_decode_out_of_range_slot_is_not_written():
    """Unchecked (as on a GPU without DPLR_CHECK), a slot past the pool is treated as padding:
    nothing outside the pool is read or written, and the row's output is zero."""
    args = make_inputs("gla", B=2, T=1, H=1, K=8, V=4, device=DEVICE, initial_state=False)
    problem = Problem(
        transition=FAMILIES["gla"].transition, q=args["q"], k=args["k"], v=args["v"], g=args["g"],
        beta=None, a=None, b=None, scale=0.5, initial_state=None, cu_seqlens=None,
    )  # fmt: skip
    storage = torch.randn(6, 1, 8, 4, device=DEVICE)
    before = storage.clone()
    pool = storage[1:4]  # slot 3 of this view would be storage[4]
    o, _ = recurrent.decode(problem, pool, torch.tensor([3, 1], device=DEVICE), state_v_first=False, intermediate=False)
    assert not o[0].any()
    changed = [i for i in range(6) if not torch.equal(storage[i], before[i])]
    assert changed == [2]
