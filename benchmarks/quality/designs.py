"""Designs that hope/ does not offer, for the ablations (`benchmarks.quality.ablation`).

- The earlier CMS layers (CMS_DESIGN_FIELDS, model overrides next to HOPEConfig's fields): the seed's
  additive write, no short convolution, the ungated read-out. `build_model` builds each block's CMS
  with those CMSLayer arguments, in place of the default CMS, so the weights are drawn as a model of
  that design draws them.
- Block designs applied to a built HOPE model in place (`apply_design`): where the CMS sits in the
  block, a learned gate on its output, a per-head RMSNorm of its read-out, which layers keep a CMS,
  and H3's shift initialisation of its short convolution. The quality runner applies a job's design
  after building its model.
- Self-modifying Titans designs applied in place (`apply_selfmod`, reached through apply_design's
  `selfmod` argument), each one part of hope/selfmod.py's memory changed (its docstring and
  hope_kernels/titans/selfmod.py have the math; M = [M_k | M_v | M_eta | M_alpha | M_mem], Mbar the
  block-start memory):

    init="orthogonal"   M_k, M_v start as two independent random orthogonal D x D matrices instead of
                        both the identity; with M_k = M_v every k_t = v_t and every write
                        G_t = k_t^T (k_t Mbar - v_t Mbar) is exactly zero at initialisation
    init_mem=0.0        M_mem starts at this multiple of the identity (default 1: the identity)
    kv="static"         k_t = norm(u_t W_k), v_t = norm(u_t W_v) with learned W_k, W_v (initialised
                        from M_k, M_v's initial state) instead of the reads of the block-start memory
    values="v"          the output memory M_mem is written toward v_t (Titans' own target) instead of
                        its self-generated value vhat_t = v_t Mbar_mem; the other memories keep vhat

  kv and values need their own scan (`selfmod_scan`, the op's chunk form in torch, no momentum and no
  cache: training only); init alone keeps the op.
"""
from __future__ import annotations

import functools
import types
from typing import Optional, Sequence, Tuple
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import hope.block
from hope import HOPE, HOPEConfig
from hope.selfmod import SelfModifyingTitans, random_orthogonal

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
                 cms_layers: Optional[Sequence[int]] = None, shift_init: bool = False,
                 selfmod: Optional[dict] = None) -> nn.Module:
    """Rewire every block of a built HOPE (cms="multiscale") in place: placement of the CMS (PLACEMENTS),
    gate None | "scalar" | "channel" (learned, initialised at 0), out_norm (HeadRMSNorm before the
    CMS output projection), cms_layers (indices of the blocks that keep their CMS; None: all),
    shift_init (H3's init of the CMS short convolution: k_t reads x_{t-1}, q_t and v_t read x_t).
    With `selfmod` (apply_selfmod's arguments) only the self-modifying Titans layers change."""
    if selfmod is not None:
        return apply_selfmod(model, **selfmod)
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


INITS, KVS, VALUES = ("identity", "orthogonal"), ("memory", "static"), ("vhat", "v")


def selfmod_scan(q, u, lr_bias, decay_bias, lr_max: float, period: int, M, W_kv=None, values: str = "vhat",
                 eps: float = 1e-6):
    """The self-modifying Titans memory (hope_kernels/titans/selfmod.py's math) block by block, with
    k, v read from the static W_kv = (W_k, W_v) [H, D, D] when given, and M_mem written toward v
    when values == "v". q, u [B, T, H, D], M [B, H, D, 3D + 2]; returns (o [B, T, H, D], M_end)."""
    B, T, H, D = q.shape
    mem = slice(2 * D + 2, None)
    unit = lambda x: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)   # noqa: E731
    outs = []
    for qb, ub in zip(q.transpose(1, 2).split(period, 2), u.transpose(1, 2).split(period, 2)):
        r = ub @ M                                                             # [B, H, L, W]
        kk, vv = (r[..., :D], r[..., D:2 * D]) if W_kv is None else (ub @ W_kv[0], ub @ W_kv[1])
        k, v = unit(kk), unit(vv)
        lr = (lr_max / period) * torch.sigmoid(r[..., 2 * D] + lr_bias[:, None])
        LD = F.logsigmoid(r[..., 2 * D + 1] + decay_bias[:, None]).cumsum(-1)   # log decay products
        target = v @ M
        if values == "v":
            target = torch.cat([target[..., :2 * D + 2], v], -1)
        X = lr[..., None] * (target - k @ M)                                   # -lr times the gradient rows
        C = (LD[..., :, None] - LD[..., None, :]).masked_fill(
            ~torch.ones(LD.shape[-1], LD.shape[-1], dtype=torch.bool, device=q.device).tril(), float("-inf")).exp()
        outs.append(LD.exp()[..., None] * (qb @ M[..., mem]) + ((qb @ k.transpose(-1, -2)) * C) @ X[..., mem])
        M = LD[..., -1, None, None].exp() * M + (C[..., -1, :, None] * k).transpose(-1, -2) @ X
    return torch.cat(outs, 2).transpose(1, 2), M


def _selfmod_scan_method(self, inputs, state):
    q, u, mom = inputs
    if mom is not None or isinstance(state, tuple):
        raise ValueError("the self-modifying Titans designs kv='static' / values='v' have no momentum")
    W_kv = None if self.design_kv is None else (self.design_kv[0], self.design_kv[1])
    o, M = selfmod_scan(q, u, self.lr_bias, self.decay_bias, self.lr_max, self.period, state, W_kv,
                        self.design_values)
    return o, M


def _no_continue(self, *args, **kwargs):
    raise NotImplementedError("the self-modifying Titans designs kv='static' / values='v' train only "
                              "(no cached generation)")


def apply_selfmod(model: nn.Module, init: str = "identity", init_mem: float = 1.0, kv: str = "memory",
                  values: str = "vhat") -> nn.Module:
    """Change every self-modifying Titans layer of a built HOPE in place (module docstring): init of
    M_k / M_v (INITS), init_mem (M_mem's initial multiple of the identity), kv (KVS), values (VALUES)."""
    for name, choice, allowed in (("init", init, INITS), ("kv", kv, KVS), ("values", values, VALUES)):
        if choice not in allowed:
            raise ValueError(f"{name}={choice!r}: expected one of {allowed}")
    layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
    if not layers:
        raise ValueError("apply_selfmod needs a model with self-modifying Titans layers (self_modifying=True)")
    for layer in layers:
        H, D = layer.num_heads, layer.head_dim
        with torch.no_grad():
            M0 = layer.initial_memory
            if init == "orthogonal":
                M0[..., :D], M0[..., D:2 * D] = random_orthogonal(H, D), random_orthogonal(H, D)
            M0[..., 2 * D + 2:] = init_mem * torch.eye(D)
        layer.design_kv = nn.Parameter(torch.stack([M0[..., :D], M0[..., D:2 * D]]).clone()) if kv == "static" else None
        layer.design_values = values
        if kv == "static" or values == "v":
            layer._scan = types.MethodType(_selfmod_scan_method, layer)
            layer._continue = types.MethodType(_no_continue, layer)
    return model
