"""The only place that reads ``DPLR_*`` environment variables.

``DPLR_BACKEND``  ``auto`` (default), ``torch`` or ``triton``: which implementation runs the ops.
                  ``auto`` picks Triton for CUDA tensors when Triton imports, else PyTorch.
``DPLR_CHECK``    ``1`` runs the value checks that need a device sync (gate <= 0 and finite,
                  ``cu_seqlens`` monotone) on GPU tensors too; on CPU they always run.
``DPLR_DETERMINISTIC``  ``1`` makes GPU backward passes bit-reproducible (no atomics).

The variables are read on every call (cheap), so tests and users may change them at run time.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "torch", "triton")


def backend() -> str:
    value = os.environ.get("DPLR_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"DPLR_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def check_values() -> bool:
    return _flag("DPLR_CHECK")


def deterministic() -> bool:
    return _flag("DPLR_DETERMINISTIC")
