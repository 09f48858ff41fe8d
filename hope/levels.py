"""The paper's Continuum Memory System: a chain of levels that learn in context at their own frequency.

Nested Learning (Behrouz et al. 2025), Eq. 70-71, as residual levels (`cms="levels"`):

    x <- x + level_1(norm_1(x)),  ...,  x <- x + level_L(norm_L(x))                     (Eq. 70)

Level l has fast weights theta per sequence, initialised from learned parameters (the meta-learned
initial state), and updated every C^(l) = cms_periods[l] tokens by the gradient of its inner loss
accumulated over the block, taken at the block-start weights:

    theta_{n+1} = theta_n - sum_{t in block n} eta_t grad l_t(theta_n),                  (Eq. 71)
    l_t(theta)  = 1/2 ||M_theta(k_t) - v_t||^2    k_t, v_t: learned projections of the level's input

Two memory kinds (`cms_memory`):
- "linear": M_theta(k) = k S, one matrix per head (LinearLevel: the Titans memory of hope.titans without
  its short convolution), with period C^(l) on `titans_scan` (the kernel path; one call with read="block_start" per
  forward), read at the key and at the block-start weights: y_t = W_o (rmsnorm(k_t S_n) * silu(x_t W_g)) for t in block n,
  exactly Eq. 71 (the level maps its input as an MLP with weights S_n does; a block's updates are seen
  from the next block on). Reading the weights updated token by token instead (the op's own output)
  turns every level into a frequency-1 memory that counts tokens: on MQAR it holds Hope-attention at
  0.53 where the Transformer reaches 1.00 (README, "What was found").
- "mlp": M_theta(z) = silu(z W_in) W_out (hidden size mlp_ratio * dim), block-parallel in torch:
  within block n the level reads y_t = M_{theta_n}(x_t), exactly Eq. 71 (a level whose period is
  longer than the sequence acts as a plain MLP at its meta-learned weights). Keys are unit-RMS
  (||k||^2 = dim) and eta_t = lr_max / (C dim) * sigmoid(x_t w + b), so a block's step on the
  first layer, eta ||k||^2 summed over at most C tokens, stays below lr_max < 2.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import block_segments, l2norm, split_heads, up
from .ops import get_op
from .titans import TitansLayer


def _silu_grad(h: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


class MLPLevel(nn.Module):
    """One CMS level whose memory is a 2-layer MLP with per-sequence fast weights (module docstring).
    x: [B, T, dim] -> [B, T, dim]. The cache holds the block-start weights, the gradient summed over
    the current block so far, and the number of tokens seen."""

    def __init__(self, dim: int, hidden_dim: int, period: int, *, lr_max: float = 1.0, bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if not 0.0 < lr_max < 2.0:
            raise ValueError(f"lr_max must be in (0, 2), got {lr_max}")
        self.dim, self.period, self.lr_max = dim, period, lr_max
        self.proj_kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj_lr = nn.Linear(dim, 1, bias=False)
        self.lr_bias = nn.Parameter(torch.zeros(1))
        self.w_in = nn.Parameter(0.02 * torch.randn(dim, hidden_dim))
        self.w_out = nn.Parameter(0.01 * torch.randn(hidden_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, D = x.shape
        k, v = up(self.proj_kv(x)).chunk(2, dim=-1)
        k = F.rms_norm(k, (D,))
        lr = (self.lr_max / (self.period * D)) * torch.sigmoid(up(self.proj_lr(x)) + up(self.lr_bias))
        cache = {} if cache is None else cache
        pos = cache.get("pos", 0)
        w_in = cache.get("w_in", up(self.w_in).expand(B, *self.w_in.shape))
        w_out = cache.get("w_out", up(self.w_out).expand(B, *self.w_out.shape))
        g_in, g_out = cache.get("g_in"), cache.get("g_out")
        ys = []
        segments = block_segments(pos, T, self.period, per_block=True)
        sizes = [b - a for a, b in segments]   # split once: a slice's backward writes a full-length gradient
        parts = zip(up(x).split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), lr.split(sizes, 1))
        for (a, b), (xs, ks, vs, lrs) in zip(segments, parts):
            ys.append(torch.bmm(F.silu(torch.bmm(xs, w_in)), w_out))
            # the block's inner-loss gradient at its start weights (explicit backward of the MLP)
            hk = torch.bmm(ks, w_in)
            ak = F.silu(hk)
            err = (torch.bmm(ak, w_out) - vs) * lrs
            d_out = torch.bmm(ak.transpose(1, 2), err)
            d_in = torch.bmm(ks.transpose(1, 2), torch.bmm(err, w_out.transpose(1, 2)) * _silu_grad(hk))
            g_in = d_in if g_in is None else g_in + d_in
            g_out = d_out if g_out is None else g_out + d_out
            if (pos + b) % self.period == 0:
                w_in, w_out, g_in, g_out = w_in - g_in, w_out - g_out, None, None
        cache.update(pos=pos + T, w_in=w_in, w_out=w_out, g_in=g_in, g_out=g_out)
        y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]
        return self.dropout(y.to(x.dtype))


class LinearLevel(TitansLayer):
    """One CMS level whose memory is a matrix per head (module docstring): the Titans memory with
    q = k (no short convolution, no momentum), read at the key and at the block-start memory,
    o_t = k_t Sbar_n (Eq. 71, as an MLP with weights Sbar_n reads its input; titans_scan's
    read="block_start"): a block's updates are seen from the next block on. x: [B, T, dim] -> [B, T, dim]."""

    streams = 2            # k and v

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, *, period: int = 16,
                 lr_max: float = 1.0, bias: bool = False, dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__(dim, num_heads, head_dim, period=period, lr_max=lr_max, conv_window=0, bias=bias,
                         dropout=dropout, backend=backend)

    def _inputs(self, h, gates, mom):
        k, v = (split_heads(t, self.num_heads) for t in h.chunk(2, dim=-1))
        q = k = l2norm(k)
        return q, k, v, self._lr(gates[:, :, 0]), self._decay(gates[:, :, 1]), mom

    def _scan(self, inputs, state):
        return get_op("titans_scan", self.backend)(*inputs, 1.0, period=self.period, read="block_start",
                                                   initial_state=state, output_final_state=True)

    def _continue(self, inputs, state, block_state, step: bool):
        o, state = super()._continue(inputs, state, block_state, step)
        return torch.einsum("bthk,bhkv->bthv", up(inputs[0]), block_state).to(o.dtype), state


def make_level(config, period: int, backend: Optional[str] = None) -> nn.Module:
    """A CMS level of kind config.cms_memory with update period `period`."""
    c = config
    if c.cms_memory == "mlp":
        return MLPLevel(c.dim, int(c.mlp_ratio * c.dim), period, lr_max=c.cms_lr_max, bias=c.bias,
                        dropout=c.dropout)
    return LinearLevel(c.dim, c.num_heads, c.head_dim, period=period, lr_max=c.cms_lr_max, bias=c.bias,
                       dropout=c.dropout, backend=backend)
