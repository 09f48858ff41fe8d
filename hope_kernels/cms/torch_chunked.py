"""The "torch" backend of cms_scan / cms_step: chunked, vectorised PyTorch with plain autograd.

Within a chunk of length L (local positions i, j = 1..L) and with g = log(tau) per (head, memory):

    o_i   = scale * (tau^i q_i S_prev + sum_{j<=i} tau^{i-j} (1 - tau) (q_i . k_j) v_j)
    S_end = tau^L S_prev + sum_j tau^{L-j} (1 - tau) k_j v_j^T

Every power of tau is exp(n g) with n >= 0: the causal mask is applied to the exponent before
exponentiating, so nothing overflows whatever tau in (0, 1) and T; underflow goes to 0.
The Python loop runs over chunks (T / chunk_size steps), never over tokens; q k^T of a chunk is
computed once and shared by all M memories.
"""
from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scan_dense(q, k, v, tau, scale: float, state: Optional[torch.Tensor], chunk_size: int):
    """One batch of equal-length sequences. q, k: [B, T, H, K], v: [B, T, H, V], tau: [H, M]
    (compute dtype), state: [B, H, M, K, V] or None. Returns o [B, T, H, M, V] and S_T."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    cd = tau.dtype
    g = torch.log(tau)                                   # [H, M], < 0
    one_minus = 1 - tau
    if state is None:
        state = q.new_zeros(B, H, M, K, V, dtype=cd)
    S = state.to(cd)
    outs = []
    for s in range(0, T, chunk_size):
        L = min(chunk_size, T - s)
        qc = q[:, s:s + L].to(cd) * scale
        kc, vc = k[:, s:s + L].to(cd), v[:, s:s + L].to(cd)
        pos = torch.arange(1, L + 1, device=q.device, dtype=cd)
        diff = pos[:, None] - pos[None, :]                                   # i - j
        causal = diff >= 0
        expo = torch.where(causal, diff * g[..., None, None], float("-inf"))  # [H, M, L, L], <= 0
        D = torch.exp(expo) * one_minus[..., None, None]
        A = torch.einsum("bihk,bjhk->bhij", qc, kc)                          # once for all M
        o = torch.einsum("bhmij,bjhv->bihmv", A[:, :, None] * D, vc)
        o = o + torch.einsum("bihk,bhmkv->bihmv", qc, S) * torch.exp(pos[:, None, None] * g)[None, ..., None]
        w_end = torch.exp((L - pos)[:, None, None] * g) * one_minus          # [L, H, M]
        S = torch.exp(L * g)[None, ..., None, None] * S + torch.einsum("bjhk,jhm,bjhv->bhmkv", kc, w_end, vc)
        outs.append(o)
    o = torch.cat(outs, dim=1) if outs else q.new_zeros(B, 0, H, M, V, dtype=cd)
    return o, S


def cms_scan_torch(q, k, v, tau, mix, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    """tau: [H, M]; mix: None, [H, M] or [B, T, H, M] (already broadcast); returns (o, final_state)."""
    cd = compute_dtype(q.dtype)
    tau = tau.to(cd)
    if cu_seqlens is None:
        o, S = _scan_dense(q, k, v, tau, scale, initial_state, chunk_size)
    else:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
            h0 = None if initial_state is None else initial_state[n:n + 1]
            o_n, S_n = _scan_dense(q[:, s:e], k[:, s:e], v[:, s:e], tau, scale, h0, chunk_size)
            outs.append(o_n)
            finals.append(S_n)
        o, S = torch.cat(outs, dim=1), torch.cat(finals)
    if mix is not None:
        mx = mix.to(cd)
        o = (o * (mx if mx.dim() == 4 else mx[None, None])[..., None]).sum(-2)
    return o.to(q.dtype), (S.to(torch.float64 if cd == torch.float64 else torch.float32)
                           if output_final_state else None)


def cms_step_torch(q, k, v, tau, state, mix, scale):
    """One token: state [B, H, M, K, V] updated in place; tau [H, M]; mix None, [H, M] or [B, H, M]."""
    sd = state.dtype
    t = tau.to(sd)[None, :, :, None, None]
    kv = k.to(sd)[..., :, None] * v.to(sd)[..., None, :]                 # [B, H, K, V]
    state.mul_(t).add_((1 - t) * kv[:, :, None])
    o = torch.einsum("bhk,bhmkv->bhmv", q.to(sd) * scale, state)
    if mix is not None:
        o = (o * mix.to(sd)[..., None]).sum(-2)
    return o.to(q.dtype), state
