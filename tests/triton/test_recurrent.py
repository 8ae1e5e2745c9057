"""The Triton recurrent kernels (fused_recurrent_* forward and backward, and the decode step)
against the fp64 reference. Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors,
so the shapes are tiny; the GPU benchmark (benchmarks/gpu_recurrent.py) repeats the check at
full size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
from tests.triton import DEVICE, INTERPRET

FAMILY_NAMES = list(FAMILIES)


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
    check_decode(name, slots=[4, -1, 0], T=2, state_v_first=name in ("kda", "rwkv7", "gla"), device=DEVICE)


def test_decode_single_token_fp32():
    check_decode(
        "gated_delta_rule", slots=[3, 0, -1, 5], T=1, H=2, HV=4, K=16, V=8, dtype=torch.float32, tol=1e-5, device=DEVICE
    )


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


# The interpreter accepts code that the GPU compiler rejects (plain-int globals, for one), so
# the kernels are also compiled, without a GPU, for sm_90 in a process without the interpreter.
_FLOATS = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "a": "*bf16", "b": "*bf16", "gv": "*bf16", "scale": "fp32"}
_INTS = {"num_slots", "T", "NT", "s_n", "s_h", "s_k", "s_v", "e_n", "e_h", "e_k", "e_v"}
_VARIANTS = [  # (kernel, constexprs): every DECAY, LOWRANK and VALUE_DECAY branch, and each mode
    ("fwd", dict(DECAY=0, LOWRANK=1, VALUE_DECAY=False, SAVE=2, CK=1, POOL=True, VARLEN=False, s_v=1, e_v=1)),
    ("fwd", dict(DECAY=1, LOWRANK=0, VALUE_DECAY=False, SAVE=1, CK=64, POOL=False, VARLEN=True, s_v=1, e_v=1)),
    ("fwd", dict(DECAY=2, LOWRANK=2, VALUE_DECAY=False, SAVE=0, CK=1, POOL=False, VARLEN=False, s_k=1, e_k=1)),
    ("fwd", dict(DECAY=2, LOWRANK=1, VALUE_DECAY=True, SAVE=2, CK=1, POOL=True, VARLEN=False, s_k=1, e_k=1)),
    ("fwd", dict(DECAY=2, LOWRANK=2, VALUE_DECAY=True, SAVE=1, CK=64, POOL=False, VARLEN=True, s_v=1, e_v=1)),
    ("bwd", dict(DECAY=0, LOWRANK=1, VALUE_DECAY=False, ATOMIC=True, VARLEN=False)),
    ("bwd", dict(DECAY=1, LOWRANK=0, VALUE_DECAY=False, ATOMIC=False, VARLEN=True)),
    ("bwd", dict(DECAY=2, LOWRANK=2, VALUE_DECAY=False, ATOMIC=True, VARLEN=False)),
    ("bwd", dict(DECAY=2, LOWRANK=1, VALUE_DECAY=True, ATOMIC=True, VARLEN=True)),
    ("bwd", dict(DECAY=2, LOWRANK=2, VALUE_DECAY=True, ATOMIC=False, VARLEN=False)),
    ("bwd", dict(DECAY=2, LOWRANK=0, VALUE_DECAY=True, ATOMIC=True, VARLEN=False)),
]


def compile_for_sm90() -> None:
    """Compile every variant of :data:`_VARIANTS` to a cubin (run in a subprocess)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dplr.triton.recurrent_bwd import recurrent_bwd_kernel
    from dplr.triton.recurrent_fwd import recurrent_fwd_kernel

    kernels = {"fwd": recurrent_fwd_kernel, "bwd": recurrent_bwd_kernel}
    shape = dict(H=4, HV=8, K=128, V=128, HAS_H0=True, HAS_HT=True, STORE_O=True, ACC=tl.float32)
    for kind, variant in _VARIANTS:
        fn = kernels[kind]
        tile = recurrent.tiles(
            128, 128, "decode" if variant.get("POOL") else "forward" if kind == "fwd" else "backward"
        )
        given = {**shape, "BK": tile.BK, "BV": tile.BV, "CK": 64, **variant}
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in given:
                signature[name], constexprs[(i,)] = "constexpr", given[name]
                continue
            signature[name] = _FLOATS.get(name, "i64" if name in _INTS else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]  # as the launcher specialises aligned pointers and strides
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": tile.num_warps})


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90():
    code = "from tests.triton.test_recurrent import compile_for_sm90; compile_for_sm90()"
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
