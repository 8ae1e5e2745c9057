"""The PyTorch chunk path (DESIGN §3), one file per stage; `dplr.engine` runs them in order."""

from __future__ import annotations

import torch


def records_graph(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a graph through any of ``tensors`` (``None`` entries skipped): the
    stages write over tensors they own only where it does not."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
