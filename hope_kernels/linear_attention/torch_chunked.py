"""Chunked, vectorised PyTorch linear attention (the "torch" backend; plain autograd gives gradients).

Within a chunk of BT tokens the causal output is

    o_c = scale * (q_c S_{c-1} + tril(q_c k_c^T) v_c),    S_c = S_{c-1} + k_c^T v_c,

and the chunk-start states S_{c-1} are one exclusive cumulative sum over the chunk states
k_c^T v_c, so no Python loop runs over tokens (nor over chunks). Non-causal attention reads
one state S = S_0 + K^T V. Normalisation is handled by the caller (ops.py divides by q . z).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _dense(q, k, v, scale: float, causal: bool, S0: Optional[torch.Tensor], chunk_size: int):
    """q, k: [B, T, H, K], v: [B, T, H, V] in the compute dtype; S0: [B, H, K, V] or None.

    Returns o [B, T, H, V] and the final state [B, H, K, V], both in the compute dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        S = q.new_zeros(B, H, K, V) if S0 is None else S0
        return q.new_zeros(B, 0, H, V), S
    if not causal:
        S = torch.einsum("bthk,bthv->bhkv", k, v)
        if S0 is not None:
            S = S + S0
        return torch.einsum("bthk,bhkv->bthv", q, S) * scale, S
    BT = min(chunk_size, T)   # no chunk longer than the sequence (chunk_size may be huge)
    pad = (-T) % BT
    if pad:  # zero keys/values add nothing to the state; padded queries are cropped
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    C = (T + pad) // BT
    qc, kc, vc = (x.view(B, C, BT, H, x.shape[-1]).transpose(2, 3) for x in (q, k, v))  # [B, C, H, BT, D]
    kv = kc.transpose(-1, -2) @ vc                                                         # [B, C, H, K, V]
    S_incl = kv.cumsum(1)
    S_prev = torch.cat([torch.zeros_like(kv[:, :1]), S_incl[:, :-1]], 1)   # exclusive, no cancellation
    if S0 is not None:
        S_prev = S_prev + S0[:, None]
    mask = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    A = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0)                                 # [B, C, H, BT, BT]
    o = (qc @ S_prev + A @ vc) * scale
    o = o.transpose(2, 3).reshape(B, C * BT, H, V)[:, :T]
    final = S_incl[:, -1] if S0 is None else S_incl[:, -1] + S0
    return o, final


def linear_attention_torch(q, k, v, scale: float, causal: bool, initial_state: Optional[torch.Tensor],
                           cu_seqlens: Optional[torch.Tensor], chunk_size: int, state_dtype: torch.dtype
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """o = scale * q S (causal or not), computed in `state_dtype`; returns (o in state dtype, final state).

    With cu_seqlens (B == 1) each packed sequence is attended on its own (a loop over sequences).
    """
    q, k, v = (x.to(state_dtype) for x in (q, k, v))
    S0 = None if initial_state is None else initial_state.to(state_dtype)
    if cu_seqlens is None:
        return _dense(q, k, v, scale, causal, S0, chunk_size)
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_n, f_n = _dense(q[:, s:e], k[:, s:e], v[:, s:e], scale, causal,
                          None if S0 is None else S0[n:n + 1], chunk_size)
        outs.append(o_n)
        finals.append(f_n)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def linear_attention_step_torch(q, k, v, S, scale: float, z: Optional[torch.Tensor], eps: float):
    """One token in place: S += k v^T (z += k), o = scale q S (/ (scale q.z + eps)); o in S's dtype."""
    S.add_(k.to(S.dtype)[..., :, None] * v.to(S.dtype)[..., None, :])
    qs = q.to(S.dtype) * scale
    o = torch.einsum("bhk,bhkv->bhv", qs, S)
    if z is not None:
        z.add_(k.to(z.dtype))
        o = o / ((qs * z).sum(-1, keepdim=True) + eps)
    return o
