"""Readable token-by-token reference of the Titans memory scan and step (ground truth for the tests).

Same signatures as the public ops minus `backend` / `chunk_size`; any floating dtype (float64 welcome).
Slow on purpose: one Python step per token, exactly the recurrence of DESIGN.md ("titans_scan"):

    G_t = k_t^T (k_t Sbar_t - v_t)                 gradient of 1/2 ||k_t S - v_t||^2 at Sbar_t
    Z_t = momentum_t Z_{t-1} - lr_t G_t            (no momentum: Z_t = -lr_t G_t)
    S_t = decay_t S_{t-1} + Z_t                    (no decay: 1)
    o_t = scale q_t S_t                            (read="block_start": o_t = scale q_t Sbar_t)

Sbar_t is the memory at the start of t's block (blocks of `period` tokens from each sequence's start).
"""
from __future__ import annotations

import torch

from ..utils import segments, state_dtype


def titans_scan(q, k, v, lr, decay=None, momentum=None, scale=None, *, period=1, read="current",
                initial_state=None, output_final_state=False, cu_seqlens=None):
    """q, k: [B, T, H, K]; v: [B, T, H, V]; lr, decay, momentum: [B, T, H]; read: "current" (the memory
    after the token's update) or "block_start" (the memory at the start of the token's block).

    initial_state: S [N, H, K, V], or (S, Z) with momentum. Returns (o [B, T, H, V], final state or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = state_dtype(q.dtype)
    o = torch.zeros(B, T, H, V, dtype=sd, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(segments(T, B, cu_seqlens)):
        S = torch.zeros(H, K, V, dtype=sd, device=q.device)
        Z = torch.zeros_like(S)
        if initial_state is not None:
            S0 = initial_state[0] if momentum is not None else initial_state
            S = S0[n].to(sd)
            if momentum is not None:
                Z = initial_state[1][n].to(sd)
        for i, t in enumerate(range(start, end)):
            if i % period == 0:
                Sbar = S
            kt, vt, qt = k[b, t].to(sd), v[b, t].to(sd), q[b, t].to(sd)
            err = torch.einsum("hk,hkv->hv", kt, Sbar) - vt                 # k_t Sbar - v_t
            G = kt[:, :, None] * err[:, None, :]                            # [H, K, V]
            step = -lr[b, t].to(sd)[:, None, None] * G
            Z = step if momentum is None else momentum[b, t].to(sd)[:, None, None] * Z + step
            S = (S if decay is None else decay[b, t].to(sd)[:, None, None] * S) + Z
            o[b, t] = scale * torch.einsum("hk,hkv->hv", qt, Sbar if read == "block_start" else S)
        finals.append((S, Z))
    final = None
    if output_final_state:
        S_f = torch.stack([f[0] for f in finals]) if finals else None
        final = S_f if momentum is None else (S_f, torch.stack([f[1] for f in finals]))
    return o.to(q.dtype), final


def titans_step(q, k, v, lr, state, decay=None, momentum=None, scale=None, *, block_state=None):
    """One token, in place: q, k: [B, H, K]; v: [B, H, V]; lr, decay, momentum: [B, H];
    state S [B, H, K, V] (or (S, Z) with momentum); block_state: the memory the gradient is taken at
    (default: S itself). Returns (o [B, H, V], state)."""
    S, Z = (state if momentum is not None else (state, None))
    if momentum is not None and Z is None:
        raise ValueError("state must be the pair (S, Z) with Z a tensor when momentum is given")
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = S.dtype
    Sbar = S if block_state is None else block_state.to(sd)
    kt, vt = k.to(sd), v.to(sd)
    G = kt[..., :, None] * (torch.einsum("bhk,bhkv->bhv", kt, Sbar) - vt)[..., None, :]
    step = -lr.to(sd)[..., None, None] * G
    newZ = step if Z is None else momentum.to(sd)[..., None, None] * Z + step
    newS = (S if decay is None else decay.to(sd)[..., None, None] * S) + newZ
    S.copy_(newS)
    if Z is not None:
        Z.copy_(newZ)
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(sd), S)
    return o.to(q.dtype), state
