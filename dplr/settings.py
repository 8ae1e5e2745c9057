"""The only place that reads ``DPLR_*`` environment variables.

``DPLR_BACKEND``  ``auto`` (default), ``torch`` or ``triton``: which implementation runs the ops.
                  ``auto`` picks Triton for CUDA tensors when Triton imports, else PyTorch.
``DPLR_CHECK``    ``1`` runs the value checks that need a device sync (gate <= 0 and finite,
                  ``cu_seqlens`` monotone) on GPU tensors too; on CPU they always run.
``DPLR_DETERMINISTIC``  ``1`` makes GPU backward passes bit-reproducible (no atomics).
``DPLR_KEEP_INTERMEDIATES``  ``1`` makes the Triton chunk ops keep their forward's per-chunk
                  quantities and chunk states for the backward instead of recomputing them there
                  (eager calls that need a gradient; ``torch.compile`` keeps recomputing). Each
                  call then holds until its backward what the backward would otherwise make
                  there: per token and value head up to ``5K + 4C`` values (the general form;
                  fewer for the others), plus a ``K x V`` fp32 state per chunk and value head.

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


def keep_intermediates() -> bool:
    return _flag("DPLR_KEEP_INTERMEDIATES")
