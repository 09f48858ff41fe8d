"""Triton kernels of the Titans memory: the dispatch, the token recurrence (momentum), the one-token step,
the autograd.Function and the compile specs.

Per token (DESIGN.md, "titans_scan"), with x_t = -lr_t (k_t Sbar_t - v_t):

    Z_t = m_t Z_{t-1} + k_t^T x_t        (no momentum: Z_t = k_t^T x_t)
    S_t = d_t S_{t-1} + Z_t,             o_t = scale q_t S_t  (read="current")  or  scale q_t Sbar_t  ("block_start")

Which kernels run:
- no momentum (every shipped config: period 1 with decay, the CMS levels at any period): the chunk pipeline of
  `triton_chunk`, forward and backward chunk-parallel, K, V up to 128;
- momentum (any period): titans_fwd_kernel and titans_bwd_kernel below, the token recurrence. Its chunk form
  is not built: with momentum the state pair (S, Z) and the coefficient products of m make the WY factors of a
  chunk differ; that path stays token-recurrent.
- titans_step_kernel: one token in place (autotuned with S and Z restored).

Column j of G_t = -k_t^T x_t depends only on column j of Sbar_t and of v_t, so the recurrence splits exactly
over V: the recurrent kernels run one program per (sequence x head, V-tile) holding float32 [K, BV] tiles.

Recurrent backward (reverse pass), with adjoints dS of S_t, dZ of Z_t and dSbar accumulated over a block:

    dS += scale q_t^T do_t, dq_t = scale S_t do_t^T   (block_start: dSbar += scale q_t^T do_t, dq_t = scale Sbar_t do_t^T)
    dZ' = dZ + dS;  dd_t = <dS, S_{t-1}>;  dm_t = <dZ', Z_{t-1}>;  dx = k_t dZ'
    dlr_t = <dx, e_t> with e_t = k_t Sbar_t - v_t;       de = -lr_t dx;   dv_t = -de
    dk_t = dZ' x_t^T + Sbar_t de^T;   dSbar += k_t^T de
    dZ <- m_t dZ';  dS <- d_t dS, plus dSbar (then reset) when t starts its block (Sbar_t = S_{t-1})

No forward saves states: the recurrent backward first replays the forward over its sequence and writes a
checkpoint every BT tokens into a workspace, then replays each chunk from its checkpoint into a per-program
scratch of BT + 1 states (slot j = the state after j tokens of the chunk) that the reverse loop reads. A barrier
after each workspace write makes it visible to every thread of the program. dq, dk and the gate gradients are
sums over V: each V-tile writes partials that the launcher sums. Token offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig
from . import triton_chunk, triton_selfmod
from ..triton_utils import autotune, check_grid, empty, kernel_spec, seq_bounds

# ----------------------------------------------------------------------------- configs
FWD_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=1, default=(bv, w) == (32, 4))
               for bv in (16, 32, 64) for w in (2, 4, 8)]
BWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=1, default=w == 8) for w in (4, 8)]
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
@autotune(FWD_CONFIGS, key=["H", "K", "V", "HAS_DECAY", "HAS_MOMENTUM", "READ_BLOCK"])
@triton.jit
def titans_fwd_kernel(q, k, v, lr, decay, momentum, o, h0, z0, ht, zt, cu_seqlens, scale, T, period,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, READ_BLOCK: tl.constexpr):
    """One program per (sequence x head, V-tile): the token recurrence with S, Z, Sbar in registers."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
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
        b_o = tl.sum(b_q[:, None] * (b_sb if READ_BLOCK else b_s), 0) * scale
        tl.store(o + row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + off_kv, b_s, mask=m_kv)
    if HAS_MOMENTUM:
        tl.store(zt + off_kv, b_z, mask=m_kv)


# ----------------------------------------------------------------------------- backward
@autotune(BWD_CONFIGS, key=["H", "K", "V", "HAS_DECAY", "HAS_MOMENTUM", "READ_BLOCK"])
@triton.jit
def titans_bwd_kernel(q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt,
                      dq, dk, dv, dlr, ddecay, dmomentum, dh0, dz0, ckpt, scratch,
                      cu_seqlens, chunk_offsets, scale, T, period, R,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                      USE_INITIAL_STATE: tl.constexpr, USE_FINAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
                      READ_BLOCK: tl.constexpr):
    """One program per (sequence x head, V-tile). R = B*T*H rows: the stride of the per-V-tile partials
    dq, dk [NV, R, K] and dlr, ddecay, dmomentum [NV, R]."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    NV = tl.num_programs(1)
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
            if READ_BLOCK:
                b_dsb += scale * b_q[:, None] * b_do[None, :]
                b_dq = tl.sum(b_sb * b_do[None, :], 1) * scale
            else:
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


# ----------------------------------------------------------------------------- one-token step
@autotune(STEP_CONFIGS, key=["H", "K", "V", "HAS_DECAY", "HAS_MOMENTUM", "HAS_BLOCK"], restore=["S", "Z"])
@triton.jit
def titans_step_kernel(q, k, v, lr, decay, momentum, S, Z, Sbar, o, scale, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_BLOCK: tl.constexpr):
    """In place on S (and Z) of one (batch, head, V-tile): the gradient at Sbar (default S), o = scale q S."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
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
def _recurrent_forward(q, k, v, lr, decay, momentum, h0, z0, scale, period, cu_seqlens, read_block):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=q.device)
    zt = empty(N, H, K, V, dtype=torch.float32, device=q.device) if momentum is not None else None
    grid = lambda meta: check_grid((N * H, triton.cdiv(V, meta["BV"])))
    titans_fwd_kernel[grid](q, k, v, lr, decay, momentum, o, h0, z0, ht, zt, cu_seqlens, scale, T, period,
                            H=H, K=K, V=V, BK=_block(K), HAS_DECAY=decay is not None,
                            HAS_MOMENTUM=momentum is not None, USE_INITIAL_STATE=h0 is not None,
                            IS_VARLEN=cu_seqlens is not None, READ_BLOCK=read_block)
    return o, ht, zt


def _chunk_offsets(cu_seqlens, BT: int):
    """Index of each sequence's first checkpoint (computed on the device)."""
    if cu_seqlens is None:
        return None
    n_chunks = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1, BT, rounding_mode="floor")
    return torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])


def _recurrent_backward(q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt, scale, period, cu_seqlens, read_block):
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
    titans_bwd_kernel[check_grid((N * H, NV))](
        q, k, v, lr, decay, momentum, h0, z0, do, dht, dzt, dq, dk, dv, dlr, ddecay, dmomentum, dh0, dz0, ckpt,
        scratch, cu_seqlens, _chunk_offsets(cu_seqlens, BT), scale, T, period, R, H=H, K=K, V=V, BT=BT, BK=BK,
        BV=BV, HAS_DECAY=decay is not None, HAS_MOMENTUM=momentum is not None, USE_INITIAL_STATE=h0 is not None,
        USE_FINAL_GRAD=dht is not None, IS_VARLEN=cu_seqlens is not None, READ_BLOCK=read_block)
    gate = lambda g: None if g is None else g.sum(0).view(B, T, H)
    return (dq.sum(0).view(B, T, H, K).to(q.dtype), dk.sum(0).view(B, T, H, K).to(k.dtype), dv,
            gate(dlr), gate(ddecay), gate(dmomentum), dh0, dz0)


class TitansScanFunction(torch.autograd.Function):
    """o, S_T, Z_T (None without momentum) = titans_scan(...); gates and states float32, contiguous.
    Without momentum the chunk pipeline (triton_chunk) runs, with momentum the token recurrence."""

    @staticmethod
    def forward(ctx, q, k, v, lr, decay, momentum, h0, z0, scale, period, cu_seqlens, chunk_size, read_block):
        if momentum is None:
            table = triton_chunk.sequence_table(cu_seqlens, period, chunk_size)
            o, ht = triton_chunk.chunk_forward(q, k, v, lr, decay, h0, scale, period, cu_seqlens, table, chunk_size,
                                               read_block)
            zt = None
            ctx.table = table
        else:
            o, ht, zt = _recurrent_forward(q, k, v, lr, decay, momentum, h0, z0, scale, period, cu_seqlens,
                                           read_block)
        ctx.save_for_backward(q, k, v, lr, decay, momentum, h0, z0, cu_seqlens)
        ctx.scale, ctx.period, ctx.chunk_size, ctx.read_block = scale, period, chunk_size, read_block
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
        if momentum is None:
            dq, dk, dv, dlr, dd, dh0 = triton_chunk.chunk_backward(q, k, v, lr, decay, h0, do, dht, ctx.scale,
                                                                   ctx.period, cu_seqlens, ctx.table, ctx.chunk_size,
                                                                   ctx.read_block)
            dm = dz0 = None
        else:
            dq, dk, dv, dlr, dd, dm, dh0, dz0 = _recurrent_backward(q, k, v, lr, decay, momentum, h0, z0, do, dht,
                                                                    dzt, ctx.scale, ctx.period, cu_seqlens,
                                                                    ctx.read_block)
        return (dq, dk, dv, dlr, dd, dm, dh0 if h0 is not None else None, dz0 if z0 is not None else None,
                None, None, None, None, None)


def float32_gates(lr, decay, momentum, S0, Z0):
    """The gates and initial states as the kernels take them: float32, contiguous, Z0 zeros where momentum
    comes with S0 alone."""
    f32 = lambda x: None if x is None else x.to(torch.float32).contiguous()   # noqa: E731
    lr, decay, momentum, S0, Z0 = (f32(x) for x in (lr, decay, momentum, S0, Z0))
    if momentum is not None and S0 is not None and Z0 is None:
        Z0 = torch.zeros_like(S0)
    return lr, decay, momentum, S0, Z0


def titans_scan_triton(q, k, v, lr, decay, momentum, scale, period, S0, Z0, cu_seqlens, chunk_size, read="current"):
    """q, k, v contiguous in one dtype; returns (o, S_T, Z_T or None). read: "current" or "block_start"."""
    if read not in ("current", "block_start"):
        raise ValueError(f"read must be 'current' or 'block_start', got {read!r}")
    lr, decay, momentum, S0, Z0 = float32_gates(lr, decay, momentum, S0, Z0)
    return TitansScanFunction.apply(q, k, v, lr, decay, momentum, S0, Z0, scale, period, cu_seqlens, chunk_size,
                                    read == "block_start")


def titans_step_triton(q, k, v, lr, decay, momentum, S, Z, Sbar, scale):
    """In place on S (and Z), contiguous float32; returns o in q's dtype."""
    B, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.contiguous() for x in (q, k, v))
    lr, decay, momentum = (None if x is None else x.to(torch.float32).contiguous() for x in (lr, decay, momentum))
    Sbar = None if Sbar is None else Sbar.to(torch.float32).contiguous()
    o = empty(B, H, V, dtype=q.dtype, device=q.device)
    grid = lambda meta: check_grid((B * H, triton.cdiv(V, meta["BV"])))
    titans_step_kernel[grid](q, k, v, lr, decay, momentum, S, Z, Sbar, o, scale, H=H, K=K, V=V, BK=_block(K),
                             HAS_DECAY=decay is not None, HAS_MOMENTUM=momentum is not None,
                             HAS_BLOCK=Sbar is not None)
    return o


# ----------------------------------------------------------------------------- AOT compile specs
def compile_specs():
    """The token recurrence (momentum) and the step at representative signatures, then the chunk pipeline's."""
    specs = []
    for D, dt, decay, mom, varlen in ((64, "bf16", True, True, False), (64, "fp16", True, True, True),
                                      (128, "bf16", True, True, False), (64, "fp32", False, False, False)):
        tag = f"K={D},V={D},{dt},{'decay' if decay else 'nodecay'},{'momentum' if mom else 'nomomentum'}" \
              + (",varlen" if varlen else "")
        flags = dict(H=4, K=D, V=D, BK=D, HAS_DECAY=decay, HAS_MOMENTUM=mom, IS_VARLEN=varlen)
        gates = {"lr"} | ({"decay"} if decay else set()) | ({"momentum"} if mom else set())
        pairs = {"h0", "z0"} if mom else {"h0"}
        if mom:   # the recurrence runs only with momentum
            fwd_ptrs = dict(q=dt, k=dt, v=dt, lr="fp32", decay="fp32", momentum="fp32", o=dt, h0="fp32",
                            z0="fp32", ht="fp32", zt="fp32", cu_seqlens="i64")
            present = {"q", "k", "v", "o", "ht", "zt"} | gates | pairs | ({"cu_seqlens"} if varlen else set())
            specs.append(kernel_spec(f"titans.fwd[{tag}]", titans_fwd_kernel, FWD_CONFIGS, fwd_ptrs, present,
                                     {"scale": "fp32", "T": "i32", "period": "i32"},
                                     dict(flags, USE_INITIAL_STATE=True, READ_BLOCK=False)))
            bwd_ptrs = dict(q=dt, k=dt, v=dt, lr="fp32", decay="fp32", momentum="fp32", h0="fp32", z0="fp32",
                            do=dt, dht="fp32", dzt="fp32", dq="fp32", dk="fp32", dv=dt, dlr="fp32", ddecay="fp32",
                            dmomentum="fp32", dh0="fp32", dz0="fp32", ckpt="fp32", scratch="fp32",
                            cu_seqlens="i64", chunk_offsets="i64")
            grads = {"dq", "dk", "dv", "dlr", "dh0", "dmomentum", "dz0", "dzt"} | ({"ddecay"} if decay else set())
            present = {"q", "k", "v", "do", "dht", "ckpt", "scratch"} | gates | pairs | grads \
                | ({"cu_seqlens", "chunk_offsets"} if varlen else set())
            bwd_flags = dict(flags, BV=BWD_BV, BT=BWD_BT, USE_INITIAL_STATE=True, USE_FINAL_GRAD=True,
                             READ_BLOCK=False)
            specs.append(kernel_spec(f"titans.bwd[{tag}]", titans_bwd_kernel, BWD_CONFIGS, bwd_ptrs, present,
                                     {"scale": "fp32", "T": "i32", "period": "i32", "R": "i32"}, bwd_flags))
        if not varlen:
            step_ptrs = dict(q=dt, k=dt, v=dt, lr="fp32", decay="fp32", momentum="fp32", S="fp32", Z="fp32",
                             Sbar="fp32", o=dt)
            present = {"q", "k", "v", "S", "Sbar", "o"} | gates | ({"Z"} if mom else set())
            specs.append(kernel_spec(f"titans.step[{tag}]", titans_step_kernel, STEP_CONFIGS, step_ptrs, present,
                                     {"scale": "fp32"}, dict(H=4, K=D, V=D, BK=D, HAS_DECAY=decay, HAS_MOMENTUM=mom,
                                                             HAS_BLOCK=True)))
    return specs + triton_chunk.compile_specs() + triton_selfmod.compile_specs()
