"""The error catalog of issue 2 / DESIGN §5: every malformed call raises ValueError or TypeError
naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from dplr import (
    chunk_dplr_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_kda,
    chunk_rwkv7,
    chunk_simple_gla,
    fused_recurrent_kda,
)
from dplr.testing import make_inputs


def kda(**changes):
    args = make_inputs("kda", B=2, T=8, H=2, HV=4, K=8, V=8)
    args.update(changes)
    return args


CASES = [
    # (description, callable args factory, exception, fragment of the message)
    ("q rank", lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
    ("q not a tensor", lambda a: a.update(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q integer", lambda a: a.update(q=a["q"].long()), TypeError, "q must have dtype"),
    ("k shape", lambda a: a.update(k=a["k"][:, :, :1]), ValueError, "k must have the shape of q"),
    ("k dtype", lambda a: a.update(k=a["k"].double()), TypeError, "k must have the dtype of q"),
    ("v batch", lambda a: a.update(v=a["v"][:1]), ValueError, "v must have shape [B, T, HV, V]"),
    ("v dtype", lambda a: a.update(v=a["v"].double()), TypeError, "v must have the dtype of q"),
    ("v heads", lambda a: a.update(v=a["v"][:, :, :3]), ValueError, "multiple of the H=2"),
    ("g shape", lambda a: a.update(g=a["g"][..., 0]), ValueError, "g must have shape [B, T, HV, K]"),
    ("g positive", lambda a: a.update(g=a["g"].abs()), ValueError, "g is a log decay and must be <= 0"),
    ("g nan", lambda a: a.update(g=a["g"].clone().fill_(float("nan"))), ValueError, "g must be finite"),
    ("g missing", lambda a: a.update(g=None), TypeError, "g must be a torch.Tensor"),
    ("beta shape", lambda a: a.update(beta=a["beta"][..., None]), ValueError, "beta must have shape [B, T, HV]"),
    ("beta integer", lambda a: a.update(beta=a["beta"].long()), TypeError, "beta must have dtype"),
    ("state shape", lambda a: a.update(initial_state=a["initial_state"][:1]), ValueError, "initial_state must have"),
    ("state dtype", lambda a: a.update(initial_state=a["initial_state"].half()), TypeError, "initial_state must"),
    ("scale type", lambda a: a.update(scale="1"), TypeError, "scale must be a number"),
    ("scale inf", lambda a: a.update(scale=float("inf")), ValueError, "scale must be finite"),
    ("chunk size", lambda a: a.update(chunk_size=48), ValueError, "chunk_size must be one of"),
    ("chunk size type", lambda a: a.update(chunk_size=64.0), TypeError, "chunk_size must be an int"),
    ("flag type", lambda a: a.update(output_final_state=1), TypeError, "output_final_state must be a bool"),
    ("neg eigval", lambda a: a.update(allow_neg_eigval=True), ValueError, "allow_neg_eigval=True requires"),
    ("gate no A_log", lambda a: a.update(use_gate_in_kernel=True), ValueError, "needs A_log"),
    (
        "A_log shape",
        lambda a: a.update(use_gate_in_kernel=True, A_log=torch.zeros(3)),
        ValueError,
        "A_log must have shape [HV]",
    ),
    (
        "dt_bias shape",
        lambda a: a.update(use_gate_in_kernel=True, A_log=torch.zeros(4), dt_bias=torch.zeros(5)),
        ValueError,
        "dt_bias must have shape [HV, K]",
    ),
    ("lower bound", lambda a: a.update(lower_bound=1.0), ValueError, "lower_bound must be a negative number"),
    ("below bound", lambda a: a.update(lower_bound=-1e-3), ValueError, "g must be >= lower_bound"),
    ("safe gate", lambda a: a.update(safe_gate=True, use_gate_in_kernel=True, A_log=torch.zeros(4)), ValueError,
     "safe_gate=True with use_gate_in_kernel=True needs lower_bound"),
]  # fmt: skip


@pytest.mark.parametrize("change,exc,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_catalog(change, exc, message):
    args = kda()
    change(args)
    with pytest.raises(exc, match=None) as info:
        chunk_kda(**args)
    assert message in str(info.value)
    if "chunk_size" not in args:  # the recurrent ops have no chunk size
        with pytest.raises(exc) as info:
            fused_recurrent_kda(**args)
        assert message in str(info.value)


def packed(**changes):
    args = make_inputs("kda", B=1, T=10, H=1, K=8, V=8, cu_seqlens=[0, 4, 10])
    args.update(changes)
    return args


CU_CASES = [
    ("2-D", dict(cu_seqlens=torch.tensor([[0, 10]])), ValueError, "cu_seqlens must be 1-D"),
    ("float", dict(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens must have dtype"),
    ("start", dict(cu_seqlens=torch.tensor([1, 4, 10])), ValueError, "cu_seqlens must start at 0"),
    ("decreasing", dict(cu_seqlens=torch.tensor([0, 6, 4, 10])), ValueError, "non-decreasing"),
    ("end", dict(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "cu_seqlens must end at T=10"),
    ("cpu copy", dict(cu_seqlens_cpu=torch.tensor([0, 10])), ValueError, "cu_seqlens_cpu must be a CPU copy"),
    ("states", dict(initial_state=torch.zeros(3, 1, 8, 8)), ValueError, "N = number of sequences"),
]


@pytest.mark.parametrize("changes,exc,message", [c[1:] for c in CU_CASES], ids=[c[0] for c in CU_CASES])
def test_cu_seqlens_catalog(changes, exc, message):
    with pytest.raises(exc) as info:
        chunk_kda(**packed(**changes))
    assert message in str(info.value)


def test_cu_seqlens_needs_batch_one():
    args = make_inputs("kda", B=2, T=10, H=1, K=8, V=8, initial_state=False)
    with pytest.raises(ValueError, match="requires B == 1"):
        chunk_kda(**args, cu_seqlens=torch.tensor([0, 10]))


def test_cu_seqlens_without_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens_cpu was given without cu_seqlens"):
        chunk_kda(**kda(cu_seqlens_cpu=torch.tensor([0, 8])))


def test_messages_use_the_callers_argument_names():
    rwkv = make_inputs("rwkv7", B=1, T=6, H=1, K=8, V=8)
    with pytest.raises(ValueError, match="w must have shape"):
        chunk_rwkv7(**dict(rwkv, w=rwkv["w"][..., :4]))
    with pytest.raises(ValueError, match="r must have 4 dimensions"):
        chunk_rwkv7(**dict(rwkv, r=rwkv["r"][0]))
    dplr_args = make_inputs("dplr_delta_rule", B=1, T=6, H=1, K=8, V=8)
    with pytest.raises(ValueError, match="gk is a log decay"):
        chunk_dplr_delta_rule(**dict(dplr_args, gk=-dplr_args["gk"]))
    with pytest.raises(TypeError, match="a must have the dtype of q"):
        chunk_dplr_delta_rule(**dict(dplr_args, a=dplr_args["a"].double()))
    with pytest.raises(ValueError, match="b must have shape"):
        chunk_dplr_delta_rule(**dict(dplr_args, b=dplr_args["b"][:, :3]))


def test_scalar_gate_shapes():
    gdn = make_inputs("gated_delta_rule", B=1, T=6, H=1, K=8, V=8)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, HV\]"):
        chunk_gated_delta_rule(**dict(gdn, g=gdn["g"][..., None]))
    sgla = make_inputs("simple_gla", B=1, T=6, H=1, K=8, V=8)
    with pytest.raises(ValueError, match="g or g_gamma, not both"):
        chunk_simple_gla(**sgla, g_gamma=torch.zeros(1))
    with pytest.raises(ValueError, match=r"g_gamma must have shape \[HV\]"):
        chunk_simple_gla(**dict(sgla, g=None), g_gamma=torch.zeros(2))


def test_positional_options_are_rejected():
    args = make_inputs("gla", B=1, T=6, H=1, K=8, V=8, initial_state=False)
    with pytest.raises(TypeError):
        chunk_gla(args["q"], args["k"], args["v"], args["g"], 0.5)
