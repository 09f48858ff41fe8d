"""Small building blocks shared by the HOPE layers: head sizes, float32 promotion, L2 normalisation, block
boundaries of the in-context memories, RMSNorm, the static MLP, rotary positions, embeddings, the short
causal convolution and the gated read-out of the memories."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def resolve_head_dim(dim: int, num_heads: int, head_dim: Optional[int]) -> int:
    """The head size: head_dim, or dim // num_heads when it is None (dim must then divide)."""
    if num_heads <= 0 or dim <= 0:
        raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        return dim // num_heads
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return head_dim


def up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (states and gates are float32 for half inputs; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(||x||^2 + eps) over the last dimension (the norm in at least float32)."""
    return x * torch.rsqrt(up(x).pow(2).sum(-1, keepdim=True) + eps).to(x.dtype)


def block_segments(pos: int, T: int, period: int, per_block: bool) -> List[Tuple[int, int]]:
    """Split tokens pos .. pos+T-1 (positions in the sequence) at block boundaries.

    Returns (start, end) ranges over 0..T: the rest of the current block first, then whole blocks
    (one range each when `per_block`, else together), then the unfinished tail.
    """
    out, s = [], 0
    head = (-pos) % period
    if head:
        out.append((0, min(head, T)))
        s = out[-1][1]
    body = (T - s) // period * period
    if body:
        out += [(i, i + period) for i in range(s, s + body, period)] if per_block else [(s, s + body)]
        s += body
    if s < T:
        out.append((s, T))
    return out


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """The static (zero-frequency) memory: y = W_2 gelu(W_1 x), hidden size `hidden_dim`."""

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.proj.residual_branch = True  # scaled at init (GPT-2 style), see HOPE._init_weights
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class RotaryEmbedding(nn.Module):
    """Rotary positions (RoPE): rotate pairs (x_i, x_{i+D/2}) of every head by angle pos * base^(-2i/D).

    Angles are computed for any absolute position on the fly, so a cache can grow without limit.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [B, T, H, D] at absolute positions offset .. offset + T - 1."""
        T = x.shape[1]
        pos = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
        ang = pos[:, None] * self.inv_freq.to(x.device)[None, :]          # [T, D/2]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Embeddings(nn.Module):
    """Token embedding plus, for position="learned", a learned absolute position embedding."""

    def __init__(self, vocab_size: int, dim: int, max_seq_len: int, position: str = "rotary",
                 dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_seq_len, dim) if position == "learned" else None
        self.max_seq_len = max_seq_len
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.tok(tokens)
        if self.pos is not None:
            end = offset + tokens.shape[1]
            if end > self.max_seq_len:
                raise ValueError(f"sequence reaches position {end} but learned position embeddings "
                                 f"cover max_seq_len={self.max_seq_len}")
            x = x + self.pos(torch.arange(offset, end, device=tokens.device))[None]
        return self.dropout(x)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H * D] -> [B, T, H, D]."""
    B, T, _ = x.shape
    return x.view(B, T, num_heads, -1)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time: y_t = sum_{i<w} c_i x_{t-w+1+i} per channel (zeros
    before the sequence start), as in H3, Mamba, GLA and DeltaNet. x: [B, T, C] -> [B, T, C].

    init="identity": c = [0, .., 0, 1] (the layer starts as a no-op); "uniform": U(-1/sqrt(w), 1/sqrt(w))
    (nn.Conv1d's default). The cache (generation) keeps the last w - 1 inputs."""

    def __init__(self, channels: int, window: int = 4, init: str = "identity"):
        super().__init__()
        if init not in ("identity", "uniform"):
            raise ValueError(f"init={init!r}: expected 'identity' or 'uniform'")
        self.window = window
        weight = torch.zeros(channels, window)
        if init == "identity":
            weight[:, -1] = 1.0
        else:
            weight.uniform_(-1 / math.sqrt(window), 1 / math.sqrt(window))
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, C = x.shape
        hist = cache.get("conv") if cache is not None else None
        if hist is None:
            hist = x.new_zeros(B, self.window - 1, C)
        xx = torch.cat([hist.to(x.dtype), x], dim=1)
        if cache is not None:
            cache["conv"] = xx[:, xx.shape[1] - (self.window - 1):]
        return _ShiftedSum.apply(xx, self.weight.to(x.dtype))


class _ShiftedSum(torch.autograd.Function):
    """y_t = sum_{i<w} c_i xx_{t+i} for xx [B, T + w - 1, C], c [C, w] -> y [B, T, C], with its backward
    dxx_{t+i} += c_i dy_t, dc_i = sum_{b,t} dy_t xx_{t+i}: shifted multiply-adds in place, which on the CPU
    beat a grouped conv1d and the autograd graph of w separate products (a zero-filled buffer per shift)."""

    @staticmethod
    def forward(ctx, xx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        window = w.shape[1]
        T = xx.shape[1] - window + 1
        ctx.save_for_backward(xx, w)
        y = xx[:, :T] * w[:, 0]
        for i in range(1, window):
            y.addcmul_(xx[:, i:i + T], w[:, i])
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xx, w = ctx.saved_tensors
        window = w.shape[1]
        T = dy.shape[1]
        dxx = dw = None
        if ctx.needs_input_grad[0]:
            dxx = xx.new_zeros(xx.shape)
            for i in range(window):
                dxx[:, i:i + T].addcmul_(dy, w[:, i])
        if ctx.needs_input_grad[1]:
            dw = torch.stack([(dy * xx[:, i:i + T]).sum((0, 1)) for i in range(window)], -1)
        return dxx, dw


def gated_readout(o: torch.Tensor, g: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
    """The memories' read-out before the output projection (as in GLA / Gated DeltaNet):
    rmsnorm(o) per head (no weight, in float32) times silu(g). o: [B, T, H, D], g: [B, T, H * D]
    -> [B, T, H * D] in g's dtype. eps (None: float32's epsilon) sets how far a near-empty memory's
    read is damped instead of scaled up to unit size; the layers choose it (hope/cms.py, hope/titans.py)."""
    B, T, H, D = o.shape
    o = F.rms_norm(o.to(torch.promote_types(o.dtype, torch.float32)), (D,), eps=eps).to(g.dtype)
    return o.reshape(B, T, H * D) * F.silu(g)
