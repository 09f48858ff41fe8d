"""The HOPE block: the frequency spectrum, each part pre-norm residual.

    x = x + attn(norm_1(x))   # the sequence memory: softmax or linear attention (hope.attention), Titans
                              # (hope.titans) or self-modifying Titans (hope.selfmod)
    # cms="multiscale" (the seed block, the default):
    x = x + cms(norm_2(x))    # the Continuum Memory System: M timescales (hope.cms)
    x = x + mlp(norm_3(x))    # zero frequency: static weights
    # cms="levels" (the paper's HOPE, Eq. 70-71): levels that learn in context every C^(l) tokens
    x = x + level_l(norm_l(x))   for l = 1 .. len(cms_periods)   (hope.levels; the levels replace the MLP)
    # cms="none": attention and the MLP (a Transformer block)

Variants by config: seed (attention="softmax", cms="multiscale"), the paper's HOPE (attention="titans",
self_modifying=True, cms="levels"), Hope-attention (attention="softmax", cms="levels").

The multiscale CMS (hope/cms.py; docs/findings.md): its q, k, v pass a short causal convolution, so a
key can describe the token before the value it stores, and each memory writes with the delta rule
(S = tau S - beta k^T (k S - v)), which overwrites what a key stored instead of adding to it. With the
seed's additive write (the CMS ablation, benchmarks/quality/designs.py) the memory counts tokens,
which hands MQAR a shortcut (guess a value not yet asked for: 0.53) that delays the attention's
induction circuit; with both changes the block matches the Transformer on MQAR (0.999 vs 1.000,
3 seeds) and beats it on byte-level LM. The CMS levels read their block-start weights (Eq. 71) for
the same reason.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import LinearAttention, SoftmaxAttention
from .cms import CMSLayer
from .config import HOPEConfig
from .layers import MLP, RMSNorm
from .levels import make_level
from .selfmod import SelfModifyingTitans
from .titans import TitansLayer


def _sub(cache: Optional[dict], name: str) -> Optional[dict]:
    return None if cache is None else cache.setdefault(name, {})


def make_attention(c: HOPEConfig, backend: Optional[str] = None) -> nn.Module:
    """The block's sequence memory of kind c.attention."""
    if c.attention == "softmax":
        return SoftmaxAttention(c.dim, c.num_heads, c.head_dim, bias=c.bias, dropout=c.dropout,
                                position=c.position, rope_base=c.rope_base, backend=backend)
    if c.attention == "titans":
        kind, extra = (SelfModifyingTitans, {"selfmod_init": c.titans_selfmod_init,
                                             "mem_period": c.titans_mem_period}) if c.self_modifying \
            else (TitansLayer, {})
        return kind(c.dim, c.num_heads, c.head_dim, period=c.titans_period, momentum=c.titans_momentum,
                    lr_max=c.titans_lr_max, bias=c.bias, dropout=c.dropout, backend=backend, **extra)
    return LinearAttention(c.dim, c.num_heads, c.head_dim, bias=c.bias, dropout=c.dropout, backend=backend)


def make_cms(c: HOPEConfig, backend: Optional[str] = None, **layer) -> CMSLayer:
    """The multiscale CMS of c; `layer`: CMSLayer arguments that HOPEConfig does not carry (the CMS
    ablation's earlier designs, benchmarks/quality/designs.py)."""
    return CMSLayer(c.dim, c.num_heads, c.num_memory_modules, c.head_dim, tau_min=c.cms_tau_min,
                    tau_max=c.cms_tau_max, learn_tau=c.cms_learn_tau, bias=c.bias, dropout=c.dropout,
                    backend=backend, **layer)


class HOPEBlock(nn.Module):
    def __init__(self, config: HOPEConfig, backend: Optional[str] = None):
        super().__init__()
        c = config
        self.attn = make_attention(c, backend)
        self.norm_attn = RMSNorm(c.dim, c.norm_eps)
        self.cms = self.mlp = None
        levels = c.cms == "levels"
        self.levels = nn.ModuleList(make_level(c, p, backend) for p in c.cms_periods) if levels else nn.ModuleList()
        self.norm_levels = nn.ModuleList(RMSNorm(c.dim, c.norm_eps) for _ in self.levels)
        if c.cms == "multiscale":
            self.norm_cms = RMSNorm(c.dim, c.norm_eps)
            self.cms = make_cms(c, backend)
        if not levels:
            self.norm_mlp = RMSNorm(c.dim, c.norm_eps)
            self.mlp = MLP(c.dim, int(c.mlp_ratio * c.dim), bias=c.bias, dropout=c.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """x: [B, T, dim]. `cache` (generation): one dict per part ("attn", "cms", "level<l>"), updated in place."""
        x = x + self.attn(self.norm_attn(x), _sub(cache, "attn"))
        if self.cms is not None:
            x = x + self.cms(self.norm_cms(x), _sub(cache, "cms"))
        for i, (norm, level) in enumerate(zip(self.norm_levels, self.levels)):
            x = x + level(norm(x), _sub(cache, f"level{i}"))
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x
