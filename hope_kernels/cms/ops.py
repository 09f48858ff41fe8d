"""Public entry points of the fused multi-timescale CMS memory: input checks and backend dispatch.

    beta None (outer product): S_{m,t} = tau_m S_{m,t-1} + (1 - tau_m) k_t v_t^T
    beta given (delta rule):   S_{m,t} = tau_m S_{m,t-1} - beta_{t(,m)} k_t^T (k_t S_{m,t-1} - v_t)
    o_{m,t} = scale q_t S_{m,t}

The delta rule is one gradient step of size beta on 1/2 ||k_t S - v_t||^2 per token and memory: the
recurrence of titans_scan at period 1 with lr = beta and decay = tau_m, one memory per (head, m),
fused: q, k, v and beta are read once for all M memories. beta is [B, T, H] (shared by a head's
memories) or [B, T, H, M], values >= 0 (checked where that is free: CPU tensors). Like decay, beta is a
gate and is never autocast (it keeps its own floating dtype and is read in float32).

M memories (one timescale tau_m each, shared by heads for decay [M], per head for [H, M]) read
the same q, k, v. mix=None returns every memory's read-out o [B, T, H, M, V]; mix of shape [M],
[H, M] or [B, T, H, M] returns o_t = sum_m mix_m o_{m,t}, [B, T, H, V]. States [N, H, M, K, V]
are float32. float64 inputs run on the exact chunked PyTorch path when backend is None;
backend="triton" with float64 raises TypeError. See DESIGN.md ("cms_scan").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import library, utils
from .torch_chunked import cms_scan_torch, cms_step_torch


def _check_decay(decay, H: int, device) -> torch.Tensor:
    """decay [M] or [H, M] with values in (0, 1); returns it broadcast to [H, M] (autograd-safe)."""
    utils.check_tensor("decay", decay, layout="[M] or [H, M]")
    if decay.dim() not in (1, 2) or decay.shape[-1] < 1 or (decay.dim() == 2 and decay.shape[0] != H):
        raise ValueError(f"decay must have shape [M] or [H, M] with H = {H}, got {tuple(decay.shape)}")
    if decay.device != device:
        raise ValueError(f"decay is on {decay.device} but the inputs are on {device}")
    if not utils.skip_host_checks(device):
        ok = bool(((decay > 0) & (decay < 1)).all())   # one host sync; NaN fails too
        if not ok:
            raise ValueError("decay (tau) must lie strictly inside (0, 1); got values in "
                             f"[{decay.min().item():.6g}, {decay.max().item():.6g}]")
    return decay.expand(H, decay.shape[-1]) if decay.dim() == 1 else decay


def _check_mix(mix, lead: tuple, H: int, M: int, device, layout: str):
    """mix [M], [H, M] or [*lead, H, M] (lead = (B, T) for the scan, (B,) for the step).

    Returns None, an [H, M] view (static mixes) or the per-token tensor itself."""
    if mix is None:
        return None
    utils.check_tensor("mix", mix, layout=layout)
    shapes = [(M,), (H, M), (*lead, H, M)]
    if tuple(mix.shape) not in shapes:
        raise ValueError(f"mix must have shape {layout} = one of {shapes}, got {tuple(mix.shape)}")
    if mix.device != device:
        raise ValueError(f"mix is on {mix.device} but the inputs are on {device}")
    return mix.expand(H, M) if mix.dim() == 1 else mix


def _check_beta(beta, lead: tuple, H: int, M: int, device, layout: str):
    """beta None (outer rule), [*lead, H] or [*lead, H, M] with values >= 0 (value check where it is free)."""
    if beta is None:
        return None
    utils.check_tensor("beta", beta, layout=layout)
    if tuple(beta.shape) not in ((*lead, H), (*lead, H, M)):
        raise ValueError(f"beta must have shape {layout} = {(*lead, H)} or {(*lead, H, M)}, got {tuple(beta.shape)}")
    if beta.device != device:
        raise ValueError(f"beta is on {beta.device} but the inputs are on {device}")
    if not utils.skip_host_checks(device) and beta.numel() and not bool((beta >= 0).all()):   # NaN fails too
        raise ValueError(f"beta must be >= 0; got values in [{beta.min().item():.6g}, {beta.max().item():.6g}]")
    return beta


def cms_scan(q, k, v, decay, mix=None, scale=None, *, beta=None, initial_state=None, output_final_state=False,
             cu_seqlens=None, chunk_size=64, backend=None):
    """Fused multi-timescale scan (outer-product rule, or the delta rule when beta is given).

    q, k: [B, T, H, K]; v: [B, T, H, V]; decay: [M] or [H, M] in (0, 1);
    mix: None, [M], [H, M] or [B, T, H, M]; beta: None, [B, T, H] or [B, T, H, M] (>= 0);
    initial_state: [N, H, M, K, V] (N = B, or the number of sequences with cu_seqlens).
    Returns (o, final_state or None). Differentiable in q, k, v, beta, mix, initial_state and decay.
    """
    (B, T, H, K), V, device = utils.check_qkv(q, k, v, "B, T, H")
    tau = _check_decay(decay, H, device)
    M = tau.shape[-1]
    mix = _check_mix(mix, (B, T), H, M, device, "[M], [H, M] or [B, T, H, M]")
    beta = _check_beta(beta, (B, T), H, M, device, "[B, T, H] or [B, T, H, M]")
    cu = utils.check_cu_seqlens(cu_seqlens, B, T, device)
    N = B if cu is None else cu.numel() - 1
    utils.check_state("initial_state", initial_state, (N, H, M, K, V), device, "[N, H, M, K, V]")
    chunk_size = utils.check_chunk_size(chunk_size)
    scale = utils.resolve_scale(scale, K)
    backend, _, (q, k, v, mix) = utils.prepare(backend, device, dict(q=q, k=k, v=v), cast=(mix,))
    q, k, v, beta = utils.contiguous(q, k, v, beta)
    with utils.op_context(device):
        o, ST = _scan(q, k, v, tau, mix, initial_state, beta, scale, output_final_state, cu, chunk_size, backend)
    return o, library.present(ST)


def cms_step(q, k, v, decay, state, mix=None, scale=None, *, beta=None, backend=None):
    """One token of cms_scan, updating `state` [B, H, M, K, V] (float32) in place.

    q, k: [B, H, K]; v: [B, H, V]; mix: None, [M], [H, M] or [B, H, M]; beta: None (outer rule),
    [B, H] or [B, H, M] (delta rule).
    Returns (o, state): o [B, H, V] with mix, [B, H, M, V] without.
    """
    (B, H, K), V, device = utils.check_qkv(q, k, v, "B, H")
    tau = _check_decay(decay, H, device)
    M = tau.shape[-1]
    utils.require("state", state, "a [B, H, M, K, V] float32 tensor (cms_step updates it in place)")
    utils.check_state("state", state, (B, H, M, K, V), device, "[B, H, M, K, V]")
    utils.check_state_dtype("state", state)
    mix = _check_mix(mix, (B,), H, M, device, "[M], [H, M] or [B, H, M]")
    beta = _check_beta(beta, (B,), H, M, device, "[B, H] or [B, H, M]")
    scale = utils.resolve_scale(scale, K)
    backend, _, (q, k, v, mix) = utils.prepare(backend, device, dict(q=q, k=k, v=v), cast=(mix,), state=state)
    with torch.no_grad(), utils.op_context(device):
        return _step(q, k, v, tau, state, mix, beta, scale, backend), state


def _scan_backward(grads, needs, q, k, v, tau, mix, initial_state, beta, scale, output_final_state, cu_seqlens,
                   chunk_size, backend):
    """The Triton path's own backward kernels (no forward recomputed beyond the chunk states); None on the
    torch path (the vjp differentiates it)."""
    if backend != "triton":
        return None
    mix, h0 = (None if x is None else x.contiguous() for x in (mix, initial_state))
    if beta is not None:
        from .triton_delta import DeltaScanFunction, chunk_tile as delta_tile, layout
        BT = delta_tile(chunk_size, q.shape[-1], q.shape[1])
        dq, dk, dv, dtau, dbeta, dmix, dh0 = library.function_backward(
            DeltaScanFunction, (q, k, v, tau.contiguous(), beta.contiguous(), mix, h0, cu_seqlens),
            (*needs[:4], needs[6], needs[4], needs[5]), grads, scale=scale, BT=BT,
            layout=layout(q, cu_seqlens, BT))[:7]
        return dq, dk, dv, dtau, dmix, dh0, dbeta
    from .triton_kernels import CmsScanFunction, _layout, chunk_tile
    BT = chunk_tile(chunk_size, q.shape[1])
    return library.function_backward(CmsScanFunction, (q, k, v, tau.contiguous(), mix, h0, cu_seqlens), needs[:6],
                                     grads, scale=scale, BT=BT, layout=_layout(q, cu_seqlens, BT))[:6] + (None,)


@library.op("cms_scan", differentiable=("q", "k", "v", "tau", "mix", "initial_state", "beta"),
            backward=_scan_backward)
def _scan(q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mix: Optional[Tensor], initial_state: Optional[Tensor],
          beta: Optional[Tensor], scale: float, output_final_state: bool, cu_seqlens: Optional[Tensor],
          chunk_size: int, backend: str) -> Tuple[Tensor, Tensor]:
    """(o, S_T or None) of the checked inputs on `backend`: tau [H, M], mix None, [H, M] or [B, T, H, M],
    beta None (outer rule) or [B, T, H(, M)] (delta rule)."""
    if backend == "torch":
        return cms_scan_torch(q, k, v, tau, mix, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                              beta)
    from .triton_kernels import cms_scan_triton
    return cms_scan_triton(q, k, v, tau, mix, scale, initial_state, output_final_state, cu_seqlens, chunk_size, beta)


@library.fake(_scan)
def _scan_fake(q, k, v, tau, mix, initial_state, beta, scale, output_final_state, cu_seqlens, chunk_size, backend):
    (B, T, H, K), V, M = q.shape, v.shape[-1], tau.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, H, V) if mix is not None else q.new_empty(B, T, H, M, V)
    return o, (q.new_empty(N, H, M, K, V, dtype=utils.state_dtype(q.dtype)) if output_final_state else None)


@library.op("cms_step", mutates_args=("state",))
def _step(q: Tensor, k: Tensor, v: Tensor, tau: Tensor, state: Tensor, mix: Optional[Tensor], beta: Optional[Tensor],
          scale: float, backend: str) -> Tensor:
    """o ([B, H, V] with mix, [B, H, M, V] without) in q's dtype; `state` updated in place."""
    if backend == "torch":
        return cms_step_torch(q, k, v, tau, state, mix, scale, beta)[0]
    from .triton_kernels import cms_step_triton
    with utils.contiguous_states(state) as (work,):
        return cms_step_triton(q, k, v, tau, work, mix, scale, beta)[0]


@library.fake(_step)
def _step_fake(q, k, v, tau, state, mix, beta, scale, backend):
    (B, H, K), V, M = q.shape, v.shape[-1], tau.shape[-1]
    return q.new_empty(B, H, V) if mix is not None else q.new_empty(B, H, M, V)
