"""What the mixer layers share: the decoding cache, the short causal convolution (and the token
shift, its width-2 special case), RMSNorm and gated RMSNorm, the low-rank "LoRA-MLP"
projections, the head bookkeeping and the initialisation.

Layout follows the field: activations ``x [B, T, D]``; packed variable-length batches have
``B == 1`` and ``cu_seqlens [N + 1]``; a cache holds one entry per sequence (``N = B``
without ``cu_seqlens``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # the field's initializer_range for projections and embeddings


class LayerCache(NamedTuple):
    """A mixer's decoding state for ``N`` sequences.

    ``state [N, HV, K, V]``: the recurrent state (fp32, as the ops return it); ``tails``: for
    each short convolution (or token shift) the last ``W - 1`` inputs of every sequence,
    ``[N, W - 1, C]``, in the order the layer reads them.
    """

    state: torch.Tensor
    tails: tuple[torch.Tensor, ...]


class MixerOutput(NamedTuple):
    """``output [B, T, D]`` and the cache after the last token."""

    output: torch.Tensor
    cache: LayerCache


class Mixer(nn.Module):
    """Base of the dplr layers. A subclass defines ``mix(x, cache, cu_seqlens, recurrent)``:
    the layer on ``x [B, T, D]`` with the chunk op (``recurrent=False``) or the token-by-token
    op (``recurrent=True``), and ``cache_type``. ``forward`` is training and prefill; ``step``
    decodes one token and gives what ``forward`` gives at that position."""

    cache_type: type = LayerCache

    def forward(
        self, x: torch.Tensor, cache: LayerCache | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> MixerOutput:
        """``x [B, T, D]`` (``B == 1`` with ``cu_seqlens [N + 1]``) → ``output [B, T, D]`` and the
        cache after the last token of each sequence (``cache`` is the one before the first)."""
        self.check_input(x, cache)
        return self.mix(x, cache, cu_seqlens, recurrent=False)

    def step(self, x: torch.Tensor, cache: LayerCache | None = None) -> MixerOutput:
        """One token per sequence: ``x [N, D]`` → ``output [N, D]`` and the updated cache."""
        self.check_input(x, cache, one_token=True)
        out, cache = self.mix(x[:, None], cache, None, recurrent=True)
        return MixerOutput(out[:, 0], cache)

    def check_input(self, x: torch.Tensor, cache, *, one_token: bool = False) -> None:
        D = self.hidden_size
        shape = f"[N, {D}] (one token per sequence)" if one_token else f"[B, T, {D}]"
        if not isinstance(x, torch.Tensor) or x.dim() != 3 - one_token or x.shape[-1] != D:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape {shape}, got {got}")
        if cache is not None and not isinstance(cache, self.cache_type):
            raise TypeError(f"cache must be a {self.cache_type.__name__} or None, got {type(cache).__name__}")


class Heads(NamedTuple):
    """Head sizes: ``num_heads`` query/key heads of ``head_k_dim``, ``num_v_heads`` value heads
    of ``head_v_dim`` (grouped value heads when ``num_v_heads > num_heads``)."""

    num_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @staticmethod
    def build(*, num_heads: int, head_dim: int, num_v_heads: int | None, expand_v: float) -> Heads:
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if isinstance(num_v_heads, bool) or not isinstance(num_v_heads, int) or num_v_heads % num_heads:
            raise ValueError(f"num_v_heads must be a positive multiple of num_heads={num_heads}, got {num_v_heads!r}")
        head_v_dim = head_dim * expand_v
        if not head_v_dim >= 1 or head_v_dim != int(head_v_dim):
            raise ValueError(f"expand_v * head_dim must be a positive integer, got {expand_v} * {head_dim}")
        return Heads(num_heads, num_v_heads, head_dim, int(head_v_dim))


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, n * head_dim]`` → ``[B, T, n, head_dim]``."""
    return x.unflatten(-1, (-1, head_dim))


# ---------------------------------------------------------------------------------------------
# Short causal convolution and token shift, with a cache, over fixed-length or packed batches.


def sequence_positions(
    B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of the ``B * T`` tokens (flattened) sits: ``starts [N + 1]`` (token offsets of
    the sequences; ``B`` sequences of ``T`` without ``cu_seqlens``), the sequence of every token
    ``seq [B * T]`` and its position within it ``pos [B * T]``. No host sync."""
    if cu_seqlens is None:
        starts = torch.arange(B + 1, device=device) * T
    else:
        starts = cu_seqlens.to(device=device, dtype=torch.long)
    tokens = torch.arange(B * T, device=device)
    seq = torch.searchsorted(starts[1:], tokens, right=True)
    return starts, seq, tokens - starts[seq]


def delayed(
    x: torch.Tensor, tail: torch.Tensor | None, cu_seqlens: torch.Tensor | None, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``width`` inputs at every position, and the new tail.

    ``x [B, T, C]``; ``tail [N, width - 1, C]`` (the inputs before the first token of each
    sequence; zeros when ``None``). Returns ``taps [width, B, T, C]`` with ``taps[d][t] = x[t - d]``
    within each sequence (from ``tail`` before its start) and the new tail ``[N, width - 1, C]``.
    No host sync either way (compile-friendly).
    """
    B, T, C = x.shape
    P = width - 1
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    past = x.new_zeros(N, P, C) if tail is None else tail.to(x.dtype)
    if cu_seqlens is None:  # slices of one padded tensor: cheaper than a gather, forward and backward
        padded = torch.cat([past, x], dim=1)
        return torch.stack([padded[:, P - d : P - d + T] for d in range(width)]), padded[:, T:]

    starts, seq, pos = sequence_positions(B, T, cu_seqlens, x.device)
    # One buffer: the N tails (rows n*P .. n*P + P - 1), then the T packed tokens.
    buffer = torch.cat([past.reshape(N * P, C), x.reshape(B * T, C)])

    def source(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Row of ``buffer`` holding token ``pos`` (relative, may be negative) of sequence ``seq``."""
        return torch.where(pos >= 0, N * P + starts[seq] + pos, seq * P + P + pos)

    lag = torch.arange(width, device=x.device)[:, None]
    taps = buffer[source(seq, pos - lag)].reshape(width, B, T, C)
    seqs = torch.arange(N, device=x.device)[:, None]
    lengths = (starts[1:] - starts[:-1])[:, None]
    rows = lengths - P + torch.arange(P, device=x.device)  # the last P positions of each sequence
    return taps, buffer[source(seqs, rows)]


class ShortConvolution(nn.Module):
    """Causal depthwise convolution of width ``kernel_size`` over time, then an optional SiLU.

    ``weight [C, 1, W]`` as ``nn.Conv1d(C, C, W, groups=C)`` lays it out (``weight[..., W-1]``
    multiplies the current token). Its cache is the tail of the last ``W - 1`` inputs.
    """

    def __init__(self, channels: int, kernel_size: int = 4, *, activation: str | None = "silu", bias: bool = False):
        super().__init__()
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size)  # nn.Conv1d's default for a depthwise filter
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self, x: torch.Tensor, tail: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C]``, ``tail [N, W-1, C]`` or ``None`` → ``(y [B, T, C], new tail)``."""
        W, bias = self.kernel_size, None if self.bias is None else self.bias.to(x.dtype)
        if cu_seqlens is None:  # one depthwise conv1d over the tail and the tokens
            past = x.new_zeros(x.shape[0], W - 1, x.shape[2]) if tail is None else tail.to(x.dtype)
            if x.shape[1] == 0:  # conv1d rejects an input shorter than its kernel
                return x, past
            padded = torch.cat([past, x], dim=1)
            y = F.conv1d(padded.transpose(1, 2), self.weight.to(x.dtype), bias, groups=self.channels).transpose(1, 2)
            new_tail = padded[:, x.shape[1] :]
        else:
            taps, new_tail = delayed(x, tail, cu_seqlens, W)
            filt = self.weight[:, 0].flip(-1).T.to(x.dtype)  # [W, C], row d weighs the input d steps back
            y = (taps * filt[:, None, None, :]).sum(0)
            if bias is not None:
                y = y + bias
        return (F.silu(y) if self.activation == "silu" else y), new_tail


def token_shift(
    x: torch.Tensor, tail: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous token of every position (zeros, or ``tail [N, 1, C]``, before a sequence's
    start): ``x [B, T, C]`` → ``(x_prev [B, T, C], new tail [N, 1, C])``."""
    taps, new_tail = delayed(x, tail, cu_seqlens, 2)
    return taps[1], new_tail


def add_qkv(layer: nn.Module, hidden_size: int, heads: Heads, *, use_short_conv: bool, conv_size: int) -> None:
    """Give ``layer`` the q, k, v projections (no bias) and, with ``use_short_conv``, their short
    convolutions (``layer.convs``, SiLU inside; ``None`` without), as :func:`project_qkv` reads them."""
    layer.q_proj = nn.Linear(hidden_size, heads.key_dim, bias=False)
    layer.k_proj = nn.Linear(hidden_size, heads.key_dim, bias=False)
    layer.v_proj = nn.Linear(hidden_size, heads.value_dim, bias=False)
    dims = (heads.key_dim, heads.key_dim, heads.value_dim)
    layer.convs = nn.ModuleList(ShortConvolution(d, conv_size) for d in dims) if use_short_conv else None


def state_options(cache: LayerCache | None, cu_seqlens: torch.Tensor | None) -> dict:
    """The op options every layer passes: start from the cache, return the final state."""
    return dict(initial_state=None if cache is None else cache.state, output_final_state=True, cu_seqlens=cu_seqlens)


def gated_output(layer: nn.Module, o: torch.Tensor, x: torch.Tensor, cache: LayerCache) -> MixerOutput:
    """``o_proj(o_norm(o, g_proj(x)))`` per value head: the gated-norm output of KDA, GDN, GLA."""
    o = layer.o_norm(o, split_heads(layer.g_proj(x), layer.heads.head_v_dim))
    return MixerOutput(layer.o_proj(o.flatten(-2)), cache)


def project_qkv(
    layer: nn.Module,
    x: torch.Tensor,
    cache: LayerCache | None,
    cu_seqlens: torch.Tensor | None,
    *,
    silu_without_conv: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """``layer.q_proj, k_proj, v_proj`` on ``x [B, T, D]``, each through its short convolution
    (``layer.convs``, a ``ModuleList`` of three, SiLU inside) with the cached tails, or, without
    convolutions, through SiLU (``silu_without_conv``, the delta-rule layers) or nothing (GLA).
    Returns ``q, k, v`` (flat, ``[B, T, dim]``) and the new tails (``()`` without convolutions)."""
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    if layer.convs is None:
        return (*((F.silu(y) for y in (q, k, v)) if silu_without_conv else (q, k, v)), ())
    past = (None,) * 3 if cache is None else cache.tails
    (q, tq), (k, tk), (v, tv) = (
        conv(y, t, cu_seqlens) for conv, y, t in zip(layer.convs, (q, k, v), past, strict=True)
    )
    return q, k, v, (tq, tk, tv)


# ---------------------------------------------------------------------------------------------
# Norms and low-rank projections.


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * weight`` over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In fp32 (or fp64): the mean of squares of bf16 activations loses too much in bf16."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) * weight * act(gate)``, ``act`` SiLU (GDN, GLA) or sigmoid (KDA)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, activation: str = "silu"):
        super().__init__()
        if activation not in ("silu", "sigmoid"):
            raise ValueError(f"activation must be 'silu' or 'sigmoid', got {activation!r}")
        self.eps, self.activation = eps, activation
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x, self.weight, self.eps)
        gate = gate.to(y.dtype)
        return (y * (F.silu(gate) if self.activation == "silu" else torch.sigmoid(gate))).to(x.dtype)


class LowRank(nn.Module):
    """The "LoRA-MLP" of the gates: ``up(act(down(x)))``, ``down: D → rank`` without bias,
    ``up: rank → out`` with an optional bias; ``act`` none, tanh or sigmoid."""

    def __init__(self, in_features: int, rank: int, out_features: int, *, activation: str | None = None, bias: bool):
        super().__init__()
        if activation not in (None, "tanh", "sigmoid"):
            raise ValueError(f"activation must be None, 'tanh' or 'sigmoid', got {activation!r}")
        self.activation = activation
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.activation == "tanh":
            h = torch.tanh(h)
        elif self.activation == "sigmoid":
            h = torch.sigmoid(h)
        return self.up(h)


def init_linear_(module: nn.Module, std: float = INIT_STD) -> None:
    """Every ``nn.Linear`` and ``nn.Embedding`` under ``module``: weights ``N(0, std²)``, biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def init_silu_gate_(proj: nn.Linear) -> None:
    """A SiLU output gate's projection at fan-in scale (``std = in_features^-1/2``): at the
    common ``N(0, 0.02²)`` its inputs are ~0.1, SiLU passes ~0.05 of the output and the layer
    learns several times slower (seen on MQAR), where a sigmoid gate starts at 0.5."""
    nn.init.normal_(proj.weight, mean=0.0, std=proj.in_features**-0.5)


def inverse_softplus_time_steps(
    n: int, *, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4
) -> torch.Tensor:
    """The Mamba-2 / GDN ``dt_bias``: time steps log-uniform in ``[dt_min, dt_max]`` (at least
    ``floor``), stored as ``softplus⁻¹(dt)`` so that ``softplus(0 + dt_bias) = dt`` at the start."""
    log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp_min(floor)
    return dt + torch.log(-torch.expm1(-dt))
