"""The compute account is checked against what runs: FlopCounterMode and an exp counter on every
stage of the PyTorch chunk path, forward and backward, for every structure and chunk size."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dplr import api
from dplr.accounting import (
    DEVICES,
    Shape,
    StageCost,
    account,
    attention_cost,
    build,
    chart,
    floor,
    fused_floor,
    measure_device,
    recurrent_cost,
    staged_floor,
    torch_plan,
    with_measured,
)
from dplr.accounting.cli import parse_shape
from dplr.accounting.model import SUB, forward_stages, tensors
from dplr.accounting.torch_plan import offsets
from dplr.cli import main
from dplr.testing import _with_defaults, make_inputs
from dplr.torch_chunk.cumsum import chunk_decays
from dplr.torch_chunk.intra import intra_chunk
from dplr.torch_chunk.layout import ChunkLayout
from dplr.torch_chunk.output import chunk_output
from dplr.torch_chunk.solve import pseudo_values
from dplr.torch_chunk.state import state_pass
from dplr.torch_recurrent import recurrent_fwd
from dplr.transition import ALL_TRANSITIONS, FAMILIES, Decay, LowRank

CHUNK_SIZES = (16, 32, 64, 128)
IDS = [f"{t.decay.value}-{t.lowrank.value}" for t in ALL_TRANSITIONS]
# Every structure at C = 16 (one sub-block) and 64 (two merge levels); the channel-decay low-rank
# structures also at 32 and 128 (one and three levels). Each case runs every stage both ways.
COUNTED = [(t, C) for t in ALL_TRANSITIONS for C in (16, 64)] + [
    (t, C) for t in ALL_TRANSITIONS if t.decay is Decay.CHANNEL and t.lowrank is not LowRank.NONE for C in (32, 128)
]


class ExpCounter(TorchDispatchMode):
    """Elements produced by ``aten.exp``."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.exp:
            self.count += out.numel()
        return out


def chunked_inputs(transition, *, C: int, B: int = 2, HV: int = 2, K: int = 32, V: int = 16, seed: int = 0):
    """Inputs as ``engine.chunk_fwd`` hands them to the stages: ``[M, HV, C, ·]``, T not a
    multiple of C. Gates are mild (-0.5..0) so no sub-block takes the data-dependent exact redo."""
    T = C + 5
    layout = ChunkLayout.build(batch=B, seq_len=T, cu_seqlens=None, chunk_size=C, device="cpu")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(B, T, *shape, generator=gen)

    def chunk(x, dtype=torch.float32):
        return layout.gather(x, dtype)

    general, tied = transition.lowrank is LowRank.GENERAL, transition.lowrank is LowRank.TIED
    g = {Decay.NONE: None, Decay.SCALAR: (HV,), Decay.CHANNEL: (HV, K)}[transition.decay]
    inputs = dict(
        q=chunk(rand(HV, K)),
        k=chunk(F.normalize(rand(HV, K), dim=-1)),
        v=chunk(rand(HV, V)),
        a=chunk(rand(HV, K)) if general else None,
        b=chunk(rand(HV, K)) if general else None,
        beta=chunk(torch.rand(B, T, HV, generator=gen)) if tied else None,
        g=None if g is None else chunk(-0.5 * torch.rand(B, T, *g, generator=gen)),
        initial_state=torch.randn(B, HV, K, V, generator=gen),
    )
    return layout, inputs


def _leaf(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return type(x)(*(_leaf(t) for t in x))
    return x.detach().requires_grad_(True)


def _tensors(x):
    if x is None:
        return []
    if isinstance(x, tuple):
        return [t for f in x for t in _tensors(f)]
    return [x]


def run_stages(transition, layout, inputs) -> dict:
    """Each stage as ``engine.chunk_fwd`` calls it, on leaf inputs: forward FLOPs and exps, then
    the backward of that stage alone (autograd from its outputs to its inputs)."""
    found = {}

    def stage(name, fn, *args):
        args = [_leaf(a) for a in args]
        with FlopCounterMode(display=False) as fwd, ExpCounter() as exps:
            result = fn(*args)
        outs = [t for t in _tensors(result) if t.requires_grad]
        leaves = [t for a in args for t in _tensors(a)]
        gen = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        with FlopCounterMode(display=False) as bwd:
            if outs:
                torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
        found[name] = dict(fwd=fwd.get_total_flops(), bwd=bwd.get_total_flops(), exps=exps.count, result=result)
        return result

    x, t = inputs, transition
    C = layout.chunk_size
    decays = stage("cumsum", lambda g: chunk_decays(g, sub=min(SUB, C)), x["g"])
    intra = stage(
        "intra",
        lambda q, k, a, b, d: intra_chunk(t, q=q, k=k, a=a, b=b, decays=d),
        x["q"],
        x["k"],
        x["a"],
        x["b"],
        decays,
    )
    pseudo = stage("solve", lambda i, v, beta: pseudo_values(t, intra=i, v=v, beta=beta), intra, x["v"], x["beta"])
    states = stage(
        "state",
        lambda d, i, v, p, s: state_pass(t, layout=layout, decays=d, intra=i, v=v, pseudo=p, initial_state=s),
        decays, intra, x["v"], pseudo, x["initial_state"],
    )  # fmt: skip
    stage("output", lambda i, s, v: chunk_output(t, intra=i, states=s, v=v, scale=0.5), intra, states, x["v"])
    return found


@pytest.mark.parametrize("transition,C", COUNTED, ids=[f"{t.decay.value}-{t.lowrank.value}-{C}" for t, C in COUNTED])
def test_torch_plan_equals_flop_counter(transition, C):
    """Every stage, forward and backward: FlopCounterMode's matmul FLOPs and the exp count are
    exactly the PyTorch plan's (the triangular solve is documented as uncounted). And the
    tensors the byte model charges to each stage are the fields the stage returns, with the
    element counts the model gives them."""
    HV, K, V = 2, 16, 8
    layout, inputs = chunked_inputs(transition, C=C, HV=HV, K=K, V=V)
    found = run_stages(transition, layout, inputs)
    plan = torch_plan(transition, chunks=layout.num_chunks, heads=HV, C=C, K=K, V=V)
    assert list(plan) == list(found)
    for name, p in plan.items():
        got = found[name]
        where = f"{transition} C={C} stage {name}"
        assert got["fwd"] == p.counted_fwd, f"{where}: forward matmul FLOPs {got['fwd']} != plan {p.counted_fwd}"
        assert got["bwd"] == p.counted_bwd, f"{where}: backward matmul FLOPs {got['bwd']} != plan {p.counted_bwd}"
        assert got["exps"] == p.exps, f"{where}: exps {got['exps']} != plan {p.exps}"
    assert (plan["solve"].uncounted_fwd > 0) == (transition.lowrank is not LowRank.NONE)

    specs = tensors(transition, C=C, K=K, V=V)
    units = dict(token=layout.num_chunks * C, chunk=layout.num_chunks, seq=inputs["initial_state"].shape[0])
    for stage in forward_stages(transition, C=C, K=K, V=V):
        result = found[stage.name]["result"]
        if isinstance(result, torch.Tensor):
            fields = {"o": result}
        else:
            fields = {} if result is None else {f: x for f, x in result._asdict().items() if x is not None}
        assert set(fields) == set(stage.writes), f"{transition} {stage.name}: {set(fields)} != {set(stage.writes)}"
        for name, x in fields.items():
            spec = specs[name]
            assert x.numel() == spec.elements * units[spec.unit] * HV, f"{transition} {stage.name}.{name}"


@pytest.mark.parametrize("transition,C", COUNTED, ids=[f"{t.decay.value}-{t.lowrank.value}-{C}" for t, C in COUNTED])
def test_torch_plan_without_graph(transition, C):
    """A forward under no_grad: FlopCounterMode's matmul FLOPs and the exp count of every stage are
    the plan's with ``recording=False`` (channel decay: no suffix sums, one exp per token fewer)."""
    HV, K, V = 2, 16, 8
    layout, x = chunked_inputs(transition, C=C, HV=HV, K=K, V=V)
    plan = torch_plan(transition, chunks=layout.num_chunks, heads=HV, C=C, K=K, V=V, recording=False)
    t, found = transition, {}

    def stage(name, fn):
        with torch.no_grad(), FlopCounterMode(display=False) as flops, ExpCounter() as exps:
            result = fn()
        found[name] = (flops.get_total_flops(), exps.count)
        return result

    decays = stage("cumsum", lambda: chunk_decays(x["g"], sub=min(SUB, C)))
    intra = stage("intra", lambda: intra_chunk(t, q=x["q"], k=x["k"], a=x["a"], b=x["b"], decays=decays))
    pseudo = stage("solve", lambda: pseudo_values(t, intra=intra, v=x["v"], beta=x["beta"]))
    states = stage("state", lambda: state_pass(t, layout=layout, decays=decays, intra=intra, v=x["v"], pseudo=pseudo,
                                               initial_state=x["initial_state"]))  # fmt: skip
    stage("output", lambda: chunk_output(t, intra=intra, states=states, v=x["v"], scale=0.5))
    assert found == {name: (p.counted_fwd, p.exps) for name, p in plan.items()}


@pytest.mark.parametrize("C", CHUNK_SIZES)
@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=IDS)
def test_ideal_differs_from_torch_plan_by_documented_terms(transition, C):
    """Where the algorithm is the same (output; the state pass; intra, whose whole-chunk
    factorisation is one dense tile per matrix like the ideal's) the two views agree exactly,
    but for channel decay's 0/1 products: the cumsum's (``4 SUB C K`` per chunk) and the
    sub-block offsets' in intra (:func:`offsets`)."""
    B, T, HV, K, V = 2, 3 * C, 2, 32, 16
    shape = Shape(B=B, T=T, H=1, HV=HV, K=K, V=V, C=C)
    ideal = {s.stage: s for s in account(transition, shape).rows("fwd")}
    plan = torch_plan(transition, chunks=shape.chunks, heads=HV, C=C, K=K, V=V)
    for name in ("state", "output"):
        assert ideal[name].matmul == plan[name].counted_fwd, name
    channel = transition.decay is Decay.CHANNEL
    assert plan["intra"].counted_fwd - ideal["intra"].matmul == (offsets(C, K) * shape.chunks * HV if channel else 0)
    sums = 4 * min(SUB, C) * C * K * shape.chunks * HV if channel else 0
    assert plan["cumsum"].counted_fwd - ideal["cumsum"].matmul == sums


def test_ideal_matches_published_counts():
    """REFERENCES.md, d = 128, C = 64, dense tiles, per token and head: KDA forward ≈ 182K and
    forward+backward ≈ 558K; DPLR ≈ 272K / 829K (gradient work, no recompute); a fused KDA
    forward moves ≈ 1.3 KB in bf16; intra matrices 2x, d²-sized matmuls 4/3."""
    shape = Shape(B=1, T=4096, H=4, K=128, V=128, C=64)
    per = shape.token_heads
    published = {"kda": (182e3, 558e3), "dplr_delta_rule": (272e3, 829e3)}
    accounts = {}
    for name, (fwd, fwd_bwd) in published.items():
        acc = account(FAMILIES[name].transition, shape, recompute=False)
        accounts[name] = acc
        assert acc.total("fwd").matmul / per == pytest.approx(fwd, rel=5e-3)
        assert acc.total().matmul / per == pytest.approx(fwd_bwd, rel=5e-3)
    assert accounts["kda"].total("fwd").bytes_ideal / per == pytest.approx(1.3e3, rel=2e-2)

    def stage(name, key):
        return next(s for s in accounts[name].rows("fwd") if s.stage == key)

    assert stage("dplr_delta_rule", "intra").matmul == 2 * stage("kda", "intra").matmul

    def d_squared(name):  # the K x V products: the state pass and the output's q_start S
        out = dict((label, total) for kind, label, total in stage(name, "output").terms if kind == "matmul")
        return stage(name, "state").matmul + out["q_start S"]

    assert d_squared("dplr_delta_rule") / d_squared("kda") == pytest.approx(4 / 3)


@pytest.mark.parametrize("name", ["simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda", "dplr_delta_rule"])
def test_recurrent_matvec_and_exps_counted(name):
    """The token loop's state reads (``xᵀ S``, matmuls to FlopCounterMode) and its exps."""
    B, T, H, HV, K, V = 1, 5, 1, 2, 8, 4
    args = make_inputs(name, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=torch.float32)
    problem = api.prepare(name, api.RECURRENT, _with_defaults(name, dict(args, output_final_state=True)))
    with FlopCounterMode(display=False) as flops, ExpCounter() as exps:
        recurrent_fwd(problem)
    cost = recurrent_cost(FAMILIES[name].transition, Shape(B=B, T=T, H=H, HV=HV, K=K, V=V))
    assert flops.get_total_flops() == cost["matvec_fwd"]
    assert exps.count == cost["exps_fwd"]
    assert cost["other_fwd"] > cost["matvec_fwd"]


def test_attention_is_two_t_squared_d():
    shape = Shape(B=2, T=1000, H=3, K=64, V=64)
    att = attention_cost(shape)
    assert att["matmul_fwd"] == 2 * shape.T**2 * 64 * shape.B * shape.HV
    assert att["matmul_fwd_bwd"] == pytest.approx(3.5 * att["matmul_fwd"])


def test_grouped_value_heads_read_keys_once_in_the_ideal():
    """With HV = 4 H the ideal reads q, k once per key head; the plan once per value head."""
    t = FAMILIES["kda"].transition
    one, grouped = Shape(B=1, T=128, H=4, K=32, V=32), Shape(B=1, T=128, H=1, HV=4, K=32, V=32)
    intra = {s: next(r for r in account(t, s).rows("fwd") if r.stage == "intra") for s in (one, grouped)}
    qk = 2 * 128 * 32 * 2 * 3  # q, k for the 3 key heads the grouped shape does not have, bf16
    assert intra[one].bytes_ideal - intra[grouped].bytes_ideal == qk
    assert intra[one].bytes_plan == intra[grouped].bytes_plan


def test_floors():
    """The floor is the slowest resource; a fused kernel (ideal bytes) is never slower than the
    staged plan; an empty stage binds nothing."""
    device = DEVICES["h100"]
    cost = StageCost("x", "fwd", matmul=1e12, other=1e9, exps=1e9, bytes_ideal=1e9, bytes_plan=1e10)
    f = floor(cost, device)
    assert f.binds == "memory" and f.seconds == pytest.approx(1e10 / device.bandwidth)
    assert floor(cost, device, ideal_bytes=True).binds == "matmul"
    assert floor(StageCost("x", "fwd", 0, 0, 0, 0, 0), device).binds == "-"
    shape = Shape(B=1, T=1024, H=2, K=64, V=64, C=64)
    for label in ("gla", "kda", "dplr_delta_rule"):
        acc = account(FAMILIES[label].transition, shape)
        for direction in ("fwd", "bwd", None):
            assert fused_floor(acc, device, direction).seconds <= staged_floor(acc, device, direction)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without a GPU")
def test_measure_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        measure_device()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="B must be a positive integer"):
        Shape(B=0, T=10, H=1, K=8, V=8)
    with pytest.raises(ValueError, match="HV must be a positive multiple of H=2"):
        Shape(B=1, T=10, H=2, HV=3, K=8, V=8)
    with pytest.raises(ValueError, match="C must be a power of two"):
        Shape(B=1, T=10, H=1, K=8, V=8, C=48)
    with pytest.raises(ValueError, match="--shape must be"):
        parse_shape("1,2,3", 64)
    assert parse_shape("1,100,2,4,16,8", 32) == Shape(B=1, T=100, H=2, HV=4, K=16, V=8, C=32)


def test_measured_times_beside_the_floor():
    """``python -m dplr bench`` will pass measured times; here made-up ones at twice and four
    times the floor read as 50% and 25%."""
    report = build(Shape(B=1, T=256, H=2, K=32, V=32, C=32), DEVICES["h200"], families=["kda"])
    fam = report["families"]["kda"]
    intra = next(s for s in fam["stages"] if (s["direction"], s["stage"]) == ("fwd", "intra"))
    fused = fam["totals"]["fwd+bwd"]["fused_floor_s"]
    table = with_measured(report, "kda", {"fwd/intra": 2 * intra["floor_s"], "fwd+bwd": 4 * fused})
    assert " 50.0%" in table and " 25.0%" in table
    with pytest.raises(KeyError, match="no model row"):
        with_measured(report, "kda", {"fwd/attention": 1.0})


def test_cli_prints_table_ratios_and_writes_json_and_chart(tmp_path, capsys):
    rc = main(["accounting", "--shape", "1,512,2,32,32", "--chunk", "16", "--device", "h200", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "dplr_delta_rule/rwkv7 / kda" in out and "total fwd+bwd" in out
    (json_path,) = tmp_path.glob("accounting_h200_*_C16.json")
    report = json.loads(json_path.read_text())
    assert report["meta"]["device"]["name"] == "NVIDIA H200" and report["meta"]["commit"]
    assert set(report["families"]) == {"simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda",
                                       "dplr_delta_rule/rwkv7"}  # fmt: skip
    assert report["ratios"]["totals"]["fwd"]["matmul"] > 1
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_chart_without_matplotlib_says_so(tmp_path, monkeypatch):
    report = build(Shape(B=1, T=64, H=1, K=16, V=16, C=16), DEVICES["h100"], families=["gla"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match="needs matplotlib"):
        chart(report, tmp_path / "x.png")


def test_chunk_count_matches_the_layout():
    for T, C in ((0, 16), (1, 16), (64, 64), (65, 64), (1000, 32)):
        layout = ChunkLayout.build(batch=3, seq_len=T, cu_seqlens=None, chunk_size=C, device="cpu")
        assert Shape(B=3, T=T, H=1, K=8, V=8, C=C).chunks == layout.num_chunks == 3 * math.ceil(T / C)


def test_bench_cli_times_each_op_beside_its_floor(tmp_path, capsys):
    """``python -m dplr bench`` on CPU: the PyTorch path timed, forward and forward+backward,
    and set against the floors (printed and written as JSON)."""
    import json

    from dplr.cli import main

    assert main(["bench", "--shape", "1,40,1,16,16", "--chunk", "16", "--family", "gla", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "gla: measured against the floor" in printed and "fwd+bwd" in printed
    (path,) = tmp_path.glob("bench_*.json")
    saved = json.loads(path.read_text())
    assert set(saved["seconds"]["gla"]) == {"fwd", "fwd+bwd"}
    assert all(s > 0 for s in saved["seconds"]["gla"].values())
    assert saved["totals"]["gla"]["fwd"]["fused_floor_s"] > 0


def test_bench_cli_asks_for_a_shape_without_a_gpu():
    from dplr.cli import main

    if torch.cuda.is_available():
        pytest.skip("the default shape is for a GPU, and there is one")
    with pytest.raises(SystemExit, match="--shape"):
        main(["bench"])
