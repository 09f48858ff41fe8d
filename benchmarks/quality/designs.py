"""Designs that hope/ does not offer, for the CMS ablation (`benchmarks.quality.ablation`).

- The earlier CMS layers (CMS_DESIGN_FIELDS, model overrides next to HOPEConfig's fields): the seed's
  additive write, no short convolution, the ungated read-out. `build_model` builds each block's CMS
  with those CMSLayer arguments, in place of the default CMS, so the weights are drawn as a model of
  that design draws them.
- Block designs applied to a built HOPE model in place (`apply_design`): where the CMS sits in the
  block, a learned gate on its output, a per-head RMSNorm of its read-out, which layers keep a CMS,
  and H3's shift initialisation of its short convolution. The quality runner applies a job's design
  after building its model.
"""
from __future__ import annotations

import functools
import types
from typing import Optional, Sequence, Tuple
from unittest import mock

import torch
import torch.nn as nn

import hope.block
from hope import HOPE, HOPEConfig

# model override -> (CMSLayer argument, the default CMS's value)
CMS_DESIGN_FIELDS = {
    "cms_update": ("update", "delta"),             # "outer": S = tau S + (1 - tau) k^T v (the seed's write)
    "cms_conv_size": ("conv_size", 4),             # 1: no short causal convolution on q, k, v
    "cms_gated_readout": ("gated_readout", True),  # False: read-out W_o o
}


def split_overrides(overrides: dict) -> Tuple[dict, dict]:
    """(HOPEConfig overrides, CMSLayer arguments of the CMS_DESIGN_FIELDS among them)."""
    config = {k: v for k, v in overrides.items() if k not in CMS_DESIGN_FIELDS}
    cms = {CMS_DESIGN_FIELDS[k][0]: v for k, v in overrides.items() if k in CMS_DESIGN_FIELDS}
    return config, cms


def design_config(overrides: dict) -> dict:
    """Everything that defines the model of `overrides`: the HOPEConfig's fields and every CMS design
    field (at its default where not given)."""
    config, cms = split_overrides(overrides)
    fields = HOPEConfig.from_dict(config).to_dict()
    return {**fields, **{k: cms.get(arg, default) for k, (arg, default) in CMS_DESIGN_FIELDS.items()}}


def build_model(overrides: dict, seed: int, backend: Optional[str] = "torch") -> HOPE:
    """The HOPE model of `overrides` (HOPEConfig fields and CMS_DESIGN_FIELDS) with its weights drawn
    from `seed`, on `backend`."""
    config, cms = split_overrides(overrides)
    config = HOPEConfig.from_dict(config)
    torch.manual_seed(seed)
    if not cms:
        return HOPE(config, backend=backend)
    if config.cms != "multiscale":
        raise ValueError(f"{sorted(set(overrides) & set(CMS_DESIGN_FIELDS))} need cms='multiscale', got "
                         f"cms={config.cms!r}")
    with mock.patch.object(hope.block, "make_cms", functools.partial(hope.block.make_cms, **cms)):
        return HOPE(config, backend=backend)

PLACEMENTS = ("serial", "parallel", "after_mlp", "before_attn")


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's read-out o [B, T, H * D] (per-head group norm, as in RetNet / GLA)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        B, T, _ = o.shape
        h = o.float().view(B, T, self.num_heads, -1)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.view(B, T, -1) * self.weight).to(o.dtype)


def _forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
    """The HOPE block with the CMS at self.placement and its output times self.cms_gate (if any)."""
    def cms(h):
        y = self.cms(self.norm_cms(h))
        return y if self.cms_gate is None else y * self.cms_gate.to(y.dtype)
    attn = lambda h: self.attn(self.norm_attn(h))
    mlp = lambda h: self.mlp(self.norm_mlp(h))
    if self.cms is None:
        x = x + attn(x)
    elif self.placement == "serial":
        x = x + attn(x)
        x = x + cms(x)
    elif self.placement == "parallel":
        x = x + attn(x) + cms(x)
    elif self.placement == "before_attn":
        x = x + cms(x)
        x = x + attn(x)
    else:  # after_mlp
        x = x + attn(x)
        x = x + mlp(x)
        return x + cms(x)
    return x + mlp(x)


def apply_design(model: nn.Module, placement: str = "serial", gate: Optional[str] = None, out_norm: bool = False,
                 cms_layers: Optional[Sequence[int]] = None, shift_init: bool = False) -> nn.Module:
    """Rewire every block of a built HOPE (cms="multiscale") in place: placement of the CMS (PLACEMENTS),
    gate None | "scalar" | "channel" (learned, initialised at 0), out_norm (HeadRMSNorm before the
    CMS output projection), cms_layers (indices of the blocks that keep their CMS; None: all),
    shift_init (H3's init of the CMS short convolution: k_t reads x_{t-1}, q_t and v_t read x_t)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: expected one of {PLACEMENTS}")
    if gate not in (None, "scalar", "channel"):
        raise ValueError(f"gate={gate!r}: expected None, 'scalar' or 'channel'")
    for i, block in enumerate(model.blocks):
        if block.cms is None:
            raise ValueError("apply_design needs a model built with cms='multiscale'")
        if cms_layers is not None and i not in cms_layers:
            block.cms = None
        block.placement = placement
        dim = block.norm_attn.weight.numel()
        block.cms_gate = None if gate is None else nn.Parameter(torch.zeros(1 if gate == "scalar" else dim))
        if shift_init and block.cms is not None:
            w, inner = block.cms.conv.weight, block.cms.conv.weight.shape[0] // 3
            with torch.no_grad():
                w.zero_()
                w[:inner, -1] = w[2 * inner:, -1] = 1.0
                w[inner:2 * inner, -2] = 1.0
        if out_norm and block.cms is not None:
            block.cms.proj = nn.Sequential(HeadRMSNorm(block.cms.num_heads, block.cms.head_dim), block.cms.proj)
        block.forward = types.MethodType(_forward, block)
    return model
