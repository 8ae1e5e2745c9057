"""The structure of the transition matrix and the family table of DESIGN §2.

Every op computes, per value head, with a state ``S_t`` of shape ``[K, V]``::

    S_t = (Diag(exp(g_t)) + b_t a_tᵀ) S_{t-1} Diag(exp(gv_t)) + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

A :class:`Transition` says which parts are present: the decay ``g`` (none, one scalar per
head, or one value per key channel), the rank-one part ``b aᵀ`` (none, tied to the key as
in the delta rule, or free) and the value-side decay ``gv`` (one log decay per value channel,
scaling the state's columns; absent, ``Diag(exp(gv))`` is the identity). :data:`FAMILIES` is
the table that names the members; the function :func:`to_general` writes a member's tensors as
the arguments of the general recurrence, which is how the tests state that every named op *is*
that recurrence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Decay(enum.Enum):
    NONE = "none"
    SCALAR = "scalar"  # one log decay per head and token: g [B, T, HV]
    CHANNEL = "channel"  # one per key channel: g [B, T, HV, K]


class LowRank(enum.Enum):
    NONE = "none"
    TIED = "tied"  # b = -beta k, a = exp(g) k, input beta k vᵀ  (delta rule)
    GENERAL = "general"  # free a, b  (general DPLR, RWKV-7)


@dataclass(frozen=True)
class Transition:
    decay: Decay
    lowrank: LowRank
    value_decay: bool = False  # gv [B, T, HV, V]: the state's columns decay too (outer-product decay)

    def __str__(self) -> str:
        text = f"decay={self.decay.value}, lowrank={self.lowrank.value}"
        return f"{text}, value_decay" if self.value_decay else text


@dataclass(frozen=True)
class Family:
    """A named member: its transition and what its front-end takes."""

    name: str
    transition: Transition
    default_scale_one: bool = False  # RWKV-7 reads the state unscaled


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("simple_gla", Transition(Decay.SCALAR, LowRank.NONE)),
        Family("gla", Transition(Decay.CHANNEL, LowRank.NONE)),
        Family("delta_rule", Transition(Decay.NONE, LowRank.TIED)),
        Family("gated_delta_rule", Transition(Decay.SCALAR, LowRank.TIED)),
        Family("kda", Transition(Decay.CHANNEL, LowRank.TIED)),
        Family("dplr_delta_rule", Transition(Decay.CHANNEL, LowRank.GENERAL)),
        Family("rwkv7", Transition(Decay.CHANNEL, LowRank.GENERAL), default_scale_one=True),
    )
}

ALL_TRANSITIONS = tuple(Transition(d, r) for d in Decay for r in LowRank)  # the key side; gv adds to any of them


def expand_heads(x: torch.Tensor | None, heads: int, dim: int = 2) -> torch.Tensor | None:
    """Repeat key heads for grouped value heads: value head ``h`` reads key head ``h // (HV // H)``."""
    if x is None or x.shape[dim] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[dim], dim=dim)


def broadcast_source(x: torch.Tensor) -> torch.Tensor:
    """The elements of ``x`` once each: every stride-0 (broadcast) dimension read at index 0, so
    that ``broadcast_source(x).expand(x.shape)`` is ``x``. A time-invariant gate given as
    ``w.expand(B, T, H, K)`` comes back as ``[1, 1, H, K]``, a view of ``w``."""
    return x[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in x.stride())]


def to_general(
    transition: Transition,
    *,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """The arguments ``(k, v, g, a, b, gv)`` of the general recurrence for a member's tensors.

    ``k [B,T,H,K]``, ``v [B,T,HV,V]``, ``g`` scalar ``[B,T,HV]`` or channel ``[B,T,HV,K]``,
    ``beta [B,T,HV]`` (tied), ``a, b [B,T,H,K]`` (general). The rank-one vectors come back per
    value head ``[B,T,HV,K]``. This is DESIGN §2's table written as code:

    * tied:    ``b = -beta k``, ``a = exp(g) ⊙ k`` (the decay acts before the delta step),
               input ``beta k vᵀ`` (``beta`` folded into ``v``);
    * general: ``a``, ``b`` as given.

    The value-side decay ``gv [B,T,HV,V]`` multiplies the whole key-side transition from the
    right, so it passes through unchanged: the tied mapping stays exact with it because the
    delta step acts on the state decayed on both sides.
    """
    heads = v.shape[2]
    if transition.lowrank is LowRank.TIED:
        kk = expand_heads(k, heads)
        decay = torch.ones_like(kk) if g is None else torch.exp(g if g.dim() == 4 else g[..., None])
        return dict(k=k, v=v * beta[..., None], g=g, a=decay * kk, b=-beta[..., None] * kk, gv=gv)
    if transition.lowrank is LowRank.GENERAL:
        return dict(k=k, v=v, g=g, a=expand_heads(a, heads), b=expand_heads(b, heads), gv=gv)
    return dict(k=k, v=v, g=g, a=None, b=None, gv=gv)
