"""Triton kernels for linear attention: chunked scan (forward and backward) and the generation step.

One program owns a (sequence n, head h) pair and one [BK, BV] tile of the float32 state, and
walks the chunks of its sequence keeping the state in registers ("fused chunk" scheme):

    causal:     o_c = scale * (q_c S_{c-1} + tril(q_c k_c^T) v_c),   S_c = S_{c-1} + k_c^T v_c
    non-causal: S = S_0 + K^T V (first pass),  o_c = scale * q_c S   (second pass)

Everything is linear in the K split, so programs of different K tiles write partial outputs
that the launcher sums (no sum is needed when K fits one tile). The backward recomputes the
states instead of storing them:

    causal:     dq_c = scale * (do_c S_{c-1}^T + tril(do_c v_c^T) k_c)           (forward loop)
                G    = dS_T + sum_{c' > c} scale q_{c'}^T do_{c'}                (reverse loop)
                dk_c = v_c G^T + scale * triu(v_c do_c^T) q_c,
                dv_c = k_c G   + scale * triu(k_c q_c^T) do_c,   dS_0 = G after the last chunk
    non-causal: G = dS_T + scale Q^T dO, dq = scale dO S^T, dk = V G^T, dv = K G, dS_0 = G

Token offsets are int64 (B*T*H*D may exceed 2^31). bf16/fp16 loads are converted to float32
before any arithmetic (tl.dot then runs in TF32 on the GPU, exact float32 in the interpreter).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig, KernelSpec
from ..triton_utils import autotune
from ..utils import autotune_configs, interpreter_enabled

POISON_ENV = "HOPE_KERNELS_POISON"  # "1": fill kernel outputs with NaN before launch (always on in the interpreter)

# (num_warps, num_stages); the first is the default.
_SCAN_CONFIGS = [(4, 2), (4, 1), (4, 3), (8, 2), (8, 3)]  # 2 warps spill in the forward on sm_80
_STEP_CONFIGS = [(4, 1), (2, 1), (8, 1)]  # 1 warp spills at K = 128


def _configs(pairs):
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]
    return autotune_configs(configs, configs[0])


def _empty(*shape, dtype, device):
    if interpreter_enabled() or os.environ.get(POISON_ENV, "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Largest tiles (BT, BK, BV) per kernel: the float32 state tile, the q/k/v chunk tiles and the
# [BT, BT] score tile all live in registers; these keep the default configs free of spills on
# sm_80 and sm_90 (the backward holds twice as many tiles as the forward).
FWD_TILES = (64, 64, 32)
BWD_TILES = (32, 32, 32)


def tile_sizes(K: int, V: int, chunk_size: int, limits=FWD_TILES):
    """(BT, BK, BV): powers of two in [16, limit] (tl.dot needs every dimension >= 16).

    BT is the chunk size capped at the limit: the chunk only tiles the work, the result does not depend on it.
    """
    bt, bk, bv = limits
    return (max(16, min(chunk_size, bt)), max(16, min(triton.next_power_of_2(K), bk)),
            max(16, min(triton.next_power_of_2(V), bv)))


# --------------------------------------------------------------------------- forward
@triton.heuristics({
    "USE_INITIAL_STATE": lambda a: a["h0"] is not None,
    "STORE_FINAL_STATE": lambda a: a["ht"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@triton.autotune(configs=_configs(_SCAN_CONFIGS), key=["K", "V", "BT", "CAUSAL"])
@triton.jit
def linear_attention_fwd_kernel(
    q, k, v, o, h0, ht, cu_seqlens, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CAUSAL: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid (N*H, NV, NK). o: [NK, NT, H, V] partial outputs (NT = B*T tokens); h0/ht: [N, H, K, V] fp32."""
    i_nh, i_v, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    L = (eos - bos).to(tl.int32)

    o_t = tl.arange(0, BT)
    d_k, d_v = o_t[:, None] * H * K, o_t[:, None] * H * V   # row offsets inside a chunk (int32)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    causal_mask = o_t[:, None] >= o_t[None, :]
    # token t of this head sits at ((bos + t) * H + i_h) * D: chunk starts in int64, int32 offsets inside
    p_q = q + i_h * K + o_k[None, :]
    p_k = k + i_h * K + o_k[None, :]
    p_v = v + i_h * V + o_v[None, :]
    p_o = o + (i_k.to(tl.int64) * NT * H + i_h) * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h += tl.load(p_h0, mask=m_kv, other=0.).to(tl.float32)

    if not CAUSAL:
        for i in range(0, tl.cdiv(L, BT)):
            r = i * BT + o_t
            t0 = bos + i * BT
            m_t = r < L
            b_k = tl.load(p_k + t0 * H * K + d_k, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
            b_v = tl.load(p_v + t0 * H * V + d_v, mask=m_t[:, None] & m_v[None, :], other=0.).to(tl.float32)
            b_h += tl.dot(tl.trans(b_k), b_v)

    for i in range(0, tl.cdiv(L, BT)):
        r = i * BT + o_t
        t0 = bos + i * BT
        m_t = r < L
        b_q = tl.load(p_q + t0 * H * K + d_k, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32) * scale
        if CAUSAL:
            b_k = tl.load(p_k + t0 * H * K + d_k, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
            b_v = tl.load(p_v + t0 * H * V + d_v, mask=m_t[:, None] & m_v[None, :], other=0.).to(tl.float32)
            b_s = tl.where(causal_mask, tl.dot(b_q, tl.trans(b_k)), 0.)
            b_o = tl.dot(b_s, b_v) + tl.dot(b_q, b_h)
            b_h += tl.dot(tl.trans(b_k), b_v)
        else:
            b_o = tl.dot(b_q, b_h)
        tl.store(p_o + t0 * H * V + d_v, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

    if STORE_FINAL_STATE:
        p_ht = ht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_ht, b_h.to(ht.dtype.element_ty), mask=m_kv)


# --------------------------------------------------------------------------- backward
@triton.heuristics({
    "USE_INITIAL_STATE": lambda a: a["h0"] is not None,
    "USE_FINAL_STATE_GRADIENT": lambda a: a["dht"] is not None,
    "STORE_INITIAL_STATE_GRADIENT": lambda a: a["dh0"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@triton.autotune(configs=_configs(_SCAN_CONFIGS), key=["K", "V", "BT", "CAUSAL"])
@triton.jit
def linear_attention_bwd_kernel(
    q, k, v, do, dq, dk, dv, h0, dht, dh0, cu_seqlens, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CAUSAL: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid (N*H, NV, NK). dq, dk: [NV, NT, H, K] and dv: [NK, NT, H, V] partial sums; dh0: [N, H, K, V]."""
    i_nh, i_v, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    L = (eos - bos).to(tl.int32)
    NC = tl.cdiv(L, BT)

    o_t = tl.arange(0, BT)
    d_k, d_v = o_t[:, None] * H * K, o_t[:, None] * H * V   # row offsets inside a chunk (int32)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_q = q + i_h * K + o_k[None, :]
    p_k = k + i_h * K + o_k[None, :]
    p_v = v + i_h * V + o_v[None, :]
    p_do = do + i_h * V + o_v[None, :]
    p_dq = dq + (i_v.to(tl.int64) * NT * H + i_h) * K + o_k[None, :]
    p_dk = dk + (i_v.to(tl.int64) * NT * H + i_h) * K + o_k[None, :]
    p_dv = dv + (i_k.to(tl.int64) * NT * H + i_h) * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h += tl.load(p_h0, mask=m_kv, other=0.).to(tl.float32)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        p_dht = dht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_dh += tl.load(p_dht, mask=m_kv, other=0.).to(tl.float32)

    if CAUSAL:
        lower = o_t[:, None] >= o_t[None, :]   # [t, s]: s <= t
        for i in range(0, NC):
            r = i * BT + o_t
            t0 = bos + i * BT
            m_tk, m_tv = (r < L)[:, None] & m_k[None, :], (r < L)[:, None] & m_v[None, :]
            b_k = tl.load(p_k + t0 * H * K + d_k, mask=m_tk, other=0.).to(tl.float32)
            b_v = tl.load(p_v + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_do = tl.load(p_do + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_ds = tl.where(lower, tl.dot(b_do, tl.trans(b_v)), 0.)
            b_dq = (tl.dot(b_ds, b_k) + tl.dot(b_do, tl.trans(b_h))) * scale
            tl.store(p_dq + t0 * H * K + d_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
            b_h += tl.dot(tl.trans(b_k), b_v)
        upper = o_t[:, None] <= o_t[None, :]   # [s, t]: t >= s
        for j in range(0, NC):
            r = (NC - 1 - j) * BT + o_t
            t0 = bos + (NC - 1 - j) * BT
            m_tk, m_tv = (r < L)[:, None] & m_k[None, :], (r < L)[:, None] & m_v[None, :]
            b_q = tl.load(p_q + t0 * H * K + d_k, mask=m_tk, other=0.).to(tl.float32) * scale
            b_k = tl.load(p_k + t0 * H * K + d_k, mask=m_tk, other=0.).to(tl.float32)
            b_v = tl.load(p_v + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_do = tl.load(p_do + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_ds = tl.where(upper, tl.dot(b_v, tl.trans(b_do)), 0.)
            b_s = tl.where(upper, tl.dot(b_k, tl.trans(b_q)), 0.)
            b_dk = tl.dot(b_ds, b_q) + tl.dot(b_v, tl.trans(b_dh))
            b_dv = tl.dot(b_s, b_do) + tl.dot(b_k, b_dh)
            tl.store(p_dk + t0 * H * K + d_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)
            tl.store(p_dv + t0 * H * V + d_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)
            b_dh += tl.dot(tl.trans(b_q), b_do)
    else:
        for i in range(0, NC):
            r = i * BT + o_t
            t0 = bos + i * BT
            m_tk, m_tv = (r < L)[:, None] & m_k[None, :], (r < L)[:, None] & m_v[None, :]
            b_q = tl.load(p_q + t0 * H * K + d_k, mask=m_tk, other=0.).to(tl.float32) * scale
            b_k = tl.load(p_k + t0 * H * K + d_k, mask=m_tk, other=0.).to(tl.float32)
            b_v = tl.load(p_v + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_do = tl.load(p_do + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_h += tl.dot(tl.trans(b_k), b_v)
            b_dh += tl.dot(tl.trans(b_q), b_do)
        for i in range(0, NC):
            r = i * BT + o_t
            t0 = bos + i * BT
            m_tk, m_tv = (r < L)[:, None] & m_k[None, :], (r < L)[:, None] & m_v[None, :]
            b_k = tl.load(p_k + t0 * H * K + d_k, mask=m_tk, other=0.).to(tl.float32)
            b_v = tl.load(p_v + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_do = tl.load(p_do + t0 * H * V + d_v, mask=m_tv, other=0.).to(tl.float32)
            b_dq = tl.dot(b_do, tl.trans(b_h)) * scale
            tl.store(p_dq + t0 * H * K + d_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
            tl.store(p_dk + t0 * H * K + d_k, tl.dot(b_v, tl.trans(b_dh)).to(dk.dtype.element_ty), mask=m_tk)
            tl.store(p_dv + t0 * H * V + d_v, tl.dot(b_k, b_dh).to(dv.dtype.element_ty), mask=m_tv)

    if STORE_INITIAL_STATE_GRADIENT:
        p_dh0 = dh0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_dh0, b_dh.to(dh0.dtype.element_ty), mask=m_kv)


# --------------------------------------------------------------------------- generation step


@triton.heuristics({"NORMALIZE": lambda a: a["z"] is not None})
@autotune([KernelConfig({}, num_warps=w, num_stages=s, default=i == 0) for i, (w, s) in enumerate(_STEP_CONFIGS)],
          key=["K", "V"], restore=["S", "z"])
@triton.jit
def linear_attention_step_kernel(
    q, k, v, o, S, z, scale, eps,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """One token, state updated in place. Grid (B*H, NV); with NORMALIZE the grid has one V program
    (it owns z), which loops over the V tiles.

        S += k v^T,  z += k,  o = scale q S  (/ (scale q.z + eps))
    """
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    n_v = tl.num_programs(1)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    base_k = i_bh.to(tl.int64) * K
    b_q = tl.load(q + base_k + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_k = tl.load(k + base_k + o_k, mask=m_k, other=0.).to(tl.float32)
    if NORMALIZE:
        b_z = tl.load(z + base_k + o_k, mask=m_k, other=0.).to(tl.float32) + b_k
        b_den = tl.sum(b_q * b_z, axis=0) + eps
    for v0 in range(i_v * BV, V, n_v * BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        p_S = S + i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_v = tl.load(v + i_bh.to(tl.int64) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_S = tl.load(p_S, mask=m_k[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_S += b_k[:, None] * b_v[None, :]
        tl.store(p_S, b_S.to(S.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
        b_o = tl.sum(b_q[:, None] * b_S, axis=0)
        if NORMALIZE:
            b_o = b_o / b_den
        tl.store(o + i_bh.to(tl.int64) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if NORMALIZE:
        tl.store(z + base_k + o_k, b_z.to(z.dtype.element_ty), mask=m_k)


# --------------------------------------------------------------------------- launchers
def linear_attention_fwd(q, k, v, scale, causal, h0, output_final_state, cu_seqlens, chunk_size, out_dtype):
    """q, k: [B, T, H, K], v: [B, T, H, V] contiguous; h0: [N, H, K, V] fp32 or None.

    Returns o [B, T, H, V] in out_dtype and the final state (fp32) or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT, BK, BV = tile_sizes(K, V, chunk_size, FWD_TILES)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    o = _empty(NK, B, T, H, V, dtype=out_dtype if NK == 1 else torch.float32, device=q.device)
    ht = _empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    if N * H > 0:
        linear_attention_fwd_kernel[(N * H, NV, NK)](
            q, k, v, o, h0, ht, cu_seqlens, scale, T, B * T,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, CAUSAL=causal)
    o = o[0] if NK == 1 else o.sum(0).to(out_dtype)
    return o, ht


def linear_attention_bwd(q, k, v, do, scale, causal, h0, dht, cu_seqlens, chunk_size, need_dh0):
    """Gradients (dq, dk, dv in the input dtypes, dh0 fp32 or None) of linear_attention_fwd."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT, BK, BV = tile_sizes(K, V, chunk_size, BWD_TILES)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    dq = _empty(NV, B, T, H, K, dtype=q.dtype if NV == 1 else torch.float32, device=q.device)
    dk = _empty(NV, B, T, H, K, dtype=k.dtype if NV == 1 else torch.float32, device=q.device)
    dv = _empty(NK, B, T, H, V, dtype=v.dtype if NK == 1 else torch.float32, device=q.device)
    dh0 = _empty(N, H, K, V, dtype=torch.float32, device=q.device) if need_dh0 else None
    if N * H > 0:
        linear_attention_bwd_kernel[(N * H, NV, NK)](
            q, k, v, do, dq, dk, dv, h0, dht, dh0, cu_seqlens, scale, T, B * T,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, CAUSAL=causal)
    dq = dq[0] if NV == 1 else dq.sum(0).to(q.dtype)
    dk = dk[0] if NV == 1 else dk.sum(0).to(k.dtype)
    dv = dv[0] if NK == 1 else dv.sum(0).to(v.dtype)
    return dq, dk, dv, dh0


class LinearAttentionFunction(torch.autograd.Function):
    """o, S_T = linear attention of (q, k, v, S_0); gradients for q, k, v and S_0 (through S_T too)."""

    @staticmethod
    def forward(ctx, q, k, v, h0, scale, causal, output_final_state, cu_seqlens, chunk_size, out_dtype):
        o, ht = linear_attention_fwd(q, k, v, scale, causal, h0, output_final_state, cu_seqlens,
                                     chunk_size, out_dtype)
        ctx.save_for_backward(q, k, v, h0, cu_seqlens)
        ctx.scale, ctx.causal, ctx.chunk_size = scale, causal, chunk_size
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, h0, cu_seqlens = ctx.saved_tensors
        do = torch.zeros(*v.shape, dtype=v.dtype, device=v.device) if do is None else do.contiguous()
        dht = None if dht is None else dht.contiguous()
        need_dh0 = h0 is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dh0 = linear_attention_bwd(q, k, v, do, ctx.scale, ctx.causal, h0, dht, cu_seqlens,
                                               ctx.chunk_size, need_dh0)
        return dq, dk, dv, dh0, None, None, None, None, None, None


def _step_tiles(K: int, V: int):
    """The whole key dimension in one tile, V in tiles of up to 64 (32 when K > 128)."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, max(16, min(triton.next_power_of_2(V), 64 if BK <= 128 else 32))


def linear_attention_step_triton(q, k, v, S, z, scale, eps, out_dtype):
    """q, k: [B, H, K], v: [B, H, V] contiguous; S: [B, H, K, V], z: [B, H, K] or None, updated in place."""
    B, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _step_tiles(K, V)
    NV = 1 if z is not None else triton.cdiv(V, BV)
    o = _empty(B, H, V, dtype=out_dtype, device=q.device)
    if B * H > 0:
        linear_attention_step_kernel[(B * H, NV)](q, k, v, o, S, z, scale, eps, K=K, V=V, BK=BK, BV=BV)
    return o


# --------------------------------------------------------------------------- AOT descriptions
def _unwrap(fn):
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def _kernel_configs(pairs):
    return [KernelConfig(meta={}, num_warps=w, num_stages=s, default=(i == 0)) for i, (w, s) in enumerate(pairs)]


def _scan_spec(kind, fn, D, dt, causal, flags, extra_sig):
    BT, BK, BV = tile_sizes(D, D, 64, FWD_TILES if kind == "fwd" else BWD_TILES)
    constexprs = dict(H=4, K=D, V=D, BT=BT, BK=BK, BV=BV, CAUSAL=causal, IS_VARLEN=True, **flags)
    return KernelSpec(
        name=f"linear_attention.{kind}[K={D},V={D},{dt},{'causal' if causal else 'noncausal'}]",
        fn=_unwrap(fn),
        signature={**extra_sig, "cu_seqlens": "*i64", "scale": "fp32", "T": "i32", "NT": "i32",
                   **{n: "constexpr" for n in constexprs}},
        constexprs=constexprs,
        configs=_kernel_configs(_SCAN_CONFIGS))


def compile_specs():
    """Every kernel at representative signatures (bf16 inputs; K = V = 64 and 128), every autotune config."""
    specs = []
    for D, dt, causal in ((64, "bf16", True), (128, "bf16", True), (64, "bf16", False)):
        x = f"*{dt}"
        specs.append(_scan_spec("fwd", linear_attention_fwd_kernel, D, dt, causal,
                                dict(USE_INITIAL_STATE=True, STORE_FINAL_STATE=True),
                                {"q": x, "k": x, "v": x, "o": x, "h0": "*fp32", "ht": "*fp32"}))
        specs.append(_scan_spec("bwd", linear_attention_bwd_kernel, D, dt, causal,
                                dict(USE_INITIAL_STATE=True, USE_FINAL_STATE_GRADIENT=True,
                                     STORE_INITIAL_STATE_GRADIENT=True),
                                {"q": x, "k": x, "v": x, "do": x, "dq": "*fp32", "dk": "*fp32", "dv": "*fp32",
                                 "h0": "*fp32", "dht": "*fp32", "dh0": "*fp32"}))
    for D, normalize in ((64, False), (64, True), (128, False)):
        BK, BV = _step_tiles(D, D)
        c = dict(K=D, V=D, BK=BK, BV=BV, NORMALIZE=normalize)
        specs.append(KernelSpec(
            name=f"linear_attention.step[K={D},V={D},bf16,{'normalize' if normalize else 'plain'}]",
            fn=_unwrap(linear_attention_step_kernel),
            signature={"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "S": "*fp32", "z": "*fp32",
                       "scale": "fp32", "eps": "fp32", **{n: "constexpr" for n in c}},
            constexprs=c,
            configs=_kernel_configs(_STEP_CONFIGS)))
    return specs
