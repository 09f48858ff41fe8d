"""The CMS layer: a Continuum Memory System of M associative memories, one timescale each.

Per head, M memories read the same q, k, v; tau_m is memory m's retention per token. Two write rules
(`update`):

    "delta" (default): S_{m,t} = tau_m S_{m,t-1} - beta_t k_t^T (k_t S_{m,t-1} - v_t)   q, k unit vectors
    "outer":           S_{m,t} = tau_m S_{m,t-1} + (1 - tau_m) k_t^T v_t                 (the seed's rule)

    o_t = sum_m g_{t,m} scale q_t S_{m,t}

Both run on `hope_kernels.cms_scan` (the fused multi-timescale op; `beta=` selects the delta rule).
"delta" is one gradient step on 1/2 ||k S - v||^2 per token (the delta rule with decay, as Gated
DeltaNet / Titans at period 1; beta_t = sigmoid(x_t w_beta + b) per head, <= 1, so the step is stable
for unit keys; q and k are L2-normalised and the read-out scale is 1).
The delta rule overwrites what a key stored instead of adding to it: a value seen twice is not counted
twice, which takes away the shortcut that held the seed HOPE on an MQAR plateau (docs/findings.md).
tau_m near 1 is a slow memory (horizon ~ 1 / (1 - tau_m) tokens), near 0 a fast one. The default
timescales are log-spaced in 1 - tau from 1 - tau_min to 1 - tau_max, i.e. the horizons
1/(1 - tau) form a geometric series covering the spectrum evenly on a log scale
(M=5 with 0.01..0.99: tau = 0.01, 0.686, 0.900, 0.969, 0.99).
tau is learnable when `learn_tau` (tau = sigmoid(logit), per head when `per_head_tau`); the gates
g_t = softmax_m(x_t W_g + b_g) per head are data dependent ([B, T, H, M]), or static learned logits.

With conv_size > 1, q, k and v pass a short causal depthwise convolution over the last conv_size
tokens after their projection (hope.layers.ShortConv, as in H3, Mamba, GLA, DeltaNet): [q, k, v]_t =
sum_{i<conv_size} w_i * (x_{t-i} W_qkv). A key can then hold the token before the value it is stored
with, so the memory itself stores "key -> next token" pairs and recalls them (associative recall).
Without it, k_t and v_t describe the same token and the memory mostly counts tokens (see
benchmarks/quality/ablation.py). With `gated_readout` the read-out is the one of the Titans layer
(and GLA / Gated DeltaNet), y_t = W_o (rmsnorm(o_t) * silu(x_t W_g)) per head, else y_t = W_o o_t.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ShortConv, gated_readout, l2norm, resolve_head_dim, split_heads, up
from .ops import check_backend, get_op

# tau = sigmoid(logit) is kept inside [1e-3, 1 - 1e-4], where the kernels are numerically safe.
LOGIT_MIN, LOGIT_MAX = math.log(1e-3 / (1 - 1e-3)), math.log((1 - 1e-4) / 1e-4)
UPDATES = ("delta", "outer")
# The CMS is a side memory next to attention: its gated read-out damps a near-empty memory (|o|^2 <<
# 1e-5: the first tokens, and early in training). With float32's epsilon instead (the Titans layer's
# choice: there the memory is the sequence mixer and must be read at full scale from its first write)
# the default seed HOPE left the MQAR plateau late on one seed of three (0.962 +- 0.062 vs 0.999 +- 0.001).
READOUT_EPS = 1e-5


def default_taus(num_memory_modules: int, tau_min: float = 0.01, tau_max: float = 0.99) -> torch.Tensor:
    """M timescales with 1 - tau log-spaced from 1 - tau_min down to 1 - tau_max (float64, [M])."""
    if not 0.0 < tau_min <= tau_max < 1.0:
        raise ValueError(f"need 0 < tau_min <= tau_max < 1, got tau_min={tau_min}, tau_max={tau_max}")
    if num_memory_modules == 1:
        return torch.tensor([1.0 - math.sqrt((1.0 - tau_min) * (1.0 - tau_max))], dtype=torch.float64)
    lo, hi = math.log(1.0 - tau_max), math.log(1.0 - tau_min)
    return 1.0 - torch.exp(torch.linspace(hi, lo, num_memory_modules, dtype=torch.float64))


class CMSLayer(nn.Module):
    """Multi-timescale associative memory over the sequence. x: [B, T, dim] -> [B, T, dim].

    The cache (generation) holds the memories S [B, H, M, K, V]; a new token then costs one
    `cms_step`, O(1) in the sequence length.
    """

    def __init__(self, dim: int, num_heads: int, num_memory_modules: int, head_dim: Optional[int] = None, *,
                 tau_min: float = 0.01, tau_max: float = 0.99, learn_tau: bool = True,
                 per_head_tau: bool = True, data_dependent_mix: bool = True, conv_size: int = 4,
                 gated_readout: bool = True, update: str = "delta",
                 bias: bool = False, dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if num_memory_modules <= 0:
            raise ValueError(f"num_memory_modules must be positive, got {num_memory_modules}")
        if conv_size < 1:
            raise ValueError(f"conv_size must be >= 1 (1: no convolution), got {conv_size}")
        if update not in UPDATES:
            raise ValueError(f"update={update!r}: expected one of {UPDATES}")
        self.update = update
        self.num_heads, self.num_memories = num_heads, num_memory_modules
        self.head_dim = resolve_head_dim(dim, num_heads, head_dim)
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.conv = ShortConv(3 * inner, conv_size, init="uniform") if conv_size > 1 else None
        self.out_gate = nn.Linear(dim, inner, bias=bias) if gated_readout else None
        self.beta = nn.Linear(dim, num_heads, bias=True) if update == "delta" else None
        self.proj = nn.Linear(inner, dim, bias=bias)
        self.proj.residual_branch = True
        tau = default_taus(num_memory_modules, tau_min, tau_max)
        logit = torch.log(tau / (1 - tau)).float()
        if per_head_tau:
            logit = logit.expand(num_heads, -1).clone()
        if learn_tau:
            self.tau_logit = nn.Parameter(logit)
        else:
            self.register_buffer("tau_logit", logit)
        if data_dependent_mix:
            self.gate = nn.Linear(dim, num_heads * num_memory_modules, bias=True)
            self.mix_logit = None
        else:
            self.gate = None
            self.mix_logit = nn.Parameter(torch.zeros(num_heads, num_memory_modules))
        self.resid_dropout = nn.Dropout(dropout)
        self.backend = check_backend(backend)

    def decay(self) -> torch.Tensor:
        """tau: [M] or [H, M] (float32), in [1e-3, 1 - 1e-4]."""
        return torch.sigmoid(self.tau_logit.float().clamp(LOGIT_MIN, LOGIT_MAX))

    def mixing(self, x: torch.Tensor) -> torch.Tensor:
        """Gates summing to 1 over the memories: [B, T, H, M] (data dependent) or [H, M]."""
        return self._mix(None if self.gate is None else self.gate(x))

    def _mix(self, logits: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax over the memories of the gate logits x W_g + b_g [B, T, H * M], or of the static ones."""
        if logits is None:
            return torch.softmax(self.mix_logit.float(), dim=-1)
        B, T, _ = logits.shape
        return torch.softmax(logits.view(B, T, self.num_heads, -1).float(), dim=-1)

    def _projections(self, x: torch.Tensor) -> dict:
        """x W^T + b of qkv, out_gate, gate and beta (those the layer has; None for the others) as one
        matmul, split back by name: the parameters stay the four Linear modules (checkpoints unchanged)."""
        names = [n for n in ("qkv", "out_gate", "gate", "beta") if getattr(self, n) is not None]
        lins = [getattr(self, n) for n in names]
        bias = None
        if any(m.bias is not None for m in lins):
            bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in lins])
        y = F.linear(x, torch.cat([m.weight for m in lins]), bias).split([m.out_features for m in lins], -1)
        return {"qkv": None, "out_gate": None, "gate": None, "beta": None, **dict(zip(names, y))}

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        p = self._projections(x)
        qkv = p["qkv"] if self.conv is None else self.conv(p["qkv"], cache)
        q, k, v = (split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        decay, mix = self.decay(), self._mix(p["gate"]).to(q.dtype)
        state = cache.get("state") if cache is not None else None
        rule = {}
        if self.update == "delta":   # unit keys and queries, scale 1, beta in (0, 1): a stable step
            q, k = l2norm(q), l2norm(k)
            rule = dict(scale=1.0, beta=torch.sigmoid(up(p["beta"])))
        if state is not None and T == 1:
            step = get_op("cms_step", self.backend)
            if "beta" in rule:
                rule["beta"] = rule["beta"][:, 0]
            o, state = step(q[:, 0], k[:, 0], v[:, 0], decay, state, mix if mix.dim() == 2 else mix[:, 0], **rule)
            o = o[:, None]
        else:
            scan = get_op("cms_scan", self.backend)
            o, state = scan(q, k, v, decay, mix, initial_state=state, output_final_state=cache is not None, **rule)
        if cache is not None:
            cache["state"] = state
        y = o.reshape(B, T, -1) if self.out_gate is None else gated_readout(o, p["out_gate"], READOUT_EPS)
        return self.resid_dropout(self.proj(y))
