"""The "in-kernel" options of the API as plain functions: l2-norm, beta activation, gates.

The Triton kernels fuse these; the PyTorch path and the layers call them directly. Each
returns the compute dtype (fp32, or fp64 for fp64 inputs) so that nothing is rounded to
bf16 between the activation and the recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6  # as flash-linear-attention: x / sqrt(Σ x² + eps)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """Normalise the last dimension: ``x / sqrt(sum(x²) + eps)``."""
    x = x.to(compute_dtype(x))
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def beta_activation(beta: torch.Tensor, *, sigmoid: bool, allow_neg_eigval: bool) -> torch.Tensor:
    """``sigmoid(beta)`` when the caller passes logits; ``2 sigmoid(beta)`` allows the
    transition ``I - beta k kᵀ`` a negative eigenvalue (beta in [0, 2))."""
    beta = beta.to(compute_dtype(beta))
    if sigmoid:
        beta = torch.sigmoid(beta)
        if allow_neg_eigval:
            beta = 2.0 * beta
    return beta


def kda_gate(
    f: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """The Kimi Delta Attention gate, ``f [B, T, HV, K]`` → log decay ``g [B, T, HV, K]``.

    ``g = -exp(A_log[h]) · softplus(f + dt_bias[h, k])``, or with a lower bound ``lb < 0``
    (Kimi Linear uses -5): ``g = lb · sigmoid(exp(A_log[h]) · (f + dt_bias[h, k]))``, where an
    absent ``A_log`` reads as ``exp(A_log) = 1``. ``A_log [HV]``, ``dt_bias [HV * K]`` or ``[HV, K]``.
    """
    HV, K = f.shape[-2:]
    x = f.to(compute_dtype(f))
    if dt_bias is not None:
        x = x + dt_bias.reshape(HV, K).to(x.dtype)
    rate = None if A_log is None else torch.exp(A_log.to(x.dtype))[:, None]
    if lower_bound is None:
        return -rate * F.softplus(x)
    return lower_bound * torch.sigmoid(x if rate is None else rate * x)


def gdn_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None) -> torch.Tensor:
    """The Gated DeltaNet (Mamba-2 style) gate, ``f [B, T, HV]`` → ``g = -exp(A_log) · softplus(f + dt_bias)``."""
    x = f.to(compute_dtype(f))
    if dt_bias is not None:
        x = x + dt_bias.to(x.dtype)
    return -torch.exp(A_log.to(x.dtype)) * F.softplus(x)
