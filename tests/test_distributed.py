"""Context parallelism (:mod:`dplr.distributed`): a sequence split over 2 and 4 gloo ranks gives
the outputs, final states and gradients of one process on the whole sequence.

Spawning processes is slow, so each world size runs every check in one spawned job (a
module-scoped fixture) and the tests read its results.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dplr.distributed as cp
from dplr.layers.common import ShortConvolution
from dplr.testing import float_tensors, make_inputs, op, rel_err
from dplr.transition import FAMILIES
from tests.helpers import TOL

SHAPE = dict(H=2, HV=4, K=16, V=8, chunk_size=16)  # grouped value heads, K != V, chunks cross ranks
KDA_OPTIONS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
GV = dict(value_decay=True)  # make_inputs draws gv [B, T, HV, V]

# Per world size: slice lengths without cu_seqlens (uneven, one rank empty for W=4) and the global
# cu_seqlens over slices of SLICE tokens: sequences inside one rank, ending or starting exactly at a
# rank boundary, spanning two ranks, spanning a whole rank (W=4), and empty ones (one on a boundary).
SLICE = 37
LAYOUTS = {
    2: dict(lengths=[37, 37], cu_seqlens=[0, 9, 9, 30, 60, 74, 74]),
    4: dict(lengths=[30, 0, 41, 20], cu_seqlens=[0, 10, 10, 37, 37, 50, 120, 125, 148, 148]),
}
# (id, family, dtype, varlen, options, initial_state)
CASES = (
    [
        (f"{name}-{str(dtype)[6:]}-{'varlen' if varlen else 'batch'}", name, dtype, varlen, {}, True)
        for name, dtype, varlen in itertools.product(FAMILIES, (torch.float64, torch.float32), (False, True))
    ]
    + [
        ("kda-options-float64-batch", "kda", torch.float64, False, KDA_OPTIONS, True),
        ("kda-options-float64-varlen", "kda", torch.float64, True, KDA_OPTIONS, True),
        ("kda-no-state-float64-varlen", "kda", torch.float64, True, {}, False),
    ]
    + [  # the value-side decay gv: q travels in the summaries, Q corrects the head's outputs
        (f"{name}-gv-float64-{'varlen' if varlen else 'batch'}", name, torch.float64, varlen, GV, True)
        for name, varlen in itertools.product(("gla", "kda", "dplr_delta_rule"), (False, True))
    ]
    + [
        ("kda-gv-strong-float32-varlen", "kda", torch.float32, True, dict(GV, gate="strong"), True),
        ("dplr_delta_rule-gv-float32-batch", "dplr_delta_rule", torch.float32, False, GV, True),
        ("gla-gv-no-state-float64-varlen", "gla", torch.float64, True, GV, False),
    ]
)


def _check(world: int, rank: int, case: tuple) -> dict:
    """One case on this rank: the relative errors of its share against the single-process run,
    and the number of collectives the context-parallel call made (forward and backward)."""
    _, name, dtype, varlen, options, with_state = case
    layout = LAYOUTS[world]
    lengths = [SLICE] * world if varlen else layout["lengths"]
    total, start = sum(lengths), sum(lengths[:rank])
    stop = start + lengths[rank]
    cu = layout["cu_seqlens"] if varlen else None
    args = make_inputs(
        name, B=1 if varlen else 2, T=total, dtype=dtype, cu_seqlens=cu, initial_state=with_state, seed=world,
        **SHAPE, **options,
    )  # fmt: skip
    names = float_tensors(args)
    token = [n for n in names if args[n].dim() >= 3 and n != "initial_state"]

    full = {n: x.detach().clone().requires_grad_(True) if n in names else x for n, x in args.items()}
    o, final = op(name, "chunk")(**full, output_final_state=with_state)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    d_final = None if final is None else torch.randn(final.shape, generator=gen, dtype=torch.float64)
    ((o.double() * do).sum() + (0 if final is None else (final.double() * d_final).sum())).backward()

    mine = {n: x.detach().clone().requires_grad_(True) if n in names else x for n, x in args.items()}
    for n in token:
        mine[n] = args[n][:, start:stop].detach().clone().requires_grad_(True)
    if with_state and not varlen and rank > 0:
        mine["initial_state"] = None  # without cu_seqlens the initial state lives on the first rank only
    counted = _count_collectives()
    o_cp, final_cp = getattr(cp, f"chunk_{name}")(**mine, output_final_state=with_state)
    loss = (o_cp.double() * do[:, start:stop]).sum()
    if final_cp is not None:
        loss = loss + (final_cp.double() * d_final).sum()
    loss.backward()
    collectives = counted()

    is_last = rank == world - 1
    errors = {"o": rel_err(o_cp.detach(), o.detach()[:, start:stop])}
    if with_state:
        errors["final_state"] = rel_err(final_cp.detach(), final.detach()) if is_last else float(final_cp is not None)
    elif final_cp is not None or (is_last and final is not None):
        errors["final_state"] = 1.0
    for n in names:
        if n in token:
            errors[f"d{n}"] = rel_err(mine[n].grad, full[n].grad[:, start:stop])
            continue
        grad = torch.zeros_like(args[n]) if mine[n] is None or mine[n].grad is None else mine[n].grad.clone()
        dist.all_reduce(grad)  # a replicated tensor: each rank holds its slice's share of the gradient
        errors[f"d{n}"] = rel_err(grad, full[n].grad)
    return dict(errors=errors, collectives=collectives, dtype=str(dtype)[6:])


def _check_halo(world: int, rank: int) -> dict:
    """A short convolution over slices, each started from the previous rank's last tokens, equals
    the convolution of the whole sequence (output, input gradient, summed weight gradient)."""
    lengths = [5, 7, 3, 9][:world]
    start = sum(lengths[:rank])
    stop = start + lengths[rank]
    gen = torch.Generator().manual_seed(3)
    conv = ShortConvolution(6, 4).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))  # the same filter on every rank
    x = torch.randn(2, sum(lengths), 6, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    whole = x.clone().requires_grad_(True)
    y, _ = conv(whole)
    dx, dw = torch.autograd.grad((y * dy).sum(), (whole, conv.weight))
    mine = x[:, start:stop].clone().requires_grad_(True)
    y_cp, _ = conv(mine, cp.previous_tokens(mine, conv.kernel_size - 1))
    dx_cp, dw_cp = torch.autograd.grad((y_cp * dy[:, start:stop]).sum(), (mine, conv.weight))
    dist.all_reduce(dw_cp)
    return {
        "y": rel_err(y_cp.detach(), y.detach()[:, start:stop]),
        "dx": rel_err(dx_cp, dx[:, start:stop]),
        "dweight": rel_err(dw_cp, dw),
    }


def _count_collectives():
    """Count the collectives made until the returned function is called (it restores them)."""
    names = ("all_gather", "reduce", "broadcast", "all_reduce", "send", "recv", "all_gather_into_tensor")
    saved = {n: getattr(dist, n) for n in names}
    count = [0]

    def wrap(fn):
        def counted(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)

        return counted

    for n, fn in saved.items():
        setattr(dist, n, wrap(fn))

    def stop() -> int:
        for n, fn in saved.items():
            setattr(dist, n, fn)
        return count[0]

    return stop


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["DPLR_BACKEND"] = "torch"
    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {case[0]: _check(world, rank, case) for case in CASES}
        results["halo"] = _check_halo(world, rank)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def spawned(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    root = tmp_path_factory.mktemp(f"cp{world}")
    mp.spawn(_worker, args=(world, str(root / "init"), str(root)), nprocs=world, join=True)
    ranks = []
    for rank in range(world):
        with open(root / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    return world, ranks


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_single_process(spawned, case):
    """Every rank's output slice and gradient slices, the last rank's final states, and the summed
    gradients of replicated tensors (initial state, A_log, dt_bias) equal the single-process run."""
    world, ranks = spawned
    tol = TOL[case[2]]
    bad = {
        f"rank{r}:{key}": f"{err:.2e}"
        for r, results in enumerate(ranks)
        for key, err in results[case[0]]["errors"].items()
        if not err <= tol
    }
    assert not bad, f"world {world}, {case[0]}: errors above {tol:.0e}: {bad}"


def test_collectives_do_not_depend_on_length(spawned):
    """Forward and backward: one all-gather each, plus one reduce and its broadcast when final states
    of sequences ending on earlier ranks travel to the last rank; the test's own all-reduces aside."""
    for results in spawned[1]:
        for case in CASES:
            _, _, _, varlen, _, with_state = case
            expected = 2 + (2 if varlen and with_state else 0)
            assert results[case[0]]["collectives"] == expected, case[0]


def test_previous_tokens_make_the_convolution_exact(spawned):
    world, ranks = spawned
    bad = {f"rank{r}:{k}": e for r, res in enumerate(ranks) for k, e in res["halo"].items() if not e <= 1e-12}
    assert not bad, f"world {world}: {bad}"


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    """A gloo group of one process, for argument checks (the default group of this process)."""
    monkeypatch.setenv("DPLR_BACKEND", "torch")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_equals_op(one_rank):
    args = make_inputs("gated_delta_rule", B=1, T=50, dtype=torch.float64, cu_seqlens=[0, 20, 20, 50], **SHAPE)
    o, final = cp.chunk_gated_delta_rule(**args, output_final_state=True)
    ref_o, ref_final = op("gated_delta_rule", "chunk")(**args, output_final_state=True)
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=1e-12, atol=1e-12)


def test_needs_process_group():
    args = make_inputs("gla", B=1, T=8, K=16, V=16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.chunk_gla(**args)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(group="world"), TypeError, "group must be"),
        (dict(cu_seqlens=torch.tensor([0, 10, 40])), ValueError, "world_size \\* T = 1 \\* 30"),
        (dict(cu_seqlens=torch.tensor([0.0, 30.0])), TypeError, "cu_seqlens must have dtype"),
        (dict(cu_seqlens=torch.tensor([0, 20, 10, 30])), ValueError, "non-decreasing"),
        (dict(B=2, cu_seqlens=torch.tensor([0, 30])), ValueError, "requires B == 1"),
        (dict(initial_state=torch.zeros(3, 4, 16, 8)), ValueError, "initial_state must have shape"),
        (dict(output_final_state=1), TypeError, "output_final_state must be a bool"),
        (dict(chunk_size=48), ValueError, "chunk_size must be one of"),
        (dict(gv=torch.zeros(1, 30, 4, 16)), ValueError, r"gv must have shape \[B, T, HV, V\] = \(1, 30, 4, 8\)"),
    ],
)
def test_argument_errors(one_rank, change, error, match):
    change = dict(change)
    args = make_inputs("kda", B=change.pop("B", 1), T=30, dtype=torch.float64, initial_state=False, **SHAPE)
    args.update(change)
    with pytest.raises(error, match=match):
        cp.chunk_kda(**args)
