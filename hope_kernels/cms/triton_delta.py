"""The delta-rule cms_scan on the "triton" backend: a chunk pipeline over all M memories, forward and backward.

Per token and memory m (constant retention tau = tau_m, g = log tau):
    S_t = tau S_{t-1} - beta_t k_t^T (k_t S_{t-1} - v_t),   o_{m,t} = scale q_t S_t,   o_t = sum_m mix_m o_{m,t}.

Chunks of BT tokens, local positions i, j = 0 .. L-1, chunk-start state h. With x_i = beta_i (v_i - k_i S_{i-1}):

    S_{i-1} = tau^i h + sum_{j<i} tau^{i-1-j} k_j^T x_j
    (I + A) x = beta (v - tau^i k h),   A_ij = beta_i (k_i . k_j) tau^{i-1-j}  (j < i, strictly lower)
    Minv = (I + A)^-1,  w = Minv (beta tau^i k),  u = Minv (beta v):   x = u - w h     (the UT / WY form)
    h_next = tau^L h + sum_j tau^{L-1-j} k_j^T x_j
    o_i    = scale (tau^{i+1} q_i h + sum_{j<=i} tau^{i-j} (q_i . k_j) x_j)

Every power of tau is exp(n g) with n >= 0 (masked exponents are never formed), so tau in [1e-3, 1 - 1e-4] is
safe for any T. k k^T and q k^T of a chunk are formed once and shared by the M memories.

Forward: delta_wy_kernel (one program per chunk x head, a loop over the memories: Minv, w, u of each memory),
delta_state_kernel (the only sequential pass: one program per sequence x head x memory and V-tile walks the
chunks with h in fp32 registers, storing every chunk-start state and x), delta_out_kernel (one program per
chunk x head and V-tile, a loop over the memories; the mix is applied in registers, so with a mix no per-memory
read-out is stored).

Backward: the forward's WY and state kernels again (only the inputs are saved), then delta_state_bwd_kernel, the
reverse pass with the adjoint dh of h in registers (dO_m = mix_i dO_i, or memory m's slice of dO):

    dx = scale ((q k^T) * D)^T dO_m + (tau^{L-1-j} k) dh_next,     dr = Minv^T dx
    dh = tau^L dh_next + scale (tau^{i+1} q)^T dO_m - w^T dx

storing dh_next of every chunk and dr; then delta_grad_kernel (one program per chunk x head, memories and V-tiles
looped inside): dq, dk, dv = sum_m beta_m dr_m, dbeta, dmix_{i,m} = dO_i . o_{m,i} and the decay gradient. The
decay gradient is the exponent-weighted sum dL/dg = sum over every power tau^n of n times its term's share of
the loss gradient (pairs i - j, i + 1, L - 1 - j, L, i and i - 1 - j), then dL/dtau = (dL/dg) / tau: no terms
that cancel, so tau near 1e-3 and near 1 keep fp32 accuracy.

Buffers beyond the inputs: per memory and token (w, u, x, dr: [B, T, H, M, K or V]), per memory and chunk
(Minv [chunks, H, M, BT, BT] fp32, chunk states h and dh_next [chunks, H, M, K, V] in the input dtype: they only
feed dots). Grids put every count that grows with the data on axis 0 (`launch_grids`, checked by check_grid).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig
from ..triton_utils import (autotune, check_grid, chunk_bounds, chunk_indices, chunk_offsets, empty, kernel_spec,
                            load_tile, seq_bounds, state_tile, unit_lower_inverse, upcast_dots)
from .triton_tiles import _decays, _mix_rows, _pad, _rows, _store_rows

WY_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 1)) for w in (4, 8) for s in (1, 2)]
STATE_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 1)) for w in (4, 8) for s in (1, 2)]
STATE_BWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 1))
                     for w in (4, 8) for s in (1, 2)]
OUT_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 1)) for w in (4, 8) for s in (1, 2)]
GRAD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 1)) for w in (4, 8) for s in (1, 2)]
STATE_BV = 32      # V-tile of the sequential passes: a [K, 32] fp32 state stays in registers at K = 128
OUT_BV = 64        # V-tile of the output kernel
LOOP_BV = 32       # V-tile of the loops inside the chunk kernels (see loop_bv)


def chunk_tile(chunk_size: int, K: int, T: int) -> int:
    """Tokens per chunk: chunk_size, at most 32 (16 where K > 64, for the gradient kernel's registers), at most
    T rounded up to a power of two, at least 16 (tl.dot)."""
    return max(16, min(chunk_size, 32 if K <= 64 else 16, triton.next_power_of_2(max(T, 1))))


def loop_bv(K: int, V: int, kernel: str) -> int:
    """V-tile of the loops inside the chunk kernels: 32, or 16 for the WY and output-gradient kernels where
    K > 64 (at 32 they use local memory on sm_90; the WY-gradient kernel spills at 16 instead)."""
    return min(LOOP_BV // 2 if K > 64 and kernel in ("wy", "grad_out") else LOOP_BV, _pad(V))


def launch_grids(*, N: int, H: int, M: int, NT: int, V: int) -> dict:
    """Every launch grid of the pipeline by kernel name; NT counts the real chunks of the batch."""
    seq = (N * H * M, triton.cdiv(V, STATE_BV))
    return {"wy": (NT * H,), "state": seq, "out": (NT * H, triton.cdiv(V, OUT_BV)), "state_bwd": seq,
            "grad_out": (NT * H,), "grad_wy": (NT * H,)}


@triton.jit
def _exp_mask(g, L, o_t, STRICT: tl.constexpr):
    """[BT, BT] tau^{i-j} on j <= i < L, or tau^{i-1-j} on j < i < L (STRICT); zero elsewhere."""
    if STRICT:
        m = (o_t[None, :] < o_t[:, None]) & (o_t[:, None] < L)
        n = o_t[:, None] - o_t[None, :] - 1
    else:
        m = (o_t[None, :] <= o_t[:, None]) & (o_t[:, None] < L)
        n = o_t[:, None] - o_t[None, :]
    return tl.where(m, tl.exp(tl.where(m, n, 0).to(tl.float32) * g), 0.)


@triton.jit
def _beta_rows(beta, rows, i_h, i_m, m_t, H: tl.constexpr, M, BETA_PER_MEMORY: tl.constexpr):
    if BETA_PER_MEMORY:
        return tl.load(beta + (rows * H + i_h) * M + i_m, mask=m_t, other=0.).to(tl.float32)
    return tl.load(beta + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)


# ----------------------------------------------------------------------------- forward
@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@autotune(WY_CONFIGS, key=["H", "K", "V", "BT", "BETA_PER_MEMORY"])
@triton.jit(do_not_specialize=["T", "M"])
def delta_wy_kernel(k, v, beta, decay, Mi, w, u, cu_seqlens, chunk_idx, T, M, H: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BETA_PER_MEMORY: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (chunk, head), memories looped: Minv = (I + A)^-1 (fp32), w = Minv (beta tau^i k),
    u = Minv (beta v) of every memory, from one k k^T."""
    i_ch = tl.program_id(0)
    i_c, i_h = i_ch // H, i_ch % H
    _, row0, L = chunk_bounds(i_c, T, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    m_t, m_k = o_t < L, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    rows = row0 + o_t
    b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    dt = b_k.dtype
    b_kk = tl.dot(b_k, tl.trans(b_k))
    for i_m in range(M):
        g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
        b_beta = _beta_rows(beta, rows, i_h, i_m, m_t, H, M, BETA_PER_MEMORY)
        b_M = unit_lower_inverse(b_beta[:, None] * b_kk * _exp_mask(g, L, o_t, True), BT)
        tl.store(Mi + ((i_c.to(tl.int64) * H + i_h) * M + i_m) * BT * BT + o_t[:, None] * BT + o_t[None, :], b_M)
        b_Md = b_M.to(dt)
        e_w = tl.exp(o_t.to(tl.float32) * g)
        b_w = tl.dot(b_Md, ((b_beta * e_w)[:, None] * b_k).to(dt))
        _store_rows(w + (i_h * M + i_m) * K, row0, H * M * K, o_t, o_k, m_tk, b_w)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            b_v = _rows(v + i_h * V, row0, H * V, o_t, o_v, m_tv, UPCAST)
            b_u = tl.dot(b_Md, (b_beta[:, None] * b_v).to(dt))
            _store_rows(u + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, b_u)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
                    "USE_INITIAL_STATE": lambda a: a["h0"] is not None})
@autotune(STATE_CONFIGS, key=["H", "K", "V", "BT"])
@triton.jit(do_not_specialize=["T", "M"])
def delta_state_kernel(k, decay, w, u, x, h, h0, ht, cu_seqlens, chunk_offs, T, M, H: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (sequence x head x memory, V-tile): every chunk-start state into `h`, x = u - w h into
    `x`, the final state (fp32) into `ht`."""
    i_nhm, i_v = tl.program_id(0), tl.program_id(1)
    i_nh, i_m = i_nhm // M, i_nhm % M
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_seq, boc = seq_bounds(i_n, T, cu_seqlens, chunk_offs, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k, o_v, m_k, m_v, m_kv, off_kv, b_h = state_tile(h0, i_nhm, i_v, K, V, BK, BV, USE_INITIAL_STATE)
    g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
    for c in range(0, tl.cdiv(T_seq, BT)):
        tl.store(h + (((boc + c) * H + i_h) * M + i_m) * K * V + off_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        row0 = bos + c * BT
        L = tl.minimum(T_seq - c * BT, BT)
        m_t = o_t < L
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        b_w = _rows(w + (i_h * M + i_m) * K, row0, H * M * K, o_t, o_k, m_tk, UPCAST)
        dt = b_w.dtype
        b_u = tl.load(u + row0 * (H * M * V) + (i_h * M + i_m) * V + o_t[:, None] * (H * M * V) + o_v[None, :],
                      mask=m_tv, other=0.).to(tl.float32)
        b_x = b_u - tl.dot(b_w, b_h.to(dt))
        _store_rows(x + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, b_x)
        b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
        e_k = tl.where(m_t, tl.exp(tl.where(m_t, L - 1 - o_t, 0).to(tl.float32) * g), 0.)
        b_h = tl.exp(L.to(tl.float32) * g) * b_h + tl.dot(tl.trans((b_k * e_k[:, None]).to(dt)), b_x.to(dt))
    tl.store(ht + i_nhm.to(tl.int64) * K * V + off_kv, b_h, mask=m_kv)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None, "HAS_MIX": lambda a: a["mix"] is not None})
@autotune(OUT_CONFIGS, key=["H", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T", "M"])
def delta_out_kernel(q, k, decay, mix, x, h, o, cu_seqlens, chunk_idx, scale, T, M, H: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     MIX_PER_TOKEN: tl.constexpr, HAS_MIX: tl.constexpr, IS_VARLEN: tl.constexpr,
                     UPCAST: tl.constexpr):
    """One program per (chunk x head, V-tile), memories looped on one q k^T:
    o_m = scale (tau^{i+1} q h_m + ((q k^T) * D_m) x_m), mixed in registers (o = sum_m mix_m o_m) or stored."""
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    _, row0, L = chunk_bounds(i_c, T, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < K, o_v < V
    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
    b_q = _rows(q + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    dt = b_q.dtype
    b_qk = tl.dot(b_q, tl.trans(b_k))
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_m in range(M):
        g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
        b_D, e_q, e_k = _decays(g, L, o_t)
        b_h = load_tile(h + ((i_c.to(tl.int64) * H + i_h) * M + i_m) * K * V + o_k[:, None] * V + o_v[None, :],
                        m_k[:, None] & m_v[None, :], UPCAST)
        b_x = _rows(x + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, UPCAST)
        b_om = scale * (e_q[:, None] * tl.dot(b_q, b_h) + tl.dot((b_qk * b_D).to(dt), b_x))
        if HAS_MIX:
            b_o += _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H, M, HAS_MIX, MIX_PER_TOKEN)[:, None] * b_om
        else:
            _store_rows(o + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, b_om)
    if HAS_MIX:
        _store_rows(o + i_h * V, row0, H * V, o_t, o_v, m_tv, b_o)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _do_rows(do, row0, i_h, i_m, o_t, o_v, m_tv, H: tl.constexpr, M, V: tl.constexpr, HAS_MIX: tl.constexpr,
             UPCAST: tl.constexpr):
    """The [rows, V] tile of dO: shared by the memories with a mix (dO_m = mix_i dO_i), memory m's without."""
    if HAS_MIX:
        return _rows(do + i_h * V, row0, H * V, o_t, o_v, m_tv, UPCAST)
    return _rows(do + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, UPCAST)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None, "HAS_MIX": lambda a: a["mix"] is not None,
                    "USE_FINAL_GRAD": lambda a: a["dht"] is not None, "STORE_INITIAL_GRAD": lambda a: a["dh0"] is not None})
@autotune(STATE_BWD_CONFIGS, key=["H", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T", "M"])
def delta_state_bwd_kernel(q, k, decay, mix, Mi, w, do, dht, dr, dhn, dh0, cu_seqlens, chunk_offs, scale, T, M,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, MIX_PER_TOKEN: tl.constexpr, HAS_MIX: tl.constexpr,
                           USE_FINAL_GRAD: tl.constexpr, STORE_INITIAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
                           UPCAST: tl.constexpr):
    """One program per (sequence x head x memory, V-tile), chunks in reverse: dh_next of every chunk into `dhn`,
    dr = Minv^T dx (fp32) into `dr`, dL/dS_0 into `dh0`."""
    i_nhm, i_v = tl.program_id(0), tl.program_id(1)
    i_nh, i_m = i_nhm // M, i_nhm % M
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_seq, boc = seq_bounds(i_n, T, cu_seqlens, chunk_offs, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k, o_v, m_k, m_v, m_kv, off_kv, b_dh = state_tile(dht, i_nhm, i_v, K, V, BK, BV, USE_FINAL_GRAD)
    g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
    NC = tl.cdiv(T_seq, BT)
    for c_rev in range(0, NC):
        c = NC - 1 - c_rev
        i_s = ((boc + c) * H + i_h) * M + i_m
        tl.store(dhn + i_s * K * V + off_kv, b_dh.to(dhn.dtype.element_ty), mask=m_kv)
        row0 = bos + c * BT
        L = tl.minimum(T_seq - c * BT, BT)
        m_t = o_t < L
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        b_q = _rows(q + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
        b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
        b_w = _rows(w + (i_h * M + i_m) * K, row0, H * M * K, o_t, o_k, m_tk, UPCAST)
        dt = b_q.dtype
        b_do = _do_rows(do, row0, i_h, i_m, o_t, o_v, m_tv, H, M, V, HAS_MIX, UPCAST)
        b_mx = _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H, M, HAS_MIX, MIX_PER_TOKEN)
        b_D, e_q, e_k = _decays(g, L, o_t)
        b_At = tl.trans(b_D * b_mx[:, None] * scale) * tl.dot(b_k, tl.trans(b_q))     # [j, i]
        b_dx = tl.dot(b_At.to(dt), b_do) + tl.dot((b_k * e_k[:, None]).to(dt), b_dh.to(dt))
        b_Mt = tl.load(Mi + i_s * BT * BT + o_t[None, :] * BT + o_t[:, None])
        tl.store(dr + row0 * (H * M * V) + (i_h * M + i_m) * V + o_t[:, None] * (H * M * V) + o_v[None, :],
                 tl.dot(b_Mt.to(dt), b_dx.to(dt)), mask=m_tv)
        b_dh = tl.exp(L.to(tl.float32) * g) * b_dh - tl.dot(tl.trans(b_w), b_dx.to(dt))
        b_dh += tl.dot(tl.trans((b_q * (scale * e_q * b_mx)[:, None]).to(dt)), b_do)
    if STORE_INITIAL_GRAD:
        tl.store(dh0 + i_nhm.to(tl.int64) * K * V + off_kv, b_dh, mask=m_kv)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None, "HAS_MIX": lambda a: a["mix"] is not None,
                    "COMPUTE_DMIX": lambda a: a["dmix"] is not None, "COMPUTE_DDECAY": lambda a: a["dg"] is not None})
@autotune(GRAD_CONFIGS, key=["H", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T", "M"])
def delta_grad_out_kernel(q, k, decay, mix, x, h, dhn, do, dq, dk, dmix, dg, cu_seqlens, chunk_idx, scale, T, M,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, MIX_PER_TOKEN: tl.constexpr, HAS_MIX: tl.constexpr,
                          COMPUTE_DMIX: tl.constexpr, COMPUTE_DDECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
                          UPCAST: tl.constexpr):
    """One program per (chunk, head), memories and V-tiles looped inside, q k^T formed once: the gradients
    through o and h_next. Per memory, with P = dO x^T, dO_m = mix_i dO_i and D the mask of tau^{i-j} (j <= i):

        dq += scale (tau^{i+1} mix_i dO h^T + ((mix_i P) * D) k)             (stored, q's dtype)
        dk += scale ((mix_i P) * D)^T q + tau^{L-1-j} x dh_next^T            (stored fp32: delta_grad_wy_kernel adds to it)
        dmix_{i,m} = dO_i . o_{m,i}

    and these paths' share of dL/dg (weights i + 1, i - j, L, L - 1 - j) into dg[0, chunk, head, memory]."""
    i_ch = tl.program_id(0)
    i_c, i_h = i_ch // H, i_ch % H
    _, row0, L = chunk_bounds(i_c, T, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    m_t, m_k = o_t < L, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    rows = row0 + o_t
    b_q = _rows(q + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    dt = b_q.dtype
    b_qk = tl.dot(b_q, tl.trans(b_k))
    p_i = o_t.to(tl.float32)
    Lf = L.to(tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_m in range(M):
        g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
        b_mx = _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H, M, HAS_MIX, MIX_PER_TOKEN)
        p_s = ((i_c.to(tl.int64) * H + i_h) * M + i_m) * K * V
        b_P = tl.zeros([BT, BT], dtype=tl.float32)       # dO x^T
        b_doh = tl.zeros([BT, BK], dtype=tl.float32)     # dO h^T
        b_xdh = tl.zeros([BT, BK], dtype=tl.float32)     # x dh_next^T
        b_hdh = tl.zeros([BK], dtype=tl.float32)         # rows of h * dh_next
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv, m_kv = m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
            off_kv = o_k[:, None] * V + o_v[None, :]
            b_do = _do_rows(do, row0, i_h, i_m, o_t, o_v, m_tv, H, M, V, HAS_MIX, UPCAST)
            b_x = _rows(x + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, UPCAST)
            b_h = load_tile(h + p_s + off_kv, m_kv, UPCAST)
            b_dn = load_tile(dhn + p_s + off_kv, m_kv, UPCAST)
            b_P += tl.dot(b_do, tl.trans(b_x))
            b_doh += tl.dot(b_do, tl.trans(b_h))
            b_xdh += tl.dot(b_x, tl.trans(b_dn))
            if COMPUTE_DDECAY:
                b_hdh += tl.sum(b_h.to(tl.float32) * b_dn.to(tl.float32), 1)
        b_D, e_q, e_k = _decays(g, L, o_t)
        r_q = scale * e_q * tl.sum(b_q.to(tl.float32) * b_doh, 1)     # dO_i . (scale tau^{i+1} q_i h)
        b_W = scale * b_qk * b_D * b_P                                 # its (i, j) pair terms
        if COMPUTE_DMIX:
            tl.store(dmix + (rows * H + i_h) * M + i_m, r_q + tl.sum(b_W, 1), mask=m_t)
        b_PD = (scale * b_mx[:, None]) * b_P * b_D
        b_dq += (scale * e_q * b_mx)[:, None] * b_doh + tl.dot(b_PD.to(dt), b_k)
        b_dk += tl.dot(tl.trans(b_PD).to(dt), b_q) + e_k[:, None] * b_xdh
        if COMPUTE_DDECAY:
            r_k = e_k * tl.sum(b_k.to(tl.float32) * b_xdh, 1)
            diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
            d_g = (tl.sum((p_i + 1) * r_q * b_mx, 0) + tl.sum(tl.sum(diff * b_W * b_mx[:, None], 1), 0)
                   + Lf * tl.exp(Lf * g) * tl.sum(b_hdh, 0) + tl.sum(tl.where(m_t, Lf - 1 - p_i, 0.) * r_k, 0))
            tl.store(dg + (i_c.to(tl.int64) * H + i_h) * M + i_m, d_g)
    _store_rows(dq + i_h * K, row0, H * K, o_t, o_k, m_tk, b_dq)
    _store_rows(dk + i_h * K, row0, H * K, o_t, o_k, m_tk, b_dk)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None, "COMPUTE_DDECAY": lambda a: a["dg"] is not None})
@autotune(GRAD_CONFIGS, key=["H", "K", "V", "BT", "BETA_PER_MEMORY"])
@triton.jit(do_not_specialize=["T", "M", "NT"])
def delta_grad_wy_kernel(k, v, beta, decay, x, h, dr, dk_o, dk, dv, dbeta, dg, cu_seqlens, chunk_idx, T, M, NT,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, BETA_PER_MEMORY: tl.constexpr, COMPUTE_DDECAY: tl.constexpr,
                         IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (chunk, head), memories and V-tiles looped inside, k k^T formed once: the gradients
    through (I + A) x = beta (v - tau^i k h) from dr = Minv^T dx. Per memory, with E the mask of tau^{i-1-j}
    (j < i), G = -(dr x^T) * E (= dL/dA) and B = beta_i G:

        dk = dk_o + sum_m (-beta_i tau^i dr h^T + (B + B^T) k),   dv = sum_m beta_m dr_m
        dbeta_i = dr_i . (v_i - tau^i k_i h) + sum_j G_ij (k_i . k_j)   (summed over m for beta [B, T, H])

    and these paths' share of dL/dg (weights i, i - 1 - j) into dg[1, chunk, head, memory]."""
    i_ch = tl.program_id(0)
    i_c, i_h = i_ch // H, i_ch % H
    _, row0, L = chunk_bounds(i_c, T, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    m_t, m_k = o_t < L, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    rows = row0 + o_t
    b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    dt = b_k.dtype
    b_kk = tl.dot(b_k, tl.trans(b_k))
    p_i = o_t.to(tl.float32)
    b_dk = tl.load(dk_o + row0 * (H * K) + i_h * K + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_m in range(M):
        g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
        b_beta = _beta_rows(beta, rows, i_h, i_m, m_t, H, M, BETA_PER_MEMORY)
        p_s = ((i_c.to(tl.int64) * H + i_h) * M + i_m) * K * V
        b_G = tl.zeros([BT, BT], dtype=tl.float32)       # dr x^T
        b_drh = tl.zeros([BT, BK], dtype=tl.float32)     # dr h^T
        b_drv = tl.zeros([BT], dtype=tl.float32)         # rows of dr * v
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv, m_kv = m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
            b_x = _rows(x + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, UPCAST)
            b_v = _rows(v + i_h * V, row0, H * V, o_t, o_v, m_tv, UPCAST)
            b_dr = _rows(dr + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, False)
            b_h = load_tile(h + p_s + o_k[:, None] * V + o_v[None, :], m_kv, UPCAST)
            b_G += tl.dot(b_dr.to(dt), tl.trans(b_x))
            b_drh += tl.dot(b_dr.to(dt), tl.trans(b_h))
            b_drv += tl.sum(b_dr * b_v.to(tl.float32), 1)
        e_w = tl.where(m_t, tl.exp(p_i * g), 0.)
        b_G = -b_G * _exp_mask(g, L, o_t, True)
        b_B = b_beta[:, None] * b_G
        b_r_kh = tl.sum(b_k.to(tl.float32) * b_drh, 1)                # dr_i . (k_i h)
        b_dk += (tl.dot(b_B.to(dt), b_k) + tl.dot(tl.trans(b_B).to(dt), b_k)
                 - (b_beta * e_w)[:, None] * b_drh)
        b_db = b_drv - e_w * b_r_kh + tl.sum(b_G * b_kk, 1)
        if BETA_PER_MEMORY:
            tl.store(dbeta + (rows * H + i_h) * M + i_m, b_db, mask=m_t)
        else:
            b_dbeta += b_db
        if COMPUTE_DDECAY:
            diff = (o_t[:, None] - o_t[None, :] - 1).to(tl.float32)
            d_g = tl.sum(tl.sum(diff * b_B * b_kk, 1), 0) - tl.sum(p_i * b_beta * e_w * b_r_kh, 0)
            tl.store(dg + ((NT + i_c.to(tl.int64)) * H + i_h) * M + i_m, d_g)
    _store_rows(dk + i_h * K, row0, H * K, o_t, o_k, m_tk, b_dk)
    if not BETA_PER_MEMORY:
        tl.store(dbeta + rows * H + i_h, b_dbeta, mask=m_t)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_dv = tl.zeros([BT, BV], dtype=tl.float32)
        for i_m in range(M):
            b_beta = _beta_rows(beta, rows, i_h, i_m, m_t, H, M, BETA_PER_MEMORY)
            b_dv += b_beta[:, None] * _rows(dr + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, False)
        _store_rows(dv + i_h * V, row0, H * V, o_t, o_v, m_tv, b_dv)


# ----------------------------------------------------------------------------- launchers
def _launch(kernel, grid, *args, **kw):
    grid = check_grid(grid)
    if all(grid):
        kernel[grid](*args, **kw)


def layout(q, cu_seqlens, BT: int):
    """(N, chunk indices, chunk offsets, number of real chunks) of a dense or packed batch."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return B, None, None, B * triton.cdiv(T, BT)
    idx = chunk_indices(cu_seqlens, BT)
    return cu_seqlens.numel() - 1, idx, chunk_offsets(cu_seqlens, BT), idx.shape[0]


def _common(q, v, tau, BT, lay):
    B, T, H, K = q.shape
    N, _, _, NT = lay
    grids = launch_grids(N=N, H=H, M=tau.shape[-1], NT=NT, V=v.shape[-1])
    return grids, dict(H=H, K=K, V=v.shape[-1], BT=BT, BK=_pad(K), UPCAST=upcast_dots(q.dtype))


def _states(q, k, v, beta, tau, h0, cu_seqlens, BT, lay):
    """The WY and state passes: (Minv, w, x, chunk-start states, final states)."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    N, idx, offs, NT = lay
    grids, flags = _common(q, v, tau, BT, lay)
    dev, dt = q.device, q.dtype
    Mi = empty(max(NT, 1), H, M, BT, BT, dtype=torch.float32, device=dev)
    w, u, x = empty(B, T, H, M, K, dtype=dt, device=dev), empty(B, T, H, M, V, dtype=dt, device=dev), \
        empty(B, T, H, M, V, dtype=dt, device=dev)
    h = empty(max(NT, 1), H, M, K, V, dtype=dt, device=dev)
    ht = empty(N, H, M, K, V, dtype=torch.float32, device=dev)
    _launch(delta_wy_kernel, grids["wy"], k, v, beta, tau, Mi, w, u, cu_seqlens, idx, T, M,
            BV=loop_bv(K, V, "wy"), BETA_PER_MEMORY=beta.dim() == 4, **flags)
    _launch(delta_state_kernel, grids["state"], k, tau, w, u, x, h, h0, ht, cu_seqlens, offs, T, M,
            **dict(flags, BV=min(STATE_BV, _pad(V))))
    return Mi, w, x, h, ht


def forward(q, k, v, tau, beta, mix, scale, h0, cu_seqlens, BT, lay):
    """(o, final states): o [B, T, H, V] with a mix, [B, T, H, M, V] without."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    _, w, x, h, ht = _states(q, k, v, beta, tau, h0, cu_seqlens, BT, lay)
    grids, flags = _common(q, v, tau, BT, lay)
    o = empty(*((B, T, H, V) if mix is not None else (B, T, H, M, V)), dtype=q.dtype, device=q.device)
    _launch(delta_out_kernel, grids["out"], q, k, tau, mix, x, h, o, cu_seqlens, lay[1], scale, T, M,
            MIX_PER_TOKEN=mix is not None and mix.dim() == 4, **dict(flags, BV=min(OUT_BV, _pad(V))))
    return o, ht


def backward(q, k, v, tau, beta, mix, scale, h0, cu_seqlens, BT, lay, do, dht, need):
    """(dq, dk, dv, dtau [H, M] fp32, dbeta fp32, dmix [B, T, H, M] fp32, dS_0 fp32), None where not needed."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    N, idx, offs, NT = lay
    Mi, w, x, h, _ = _states(q, k, v, beta, tau, h0, cu_seqlens, BT, lay)
    grids, flags = _common(q, v, tau, BT, lay)
    f32 = dict(dtype=torch.float32, device=q.device)
    per_token = mix is not None and mix.dim() == 4
    dr = empty(B, T, H, M, V, **f32)
    dhn = empty(max(NT, 1), H, M, K, V, dtype=q.dtype, device=q.device)
    dh0 = empty(N, H, M, K, V, **f32) if need["h0"] else None
    _launch(delta_state_bwd_kernel, grids["state_bwd"], q, k, tau, mix, Mi, w, do, dht, dr, dhn, dh0, cu_seqlens,
            offs, scale, T, M, MIX_PER_TOKEN=per_token, **dict(flags, BV=min(STATE_BV, _pad(V))))
    dq, dk = empty(B, T, H, K, dtype=q.dtype, device=q.device), empty(B, T, H, K, dtype=k.dtype, device=k.device)
    dk_o = empty(B, T, H, K, **f32)
    dv = empty(B, T, H, V, dtype=v.dtype, device=v.device)
    dbeta = empty(*beta.shape, **f32)
    dmix = empty(B, T, H, M, **f32) if need["mix"] else None
    dg = empty(2, max(NT, 1), H, M, **f32) if need["decay"] else None   # the two gradient kernels' shares
    _launch(delta_grad_out_kernel, grids["grad_out"], q, k, tau, mix, x, h, dhn, do, dq, dk_o, dmix, dg, cu_seqlens,
            idx, scale, T, M, MIX_PER_TOKEN=per_token, **dict(flags, BV=loop_bv(K, V, "grad_out")))
    _launch(delta_grad_wy_kernel, grids["grad_wy"], k, v, beta, tau, x, h, dr, dk_o, dk, dv, dbeta, dg, cu_seqlens,
            idx, T, M, max(NT, 1), BETA_PER_MEMORY=beta.dim() == 4, **dict(flags, BV=loop_bv(K, V, "grad_wy")))
    dtau = None if dg is None else dg[:, :NT].sum((0, 1)) / tau.to(torch.float32)
    return dq, dk, dv, dtau, dbeta, dmix, dh0


class DeltaScanFunction(torch.autograd.Function):
    """Saves only the inputs (q, k, v, tau, beta, mix, initial state): the backward recomputes the states."""

    @staticmethod
    def forward(ctx, q, k, v, tau, beta, mix, h0, scale, output_final_state, cu_seqlens, BT):
        ctx.set_materialize_grads(False)
        lay = layout(q, cu_seqlens, BT)     # packed batches: one host sync, reused by the backward
        o, ht = forward(q, k, v, tau, beta, mix, scale, h0, cu_seqlens, BT, lay)
        ctx.save_for_backward(q, k, v, tau, beta, mix, h0, cu_seqlens)
        ctx.scale, ctx.BT, ctx.layout = scale, BT, lay
        if not output_final_state:
            ctx.mark_non_differentiable(ht)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, tau, beta, mix, h0, cu_seqlens = ctx.saved_tensors
        B, T, H, _ = q.shape
        M = tau.shape[-1]
        if do is None:   # only the final state was used
            do = q.new_zeros((B, T, H, v.shape[-1]) if mix is not None else (B, T, H, M, v.shape[-1]))
        need = dict(decay=ctx.needs_input_grad[3], mix=mix is not None and ctx.needs_input_grad[5],
                    h0=h0 is not None and ctx.needs_input_grad[6])
        dq, dk, dv, dtau, dbeta, dmix, dh0 = backward(q, k, v, tau, beta, mix, ctx.scale, h0, cu_seqlens, ctx.BT,
                                                      ctx.layout, do.contiguous(),
                                                      None if dht is None else dht.contiguous(), need)
        if dmix is not None:
            dmix = (dmix if mix.dim() == 4 else dmix.sum((0, 1))).to(mix.dtype)
        dtau = None if dtau is None else dtau.to(tau.dtype)
        return dq, dk, dv, dtau, dbeta.to(beta.dtype), dmix, dh0, None, None, None, None


def delta_scan(q, k, v, tau, mix, scale, h0, output_final_state, cu_seqlens, chunk_size, beta):
    """Inputs validated and contiguous from ops.py: tau [H, M]; mix None / [H, M] / [B, T, H, M]."""
    BT = chunk_tile(chunk_size, q.shape[-1], q.shape[1])
    mix, h0 = (None if t is None else t.contiguous() for t in (mix, h0))
    o, ht = DeltaScanFunction.apply(q, k, v, tau.contiguous(), beta.contiguous(), mix, h0, scale,
                                    output_final_state, cu_seqlens, BT)
    return o, (ht if output_final_state else None)


# ----------------------------------------------------------------------------- AOT compile specs
def compile_specs():
    """Every kernel of the pipeline at K = V = 64 and 128, M = 4, in bf16 and fp32, with and without a mix
    (per token, static), beta per head and per memory, dense and packed; chunk tiles as `chunk_tile` picks."""
    specs = []
    variants = (
        # K = V, dtype, mix form, beta form, varlen
        (64, "bf16", "token", "head", False),
        (64, "fp32", None, "memory", True),
        (128, "bf16", "static", "memory", False),
        (128, "fp32", "token", "head", False),
    )
    for D, dt, mix, beta, varlen in variants:
        tag = f"K={D},V={D},M=4,{dt},mix={mix or 'none'},beta={beta}{',varlen' if varlen else ''}"
        big = dict(q=dt, k=dt, v=dt, w=dt, u=dt, x=dt, h=dt, dhn=dt, o=dt, do=dt, dq=dt, dk=dt, dv=dt, mix=dt)
        ptrs = dict(big, dk_o="fp32", beta="fp32", decay="fp32", Mi="fp32", h0="fp32", ht="fp32", dht="fp32", dh0="fp32",
                    dr="fp32", dbeta="fp32", dmix="fp32", dg="fp32", cu_seqlens="i64", chunk_offs="i64",
                    chunk_idx="i32")
        present = set(ptrs) - ({"mix", "dmix"} if mix is None else set()) - (
            set() if varlen else {"cu_seqlens", "chunk_offs", "chunk_idx"})
        flags = dict(H=4, K=D, V=D, BT=chunk_tile(64, D, 1 << 20), BK=D, UPCAST=False, IS_VARLEN=varlen)
        mixed = dict(HAS_MIX=mix is not None, MIX_PER_TOKEN=mix == "token")
        ints = {"T": "i32", "M": "i32"}
        scaled = dict(ints, scale="fp32")

        def spec(name, kernel, configs, args, scalars, **kw):
            specs.append(kernel_spec(f"cms.delta_{name}[{tag}]", kernel, configs, {a: ptrs[a] for a in args.split()},
                                     present, scalars, dict(flags, **kw)))

        spec("wy", delta_wy_kernel, WY_CONFIGS, "k v beta decay Mi w u cu_seqlens chunk_idx", ints,
             BV=loop_bv(D, D, "wy"), BETA_PER_MEMORY=beta == "memory")
        spec("state", delta_state_kernel, STATE_CONFIGS, "k decay w u x h h0 ht cu_seqlens chunk_offs", ints,
             BV=STATE_BV, USE_INITIAL_STATE=True)
        spec("out", delta_out_kernel, OUT_CONFIGS, "q k decay mix x h o cu_seqlens chunk_idx", scaled,
             BV=OUT_BV, **mixed)
        spec("state_bwd", delta_state_bwd_kernel, STATE_BWD_CONFIGS,
             "q k decay mix Mi w do dht dr dhn dh0 cu_seqlens chunk_offs", scaled, BV=STATE_BV,
             USE_FINAL_GRAD=True, STORE_INITIAL_GRAD=True, **mixed)
        spec("grad_out", delta_grad_out_kernel, GRAD_CONFIGS,
             "q k decay mix x h dhn do dq dk dmix dg cu_seqlens chunk_idx", scaled, BV=loop_bv(D, D, "grad_out"),
             COMPUTE_DMIX=mix is not None, COMPUTE_DDECAY=True, **mixed)
        spec("grad_wy", delta_grad_wy_kernel, GRAD_CONFIGS,
             "k v beta decay x h dr dk_o dk dv dbeta dg cu_seqlens chunk_idx", dict(ints, NT="i32"),
             BV=loop_bv(D, D, "grad_wy"), BETA_PER_MEMORY=beta == "memory", COMPUTE_DDECAY=True)
    return specs
