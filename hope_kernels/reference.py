"""Readable token-by-token references of every op (the ground truth the kernels are tested against).

Same signatures as the public ops minus `backend` / `chunk_size`. Any floating dtype works;
float64 inputs give a float64 reference. States are float32 (float64 for float64 inputs).
These are slow on purpose: one Python step per token, exactly the recurrences of DESIGN.md.
"""
from __future__ import annotations


import torch

from .utils import state_dtype


def _segments(T: int, batch: int, cu_seqlens):
    """(batch_row, start, end) of every sequence: one per batch row, or one per cu_seqlens entry."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(batch)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- linear attention
def linear_attention(q, k, v, scale=None, *, causal=True, normalize=False, eps=1e-6,
                     initial_state=None, output_final_state=False, cu_seqlens=None):
    """o_t = scale * q_t S_t, S_t = S_0 + sum_{s<=t} k_s v_s^T (all s when not causal).

    With normalize: o_t = (scale q_t S_t) / (scale q_t . z_t + eps), z_t = z_0 + sum_{s<=t} k_s.
    q, k: [B, T, H, K], v: [B, T, H, V]; state S: [N, H, K, V] (and z: [N, H, K]).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = state_dtype(q.dtype)
    segs = _segments(T, B, cu_seqlens)
    o = torch.zeros(B, T, H, V, dtype=sd, device=q.device)
    finals_S, finals_z = [], []
    for n, (b, start, end) in enumerate(segs):
        S, z = _initial_linear_state(initial_state, n, normalize, H, K, V, sd, q.device)
        if not causal:
            for t in range(start, end):
                S = S + k[b, t].to(sd)[:, :, None] * v[b, t].to(sd)[:, None, :]
                z = z + k[b, t].to(sd)
        for t in range(start, end):
            if causal:
                S = S + k[b, t].to(sd)[:, :, None] * v[b, t].to(sd)[:, None, :]
                z = z + k[b, t].to(sd)
            qt = q[b, t].to(sd) * scale
            num = torch.einsum("hk,hkv->hv", qt, S)
            if normalize:
                num = num / ((qt * z).sum(-1, keepdim=True) + eps)
            o[b, t] = num
        finals_S.append(S)
        finals_z.append(z)
    final = None
    if output_final_state:
        final = torch.stack(finals_S)
        if normalize:
            final = (final, torch.stack(finals_z))
    return o.to(q.dtype), final


def _initial_linear_state(initial_state, n, normalize, H, K, V, sd, device):
    if initial_state is None:
        return torch.zeros(H, K, V, dtype=sd, device=device), torch.zeros(H, K, dtype=sd, device=device)
    if normalize:
        S0, z0 = initial_state
        return S0[n].to(sd), z0[n].to(sd)
    return initial_state[n].to(sd), torch.zeros(H, K, dtype=sd, device=device)


def linear_attention_step(q, k, v, state, scale=None, *, normalize=False, eps=1e-6):
    """One causal token: S += k v^T (z += k), o = scale q S (/ (scale q.z + eps)). Updates state in place.

    q, k: [B, H, K], v: [B, H, V]; state: [B, H, K, V] or (S, z) with z: [B, H, K].
    """
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S, z = state if normalize else (state, None)
    S.add_((k.to(S.dtype)[..., :, None] * v.to(S.dtype)[..., None, :]))
    qt = q.to(S.dtype) * scale
    o = torch.einsum("bhk,bhkv->bhv", qt, S)
    if normalize:
        z.add_(k.to(z.dtype))
        o = o / ((qt * z).sum(-1, keepdim=True) + eps)
    return o.to(q.dtype), state


# --------------------------------------------------------------------------- CMS
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
    segs = _segments(T, B, cu_seqlens)
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


# --------------------------------------------------------------------------- EMA
def ema_update_(states, update, decay):
    """states[m] = tau_m states[m] + (1 - tau_m) update[m or shared], in place, for every m.

    states: [M, *shape] or a list of M tensors; update: [*shape] or [M, *shape]; decay: [M].
    """
    M = len(states)
    for m in range(M):
        tau = float(decay[m])
        u = update[m] if (isinstance(update, (list, tuple)) or update.dim() == states[m].dim() + 1) else update
        states[m].mul_(tau).add_(u.to(states[m].dtype), alpha=1 - tau)
    return states
