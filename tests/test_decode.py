"""The state-pool decode step (dplr.decode) against the fp64 reference, on the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from dplr import decode
from dplr.testing import make_inputs, op, reference, rel_err, tensor_names
from dplr.transition import FAMILIES

FAMILY_NAMES = list(FAMILIES)


def decode_call(name: str, args: dict, pool: torch.Tensor, slots: torch.Tensor, **options) -> decode.DecodeOutput:
    """``decode_<name>`` with a family's arguments from :func:`make_inputs` (no initial state)."""
    args = dict(args)
    tensors = [args.pop(key, None) for key in tensor_names(name)]
    return getattr(decode, f"decode_{name}")(*tensors, pool, slots, **args, **options)


def check_decode(
    name: str,
    *,
    slots: list[int],
    T: int,
    P: int = 6,
    H: int = 1,
    HV: int = 2,
    K: int = 8,
    V: int = 4,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-12,
    state_v_first: bool = False,
    seed: int = 0,
    device: str = "cpu",
    **options,
) -> None:
    """Run a decode step on a random pool (on ``device``) and compare with the fp64 reference
    (on the CPU): outputs, intermediate states after every token, the written slots; untouched
    slots bit-identical, padding rows zero."""
    N = len(slots)
    args = make_inputs(name, B=N, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype, initial_state=False, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed + 1)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    pool_kv = torch.randn(P, HV, K, V, generator=gen, dtype=torch.float64).to(state_dtype)
    pool = pool_kv.transpose(-1, -2).contiguous() if state_v_first else pool_kv.clone()
    before = pool.clone()
    on_device = {key: x.to(device) if isinstance(x, torch.Tensor) else x for key, x in args.items()}
    work = pool.to(device)
    o, states = decode_call(
        name, on_device, work, torch.tensor(slots, device=device), state_v_first=state_v_first,
        return_intermediate_states=True,
    )  # fmt: skip
    o, states, pool = o.cpu(), states.cpu(), work.cpu()

    def as_kv(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2) if state_v_first else x

    assert o.shape == args["v"].shape and o.dtype == args["v"].dtype
    assert states.shape == (N, T, *pool.shape[1:]) and states.dtype == pool.dtype
    live = [n for n, s in enumerate(slots) if s >= 0]
    h0 = torch.zeros(N, HV, K, V, dtype=torch.float64)
    h0[live] = pool_kv[[slots[n] for n in live]].double()
    ref_o, ref_final = reference(name, dict(args, initial_state=h0))
    assert rel_err(o[live], ref_o[live]) <= tol
    for n in live:
        assert rel_err(as_kv(pool[slots[n]]), ref_final[n]) <= tol
    for t in range(1, T + 1):
        prefix = {key: x[:, :t] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x for key, x in args.items()}
        _, ref_state = reference(name, dict(prefix, initial_state=h0))
        assert rel_err(as_kv(states[live, t - 1]), ref_state[live]) <= tol
    padding = [n for n, s in enumerate(slots) if s < 0]
    assert not o[padding].any() and not states[padding].any()
    untouched = sorted(set(range(P)) - {slots[n] for n in live})
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("state_v_first", [False, True], ids=["kv", "vk"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_decode_matches_reference(name, state_v_first):
    """Three new tokens per sequence (a verify step), grouped value heads, a padding row."""
    check_decode(name, slots=[4, -1, 0, 2], T=3, H=1, HV=2, state_v_first=state_v_first)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_decode_single_token_fp32(name):
    """The common case: one token, fp32 inputs and pool."""
    check_decode(name, slots=[5, 1, -1], T=1, H=2, HV=4, K=16, V=8, dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("name", ["gla", "kda", "dplr_delta_rule"])
def test_decode_value_decay(name):
    """gv (the value-side decay) as in the fused recurrent op: a verify step, grouped value heads,
    a padding row; kda in the transposed layout."""
    check_decode(name, slots=[4, -1, 0, 2], T=3, H=1, HV=2, state_v_first=name == "kda", value_decay=True)


def test_decode_value_decay_strong_fp32():
    """gv and g of -30..-60 per step: finite and exact in fp32."""
    check_decode("kda", slots=[1, 3], T=2, K=16, V=8, dtype=torch.float32, tol=1e-5, gate="strong", value_decay=True)


@pytest.mark.parametrize(
    "name,options",
    [
        ("kda", dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True)),
        ("gated_delta_rule", dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)),
        ("delta_rule", dict(use_qk_l2norm_in_kernel=True)),
    ],
    ids=["kda", "gdn", "delta"],
)
def test_decode_in_kernel_options(name, options):
    """The ops' in-kernel options (l2-norm, beta sigmoid, gates) mean the same in decode."""
    check_decode(name, slots=[2, 0], T=2, **options)


@pytest.mark.parametrize("name,value_decay", [("kda", False), ("rwkv7", False), ("dplr_delta_rule", True)])
def test_decode_equals_fused_recurrent(name, value_decay):
    """Decoding T tokens one step at a time equals the fused recurrent op over the T tokens."""
    T, N = 4, 3
    args = make_inputs(name, B=N, T=T, H=2, HV=2, K=8, V=8, dtype=torch.float64, value_decay=value_decay)
    h0 = args.pop("initial_state")
    o_ref, final_ref = op(name, "recurrent")(**dict(args, initial_state=h0, output_final_state=True))
    pool = torch.zeros(N + 2, 2, 8, 8, dtype=torch.float64)
    slots = torch.tensor([3, 0, 4])
    pool[slots] = h0
    outs = []
    for t in range(T):
        tokens = {
            key: x[:, t : t + 1] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x for key, x in args.items()
        }
        outs.append(decode_call(name, tokens, pool, slots).output)
    torch.testing.assert_close(torch.cat(outs, dim=1), o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool[slots], final_ref, rtol=1e-12, atol=1e-12)


def test_accept_tokens_rolls_back():
    """After a verify step, accept_tokens leaves each slot at its last accepted token's state."""
    T, slots = 3, [1, -1, 3]
    args = make_inputs("kda", B=3, T=T, H=1, HV=2, K=8, V=4, dtype=torch.float64, initial_state=False)
    pool = torch.randn(5, 2, 8, 4, dtype=torch.float64)
    start = pool.clone()
    index = torch.tensor(slots)
    _, states = decode_call("kda", args, pool, index, return_intermediate_states=True)
    decode.accept_tokens(pool, index, states, torch.tensor([2, 1, 1]))
    one_token = {key: x[:, :2] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x for key, x in args.items()}
    replay = start.clone()
    decode_call("kda", one_token, replay, torch.tensor([1, -1, -1]))
    assert torch.equal(pool[1], replay[1])
    assert torch.equal(pool[3], states[2, 0])
    assert torch.equal(pool[[0, 2, 4]], start[[0, 2, 4]])
    with pytest.raises(ValueError, match="num_accepted must lie in"):
        decode.accept_tokens(pool, index, states, torch.tensor([0, 1, 1]))


def _errors_case():
    args = make_inputs("gated_delta_rule", B=2, T=1, H=1, K=8, V=4, initial_state=False)
    return args, torch.zeros(4, 1, 8, 4)


@pytest.mark.parametrize(
    "slots,match",
    [
        ([0, 4], r"state_indices must be pool slots in \[0, 4\) or -1 for padding, got 4 at position 1"),
        ([-2, 1], r"state_indices must be pool slots in \[0, 4\) or -1 for padding, got -2 at position 0"),
        ([2, 2], "must not name a pool slot twice"),
    ],
)
def test_bad_slots_are_errors_and_leave_the_pool(slots, match):
    args, pool = _errors_case()
    with pytest.raises(ValueError, match=match):
        decode_call("gated_delta_rule", args, pool, torch.tensor(slots))
    assert not pool.any()


def test_argument_errors_name_the_argument():
    args, pool = _errors_case()
    slots = torch.tensor([0, 1])
    with pytest.raises(
        ValueError, match=r"state_pool must have shape \[P, HV, K, V\] = \(P, 1, 8, 4\), got \(4, 1, 4, 8\)"
    ):
        decode_call("gated_delta_rule", args, pool.transpose(-1, -2), slots)
    with pytest.raises(ValueError, match=r"state_pool must have shape \[P, HV, V, K\]"):
        decode_call("gated_delta_rule", args, pool, slots, state_v_first=True)
    with pytest.raises(TypeError, match="state_pool must have dtype in"):
        decode_call("gated_delta_rule", args, pool.half(), slots)
    with pytest.raises(TypeError, match="state_indices must have dtype in"):
        decode_call("gated_delta_rule", args, pool, slots.float())
    with pytest.raises(ValueError, match=r"state_indices must have shape \[N\] = \(2,\)"):
        decode_call("gated_delta_rule", args, pool, slots[:1])
    with pytest.raises(TypeError, match="return_intermediate_states must be a bool"):
        decode_call("gated_delta_rule", args, pool, slots, return_intermediate_states=1)
    with pytest.raises(ValueError, match="beta must have shape"):
        decode_call("gated_delta_rule", dict(args, beta=args["beta"][:, :, None]), pool, slots)


def test_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces a decode step (the op mutates the pool in place)."""
    args = make_inputs("kda", B=2, T=1, H=1, HV=2, K=8, V=4, initial_state=False)
    pool, slots = torch.randn(3, 2, 8, 4), torch.tensor([2, 0])
    eager_pool = pool.clone()
    eager = decode_call("kda", args, eager_pool, slots).output

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, v, g, beta, pool, slots):
        return decode.decode_kda(q, k, v, g, beta, pool, slots).output

    compiled = step(args["q"], args["k"], args["v"], args["g"], args["beta"], pool, slots)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(pool, eager_pool)
