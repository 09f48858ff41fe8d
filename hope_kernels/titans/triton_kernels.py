"""Triton kernels of the Titans memory: chunked and recurrent forwards, chunked and recurrent backwards,
the one-token step, their launchers, the autograd.Function and the compile specs.

Per token (DESIGN.md, "titans_scan"), with x_t = -lr_t (k_t Sbar_t - v_t):

    Z_t = m_t Z_{t-1} + k_t^T x_t        (no momentum: Z_t = k_t^T x_t)
    S_t = d_t S_{t-1} + Z_t,             o_t = scale q_t S_t

Column j of G_t = -k_t^T x_t depends only on column j of Sbar_t and of v_t, so the whole recurrence
splits exactly over V: every kernel runs one program per (V-tile, sequence, head) holding float32
[K, BV] tiles of the states.

Which kernels run (chunk_tile / _backward):
- forward, 16 | period or period = 1, K <= 64: titans_chunk_fwd_kernel, chunks of 16 tokens with
  tl.dot (block gradients as one matmul against the block-start memory, decay/momentum as masked
  [16, 16] coefficient matrices; for period = 1 the UT transform of the chunk);
- forward elsewhere (period 2..15 or not a multiple of 16, K = 128): titans_fwd_kernel, the token
  recurrence in registers (outer products and row sums, float32);
- backward, 16 | period without momentum, and without decay unless period = 16, K <= 64:
  titans_chunk_bwd_kernel (per-chunk matmuls); everywhere else titans_bwd_kernel, the reverse token
  pass below;
- titans_step_kernel: one token in place (autotuned with S and Z restored).

Recurrent backward (reverse pass), with adjoints dS of S_t, dZ of Z_t and dSbar accumulated over a block:

    dS += scale q_t^T do_t;   dq_t = scale S_t do_t^T;   dZ' = dZ + dS (no momentum: dZ' = dS)
    dd_t = <dS, S_{t-1}>;     dm_t = <dZ', Z_{t-1}>;     dx = k_t dZ'
    dlr_t = <dx, e_t> with e_t = k_t Sbar_t - v_t;       de = -lr_t dx;   dv_t = -de
    dk_t = dZ' x_t^T + Sbar_t de^T;   dSbar += k_t^T de
    dZ <- m_t dZ';  dS <- d_t dS, plus dSbar (then reset) when t starts its block (Sbar_t = S_{t-1})

No forward saves states: each backward kernel first replays the forward over its sequence and writes a
checkpoint every BT tokens into a workspace; the recurrent one then replays each chunk from its
checkpoint into a per-program scratch of BT + 1 states (slot j = the state after j tokens of the
chunk) that the reverse loop reads. A barrier after each workspace write makes it visible to every
thread of the program. dq, dk and the gate gradients are sums over V: each V-tile writes partials that
the launcher sums. Token offsets are int64; bf16/fp16 tiles feed tl.dot as they are (fp32 intermediates
cast to the input dtype first), upcast to fp32 only under the interpreter (UPCAST).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig
from ..triton_utils import autotune, empty, kernel_spec, load_tile, seq_bounds, upcast_dots

# ----------------------------------------------------------------------------- configs
FWD_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=1, default=(bv, w) == (32, 4))
               for bv in (16, 32, 64) for w in (2, 4, 8)]
CHUNK_FWD_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=s, default=(bv, w, s) == (16, 4, 1))
                     for bv in (16, 32, 64) for w in (4, 8) for s in (1, 2)]
BWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=1, default=w == 8) for w in (4, 8)]
CHUNK_BWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 1))
                     for w in (4, 8) for s in (1, 2)]
CHUNK_BWD_BV = 16   # fixed (not autotuned): the partial sums are sized by it
BWD_BV = 16     # fixed (not autotuned): the workspaces and partial sums are sized by it
BWD_BT = 32     # tokens between checkpoints of the backward
STEP_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=1, default=(bv, w) == (32, 4))
                for bv in (16, 32, 64) for w in (2, 4)]


def _block(n: int) -> int:
    """Padded tile size of a head dimension: a power of two >= 16."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _initial_state(h0, z0, off_kv, m_kv, BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                   HAS_MOMENTUM: tl.constexpr):
    """The [BK, BV] tiles of S0 and Z0 in float32 (zeros where not given)."""
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s = tl.load(h0 + off_kv, mask=m_kv, other=0.).to(tl.float32)
        if HAS_MOMENTUM:
            b_z = tl.load(z0 + off_kv, mask=m_kv, other=0.).to(tl.float32)
    return b_s, b_z


@triton.jit
def _bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First token (int64, flattened over B*T) and length of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos - bos


@triton.jit
def _token(q, k, v, lr, decay, momentum, row, o_k, o_v, m_k, m_v, K: tl.constexpr, V: tl.constexpr,
           HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    """q_t, k_t [BK], v_t [BV] and the gates (1 where absent) of token `row` (int64 row of [*, H])."""
    b_q = tl.load(q + row * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k + row * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + row * V + o_v, mask=m_v, other=0.).to(tl.float32)
    b_lr = tl.load(lr + row).to(tl.float32)
    b_d = tl.load(decay + row).to(tl.float32) if HAS_DECAY else 1.
    b_m = tl.load(momentum + row).to(tl.float32) if HAS_MOMENTUM else 0.
    return b_q, b_k, b_v, b_lr, b_d, b_m


@triton.jit
def _update(b_s, b_z, b_sb, b_k, b_v, b_lr, b_d, b_m, HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    """One token of the recurrence on [BK, BV] tiles: returns (S_t, Z_t)."""
    b_x = b_lr * (b_v - tl.sum(b_k[:, None] * b_sb, 0))
    b_kx = b_k[:, None] * b_x[None, :]
    if HAS_DECAY:
        b_s = b_s * b_d
    if HAS_MOMENTUM:
        b_z = b_z * b_m + b_kx
        b_s = b_s + b_z
    else:
        b_s = b_s + b_kx
    return b_s, b_z


# ----------------------------------------------------------------------------- forward
@autotune(FWD_CONFIGS, key=["H", "K", "V", "HAS_DECAY", "HAS_MOMENTUM"])
@triton.jit
def titans_fwd_kernel(q, k, v, lr, decay, momentum, o, h0, z0, ht, zt, cu_seqlens, scale, T, period,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    """One program per (V-tile, sequence, head): the token recurrence with S, Z, Sbar in registers."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_s, b_z = _initial_state(h0, z0, off_kv, m_kv, BK, BV, USE_INITIAL_STATE, HAS_MOMENTUM)
    b_sb = b_s
    for i in range(0, L):
        row = (bos + i) * H + i_h
        b_q, b_k, b_v, b_lr, b_d, b_m = _token(q, k, v, lr, decay, momentum, row, o_k, o_v, m_k, m_v, K, V,
                                               HAS_DECAY, HAS_MOMENTUM)
        b_sb = tl.where(i % period == 0, b_s, b_sb)
        b_s, b_z = _update(b_s, b_z, b_sb, b_k, b_v, b_lr, b_d, b_m, HAS_DECAY, HAS_MOMENTUM)
        b_o = tl.sum(b_q[:, None] * b_s, 0) * scale
        tl.store(o + row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + off_kv, b_s, mask=m_kv)
    if HAS_MOMENTUM:
        tl.store(zt + off_kv, b_z, mask=m_kv)


# ----------------------------------------------------------------------------- chunked forward (period % BT == 0)
@autotune(CHUNK_FWD_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY", "HAS_MOMENTUM", "DELTA"])
@triton.jit
def titans_chunk_fwd_kernel(q, k, v, lr, decay, momentum, o, h0, z0, ht, zt, cu_seqlens, scale, T, period,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
                            HAS_MOMENTUM: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                            IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, DELTA: tl.constexpr):
    """Blocks of `period` tokens, chunks of BT | period: a chunk's gradients are taken at its block's start
    memory Sbar, so with x = lr (v - k Sbar) and the chunk-local coefficient matrices
    D[i, j] = d_{j+1}..d_i, M[i, j] = m_{j+1}..m_i, C = D M, a = D mu, gamma_i = d_1..d_i, mu_i = m_1..m_i:

        o = scale (gamma q S + a q Z + (q k^T * C) x)
        S <- gamma_e S + a_e Z + (C[e] k)^T x,     Z <- mu_e Z + (M[e] k)^T x     (e: the chunk's last token)

    DELTA (period 1: the delta rule / DGD) takes x from the UT transform of the chunk instead.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    causal = o_t[:, None] >= o_t[None, :]
    off_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_s, b_z = _initial_state(h0, z0, off_kv, m_kv, BK, BV, USE_INITIAL_STATE, HAS_MOMENTUM)
    b_sb = b_s
    for t0 in range(0, L, BT):
        m_t = t0 + o_t < L
        rows = (bos + t0 + o_t) * H + i_h                                   # int64 [BT]
        b_q = load_tile(q + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
        b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_lr = tl.load(lr + rows, mask=m_t, other=0.)
        dt = b_q.dtype
        b_sb = tl.where(t0 % period == 0, b_s, b_sb)
        if HAS_DECAY:
            b_ld = tl.cumsum(tl.log(tl.load(decay + rows, mask=m_t, other=1.)), 0)
            b_D = tl.exp(tl.where(causal, b_ld[:, None] - b_ld[None, :], float("-inf")))
            b_g = tl.exp(b_ld)
        else:
            b_ld = tl.zeros([BT], dtype=tl.float32)
            b_D = tl.where(causal, 1., 0.)
            b_g = tl.full([BT], 1., tl.float32)
        e = tl.minimum(L - t0, BT) - 1                                      # the chunk's last real token
        last = o_t == e
        if HAS_MOMENTUM:
            # momentum may be exactly 0: a product is 0 when a zero lies in its span (counted by b_nz),
            # else exp of the difference of cumulative logs taken without the zeros
            b_m = tl.load(momentum + rows, mask=m_t, other=1.)
            b_nz = tl.cumsum((b_m == 0).to(tl.int32), 0)
            b_lm = tl.cumsum(tl.log(tl.where(b_m == 0, 1., b_m)), 0)
            span = causal & (b_nz[:, None] == b_nz[None, :])
            b_M = tl.exp(tl.where(span, b_lm[:, None] - b_lm[None, :], float("-inf")))
            b_mu = tl.where(b_nz == 0, tl.exp(b_lm), 0.)
            b_C = tl.dot(b_D.to(dt), b_M.to(dt))
            b_a = tl.sum(b_D * b_mu[None, :], 1)
            a_e = tl.sum(tl.where(last, b_a, 0.), 0)
            mu_e = tl.sum(tl.where(last, b_mu, 0.), 0)
            m_e = tl.sum(tl.where(last[:, None], b_M, 0.), 0)               # M[e, :]
        else:
            b_C = b_D
        if DELTA:
            # period 1: x_i = lr_i (v_i - k_i S_{i-1}) by the UT transform of the chunk,
            # (I + A) x = lr (v - gamma_{i-1} k S - a_{i-1} k Z), A[i, j] = lr_i C[i-1, j] (k_i . k_j), j < i
            b_lp = b_ld - tl.log(tl.load(decay + rows, mask=m_t, other=1.)) if HAS_DECAY else b_ld
            b_Cp = tl.exp(tl.where(o_t[:, None] > o_t[None, :], b_lp[:, None] - b_ld[None, :], float("-inf")))
            b_r = b_v - tl.exp(b_lp)[:, None] * tl.dot(b_k, b_s.to(dt))
            if HAS_MOMENTUM:
                b_r -= tl.sum(b_Cp * b_mu[None, :], 1)[:, None] * tl.dot(b_k, b_z.to(dt))
                b_Cp = tl.dot(b_Cp.to(dt), b_M.to(dt))                      # D[i-1, :] -> C[i-1, :]
            b_N = -b_lr[:, None] * b_Cp * tl.dot(b_k, tl.trans(b_k))
            for i in range(1, BT):     # N = (I + A)^-1 - I by forward substitution, row by row
                row_i = o_t == i
                b_row = tl.sum(tl.where(row_i[:, None], b_N, 0.), 0)
                b_row = b_row + tl.sum(b_row[:, None] * b_N, 0) * (o_t < i)
                b_N = tl.where(row_i[:, None], b_row[None, :], b_N)
            b_r = b_lr[:, None] * b_r
            b_x = b_r + tl.dot(b_N.to(dt), b_r.to(dt))
        else:
            b_x = b_lr[:, None] * (b_v - tl.dot(b_k, b_sb.to(dt)))          # [BT, BV] float32
        b_A = tl.dot(b_q, tl.trans(b_k)) * b_C
        b_o = b_g[:, None] * tl.dot(b_q, b_s.to(dt)) + tl.dot(b_A.to(dt), b_x.to(dt))
        if HAS_MOMENTUM:
            b_o += b_a[:, None] * tl.dot(b_q, b_z.to(dt))
        tl.store(o + rows[:, None] * V + o_v[None, :], (scale * b_o).to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        g_e = tl.sum(tl.where(last, b_g, 0.), 0)
        c_e = tl.sum(tl.where(last[:, None], b_C, 0.), 0)                   # C[e, :]
        b_s_new = g_e * b_s + tl.dot(tl.trans((c_e[:, None] * b_k).to(dt)), b_x.to(dt))
        if HAS_MOMENTUM:
            b_s_new += a_e * b_z
            b_z = mu_e * b_z + tl.dot(tl.trans((m_e[:, None] * b_k).to(dt)), b_x.to(dt))
        b_s = b_s_new
    tl.store(ht + off_kv, b_s, mask=m_kv)
    if HAS_MOMENTUM:
        tl.store(zt + off_kv, b_z, mask=m_kv)


# ----------------------------------------------------------------------------- backward
@autotune(BWD_CONFIGS, key=["H", "K", "V", "HAS_DECAY", "HAS_MOMENTUM"])
@triton.jit
def titans_bwd_kernel(q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt,
                      dq, dk, dv, dlr, ddecay, dmomentum, dh0, dz0, ckpt, scratch,
                      cu_seqlens, chunk_offsets, scale, T, period, R,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                      USE_INITIAL_STATE: tl.constexpr, USE_FINAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr):
    """One program per (V-tile, sequence, head). R = B*T*H rows: the stride of the per-V-tile partials
    dq, dk [NV, R, K] and dlr, ddecay, dmomentum [NV, R]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.num_programs(0)
    i_n, i_h = i_nh // H, i_nh % H
    p_part = i_v.to(tl.int64) * R                              # this V-tile's partials
    bos, L, boc = seq_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_bv = tl.arange(0, BV)
    o_v = i_v * BV + o_bv
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    off_t = o_k[:, None] * BV + o_bv[None, :]                 # a [BK, BV] tile of a workspace slot
    TILE: tl.constexpr = BK * BV
    p_scr = scratch + (i_nh * NV + i_v).to(tl.int64) * (BT + 1) * 2 * TILE

    # 1. replay the forward; checkpoint (S, Z, Sbar) before every BT-th token
    b_s, b_z = _initial_state(h0, z0, off_kv, m_kv, BK, BV, USE_INITIAL_STATE, HAS_MOMENTUM)
    b_sb = b_s
    for i in range(0, L):
        if i % BT == 0:
            p_c = ckpt + (((boc + i // BT) * H + i_h) * NV + i_v) * 3 * TILE + off_t
            tl.store(p_c, b_s)
            tl.store(p_c + TILE, b_z)
            tl.store(p_c + 2 * TILE, b_sb)
        row = (bos + i) * H + i_h
        b_q, b_k, b_v, b_lr, b_d, b_m = _token(q, k, v, lr, decay, momentum, row, o_k, o_v, m_k, m_v, K, V,
                                               HAS_DECAY, HAS_MOMENTUM)
        b_sb = tl.where(i % period == 0, b_s, b_sb)
        b_s, b_z = _update(b_s, b_z, b_sb, b_k, b_v, b_lr, b_d, b_m, HAS_DECAY, HAS_MOMENTUM)
    tl.debug_barrier()

    # 2. chunks in reverse: replay the chunk into the scratch, then walk its tokens backwards
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    b_dz = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_GRAD:
        b_ds = tl.load(dht + off_kv, mask=m_kv, other=0.).to(tl.float32)
        if HAS_MOMENTUM:
            b_dz = tl.load(dzt + off_kv, mask=m_kv, other=0.).to(tl.float32)
    b_dsb = tl.zeros([BK, BV], dtype=tl.float32)
    NC = tl.cdiv(L, BT)
    for c_rev in range(0, NC):
        c = NC - 1 - c_rev
        cs = c * BT
        n_c = tl.minimum(L - cs, BT)
        p_c = ckpt + (((boc + c) * H + i_h) * NV + i_v) * 3 * TILE + off_t
        b_s = tl.load(p_c)
        b_z = tl.load(p_c + TILE)
        b_sb = tl.load(p_c + 2 * TILE)
        tl.store(p_scr + off_t, b_s)
        tl.store(p_scr + TILE + off_t, b_z)
        for j in range(0, n_c):
            row = (bos + cs + j) * H + i_h
            b_q, b_k, b_v, b_lr, b_d, b_m = _token(q, k, v, lr, decay, momentum, row, o_k, o_v, m_k, m_v, K, V,
                                                   HAS_DECAY, HAS_MOMENTUM)
            b_sb = tl.where((cs + j) % period == 0, b_s, b_sb)
            b_s, b_z = _update(b_s, b_z, b_sb, b_k, b_v, b_lr, b_d, b_m, HAS_DECAY, HAS_MOMENTUM)
            tl.store(p_scr + (j + 1) * 2 * TILE + off_t, b_s)
            tl.store(p_scr + (j + 1) * 2 * TILE + TILE + off_t, b_z)
        tl.debug_barrier()
        for j_rev in range(0, n_c):
            j = n_c - 1 - j_rev
            t = cs + j                                           # position in the sequence
            bs = t - t % period                                  # start of t's block
            row = (bos + t) * H + i_h
            b_q, b_k, b_v, b_lr, b_d, b_m = _token(q, k, v, lr, decay, momentum, row, o_k, o_v, m_k, m_v, K, V,
                                                   HAS_DECAY, HAS_MOMENTUM)
            b_do = tl.load(do + row * V + o_v, mask=m_v, other=0.).to(tl.float32)
            b_st = tl.load(p_scr + (j + 1) * 2 * TILE + off_t)
            b_sp = tl.load(p_scr + j * 2 * TILE + off_t)
            if bs >= cs:                                         # Sbar_t = S_{bs-1}: slot bs - cs
                b_sb = tl.load(p_scr + (bs - cs) * 2 * TILE + off_t)
            else:                                                # the block began before this chunk
                b_sb = tl.load(p_c + 2 * TILE)
            b_ds += scale * b_q[:, None] * b_do[None, :]
            b_dq = tl.sum(b_st * b_do[None, :], 1) * scale
            b_e = tl.sum(b_k[:, None] * b_sb, 0) - b_v
            b_x = -b_lr * b_e
            if HAS_MOMENTUM:
                b_dzt = b_dz + b_ds
                b_zp = tl.load(p_scr + j * 2 * TILE + TILE + off_t)
                tl.store(dmomentum + p_part + row, tl.sum(tl.sum(b_dzt * b_zp, 1), 0))
                b_dz = b_dzt * b_m
            else:
                b_dzt = b_ds
            if HAS_DECAY:
                tl.store(ddecay + p_part + row, tl.sum(tl.sum(b_ds * b_sp, 1), 0))
                b_ds = b_ds * b_d
            b_dx = tl.sum(b_k[:, None] * b_dzt, 0)
            tl.store(dlr + p_part + row, -tl.sum(b_dx * b_e, 0))
            b_de = -b_lr * b_dx
            b_dk = tl.sum(b_dzt * b_x[None, :], 1) + tl.sum(b_sb * b_de[None, :], 1)
            tl.store(dq + (p_part + row) * K + o_k, b_dq, mask=m_k)
            tl.store(dk + (p_part + row) * K + o_k, b_dk, mask=m_k)
            tl.store(dv + row * V + o_v, (-b_de).to(dv.dtype.element_ty), mask=m_v)
            b_dsb += b_k[:, None] * b_de[None, :]
            b_ds = tl.where(t == bs, b_ds + b_dsb, b_ds)
            b_dsb = tl.where(t == bs, 0., b_dsb)
        tl.debug_barrier()
    tl.store(dh0 + off_kv, b_ds, mask=m_kv)
    if HAS_MOMENTUM:
        tl.store(dz0 + off_kv, b_dz, mask=m_kv)


# ----------------------------------------------------------------------------- chunked backward
@autotune(CHUNK_BWD_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY", "ONE_CHUNK_BLOCKS"])
@triton.jit
def titans_chunk_bwd_kernel(q, k, v, lr, decay, h0, do, dht, dq, dk, dv, dlr, ddecay, dh0, ckpt,
                            cu_seqlens, chunk_offsets, scale, T, period, R,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
                            USE_INITIAL_STATE: tl.constexpr, USE_FINAL_GRAD: tl.constexpr,
                            IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, ONE_CHUNK_BLOCKS: tl.constexpr):
    """Backward of the chunked forward without momentum (period % BT == 0). Per chunk, with
    x = lr (v - k Sbar), A = (q k^T) * D, o = scale (gamma q S0 + A x), S1 = gamma_e S0 + (D[e] k)^T x:

        dx  = scale A^T do + (D[e] k) dS1;   dv = lr dx;   dlr = <dx, v - k Sbar>;   dSbar += -k^T (lr dx)
        dq  = scale (gamma do S0^T + (do x^T * D) k);     dS0 = scale (gamma q)^T do + gamma_e dS1
        dk  = scale (do x^T * D)^T q + D[e] (x dS1^T) - lr dx Sbar^T
        dD  = scale (q k^T) * (do x^T),  dD[e] += rows of (k dS1) * x,  dgamma = scale rows of (q S0) * do
        d log d_l = sum_{i >= l > j} dD[i, j] D[i, j] + sum_{i >= l} dgamma_i gamma_i   (+ gamma_e dS1 . S0)

    Pass 1 replays the forward and checkpoints S0 of every chunk (Sbar of a chunk is the checkpoint of
    its block's first chunk); pass 2 walks the chunks in reverse. dq, dk, dlr, ddecay: per-V-tile partials.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.num_programs(0)
    i_n, i_h = i_nh // H, i_nh % H
    p_part = i_v.to(tl.int64) * R
    bos, L, boc = seq_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_bv = tl.arange(0, BV)
    o_v = i_v * BV + o_bv
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    causal = o_t[:, None] >= o_t[None, :]
    off_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    off_t = o_k[:, None] * BV + o_bv[None, :]
    TILE: tl.constexpr = BK * BV
    NC = tl.cdiv(L, BT)
    per_block = period // BT

    # 1. replay the forward, checkpointing the chunk-start state
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s = tl.load(h0 + off_kv, mask=m_kv, other=0.).to(tl.float32)
    b_sb = b_s
    for c in range(0, NC):
        t0 = c * BT
        tl.store(ckpt + (((boc + c) * H + i_h) * NV + i_v) * TILE + off_t, b_s)
        m_t = t0 + o_t < L
        rows = (bos + t0 + o_t) * H + i_h
        b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_lr = tl.load(lr + rows, mask=m_t, other=0.)
        dt = b_k.dtype
        b_sb = tl.where(c % per_block == 0, b_s, b_sb)
        last = o_t == tl.minimum(L - t0, BT) - 1
        if HAS_DECAY:
            b_ld = tl.cumsum(tl.log(tl.load(decay + rows, mask=m_t, other=1.)), 0)
            l_e = tl.sum(tl.where(last, b_ld, 0.), 0)
            b_de = tl.exp(tl.where(o_t <= tl.minimum(L - t0, BT) - 1, l_e - b_ld, float("-inf")))   # D[e, :]
            g_e = tl.exp(l_e)
        else:
            b_de = tl.where(m_t, 1., 0.)
            g_e = 1.
        b_x = b_lr[:, None] * (b_v - tl.dot(b_k, b_sb.to(dt)))
        b_s = g_e * b_s + tl.dot(tl.trans((b_de[:, None] * b_k).to(dt)), b_x.to(dt))
    tl.debug_barrier()

    # 2. chunks in reverse
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_GRAD:
        b_ds = tl.load(dht + off_kv, mask=m_kv, other=0.).to(tl.float32)
    b_dsb = tl.zeros([BK, BV], dtype=tl.float32)
    for c_rev in range(0, NC):
        c = NC - 1 - c_rev
        t0 = c * BT
        n_c = tl.minimum(L - t0, BT)
        m_t = o_t < n_c
        rows = (bos + t0 + o_t) * H + i_h
        b_s0 = tl.load(ckpt + (((boc + c) * H + i_h) * NV + i_v) * TILE + off_t)
        if ONE_CHUNK_BLOCKS:       # period == BT: every chunk starts its block, Sbar = S0
            b_sb = b_s0
        else:
            b_sb = tl.load(ckpt + (((boc + c - c % per_block) * H + i_h) * NV + i_v) * TILE + off_t)
        b_q = load_tile(q + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
        b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_do = load_tile(do + rows[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], UPCAST)
        b_lr = tl.load(lr + rows, mask=m_t, other=0.)
        dt = b_q.dtype
        last = o_t == n_c - 1
        if HAS_DECAY:
            b_dec = tl.load(decay + rows, mask=m_t, other=1.)
            b_ld = tl.cumsum(tl.log(b_dec), 0)
            b_D = tl.exp(tl.where(causal, b_ld[:, None] - b_ld[None, :], float("-inf")))
            b_g = tl.exp(b_ld)
        else:
            b_D = tl.where(causal, 1., 0.)
            b_g = tl.full([BT], 1., tl.float32)
        b_de = tl.sum(tl.where(last[:, None], b_D, 0.), 0)                   # D[e, :]
        g_e = tl.sum(tl.where(last, b_g, 0.), 0)
        b_r = b_v - tl.dot(b_k, b_sb.to(dt))                                  # v - k Sbar
        b_x = b_lr[:, None] * b_r
        b_qk = tl.dot(b_q, tl.trans(b_k))
        b_A = b_qk * b_D
        b_dsd = b_ds.to(dt)
        b_kds = tl.dot(b_k, b_dsd)                                            # k_j dS1: [BT, BV]
        b_dx = scale * tl.dot(tl.trans(b_A.to(dt)), b_do) + b_de[:, None] * b_kds
        tl.store(dv + rows[:, None] * V + o_v[None, :], (b_lr[:, None] * b_dx).to(dv.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        tl.store(dlr + p_part + rows, tl.sum(b_dx * b_r, 1), mask=m_t)
        b_dox = tl.dot(b_do, tl.trans(b_x.to(dt)))                            # do_i . x_j
        if HAS_DECAY:   # first, so that its [BT, BV] operands die early
            b_P = scale * b_qk * b_dox * b_D
            b_P += tl.where(last[:, None], (tl.sum(b_kds * b_x, 1) * b_de)[None, :], 0.)
            b_dg = scale * tl.sum(tl.dot(b_q, b_s0.to(dt)) * b_do.to(tl.float32), 1) * b_g
            b_dg += tl.where(last, g_e * tl.sum(tl.sum(b_ds * b_s0, 1), 0), 0.)
            # sum_{i >= l > j} P[i, j] = sum_{l' >= l} (rowsum - colsum)(P)_{l'}: reverse cumsums without a flip
            b_dl = tl.sum(b_P, 1) - tl.sum(b_P, 0) + b_dg
            b_dl = tl.sum(b_dl, 0) - tl.cumsum(b_dl, 0) + b_dl
            tl.store(ddecay + p_part + rows, b_dl / b_dec, mask=m_t)
        b_dq = scale * (b_g[:, None] * tl.dot(b_do, tl.trans(b_s0.to(dt))) + tl.dot((b_dox * b_D).to(dt), b_k))
        tl.store(dq + (p_part + rows)[:, None] * K + o_k[None, :], b_dq, mask=m_t[:, None] & m_k[None, :])
        b_dlx = -b_lr[:, None] * b_dx                                         # d(k Sbar) of each token
        b_dk = scale * tl.dot(tl.trans((b_dox * b_D).to(dt)), b_q) \
            + b_de[:, None] * tl.dot(b_x.to(dt), tl.trans(b_dsd)) + tl.dot(b_dlx.to(dt), tl.trans(b_sb.to(dt)))
        tl.store(dk + (p_part + rows)[:, None] * K + o_k[None, :], b_dk, mask=m_t[:, None] & m_k[None, :])
        b_ds = g_e * b_ds + scale * tl.dot(tl.trans((b_g[:, None] * b_q).to(dt)), b_do)
        if ONE_CHUNK_BLOCKS:
            b_ds += tl.dot(tl.trans(b_k), b_dlx.to(dt))
        else:
            b_dsb += tl.dot(tl.trans(b_k), b_dlx.to(dt))
            b_ds = tl.where(c % per_block == 0, b_ds + b_dsb, b_ds)
            b_dsb = tl.where(c % per_block == 0, 0., b_dsb)
    tl.store(dh0 + off_kv, b_ds, mask=m_kv)


# ----------------------------------------------------------------------------- one-token step
@autotune(STEP_CONFIGS, key=["H", "K", "V", "HAS_DECAY", "HAS_MOMENTUM", "HAS_BLOCK"], restore=["S", "Z"])
@triton.jit
def titans_step_kernel(q, k, v, lr, decay, momentum, S, Z, Sbar, o, scale, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_BLOCK: tl.constexpr):
    """In place on S (and Z) of one (batch, head, V-tile): the gradient at Sbar (default S), o = scale q S."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_q, b_k, b_v, b_lr, b_d, b_m = _token(q, k, v, lr, decay, momentum, i_bh.to(tl.int64), o_k, o_v, m_k, m_v,
                                           K, V, HAS_DECAY, HAS_MOMENTUM)
    b_s = tl.load(S + off_kv, mask=m_kv, other=0.)
    b_sb = tl.load(Sbar + off_kv, mask=m_kv, other=0.) if HAS_BLOCK else b_s
    b_z = tl.load(Z + off_kv, mask=m_kv, other=0.) if HAS_MOMENTUM else b_s
    b_s, b_z = _update(b_s, b_z, b_sb, b_k, b_v, b_lr, b_d, b_m, HAS_DECAY, HAS_MOMENTUM)
    tl.store(S + off_kv, b_s, mask=m_kv)
    if HAS_MOMENTUM:
        tl.store(Z + off_kv, b_z, mask=m_kv)
    tl.store(o + i_bh.to(tl.int64) * V + o_v, (tl.sum(b_q[:, None] * b_s, 0) * scale).to(o.dtype.element_ty),
             mask=m_v)


# ----------------------------------------------------------------------------- launchers
def chunk_tile(period: int, chunk_size: int, K: int):
    """The chunked forward's chunk length, or None where the recurrent kernel runs.

    16 where K <= 64 and either 16 divides the period (a chunk then lies inside one block) or period = 1
    (the UT transform). Larger chunks, and K = 128 tiles, push the default config past 255 registers into
    spills (see the compile report)."""
    return 16 if (period % 16 == 0 or period == 1) and K <= 64 and chunk_size >= 16 else None


def _forward(q, k, v, lr, decay, momentum, h0, z0, scale, period, cu_seqlens, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=q.device)
    zt = empty(N, H, K, V, dtype=torch.float32, device=q.device) if momentum is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)
    flags = dict(H=H, K=K, V=V, BK=_block(K), HAS_DECAY=decay is not None, HAS_MOMENTUM=momentum is not None,
                 USE_INITIAL_STATE=h0 is not None, IS_VARLEN=cu_seqlens is not None)
    BT = chunk_tile(period, chunk_size, K)
    kernel = titans_fwd_kernel if BT is None else titans_chunk_fwd_kernel
    if BT is not None:
        flags.update(BT=BT, UPCAST=upcast_dots(q.dtype), DELTA=period == 1)
    kernel[grid](q, k, v, lr, decay, momentum, o, h0, z0, ht, zt, cu_seqlens, scale, T, period, **flags)
    return o, ht, zt


def _chunk_offsets(cu_seqlens, BT: int):
    """Index of each sequence's first checkpoint (computed on the device)."""
    if cu_seqlens is None:
        return None
    n_chunks = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1, BT, rounding_mode="floor")
    return torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])


def _chunk_backward(q, k, v, lr, decay, h0, do, dht, scale, period, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT, BK, BV = 16, _block(K), CHUNK_BWD_BV
    NV = triton.cdiv(V, BV)
    R = B * T * H
    f32 = dict(dtype=torch.float32, device=q.device)
    n_ckpt = B * triton.cdiv(T, BT) if cu_seqlens is None else triton.cdiv(T, BT) + N
    ckpt = torch.empty(max(n_ckpt, 1), H, NV, BK, BV, **f32)
    dq, dk = empty(NV, R, K, **f32), empty(NV, R, K, **f32)
    dlr = empty(NV, R, **f32)
    ddecay = empty(NV, R, **f32) if decay is not None else None
    dv = empty(B, T, H, V, dtype=v.dtype, device=v.device)
    dh0 = empty(N, H, K, V, **f32)
    titans_chunk_bwd_kernel[(NV, N * H)](q, k, v, lr, decay, h0, do, dht, dq, dk, dv, dlr, ddecay, dh0, ckpt,
                                         cu_seqlens, _chunk_offsets(cu_seqlens, BT), scale, T, period, R,
                                         H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_DECAY=decay is not None,
                                         USE_INITIAL_STATE=h0 is not None, USE_FINAL_GRAD=dht is not None,
                                         IS_VARLEN=cu_seqlens is not None, UPCAST=upcast_dots(q.dtype),
                                         ONE_CHUNK_BLOCKS=period == BT)
    gate = lambda g: None if g is None else g.sum(0).view(B, T, H)
    return (dq.sum(0).view(B, T, H, K).to(q.dtype), dk.sum(0).view(B, T, H, K).to(k.dtype), dv,
            gate(dlr), gate(ddecay), None, dh0, None)


def _backward(q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt, scale, period, cu_seqlens, chunk_size):
    """The chunked backward where the forward was chunked over blocks without momentum, and either without
    decay or with one chunk per block (period 16); else the recurrent one. The chunked backward with decay
    and several chunks per block is exact (tested against the recurrent one) but its default config
    spills 8 bytes per thread on sm_80, so it is not selected."""
    chunked = chunk_tile(period, chunk_size, q.shape[-1])
    if momentum is None and period > 1 and chunked and (decay is None or period == chunked):
        return _chunk_backward(q, k, v, lr, decay, h0, do, dht, scale, period, cu_seqlens)
    return _recurrent_backward(q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt, scale, period, cu_seqlens)


def _recurrent_backward(q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt, scale, period, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT, BK, BV = BWD_BT, _block(K), BWD_BV
    NV = triton.cdiv(V, BV)
    R = B * T * H
    f32 = dict(dtype=torch.float32, device=q.device)
    # each sequence adds at most one partial chunk: an upper bound without a host sync
    n_ckpt = B * triton.cdiv(T, BT) if cu_seqlens is None else triton.cdiv(T, BT) + N
    ckpt = torch.empty(max(n_ckpt, 1), H, NV, 3, BK, BV, **f32)
    scratch = torch.empty(N * H * NV, BT + 1, 2, BK, BV, **f32)
    dq, dk = empty(NV, R, K, **f32), empty(NV, R, K, **f32)
    dlr = empty(NV, R, **f32)
    ddecay = empty(NV, R, **f32) if decay is not None else None
    dmomentum = empty(NV, R, **f32) if momentum is not None else None
    dv = empty(B, T, H, V, dtype=v.dtype, device=v.device)
    dh0 = empty(N, H, K, V, **f32)
    dz0 = empty(N, H, K, V, **f32) if momentum is not None else None
    titans_bwd_kernel[(NV, N * H)](q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt,
                                   dq, dk, dv, dlr, ddecay, dmomentum, dh0, dz0, ckpt, scratch,
                                   cu_seqlens, _chunk_offsets(cu_seqlens, BT), scale, T, period, R,
                                   H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_DECAY=decay is not None,
                                   HAS_MOMENTUM=momentum is not None, USE_INITIAL_STATE=h0 is not None,
                                   USE_FINAL_GRAD=dht is not None, IS_VARLEN=cu_seqlens is not None)
    gate = lambda g: None if g is None else g.sum(0).view(B, T, H)
    return (dq.sum(0).view(B, T, H, K).to(q.dtype), dk.sum(0).view(B, T, H, K).to(k.dtype), dv,
            gate(dlr), gate(ddecay), gate(dmomentum), dh0, dz0)


class TitansScanFunction(torch.autograd.Function):
    """o, S_T, Z_T (None without momentum) = titans_scan(...); gates and states float32, contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, lr, decay, momentum, h0, z0, scale, period, cu_seqlens, chunk_size):
        o, ht, zt = _forward(q, k, v, lr, decay, momentum, h0, z0, scale, period, cu_seqlens, chunk_size)
        ctx.save_for_backward(q, k, v, lr, decay, momentum, h0, z0, cu_seqlens)
        ctx.scale, ctx.period, ctx.chunk_size = scale, period, chunk_size
        return o, ht, zt

    @staticmethod
    def backward(ctx, do, dht, dzt):
        q, k, v, lr, decay, momentum, h0, z0, cu_seqlens = ctx.saved_tensors
        do = torch.zeros_like(q[..., :1]).expand(*q.shape[:-1], v.shape[-1]).contiguous() if do is None \
            else do.contiguous()
        if momentum is not None and dzt is None and dht is not None:
            dzt = torch.zeros_like(dht)
        if dht is None and dzt is not None:
            dht = torch.zeros_like(dzt)
        dht, dzt = (None if x is None else x.contiguous() for x in (dht, dzt))
        grads = _backward(q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt, ctx.scale, ctx.period, cu_seqlens,
                          ctx.chunk_size)
        dq, dk, dv, dlr, dd, dm, dh0, dz0 = grads
        return (dq, dk, dv, dlr, dd, dm, dh0 if h0 is not None else None, dz0 if z0 is not None else None,
                None, None, None, None)


def titans_scan_triton(q, k, v, lr, decay, momentum, scale, period, S0, Z0, cu_seqlens, chunk_size):
    """q, k, v contiguous in one dtype; returns (o, S_T, Z_T or None)."""
    f32 = lambda x: None if x is None else x.to(torch.float32).contiguous()
    lr, decay, momentum, S0, Z0 = (f32(x) for x in (lr, decay, momentum, S0, Z0))
    if momentum is not None and S0 is not None and Z0 is None:
        Z0 = torch.zeros_like(S0)
    return TitansScanFunction.apply(q, k, v, lr, decay, momentum, S0, Z0, scale, period, cu_seqlens, chunk_size)


def titans_step_triton(q, k, v, lr, decay, momentum, S, Z, Sbar, scale):
    """In place on S (and Z), contiguous float32; returns o in q's dtype."""
    B, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.contiguous() for x in (q, k, v))
    lr, decay, momentum = (None if x is None else x.to(torch.float32).contiguous() for x in (lr, decay, momentum))
    Sbar = None if Sbar is None else Sbar.to(torch.float32).contiguous()
    o = empty(B, H, V, dtype=q.dtype, device=q.device)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), B * H)
    titans_step_kernel[grid](q, k, v, lr, decay, momentum, S, Z, Sbar, o, scale, H=H, K=K, V=V, BK=_block(K),
                             HAS_DECAY=decay is not None, HAS_MOMENTUM=momentum is not None,
                             HAS_BLOCK=Sbar is not None)
    return o


# ----------------------------------------------------------------------------- AOT compile specs
def compile_specs():
    """Forward, backward and step at representative signatures (every config of each)."""
    specs = []
    for D, dt, decay, mom, varlen in ((64, "bf16", True, True, False), (64, "fp16", True, False, True),
                                      (64, "bf16", False, False, False),
                                      (128, "bf16", True, True, False), (128, "fp32", False, False, False)):
        tag = f"K={D},V={D},{dt},{'decay' if decay else 'nodecay'},{'momentum' if mom else 'nomomentum'}" \
              + (",varlen" if varlen else "")
        flags = dict(H=4, K=D, V=D, BK=D, HAS_DECAY=decay, HAS_MOMENTUM=mom, IS_VARLEN=varlen)
        gates = {"lr"} | ({"decay"} if decay else set()) | ({"momentum"} if mom else set())
        pairs = {"h0", "z0"} if mom else {"h0"}
        fwd_ptrs = dict(q=dt, k=dt, v=dt, lr="fp32", decay="fp32", momentum="fp32", o=dt, h0="fp32", z0="fp32",
                        ht="fp32", zt="fp32", cu_seqlens="i64")
        present = {"q", "k", "v", "o", "ht"} | gates | pairs | ({"zt"} if mom else set()) \
            | ({"cu_seqlens"} if varlen else set())
        specs.append(kernel_spec(f"titans.fwd[{tag}]", titans_fwd_kernel, FWD_CONFIGS, fwd_ptrs, present,
                           {"scale": "fp32", "T": "i32", "period": "i32"}, dict(flags, USE_INITIAL_STATE=True)))
        if D <= 64:   # the chunked forward (period % 16 == 0, K <= 64)
            specs.append(kernel_spec(f"titans.chunk_fwd[{tag}]", titans_chunk_fwd_kernel, CHUNK_FWD_CONFIGS, fwd_ptrs,
                               present, {"scale": "fp32", "T": "i32", "period": "i32"},
                               dict(flags, BT=16, USE_INITIAL_STATE=True, UPCAST=False, DELTA=False)))
            specs.append(kernel_spec(f"titans.chunk_fwd_delta[{tag}]", titans_chunk_fwd_kernel, CHUNK_FWD_CONFIGS,
                               fwd_ptrs, present, {"scale": "fp32", "T": "i32", "period": "i32"},
                               dict(flags, BT=16, USE_INITIAL_STATE=True, UPCAST=False, DELTA=True)))
        if D <= 64 and not mom:   # the chunked backward (period % 16 == 0, no momentum)
            cb_ptrs = dict(q=dt, k=dt, v=dt, lr="fp32", decay="fp32", h0="fp32", do=dt, dht="fp32", dq="fp32",
                           dk="fp32", dv=dt, dlr="fp32", ddecay="fp32", dh0="fp32", ckpt="fp32", cu_seqlens="i64",
                           chunk_offsets="i64")
            present = set(cb_ptrs) - ({"decay", "ddecay"} if not decay else set()) \
                - ({"cu_seqlens", "chunk_offsets"} if not varlen else set())
            # with decay only one chunk per block (period 16) is selected; without, any 16 | period
            for one in ((True,) if decay else (True, False)):
                specs.append(kernel_spec(f"titans.chunk_bwd[{tag},{'period=16' if one else 'period=32'}]",
                                   titans_chunk_bwd_kernel, CHUNK_BWD_CONFIGS, cb_ptrs, present,
                                   {"scale": "fp32", "T": "i32", "period": "i32", "R": "i32"},
                                   dict(H=4, K=D, V=D, BT=16, BK=D, BV=CHUNK_BWD_BV, HAS_DECAY=decay,
                                        USE_INITIAL_STATE=True, USE_FINAL_GRAD=True, IS_VARLEN=varlen,
                                        UPCAST=False, ONE_CHUNK_BLOCKS=one)))
        bwd_ptrs = dict(q=dt, k=dt, v=dt, lr="fp32", decay="fp32", momentum="fp32", h0="fp32", z0="fp32", do=dt,
                        dht="fp32", dzt="fp32", dq="fp32", dk="fp32", dv=dt, dlr="fp32", ddecay="fp32",
                        dmomentum="fp32", dh0="fp32", dz0="fp32", ckpt="fp32", scratch="fp32",
                        cu_seqlens="i64", chunk_offsets="i64")
        grads = {"dq", "dk", "dv", "dlr", "dh0"} | ({"ddecay"} if decay else set()) \
            | ({"dmomentum", "dz0", "dzt"} if mom else set())
        present = {"q", "k", "v", "do", "dht", "ckpt", "scratch"} | gates | pairs | grads \
            | ({"cu_seqlens", "chunk_offsets"} if varlen else set())
        bwd_flags = dict(flags, BV=BWD_BV, BT=BWD_BT, USE_INITIAL_STATE=True, USE_FINAL_GRAD=True)
        specs.append(kernel_spec(f"titans.bwd[{tag}]", titans_bwd_kernel, BWD_CONFIGS, bwd_ptrs, present,
                           {"scale": "fp32", "T": "i32", "period": "i32", "R": "i32"}, bwd_flags))
        step_ptrs = dict(q=dt, k=dt, v=dt, lr="fp32", decay="fp32", momentum="fp32", S="fp32", Z="fp32",
                         Sbar="fp32", o=dt)
        present = {"q", "k", "v", "S", "Sbar", "o"} | gates | ({"Z"} if mom else set())
        specs.append(kernel_spec(f"titans.step[{tag}]", titans_step_kernel, STEP_CONFIGS, step_ptrs, present,
                           {"scale": "fp32"}, dict(H=4, K=D, V=D, BK=D, HAS_DECAY=decay, HAS_MOMENTUM=mom,
                                                   HAS_BLOCK=True)))
    return specs
