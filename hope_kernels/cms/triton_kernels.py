"""The "triton" backend of cms_scan / cms_step: kernels, launchers, autograd.Function, compile specs.
This module holds the outer-product rule and the one-token step; the delta rule's chunk pipeline is
triton_delta.py (its compile specs are listed here too).

Chunked form, per memory m with g = log(tau_m), chunk length L, local positions i, j = 1..L:

    o_{m,i} = scale (tau^i q_i S_prev + sum_{j<=i} tau^{i-j} (1 - tau) (q_i . k_j) v_j)
    S_end   = tau^L S_prev + sum_j tau^{L-j} (1 - tau) k_j v_j^T

Every power of tau is exp(n g) with n >= 0; the causal mask is applied to the exponent before exp
and no power of tau is ever divided by, so tau in [1e-3, 1 - 1e-4] is safe for any T.

Forward, two launches (flash-linear-attention's chunk scheme, M memories folded in):
(1) cms_state_kernel, one program per (sequence x head x memory [axis 0], K x V tile [axis 1]),
    walks its sequence's chunks with the state in fp32 registers and stores every chunk's
    starting state (in the input dtype) and the final state (fp32);
(2) cms_fwd_kernel, one program per (chunk x head [axis 0], V tile [axis 1]), no loop-carried
    state: q k^T once, then per memory the decay mask and q S_m, mixed in registers
    (o = sum_m mix_m o_m is one dot with W = sum_m mix_m (1 - tau_m) (q k^T * D_m) plus the
    mixed inter-chunk terms); without mix each memory's [rows, V] read-out is stored.
The chunk states are a transient of the forward: nothing per chunk is saved for backward.

Backward, memory by memory (so every transient is [chunks, H, K, V], never x M), each memory
four launches: cms_state_kernel again (its chunk-start states, recomputed), cms_bwd_dh_kernel
(the reverse pass: dL/dS at the end of every chunk, state in registers, dL/dS_0), cms_bwd_dv_kernel
(one program per chunk x head x V tile: dv, and the score-side parts of dmix and of the decay
gradient) and cms_bwd_kernel (one program per chunk x head, V tiles looped inside: dq, dk and the
state-side parts); dq, dk, dv are accumulated over the memories in fp32 buffers. dv has its own
kernel because next to the dq / dk accumulators it pushed the gradient kernel into spills. Decay gradient, with k' = (1 - tau) k:
dL/dtau = (dL/dg) / tau - sum_i k_i . dk'_i, where dL/dg is summed chunk by chunk with each
exponent's own weight (i - j for a pair, i for tau^i, L - j, L): no large diagonal terms that
cancel, so tau = 1e-3 keeps fp32 accuracy.

Precision: bf16/fp16 tiles go into tl.dot as they are (fp32 accumulation); fp32 intermediates
(decayed scores, states) are cast to the input dtype before feeding a dot; fp32 inputs run TF32 on
a GPU. Chunk states and their gradients are stored in the input dtype; the final state, dL/dS_0
and the dq / dk / dv accumulators are fp32. UPCAST (triton_utils.upcast_dots) is on only for bf16
under the interpreter, whose bf16 tl.dot is wrong.

Grids put every count that grows with the data (sequences, chunks, heads, memories) on axis 0;
`launch_grid` computes every launch's grid, so the limits are testable without running a kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig
from ..triton_utils import (autotune, check_grid, chunk_bounds, chunk_indices, chunk_offsets, empty, kernel_spec,
                            load_tile, seq_bounds, upcast_dots)
from .triton_tiles import _decays, _mix_rows, _pad, _rows, _store_rows

# ----------------------------------------------------------------------------- configs
# Tiles are fixed by (K, V) (see `tiles`), so the grids do not depend on the tuned config.
STATE_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 2)) for w in (4, 8) for s in (1, 2)]
FWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 1)) for w in (4, 8) for s in (1, 2)]
DV_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 1)) for w in (4, 8) for s in (1, 2)]
BWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 2)) for w in (4, 8) for s in (1, 2)]
STEP_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=1, default=(bv, w) == (32, 4))
                for bv in (16, 32, 64) for w in (2, 4)]
CHUNK = 64          # default chunk length of the kernels (cms_scan's chunk_size)


STATE_PROGRAMS = 256  # the sequential state passes split K x V finer until they run about this many programs


def tiles(K: int, V: int, sequences: int = STATE_PROGRAMS) -> dict:
    """Tile sizes of every kernel. The state passes (one program per sequence x head [x memory] and
    K x V tile, `sequences` of them before the tiling) use 64 x 64 tiles, or 64 x 32 where that leaves
    fewer than STATE_PROGRAMS programs (small batch x heads: more of the GPU on the sequential pass;
    64 rows keep sm_90's wgmma). The chunk kernels hold the whole K and split V (forward, dv) or loop over it in 32-wide
    tiles (dq / dk kernel, to bound registers)."""
    BS = 64 if sequences * triton.cdiv(K, 64) * triton.cdiv(V, 64) >= STATE_PROGRAMS else 32
    return dict(BK=_pad(K), BKS=min(64, _pad(K)), BVS=min(BS, _pad(V)), BVO=min(64, _pad(V)), BVB=min(32, _pad(V)))


def launch_grid(name: str, *, N: int, H: int, M: int, n_chunks: int, K: int, V: int) -> tuple:
    """The grid of each launch, checked against CUDA's limits.

    "state": (N H M, K x V tiles) forward, "state1" / "dh": (N H, K x V tiles) one memory of the
    backward, "fwd" / "dv": (chunks x H, V tiles), "bwd": (chunks x H,). n_chunks counts the real
    chunks (all sequences together).
    """
    sequences = N * H * (M if name == "state" else 1)
    t = tiles(K, V, sequences)
    kv_tiles = triton.cdiv(K, t["BKS"]) * triton.cdiv(V, t["BVS"])
    grid = {"state": (sequences, kv_tiles), "state1": (sequences, kv_tiles), "dh": (sequences, kv_tiles),
            "fwd": (n_chunks * H, triton.cdiv(V, t["BVO"])), "dv": (n_chunks * H, triton.cdiv(V, t["BVO"])),
            "bwd": (n_chunks * H,)}[name]
    return check_grid(grid)


# ----------------------------------------------------------------------------- state pass
@triton.heuristics({
    "USE_INITIAL_STATE": lambda a: a["h0"] is not None,
    "STORE_FINAL_STATE": lambda a: a["ht"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@autotune(STATE_CONFIGS, key=["H", "K", "V", "BT"])
@triton.jit(do_not_specialize=["T", "m0", "NM"])
def cms_state_kernel(k, v, decay, h0, ht, hs, cu_seqlens, chunk_offs, T, m0, NM, M,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr,
                     USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Memories m0 .. m0 + NM - 1 of every (sequence, head): hs [chunks, H, NM, K, V] (input dtype)
    receives the state at the start of every chunk, ht [N, H, M, K, V] (fp32) the final state.

        S <- tau^L S + (k * (1 - tau) tau^{L-j})^T v        (one chunk, state in fp32 registers)
    """
    i_nhm, i_kv = tl.program_id(0), tl.program_id(1)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    i_nh, i_ml = i_nhm // NM, i_nhm % NM
    i_n, i_h, i_m = i_nh // H, i_nh % H, m0 + i_ml
    bos, T_seq, boc = seq_bounds(i_n, T, cu_seqlens, chunk_offs, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = o_k[:, None] * V + o_v[None, :]
    tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
    g = tl.log(tau)
    p_state = (i_nh.to(tl.int64) * M + i_m) * K * V
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + p_state + off_kv, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)

    for i_c in range(0, tl.cdiv(T_seq, BT)):
        tl.store(hs + ((boc + i_c) * H + i_h) * NM * K * V + i_ml * K * V + off_kv, b_h.to(hs.dtype.element_ty),
                 mask=m_kv)
        row0 = bos + i_c * BT
        L = tl.minimum(T_seq - i_c * BT, BT)
        m_t = o_t < L
        b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_t[:, None] & m_k[None, :], UPCAST)
        b_v = _rows(v + i_h * V, row0, H * V, o_t, o_v, m_t[:, None] & m_v[None, :], UPCAST)
        e_k = tl.where(m_t, tl.exp(tl.where(m_t, (L - 1 - o_t).to(tl.float32) * g, 0.)), 0.) * (1 - tau)
        b_h = tl.exp(L.to(tl.float32) * g) * b_h + tl.dot(tl.trans(b_k), (b_v * e_k[:, None]).to(b_k.dtype))
    if STORE_FINAL_STATE:
        tl.store(ht + p_state + off_kv, b_h, mask=m_kv)


# ----------------------------------------------------------------------------- forward outputs
@triton.heuristics({
    "HAS_MIX": lambda a: a["mix"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@autotune(FWD_CONFIGS, key=["H", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T", "M"])
def cms_fwd_kernel(q, k, v, decay, mix, hs, o, chunk_idx, cu_seqlens, scale, T, M,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr,
                   MIX_PER_TOKEN: tl.constexpr, HAS_MIX: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Outputs of one (chunk, head, V tile) from the chunk-start states hs [chunks, H, M, K, V]:

        o_m = (scale (q k^T) * D_m (1 - tau_m)) v + scale tau^i (q S_m),   o = sum_m mix_m o_m
    """
    i_th, i_v = tl.program_id(0), tl.program_id(1)
    i_tg, i_h = i_th // H, i_th % H
    i_n, row0, L = chunk_bounds(i_tg, T, cu_seqlens, chunk_idx, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < K, o_v < V
    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = o_k[:, None] * V + o_v[None, :]
    b_q = _rows(q + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    b_v = _rows(v + i_h * V, row0, H * V, o_t, o_v, m_tv, UPCAST)
    b_A = tl.dot(b_q, tl.trans(b_k)) * scale            # shared by the M memories
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_W = tl.zeros([BT, BT], dtype=tl.float32)
    p_h = hs + (i_tg.to(tl.int64) * H + i_h) * M * K * V
    for i_m in range(M):
        tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
        b_D, e_q, _ = _decays(tl.log(tau), L, o_t)
        b_h = load_tile(p_h + i_m * K * V + off_kv, m_kv, UPCAST)
        b_qh = tl.dot(b_q, b_h)
        b_mx = _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H, M, HAS_MIX, MIX_PER_TOKEN)
        if HAS_MIX:
            b_W += b_A * b_D * (b_mx * (1 - tau))[:, None]
            b_o += b_qh * (b_mx * e_q * scale)[:, None]
        else:
            b_om = tl.dot((b_A * b_D * (1 - tau)).to(b_v.dtype), b_v) + b_qh * (e_q * scale)[:, None]
            _store_rows(o + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, b_om)
    if HAS_MIX:
        b_o += tl.dot(b_W.to(b_v.dtype), b_v)
        _store_rows(o + i_h * V, row0, H * V, o_t, o_v, m_tv, b_o)


# ----------------------------------------------------------------------------- backward
@triton.heuristics({
    "USE_FINAL_GRAD": lambda a: a["dht"] is not None,
    "STORE_INITIAL_GRAD": lambda a: a["dh0"] is not None,
    "HAS_MIX": lambda a: a["mix"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@autotune(STATE_CONFIGS, key=["H", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T", "i_m", "M"])
def cms_bwd_dh_kernel(q, decay, mix, do, dht, dh0, dhs, cu_seqlens, chunk_offs, scale, T, i_m, M,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr,
                      MIX_PER_TOKEN: tl.constexpr, USE_FINAL_GRAD: tl.constexpr, STORE_INITIAL_GRAD: tl.constexpr,
                      HAS_MIX: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Reverse pass of memory i_m for one (sequence, head, K x V tile), dS in fp32 registers:

        dS_{c-1} = tau^L dS_c + (q * scale tau^i mix_i)^T dO        (dO: that memory's slice without mix)

    dhs [chunks, H, K, V] (input dtype) receives dL/dS at the END of every chunk, dh0 [N, H, M, K, V]
    dL/dS_0."""
    i_nh, i_kv = tl.program_id(0), tl.program_id(1)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_seq, boc = seq_bounds(i_n, T, cu_seqlens, chunk_offs, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = o_k[:, None] * V + o_v[None, :]
    g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
    p_state = (i_nh.to(tl.int64) * M + i_m) * K * V
    if USE_FINAL_GRAD:
        b_dh = tl.load(dht + p_state + off_kv, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_MIX:
        p_do, s_do = do + i_h * V, H * V
    else:
        p_do, s_do = do + (i_h * M + i_m) * V, H * M * V

    NC = tl.cdiv(T_seq, BT)
    for i_r in range(0, NC):
        i_c = NC - 1 - i_r
        tl.store(dhs + ((boc + i_c) * H + i_h) * K * V + off_kv, b_dh.to(dhs.dtype.element_ty), mask=m_kv)
        row0 = bos + i_c * BT
        L = tl.minimum(T_seq - i_c * BT, BT)
        m_t = o_t < L
        b_q = _rows(q + i_h * K, row0, H * K, o_t, o_k, m_t[:, None] & m_k[None, :], UPCAST)
        b_do = _rows(p_do, row0, s_do, o_t, o_v, m_t[:, None] & m_v[None, :], UPCAST)
        w = tl.where(m_t, tl.exp((o_t + 1).to(tl.float32) * g), 0.) * scale
        w *= _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H, M, HAS_MIX, MIX_PER_TOKEN)
        b_dh = tl.exp(L.to(tl.float32) * g) * b_dh + tl.dot(tl.trans((b_q * w[:, None]).to(b_q.dtype)), b_do)
    if STORE_INITIAL_GRAD:
        tl.store(dh0 + p_state + off_kv, b_dh, mask=m_kv)


@triton.heuristics({
    "HAS_MIX": lambda a: a["mix"] is not None,
    "COMPUTE_DMIX": lambda a: a["dmix"] is not None,
    "COMPUTE_DDECAY": lambda a: a["dgs"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@autotune(DV_CONFIGS, key=["H", "K", "V", "BT", "MIX_PER_TOKEN"], restore=["dv"])
@triton.jit(do_not_specialize=["T", "i_m", "M", "NR", "NC"])
def cms_bwd_dv_kernel(q, k, v, decay, mix, do, dhs, dv, dmix, dgs, chunk_idx, cu_seqlens, scale, T, i_m, M, NR, NC,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr,
                      MIX_PER_TOKEN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_MIX: tl.constexpr,
                      COMPUTE_DMIX: tl.constexpr, COMPUTE_DDECAY: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dv of memory i_m for one (chunk, head, V tile), and the parts of dmix and of the decay gradient
    that go through the intra-chunk scores. With dO_m = mix_i dO_i (or memory m's slice of dO), dS this
    memory's chunk-end state gradient (dhs), D its decay mask, A = scale q k^T and dP = dO v^T:

        dv = (1 - tau) ((A * D)^T dO_m + tau^{L-j} k dS)

    written to the fp32 dv [rows, H, V] (memory 0) or added to it (ACCUMULATE). Partials over this V
    tile (slot i_v of dmix [NV + 1, NR rows, H, M] and dgs [NV + 1, NC chunks, H, M, 2]):
    dmix_i += (1 - tau) sum_j (A * D * dP)_ij; dL/dg += (1 - tau) sum (i - j) (A * D * dP_m);
    sum k . dk' += sum A * D * dP_m (dP_m = mix_i dP)."""
    i_th, i_v = tl.program_id(0), tl.program_id(1)
    i_tg, i_h = i_th // H, i_th % H
    i_n, row0, L = chunk_bounds(i_tg, T, cu_seqlens, chunk_idx, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < K, o_v < V
    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
    b_q = _rows(q + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    if HAS_MIX:
        b_do = _rows(do + i_h * V, row0, H * V, o_t, o_v, m_tv, UPCAST)
    else:
        b_do = _rows(do + (i_h * M + i_m) * V, row0, H * M * V, o_t, o_v, m_tv, UPCAST)
    b_dh = load_tile(dhs + (i_tg.to(tl.int64) * H + i_h) * K * V + (o_k[:, None] * V + o_v[None, :]),
                     m_k[:, None] & m_v[None, :], UPCAST)
    tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
    b_D, _, e_k = _decays(tl.log(tau), L, o_t)
    b_mx = _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H, M, HAS_MIX, MIX_PER_TOKEN)
    b_AD = tl.dot(b_q, tl.trans(b_k)) * scale * b_D
    b_dv = tl.dot(tl.trans((b_AD * (b_mx * (1 - tau))[:, None]).to(b_do.dtype)), b_do)
    b_dv += tl.dot(b_k, b_dh) * (e_k * (1 - tau))[:, None]
    if ACCUMULATE:
        b_dv += tl.load(dv + row0 * (H * V) + i_h * V + (o_t[:, None] * (H * V) + o_v[None, :]), mask=m_tv, other=0.)
    _store_rows(dv + i_h * V, row0, H * V, o_t, o_v, m_tv, b_dv)

    if COMPUTE_DMIX or COMPUTE_DDECAY:
        b_v = _rows(v + i_h * V, row0, H * V, o_t, o_v, m_tv, UPCAST)
        b_ADdP = b_AD * tl.dot(b_do, tl.trans(b_v))
    if COMPUTE_DMIX:
        tl.store(dmix + i_v.to(tl.int64) * NR * H * M + (row0 * H + i_h) * M + i_m + o_t * (H * M),
                 (1 - tau) * tl.sum(b_ADdP, axis=1), mask=m_t)
    if COMPUTE_DDECAY:
        b_ADdP *= b_mx[:, None]
        diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
        p_g = dgs + ((i_v.to(tl.int64) * NC + i_tg) * H + i_h) * M * 2 + i_m * 2
        tl.store(p_g, tl.sum(tl.sum(diff * b_ADdP, axis=1), axis=0) * (1 - tau))
        tl.store(p_g + 1, tl.sum(tl.sum(b_ADdP, axis=1), axis=0))


@triton.heuristics({
    "HAS_MIX": lambda a: a["mix"] is not None,
    "COMPUTE_DMIX": lambda a: a["dmix"] is not None,
    "COMPUTE_DDECAY": lambda a: a["dgs"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@autotune(BWD_CONFIGS, key=["H", "K", "V", "BT", "MIX_PER_TOKEN"], restore=["dq", "dk"])
@triton.jit(do_not_specialize=["T", "i_m", "M"])
def cms_bwd_kernel(q, k, v, decay, mix, do, hs, dhs, dq, dk, dmix, dgs, chunk_idx, cu_seqlens, scale, T, i_m, M,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr,
                   MIX_PER_TOKEN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_MIX: tl.constexpr,
                   COMPUTE_DMIX: tl.constexpr, COMPUTE_DDECAY: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dq, dk of memory i_m for one (chunk, head), V tiles looped inside, no loop-carried state, and the
    state parts of dmix and of the decay gradient. With dO_m, D, dP as in cms_bwd_dv_kernel and S this
    memory's chunk-start state (hs):

        dq = scale ((1 - tau) (dP_m * D) k + tau^i dO_m S^T),
        dk = (1 - tau) (scale (dP_m * D)^T q + tau^{L-j} v dS^T);

    dq, dk [rows, H, K] fp32 are written (memory 0) or accumulated (ACCUMULATE). dmix [rows, H, M] and
    dgs [chunks, H, M, 2] (the last slots of the buffers cms_bwd_dv_kernel fills): with
    r_q,i = tau^i dO_i . (scale q_i S) and r_k,j = tau^{L-j} v_j . (k_j dS), formed without the
    [BT, BK] gradients (q_i . (dO_i S^T) = dO_i . (q_i S)): dmix_i += r_q,i;
    dL/dg += sum_i i mix_i r_q,i + (1 - tau) sum_j (L - j) r_k,j + L tau^L sum S * dS;
    sum k . dk' += sum_j r_k,j."""
    i_th = tl.program_id(0)
    i_tg, i_h = i_th // H, i_th % H
    i_n, row0, L = chunk_bounds(i_tg, T, cu_seqlens, chunk_idx, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t, m_k = o_t < L, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    if HAS_MIX:
        p_do, s_do = do + i_h * V, H * V
    else:
        p_do, s_do = do + (i_h * M + i_m) * V, H * M * V
    p_h = (i_tg.to(tl.int64) * H + i_h) * K * V

    b_dP = tl.zeros([BT, BT], dtype=tl.float32)     # dO v^T (without the mix)
    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)    # dO S^T
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)    # v dS^T
    b_hdh = tl.zeros([BK], dtype=tl.float32)        # sum over V of S * dS
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv, m_kv = m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
        off_kv = o_k[:, None] * V + o_v[None, :]
        b_v = _rows(v + i_h * V, row0, H * V, o_t, o_v, m_tv, UPCAST)
        b_do = _rows(p_do, row0, s_do, o_t, o_v, m_tv, UPCAST)
        b_h = load_tile(hs + p_h + off_kv, m_kv, UPCAST)
        b_dh = load_tile(dhs + p_h + off_kv, m_kv, UPCAST)
        b_dP += tl.dot(b_do, tl.trans(b_v))
        b_dqs += tl.dot(b_do, tl.trans(b_h))
        b_dks += tl.dot(b_v, tl.trans(b_dh))
        if COMPUTE_DDECAY:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)

    b_q = _rows(q + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    b_k = _rows(k + i_h * K, row0, H * K, o_t, o_k, m_tk, UPCAST)
    tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
    g = tl.log(tau)
    b_D, e_q, e_k = _decays(g, L, o_t)
    b_mx = _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H, M, HAS_MIX, MIX_PER_TOKEN)
    if COMPUTE_DMIX or COMPUTE_DDECAY:
        r_q = e_q * scale * tl.sum(b_q.to(tl.float32) * b_dqs, axis=1)
    if COMPUTE_DMIX:
        tl.store(dmix + (row0 * H + i_h) * M + i_m + o_t * (H * M), r_q, mask=m_t)
    if COMPUTE_DDECAY:
        r_k = e_k * tl.sum(b_k.to(tl.float32) * b_dks, axis=1)
        p_i = (o_t + 1).to(tl.float32)
        d_g = tl.sum(p_i * r_q * b_mx, axis=0) + tl.sum(tl.where(m_t, L - p_i, 0.) * r_k, axis=0) * (1 - tau)
        d_g += L.to(tl.float32) * tl.exp(L.to(tl.float32) * g) * tl.sum(b_hdh, axis=0)
        p_g = dgs + ((i_tg.to(tl.int64) * H + i_h) * M + i_m) * 2
        tl.store(p_g, d_g)
        tl.store(p_g + 1, tl.sum(r_k, axis=0))

    b_dPD = b_dP * b_D * b_mx[:, None]              # dP_m * D
    b_dq = tl.dot(b_dPD.to(b_k.dtype), b_k) * (scale * (1 - tau)) + b_dqs * (scale * e_q * b_mx)[:, None]
    if ACCUMULATE:
        b_dq += tl.load(dq + row0 * (H * K) + i_h * K + (o_t[:, None] * (H * K) + o_k[None, :]), mask=m_tk, other=0.)
    _store_rows(dq + i_h * K, row0, H * K, o_t, o_k, m_tk, b_dq)
    b_dk = tl.dot(tl.trans(b_dPD).to(b_q.dtype), b_q) * (scale * (1 - tau)) + b_dks * ((1 - tau) * e_k)[:, None]
    if ACCUMULATE:
        b_dk += tl.load(dk + row0 * (H * K) + i_h * K + (o_t[:, None] * (H * K) + o_k[None, :]), mask=m_tk, other=0.)
    _store_rows(dk + i_h * K, row0, H * K, o_t, o_k, m_tk, b_dk)


# ----------------------------------------------------------------------------- one-token step
@triton.heuristics({
    "HAS_MIX": lambda a: a["mix"] is not None,
    "HAS_BETA": lambda a: a["beta"] is not None,
})
@autotune(STEP_CONFIGS, key=["H", "M", "K", "V", "MIX_PER_BATCH", "BETA_PER_MEMORY"], restore=["state"])
@triton.jit
def cms_step_kernel(q, k, v, decay, mix, beta, state, o, scale, H: tl.constexpr, M,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    MIX_PER_BATCH: tl.constexpr, BETA_PER_MEMORY: tl.constexpr,
                    HAS_MIX: tl.constexpr, HAS_BETA: tl.constexpr):
    """state[b, h, m] in place for all m, then o = scale q S_m (mixed or per m):

        outer: S <- tau S + (1 - tau) k^T v;   delta: S <- tau S - beta k^T (k S - v)

    The whole K is in the tile, so each V column of the delta rule is updated on its own."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_q = tl.load(q + i_bh.to(tl.int64) * K + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_k = tl.load(k + i_bh.to(tl.int64) * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + i_bh.to(tl.int64) * V + o_v, mask=m_v, other=0.).to(tl.float32)
    b_kv = b_k[:, None] * b_v[None, :]
    b_o = tl.zeros([BV], dtype=tl.float32)
    for i_m in range(M):
        tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
        p_s = state + (i_bh.to(tl.int64) * M + i_m) * K * V + o_k[:, None] * V + o_v[None, :]
        b_s = tl.load(p_s, mask=m_kv, other=0.)
        if HAS_BETA:
            if BETA_PER_MEMORY:
                b_beta = tl.load(beta + i_bh.to(tl.int64) * M + i_m).to(tl.float32)
            else:
                b_beta = tl.load(beta + i_bh.to(tl.int64)).to(tl.float32)
            b_err = tl.sum(b_k[:, None] * b_s, axis=0) - b_v                   # k S - v: [BV]
            b_s = tau * b_s - b_beta * (b_k[:, None] * b_err[None, :])
        else:
            b_s = tau * b_s + (1 - tau) * b_kv
        tl.store(p_s, b_s, mask=m_kv)
        b_om = tl.sum(b_q[:, None] * b_s, axis=0)
        if HAS_MIX:
            if MIX_PER_BATCH:
                b_o += b_om * tl.load(mix + i_bh.to(tl.int64) * M + i_m).to(tl.float32)
            else:
                b_o += b_om * tl.load(mix + i_h * M + i_m).to(tl.float32)
        else:
            tl.store(o + (i_bh.to(tl.int64) * M + i_m) * V + o_v, b_om.to(o.dtype.element_ty), mask=m_v)
    if HAS_MIX:
        tl.store(o + i_bh.to(tl.int64) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------- launchers
def _states(k, v, tau, h0, cu_seqlens, offs, BT, m0, NM, final, N, n_chunks):
    """Chunk-start states of memories m0 .. m0 + NM - 1 ([chunks, H, NM, K, V], input dtype) and,
    if `final`, the final states of all memories ([N, H, M, K, V] fp32)."""
    _, T, H, K = k.shape
    V, M = v.shape[-1], tau.shape[-1]
    t = tiles(K, V, N * H * NM)
    hs = empty(n_chunks, H, NM, K, V, dtype=k.dtype, device=k.device)
    ht = empty(N, H, M, K, V, dtype=torch.float32, device=k.device) if final else None
    grid = launch_grid("state" if NM == M else "state1", N=N, H=H, M=M, n_chunks=n_chunks, K=K, V=V)
    cms_state_kernel[grid](k, v, tau, h0, ht, hs, cu_seqlens, offs, T, m0, NM, M, H=H, K=K, V=V, BT=BT,
                           BK=t["BKS"], BV=t["BVS"], UPCAST=upcast_dots(k.dtype))
    return hs, ht


def _layout(q, cu_seqlens, BT):
    """(N, chunk indices, chunk offsets, number of real chunks) of a dense or packed batch."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return B, None, None, B * triton.cdiv(T, BT)
    idx = chunk_indices(cu_seqlens, BT)
    return cu_seqlens.numel() - 1, idx, chunk_offsets(cu_seqlens, BT), idx.shape[0]


def _forward(q, k, v, tau, mix, scale, h0, cu_seqlens, BT, layout):
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    N, idx, offs, n_chunks = layout
    hs, ht = _states(k, v, tau, h0, cu_seqlens, offs, BT, 0, M, True, N, n_chunks)
    o = empty(*((B, T, H, V) if mix is not None else (B, T, H, M, V)), dtype=q.dtype, device=q.device)
    grid = launch_grid("fwd", N=N, H=H, M=M, n_chunks=n_chunks, K=K, V=V)
    t = tiles(K, V)
    cms_fwd_kernel[grid](q, k, v, tau, mix, hs, o, idx, cu_seqlens, scale, T, M, H=H, K=K, V=V, BT=BT,
                         BK=t["BK"], BV=t["BVO"], UPCAST=upcast_dots(q.dtype),
                         MIX_PER_TOKEN=mix is not None and mix.dim() == 4)
    return o, ht


def _backward(q, k, v, tau, mix, h0, cu_seqlens, scale, BT, layout, do, dht, need):
    """dq, dk, dv, dtau, dmix, dh0 (None where not needed), memory by memory."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    N, idx, offs, n_chunks = layout
    t = tiles(K, V)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = empty(B, T, H, K, **f32), empty(B, T, H, K, **f32), empty(B, T, H, V, **f32)
    dh0 = empty(N, H, M, K, V, **f32) if need["h0"] else None
    NV = triton.cdiv(V, t["BVO"])
    # dmix / decay partials: slots 0 .. NV-1 from the V tiles of cms_bwd_dv_kernel, slot NV from cms_bwd_kernel
    dmix = empty(NV + 1, B, T, H, M, **f32) if need["mix"] else None
    dgs = empty(NV + 1, n_chunks, H, M, 2, **f32) if need["decay"] else None
    dhs = empty(n_chunks, H, K, V, dtype=q.dtype, device=q.device)
    mix_per_token = mix is not None and mix.dim() == 4
    upcast = upcast_dots(q.dtype)
    dims = dict(N=N, H=H, M=M, n_chunks=n_chunks, K=K, V=V)
    for m in range(M):
        hs, _ = _states(k, v, tau, h0, cu_seqlens, offs, BT, m, 1, False, N, n_chunks)
        ts = tiles(K, V, N * H)
        cms_bwd_dh_kernel[launch_grid("dh", **dims)](
            q, tau, mix, do, dht, dh0, dhs, cu_seqlens, offs, scale, T, m, M, H=H, K=K, V=V, BT=BT,
            BK=ts["BKS"], BV=ts["BVS"], UPCAST=upcast, MIX_PER_TOKEN=mix_per_token)
        chunked = dict(H=H, K=K, V=V, BT=BT, BK=t["BK"], UPCAST=upcast, MIX_PER_TOKEN=mix_per_token, ACCUMULATE=m > 0)
        cms_bwd_dv_kernel[launch_grid("dv", **dims)](q, k, v, tau, mix, do, dhs, dv, dmix, dgs, idx, cu_seqlens,
                                                     scale, T, m, M, B * T, n_chunks, BV=t["BVO"], **chunked)
        cms_bwd_kernel[launch_grid("bwd", **dims)](q, k, v, tau, mix, do, hs, dhs, dq, dk,
                                                   None if dmix is None else dmix[NV], None if dgs is None else dgs[NV],
                                                   idx, cu_seqlens, scale, T, m, M, BV=t["BVB"], **chunked)
    dmix = None if dmix is None else dmix.sum(0)
    dtau = None
    if need["decay"]:
        dg, kdk = dgs.sum(0).unbind(-1)                                   # [chunks, H, M]
        dtau = (dg / tau.to(torch.float32) - kdk).sum(0)
    return dq, dk, dv, dtau, dmix, dh0


class CmsScanFunction(torch.autograd.Function):
    """Saves only the inputs (q, k, v, tau, mix, initial state): the backward recomputes the states."""

    @staticmethod
    def forward(ctx, q, k, v, tau, mix, h0, scale, output_final_state, cu_seqlens, BT):
        ctx.set_materialize_grads(False)
        layout = _layout(q, cu_seqlens, BT)     # packed batches: one host sync, reused by the backward
        o, ht = _forward(q, k, v, tau, mix, scale, h0, cu_seqlens, BT, layout)
        ctx.save_for_backward(q, k, v, tau, mix, h0, cu_seqlens)
        ctx.scale, ctx.BT, ctx.layout = scale, BT, layout
        if not output_final_state:
            ctx.mark_non_differentiable(ht)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, tau, mix, h0, cu_seqlens = ctx.saved_tensors
        B, T, H, _ = q.shape
        M = tau.shape[-1]
        if do is None:   # only the final state was used
            do = q.new_zeros((B, T, H, v.shape[-1]) if mix is not None else (B, T, H, M, v.shape[-1]))
        need = dict(decay=ctx.needs_input_grad[3], mix=mix is not None and ctx.needs_input_grad[4],
                    h0=ctx.needs_input_grad[5])
        dq, dk, dv, dtau, dmix, dh0 = _backward(q, k, v, tau, mix, h0, cu_seqlens, ctx.scale, ctx.BT, ctx.layout,
                                                do.contiguous(), None if dht is None else dht.contiguous(), need)
        if dmix is not None:
            dmix = (dmix if mix.dim() == 4 else dmix.sum((0, 1))).to(mix.dtype)
        dtau = None if dtau is None else dtau.to(tau.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtau, dmix, dh0, None, None, None, None


def chunk_tile(chunk_size: int, T: int) -> int:
    """The kernels' chunk length: chunk_size, capped at T rounded up to a power of two (>= 16)."""
    return min(chunk_size, max(16, triton.next_power_of_2(max(T, 1))))


def cms_scan_triton(q, k, v, tau, mix, scale, initial_state, output_final_state, cu_seqlens, chunk_size, beta=None):
    """Inputs validated and contiguous from ops.py: tau [H, M]; mix None / [H, M] / [B, T, H, M]."""
    if beta is not None:
        from .triton_delta import delta_scan
        return delta_scan(q, k, v, tau, mix, scale, initial_state, output_final_state, cu_seqlens, chunk_size, beta)
    BT = chunk_tile(chunk_size, q.shape[1])
    mix = None if mix is None else mix.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = CmsScanFunction.apply(q, k, v, tau.contiguous(), mix, h0, scale, output_final_state, cu_seqlens, BT)
    return o, (ht if output_final_state else None)


def cms_step_triton(q, k, v, tau, state, mix, scale, beta=None):
    B, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    q, k, v, tau = (t.contiguous() for t in (q, k, v, tau))
    mix, beta = (None if t is None else t.contiguous() for t in (mix, beta))
    o = torch.empty((B, H, V) if mix is not None else (B, H, M, V), dtype=q.dtype, device=q.device)
    grid = lambda meta: check_grid((triton.cdiv(V, meta["BV"]), B * H))
    cms_step_kernel[grid](q, k, v, tau, mix, beta, state, o, scale, H=H, M=M, K=K, V=V, BK=_pad(K),
                          MIX_PER_BATCH=mix is not None and mix.dim() == 3,
                          BETA_PER_MEMORY=beta is not None and beta.dim() == 3)
    return o, state


# ----------------------------------------------------------------------------- AOT compile specs
def compile_specs():
    """Every kernel at K = V = 64 and 128, M = 4, 64-row chunks: bf16 and fp16 with each mix form, one fp32
    (the state passes also with their 32-wide tiles), and the delta-rule pipeline (triton_delta.compile_specs)."""
    specs = []
    scan_variants = (
        # K = V, dtype, mix form, varlen
        (64, "bf16", "token", False),
        (64, "fp16", "static", True),
        (64, "fp32", None, False),
        (128, "bf16", None, False),
        (128, "fp16", "token", False),     # the widest heads with the heaviest mix path
    )
    for D, dt, mix, varlen in scan_variants:
        t = tiles(D, D)
        tag = f"K={D},V={D},M=4,{dt},mix={mix or 'none'}{',varlen' if varlen else ''}"
        present = {"q", "k", "v", "decay", "o", "h0", "ht", "hs", "do", "dq", "dk", "dv", "dh0", "dht", "dhs", "dgs"}
        if mix:
            present |= {"mix", "dmix"}
        if varlen:
            present |= {"cu_seqlens", "chunk_offs", "chunk_idx"}
        common = dict(H=4, K=D, V=D, BT=CHUNK, UPCAST=False, IS_VARLEN=varlen)
        mixed = dict(MIX_PER_TOKEN=mix == "token", HAS_MIX=mix is not None)
        ptrs = dict(q=dt, k=dt, v=dt, decay="fp32", mix=dt, o=dt, do=dt, h0="fp32", ht="fp32", hs=dt, dhs=dt,
                    dht="fp32", dh0="fp32", dq="fp32", dk="fp32", dv="fp32", dmix="fp32", dgs="fp32",
                    cu_seqlens="i64", chunk_offs="i64", chunk_idx="i32")
        pick = lambda *names: {n: ptrs[n] for n in names}
        # state passes: 64 x 64 tiles, and the 64 x 32 ones of small batch x heads (see `tiles`)
        for BS in ((64, 32) if D == 64 and dt != "fp16" else (64,)):
            st = dict(BK=t["BKS"], BV=min(BS, t["BVS"]))
            stag = tag if BS == 64 else tag + ",BV=32"
            specs.append(kernel_spec(f"cms.state[{stag}]", cms_state_kernel, STATE_CONFIGS,
                               pick("k", "v", "decay", "h0", "ht", "hs", "cu_seqlens", "chunk_offs"), present,
                               {"T": "i32", "m0": "i32", "NM": "i32", "M": "i32"},
                               dict(common, **st, USE_INITIAL_STATE=True, STORE_FINAL_STATE=True)))
            specs.append(kernel_spec(f"cms.bwd_dh[{stag}]", cms_bwd_dh_kernel, STATE_CONFIGS,
                               pick("q", "decay", "mix", "do", "dht", "dh0", "dhs", "cu_seqlens", "chunk_offs"),
                               present, {"scale": "fp32", "T": "i32", "i_m": "i32", "M": "i32"},
                               dict(common, **mixed, **st, USE_FINAL_GRAD=True, STORE_INITIAL_GRAD=True)))
        specs.append(kernel_spec(f"cms.fwd[{tag}]", cms_fwd_kernel, FWD_CONFIGS,
                           pick("q", "k", "v", "decay", "mix", "hs", "o", "chunk_idx", "cu_seqlens"), present,
                           {"scale": "fp32", "T": "i32", "M": "i32"}, dict(common, **mixed, BK=t["BK"], BV=t["BVO"])))
        specs.append(kernel_spec(f"cms.bwd_dv[{tag}]", cms_bwd_dv_kernel, DV_CONFIGS,
                           pick("q", "k", "v", "decay", "mix", "do", "dhs", "dv", "dmix", "dgs", "chunk_idx",
                                "cu_seqlens"), present,
                           {"scale": "fp32", "T": "i32", "i_m": "i32", "M": "i32", "NR": "i32", "NC": "i32"},
                           dict(common, **mixed, BK=t["BK"], BV=t["BVO"], ACCUMULATE=True,
                                COMPUTE_DMIX=mix is not None, COMPUTE_DDECAY=True)))
        specs.append(kernel_spec(f"cms.bwd[{tag}]", cms_bwd_kernel, BWD_CONFIGS,
                           pick("q", "k", "v", "decay", "mix", "do", "hs", "dhs", "dq", "dk", "dmix", "dgs",
                                "chunk_idx", "cu_seqlens"), present,
                           {"scale": "fp32", "T": "i32", "i_m": "i32", "M": "i32"},
                           dict(common, **mixed, BK=t["BK"], BV=t["BVB"], ACCUMULATE=True,
                                COMPUTE_DMIX=mix is not None, COMPUTE_DDECAY=True)))
    from .triton_delta import compile_specs as delta_specs
    specs += delta_specs()
    for D, dt, mix, beta in ((64, "bf16", "batch", None), (128, "fp32", None, None), (64, "bf16", "batch", "head"),
                             (128, "bf16", "static", "memory")):
        present = {"q", "k", "v", "decay", "state", "o"} | ({"mix"} if mix else set()) | ({"beta"} if beta else set())
        ptrs = dict(q=dt, k=dt, v=dt, decay="fp32", mix=dt, beta="fp32", state="fp32", o=dt)
        btag = f",beta={beta}" if beta else ""
        specs.append(kernel_spec(f"cms.step[K={D},V={D},M=4,{dt},mix={mix or 'none'}{btag}]", cms_step_kernel,
                           STEP_CONFIGS, ptrs, present, {"scale": "fp32", "M": "i32"},
                           dict(H=4, K=D, V=D, BK=_pad(D), MIX_PER_BATCH=mix == "batch", HAS_MIX=mix is not None,
                                BETA_PER_MEMORY=beta == "memory", HAS_BETA=beta is not None)))
    return specs
