"""The HOPE block: the frequency spectrum, each part pre-norm residual.

    x = x + attn(norm_1(x))   # the sequence memory: softmax or linear attention, or Titans (hope.titans)
    # the seed block (cms="decay"):
    x = x + cms(norm_2(x))    # the Continuum Memory System: M timescales (if use_cms)
    x = x + mlp(norm_3(x))    # zero frequency: static weights
    # the paper's HOPE (cms="levels", Eq. 70-71): levels that learn in context every C^(l) tokens
    x = x + level_l(norm_l(x))   for l = 1 .. len(cms_periods)   (no static MLP: the levels replace it)

Variants by config: seed (attention="softmax", cms="decay"), the paper's HOPE (attention="titans",
self_modifying=True, cms="levels"), Hope-attention (attention="softmax", cms="levels").

The seed CMS (hope/cms.py; docs/findings.md): its q, k, v pass a short causal
convolution (cms_conv_size=4), so a key can describe the token before the value it stores, and each
memory writes with the delta rule (cms_update="delta": S = tau S - beta k^T (k S - v)), which overwrites
what a key stored instead of adding to it. With the seed's additive write (cms_update="outer") the
memory counts tokens, which hands MQAR a shortcut (guess a value not yet asked for: 0.53) that delays
the attention's induction circuit; with both changes the block matches the Transformer on MQAR (0.999
vs 1.000, 3 seeds) and beats it on byte-level LM. The CMS levels read their block-start weights
(Eq. 71) for the same reason.
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
from .titans import TitansLayer


def _sub(cache: Optional[dict], name: str) -> Optional[dict]:
    return None if cache is None else cache.setdefault(name, {})


class HOPEBlock(nn.Module):
    def __init__(self, config: HOPEConfig):
        super().__init__()
        c = config
        if c.attention == "softmax":
            self.attn = SoftmaxAttention(c.dim, c.num_heads, c.head_dim, bias=c.bias, dropout=c.dropout,
                                         position=c.position, rope_base=c.rope_base, backend=c.backend)
        elif c.attention == "titans":
            self.attn = TitansLayer(c.dim, c.num_heads, c.head_dim, period=c.titans_period,
                                    self_modifying=c.self_modifying, momentum=c.titans_momentum,
                                    selfmod_init=c.titans_selfmod_init,
                                    lr_max=c.titans_lr_max, conv_window=c.titans_conv, bias=c.bias,
                                    dropout=c.dropout, backend=c.backend)
        else:
            self.attn = LinearAttention(c.dim, c.num_heads, c.head_dim, normalize=c.linear_normalize,
                                        bias=c.bias, dropout=c.dropout, backend=c.backend)
        self.norm_attn = RMSNorm(c.dim, c.norm_eps)
        self.cms = self.mlp = None
        self.levels = nn.ModuleList(make_level(c, p) for p in c.cms_periods) if c.cms_levels else nn.ModuleList()
        self.norm_levels = nn.ModuleList(RMSNorm(c.dim, c.norm_eps) for _ in self.levels)
        if c.use_cms and not c.cms_levels:
            self.norm_cms = RMSNorm(c.dim, c.norm_eps)
            self.cms = CMSLayer(c.dim, c.num_heads, c.num_memory_modules, c.head_dim, tau_min=c.cms_tau_min,
                                tau_max=c.cms_tau_max, learn_tau=c.cms_learn_tau,
                                per_head_tau=c.cms_per_head_tau, data_dependent_mix=c.cms_data_dependent_mix,
                                conv_size=c.cms_conv_size, gated_readout=c.cms_gated_readout, update=c.cms_update,
                                bias=c.bias, dropout=c.dropout, backend=c.backend)
        if not c.cms_levels:
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
