"""Triton kernels of the fused multi-timescale CMS memory (forward, backward, one-token step).

Chunked form, per memory m with g = log(tau_m), chunk length L, local positions i, j = 1..L:

    o_{m,i} = tau^i scale q_i S_prev + sum_{j<=i} tau^{i-j} (1 - tau) (scale q_i . k_j) v_j
    S_end   = tau^L S_prev + sum_j tau^{L-j} (1 - tau) k_j v_j^T

Every power of tau is exp(n g) with n >= 0; the causal mask is applied to the exponent before
exp, and no power of tau is ever divided by, so tau in [1e-3, 1 - 1e-4] is safe for any T.

Layout of the work: one program per (sequence, head, V-block) walks its chunks in order; per
chunk it loads q, k, v once, computes q k^T once, and then loops over the M memories, for which
only the decay mask and the state differ. The M states [K, V-block] live in float32 in the
final-state buffer (a workspace owned by the program, so no other program touches it): M
states of K x V floats do not fit in registers next to the chunk tiles for realistic M, K, V,
while reloading a slice the program itself just wrote hits L1/L2. A barrier after each state
store makes the write visible to every thread of the program before the next chunk reads it.
The same walk handles cu_seqlens: a program just reads its sequence's bounds.

The backward runs three kernels, flash-linear-attention style, none holding more than one state:
(1) cms_bwd_dh_kernel, one program per (V-block, sequence, head, memory), walks the chunks in
reverse with dS in registers and stores the chunk-end dS of every chunk (dhs, shaped like the
forward's chunk-start states hs) and dL/dS_0; (2) cms_bwd_kernel, one program per (chunk, V-block,
sequence, head), no loop-carried state, computes dq, dk and dv from the chunk's tiles, hs and
dhs; (3) cms_bwd_aux_kernel, same grid, dmix and the decay-gradient partials, only when needed
(kept apart: their reductions next to the dq/dk accumulators pushed the gradient kernel into
spills). Decay
gradient, with k' = (1 - tau) k and G_i = i g (i = position in the sequence):
dL/dG_i = q_i . dq_{m,i} - k'_i . dk'_{m,i}, dL/dg = sum_i i dL/dG_i and
dL/dtau = (dL/dg) / tau - sum_i k_i . dk'_{m,i}. Kernel (3) evaluates dL/dg chunk by chunk with
each exponent's own weight (i - j for a pair, i for tau^i, L - j, L): the same sum, but without the
large diagonal terms that cancel in the position-weighted form, so tau = 1e-3 keeps fp32 accuracy.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import utils
from ..aot import KernelConfig, KernelSpec
from ..triton_utils import autotune

# ----------------------------------------------------------------------------- configs
FWD_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=s, default=(bv, w, s) == (32, 8, 1))
               for bv in (32, 64) for w in (4, 8) for s in (1, 2)]
# the gradient kernel needs ~240 registers per thread: with 4 warps it spills, so 8 warps only
BWD_CONFIGS = [KernelConfig({}, num_warps=8, num_stages=s, default=s == 1) for s in (1, 2)]
BWD_DH_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 1))
                  for w in (4, 8) for s in (1, 2)]
BWD_AUX_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 2))
                  for w in (4, 8) for s in (1, 2)]
BWD_BV = 32     # fixed (not autotuned): the partial-sum buffers are sized by cdiv(V, BWD_BV)
STEP_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=1, default=(bv, w) == (32, 4))
                for bv in (16, 32, 64) for w in (2, 4)]


def _triton_configs(configs):
    default = next(c for c in configs if c.default)
    as_triton = lambda c: triton.Config(dict(c.meta), num_warps=c.num_warps, num_stages=c.num_stages)
    return utils.autotune_configs([as_triton(c) for c in configs], as_triton(default))


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _seq_bounds(i_n, T, cu_seqlens, chunk_offsets, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first row, length, index of the first chunk in the chunk-state buffer) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        boc = tl.load(chunk_offsets + i_n).to(tl.int64)
        return bos, (eos - bos).to(tl.int32), boc
    else:
        return i_n.to(tl.int64) * T, T, i_n.to(tl.int64) * tl.cdiv(T, BT)


@triton.jit
def _load_rows(ptr, row0, i_h, o_t, o_d, mask, H: tl.constexpr, D: tl.constexpr):
    """float32 tile [rows o_t, columns o_d] of head i_h of a [tokens, H, D] tensor, from token row0 on."""
    return tl.load(ptr + (row0 * H + i_h) * D + o_t[:, None] * (H * D) + o_d[None, :], mask=mask, other=0.).to(tl.float32)


@triton.jit
def _decay_factors(g, L, o_t, BT: tl.constexpr):
    """Causal decay mask tau^{i-j} (i >= j, j < L), tau^i and tau^{L-j}, all from exponents <= 0."""
    m_t = o_t < L
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[None, :]
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    b_D = tl.where(causal, tl.exp(tl.where(causal, diff * g, 0.0)), 0.0)
    e_q = tl.where(m_t, tl.exp((o_t + 1).to(tl.float32) * g), 0.0)
    e_k = tl.where(m_t, tl.exp(tl.where(m_t, (L - 1 - o_t).to(tl.float32) * g, 0.0)), 0.0)
    return b_D, e_q, e_k


# ----------------------------------------------------------------------------- forward
@triton.heuristics({
    "USE_INITIAL_STATE": lambda a: a["h0"] is not None,
    "STORE_CHUNK_STATES": lambda a: a["hs"] is not None,
    "HAS_MIX": lambda a: a["mix"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@triton.autotune(configs=_triton_configs(FWD_CONFIGS), key=["H", "M", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T"])
def cms_fwd_kernel(q, k, v, decay, mix, o, h0, ht, hs, cu_seqlens, chunk_offsets, scale, T,
                   H: tl.constexpr, M, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MIX_PER_TOKEN: tl.constexpr,
                   USE_INITIAL_STATE: tl.constexpr, STORE_CHUNK_STATES: tl.constexpr,
                   HAS_MIX: tl.constexpr, IS_VARLEN: tl.constexpr):
    """o (mixed [rows, H, V] or per memory [rows, H, M, V]); ht [N, H, M, K, V] ends as the final
    state; hs [chunks, H, M, K, V] receives every chunk's starting state (for the backward)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_seq, boc = _seq_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = o_k[:, None] * V + o_v[None, :]
    p_ht = ht + i_nh.to(tl.int64) * M * K * V

    for i_m in range(M):
        if USE_INITIAL_STATE:
            b_h = tl.load(h0 + i_nh.to(tl.int64) * M * K * V + i_m * K * V + off_kv, mask=m_kv, other=0.).to(tl.float32)
        else:
            b_h = tl.zeros([BK, BV], dtype=tl.float32)
        tl.store(p_ht + i_m * K * V + off_kv, b_h, mask=m_kv)
    tl.debug_barrier()

    for i_c in range(0, tl.cdiv(T_seq, BT)):
        L = tl.minimum(T_seq - i_c * BT, BT)
        m_t = o_t < L
        row0 = bos + i_c * BT          # int64 scalar base; per-element offsets stay int32
        b_q = _load_rows(q, row0, i_h, o_t, o_k, m_t[:, None] & m_k[None, :], H, K)
        b_k = _load_rows(k, row0, i_h, o_t, o_k, m_t[:, None] & m_k[None, :], H, K)
        b_v = _load_rows(v, row0, i_h, o_t, o_v, m_t[:, None] & m_v[None, :], H, V)
        b_q = b_q * scale
        b_A = tl.dot(b_q, tl.trans(b_k))                 # scale q k^T, shared by all M memories
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        if HAS_MIX:     # intra-chunk part of the mixed output: (sum_m mix_m (1 - tau_m) A * D_m) v, one dot
            b_W = tl.zeros([BT, BT], dtype=tl.float32)
        for i_m in range(M):
            tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
            g = tl.log(tau)
            b_D, e_q, e_k = _decay_factors(g, L, o_t, BT)
            p_h = p_ht + i_m * K * V + off_kv
            b_h = tl.load(p_h, mask=m_kv, other=0.)
            if STORE_CHUNK_STATES:
                tl.store(hs + (((boc + i_c) * H + i_h) * M + i_m) * K * V + off_kv, b_h, mask=m_kv)
            if HAS_MIX:
                if MIX_PER_TOKEN:
                    b_mx = tl.load(mix + (row0 * H + i_h) * M + i_m + o_t * (H * M), mask=m_t, other=0.).to(tl.float32)
                else:
                    b_mx = tl.zeros([BT], dtype=tl.float32) + tl.load(mix + i_h * M + i_m).to(tl.float32)
                b_W += b_A * b_D * (b_mx * (1 - tau))[:, None]
                b_o += tl.dot(b_q, b_h) * (b_mx * e_q)[:, None]
            else:
                b_om = tl.dot(b_A * b_D, b_v) * (1 - tau) + tl.dot(b_q, b_h) * e_q[:, None]
                tl.store(o + ((row0 * H + i_h) * M + i_m) * V + o_t[:, None] * (H * M * V) + o_v[None, :],
                         b_om.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
            b_h = tl.exp(L.to(tl.float32) * g) * b_h + tl.dot(tl.trans(b_k), b_v * (e_k * (1 - tau))[:, None])
            tl.store(p_h, b_h, mask=m_kv)
            tl.debug_barrier()
        if HAS_MIX:
            b_o += tl.dot(b_W, b_v)
            tl.store(o + (row0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------- backward
@triton.heuristics({
    "USE_FINAL_GRAD": lambda a: a["dht"] is not None,
    "HAS_MIX": lambda a: a["mix"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@triton.autotune(configs=_triton_configs(BWD_DH_CONFIGS), key=["H", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T"])
def cms_bwd_dh_kernel(q, decay, mix, do, dht, dh0, dhs, cu_seqlens, chunk_offsets, scale, T,
                      H: tl.constexpr, M, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MIX_PER_TOKEN: tl.constexpr,
                      USE_FINAL_GRAD: tl.constexpr, HAS_MIX: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Reverse recursion of dS for one (V-block, sequence, head, memory m):

        dS_{c-1} = tau^L dS_c + (scale q_c * tau^i)^T (mix_m dO_c)

    dhs [chunks, H, M, K, V] receives dL/dS at the END of every chunk (the gradient that flows
    into that chunk's final state), dh0 [N, H, M, K, V] ends as dL/dS_0. The memories are
    independent, so m is a grid axis and the program carries a single [BK, BV] state."""
    i_v, i_nh, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_seq, boc = _seq_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = o_k[:, None] * V + o_v[None, :]
    g = tl.log(tl.load(decay + i_h * M + i_m).to(tl.float32))
    if USE_FINAL_GRAD:
        b_dh = tl.load(dht + (i_nh.to(tl.int64) * M + i_m) * K * V + off_kv, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_MIX and not MIX_PER_TOKEN:
        mx = tl.load(mix + i_h * M + i_m).to(tl.float32)

    NC = tl.cdiv(T_seq, BT)
    for i_r in range(0, NC):
        i_c = NC - 1 - i_r
        L = tl.minimum(T_seq - i_c * BT, BT)
        m_t = o_t < L
        row0 = bos + i_c * BT          # int64 scalar base; per-element offsets stay int32
        tl.store(dhs + (((boc + i_c) * H + i_h) * M + i_m) * K * V + off_kv, b_dh, mask=m_kv)
        b_q = _load_rows(q, row0, i_h, o_t, o_k, m_t[:, None] & m_k[None, :], H, K)
        e_q = tl.where(m_t, tl.exp((o_t + 1).to(tl.float32) * g), 0.) * scale
        if HAS_MIX:
            b_do = _load_rows(do, row0, i_h, o_t, o_v, m_t[:, None] & m_v[None, :], H, V)
            if MIX_PER_TOKEN:
                e_q *= tl.load(mix + (row0 * H + i_h) * M + i_m + o_t * (H * M), mask=m_t, other=0.).to(tl.float32)
            else:
                e_q *= mx
        else:
            b_do = tl.load(do + ((row0 * H + i_h) * M + i_m) * V + o_t[:, None] * (H * M * V) + o_v[None, :],
                           mask=m_t[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_dh = tl.exp(L.to(tl.float32) * g) * b_dh + tl.dot(tl.trans(b_q), b_do * e_q[:, None])
    tl.store(dh0 + (i_nh.to(tl.int64) * M + i_m) * K * V + off_kv, b_dh, mask=m_kv)


@triton.heuristics({
    "HAS_MIX": lambda a: a["mix"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@triton.autotune(configs=_triton_configs(BWD_CONFIGS), key=["H", "M", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T"])
def cms_bwd_kernel(q, k, v, decay, mix, do, hs, dhs, dq, dk, dv, cu_seqlens, chunk_offsets,
                   scale, T, NR, H: tl.constexpr, M, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   MIX_PER_TOKEN: tl.constexpr, HAS_MIX: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Gradients of one (chunk, V-block, sequence, head), chunk-parallel: no loop-carried state.

    Reads the chunk-start states hs (saved by the forward) and the chunk-end dS in dhs (from
    cms_bwd_dh_kernel). dv [rows, H, V] is complete per V-block. dq, dk [NV, rows, H, K] are partial
    sums over this V-block (every term is linear in the V-sliced dO, v, dS), summed on the host.
    The mix and decay gradients have their own kernel below."""
    i_c, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_seq, boc = _seq_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    if i_c * BT < T_seq:       # packed sequences: the grid covers the longest possible one
        dq += i_v.to(tl.int64) * NR * H * K
        dk += i_v.to(tl.int64) * NR * H * K

        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        off_kv = o_k[:, None] * V + o_v[None, :]
        L = tl.minimum(T_seq - i_c * BT, BT)
        m_t = o_t < L
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row0 = bos + i_c * BT          # int64 scalar base; per-element offsets stay int32
        b_q = _load_rows(q, row0, i_h, o_t, o_k, m_tk, H, K) * scale
        b_k = _load_rows(k, row0, i_h, o_t, o_k, m_tk, H, K)
        b_v = _load_rows(v, row0, i_h, o_t, o_v, m_tv, H, V)
        b_A = tl.dot(b_q, tl.trans(b_k))
        if HAS_MIX:
            b_do = _load_rows(do, row0, i_h, o_t, o_v, m_tv, H, V)
            b_dPs = tl.dot(b_do, tl.trans(b_v))            # dO_i . v_j, shared by all M memories
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_dv = tl.zeros([BT, BV], dtype=tl.float32)
        if HAS_MIX:
            # dO_m = mix_m dO, so the intra-chunk parts of dq, dk, dv are W k, W^T q and W_v^T dO with
            # W = sum_m (1 - tau_m) mix_m dP D_m, W_v = sum_m (1 - tau_m) mix_m A D_m: one dot each
            # after the loop instead of one per memory
            b_W = tl.zeros([BT, BT], dtype=tl.float32)
            b_Wv = tl.zeros([BT, BT], dtype=tl.float32)
        p_state = ((boc + i_c) * H + i_h) * M * K * V + off_kv
        for i_m in range(M):
            tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
            g = tl.log(tau)
            b_D, e_q, e_k = _decay_factors(g, L, o_t, BT)
            b_h = tl.load(hs + p_state + i_m * K * V, mask=m_kv, other=0.)
            b_dh = tl.load(dhs + p_state + i_m * K * V, mask=m_kv, other=0.)
            if HAS_MIX:
                if MIX_PER_TOKEN:
                    b_mx = tl.load(mix + (row0 * H + i_h) * M + i_m + o_t * (H * M), mask=m_t, other=0.).to(tl.float32)
                else:
                    b_mx = tl.zeros([BT], dtype=tl.float32) + tl.load(mix + i_h * M + i_m).to(tl.float32)
                b_W += b_dPs * (b_mx * (1 - tau))[:, None] * b_D
                b_Wv += b_A * b_D * (b_mx * (1 - tau))[:, None]
                # state terms of the gradients wrt the (scaled) q and k' = (1 - tau) k of this memory
                b_dq += tl.dot(b_do * (b_mx * e_q)[:, None], tl.trans(b_h))
                b_dk += tl.dot(b_v * (e_k * (1 - tau))[:, None], tl.trans(b_dh))
                b_dv += tl.dot(b_k, b_dh) * (e_k * (1 - tau))[:, None]
            else:
                b_dom = tl.load(do + ((row0 * H + i_h) * M + i_m) * V + o_t[:, None] * (H * M * V) + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
                b_dPD = tl.dot(b_dom, tl.trans(b_v)) * b_D
                b_AD = b_A * b_D
                # gradients wrt the (scaled) q and k' = (1 - tau) k of this memory: intra-chunk + state terms
                b_dq_s = tl.dot(b_dom, tl.trans(b_h)) * e_q[:, None]
                b_dk_s = tl.dot(b_v, tl.trans(b_dh)) * e_k[:, None]
                b_dqm = tl.dot(b_dPD, b_k) * (1 - tau) + b_dq_s
                b_dkm = tl.dot(tl.trans(b_dPD), b_q) + b_dk_s
                b_dv += (tl.dot(tl.trans(b_AD), b_dom) + tl.dot(b_k, b_dh) * e_k[:, None]) * (1 - tau)
                b_dq += b_dqm
                b_dk += b_dkm * (1 - tau)
        if HAS_MIX:
            b_dq += tl.dot(b_W, b_k)
            b_dk += tl.dot(tl.trans(b_W), b_q)
            b_dv += tl.dot(tl.trans(b_Wv), b_do)
        tl.store(dq + (row0 * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], b_dq * scale, mask=m_tk)
        tl.store(dk + (row0 * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], b_dk, mask=m_tk)
        tl.store(dv + (row0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_dv, mask=m_tv)


@triton.heuristics({
    "HAS_MIX": lambda a: a["mix"] is not None,
    "COMPUTE_DMIX": lambda a: a["dmix"] is not None,
    "COMPUTE_DDECAY": lambda a: a["dgs"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@triton.autotune(configs=_triton_configs(BWD_AUX_CONFIGS), key=["H", "M", "K", "V", "BT", "MIX_PER_TOKEN"])
@triton.jit(do_not_specialize=["T"])
def cms_bwd_aux_kernel(q, k, v, decay, mix, do, hs, dhs, dmix, dgs, cu_seqlens, chunk_offsets, scale, T, NR, NS,
                       H: tl.constexpr, M, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MIX_PER_TOKEN: tl.constexpr,
                       HAS_MIX: tl.constexpr, COMPUTE_DMIX: tl.constexpr, COMPUTE_DDECAY: tl.constexpr,
                       IS_VARLEN: tl.constexpr):
    """Mix- and decay-gradient partials of one (chunk, V-block, sequence, head), chunk-parallel.

    dmix [NV, rows, H, M] (mixed only): dL/dmix_{i,m} = o_{m,i} . dO_i over this V-block.
    dgs [NV, NS, H, M, 2] (NS chunk slots, zero-filled) receives per memory (dL/dg, sum_i k_i . dk'_i)
    of this chunk and V-block. dL/dg has every exponent's weight written out (pair (i, j): i - j;
    tau^i: i; tau^{L-j}: L - j; tau^L: L), so diagonal terms never cancel and small tau stays exact.
    The [BT, BK] gradients are never formed: q_i . dq_s,i = tau^i dO_i . (q_i S),
    k_j . dk_s,j = tau^{L-j} v_j . (k_j dS) and sum_{ij} dPD_ij q_i . k_j = sum(dPD * A)."""
    i_c, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_seq, boc = _seq_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    if i_c * BT < T_seq:       # packed sequences: the grid covers the longest possible one
        if COMPUTE_DMIX:
            dmix += i_v.to(tl.int64) * NR * H * M
        if COMPUTE_DDECAY:
            dgs += i_v.to(tl.int64) * NS * H * M * 2
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        off_kv = o_k[:, None] * V + o_v[None, :]
        L = tl.minimum(T_seq - i_c * BT, BT)
        m_t = o_t < L
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row0 = bos + i_c * BT
        b_q = _load_rows(q, row0, i_h, o_t, o_k, m_tk, H, K) * scale
        b_k = _load_rows(k, row0, i_h, o_t, o_k, m_tk, H, K)
        b_v = _load_rows(v, row0, i_h, o_t, o_v, m_tv, H, V)
        b_A = tl.dot(b_q, tl.trans(b_k))
        if HAS_MIX:
            b_do = _load_rows(do, row0, i_h, o_t, o_v, m_tv, H, V)
            if COMPUTE_DDECAY:
                b_dPs = tl.dot(b_do, tl.trans(b_v))
        p_i = (o_t + 1).to(tl.float32)
        diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
        p_state = ((boc + i_c) * H + i_h) * M * K * V + off_kv
        for i_m in range(M):
            tau = tl.load(decay + i_h * M + i_m).to(tl.float32)
            g = tl.log(tau)
            b_D, e_q, e_k = _decay_factors(g, L, o_t, BT)
            b_h = tl.load(hs + p_state + i_m * K * V, mask=m_kv, other=0.)
            if COMPUTE_DDECAY:
                b_dh = tl.load(dhs + p_state + i_m * K * V, mask=m_kv, other=0.)
                if HAS_MIX:
                    if MIX_PER_TOKEN:
                        b_mx = tl.load(mix + (row0 * H + i_h) * M + i_m + o_t * (H * M), mask=m_t, other=0.).to(tl.float32)
                    else:
                        b_mx = tl.zeros([BT], dtype=tl.float32) + tl.load(mix + i_h * M + i_m).to(tl.float32)
                    b_dom = b_do * b_mx[:, None]
                    b_dP = b_dPs * b_mx[:, None]
                else:
                    b_dom = tl.load(do + ((row0 * H + i_h) * M + i_m) * V + o_t[:, None] * (H * M * V) + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
                    b_dP = tl.dot(b_dom, tl.trans(b_v))
            b_qh = tl.dot(b_q, b_h)                                         # scale q_i S
            if COMPUTE_DMIX:
                b_om = tl.dot(b_A * b_D, b_v) * (1 - tau) + b_qh * e_q[:, None]
                tl.store(dmix + (row0 * H + i_h) * M + i_m + o_t * (H * M), tl.sum(b_om * b_do, axis=1), mask=m_t)
            if COMPUTE_DDECAY:
                b_dPD = b_dP * b_D
                r_q = e_q * tl.sum(b_dom * b_qh, axis=1)                        # q_i . dq_s,i
                r_k = e_k * tl.sum(b_v * tl.dot(b_k, b_dh), axis=1)             # k_j . dk_s,j
                d_g = tl.sum(tl.sum(diff * b_dPD * b_A, axis=1), axis=0) * (1 - tau)
                d_g += tl.sum(p_i * r_q, axis=0)
                d_g += tl.sum(tl.where(m_t, L - p_i, 0.) * r_k, axis=0) * (1 - tau)
                d_g += L.to(tl.float32) * tl.exp(L.to(tl.float32) * g) * tl.sum(tl.sum(b_h * b_dh, axis=1), axis=0)
                p_gm = dgs + (((boc + i_c) * H + i_h) * M + i_m) * 2
                tl.store(p_gm, d_g)
                tl.store(p_gm + 1, tl.sum(tl.sum(b_dPD * b_A, axis=1), axis=0) + tl.sum(r_k, axis=0))


# ----------------------------------------------------------------------------- one-token step
@triton.heuristics({
    "HAS_MIX": lambda a: a["mix"] is not None,
})
@autotune(STEP_CONFIGS, key=["H", "M", "K", "V", "MIX_PER_BATCH"], restore=["state"])
@triton.jit
def cms_step_kernel(q, k, v, decay, mix, state, o, scale, H: tl.constexpr, M,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    MIX_PER_BATCH: tl.constexpr, HAS_MIX: tl.constexpr):
    """state[b, h, m] = tau S + (1 - tau) k v^T for all m in place; o = scale q S_m (mixed or per m)."""
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
        b_s = tau * tl.load(p_s, mask=m_kv, other=0.) + (1 - tau) * b_kv
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


# ----------------------------------------------------------------------------- AOT compile specs
def _unwrap(fn):
    while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _spec(name, kernel, configs, pointers, present, scalars, constexprs):
    """A KernelSpec: `pointers` name -> dtype; those not in `present` are passed as None."""
    signature = {p: (f"*{dt}" if p in present else "constexpr") for p, dt in pointers.items()}
    signature.update(scalars)
    signature.update({c: "constexpr" for c in constexprs})
    fixed = {p: None for p in pointers if p not in present}
    fixed.update(constexprs)
    return KernelSpec(name, _unwrap(kernel), signature, fixed, configs, divisible_by_16=["T"] if "T" in scalars else [])


def compile_specs():
    """Forward, backward and step at representative signatures (every config of each)."""
    specs = []
    scan_variants = (
        # K = V, dtype, mix form,  varlen, per-head-state flags
        (64, "bf16", "token", False),
        (64, "fp16", "static", True),
        (128, "bf16", None, False),
        (128, "fp16", "token", False),     # the widest heads with the heaviest mix path
    )
    for D, dt, mix, varlen in scan_variants:
        BT = 16
        BK = max(16, D)
        tag = f"K={D},V={D},M=4,{dt},mix={mix or 'none'}{',varlen' if varlen else ''}"
        present = {"q", "k", "v", "decay", "o", "h0", "ht", "hs", "do", "dq", "dk", "dv", "dh0", "dht", "dgs",
                   "state"}
        if mix:
            present |= {"mix", "dmix"}
        if varlen:
            present |= {"cu_seqlens", "chunk_offsets"}
        shape = dict(H=4, K=D, V=D, BT=BT, BK=BK, MIX_PER_TOKEN=mix == "token",
                     HAS_MIX=mix is not None, IS_VARLEN=varlen)
        fwd_ptrs = dict(q=dt, k=dt, v=dt, decay="fp32", mix=dt, o=dt, h0="fp32", ht="fp32", hs="fp32",
                        cu_seqlens="i64", chunk_offsets="i64")
        specs.append(_spec(f"cms.fwd[{tag}]", cms_fwd_kernel, FWD_CONFIGS,
                           fwd_ptrs, present, {"scale": "fp32", "T": "i32", "M": "i32"},
                           dict(shape, USE_INITIAL_STATE=True, STORE_CHUNK_STATES=True)))
        bwd_ptrs = dict(q=dt, k=dt, v=dt, decay="fp32", mix=dt, do=dt, hs="fp32", dhs="fp32", dht="fp32",
                        dh0="fp32", dq="fp32", dk="fp32", dv="fp32", dmix="fp32", dgs="fp32", cu_seqlens="i64",
                        chunk_offsets="i64")
        dh_ptrs = {p: bwd_ptrs[p] for p in ("q", "decay", "mix", "do", "dht", "dh0", "dhs", "cu_seqlens",
                                             "chunk_offsets")}
        specs.append(_spec(f"cms.bwd_dh[{tag}]", cms_bwd_dh_kernel, BWD_DH_CONFIGS,
                           dh_ptrs, present | {"dhs"}, {"scale": "fp32", "T": "i32", "M": "i32"},
                           dict(shape, BV=BWD_BV, USE_FINAL_GRAD=True)))
        grad_ptrs = {p: dt_ for p, dt_ in bwd_ptrs.items() if p not in ("dht", "dh0", "dmix", "dgs")}
        specs.append(_spec(f"cms.bwd[{tag}]", cms_bwd_kernel, BWD_CONFIGS,
                           grad_ptrs, present | {"dhs"}, {"scale": "fp32", "T": "i32", "NR": "i32", "M": "i32"},
                           dict(shape, BV=BWD_BV)))
        aux_ptrs = {p: dt_ for p, dt_ in bwd_ptrs.items() if p not in ("dht", "dh0", "dq", "dk", "dv")}
        specs.append(_spec(f"cms.bwd_aux[{tag}]", cms_bwd_aux_kernel, BWD_AUX_CONFIGS,
                           aux_ptrs, present | {"dhs"}, {"scale": "fp32", "T": "i32", "NR": "i32", "NS": "i32",
                                                         "M": "i32"},
                           dict(shape, BV=BWD_BV, COMPUTE_DMIX=mix is not None, COMPUTE_DDECAY=True)))
    for D, dt, mix in ((64, "bf16", "batch"), (128, "fp32", None)):
        present = {"q", "k", "v", "decay", "state", "o"} | ({"mix"} if mix else set())
        ptrs = dict(q=dt, k=dt, v=dt, decay="fp32", mix=dt, state="fp32", o=dt)
        specs.append(_spec(f"cms.step[K={D},V={D},M=4,{dt},mix={mix or 'none'}]", cms_step_kernel, STEP_CONFIGS,
                           ptrs, present, {"scale": "fp32", "M": "i32"},
                           dict(H=4, K=D, V=D, BK=max(16, D), MIX_PER_BATCH=mix == "batch",
                                HAS_MIX=mix is not None)))
    return specs
