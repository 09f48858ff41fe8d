"""Readable token-by-token reference of the CMS scan and step (ground truth for the tests).

Same signatures as the public ops minus `backend` / `chunk_size`; any floating dtype (float64 welcome).
Slow on purpose: one Python step per token, exactly the recurrences of DESIGN.md.
"""
from __future__ import annotations

import torch

from ..utils import segments, state_dtype


def _decay_hm(decay, H):
    """tau as [H, M] (a [M] decay is shared by all heads)."""
    return decay.unsqueeze(0).expand(H, -1) if decay.dim() == 1 else decay


def _beta_hm(beta, M):
    """One token's beta [H] or [H, M] as [H, M] (a per-head beta is shared by its M memories)."""
    return beta.unsqueeze(-1).expand(*beta.shape, M) if beta.dim() == 1 else beta


def _write(S, tau, k, v, beta):
    """One token's write into S [H, M, K, V]; tau [H, M]; k [H, K], v [H, V]; beta None or [H, M].

    outer (beta None): S <- tau S + (1 - tau) k^T v
    delta:             S <- tau S - beta k^T (k S - v)
    """
    t = tau[..., None, None]
    if beta is None:
        return t * S + (1 - t) * (k[:, :, None] * v[:, None, :])[:, None]
    err = torch.einsum("hk,hmkv->hmv", k, S) - v[:, None]                     # k S - v: [H, M, V]
    return t * S - beta[..., None, None] * k[:, None, :, None] * err[:, :, None, :]


def cms_scan(q, k, v, decay, mix=None, scale=None, *, beta=None, initial_state=None,
             output_final_state=False, cu_seqlens=None):
    """M memories, one timescale each, reading the same q, k, v:

        beta None:  S_{m,t} = tau_m S_{m,t-1} + (1 - tau_m) k_t v_t^T
        beta given: S_{m,t} = tau_m S_{m,t-1} - beta_{t(,m)} k_t^T (k_t S_{m,t-1} - v_t)
        o_{m,t} = scale q_t S_{m,t}

    decay: [M] or [H, M]; beta: [B, T, H] or [B, T, H, M]. mix None -> o: [B, T, H, M, V];
    mix [M] / [H, M] / [B, T, H, M] -> o_t = sum_m mix_m o_{m,t}: [B, T, H, V]. State: [N, H, M, K, V].
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = state_dtype(q.dtype)
    tau = _decay_hm(decay, H).to(sd)
    M = tau.shape[-1]
    segs = segments(T, B, cu_seqlens)
    o = torch.zeros(B, T, H, M, V, dtype=sd, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(segs):
        S = (torch.zeros(H, M, K, V, dtype=sd, device=q.device) if initial_state is None
             else initial_state[n].to(sd))
        for t in range(start, end):
            bt = None if beta is None else _beta_hm(beta[b, t].to(sd), M)
            S = _write(S, tau, k[b, t].to(sd), v[b, t].to(sd), bt)
            o[b, t] = torch.einsum("hk,hmkv->hmv", q[b, t].to(sd) * scale, S)
        finals.append(S)
    if mix is not None:
        o = (o * _mix_btHM(mix, B, T, H).to(sd)[..., None]).sum(-2)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def _mix_btHM(mix, B, T, H):
    if mix.dim() == 1:
        return mix.view(1, 1, 1, -1)
    if mix.dim() == 2:
        return mix.view(1, 1, H, -1)
    return mix


def cms_step(q, k, v, decay, state, mix=None, scale=None, *, beta=None):
    """One token of cms_scan, updating state [B, H, M, K, V] in place.

    beta: None (outer rule), [B, H] or [B, H, M] (delta rule). mix: [M], [H, M] or [B, H, M];
    o: [B, H, V] with mix, [B, H, M, V] without.
    """
    B, H, K = q.shape
    M = state.shape[2]
    scale = K ** -0.5 if scale is None else scale
    sd = state.dtype
    tau = _decay_hm(decay, H).to(sd)
    for b in range(B):
        bt = None if beta is None else _beta_hm(beta[b].to(sd), M)
        state[b] = _write(state[b], tau, k[b].to(sd), v[b].to(sd), bt)
    o = torch.einsum("bhk,bhmkv->bhmv", q.to(sd) * scale, state)
    if mix is not None:
        m = mix.view(1, 1, -1) if mix.dim() == 1 else (mix.view(1, H, -1) if mix.dim() == 2 else mix)
        o = (o * m.to(sd)[..., None]).sum(-2)
    return o.to(q.dtype), state
