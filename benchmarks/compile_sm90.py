"""Compile the Triton chunk kernels for sm_90 without a GPU and print their resource usage
(registers, spills, shared memory): catches compile errors and register pressure before any
device time is spent.  ``python benchmarks/compile_sm90.py [--K 128] [--V 128] [--C 64]``;
``--value-decay`` compiles the ``VALUE_DECAY`` (gv) variants of gla, kda and dplr instead."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dplr.triton.chunk_bwd import chunk_grad_keys_kernel
from dplr.triton.columns import chunk_columns_bwd_kernel, chunk_columns_kernel
from dplr.triton.intra import chunk_prepare_kernel
from dplr.triton.state import chunk_state_bwd_kernel, chunk_state_kernel
from dplr.triton.values_bwd import chunk_grad_key_sides_kernel, chunk_grad_values_kernel

TARGET = GPUTarget("cuda", 90, 32)
# The kernels' NS (num_stages) below are those of the launches: 1 where they set it, else Triton's
# default of 3 (the pipelined loops hold that many copies of their loads in shared memory).
# pointers in the inputs' dtype (the rest are fp32 buffers)
_BF16 = {"q", "k", "v", "a", "b", "g", "beta", "o", "do", "dv"}
_BF16 |= {"X_START", "A_AK", "Q_START", "K_END", "B_END", "A_QK", "A_QB", "A_READ"}
_BF16 |= {"dq", "dk", "da", "db"}  # the keys kernel's outputs with one value head per key head (HV = H below)
LOWRANK_NAMES = {0: "none", 1: "tied", 2: "general"}  # the LOWRANK constexpr's values, by name
_FP64 = {"GV_CUM"}  # the value side's cumulative decays
_I64 = {"chunk_bos", "seq_bos"}
_I32 = {"chunk_len", "seq_len", "seq_chunk0"}


def compile_kernel(fn, given: dict, num_warps: int, dtype: str = "bf16", sixteen: frozenset = frozenset()):
    """``sixteen``: more pointers in the inputs' dtype (the chunk states, where the backward keeps them so)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in given:
            signature[name], constexprs[(i,)] = "constexpr", given[name]
            continue
        if name == "scale":
            signature[name] = "fp32"
            continue
        kind = (
            dtype
            if name in _BF16 | sixteen
            else "fp64"
            if name in _FP64
            else "i64"
            if name in _I64
            else "i32"
            if name in _I32
            else "fp32"
        )
        signature[name] = "*" + kind
        attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": given.get("NS", 2)}
    if given.get("PTXAS"):  # the launch's ptxas options (configs.ChunkBackward.ptxas_values)
        options["ptx_options"] = given["PTXAS"]
    return triton.compile(source, target=TARGET, options=options)


def usage(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    # kernel.metadata.shared: the dynamic shared memory Triton asks for at launch (227 KiB at most)
    return f"regs {found[1]} stack {found[2]} smem {kernel.metadata.shared}" if found else out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--warps-prepare", type=int)
    ap.add_argument("--backward", action="store_true", help="also the three backward kernels")
    ap.add_argument("--value-decay", action="store_true", help="the gv variants (gla, kda, dplr) instead")
    ns = ap.parse_args()
    import torch

    from dplr.triton import configs

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[ns.dtype]
    L = min(16, ns.C)
    levels = (ns.C // L).bit_length() - 1
    structures = [(2, 1), (2, 2), (2, 0)] if ns.value_decay else [(2, 1), (1, 1), (2, 2), (2, 0), (0, 1)]
    vd = ns.value_decay
    for decay, lowrank in structures:
        # each structure's own launch configuration (pipeline depth, warps), as the launches take it
        cfg = configs.chunk_forward(
            K=ns.K, V=ns.V, C=ns.C, dtype=dtype, device="cuda", lowrank=LOWRANK_NAMES[lowrank], value_decay=vd
        )
        prep = dict(H=16, HV=16, K=ns.K, C=ns.C, L=L, LEVELS=levels,
                    BK=cfg.BK, DECAY=decay, LOWRANK=lowrank,
                    PREC=cfg.precision, STORE_AKK=False, NS=1)  # fmt: skip
        k1 = compile_kernel(chunk_prepare_kernel, prep, ns.warps_prepare or cfg.warps_prepare, ns.dtype)
        merges = ns.C.bit_length() - 1
        state = dict(HV=16, K=ns.K, V=ns.V, KP=triton.next_power_of_2(ns.K), C=ns.C, BV=cfg.BV_state,
                     DECAY=decay, LOWRANK=lowrank, VALUE_DECAY=vd,
                     USE_H0=True, STORE_HT=True, STORE_O=True, STORE_STATES=False,
                     PREC=cfg.precision, NUM_STAGES=cfg.stages_state,
                     NS=cfg.stages_state)  # fmt: skip
        k2 = compile_kernel(chunk_state_kernel, state, cfg.warps_state, ns.dtype)
        label = f"decay={decay} lowrank={lowrank}{' value_decay' if vd else ''}"
        print(f"{label}: prepare [{usage(k1)}]  state [{usage(k2)}]", flush=True)
        if vd:  # the column products made before the state passes
            columns = dict(HV=16, V=ns.V, C=ns.C, BV=cfg.BV_columns, MERGES=merges, LOWRANK=lowrank, STORE_O=True,
                           PREC=cfg.precision, NS=3)  # fmt: skip
            print(f"  columns [{usage(compile_kernel(chunk_columns_kernel, columns, 4, ns.dtype))}]", flush=True)
        if ns.backward:  # at the backward's own chunk size (it recomputes the forward's quantities with it)
            name = LOWRANK_NAMES[lowrank]
            decay_name = {0: "none", 1: "scalar", 2: "channel"}[decay]
            bwd = configs.chunk_backward(
                K=ns.K, V=ns.V, C=ns.C, dtype=dtype, lowrank=name, decay=decay_name, value_decay=vd
            )
            # the forward's configuration at the backward's chunk size (the state pass backwards takes it)
            cfg = configs.chunk_forward(
                K=ns.K, V=ns.V, C=bwd.C, dtype=dtype, device="cuda", lowrank=name, value_decay=vd
            )
            C, L = bwd.C, min(16, bwd.C)
            merges, levels = C.bit_length() - 1, (C // L).bit_length() - 1
            names = ("HV", "K", "V", "KP", "BV", "DECAY", "LOWRANK", "VALUE_DECAY", "PREC")
            state_bwd = {key: state[key] for key in names}
            state_bwd.update(C=C, USE_DHT=True, STORE_DH0=True, NUM_STAGES=cfg.stages_state, NS=cfg.stages_state)
            states16 = frozenset({"STATES", "DSTATES"} if bwd.states_bf16 else ())
            k3 = compile_kernel(chunk_state_bwd_kernel, state_bwd, cfg.warps_state, ns.dtype, states16)
            values = dict(HV=16, K=ns.K, V=ns.V, KP=triton.next_power_of_2(ns.K), C=C, BV=bwd.BV_values,
                          MERGES=merges, HOLD=bwd.hold_values, DECAY=decay, LOWRANK=lowrank, VALUE_DECAY=vd,
                          PREC=cfg.precision, NS=bwd.stages_values, PTXAS=bwd.ptxas_values)  # fmt: skip
            k4 = compile_kernel(chunk_grad_values_kernel, values, bwd.warps_values, ns.dtype, states16)
            sides = dict(HV=16, K=ns.K, V=ns.V, C=C, BK=bwd.BK_sides, BV=bwd.BV_sides, LOWRANK=lowrank,
                         VALUE_DECAY=vd, PREC=cfg.precision, NS=3)  # fmt: skip
            k4s = compile_kernel(chunk_grad_key_sides_kernel, sides, bwd.warps_sides, ns.dtype, states16)
            keys = {key: prep[key] for key in ("H", "HV", "K", "DECAY", "LOWRANK", "PREC")}
            keys.update(C=C, L=L, LEVELS=levels, BK=bwd.BK_keys, NS=3)
            k5 = compile_kernel(chunk_grad_keys_kernel, keys, bwd.warps_keys, ns.dtype)
            print(
                f"  backward (C = {C}): state [{usage(k3)}]  values [{usage(k4)}]  key sides [{usage(k4s)}]"
                f"  keys [{usage(k5)}]",
                flush=True,
            )
            if vd and lowrank:
                columns_bwd = dict(HV=16, V=ns.V, C=C, BV=cfg.BV_columns, MERGES=merges, PREC=cfg.precision, NS=3)
                k6 = compile_kernel(chunk_columns_bwd_kernel, columns_bwd, 4, ns.dtype)
                print(f"  backward columns [{usage(k6)}]", flush=True)


if __name__ == "__main__":
    main()
