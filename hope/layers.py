"""Small building blocks shared by the HOPE layers: RMSNorm, the static MLP, rotary positions, embeddings."""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F


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
