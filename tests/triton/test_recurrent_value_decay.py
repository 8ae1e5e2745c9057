"""The value-side decay ``gv`` in the Triton recurrent kernels (``VALUE_DECAY``): forward, every
gradient (dgv included) and the decode step against the fp64 reference, under
``TRITON_INTERPRET=1`` without a GPU (fp32 and fp64, tiny shapes)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dplr.testing import make_inputs
from dplr.triton import recurrent
from tests.helpers import TOL, VALUE_DECAY_GATE, run_and_compare
from tests.test_decode import check_decode
from tests.triton import DEVICE

NAMES = list(VALUE_DECAY_GATE)


def _run(name: str, args: dict, tol: float) -> dict:
    args = {key: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for key, x in args.items()}
    errors = run_and_compare(name, "recurrent", args, tol)
    assert "dgv" in errors
    return errors


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name):
    """fp32: output, final state and every gradient, grouped value heads."""
    _run(name, make_inputs(name, B=2, T=7, H=1, HV=2, K=16, V=8, value_decay=True), TOL[torch.float32])


@pytest.mark.parametrize("name", NAMES)
def test_varlen_split_columns_fp64(name, monkeypatch):
    """fp64 (exact): packed sequences, one empty; several checkpoint segments; value columns
    split over programs (each writes its own columns of dgv); masked head sizes."""
    monkeypatch.setattr(recurrent, "CHECKPOINT_EVERY", 4)
    monkeypatch.setattr(recurrent, "tiles", lambda K, V, kind: recurrent.Tiles(BK=16, BV=4, num_warps=1))
    args = make_inputs(
        name, B=1, T=11, H=1, HV=2, K=12, V=6, dtype=torch.float64, cu_seqlens=[0, 2, 2, 11], value_decay=True
    )
    _run(name, args, 1e-12)


@pytest.mark.parametrize("gates", ["both", "value"])
@pytest.mark.parametrize("name", ["kda", "dplr_delta_rule"])
def test_strong_gates(name, gates):
    """-30..-60 per step on the columns (and the rows): finite and exact in fp32."""
    args = make_inputs(name, B=1, T=6, H=1, K=16, V=8, gate="strong", value_decay=True)
    if gates == "value":
        args[VALUE_DECAY_GATE[name]] = make_inputs(name, B=1, T=6, H=1, K=16, V=8)[VALUE_DECAY_GATE[name]]
    _run(name, args, TOL[torch.float32])


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_reference(name):
    """The pool decode kernel with gv: two tokens, a padding row, intermediate states."""
    check_decode(name, slots=[4, -1, 0], T=2, state_v_first=name == "kda", value_decay=True, device=DEVICE)
