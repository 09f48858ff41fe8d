"""The infinite-frequency part of a HOPE block: multi-head softmax attention and linear attention.

Both read the same `cache` protocol (a dict the layer owns, None when not generating):
softmax attention keeps its keys and values (a KV cache); linear attention keeps the recurrent
state of `hope_kernels.linear_attention`, so a new token costs O(1) in the sequence length.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RotaryEmbedding, resolve_head_dim, split_heads
from .ops import check_backend, get_op


class SoftmaxAttention(nn.Module):
    """Causal multi-head attention through `F.scaled_dot_product_attention`.

    softmax(q k^T / sqrt(D) + causal mask) v per head; q and k carry rotary positions when
    position="rotary". `backend` is accepted for a uniform layer API (SDPA picks its own kernel).
    x: [B, T, dim] -> [B, T, dim].
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, *, bias: bool = False,
                 dropout: float = 0.0, position: str = "rotary", rope_base: float = 10000.0,
                 backend: Optional[str] = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = resolve_head_dim(dim, num_heads, head_dim)
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim, bias=bias)
        self.proj.residual_branch = True
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if position == "rotary" else None
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        offset = cache["k"].shape[2] if cache is not None and "k" in cache else 0
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B, H, T, D]
        if cache is not None:
            if offset:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif T == 1:  # one new token sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:         # a chunk after a cache: query i sits at position offset + i
            L = k.shape[2]
            mask = torch.arange(L, device=x.device)[None, :] <= (offset + torch.arange(T, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.proj(y))


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0: keeps linear-attention scores positive."""
    return F.elu(x) + 1.0


class LinearAttention(nn.Module):
    """Causal multi-head linear attention through `hope_kernels.linear_attention`.

    q = phi(x W_q), k = phi(x W_k), v = x W_v with phi = elu + 1, then per head
        S_t = sum_{s<=t} k_s v_s^T,   o_t = scale q_t S_t   (normalize: / (scale q_t . sum_{s<=t} k_s + eps)).
    No rotary positions (they would break positivity); order comes from causality.
    x: [B, T, dim] -> [B, T, dim]. The cache holds the state (S, or (S, z) when normalize).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, *, normalize: bool = True,
                 eps: float = 1e-6, bias: bool = False, dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = resolve_head_dim(dim, num_heads, head_dim)
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim, bias=bias)
        self.proj.residual_branch = True
        self.normalize, self.eps = normalize, eps
        self.resid_dropout = nn.Dropout(dropout)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = elu_feature_map(q), elu_feature_map(k)
        state = cache.get("state") if cache is not None else None
        if state is not None and T == 1:
            step = get_op("linear_attention_step", self.backend)
            o, state = step(q[:, 0], k[:, 0], v[:, 0], state, normalize=self.normalize, eps=self.eps)
            o = o[:, None]
        else:
            scan = get_op("linear_attention", self.backend)
            o, state = scan(q, k, v, normalize=self.normalize, eps=self.eps, initial_state=state,
                            output_final_state=cache is not None)
        if cache is not None:
            cache["state"] = state
        return self.resid_dropout(self.proj(o.reshape(B, T, -1)))
