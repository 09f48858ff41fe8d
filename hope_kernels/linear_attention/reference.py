"""Readable token-by-token reference of linear attention (ground truth for the tests).

Same signatures as the public ops minus `backend` / `chunk_size`; any floating dtype (float64 welcome).
Slow on purpose: one Python step per token, exactly the recurrences of DESIGN.md.
"""
from __future__ import annotations

import torch

from ..utils import segments, state_dtype


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
    segs = segments(T, B, cu_seqlens)
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
