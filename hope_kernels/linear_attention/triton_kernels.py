"""Triton kernels of linear attention: the chunk-parallel scan (forward, backward) and the generation step.

Chunks of BT tokens (64 by default); h_c is the state at the start of chunk c of a sequence and
G_c the gradient of the loss with respect to the state at its end:

    h_c = S_0 + sum_{c' < c} k_c'^T v_c'                          G_c = dS_T + scale sum_{c' > c} q_c'^T do_c'
    o_c = scale (q_c h_c + tril(q_c k_c^T) v_c)
    dq_c = scale (do_c h_c^T + tril(do_c v_c^T) k_c)              dS_0 = G_c + scale q_c^T do_c at c = 0
    dk_c = v_c G_c^T + scale tril(do_c v_c^T)^T q_c
    dv_c = k_c G_c + scale triu(k_c q_c^T) do_c

Non-causal attention reads one state per sequence, S = S_0 + K^T V, with G = dS_T + scale Q^T dO:
o = scale q S, dq = scale do S^T, dk = v G^T, dv = k G, dS_0 = G.

The work, as in flash-linear-attention:
- `chunk_state_kernel`: one program per (sequence x head, K tile, V tile) walks the chunks of its
  sequence with a [BK, BV] float32 state in registers and stores every chunk-start state h_c
  (forward, from k and v) or every G_c (reverse, from q and do) in the input dtype.
- `chunk_partial_kernel` + `chunk_reduce_kernel` (non-causal): per-chunk products k_c^T v_c (or
  q_c^T do_c) in parallel over chunks, then one float32 sum per sequence.
- `chunk_o_kernel`, `chunk_dqk_kernel`, `chunk_dv_kernel`: one program per (chunk x head, tile),
  all chunks of all sequences at once, reading h_c / G_c.
The forward saves only q, k, v and S_0 for the backward, which recomputes the chunk states.
Transient buffers hold T / BT x H x K x V elements.

Dots take bf16/fp16 tiles as they are (tensor cores, fp32 accumulation); fp32 intermediates
(scores, states) are cast to the input dtype before they feed a dot; fp32 inputs run in TF32.
`UPCAST` (triton_utils.upcast_dots) turns bf16 tiles into fp32 under the interpreter only.
Programs of the chunk-parallel kernels are (chunk, head) pairs flattened onto grid axis 0, so no
axis limited to 65535 grows with the batch; with cu_seqlens a program reads its (sequence, chunk)
pair from `triton_utils.chunk_indices`. Token offsets are int64.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig, KernelSpec
from ..triton_utils import (autotune, check_grid, chunk_bounds, chunk_indices, chunk_offsets, default_config, empty,
                            load_tile, seq_bounds, unwrap, upcast_dots)

MAX_CHUNK = 128   # largest chunk the kernels tile (a larger chunk_size is capped here)
MAX_TILE = 64     # K and V tiles of the state


def _configs(pairs):
    """KernelConfigs from (num_warps, num_stages) pairs; the first is the default."""
    return [KernelConfig({}, num_warps=w, num_stages=s, default=i == 0) for i, (w, s) in enumerate(pairs)]


STATE_CONFIGS = _configs([(4, 2), (4, 1), (8, 2), (4, 3)])
PARTIAL_CONFIGS = _configs([(4, 2), (4, 3), (8, 2), (8, 3)])
# The chunk-parallel kernels tune the tile of their grid's axis 1 (64 or 128 columns: a 128-wide tile
# computes the chunk's [BT, BT] scores once per 128-wide head instead of twice) and of their inner
# loop. Defaults: 64-wide grid tiles; the gradient kernels loop in 32-wide tiles (64 pushes the dq/dk
# kernel to 255 registers on sm_80, and into spills with fp32 inputs).
O_CONFIGS = [KernelConfig({"BV": bv}, num_warps=w, num_stages=s, default=(bv, w, s) == (64, 4, 2))
             for bv in (64, 128) for w in (4, 8) for s in (2, 3)]
DQK_CONFIGS = [KernelConfig({"BK": bk, "BV": bv}, num_warps=w, num_stages=2, default=(bk, bv, w) == (64, 32, 4))
               for bk in (64, 128) for bv in (32, 64) for w in (4, 8) if (bk, w) != (128, 4)]   # that one spills
DV_CONFIGS = [KernelConfig({"BV": bv, "BK": bk}, num_warps=w, num_stages=2, default=(bv, bk, w) == (64, 32, 4))
              for bv in (64, 128) for bk in (32, 64) for w in (4, 8)]
REDUCE_CONFIGS = _configs([(4, 1), (8, 1)])
STEP_CONFIGS = _configs([(4, 1), (2, 1), (8, 1)])   # 1 warp spills at K = 128


# --------------------------------------------------------------------------- launch arithmetic
class Plan(NamedTuple):
    """Tiles and grids of one call: BT-row chunks, [BK, BV] state tiles, N sequences, NT chunks in all."""
    BT: int
    BK: int
    BV: int
    N: int
    NT: int
    indices: Optional[torch.Tensor]   # [NT, 2] (sequence, chunk) with cu_seqlens
    offsets: Optional[torch.Tensor]   # [N + 1] first chunk of each sequence with cu_seqlens
    grids: Dict[str, tuple]           # kernel -> grid at its default config, checked against the CUDA limits
    tuned: Dict[str, Callable]        # o, dqk, dv: grid as a function of the config (autotuned axis-1 tile)


# axis-1 tile of each chunk-parallel kernel: (config key, dimension it tiles, configs)
_GRID_TILES = {"o": ("BV", "V", O_CONFIGS), "dqk": ("BK", "K", DQK_CONFIGS), "dv": ("BV", "V", DV_CONFIGS)}


def chunk_rows(T: int, chunk_size: int) -> int:
    """Rows per chunk: chunk_size, capped at MAX_CHUNK and at T rounded up to a power of two (>= 16)."""
    return max(16, min(chunk_size, MAX_CHUNK, triton.next_power_of_2(max(T, 1))))


def launch_plan(B: int, T: int, H: int, K: int, V: int, chunk_size: int, cu_seqlens=None, causal=True) -> Plan:
    """The tiles and every grid of a forward + backward call (pure launch arithmetic, nothing runs).

    Grids by kernel: "states" (causal, sequential: (N*H, NK, NV)), "partials" and "reduce" (non-causal),
    "o" (the forward's output), "dqk" and "dv" (backward); chunk-parallel grids put chunk x head on
    axis 0. The forward runs states (or partials, reduce) then o; the backward runs states twice (or
    partials, reduce twice), dqk and dv. Autotuning may widen the axis-1 tiles of o, dqk and dv
    (`tuned`), which only shrinks axis 1.
    """
    BT = chunk_rows(T, chunk_size)
    BK, BV = (max(16, min(triton.next_power_of_2(d), MAX_TILE)) for d in (K, V))
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    if cu_seqlens is None:
        N, NT, indices, offsets = B, B * triton.cdiv(T, BT), None, None
    else:
        indices, offsets = chunk_indices(cu_seqlens, BT), chunk_offsets(cu_seqlens, BT)
        N, NT = cu_seqlens.numel() - 1, indices.shape[0]
    seq, dims = (N * H, NK, NV), {"K": K, "V": V}
    tuned = {n: (lambda meta, tile=tile, d=dims[dim]: check_grid((NT * H, triton.cdiv(d, meta[tile]))))
             for n, (tile, dim, _) in _GRID_TILES.items()}
    grids = {n: tuned[n](default_config(configs).meta) for n, (_, _, configs) in _GRID_TILES.items()}
    if causal:
        grids["states"] = seq
    else:
        grids.update({"partials": (NT * H, NK, NV), "reduce": seq})
    return Plan(BT, BK, BV, N, NT, indices, offsets, {n: check_grid(g) for n, g in grids.items()}, tuned)


# --------------------------------------------------------------------------- sequential state pass
@triton.heuristics({
    "USE_INITIAL": lambda a: a["init"] is not None,
    "STORE_FINAL": lambda a: a["final"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@autotune(STATE_CONFIGS, key=["H", "K", "V", "BT", "REVERSE"])
@triton.jit
def chunk_state_kernel(
    a, b, h, init, final, cu_seqlens, offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, UPCAST: tl.constexpr,
    USE_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Running sum of scale * a_c^T b_c over the chunks of a sequence; grid (N*H, NK, NV).

    a: [tokens, H, K], b: [tokens, H, V]; h: [NT, H, K, V] receives, for every chunk c, the sum before
    c is added: forward (a, b = k, v) h_c = init + sum_{c' < c}, reverse (q, do) G_c = init + sum_{c' > c}.
    init / final: [N, H, K, V] float32 (S_0 / S_T forward, dS_T / dS_0 reverse).
    """
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, boc = seq_bounds(i_n, T, cu_seqlens, offsets, BT, IS_VARLEN)
    NC = tl.cdiv(L, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL:
        b_h += tl.load(init + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.)
    for j in range(0, NC):
        i_t = NC - 1 - j if REVERSE else j
        t0 = bos + i_t * BT
        m_t = (i_t * BT + o_t) < L
        tl.store(h + ((boc + i_t) * H + i_h) * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        # a^T as a [BK, BT] tile, b as [BT, BV]
        b_aT = load_tile(a + (t0 * H + i_h) * K + o_k[:, None] + o_t[None, :] * (H * K),
                         m_k[:, None] & m_t[None, :], UPCAST)
        b_b = load_tile(b + (t0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                        m_t[:, None] & m_v[None, :], UPCAST)
        b_h += tl.dot(b_aT, b_b) * scale
    if STORE_FINAL:
        tl.store(final + i_nh.to(tl.int64) * K * V + p_kv, b_h, mask=m_kv)


# --------------------------------------------------------------------------- non-causal state: partials + reduce
@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@autotune(PARTIAL_CONFIGS, key=["H", "K", "V", "BT"])
@triton.jit
def chunk_partial_kernel(
    a, b, p, cu_seqlens, indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    UPCAST: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """p_c = scale * a_c^T b_c for every chunk; grid (NT*H, NK, NV); p: [NT, H, K, V] float32."""
    i_ch, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_h = i_ch // H, i_ch % H
    _, t0, L = chunk_bounds(i_c, T, cu_seqlens, indices, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < K, o_v < V
    b_aT = load_tile(a + (t0 * H + i_h) * K + o_k[:, None] + o_t[None, :] * (H * K), m_k[:, None] & m_t[None, :],
                     UPCAST)
    b_b = load_tile(b + (t0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], m_t[:, None] & m_v[None, :],
                    UPCAST)
    b_p = tl.dot(b_aT, b_b) * scale
    tl.store(p + i_ch.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], b_p,
             mask=m_k[:, None] & m_v[None, :])


@triton.heuristics({
    "USE_INITIAL": lambda a: a["init"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@autotune(REDUCE_CONFIGS, key=["H", "K", "V", "BT"])
@triton.jit
def chunk_reduce_kernel(
    p, init, out, cu_seqlens, offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """out_n = init_n + sum of the partials p_c of sequence n's chunks; grid (N*H, NK, NV), all float32."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    _, L, boc = seq_bounds(i_n, T, cu_seqlens, offsets, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL:
        b_s += tl.load(init + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.)
    for i_t in range(0, tl.cdiv(L, BT)):
        b_s += tl.load(p + ((boc + i_t) * H + i_h) * K * V + p_kv, mask=m_kv, other=0.)
    tl.store(out + i_nh.to(tl.int64) * K * V + p_kv, b_s, mask=m_kv)


# --------------------------------------------------------------------------- chunk-parallel outputs
@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@autotune(O_CONFIGS, key=["H", "K", "V", "BT", "CAUSAL"])
@triton.jit
def chunk_o_kernel(
    q, k, v, h, o, cu_seqlens, indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """o_c = scale (q_c h_c + tril(q_c k_c^T) v_c); grid (NT*H, cdiv(V, BV)), looping over K in BK tiles.

    h: chunk-start states [NT, H, K, V] (causal), or one state per sequence [N, H, K, V] (non-causal,
    o_c = scale q_c S_n). o: [tokens, H, V].
    """
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    i_n, t0, L = chunk_bounds(i_c, T, cu_seqlens, indices, BT, IS_VARLEN)
    i_s = i_c if CAUSAL else i_n
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < L, o_v < V
    p_h = h + (i_s.to(tl.int64) * H + i_h) * K * V + o_v[None, :]
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = load_tile(q + (t0 * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], m_t[:, None] & m_k[None, :],
                        UPCAST)
        b_h = load_tile(p_h + o_k[:, None] * V, m_k[:, None] & m_v[None, :], UPCAST).to(b_q.dtype)
        b_o += tl.dot(b_q, b_h)
        if CAUSAL:
            b_kT = load_tile(k + (t0 * H + i_h) * K + o_k[:, None] + o_t[None, :] * (H * K),
                             m_k[:, None] & m_t[None, :], UPCAST)
            b_A += tl.dot(b_q, b_kT)
    b_o *= scale
    if CAUSAL:
        b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A * scale, 0.)
        b_v = load_tile(v + (t0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], m_t[:, None] & m_v[None, :],
                        UPCAST)
        b_o += tl.dot(b_A.to(b_v.dtype), b_v)
    tl.store(o + (t0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# --------------------------------------------------------------------------- chunk-parallel gradients
@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@autotune(DQK_CONFIGS, key=["H", "K", "V", "BT", "CAUSAL"])
@triton.jit
def chunk_dqk_kernel(
    q, k, v, do, h, dh, dq, dk, cu_seqlens, indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq_c = scale (do_c h_c^T + ds_c k_c), dk_c = v_c G_c^T + scale ds_c^T q_c, ds_c = tril(do_c v_c^T);
    grid (NT*H, cdiv(K, BK)), looping over V in BV tiles.
    h / dh (h_c / G_c) as in chunk_o_kernel; non-causal drops the ds terms."""
    i_ch, i_k = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    i_n, t0, L = chunk_bounds(i_c, T, cu_seqlens, indices, BT, IS_VARLEN)
    i_s = i_c if CAUSAL else i_n
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t, m_k = o_t < L, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_s = (i_s.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv, m_kv = m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
        p_tv = (t0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :]
        b_do = load_tile(do + p_tv, m_tv, UPCAST)
        b_v = load_tile(v + p_tv, m_tv, UPCAST)
        b_h = load_tile(h + p_s + o_v[None, :], m_kv, UPCAST).to(b_do.dtype)
        b_dh = load_tile(dh + p_s + o_v[None, :], m_kv, UPCAST).to(b_v.dtype)
        b_dq += tl.dot(b_do, tl.trans(b_h))
        b_dk += tl.dot(b_v, tl.trans(b_dh))
        if CAUSAL:
            b_ds += tl.dot(b_do, tl.trans(b_v))
    b_dq *= scale
    p_tk = (t0 * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :]
    if CAUSAL:
        b_ds = tl.where(o_t[:, None] >= o_t[None, :], b_ds * scale, 0.)
        b_q = load_tile(q + p_tk, m_tk, UPCAST)
        b_k = load_tile(k + p_tk, m_tk, UPCAST)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
        b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@autotune(DV_CONFIGS, key=["H", "K", "V", "BT", "CAUSAL"])
@triton.jit
def chunk_dv_kernel(
    q, k, do, dh, dv, cu_seqlens, indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dv_c = k_c G_c + scale triu(k_c q_c^T) do_c; grid (NT*H, cdiv(V, BV)), looping over K in BK tiles.
    Non-causal: dv = k G_n."""
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    i_n, t0, L = chunk_bounds(i_c, T, cu_seqlens, indices, BT, IS_VARLEN)
    i_s = i_c if CAUSAL else i_n
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < L, o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    p_dh = dh + (i_s.to(tl.int64) * H + i_h) * K * V + o_v[None, :]
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = load_tile(k + (t0 * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], m_t[:, None] & m_k[None, :],
                        UPCAST)
        b_dh = load_tile(p_dh + o_k[:, None] * V, m_k[:, None] & m_v[None, :], UPCAST).to(b_k.dtype)
        b_dv += tl.dot(b_k, b_dh)
        if CAUSAL:
            b_qT = load_tile(q + (t0 * H + i_h) * K + o_k[:, None] + o_t[None, :] * (H * K),
                             m_k[:, None] & m_t[None, :], UPCAST)
            b_A += tl.dot(b_k, b_qT)
    p_tv = (t0 * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :]
    if CAUSAL:
        b_A = tl.where(o_t[:, None] <= o_t[None, :], b_A * scale, 0.)
        b_do = load_tile(do + p_tv, m_tv, UPCAST)
        b_dv += tl.dot(b_A.to(b_do.dtype), b_do)
    tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)


# --------------------------------------------------------------------------- generation step
@triton.heuristics({"NORMALIZE": lambda a: a["z"] is not None})
@autotune(STEP_CONFIGS, key=["K", "V"], restore=["S", "z"])
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
def _launch(kernel, plan, name, *args, **meta):
    """Launch `kernel` on the plan's grid for `name` (nothing to launch when axis 0 is empty)."""
    if plan.grids[name][0] > 0:
        kernel[plan.tuned.get(name, plan.grids[name])](*args, **meta)


def _states(plan, a, b, init, scale, causal, cu_seqlens, want_final, reverse):
    """Chunk states of (a, b) and the sequence total (float32, or None unless wanted / non-causal).

    Causal: the sequential pass; h: [NT, H, K, V] in a's dtype. Non-causal:
    partials then a reduce; the total [N, H, K, V] is the state every chunk reads.
    """
    B, T, H, K = a.shape
    V = b.shape[-1]
    meta = dict(H=H, K=K, V=V, BT=plan.BT, BK=plan.BK, BV=plan.BV, UPCAST=upcast_dots(a.dtype))
    if causal:
        h = empty(plan.NT, H, K, V, dtype=a.dtype, device=a.device)
        final = empty(plan.N, H, K, V, dtype=torch.float32, device=a.device) if want_final else None
        _launch(chunk_state_kernel, plan, "states", a, b, h, init, final, cu_seqlens, plan.offsets,
                scale, T, REVERSE=reverse, **meta)
        return h, final
    p = empty(plan.NT, H, K, V, dtype=torch.float32, device=a.device)
    total = empty(plan.N, H, K, V, dtype=torch.float32, device=a.device)
    _launch(chunk_partial_kernel, plan, "partials", a, b, p, cu_seqlens, plan.indices, scale, T, **meta)
    del meta["UPCAST"]
    _launch(chunk_reduce_kernel, plan, "reduce", p, init, total, cu_seqlens, plan.offsets, T, **meta)
    return total, total


def linear_attention_fwd(q, k, v, scale, causal, h0, output_final_state, cu_seqlens, chunk_size, plan=None):
    """q, k: [B, T, H, K], v: [B, T, H, V] contiguous, one dtype; h0: [N, H, K, V] fp32 or None.

    Returns o [B, T, H, V] in the input dtype and the final state (fp32) or None. `plan`: this call's
    launch_plan when the caller has it already (the autograd Function reuses it for the backward).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    plan = launch_plan(B, T, H, K, V, chunk_size, cu_seqlens, causal) if plan is None else plan
    h, ht = _states(plan, k, v, h0, 1.0, causal, cu_seqlens, output_final_state, False)
    o = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    _launch(chunk_o_kernel, plan, "o", q, k, v, h, o, cu_seqlens, plan.indices, scale, T,
            H=H, K=K, V=V, BT=plan.BT, BK=plan.BK, CAUSAL=causal, UPCAST=upcast_dots(q.dtype))
    if ht is None and output_final_state:   # T == 0 or no sequences: the state passes through
        ht = h0.clone() if h0 is not None else torch.zeros(plan.N, H, K, V, device=q.device)
    return o, (ht if output_final_state else None)


def linear_attention_bwd(q, k, v, do, scale, causal, h0, dht, cu_seqlens, chunk_size, need_dh0, plan=None):
    """Gradients (dq, dk, dv in the input dtype, dh0 fp32 or None); recomputes the chunk states."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    plan = launch_plan(B, T, H, K, V, chunk_size, cu_seqlens, causal) if plan is None else plan
    h, _ = _states(plan, k, v, h0, 1.0, causal, cu_seqlens, False, False)
    dh, dh0 = _states(plan, q, do, dht, scale, causal, cu_seqlens, need_dh0, True)
    dq, dk = empty(B, T, H, K, dtype=q.dtype, device=q.device), empty(B, T, H, K, dtype=k.dtype, device=q.device)
    dv = empty(B, T, H, V, dtype=v.dtype, device=q.device)
    meta = dict(H=H, K=K, V=V, BT=plan.BT, CAUSAL=causal, UPCAST=upcast_dots(q.dtype))
    _launch(chunk_dqk_kernel, plan, "dqk", q, k, v, do, h, dh, dq, dk, cu_seqlens, plan.indices, scale, T, **meta)
    _launch(chunk_dv_kernel, plan, "dv", q, k, do, dh, dv, cu_seqlens, plan.indices, scale, T, **meta)
    if need_dh0 and dh0 is None:
        dh0 = dht.clone() if dht is not None else torch.zeros(plan.N, H, K, V, device=q.device)
    return dq, dk, dv, (dh0 if need_dh0 else None)


class LinearAttentionFunction(torch.autograd.Function):
    """o, S_T = linear attention of (q, k, v, S_0); gradients for q, k, v and S_0 (through S_T too).

    Saved for backward: q, k, v, S_0 and the launch plan (with cu_seqlens, its [NT, 2] chunk indices);
    the chunk states are recomputed.
    """

    @staticmethod
    def forward(ctx, q, k, v, h0, scale, causal, output_final_state, cu_seqlens, chunk_size):
        B, T, H, K = q.shape
        plan = launch_plan(B, T, H, K, v.shape[-1], chunk_size, cu_seqlens, causal)
        o, ht = linear_attention_fwd(q, k, v, scale, causal, h0, output_final_state, cu_seqlens, chunk_size, plan)
        ctx.save_for_backward(q, k, v, h0, cu_seqlens)
        ctx.scale, ctx.causal, ctx.chunk_size, ctx.plan = scale, causal, chunk_size, plan
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, h0, cu_seqlens = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        need_dh0 = h0 is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dh0 = linear_attention_bwd(q, k, v, do, ctx.scale, ctx.causal, h0, dht, cu_seqlens,
                                               ctx.chunk_size, need_dh0, ctx.plan)
        return dq, dk, dv, dh0, None, None, None, None, None


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
    o = empty(B, H, V, dtype=out_dtype, device=q.device)
    if B * H > 0:
        linear_attention_step_kernel[check_grid((B * H, NV))](q, k, v, o, S, z, scale, eps, K=K, V=V, BK=BK, BV=BV)
    return o


# --------------------------------------------------------------------------- AOT descriptions
def _spec(name, kernel, configs, signature, constexprs):
    return KernelSpec(name=name, fn=unwrap(kernel), signature={**signature, **{n: "constexpr" for n in constexprs}},
                      constexprs=constexprs, configs=configs)


def _scan_specs(D: int, dt: str, causal: bool, varlen: bool = False):
    """The kernels of one causal / non-causal call at K = V = D with `dt` inputs, default chunk size."""
    x, f32 = f"*{dt}", "*fp32"
    _, BK, BV = launch_plan(1, 64, 1, D, D, 64)[:3]
    tiles = dict(H=4, K=D, V=D, BT=64, BK=BK, BV=BV)
    up = dict(UPCAST=False)   # compiled for a GPU: tiles go into tl.dot in their own dtype
    packed = dict(IS_VARLEN=varlen)
    seq = {"cu_seqlens": "*i64", "offsets": "*i64"}
    chunk = {"cu_seqlens": "*i64", "indices": "*i32", "scale": "fp32", "T": "i32"}
    tag = f"K={D},V={D},{dt}{',varlen' if varlen else ''}"
    mode = "causal" if causal else "noncausal"
    specs = []
    if causal:
        for reverse in (False, True):
            specs.append(_spec(f"linear_attention.{'dstates' if reverse else 'states'}[{tag}]", chunk_state_kernel,
                               STATE_CONFIGS,
                               {"a": x, "b": x, "h": x, "init": f32, "final": f32, **seq, "scale": "fp32", "T": "i32"},
                               {**tiles, "REVERSE": reverse, **up, "USE_INITIAL": True, "STORE_FINAL": True,
                                **packed}))
    else:
        specs.append(_spec(f"linear_attention.partials[{tag}]", chunk_partial_kernel, PARTIAL_CONFIGS,
                           {"a": x, "b": x, "p": f32, **chunk}, {**tiles, **up, **packed}))
        specs.append(_spec(f"linear_attention.reduce[{tag}]", chunk_reduce_kernel, REDUCE_CONFIGS,
                           {"p": f32, "init": f32, "out": f32, **seq, "T": "i32"},
                           {**tiles, "USE_INITIAL": True, **packed}))
    s = x if causal else f32   # chunk states are stored in the input dtype; the non-causal total in fp32
    specs.append(_spec(f"linear_attention.o[{tag},{mode}]", chunk_o_kernel, O_CONFIGS,
                       {"q": x, "k": x, "v": x, "h": s, "o": x, **chunk},
                       {**tiles, "CAUSAL": causal, **up, **packed}))
    specs.append(_spec(f"linear_attention.dqk[{tag},{mode}]", chunk_dqk_kernel, DQK_CONFIGS,
                       {"q": x, "k": x, "v": x, "do": x, "h": s, "dh": s, "dq": x, "dk": x, **chunk},
                       {**tiles, "CAUSAL": causal, **up, **packed}))
    specs.append(_spec(f"linear_attention.dv[{tag},{mode}]", chunk_dv_kernel, DV_CONFIGS,
                       {"q": x, "k": x, "do": x, "dh": s, "dv": x, **chunk},
                       {**tiles, "CAUSAL": causal, **up, **packed}))
    return specs


def compile_specs():
    """Every kernel at K = V = 64, 128, 256 (bf16), 128 (fp16) and 64 (fp32), causal; non-causal at 128 bf16;
    packed sequences (cu_seqlens) at 128 bf16, causal and not."""
    specs = []
    for D, dt in ((64, "bf16"), (128, "bf16"), (256, "bf16"), (128, "fp16"), (64, "fp32")):
        specs += _scan_specs(D, dt, True)
    specs += _scan_specs(128, "bf16", False)
    specs += _scan_specs(128, "bf16", True, varlen=True) + _scan_specs(128, "bf16", False, varlen=True)
    for D, normalize in ((64, False), (64, True), (128, False)):
        BK, BV = _step_tiles(D, D)
        c = dict(K=D, V=D, BK=BK, BV=BV, NORMALIZE=normalize)
        specs.append(_spec(f"linear_attention.step[K={D},V={D},bf16,{'normalize' if normalize else 'plain'}]",
                           linear_attention_step_kernel, STEP_CONFIGS,
                           {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "S": "*fp32", "z": "*fp32",
                            "scale": "fp32", "eps": "fp32"}, c))
    return specs
