"""What is benchmarked: each op's inputs, each provider's call, and the float64 ground truth.

An op case builds its inputs for a `Shape`, runs them through a provider and returns one output
tensor (differentiable for the scans). Providers:

- "triton":    the hope_kernels Triton kernels (`backend="triton"`: CUDA, or TRITON_INTERPRET=1).
- "torch":     the chunked PyTorch backend (`backend="torch"`).
- "reference": `hope_kernels.reference`, the token-by-token recurrences (slow on purpose).
- "sdpa":      softmax attention, `torch.nn.functional.scaled_dot_product_attention`, at the same
               shape (causal or not); for the step op, one query against a T-token KV cache.
- "fla":       flash-linear-attention's `chunk_linear_attn` (linear attention),
               `chunk_simple_gla` (cms_scan as H*M decayed heads) and `chunk_delta_rule`
               (titans_scan with period 1, no decay, no momentum: the delta rule),
               `chunk_gated_delta_rule` (cms_scan's delta rule as H*M gated delta-rule heads; and
               titans_scan_dgd: period 1 with decay, timed only, its math differs in where the decay
               applies), only when `fla` imports (GPU).
- "titans":    cms_scan's delta rule as `titans_scan` (period 1) over H*M heads, q, k, v expanded M
               times: the unfused form the fused op replaces (Triton where it runs, else torch).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import hope_kernels
from hope_kernels import reference

from .roofline import Shape, ema_numel

PROVIDERS = ("triton", "torch", "reference", "sdpa", "fla", "titans")
MODES = ("fwd", "bwd", "fwd+bwd")


# --------------------------------------------------------------------------- inputs
def _randn(*shape, dtype, device, grad=False, scale=1.0):
    t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def cms_decay(H: int, M: int, device) -> torch.Tensor:
    """Timescales spread log-uniformly over 1 - tau in [0.01, 0.99] per memory, shifted per head."""
    base = 1.0 - torch.logspace(math.log10(0.99), math.log10(0.01), M, dtype=torch.float32)
    shift = torch.linspace(0.0, 0.5, H, dtype=torch.float32)[:, None] * (1.0 - base)[None] * 0.1
    return (base[None] + shift).clamp(0.005, 0.995).to(device)


@dataclass
class Inputs:
    """Tensors of one case; `grads` are the leaves gradients are taken for, `args` feed the call."""
    args: Dict[str, torch.Tensor]
    grads: List[str] = field(default_factory=list)

    def leaves(self) -> List[torch.Tensor]:
        return [self.args[n] for n in self.grads]

    def as_float64(self) -> "Inputs":
        """The same (already rounded) values in float64, as fresh leaves, for the ground truth."""
        args = {n: (t.detach().double().requires_grad_(n in self.grads) if t.is_floating_point() else t)
                for n, t in self.args.items()}
        return Inputs(args, list(self.grads))

    def clone(self) -> "Inputs":
        """Fresh copies of in-place targets (states) so a call cannot change the next one's inputs."""
        return Inputs({n: (t if t.requires_grad else t.clone()) for n, t in self.args.items()}, list(self.grads))


# --------------------------------------------------------------------------- op cases
@dataclass
class Case:
    name: str
    modes: Tuple[str, ...]
    providers: Tuple[str, ...]
    make: Callable[[Shape, torch.dtype, torch.device, bool], Inputs]
    call: Callable[[str, Dict[str, torch.Tensor]], torch.Tensor]
    long_reference: bool = True  # False: the reference loops per token, keep it to small T
    inplace: bool = False


def _hk(op: str, provider: str):
    """The hope_kernels op (with its backend bound) or its reference."""
    if provider == "reference":
        return getattr(reference, op)
    fn = getattr(hope_kernels, op)
    return lambda *a, **kw: fn(*a, backend=provider, **kw)


def _fla_kwargs(fn) -> dict:
    params = inspect.signature(fn).parameters
    return {"head_first": False} if "head_first" in params else {}


def _sdpa(q, k, v, causal: bool):
    """[B, T, H, D] in and out, through SDPA's [B, H, T, D] layout."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return o.transpose(1, 2)


# linear_attention (causal / non-causal)
def _make_la(s: Shape, dtype, device, grad):
    return Inputs({"q": _randn(s.B, s.T, s.H, s.K, dtype=dtype, device=device, grad=grad),
                   "k": _randn(s.B, s.T, s.H, s.K, dtype=dtype, device=device, grad=grad),
                   "v": _randn(s.B, s.T, s.H, s.V, dtype=dtype, device=device, grad=grad)},
                  ["q", "k", "v"] if grad else [])


def _call_la(causal: bool):
    def call(provider, a):
        if provider == "sdpa":
            return _sdpa(a["q"], a["k"], a["v"], causal)
        if provider == "fla":
            from fla.ops.linear_attn import chunk_linear_attn
            return chunk_linear_attn(a["q"], a["k"], a["v"], normalize=False, **_fla_kwargs(chunk_linear_attn))[0]
        return _hk("linear_attention", provider)(a["q"], a["k"], a["v"], causal=causal)[0]
    return call


# cms_scan (without / with data-dependent mix gates)
def _make_cms(mix: bool):
    def make(s: Shape, dtype, device, grad):
        inp = _make_la(s, dtype, device, grad)
        inp.args["decay"] = cms_decay(s.H, s.M, device)
        if mix:
            inp.args["mix"] = torch.softmax(torch.randn(s.B, s.T, s.H, s.M, device=device), -1).to(dtype)
            inp.args["mix"].requires_grad_(grad)
            if grad:
                inp.grads.append("mix")
        return inp
    return make


def _fla_cms(q, k, v, decay, mix):
    """cms_scan as chunk_simple_gla over H*M heads: k scaled by (1 - tau), log-decay log(tau)."""
    from fla.ops.simple_gla import chunk_simple_gla
    B, T, H, K = q.shape
    M = decay.shape[-1]
    tau = decay.to(torch.float32)                                     # [H, M]
    qm = q[:, :, :, None].expand(B, T, H, M, K).reshape(B, T, H * M, K)
    km = (k[:, :, :, None] * (1 - tau)[..., None].to(k.dtype)).reshape(B, T, H * M, K)
    vm = v[:, :, :, None].expand(B, T, H, M, v.shape[-1]).reshape(B, T, H * M, -1)
    g = tau.log().reshape(1, 1, H * M).expand(B, T, H * M).contiguous()
    o = chunk_simple_gla(qm, km, vm, g=g, scale=K ** -0.5, **_fla_kwargs(chunk_simple_gla))[0]
    o = o.reshape(B, T, H, M, -1)
    return o if mix is None else (o * mix[..., None]).sum(-2)


def _call_cms(provider, a):
    mix = a.get("mix")
    if provider == "fla":
        return _fla_cms(a["q"], a["k"], a["v"], a["decay"], mix)
    return _hk("cms_scan", provider)(a["q"], a["k"], a["v"], a["decay"], mix)[0]


# cms_scan with the delta rule (beta [B, T, H], data-dependent mix, unit-norm keys: a stable step)
def _make_cms_delta(s: Shape, dtype, device, grad):
    inp = _make_cms(True)(s, dtype, device, grad)
    inp.args["k"] = F.normalize(inp.args["k"].detach().float(), dim=-1).to(dtype).requires_grad_(grad)
    inp.args["beta"] = (0.1 + 0.8 * torch.rand(s.B, s.T, s.H, device=device)).requires_grad_(grad)
    if grad:
        inp.grads.append("beta")
    return inp


def _expanded_heads(a):
    """q, k, v, beta and tau of cms_scan's delta rule as H*M heads (memory m of head h: head h M + m)."""
    q, k, v, beta, tau = a["q"], a["k"], a["v"], a["beta"], a["decay"]
    B, T, H, K = q.shape
    M = tau.shape[-1]
    fold = lambda x: x[:, :, :, None].expand(B, T, H, M, x.shape[-1]).reshape(B, T, H * M, x.shape[-1])
    lr = beta[..., None].expand(B, T, H, M).reshape(B, T, H * M)
    return fold(q), fold(k), fold(v), lr, tau.reshape(1, 1, H * M).expand(B, T, H * M)


def _call_cms_delta(provider, a):
    mix = a["mix"]
    if provider in ("fla", "titans"):
        q, k, v, lr, tau = _expanded_heads(a)
        B, T, H, K = a["q"].shape
        if provider == "fla":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            o = chunk_gated_delta_rule(q, k, v, g=tau.log().contiguous(), beta=lr.to(q.dtype), scale=K ** -0.5,
                                       **_fla_kwargs(chunk_gated_delta_rule))[0]
        else:
            o = hope_kernels.titans_scan(q, k, v, lr, tau.contiguous(), period=1)[0]
        return (o.reshape(B, T, H, -1, v.shape[-1]) * mix[..., None]).sum(-2)
    return _hk("cms_scan", provider)(a["q"], a["k"], a["v"], a["decay"], mix, beta=a["beta"])[0]


# titans_scan: unit-norm keys and lr in (0, 1) keep the inner gradient descent stable (lr ||k||^2 < 2)
def _make_titans(gated: bool, momentum: bool = True):
    def make(s: Shape, dtype, device, grad):
        inp = _make_la(s, dtype, device, grad)
        inp.args["k"] = F.normalize(inp.args["k"].detach().float(), dim=-1).to(dtype).requires_grad_(grad)
        gates = {"lr": (0.1, 0.9)} | ({"decay": (0.9, 1.0)} if gated else {}) \
            | ({"momentum": (0.0, 0.9)} if gated and momentum else {})
        for name, (lo, hi) in gates.items():
            g = lo + (hi - lo) * torch.rand(s.B, s.T, s.H, device=device)
            inp.args[name] = g.requires_grad_(grad)
            if grad:
                inp.grads.append(name)
        return inp
    return make


def _call_titans(period: int):
    def call(provider, a):
        if provider == "fla" and "decay" in a:
            # fla's gated delta rule, S_t = d_t (I - beta k^T k) S_{t-1} + beta k^T v, against our
            # S_t = (d_t I - lr k^T k) S_{t-1} + lr k^T v: the same work, not the same numbers
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            return chunk_gated_delta_rule(a["q"], a["k"], a["v"], a["decay"].log(), a["lr"].to(a["q"].dtype),
                                          scale=a["q"].shape[-1] ** -0.5, **_fla_kwargs(chunk_gated_delta_rule))[0]
        if provider == "fla":  # the delta rule: fla's beta is our lr
            from fla.ops.delta_rule import chunk_delta_rule
            return chunk_delta_rule(a["q"], a["k"], a["v"], a["lr"].to(a["q"].dtype), scale=a["q"].shape[-1] ** -0.5,
                                    **_fla_kwargs(chunk_delta_rule))[0]
        gates = {n: a[n] for n in ("decay", "momentum") if n in a}
        return _hk("titans_scan", provider)(a["q"], a["k"], a["v"], a["lr"], period=period, **gates)[0]
    return call


# titans_selfmod_scan (the paper's period 16, no momentum: the shipped configs) and the HOPE layers around it
SELFMOD_PERIOD = 16


def _make_selfmod(s: Shape, dtype, device, grad):
    D, W = s.K, 3 * s.K + 2
    q = F.normalize(torch.randn(s.B, s.T, s.H, D, device=device), dim=-1).to(dtype).requires_grad_(grad)
    eye = torch.eye(D, device=device).expand(s.B, s.H, D, D)
    M0 = torch.cat([eye, eye, 0.02 * torch.randn(s.B, s.H, D, 2, device=device), eye], -1) \
        + 0.1 * torch.randn(s.B, s.H, D, W, device=device)
    args = {"q": q, "u": _randn(s.B, s.T, s.H, D, dtype=dtype, device=device, grad=grad),
            "lr_bias": torch.zeros(s.H, device=device).requires_grad_(grad),
            "decay_bias": torch.full((s.H,), 4.0, device=device).requires_grad_(grad),
            "M0": M0.requires_grad_(grad)}
    return Inputs(args, list(args) if grad else [])


def _call_selfmod(provider, a):
    return _hk("titans_selfmod_scan", provider)(a["q"], a["u"], a["lr_bias"], a["decay_bias"], lr_max=1.0,
                                                period=SELFMOD_PERIOD, initial_state=a["M0"])[0]


_LAYERS: Dict[tuple, torch.nn.Module] = {}


def _layer(kind: str, dim: int, H: int, provider: str, dtype, device) -> torch.nn.Module:
    """The layer of `kind` (same weights for every provider and dtype: built from one seed, then cast)."""
    key = (kind, dim, H, provider, dtype, str(device))
    if key not in _LAYERS:
        from hope.levels import LinearLevel
        from hope.selfmod import SelfModifyingTitans
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        if kind == "selfmod":     # the paper's HOPE attention part (hope_paper.yaml)
            layer = SelfModifyingTitans(dim, H, period=SELFMOD_PERIOD, backend=provider)
        else:                     # a CMS level (hope.levels.make_level, cms_memory="linear")
            layer = LinearLevel(dim, H, period=SELFMOD_PERIOD, backend=provider)
        torch.random.set_rng_state(state)
        _LAYERS[key] = layer.to(device=device, dtype=dtype)
    return _LAYERS[key]


def _make_layer(s: Shape, dtype, device, grad):
    return Inputs({"x": _randn(s.B, s.T, s.H * s.K, dtype=dtype, device=device, grad=grad),
                   "heads": torch.tensor(s.H)}, ["x"] if grad else [])


def _call_layer(kind: str):
    def call(provider, a):
        x = a["x"]
        return _layer(kind, x.shape[-1], int(a["heads"]), provider, x.dtype, x.device)(x)
    return call


# linear_attention_step (SDPA: one query against a T-token KV cache)
def _make_la_step(s: Shape, dtype, device, grad):
    args = {"q": _randn(s.B, s.H, s.K, dtype=dtype, device=device),
            "k": _randn(s.B, s.H, s.K, dtype=dtype, device=device),
            "v": _randn(s.B, s.H, s.V, dtype=dtype, device=device),
            "state": _randn(s.B, s.H, s.K, s.V, dtype=torch.float32, device=device)}
    args["k_cache"] = _randn(s.B, s.H, s.T, s.K, dtype=dtype, device=device)
    args["v_cache"] = _randn(s.B, s.H, s.T, s.V, dtype=dtype, device=device)
    return Inputs(args)


def _call_la_step(provider, a):
    if provider == "sdpa":
        return F.scaled_dot_product_attention(a["q"][:, :, None], a["k_cache"], a["v_cache"])[:, :, 0]
    return _hk("linear_attention_step", provider)(a["q"], a["k"], a["v"], a["state"])[0]


# cms_step (data-dependent gates [B, H, M])
def _make_cms_step(s: Shape, dtype, device, grad):
    args = {"q": _randn(s.B, s.H, s.K, dtype=dtype, device=device),
            "k": _randn(s.B, s.H, s.K, dtype=dtype, device=device),
            "v": _randn(s.B, s.H, s.V, dtype=dtype, device=device),
            "decay": cms_decay(s.H, s.M, device),
            "state": _randn(s.B, s.H, s.M, s.K, s.V, dtype=torch.float32, device=device),
            "mix": torch.softmax(torch.randn(s.B, s.H, s.M, device=device), -1).to(dtype)}
    return Inputs(args)


def _call_cms_step(provider, a):
    return _hk("cms_step", provider)(a["q"], a["k"], a["v"], a["decay"], a["state"], a["mix"])[0]


# ema_update_ (float32 buffers [M, N], a shared update [N] in the benchmark dtype)
def _make_ema(s: Shape, dtype, device, grad):
    n = ema_numel(s)
    return Inputs({"states": _randn(s.M, n, dtype=torch.float32, device=device),
                   "update": _randn(n, dtype=dtype, device=device),
                   "decay": cms_decay(1, s.M, device)[0]})


def _call_ema(provider, a):
    return _hk("ema_update_", provider)(a["states"], a["update"], a["decay"])


_SCAN_PROVIDERS = ("triton", "torch", "reference")
CASES: Dict[str, Case] = {c.name: c for c in [
    Case("linear_attention", MODES, _SCAN_PROVIDERS + ("sdpa", "fla"), _make_la, _call_la(True), False),
    Case("linear_attention_noncausal", MODES, _SCAN_PROVIDERS + ("sdpa",), _make_la, _call_la(False), False),
    Case("cms_scan", MODES, _SCAN_PROVIDERS + ("fla",), _make_cms(False), _call_cms, False),
    Case("cms_scan_mix", MODES, _SCAN_PROVIDERS + ("fla",), _make_cms(True), _call_cms, False),
    Case("cms_scan_delta", MODES, _SCAN_PROVIDERS + ("fla", "titans"), _make_cms_delta, _call_cms_delta, False),
    Case("titans_scan", MODES, _SCAN_PROVIDERS + ("fla",), _make_titans(False), _call_titans(1), False),
    Case("titans_scan_blocks", MODES, _SCAN_PROVIDERS, _make_titans(True), _call_titans(64), False),
    # decay, no momentum (the shipped configs): period 1 (DGD), and the CMS-level periods 16 and 64
    Case("titans_scan_dgd", MODES, _SCAN_PROVIDERS + ("fla",), _make_titans(True, False), _call_titans(1), False),
    Case("titans_scan_p16", MODES, _SCAN_PROVIDERS, _make_titans(True, False), _call_titans(16), False),
    Case("titans_scan_p64", MODES, _SCAN_PROVIDERS, _make_titans(True, False), _call_titans(64), False),
    Case("titans_selfmod_scan", MODES, _SCAN_PROVIDERS, _make_selfmod, _call_selfmod, False),
    Case("hope_selfmod_layer", MODES, _SCAN_PROVIDERS, _make_layer, _call_layer("selfmod"), False),
    Case("hope_level_layer", MODES, _SCAN_PROVIDERS, _make_layer, _call_layer("level"), False),
    Case("linear_attention_step", ("fwd",), _SCAN_PROVIDERS + ("sdpa",), _make_la_step, _call_la_step, True, True),
    Case("cms_step", ("fwd",), _SCAN_PROVIDERS, _make_cms_step, _call_cms_step, True, True),
    Case("ema_update_", ("fwd",), _SCAN_PROVIDERS, _make_ema, _call_ema, True, True),
]}
OPS = tuple(CASES)


def provider_unavailable(provider: str, device: torch.device) -> Optional[str]:
    """Why `provider` cannot run on `device` (None when it can)."""
    if provider == "triton":
        from hope_kernels.utils import triton_unavailable_reason
        return triton_unavailable_reason(device)
    if provider == "fla":
        if device.type != "cuda":
            return "flash-linear-attention needs CUDA"
        try:
            from fla.ops.linear_attn import chunk_linear_attn  # noqa: F401
            from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
        except Exception as exc:  # not installed, or an incompatible build
            return f"flash-linear-attention not importable ({type(exc).__name__}: {exc})"
    return None


def exact(case: Case, provider: str) -> bool:
    """Whether the provider computes the op's exact math (SDPA is a different model, fla's gated delta rule
    decays the delta term too: no rel. error)."""
    return provider != "sdpa" and not (provider == "fla" and case.name == "titans_scan_dgd")
