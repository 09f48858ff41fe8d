"""The "torch" backend of cms_scan / cms_step: chunked, vectorised PyTorch with plain autograd.

Outer-product rule (beta None). Within a chunk of length L (local positions i, j = 1..L) and with
g = log(tau) per (head, memory):

    o_i   = scale * (tau^i q_i S_prev + sum_{j<=i} tau^{i-j} (1 - tau) (q_i . k_j) v_j)
    S_end = tau^L S_prev + sum_j tau^{L-j} (1 - tau) k_j v_j^T

Delta rule (beta given), per memory: S_i = tau S_{i-1} + k_i^T x_i with x_i = beta_i (v_i - k_i S_{i-1}).
Unrolled from the chunk-start state S_0, x_i depends on the earlier x_j of the chunk; the WY / UT
transform resolves that with one unit lower-triangular solve per (chunk, memory), independent of S_0:

    (I + A) X = beta (V - tau^{i-1} K S_0),   A[i, j] = beta_i tau^{i-1-j} (k_i . k_j)  (j < i)
    X = U - W S_0,   [U | W] = (I + A)^{-1} [beta V | beta tau^{i-1} K]
    o_i   = scale (tau^i q_i S_0 + sum_{j<=i} tau^{i-j} (q_i . k_j) x_j)
    S_end = tau^L S_0 + sum_j tau^{L-j} k_j^T x_j

k k^T and q k^T of a chunk are formed once for all M memories; each memory's decay table
tau^{i-j} is one [L, L] matrix per (head, memory), so the M memories differ only in their
triangular systems (solved for all chunks and memories in one batched call) and their states.

Every power of tau is exp(n g) with n >= 0: the causal mask is applied to the exponent before
exponentiating, so nothing overflows whatever tau in (0, 1) and T; underflow goes to 0.
The Python loop runs over chunks (T / chunk_size steps), never over tokens; q k^T of a chunk is
computed once and shared by all M memories.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# the delta rule's chunk length on this path (see _delta_dense)
DELTA_CHUNK = 32


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


def _chunks(x, L):
    """[B, T, H, *] with T a multiple of L -> [T / L, B, H, L, *] (chunk first: each chunk's slice is contiguous)."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // L, L, H, *x.shape[3:])
    return x.permute(1, 0, 3, 2, *range(4, x.dim()))


def _per_memory(x, L):
    """beta / per-token mix [B, T, H] or [B, T, H, M] -> [T / L, B, H, M or 1, L]."""
    return _chunks(x, L).unsqueeze(3) if x.dim() == 3 else _chunks(x, L).transpose(-1, -2)


def _block_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^{-1} for strictly lower-triangular A [..., L, L], by recursive block inversion:

        [[T11, 0], [T21, T22]]^{-1} = [[T11^-1, 0], [-T22^-1 T21 T11^-1, T22^-1]]

    from 1 x 1 blocks up, in place, every level one batched matmul over all blocks (exact up to rounding like
    forward substitution; much faster on the CPU than batched triangular solves of small systems).
    L is padded to a power of two with identity rows."""
    L = A.shape[-1]
    P = 1 << max(L - 1, 0).bit_length()
    if P != L:
        A = F.pad(A, (0, P - L, 0, P - L))
    Y = torch.eye(P, dtype=A.dtype, device=A.device).expand(A.shape).contiguous()
    b = 1
    while b < P:                                  # Y's diagonal b x b blocks are inverted: fill the 2b ones
        n = P // (2 * b)
        diag = lambda X: torch.diagonal(X.unflatten(-2, (n, 2 * b)).unflatten(-1, (n, 2 * b)),
                                        dim1=-4, dim2=-2).movedim(-1, -3)     # [..., n, 2b, 2b] views
        Yb, Ab = diag(Y), diag(A)
        Yb[..., b:, :b] = -(Yb[..., b:, b:] @ Ab[..., b:, :b] @ Yb[..., :b, :b])
        b *= 2
    return Y[..., :L, :L]


class _UnitLowerInverse(torch.autograd.Function):
    """Y = (I + A)^{-1}; backward dA = -(Y^T dY Y^T) on the strict lower triangle (d(T^-1) = -Y dT Y)."""

    @staticmethod
    def forward(ctx, A):
        Y = _block_inverse(A)
        ctx.save_for_backward(Y)
        return Y

    @staticmethod
    def backward(ctx, dY):
        (Y,) = ctx.saved_tensors
        Yt = Y.transpose(-1, -2)
        return -(Yt @ dY @ Yt).tril(-1)


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^{-1} for strictly lower-triangular A [..., L, L] (see `_block_inverse`), differentiable in A."""
    return _UnitLowerInverse.apply(A)


class _DeltaRecurrence(torch.autograd.Function):
    """The delta rule's only sequential part, over chunks c = 1..nC with U_c, W_c [N, L, V | K],
    ke_c = tau^{L-j} k_j [N, L, K], t = tau^L [N, 1, 1] and S_0 [N, K, V] (N = B H M):

        X_c = U_c - W_c S_{c-1},   S_c = t S_{c-1} + ke_c^T X_c

    Returns (S_{c-1} for every c [nC, N, K, V], X [nC, N, L, V], S_nC). Backward, from c = nC down:
    dX_c += ke_c dS_c, dke_c = X_c dS_c^T, dt += <S_{c-1}, dS_c>, dU_c = dX_c, dW_c = -dX_c S_{c-1}^T,
    dS_{c-1} = t dS_c - W_c^T dX_c + (the read-outs' gradient of S_{c-1}).
    Written out because autograd's graph of this loop (one node per product, a stack, scalar
    multiplies for the minus sign) cost more than the products themselves on the CPU."""

    @staticmethod
    def forward(ctx, U, W, ke, t, S):
        nC = U.shape[0]
        states, X = U.new_empty(nC + 1, *S.shape), torch.empty_like(U)
        states[0] = S
        for c in range(nC):
            torch.baddbmm(U[c], W[c], states[c], alpha=-1, out=X[c])
            torch.mul(states[c], t, out=states[c + 1]).baddbmm_(ke[c].transpose(-1, -2), X[c])
        starts = states[:nC]
        ctx.save_for_backward(W, ke, t, starts, X)
        return starts, X, states[nC].clone()

    @staticmethod
    def backward(ctx, d_starts, dX, dS):
        W, ke, t, starts, X = ctx.saved_tensors
        dU, dW, dke = torch.empty_like(X), torch.empty_like(W), torch.empty_like(ke)
        dt = torch.zeros_like(t)
        N, K, V = dS.shape
        for c in reversed(range(dX.shape[0])):
            torch.baddbmm(dX[c], ke[c], dS, out=dU[c])
            torch.bmm(X[c], dS.transpose(-1, -2), out=dke[c])
            dt.baddbmm_(starts[c].reshape(N, 1, K * V), dS.reshape(N, K * V, 1))
            torch.bmm(dU[c], starts[c].transpose(-1, -2), out=dW[c])
            dS = torch.addcmul(d_starts[c], t, dS).baddbmm_(W[c].transpose(-1, -2), dU[c], alpha=-1)
        return dU, dW.neg_(), dke, dt, dS


def _delta_chunks(q, k, v, beta, mix, g, scale: float, S):
    """Delta rule over nC equal chunks of L tokens (all in the compute dtype).

    q, k: [nC, B, H, L, K]; v: [nC, B, H, L, V]; beta: [nC, B, H, M or 1, L]; g = log(tau): [H, M];
    mix: None, [H, M] or [nC, B, H, M, L]; S: [B, H, M, K, V]. Returns (o: [nC, B, H, L, V] with mix,
    [nC, B, H, M, L, V] without; S at the end).

    Everything but the state recurrence is batched over chunks: the loop runs X_c = U_c - W_c S_{c-1}
    and S_c = tau^L S_{c-1} + (tau^{L-j} k_j)^T X_c (`_DeltaRecurrence`); the read-outs
    scale tau^i q_i S_{c-1} + sum_j tau^{i-j} (q_i . k_j) x_j follow for all chunks at once."""
    nC, B, H, L, K = q.shape
    V, M = v.shape[-1], g.shape[-1]
    N = B * H * M
    pos = torch.arange(L, device=q.device, dtype=g.dtype)
    diff = pos[:, None] - pos[None, :]                                       # i - j
    gm = g[..., None, None]                                                  # [H, M, 1, 1]
    # decay tables [H, M, L, L], masked in the exponent before exp: tau^{i-j} (j <= i), tau^{i-1-j} (j < i)
    E = torch.exp(torch.where(diff >= 0, diff * gm, float("-inf")))
    Ep = torch.exp(torch.where(diff >= 1, (diff - 1) * gm, float("-inf")))
    t_prev = torch.exp(pos * g[..., None])                                   # tau^{i-1} (1-based i): [H, M, L]
    t_read = torch.exp((pos + 1) * g[..., None])                             # tau^i
    t_end = torch.exp((L - 1 - pos) * g[..., None])                          # tau^{L-j}
    t_L = torch.exp(L * g)[..., None, None]                                  # [H, M, 1, 1]

    kt = k.transpose(-1, -2)
    A = (beta[..., None] * Ep) * (k @ kt)[:, :, :, None]                     # [nC, B, H, M, L, L]
    Tb = unit_lower_inverse(A) * beta[..., None, :]
    # [U | W] = (I + A)^{-1} [beta V | beta tau^{i-1} K]: beta and tau^{j-1} scale the columns of the
    # inverse, so V and K are multiplied as they are (M and the rows flattened: one plain matmul each)
    U = (Tb.reshape(nC, B, H, M * L, L) @ v).view(nC, N, L, V)
    W = ((Tb * t_prev[..., None, :]).reshape(nC, B, H, M * L, L) @ k).view(nC, N, L, K)
    ke = (k[:, :, :, None] * t_end[..., None]).reshape(nC, N, L, K)        # tau^{L-j} k_j
    t_N = t_L.expand(B, H, M, 1, 1).reshape(N, 1, 1)
    S0, X, S = _DeltaRecurrence.apply(U, W, ke, t_N, S.reshape(N, K, V))   # [nC, N, K, V], [nC, N, L, V]

    qk = scale * (q @ kt)                                                    # [nC, B, H, L, L], shared by the M memories
    c_read = scale * t_read                                                  # coefficient of q_i S_0
    if mix is None:
        Aqk = qk[:, :, :, None] * E                                          # [nC, B, H, M, L, L]
        o = (c_read[..., None] * q[:, :, :, None]) @ S0.view(nC, B, H, M, K, V)
        return o + Aqk @ X.view(nC, B, H, M, L, V), S.view(B, H, M, K, V)
    mx = (mix[..., None] if mix.dim() == 2 else mix).transpose(-1, -2)     # [*, H, L or 1, M]
    # the M memories summed inside one matmul each: rows i, columns (m, j) or (m, k)
    Aqk = qk[..., None, :] * (E.transpose(-3, -2) * mx[..., None])            # [nC, B, H, L, M, L]
    cq = (c_read.transpose(-1, -2) * mx)[..., None] * q[..., None, :]        # [nC, B, H, L, M, K]
    o = cq.reshape(nC, B, H, L, M * K) @ S0.view(nC, B, H, M * K, V)
    return o + Aqk.reshape(nC, B, H, L, M * L) @ X.view(nC, B, H, M * L, V), S.view(B, H, M, K, V)


def _delta_dense(q, k, v, beta, tau, mix, scale: float, state, chunk_size: int):
    """One batch of equal-length sequences (compute dtype). beta [B, T, H(, M)], tau [H, M],
    mix None / [H, M] / [B, T, H, M]. Returns o ([B, T, H, V] with mix, [B, T, H, M, V] without) and S_T.

    The chunk is at most DELTA_CHUNK tokens whatever chunk_size asks: the work on the [L, L] tables
    grows with L while the state recurrence does not, and 16-32 is fastest on the CPU."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    g = torch.log(tau)
    S = q.new_zeros(B, H, M, K, V) if state is None else state.to(q.dtype)
    L = min(chunk_size, DELTA_CHUNK, max(T, 1))
    full = T // L * L
    outs = []
    for s, e, Lg in ((0, full, L), (full, T, T - full)):                     # the full chunks, then the rest
        if e == s:
            continue
        part = lambda x: x[:, s:e]
        mx = None if mix is None else (mix if mix.dim() == 2 else _per_memory(part(mix), Lg))
        o, S = _delta_chunks(_chunks(part(q), Lg), _chunks(part(k), Lg), _chunks(part(v), Lg),
                             _per_memory(part(beta), Lg), mx, g, scale, S)
        if mix is not None:                                                  # [nC, B, H, L, V]
            outs.append(o.permute(1, 0, 3, 2, 4).reshape(B, e - s, H, V))
        else:                                                                # [nC, B, H, M, L, V]
            outs.append(o.permute(1, 0, 4, 2, 3, 5).reshape(B, e - s, H, M, V))
    if not outs:
        outs.append(q.new_zeros((B, 0, H, V) if mix is not None else (B, 0, H, M, V)))
    return torch.cat(outs, 1), S


def cms_scan_torch(q, k, v, tau, mix, scale, initial_state, output_final_state, cu_seqlens, chunk_size, beta=None):
    """tau: [H, M]; mix: None, [H, M] or [B, T, H, M] (already broadcast); beta None (outer rule) or
    [B, T, H(, M)] (delta rule). Returns (o, final_state)."""
    dtype, cd = q.dtype, compute_dtype(q.dtype)
    tau = tau.to(cd)
    mx = None if mix is None else mix.to(cd)
    if beta is not None:
        q, k, v, beta = (x.to(cd) for x in (q, k, v, beta))
        dense = lambda sl, h0: _delta_dense(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], tau,
                                            mx if mx is None or mx.dim() == 2 else mx[:, sl], scale, h0, chunk_size)
    else:
        dense = lambda sl, h0: _scan_dense(q[:, sl], k[:, sl], v[:, sl], tau, scale, h0, chunk_size)
    if cu_seqlens is None:
        o, S = dense(slice(None), initial_state)
    else:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
            o_n, S_n = dense(slice(s, e), None if initial_state is None else initial_state[n:n + 1])
            outs.append(o_n)
            finals.append(S_n)
        o, S = torch.cat(outs, dim=1), torch.cat(finals)
    if mx is not None and beta is None:
        o = (o * (mx if mx.dim() == 4 else mx[None, None])[..., None]).sum(-2)
    return o.to(dtype), (S.to(torch.float64 if cd == torch.float64 else torch.float32) if output_final_state else None)


def cms_step_torch(q, k, v, tau, state, mix, scale, beta=None):
    """One token: state [B, H, M, K, V] updated in place; tau [H, M]; mix None, [H, M] or [B, H, M];
    beta None (outer rule) or [B, H(, M)] (delta rule: S <- tau S - beta k^T (k S - v))."""
    sd = state.dtype
    t = tau.to(sd)[None, :, :, None, None]
    if beta is None:
        kv = k.to(sd)[..., :, None] * v.to(sd)[..., None, :]             # [B, H, K, V]
        state.mul_(t).add_((1 - t) * kv[:, :, None])
    else:
        k_ = k.to(sd)
        b = beta.to(sd)
        b = b[..., None] if b.dim() == 2 else b                           # [B, H, M or 1]
        err = torch.einsum("bhk,bhmkv->bhmv", k_, state) - v.to(sd)[:, :, None]
        state.mul_(t).sub_(b[..., None, None] * k_[:, :, None, :, None] * err[..., None, :])
    o = torch.einsum("bhk,bhmkv->bhmv", q.to(sd) * scale, state)
    if mix is not None:
        o = (o * mix.to(sd)[..., None]).sum(-2)
    return o.to(q.dtype), state
