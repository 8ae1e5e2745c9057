"""Launch configurations as data: the tuned defaults for Hopper (H100/H200), passed through one
filter that adapts them to the shape, the dtype and the device (register budget, interpreter).

A first call compiles each kernel once per shape class and runs at once: no autotuning sweep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class ChunkForward:
    BK: int  # channel slice of the per-chunk kernel
    BV_state: int  # value columns per state-pass program
    BV_columns: int  # value columns per program of the gv column products (dplr.triton.columns)
    warps_prepare: int
    warps_state: int
    stages_state: int  # software pipelining of the state pass over chunks
    precision: str  # tl.dot input precision: "tf32x3" for fp32 inputs, "tf32" for 16-bit inputs


# The state [K, BV] lives in registers for a whole sequence: K·BV fp32 values per program, at
# most this many per 4 warps (64 a thread).
STATE_REGISTER_BUDGET = 128 * 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Shared memory a pipelined state pass may fill: Hopper's 227 KiB per block.
SHARED_BUDGET = 232448


def _state_stages(*, lowrank: str, C: int, KP: int, BV: int, itemsize: int) -> int:
    """Pipeline depth of the state pass: as deep as 3 while the tiles of one chunk fit
    (H200: 0.23 ms with 3 stages against 0.35 ms with 2 at (4, 8192, 16, 128), GDN)."""
    tiles = 2 * C * KP * itemsize + C * C * itemsize + C * BV * itemsize  # q_start, k_end, A_qk, v
    if lowrank != "none":
        tiles += C * KP * itemsize + C * C * 4  # x_start, the solve M (fp32)
    if lowrank == "general":
        tiles += C * KP * itemsize + 2 * C * C * itemsize  # b_end, A_ak, A_qb
    # The dot operands take staging space beside the pipelined loads (seen: 262 KiB for the
    # general form at 2 stages, K = V = 128), hence the factor.
    return max(1, min(3, SHARED_BUDGET // (tiles * 5 // 4)))


def chunk_forward(
    *,
    K: int,
    V: int,
    C: int,
    dtype: torch.dtype,
    device: torch.device,
    lowrank: str = "tied",
    value_decay: bool = False,
) -> ChunkForward:
    """With ``value_decay`` the state passes take value blocks of 32 and no pipelining. Blocks of
    16 were chosen while the passes held the column-decayed products (sm_90, K = V = 128, KDA,
    forward: 313 KiB of shared memory at 3 stages, over Hopper's 227). Those products now run
    beforehand (:mod:`dplr.triton.columns`), and on an H200 at (4, 8192, 16, 128), bf16
    (gpu_value_decay_H200_9c552e8.json), blocks of 32 take 6-13% off the forward (KDA 6.94 ->
    6.50 ms, DPLR 11.0 -> 9.6) and 2-4% off forward+backward; 64 gains less."""
    KP, VP = triton.next_power_of_2(K), triton.next_power_of_2(V)
    # Blocks of 64 state columns where V allows: narrower blocks take fp32 tiles in the state
    # passes (see dplr.triton.state._widen: the 16-bit products fault on sm_90 there). A larger K
    # spreads the [K, 64] state over more warps, STATE_REGISTER_BUDGET values per 4 warps
    # (H200, K = V = 256, bf16: blocks of 64 on 8 warps run clean for every family,
    # benchmarks/results/gpu_state_pass_faults_H200.log).
    BV_state = 32 if value_decay else max(16, min(64, VP))
    return ChunkForward(
        BK=max(16, min(64, KP)),
        BV_state=BV_state,
        BV_columns=max(16, min(32, VP)),
        # H200, (4, 8192, 16, 128): 4 warps beat 8 by 1.3-2x unless the general form's five
        # C x C matrices need the registers of 8 (4.0 ms against 5.7 ms).
        warps_prepare=8 if lowrank == "general" and C >= 64 else 4,
        warps_state=max(4, 4 * KP * BV_state // STATE_REGISTER_BUDGET),
        stages_state=1
        if interpreting() or value_decay
        else _state_stages(lowrank=lowrank, C=C, KP=KP, BV=BV_state, itemsize=dtype.itemsize),
        # fp32 inputs: three tf32 products per dot (about fp32's accuracy on the tensor cores);
        # "ieee" dots compile to scalar FMA loops that spill and take minutes to compile on sm_90.
        precision="tf32x3" if dtype == torch.float32 else "tf32",
    )


@dataclass(frozen=True)
class ChunkBackward:
    C: int  # the backward's chunk size (it recomputes the forward's quantities with it)
    BV_values: int  # value columns per step of the values kernel (it loops over all of V)
    warps_values: int
    hold_values: bool  # the values kernel holds the chunk's tiles across its value blocks (else reloads them)
    stages_values: int  # software pipelining of the values kernel's loop over value blocks
    ptxas_values: str | None  # ptxas options of the values kernel (None: Triton's)
    BK_keys: int  # channel slice of the keys kernel
    warps_keys: int
    BK_sides: int  # channel slice of the key-sides kernel (it loops over all of V)
    BV_sides: int
    warps_sides: int
    states_bf16: bool  # every chunk's state and its gradient stored in bf16 (else fp32)
    stash_bf16: bool  # the values kernel's factors for the key-sides kernel stored in bf16 (else fp32)


def chunk_backward(
    *,
    K: int,
    V: int,
    C: int,
    dtype: torch.dtype,
    lowrank: str = "tied",
    decay: str = "channel",
    value_decay: bool = False,
) -> ChunkBackward:
    """Both per-chunk backward kernels hold several C x C matrices and C x K tiles at once (sm_90,
    K = V = 128, C = 64: 3-8 KiB of stack per thread). The keys kernel's dot operands take
    shared memory per C x C matrix, twice over for tf32x3: at C = 64 the general form (bf16:
    288 KiB) and fp32 inputs (KDA: 288 KiB) exceed Hopper's 227 KiB, so those run the backward
    with chunks of 32 (general fp32: 72 KiB). At K = V = 256 every build fits at those sizes
    (benchmarks/results/compile_sm90_K256.log; bf16 checked on an H100 for every family,
    gpu_chunk_H100_7b5fb41.json).
    The interpreter has no such limit and keeps the caller's chunk size, so CI's fp32 tests still
    cover the C = 64 kernels that bf16 runs. ``value_decay`` (gv) takes the same launches; it is
    an argument so that benchmarks/gpu_value_decay.py can time variants of the gv kernels alone."""
    KP, VP = triton.next_power_of_2(K), triton.next_power_of_2(V)
    return ChunkBackward(
        C=min(C, 32) if (lowrank == "general" or dtype == torch.float32) and not interpreting() else C,
        # H200, (4, 8192, 16, 128), forward+backward, DPLR: blocks of 16 values 24.3 ms, of 32
        # 30.2 (with 32, ptxas keeps the general form's values kernel at 168 registers and spills).
        BV_values=16 if lowrank == "general" else max(16, min(32, VP)),
        # H200, (4, 8192, 16, 128), forward+backward: 8 warps for the values kernel without a
        # low-rank term (simple GLA 8.8 -> 6.6 ms, GLA 17.2 -> 14.9) but not with one (GDN
        # 13.0 -> 15.2); 8 for the keys kernel under a decay (KDA 29.3 -> 22.0, DPLR 87 -> 63,
        # GDN 13.0 -> 12.3) but not without (DeltaNet 11.3 -> 11.8).
        warps_values=8 if lowrank == "none" else 4,
        # Holding the tiles in its loop over value blocks (H200, same shape): KDA 12.4 ms against
        # 15.1 reloading them, GLA 6.8 against 6.9, DPLR (blocks of 32) 28.7 against 30.2. Past
        # K = 128 they do not fit shared memory beside the pipelined loads.
        hold_values=KP <= 128,
        # Past K = 128 it runs unpipelined: at K = V = 256 (tied, sm_90, bf16 states) 3 stages
        # need 336 KiB of shared memory and 2 need 240 KiB, over Hopper's 227.
        stages_values=3 if KP <= 128 else 1,
        # fp32 inputs past K = 128: at ptxas's default -O3 every structure's values kernel came out
        # at 32 registers with 10-15 KiB of stack (sm_90 compile, K = V = 256; 29 KB of spill stores
        # for KDA); at -O1, 255 registers and 5.5 KiB. Chosen from the compile, not yet timed.
        ptxas_values="-O1" if dtype == torch.float32 and KP > 128 else None,
        BK_keys=max(16, min(64, KP)),
        warps_keys=4 if decay == "none" else 8,
        BK_sides=max(16, min(64, KP)),
        BV_sides=max(16, min(32, VP)),
        warps_sides=4,
        # bf16 inputs: the states as the forward's state pass already rounds them for its output
        # product, half the memory of fp32 (DeltaNet at (4, 8192, 16, 128): 0.5 GiB less at the
        # peak), and products with the stored 16-bit tiles on the 16-bit tensor cores. H200, same
        # shape, checked: worst gradient error 3.5e-3 (DPLR db; 3.0e-3 for the others). fp16 keeps
        # fp32 states: fp16 tops out at 65504, where a long sum of k vᵀ can reach.
        states_bf16=dtype == torch.bfloat16,
        stash_bf16=False,
    )
