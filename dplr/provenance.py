"""Where a measurement came from: the card, the versions and the commit, for every JSON the
benchmarks and the CLI write (DESIGN §8, rule 10)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def git_commit() -> str:
    """The commit of the code that runs: ``$DPLR_COMMIT`` when set (a copy of the tree without its
    own git history, such as the GPU machine's, is told it by the caller), else the checkout's
    HEAD with ``-dirty`` appended when tracked files differ from it, else ``unknown``."""
    if os.environ.get("DPLR_COMMIT"):
        return os.environ["DPLR_COMMIT"]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


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
