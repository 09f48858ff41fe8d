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


def titans_selfmod_scan(q, u, lr_bias, decay_bias, momentum=None, scale=None, *, lr_max, period, initial_state,
                        output_final_state=False, eps=1e-6, mem_period=None):
    """The self-modifying Titans memory as a loop over blocks (hope_kernels/titans/selfmod.py): each
    block reads its keys, values, step and decay from the block-start memory Mbar, then one titans_scan
    (with mem_period=1, one at `period` on the other memories' columns and one at period 1, step
    period * lr, on M_mem's).

    q, u: [B, T, H, D]; lr_bias, decay_bias: [H]; momentum: [B, T, H]; initial_state M [B, H, D, 3D + 2]
    (or (M, Z) with momentum). Returns (o [B, T, H, D], final state or None)."""
    B, T, H, D = q.shape
    sd = state_dtype(q.dtype)
    state = initial_state
    if momentum is not None and state[1] is None:
        state = (state[0], torch.zeros_like(state[0]))
    outs = []
    for s in range(0, T, period):
        e = min(s + period, T)
        Mbar = state[0] if momentum is not None else state
        r = torch.einsum("bthd,bhdw->bthw", u[:, s:e].to(sd), Mbar.to(sd))
        kk, vv, eta, alpha = r[..., :D], r[..., D:2 * D], r[..., 2 * D], r[..., 2 * D + 1]
        k = kk / torch.sqrt(kk.pow(2).sum(-1, keepdim=True) + eps)
        v = vv / torch.sqrt(vv.pow(2).sum(-1, keepdim=True) + eps)
        vhat = torch.einsum("bthd,bhdw->bthw", v, Mbar.to(sd))                    # self-generated values
        lr = lr_max / period * torch.sigmoid(eta + lr_bias.to(sd))
        decay = torch.sigmoid(alpha + decay_bias.to(sd))
        if mem_period not in (None, period):
            _, rest = titans_scan(q[:, s:e].to(sd), k, vhat[..., :2 * D + 2], lr, decay, scale=scale, period=period,
                                  initial_state=state[..., :2 * D + 2], output_final_state=True)
            o, mem = titans_scan(q[:, s:e].to(sd), k, vhat[..., 2 * D + 2:], period * lr, decay, scale=scale,
                                 period=1, initial_state=state[..., 2 * D + 2:], output_final_state=True)
            state = torch.cat([rest, mem], -1)
            outs.append(o)
            continue
        o, state = titans_scan(q[:, s:e].to(sd), k, vhat, lr, decay, None if momentum is None else momentum[:, s:e],
                               scale, period=period, initial_state=state, output_final_state=True)
        outs.append(o[..., 2 * D + 2:])
    o = torch.cat(outs, 1) if outs else q.new_zeros(B, 0, H, D, dtype=sd)
    return o.to(q.dtype), (state if output_final_state else None)


def titans_selfmod_step(q, u, lr_bias, decay_bias, state, block_state, momentum=None, scale=None, *, lr_max,
                        period, eps=1e-6, mem_period=None):
    """One token in place: the keys, values, step and decay from block_state, then titans_step (with
    mem_period=1, M_mem's columns at their current state with step period * lr)."""
    D = q.shape[-1]
    sd = block_state.dtype
    r = torch.einsum("bhd,bhdw->bhw", u.to(sd), block_state)
    k = r[..., :D] / torch.sqrt(r[..., :D].pow(2).sum(-1, keepdim=True) + eps)
    v = r[..., D:2 * D] / torch.sqrt(r[..., D:2 * D].pow(2).sum(-1, keepdim=True) + eps)
    vhat = torch.einsum("bhd,bhdw->bhw", v, block_state)
    lr = lr_max / period * torch.sigmoid(r[..., 2 * D] + lr_bias.to(sd))
    decay = torch.sigmoid(r[..., 2 * D + 1] + decay_bias.to(sd))
    if mem_period not in (None, period):
        titans_step(q.to(sd), k, vhat[..., :2 * D + 2], lr, state[..., :2 * D + 2], decay, None, scale,
                    block_state=block_state[..., :2 * D + 2])
        o, _ = titans_step(q.to(sd), k, vhat[..., 2 * D + 2:], period * lr, state[..., 2 * D + 2:], decay, None, scale)
        return o.to(q.dtype), state
    o, state = titans_step(q.to(sd), k, vhat, lr, state, decay, momentum, scale, block_state=block_state)
    return o[..., 2 * D + 2:].to(q.dtype), state
