"""The one copy of the input checks (DESIGN §5).

Shapes, dtypes and devices are checked for every call without touching tensor values. Value
checks (a gate ``<= 0`` and finite, ``cu_seqlens`` well formed) need the values; they run when
the tensor is on the CPU (free) or when ``DPLR_CHECK=1``. Errors are ``TypeError`` for the
kind of an argument and ``ValueError`` for its shape or value, and name the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import settings
from .transition import broadcast_source

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)
CHUNK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class Dims:
    B: int
    T: int
    H: int  # query/key heads
    HV: int  # value heads (a multiple of H)
    K: int
    V: int
    N: int  # sequences: B, or len(cu_seqlens) - 1

    def shape(self, template: str) -> tuple[int, ...]:
        """``"B T HV K"`` → the sizes of those dimensions."""
        return tuple(getattr(self, name) for name in template.split())


def _template_text(template: str) -> str:
    return "[" + ", ".join(template.split()) + "]"


def require_tensor(name: str, x, *, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    return x


def check_core(q, k, v, *, names=("q", "k", "v")) -> tuple[int, int, int, int, int, int]:
    """``q, k [B, T, H, K]`` and ``v [B, T, HV, V]``: same dtype and device, ``HV % H == 0``."""
    qn, kn, vn = names
    q = require_tensor(qn, q)
    if q.dim() != 4:
        raise ValueError(f"{qn} must have 4 dimensions [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    k = require_tensor(kn, k)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"{kn} must have the shape of {qn} [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    v = require_tensor(vn, v)
    if v.dim() != 4 or tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"{vn} must have shape [B, T, HV, V] with B={B}, T={T}, got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV % H != 0:
        raise ValueError(f"{vn} has HV={HV} value heads, which must be a positive multiple of the H={H} heads of {qn}")
    if K == 0 or V == 0:
        raise ValueError(f"head dimensions must be positive, got K={K} ({qn}) and V={V} ({vn})")
    for name, x in ((kn, k), (vn, v)):
        same_dtype(name, x, qn, q)
        same_device(name, x, qn, q)
    return B, T, H, HV, K, V


def same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_shaped(name: str, x, template: str, dims: Dims, ref: torch.Tensor, *, dtypes=FLOAT_DTYPES) -> None:
    """An extra tensor: its shape must be ``template`` over ``dims``, on the device of ``ref``."""
    x = require_tensor(name, x, dtypes=dtypes)
    expected = dims.shape(template)
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {_template_text(template)} = {expected}, got {tuple(x.shape)}")
    same_device(name, x, "q", ref)


def check_cu_seqlens(cu_seqlens, cu_seqlens_cpu, *, B: int, T: int, device: torch.device) -> list[int] | None:
    """Returns the host values when they were read (CPU tensor, ``cu_seqlens_cpu``, or
    ``DPLR_CHECK=1``), else ``None``: the caller must not need them then."""
    if cu_seqlens is None:
        if cu_seqlens_cpu is not None:
            raise ValueError("cu_seqlens_cpu was given without cu_seqlens")
        return None
    require_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 0, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences along T and requires B == 1, got B={B}")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the device of q ({device}) or on the CPU, got {cu_seqlens.device}")
    host = None
    if cu_seqlens_cpu is not None:
        require_tensor("cu_seqlens_cpu", cu_seqlens_cpu, dtypes=(torch.int32, torch.int64))
        if tuple(cu_seqlens_cpu.shape) != tuple(cu_seqlens.shape) or cu_seqlens_cpu.device.type != "cpu":
            raise ValueError(
                f"cu_seqlens_cpu must be a CPU copy of cu_seqlens (shape {tuple(cu_seqlens.shape)}), "
                f"got shape {tuple(cu_seqlens_cpu.shape)} on {cu_seqlens_cpu.device}"
            )
        host = cu_seqlens_cpu.tolist()
    elif values_checkable(cu_seqlens):
        host = cu_seqlens.tolist()
    if host is not None:
        if host[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {host[0]}")
        if host[-1] != T:
            raise ValueError(f"cu_seqlens must end at T={T}, got {host[-1]}")
        for i in range(len(host) - 1):
            if host[i + 1] < host[i]:
                raise ValueError(f"cu_seqlens must be non-decreasing, got {host[i]} then {host[i + 1]} at index {i}")
    return host


def check_initial_state(initial_state, dims: Dims, ref: torch.Tensor) -> None:
    if initial_state is None:
        return
    require_tensor("initial_state", initial_state, dtypes=STATE_DTYPES)
    expected = dims.shape("N HV K V")
    if tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state must have shape [N, HV, K, V] = {expected} (N = number of sequences), "
            f"got {tuple(initial_state.shape)}"
        )
    same_device("initial_state", initial_state, "q", ref)


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def values_checkable(x: torch.Tensor) -> bool:
    """Value checks cost a device sync; they run on CPU tensors or with DPLR_CHECK=1, and never
    while torch.compile traces (a data-dependent branch would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu" or settings.check_values()


def check_finite(name: str, x: torch.Tensor) -> None:
    if values_checkable(x) and not bool(torch.isfinite(broadcast_source(x)).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf")


def check_log_decay(name: str, g: torch.Tensor) -> None:
    """A log decay: finite and ``<= 0`` (a decay factor ``exp(g)`` in ``(0, 1]``). A broadcast
    (stride-0) gate is checked on its distinct elements only."""
    if values_checkable(g):
        g = broadcast_source(g)
        if g.numel():
            # One pass for the common case (NaN propagates into both ends and fails the test).
            low, high = torch.aminmax(g)
            if bool(low > float("-inf")) and bool(high <= 0):
                return
        check_finite(name, g)
        if g.numel() and bool((g > 0).any()):
            raise ValueError(f"{name} is a log decay and must be <= 0, got a maximum of {float(g.max()):.4g}")


def check_lower_bound(name: str, g: torch.Tensor, lower_bound: float) -> None:
    """The caller's promise ``g >= lower_bound``, checked when the values are at hand."""
    if values_checkable(g):
        g = broadcast_source(g)
        if g.numel() and bool((g < lower_bound).any()):
            raise ValueError(f"{name} must be >= lower_bound={lower_bound}, got a minimum of {float(g.min()):.4g}")
