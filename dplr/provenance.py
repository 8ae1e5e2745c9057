"""Where a measurement came from: the card, the versions and the commit, for every JSON the
benchmarks and the CLI write (DESIGN §8, rule 10)."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch


def git_commit() -> str:
    """The commit of the checkout dplr runs from, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def environment(device: torch.device | str | None = None) -> dict:
    """The card (or CPU), Python, torch, triton, the commit and the date."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        cpu=platform.processor() or platform.machine(),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton_version,
        commit=git_commit(),
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
