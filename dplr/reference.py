"""The specification: the recurrence of DESIGN §2 as a token loop.

This is the ground truth every path is measured against. It is written to be read, not to be
fast: one loop over the tokens of each sequence, in float64 unless told otherwise, and
differentiable by autograd (no in-place updates). It imports no Triton.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from .transition import expand_heads


class Output(NamedTuple):
    output: torch.Tensor
    final_state: torch.Tensor | None


def recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Output:
    """Run ``S_t = (Diag(exp(g_t)) + b_t a_tᵀ) S_{t-1} Diag(exp(gv_t)) + k_t v_tᵀ``, ``o_t = S_tᵀ (scale q_t)``.

    Shapes: ``q, k [B, T, H, K]``; ``v [B, T, HV, V]`` with ``HV % H == 0`` (value head ``h``
    reads key head ``h // (HV // H)``); ``g`` the log decay, ``[B, T, HV]`` (one per head) or
    ``[B, T, HV, K]`` (one per key channel), absent for no decay; ``a, b [B, T, HV, K]`` (or
    ``H`` heads) the rank-one part, absent for none; ``gv [B, T, HV, V]`` the log decay of the
    state's columns (value channels), absent for none; ``initial_state [N, HV, K, V]``;
    ``cu_seqlens [N + 1]`` packs ``N`` sequences along ``T`` when ``B == 1``.

    Returns ``(o [B, T, HV, V], final_state [N, HV, K, V])``, both in ``dtype``.
    """
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K**-0.5 if scale is None else scale

    def prepare(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else expand_heads(x.to(dtype), HV)

    q, k, v, a, b = (prepare(x) for x in (q, k, v, a, b))
    g, gv = (None if x is None else x.to(dtype) for x in (g, gv))
    if g is not None and g.dim() == 3:
        g = g[..., None]  # a scalar decay acts on every key channel alike

    if cu_seqlens is None:
        spans = [(i, 0, T) for i in range(B)]
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        spans = [(0, bos, eos) for bos, eos in itertools.pairwise(bounds)]

    outputs, finals = [], []
    for n, (i, bos, eos) in enumerate(spans):
        state = q.new_zeros(HV, K, V) if initial_state is None else initial_state[n].to(dtype)

        inputs = (None if x is None else x[i, bos:eos] for x in (q, k, v, g, a, b, gv))
        o, state = _scan(*inputs, state, scale)
        outputs.append(o)
        finals.append(state)

    if cu_seqlens is None:
        out = torch.stack(outputs) if outputs else q.new_zeros(0, T, HV, V)
    else:
        out = torch.cat(outputs)[None] if outputs else q.new_zeros(1, 0, HV, V)
    final = torch.stack(finals) if finals else q.new_zeros(0, HV, K, V)
    return Output(out, final)


def _scan(q, k, v, g, a, b, gv, state, scale):
    """One sequence: inputs ``[L, HV, ·]``, state ``[HV, K, V]``; returns ``(o [L, HV, V], state)``."""
    outs = []
    for t in range(q.shape[0]):
        carried = state  # (Diag(exp(g_t)) + b_t a_tᵀ) S_{t-1}, then the columns' decay
        if g is not None:
            carried = torch.exp(g[t])[..., None] * carried
        if a is not None:
            x = torch.einsum("hk,hkv->hv", a[t], state)  # a_tᵀ S_{t-1}: reads the undecayed state
            carried = carried + b[t][..., None] * x[:, None, :]
        if gv is not None:
            carried = carried * torch.exp(gv[t])[:, None, :]
        state = carried + k[t][..., None] * v[t][:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", scale * q[t], state))
    if not outs:
        return q.new_zeros(0, v.shape[1], v.shape[2]), state
    return torch.stack(outs), state
