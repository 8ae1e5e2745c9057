"""Roofline floors: the least time each stage can take on a device, and what binds it.

A stage needs ``matmul / peak_matmul`` on the tensor cores, ``other / peak_vector`` on the
FP32 units, ``exps / peak_exp`` on the special-function units and ``bytes / bandwidth`` on the
memory bus; these run concurrently, so the floor is the largest of the four.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .model import Account, StageCost


@dataclass(frozen=True)
class Device:
    """Peak rates: FLOP/s, exponentials/s and bytes/s."""

    name: str
    matmul: float  # dense bf16 tensor-core FLOP/s
    bandwidth: float  # device memory bytes/s
    vector: float  # FP32 non-tensor FLOP/s
    exp: float  # exp2 results/s of the special-function units
    source: str = "datasheet"


# Hopper SXM: 132 SMs at 1.98 GHz boost; 16 exp2 results per clock and SM (the CUDA C++
# Programming Guide's throughput table, compute capability 9.0).
_HOPPER_EXP = 132 * 16 * 1.98e9

DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", matmul=989e12, bandwidth=3.35e12, vector=67e12, exp=_HOPPER_EXP),
    "h200": Device("NVIDIA H200", matmul=989e12, bandwidth=4.8e12, vector=67e12, exp=_HOPPER_EXP),
}

RESOURCES = ("matmul", "vector", "exp", "memory")


@dataclass(frozen=True)
class Floor:
    seconds: float
    binds: str  # one of RESOURCES
    times: dict[str, float]


def floor(cost: StageCost, device: Device, *, ideal_bytes: bool = False) -> Floor:
    """The roofline floor of one stage (or total), with the plan's bytes or the ideal bytes."""
    times = dict(
        matmul=cost.matmul / device.matmul,
        vector=cost.other / device.vector,
        exp=cost.exps / device.exp,
        memory=(cost.bytes_ideal if ideal_bytes else cost.bytes_plan) / device.bandwidth,
    )
    binds = max(RESOURCES, key=times.__getitem__)
    return Floor(times[binds], binds if times[binds] > 0 else "-", times)


def staged_floor(account: Account, device: Device, direction: str | None = None) -> float:
    """Stages run one after another, each at its own floor (plan bytes): the sum."""
    return sum(floor(s, device).seconds for s in account.rows(direction))


def fused_floor(account: Account, device: Device, direction: str | None = None) -> Floor:
    """One fused kernel: every resource's total against its rate, ideal bytes."""
    return floor(account.total(direction), device, ideal_bytes=True)


def measure_device(base: str = "h100", *, size: int = 8192, copy_bytes: int = 1 << 30) -> Device:
    """Measure the current CUDA device: a ``size``-cubed bf16 matmul and a device-to-device copy
    of ``copy_bytes``, median time of ``triton.testing.do_bench``. The vector and exponential
    rates are taken from the ``base`` preset (the measurement does not cover them)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "--device measure needs a CUDA GPU and none is available (torch.cuda.is_available() is False); "
            f"use one of the presets: {', '.join(DEVICES)}"
        )
    from triton.testing import do_bench

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    matmul_ms = do_bench(lambda: a @ b, return_mode="median")
    src = torch.empty(copy_bytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return replace(
        DEVICES[base],
        name=torch.cuda.get_device_name(),
        matmul=2 * size**3 / (matmul_ms * 1e-3),
        bandwidth=2 * copy_bytes / (copy_ms * 1e-3),  # a copy reads and writes every byte
        source=f"measured (bf16 {size}^3 matmul, {copy_bytes >> 20} MiB copy); vector and exp rates of {base}",
    )
