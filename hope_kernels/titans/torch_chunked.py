"""Chunked, vectorised PyTorch Titans memory (the "torch" backend; plain autograd gives gradients).

Inside a chunk of L tokens (positions i = 1..L) write the update as S_i = d_i S_{i-1} + Z_i with
Z_i = m_i Z_{i-1} + k_i^T x_i, x_i = lr_i (v_i - k_i Sbar_i). Unrolled from the chunk-start states
(S_0, Z_0), every quantity is a masked [L, L] coefficient matrix times the rows x:

    D[i, j] = d_{j+1} ... d_i,   M[i, j] = m_{j+1} ... m_i     (j <= i, else 0)
    C = D @ M  (C = D without momentum),   a = D @ (m_1 ... m_j)_j,   gamma_i = d_1 ... d_i
    S_i = gamma_i S_0 + a_i Z_0 + sum_{j<=i} C[i, j] k_j^T x_j
    Z_i = (m_1 ... m_i) Z_0 + sum_{j<=i} M[i, j] k_j^T x_j
    o_i = scale q_i S_i

No product of gates is ever divided by: the decay products are exp of differences of cumulative
log-decays masked before the exp (in float64: the [L]-vectors are tiny), the momentum products
cumulative products of a masked matrix (momentum may be exactly 0).

* read="block_start" reads o_i = scale q_i Sbar_i instead: at period 1 the memory before the token
  (row i - 1 of every coefficient above), at period >= 2 one matmul against the block-start memory.
* period >= 2: Sbar is the block-start memory, so X = lr (V - K Sbar) is one matmul against it.
  A chunk is a block (period <= chunk_size) or a piece of one (blocks are then padded to a
  multiple of chunk_size; padded tokens have k = 0, lr = 0 and are never read).
* period = 1 (the delta rule / DGD, with or without momentum): x_i depends on S_{i-1} = gamma_{i-1} S_0
  + a_{i-1} Z_0 + sum_{j<i} C[i-1, j] k_j^T x_j, which the WY / UT transform resolves inside the chunk:
  (I + A) X = lr (V - gamma_{i-1} K S_0 - a_{i-1} K Z_0) with A[i, j] = lr_i C[i-1, j] (k_i . k_j) for
  j < i, so X = U - W S_0 - W_z Z_0 with U, W, W_z from one unit lower-triangular solve per chunk
  (independent of the state, computed for all chunks at once).

Everything that does not depend on the state is computed for all chunks at once; the Python
loop over chunks does four small matmuls (up to seven with momentum), vectorised over batch and heads.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _log_cumsum(g: Optional[torch.Tensor], shape, device) -> torch.Tensor:
    """Inclusive cumulative sum of log(g) over the last axis, in float64 (0 where g is None)."""
    if g is None:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    return g.double().log().cumsum(-1)


def _decay_products(LD: torch.Tensor) -> torch.Tensor:
    """D[i, j] = exp(LD_i - LD_j) = d_{j+1} ... d_i where j <= i, else 0; masked before the exp."""
    L = LD.shape[-1]
    mask = torch.ones(L, L, dtype=torch.bool, device=LD.device).tril()
    return (LD[..., :, None] - LD[..., None, :]).masked_fill(~mask, float("-inf")).exp()


def _momentum_products(m: torch.Tensor):
    """M[i, j] = m_{j+1} ... m_i (j <= i, else 0) and mu_i = m_1 ... m_i for m [..., L].

    Cumulative products of a masked matrix rather than logs: momentum may be exactly 0 (its range is
    [0, 1)), and the product's gradient with respect to a zero factor must stay exact and finite."""
    L = m.shape[-1]
    strict = torch.ones(L, L, dtype=torch.bool, device=m.device).tril(-1)
    factors = torch.where(strict, m[..., :, None], torch.ones((), dtype=m.dtype, device=m.device))
    return factors.cumprod(-2).tril(), m.cumprod(-1)


def _layout(T: int, period: int, L: int, device):
    """Padded layout: blocks of `period` tokens, each padded to a multiple of L.

    Returns (index of each padded slot into [0, T] (T = padding), position of each token in the padded
    sequence, tokens per padded block). Every chunk holds at least one token."""
    Pp = -(-period // L) * L
    nb = -(-T // period)
    j = torch.arange(Pp, device=device)
    src = torch.arange(nb, device=device)[:, None] * period + j[None, :]
    src = torch.where((j[None, :] < period) & (src < T), src, T).reshape(-1)
    t = torch.arange(T, device=device)
    pos = (t // period) * Pp + t % period
    last = (T - 1) // period * Pp + (T - 1) % period
    used = -(-(last + 1) // L) * L             # drop chunks of the last block that hold no token
    return src[:used], pos, Pp


def _pad(x: torch.Tensor, src: torch.Tensor, fill: float) -> torch.Tensor:
    """x [B, T, ...] gathered into the padded layout, `fill` in padded slots."""
    pad = x.new_full((x.shape[0], 1) + tuple(x.shape[2:]), fill)
    return torch.cat([x, pad], 1).index_select(1, src)


def _dense(q, k, v, lr, decay, momentum, scale: float, period: int, read: str, S0, Z0, chunk_size: int):
    """One batch of sequences starting at t = 0, all in the compute dtype. Returns (o, S_T, Z_T or None).

    Only shapes and Python numbers steer it (no value of a tensor is read on the host)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt, dev = q.dtype, q.device
    S = q.new_zeros(B, H, K, V) if S0 is None else S0
    Z = None if momentum is None else (q.new_zeros(B, H, K, V) if Z0 is None else Z0)
    if T == 0:
        return q.new_zeros(B, 0, H, V), S, Z
    period = min(period, T)                   # one block per sequence beyond T: buffers sized by the data
    ut = period == 1
    block_start = read == "block_start"
    L = min(chunk_size if ut else min(period, chunk_size), T)   # a short sequence is one unpadded chunk
    src, pos, Pp = _layout(T, L if ut else period, L, dev)
    per_block = 1 if ut else Pp // L          # chunks per block: the gradient memory is refreshed at each first

    padded = src.numel() != T                 # else the layout is the identity: no gather, no copy

    def chunks(x, fill=0.):                   # [B, T, H, *] -> [B, H, nC, L, *]
        if padded:
            x = _pad(x, src, fill)
        nC = x.shape[1] // L
        x = x.reshape(B, nC, L, H, *x.shape[3:])
        return x.permute(0, 3, 1, 2, *range(4, x.dim())).contiguous()

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    lrc = chunks(lr)
    nC = qc.shape[2]
    shape = (B, H, nC, L)
    LD = _log_cumsum(None if decay is None else chunks(decay, 1.), shape, dev)
    D = _decay_products(LD)                                                # [B, H, nC, L, L] float64
    gamma = LD.exp()
    # the row of the chunk's last real token gives the chunk-end state (padding sits after it); every
    # chunk holds at least one token: a block of P = period (L when ut) tokens fills P // L chunks
    # and the remainder, the last block fewer
    blk = L if ut else period
    ci = torch.arange(nC, device=dev)
    in_block = (T - ci // per_block * blk).clamp(max=blk)                  # real tokens of the chunk's block
    last = (in_block - ci % per_block * L).clamp(1, L) - 1

    def end_row(coef):                        # [B, H, nC, L, L] -> row `last` of each chunk: [B, H, nC, L]
        return coef[:, :, ci, last]

    prev = lambda x, first: F.pad(x[..., :-1], (1, 0), value=first)        # x_{i-1} along the chunk
    if momentum is not None:
        Mm, mu = _momentum_products(chunks(momentum, 1.).double())
        C = D @ Mm
        a = D @ mu[..., None]                                              # [B, H, nC, L, 1]
        a_end, mu_end = a[:, :, ci, last, 0], mu[:, :, ci, last]
        Kz = (end_row(Mm).to(dt)[..., None] * kc)                          # M[last, j] k_j
    else:
        C = D
    Wz = None
    if ut:
        # (I + A) X = lr (V - gamma_{i-1} K S_0 - a_{i-1} K Z_0),  A[i, j] = lr_i C[i-1, j] (k_i . k_j), j < i
        C_prev = F.pad(C[..., :-1, :], (0, 0, 1, 0)).to(dt)
        A = lrc[..., None] * C_prev * (kc @ kc.transpose(-1, -2))
        rhs = [lrc[..., None] * vc, (lrc * prev(gamma, 1.).to(dt))[..., None] * kc]
        if momentum is not None:
            rhs.append((lrc * prev(a[..., 0], 0.).to(dt))[..., None] * kc)
        I = torch.eye(L, dtype=dt, device=dev)
        sol = torch.linalg.solve_triangular(I + A, torch.cat(rhs, -1), upper=False, unitriangular=True)
        U, W, *Wz = sol.split([V] + [K] * (len(rhs) - 1), -1)
        Wz = Wz[0] if Wz else None
    else:
        W, U = lrc[..., None] * kc, lrc[..., None] * vc
    # the read: o_i = scale q_i S_i, S_i unrolled from the chunk start (read="current"); with
    # read="block_start" the memory before the token (period 1: row i - 1 of every coefficient) or the
    # block-start memory itself (period >= 2: one matmul against it, nothing from inside the block)
    Aqk = Qz = None
    if block_start and not ut:
        Qs = scale * qc
    else:
        shift = (lambda x, first: prev(x, first)) if block_start else (lambda x, first: x)
        Qs = scale * shift(gamma, 1.)[..., None].to(dt) * qc
        Cq = C_prev if block_start else C.to(dt)
        Aqk = scale * (qc @ kc.transpose(-1, -2)) * Cq
        if momentum is not None:
            Qz = scale * shift(a[..., 0], 0.)[..., None].to(dt) * qc
    Kend = end_row(C).to(dt)[..., None] * kc
    g_end = gamma[:, :, ci, last].to(dt)[..., None, None]                  # [B, H, nC, 1, 1]

    # per-chunk views by unbind: indexing inside the loop would make autograd scatter every chunk's
    # gradient into a zero-filled copy of the whole tensor
    U, W, Qs, KendT = (x.unbind(2) for x in (U, W, Qs, Kend.transpose(-1, -2).contiguous()))
    Aqk = None if Aqk is None else Aqk.unbind(2)
    Qz = None if Qz is None else Qz.unbind(2)
    g_end = g_end.unbind(2)
    if Wz is not None:
        Wz = Wz.unbind(2)
    if Z is not None:
        KzT = Kz.transpose(-1, -2).contiguous().unbind(2)
        a_end, mu_end = (x.to(dt)[..., None, None].unbind(2) for x in (a_end, mu_end))
    outs = []
    Sg = S
    for c in range(nC):
        if c % per_block == 0:
            Sg = S
        X = U[c] - W[c] @ Sg
        if Wz is not None:
            X = X - Wz[c] @ Z
        if Aqk is None:
            o = Qs[c] @ Sg
        else:
            o = Qs[c] @ S + Aqk[c] @ X
            if Qz is not None:
                o = o + Qz[c] @ Z
        S_new = g_end[c] * S + KendT[c] @ X
        if Z is not None:
            S_new = S_new + a_end[c] * Z
            Z = mu_end[c] * Z + KzT[c] @ X
        S = S_new
        outs.append(o)
    o = torch.stack(outs, 1).permute(0, 1, 3, 2, 4).reshape(B, nC * L, H, V)   # [B, nC, H, L, V] -> tokens
    return (o.index_select(1, pos) if padded else o), S, Z


def titans_scan_torch(q, k, v, lr, decay, momentum, scale: float, period: int, S0, Z0,
                      cu_seqlens: Optional[torch.Tensor], chunk_size: int, sd: torch.dtype, read: str = "current"
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The scan in `sd` (float32 or float64); returns (o in sd, S_T, Z_T or None).

    With cu_seqlens (B == 1) each packed sequence runs on its own (a loop over sequences)."""
    q, k, v, lr, decay, momentum, S0, Z0 = (None if x is None else x.to(sd)
                                            for x in (q, k, v, lr, decay, momentum, S0, Z0))
    if cu_seqlens is None:
        return _dense(q, k, v, lr, decay, momentum, scale, period, read, S0, Z0, chunk_size)
    bounds = cu_seqlens.tolist()
    outs, Ss, Zs = [], [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = lambda x: None if x is None else x[:, s:e]
        one = lambda x: None if x is None else x[n:n + 1]
        o, S, Z = _dense(part(q), part(k), part(v), part(lr), part(decay), part(momentum), scale, period, read,
                         one(S0), one(Z0), chunk_size)
        outs.append(o)
        Ss.append(S)
        Zs.append(Z)
    return torch.cat(outs, 1), torch.cat(Ss), (None if momentum is None else torch.cat(Zs))


def titans_step_torch(q, k, v, lr, decay, momentum, S, Z, Sbar, scale: float) -> torch.Tensor:
    """One token in place on S (and Z): x = lr (v - k Sbar), Z = m Z + k^T x, S = d S + Z (or + k^T x).

    Returns o = scale q S in S's dtype."""
    sd = S.dtype
    k_, lr_ = k.to(sd), lr.to(sd)
    x = lr_[..., None] * (v.to(sd) - torch.einsum("bhk,bhkv->bhv", k_, Sbar.to(sd)))
    kx = k_[..., :, None] * x[..., None, :]
    if decay is not None:
        S.mul_(decay.to(sd)[..., None, None])
    if Z is not None:
        Z.mul_(momentum.to(sd)[..., None, None]).add_(kx)
        S.add_(Z)
    else:
        S.add_(kx)
    return scale * torch.einsum("bhk,bhkv->bhv", q.to(sd), S)
