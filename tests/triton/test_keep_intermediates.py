"""DPLR_KEEP_INTERMEDIATES=1: the backward reads what the forward kept, with the same results."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dplr.testing import float_tensors, make_inputs, op
from dplr.triton import chunk
from tests.triton import DEVICE


def _run(name: str, args: dict, keep: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """Output, final state and every gradient, and how many times the per-chunk quantities were made."""
    monkeypatch.setenv("DPLR_KEEP_INTERMEDIATES", "1" if keep else "0")
    made = []
    real_prepare = chunk.prepare
    monkeypatch.setattr(chunk, "prepare", lambda *a, **k: made.append(1) or real_prepare(*a, **k))
    leaves = {n: x.detach().clone().requires_grad_(n in float_tensors(args)) if torch.is_tensor(x) else x
              for n, x in args.items()}  # fmt: skip
    o, final = op(name, "chunk")(**leaves)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen).to(o)
    dfinal = torch.randn(final.shape, generator=gen).to(final)
    ((o * do).sum() + (final * dfinal).sum()).backward()
    grads = [leaves[n].grad for n in float_tensors(args)]
    return [o.detach(), final.detach(), *grads], len(made)


@pytest.mark.parametrize(
    "name, value_decay",
    [("kda", False), ("dplr_delta_rule", False), ("gla", False), ("gated_delta_rule", False), ("kda", True),
     ("dplr_delta_rule", True)],
)  # fmt: skip
def test_kept_intermediates_give_the_same_gradients(name, value_decay, monkeypatch):
    args = make_inputs(name, B=1, T=45, H=1, HV=2, K=16, V=16, dtype=torch.float32, device=DEVICE,
                       cu_seqlens=[0, 13, 13, 45], output_final_state=True, chunk_size=16,
                       value_decay=value_decay)  # fmt: skip
    recomputed, made_recomputing = _run(name, args, False, monkeypatch)
    kept, made_keeping = _run(name, args, True, monkeypatch)
    assert (made_recomputing, made_keeping) == (2, 1)  # the backward made none of its own
    for a, b in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_no_gradient_no_keeping(monkeypatch):
    """A call that needs no gradient keeps nothing (it runs the plain forward)."""
    monkeypatch.setenv("DPLR_KEEP_INTERMEDIATES", "1")
    called = []
    monkeypatch.setattr(chunk, "forward_keeping", lambda *a, **k: called.append(1))
    args = make_inputs("kda", B=1, T=20, H=1, HV=1, K=16, V=16, dtype=torch.float32, device=DEVICE, chunk_size=16)
    with torch.no_grad():
        op("kda", "chunk")(**args)
    assert not called


def test_kept_states_freed_before_the_keys_kernel(monkeypatch):
    """The kept chunk states are released once the values kernel has read them, as the
    recomputed ones are: nothing holds them while the keys kernel's outputs exist."""
    import weakref

    monkeypatch.setenv("DPLR_KEEP_INTERMEDIATES", "1")
    refs, alive = [], []
    real_keeping, real_keys = chunk.forward_keeping, chunk.chunk_grad_keys_kernel

    def keeping(*a, **k):
        o, final, kept = real_keeping(*a, **k)
        refs.append(weakref.ref(kept.states))
        return o, final, kept

    class Keys:  # the keys kernel, noting whether the kept states still exist when it launches
        def __getitem__(self, grid):
            alive.append(refs[0]() is not None)
            return real_keys[grid]

    monkeypatch.setattr(chunk, "forward_keeping", keeping)
    monkeypatch.setattr(chunk, "chunk_grad_keys_kernel", Keys())
    args = make_inputs("kda", B=1, T=20, H=1, HV=1, K=16, V=16, dtype=torch.float32, device=DEVICE, chunk_size=16)
    for name in float_tensors(args):
        args[name].requires_grad_(True)
    o, _ = op("kda", "chunk")(**args)
    o.sum().backward()
    assert alive == [False]
