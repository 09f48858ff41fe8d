"""Public linear-attention ops: checks, `utils.prepare`, then the registered op (Triton or torch path).

    causal:     S_t = S_0 + sum_{s<=t} k_s v_s^T,  o_t = scale * q_t S_t
    non-causal: S   = S_0 + sum_{all s} k_s v_s^T, o_t = scale * q_t S
    normalize:  z_t = z_0 + sum_{s<=t} k_s (all s when non-causal),
                o_t = (scale * q_t S_t) / (scale * q_t . z_t + eps)

The scan (Triton or torch) computes scale * q_t S_t. With normalize that is the numerator; the
denominator comes from z_t, a cumulative sum of k in torch (float32), and the division runs under
autograd, so the kernels never see z. Float64 inputs run the torch path (backend=None), in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import library, utils
from .torch_chunked import linear_attention_step_torch, linear_attention_torch

State = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _check_state(name: str, state, normalize: bool, N: int, H: int, K: int, V: int, device) -> Optional[State]:
    """S: [N, H, K, V], or the pair (S, z) with z: [N, H, K] when normalize."""
    if state is None:
        return None
    if normalize:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{name} must be a pair (S [N, H, K, V], z [N, H, K]) when normalize=True, "
                            f"got {type(state).__name__}")
        S, z = state
        utils.check_state(f"{name}[0]", S, (N, H, K, V), device, "[N, H, K, V]")
        utils.check_state(f"{name}[1]", z, (N, H, K), device, "[N, H, K]")
        return S, z
    if isinstance(state, (tuple, list)):
        raise TypeError(f"{name} must be a tensor [N, H, K, V] when normalize=False, got a {type(state).__name__}")
    return utils.check_state(name, state, (N, H, K, V), device, "[N, H, K, V]")


def _denominator(q, k, z0, scale, eps, causal, cu, sd):
    """den_t = scale * q_t . z_t + eps and z_T, in the state dtype, differentiable.

    z_t = z_0 + sum_{s<=t} k_s over t's sequence (all s of it when non-causal). Packed sequences take
    a float64 cumulative sum of the whole row minus its value at their start (no cancellation).
    """
    B, T, H, K = k.shape
    kf = k.to(sd)
    if cu is None:
        zT = kf.sum(1) if z0 is None else kf.sum(1) + z0
        z = (kf.cumsum(1) if z0 is None else kf.cumsum(1) + z0[:, None]) if causal else zT[:, None]
    else:
        N = cu.numel() - 1
        seg = torch.repeat_interleave(torch.arange(N, device=k.device), cu.diff(), output_size=T)
        zT = kf.new_zeros(N, H, K).index_add(0, seg, kf[0])
        if z0 is not None:
            zT = zT + z0
        if causal:
            c = kf[0].double().cumsum(0)
            before = torch.cat([c.new_zeros(1, H, K), c])[cu[:-1]]   # the row's sum before each sequence
            z = (c - before[seg]).to(sd)
            z = (z if z0 is None else z + z0[seg])[None]
        else:
            z = zT[seg][None]
    return scale * (q.to(sd) * z).sum(-1, keepdim=True) + eps, zT


def linear_attention(q, k, v, scale=None, *, causal=True, normalize=False, eps=1e-6, initial_state=None,
                     output_final_state=False, cu_seqlens=None, chunk_size=64, backend=None):
    """Linear attention over a sequence (see the module docstring for the math).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (float32, float16 or bfloat16; float64 runs the torch
            path when backend is None and raises TypeError with backend="triton").
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: S_0 [N, H, K, V] float32, or (S_0, z_0 [N, H, K]) with normalize.
        cu_seqlens: int32/int64 [N + 1] offsets of N sequences packed into one batch row (B == 1).
        chunk_size: tokens per chunk (a power of two >= 16; Triton tiles at most 128 rows, and no backend
            uses more rows than T has); a tuning knob, the result does not depend on it.
    Returns:
        o [B, T, H, V] in the input dtype, and the final state (float32, same structure as
        initial_state) when output_final_state, else None. Differentiable in q, k, v and initial_state.
    """
    (B, T, H, K), V, device = utils.check_qkv(q, k, v, "B, T, H")
    chunk_size = utils.check_chunk_size(chunk_size)
    cu = utils.check_cu_seqlens(cu_seqlens, B, T, device)
    N = B if cu is None else cu.numel() - 1
    initial_state = _check_state("initial_state", initial_state, normalize, N, H, K, V, device)
    scale = utils.resolve_scale(scale, K)
    backend, dtype, (q, k, v) = utils.prepare(backend, device, dict(q=q, k=k, v=v))
    sd = utils.state_dtype(dtype)

    with utils.op_context(device):
        S0, z0 = initial_state if normalize and initial_state is not None else (initial_state, None)
        if S0 is not None:
            S0 = S0.to(sd)
        o, ST = _scan(q, k, v, S0, scale, causal, output_final_state, cu, chunk_size, backend)
        ST = library.present(ST)
        if normalize:
            den, zT = _denominator(q, k, None if z0 is None else z0.to(sd), scale, eps, causal, cu, sd)
            o = o.to(sd) / den
            ST = (ST, zT)
        o = o.to(dtype)
    return o, (ST if output_final_state else None)


def linear_attention_step(q, k, v, state, scale=None, *, normalize=False, eps=1e-6, backend=None):
    """One causal token for generation: S += k v^T (z += k), o = scale q S (/ (scale q.z + eps)).

    q, k: [B, H, K]; v: [B, H, V]; state: S [B, H, K, V] (or (S, z), z [B, H, K], with normalize),
    float32, updated in place and returned. o: [B, H, V] in the input dtype. A loop of steps equals
    the causal scan. Not differentiable (inference).
    """
    (B, H, K), V, device = utils.check_qkv(q, k, v, "B, H")
    utils.require("state", state, "S [B, H, K, V] float32 (or (S, z) with normalize=True), updated in place")
    S, z = _check_state("state", state, normalize, B, H, K, V, device) if normalize else \
        (_check_state("state", state, normalize, B, H, K, V, device), None)
    utils.check_state_dtype("state", S, z)
    scale = utils.resolve_scale(scale, K)
    backend, _, (q, k, v) = utils.prepare(backend, device, dict(q=q, k=k, v=v), state=S)

    with torch.no_grad(), utils.op_context(device):
        o = _step(q, k, v, S, z, scale, eps, backend)
    return o, state


def _scan_backward(grads, needs, q, k, v, S0, scale, causal, output_final_state, cu_seqlens, chunk_size, backend):
    """The Triton path's own backward kernels (no forward recomputed); None elsewhere."""
    if backend != "triton":
        return None
    from .triton_kernels import LinearAttentionFunction, launch_plan
    q, k, v, S0 = utils.contiguous(q, k, v, S0)
    plan = launch_plan(*q.shape, v.shape[-1], chunk_size, cu_seqlens, causal)
    return library.function_backward(LinearAttentionFunction, (q, k, v, S0, cu_seqlens), needs, grads,
                                     scale=scale, causal=causal, chunk_size=chunk_size, plan=plan)[:4]


@library.op("linear_attention", differentiable=("q", "k", "v", "S0"), backward=_scan_backward)
def _scan(q: Tensor, k: Tensor, v: Tensor, S0: Optional[Tensor], scale: float, causal: bool,
          output_final_state: bool, cu_seqlens: Optional[Tensor], chunk_size: int, backend: str
          ) -> Tuple[Tensor, Tensor]:
    """(o in the state dtype, S_T or None): the scan of scale * q_t S_t on `backend`."""
    sd = utils.state_dtype(q.dtype)
    if backend == "triton":
        from .triton_kernels import LinearAttentionFunction
        q, k, v, S0 = utils.contiguous(q, k, v, S0)
        o, ST = LinearAttentionFunction.apply(q, k, v, S0, scale, causal, output_final_state, cu_seqlens, chunk_size)
    else:
        o, ST = linear_attention_torch(q, k, v, scale, causal, S0, cu_seqlens, chunk_size, sd)
    return o.to(sd), (ST if output_final_state else None)


@library.fake(_scan)
def _scan_fake(q, k, v, S0, scale, causal, output_final_state, cu_seqlens, chunk_size, backend):
    (B, T, H, K), V = q.shape, v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sd = utils.state_dtype(q.dtype)
    return q.new_empty(B, T, H, V, dtype=sd), (q.new_empty(N, H, K, V, dtype=sd) if output_final_state else None)


@library.op("linear_attention_step", mutates_args=("S", "z"))
def _step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Optional[Tensor], scale: float, eps: float,
          backend: str) -> Tensor:
    """o [B, H, V] in q's dtype; S (and z) updated in place."""
    if backend == "torch":
        return linear_attention_step_torch(q, k, v, S, scale, z, eps).to(q.dtype)
    from .triton_kernels import linear_attention_step_triton
    q, k, v = utils.contiguous(q, k, v)
    with utils.contiguous_states(S, z) as (S_c, z_c):
        return linear_attention_step_triton(q, k, v, S_c, z_c, scale, eps, q.dtype)


@library.fake(_step)
def _step_fake(q, k, v, S, z, scale, eps, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
