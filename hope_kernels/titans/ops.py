"""Public entry points of the Titans memory (gradient-descent associative memory): checks and dispatch.

    G_t = k_t^T (k_t Sbar_t - v_t)                 gradient of 1/2 ||k_t S - v_t||^2 at Sbar_t
    Z_t = momentum_t Z_{t-1} - lr_t G_t            (no momentum: Z_t = -lr_t G_t)
    S_t = decay_t S_{t-1} + Z_t                    (no decay: 1)
    o_t = scale q_t S_t                            (read="block_start": o_t = scale q_t Sbar_t)

Sbar_t is the memory at the start of t's block, blocks of `period` tokens counted from each
sequence's start (period = 1: Sbar_t = S_{t-1}, the online delta rule / DGD). lr, decay, momentum
are per-token gates [B, T, H] with lr >= 0, decay in (0, 1], momentum in [0, 1). The state is
S [N, H, K, V] float32, or the pair (S, Z) with momentum. See DESIGN.md ("titans_scan").
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import library, utils
from .torch_chunked import titans_scan_torch, titans_step_torch

State = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
# gate name -> (lower bound, lower bound included, upper bound, upper bound included)
GATE_RANGES = {"lr": (0., True, float("inf"), False), "decay": (0., False, 1., True),
               "momentum": (0., True, 1., False)}


def _check_gate(name: str, g, lead: tuple, device, layout: str) -> Optional[torch.Tensor]:
    """A per-token gate of shape `lead` on `device` with values in its range (one host sync where values are checked)."""
    if g is None:
        return None
    utils.check_tensor(name, g, len(lead), shape=lead, layout=layout)
    if g.device != device:
        raise ValueError(f"{name} is on {g.device} but the inputs are on {device}")
    if not utils.skip_host_checks(device) and g.numel():
        lo, lo_in, hi, hi_in = GATE_RANGES[name]
        ok = ((g >= lo) if lo_in else (g > lo)) & ((g <= hi) if hi_in else (g < hi))
        if not bool(ok.all()):   # NaN fails too
            want = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ValueError(f"{name} must lie in {want}; got values in "
                             f"[{g.min().item():.6g}, {g.max().item():.6g}]")
    return g


def _check_state(name: str, state, has_momentum: bool, shape: tuple, device, layout: str):
    """S, or the pair (S, Z) when momentum is given; returns (S, Z) with Z None without momentum."""
    if state is None:
        return None, None
    if has_momentum:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(f"{name} must be the pair (S, Z), each {layout}, when momentum is given; "
                             f"got {type(state).__name__}")
        return (utils.check_state(f"{name}[0]", state[0], shape, device, layout),
                utils.check_state(f"{name}[1]", state[1], shape, device, layout))
    if isinstance(state, (tuple, list)):
        raise ValueError(f"{name} must be a tensor {layout} without momentum, got a {type(state).__name__}")
    return utils.check_state(name, state, shape, device, layout), None


READS = ("current", "block_start")


def _check_period(period) -> int:
    """Any integer >= 1 (Python, numpy or a one-element integer tensor) as an int; bools are refused."""
    if isinstance(period, bool) or (isinstance(period, torch.Tensor) and period.dtype == torch.bool):
        raise TypeError(f"period must be an integer >= 1, got a bool ({period})")
    try:
        period = operator.index(period)
    except TypeError:
        raise TypeError(f"period must be an integer >= 1, got {type(period).__name__}") from None
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    return period


def _check_read(read) -> str:
    if not isinstance(read, str) or read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    return read


def titans_scan(q, k, v, lr, decay=None, momentum=None, scale=None, *, period=1, read="current",
                initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64, backend=None):
    """The Titans memory over a sequence (see the module docstring for the math).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (float32, float16 or bfloat16).
        lr, decay, momentum: [B, T, H] gates (decay, momentum optional).
        scale: multiplies q; defaults to K ** -0.5.
        period: tokens per gradient block (an integer >= 1; any value >= T is one block per sequence).
        read: "current" reads the memory after the token's update, "block_start" the memory at the
            start of the token's block (o_t = scale q_t Sbar_t; period 1: the memory before the token).
        initial_state: S_0 [N, H, K, V] float32, or (S_0, Z_0) with momentum (N = B, or the number
            of sequences with cu_seqlens).
        chunk_size: tokens per chunk (a power of two >= 16); a tuning knob, the result does not depend on it.
    Returns:
        o [B, T, H, V] in the input dtype, and the final state (float32; S, or (S, Z) with momentum)
        when output_final_state, else None. Differentiable in q, k, v, lr, decay, momentum, initial_state.
    """
    (B, T, H, K), V, device = utils.check_qkv(q, k, v, "B, T, H")
    lr = _check_gate("lr", lr, (B, T, H), device, "[B, T, H]")
    if lr is None:
        raise TypeError("lr must be a [B, T, H] tensor")
    decay = _check_gate("decay", decay, (B, T, H), device, "[B, T, H]")
    momentum = _check_gate("momentum", momentum, (B, T, H), device, "[B, T, H]")
    # a period of T or more is one block per sequence: clamped, a huge one costs and overflows nothing
    period = min(_check_period(period), max(T, 1))
    read = _check_read(read)
    cu = utils.check_cu_seqlens(cu_seqlens, B, T, device)
    N = B if cu is None else cu.numel() - 1
    S0, Z0 = _check_state("initial_state", initial_state, momentum is not None, (N, H, K, V), device,
                          "[N, H, K, V]")
    chunk_size = utils.check_chunk_size(chunk_size)
    scale = utils.resolve_scale(scale, K)
    backend, _, (q, k, v) = utils.prepare(backend, device, dict(q=q, k=k, v=v))
    with utils.op_context(device):
        o, S, Z = _scan(q, k, v, lr, decay, momentum, S0, Z0, scale, period, read, cu, chunk_size, backend)
    if not output_final_state:
        return o, None
    return o, (S if momentum is None else (S, Z))


def titans_step(q, k, v, lr, state, decay=None, momentum=None, scale=None, *, block_state=None, backend=None):
    """One token of titans_scan for generation, updating `state` in place.

    q, k: [B, H, K]; v: [B, H, V]; lr, decay, momentum: [B, H]; state: S [B, H, K, V] float32, or
    (S, Z) with momentum; block_state [B, H, K, V]: the memory the gradient is taken at (default: S,
    the period = 1 rule; refresh it every `period` tokens to reproduce titans_scan with that period).
    Returns (o [B, H, V] in the input dtype, state). Not differentiable (inference).
    """
    (B, H, K), V, device = utils.check_qkv(q, k, v, "B, H")
    lr = _check_gate("lr", lr, (B, H), device, "[B, H]")
    if lr is None:
        raise TypeError("lr must be a [B, H] tensor")
    decay = _check_gate("decay", decay, (B, H), device, "[B, H]")
    momentum = _check_gate("momentum", momentum, (B, H), device, "[B, H]")
    utils.require("state", state, "S [B, H, K, V] float32 (or (S, Z) with momentum); titans_step updates it in place")
    S, Z = _check_state("state", state, momentum is not None, (B, H, K, V), device, "[B, H, K, V]")
    if momentum is not None and Z is None:
        raise ValueError("state must be the pair (S, Z) with momentum, Z [B, H, K, V] float32 a tensor; "
                         "got Z = None")
    utils.check_state_dtype("state", S, Z)
    utils.check_state("block_state", block_state, (B, H, K, V), device, "[B, H, K, V]")
    scale = utils.resolve_scale(scale, K)
    backend, _, (q, k, v) = utils.prepare(backend, device, dict(q=q, k=k, v=v), state=S)

    with torch.no_grad(), utils.op_context(device):
        o = _step(q, k, v, lr, decay, momentum, S, Z, block_state, scale, backend)
    return o, state


def _scan_backward(grads, needs, q, k, v, lr, decay, momentum, S0, Z0, scale, period, read, cu_seqlens, chunk_size,
                   backend):
    """The Triton path's own backward kernels (no forward recomputed); None elsewhere."""
    if backend != "triton":
        return None
    from .triton_chunk import sequence_table
    from .triton_kernels import TitansScanFunction, float32_gates
    q, k, v = utils.contiguous(q, k, v)
    lr, decay, momentum, S0, Z0 = float32_gates(lr, decay, momentum, S0, Z0)
    table = None if momentum is not None else sequence_table(cu_seqlens, period, chunk_size)
    return library.function_backward(TitansScanFunction, (q, k, v, lr, decay, momentum, S0, Z0, cu_seqlens),
                                     needs, grads, scale=scale, period=period, chunk_size=chunk_size, table=table,
                                     read_block=read == "block_start")[:8]


@library.op("titans_scan", differentiable=("q", "k", "v", "lr", "decay", "momentum", "S0", "Z0"),
            backward=_scan_backward)
def _scan(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Optional[Tensor], momentum: Optional[Tensor],
          S0: Optional[Tensor], Z0: Optional[Tensor], scale: float, period: int, read: str,
          cu_seqlens: Optional[Tensor], chunk_size: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(o in q's dtype, S_T, Z_T or None) of the checked inputs on `backend`."""
    if backend == "triton":
        from .triton_kernels import titans_scan_triton
        q, k, v = utils.contiguous(q, k, v)
        o, S, Z = titans_scan_triton(q, k, v, lr, decay, momentum, scale, period, S0, Z0, cu_seqlens, chunk_size,
                                     read=read)
    else:
        o, S, Z = titans_scan_torch(q, k, v, lr, decay, momentum, scale, period, S0, Z0, cu_seqlens, chunk_size,
                                    utils.state_dtype(q.dtype), read=read)
    return o.to(q.dtype), S, (Z if momentum is not None else None)


@library.fake(_scan)
def _scan_fake(q, k, v, lr, decay, momentum, S0, Z0, scale, period, read, cu_seqlens, chunk_size, backend):
    (B, T, H, K), V = q.shape, v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    S = q.new_empty(N, H, K, V, dtype=utils.state_dtype(q.dtype))
    return q.new_empty(B, T, H, V), S, (torch.empty_like(S) if momentum is not None else None)


@library.op("titans_step", mutates_args=("S", "Z"))
def _step(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Optional[Tensor], momentum: Optional[Tensor],
          S: Tensor, Z: Optional[Tensor], block_state: Optional[Tensor], scale: float, backend: str) -> Tensor:
    """o [B, H, V] in q's dtype; S (and Z) updated in place."""
    if backend == "triton":
        from .triton_kernels import titans_step_triton
        with utils.contiguous_states(S, Z) as (S_c, Z_c):
            return titans_step_triton(q, k, v, lr, decay, momentum, S_c, Z_c, block_state, scale)
    o = titans_step_torch(q, k, v, lr, decay, momentum, S, Z, S if block_state is None else block_state, scale)
    return o.to(q.dtype)


@library.fake(_step)
def _step_fake(q, k, v, lr, decay, momentum, S, Z, block_state, scale, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
