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


def cms_scan(q, k, v, decay, mix=None, scale=None, *, initial_state=None,
             output_final_state=False, cu_seqlens=None):
    """M memories, one timescale each, reading the same q, k, v:

        S_{m,t} = tau_m S_{m,t-1} + (1 - tau_m) k_t v_t^T,    o_{m,t} = scale q_t S_{m,t}

    decay: [M] or [H, M]. mix None -> o: [B, T, H, M, V]; mix [M] / [H, M] / [B, T, H, M]
    -> o_t = sum_m mix_m o_{m,t}: [B, T, H, V]. State: [N, H, M, K, V].
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
            kv = k[b, t].to(sd)[:, :, None] * v[b, t].to(sd)[:, None, :]           # [H, K, V]
            S = tau[..., None, None] * S + (1 - tau)[..., None, None] * kv[:, None]
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


def cms_step(q, k, v, decay, state, mix=None, scale=None):
    """One token of cms_scan, updating state [B, H, M, K, V] in place.

    mix: [M], [H, M] or [B, H, M]; o: [B, H, V] with mix, [B, H, M, V] without.
    """
    B, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    sd = state.dtype
    tau = _decay_hm(decay, H).to(sd)[None, :, :, None, None]
    kv = k.to(sd)[..., :, None] * v.to(sd)[..., None, :]
    state.mul_(tau).add_((1 - tau) * kv[:, :, None])
    o = torch.einsum("bhk,bhmkv->bhmv", q.to(sd) * scale, state)
    if mix is not None:
        m = mix.view(1, 1, -1) if mix.dim() == 1 else (mix.view(1, H, -1) if mix.dim() == 2 else mix)
        o = (o * m.to(sd)[..., None]).sum(-2)
    return o.to(q.dtype), state
