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
    BV_prepare: int  # value slice of the per-chunk kernel
    BV_state: int  # value columns per state-pass program
    warps_prepare: int
    warps_state: int
    stages_state: int  # software pipelining of the state pass over chunks
    precision: str  # tl.dot input precision: "ieee" keeps fp32 inputs exact, "tf32" for 16-bit inputs


# The state [K, BV] lives in registers for a whole sequence: K·BV fp32 values per program.
STATE_REGISTER_BUDGET = 128 * 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def chunk_forward(*, K: int, V: int, C: int, dtype: torch.dtype, device: torch.device) -> ChunkForward:
    KP, VP = triton.next_power_of_2(K), triton.next_power_of_2(V)
    BV_state = max(16, min(64, VP, STATE_REGISTER_BUDGET // KP))
    return ChunkForward(
        BK=max(16, min(64, KP)),
        BV_prepare=max(16, min(64, VP)),
        BV_state=BV_state,
        warps_prepare=8 if C >= 64 else 4,
        warps_state=4,
        stages_state=1 if interpreting() else 2,
        precision="ieee" if dtype == torch.float32 else "tf32",
    )
