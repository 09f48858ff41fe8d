"""The chunk pipeline of the Titans memory without momentum (every period, both reads), forward and backward.

Per token (DESIGN.md, "titans_scan"), no momentum: x_t = lr_t (v_t - k_t Sbar_t), S_t = d_t S_{t-1} + k_t^T x_t,
o_t = scale q_t S_t (read="current") or scale q_t Sbar_t (read="block_start").

Chunks. Tokens are cut into chunks of at most BT that never straddle a block: with period p <= BT a group of
G = p * (BT // p) tokens is one chunk (it holds whole blocks), with p > BT a group is one block (G = p) cut into
CPB = ceil(p / BT) chunks. Chunk c of a sequence starts at (c // CPB) G + (c % CPB) BT. Within a chunk with
start state h, cumulative log decays ld_i = log d_1 + .. + log d_i (token i included), and b(i) the chunk-local
start of i's block (0 where the block began in an earlier chunk), lb_i = ld_{b(i)-1} (0 where b(i) = 0):

    Sbar_i = exp(lb_i) Hs + sum_{j < b(i)} exp(lb_i - ld_j) k_j^T x_j,   Hs = the start state of the block's
                                                                        first chunk (h itself when CPB = 1)
    (I + A) x = lr (v - exp(lb) k Hs),   A_ij = lr_i (k_i . k_j) exp(lb_i - ld_j),  j < b(i)   (strictly lower)

so with the WY factors M = (I + A)^-1, w = M (lr exp(lb) k), u = M (lr v):   x = u - w Hs, and

    h_next = exp(ld_e) h + (k exp(ld_e - ld))^T x                        (e: the chunk's last token)
    o      = scale (exp(la) q Hr + ((q k^T) * Da) x),  Da_ij = exp(la_i - ld_j) on the read's mask:
             current: la = ld, Hr = h, j <= i;   block_start: la = lb, Hr = Hs, j < b(i).

Kernels: titans_wy_kernel (parallel over chunks x heads: A, M by a unit-lower-triangular inverse, w, u);
titans_chunk_state_kernel (the only sequential pass: one program per (sequence x head, V-tile) walks its chunks
with h and Hs in registers, writes every chunk-start state h and x); titans_chunk_out_kernel (parallel over
chunks x heads x V-tiles). Backward: the forward's WY and state kernels again (nothing but the inputs is saved),
then titans_chunk_state_bwd_kernel, one sequential reverse pass with the adjoint dh of h (and dHs of the block
start, flushed into dh at the block's first chunk) in registers:

    dx  = scale ((q k^T) * Da)^T do + (k exp(ld_e - ld)) dh_next
    dHs = -w^T dx  (+ scale (exp(lb) q)^T do for block_start)
    dh  = exp(ld_e) dh_next (+ scale (exp(ld) q)^T do for current) (+ the block's dHs at its first chunk)

writing dh_next of each chunk and dx; then titans_chunk_grad_kernel (parallel over chunks x heads, a loop over
V-tiles) forms dr = M^T dx, dA = -(dr x^T) on A's mask, and from them dq, dk, dv = lr dr, dlr and the gradient
of the cumulative log decays, whose reverse cumulative sum over the chunk is d log d_t (ddecay = that / d_t).
Every buffer beyond the inputs is per chunk state ([chunks, H, K, V], in the input dtype: those states only
feed dots, where they are cast to it anyway; the running states stay float32 in registers) or per token
([B, T, H, K or V]).

Grids put chunks x heads (or sequences x heads) on axis 0 (`launch_grids`, checked by `check_grid`). With
cu_seqlens the chunk table of the packed batch is built on the host (the one host sync, at the forward; the
backward reuses it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig
from ..triton_utils import (autotune, check_grid, empty, host_lengths, kernel_spec, load_tile, state_tile,
                            unit_lower_inverse, upcast_dots)

WY_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 1)) for w in (4, 8) for s in (1, 2)]
STATE_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 1))
                 for w in (4, 8) for s in (1, 2)]
STATE_BWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 1))
                     for w in (4, 8) for s in (1, 2)]
OUT_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (4, 1)) for w in (4, 8) for s in (1, 2)]
GRAD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=s, default=(w, s) == (8, 1)) for w in (4, 8) for s in (1, 2)]
MAX_BT = 32        # tokens per chunk (chunk_size, at most this)
STATE_BV = 32      # V-tile of the sequential passes: [K, 32] float32 states stay in registers at K = 128
OUT_BV = 64        # V-tile of the output kernel
LOOP_BV = 32       # V-tile of the loops inside the WY and gradient kernels (16 where K > 64: no spills)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# ----------------------------------------------------------------------------- layout
def chunk_layout(period: int, chunk_size: int):
    """(BT, G, CPB): chunk tile, tokens per group, chunks per group (see the module docstring)."""
    BT = min(chunk_size, MAX_BT)
    if period <= BT:
        return BT, period * (BT // period), 1
    return BT, period, triton.cdiv(period, BT)


def chunks_of(L, BT: int, G: int, CPB: int):
    """Chunks of a sequence of L tokens (an int, or a tensor of lengths)."""
    if isinstance(L, int):
        return (L // G) * CPB + triton.cdiv(L % G, BT)
    return torch.div(L, G, rounding_mode="floor") * CPB + torch.div(L % G + BT - 1, BT, rounding_mode="floor")


def chunk_table(cu_seqlens, BT: int, G: int, CPB: int):
    """(chunk_offsets [N + 1] int64 on the device, chunk_idx [NT, 2] int32 (sequence, chunk), NT) of a packed
    batch: the one host sync of the op (the grid needs NT), which a CUDA graph capture cannot make."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    n = chunks_of(lens, BT, G, CPB)
    offsets = torch.cat([n.new_zeros(1), n.cumsum(0)]).to(torch.int64)
    counts = host_lengths(n)
    NT = sum(counts)
    seq = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), n)
    within = torch.arange(NT, device=cu_seqlens.device) - offsets[:-1].repeat_interleave(n)
    return offsets, torch.stack([seq, within], 1).to(torch.int32).contiguous(), NT


def launch_grids(B: int, T: int, H: int, K: int, V: int, period: int, chunk_size: int, N: int = None,
                 NT: int = None):
    """Every launch grid of the pipeline by kernel name (the launchers use exactly these)."""
    BT, G, CPB = chunk_layout(period, chunk_size)
    N = B if N is None else N
    NT = B * chunks_of(T, BT, G, CPB) if NT is None else NT
    seq = (N * H, triton.cdiv(V, STATE_BV))
    return {"wy": (NT * H,), "state": seq, "out": (NT * H, triton.cdiv(V, OUT_BV)), "state_bwd": seq,
            "grad_out": (NT * H,), "grad_wy": (NT * H,)}


# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _chunk(i_c, T, G, CPB, NC, cu_seqlens, chunk_idx, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token as int64 flattened over B*T, tokens, position in its group) of the i_c-th chunk of the batch."""
    if IS_VARLEN:
        i_n = tl.load(chunk_idx + 2 * i_c)
        c = tl.load(chunk_idx + 2 * i_c + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        i_n, c = i_c // NC, i_c % NC
        bos = i_n.to(tl.int64) * T
        L = T
    cw = c % CPB
    t0 = (c // CPB) * G + cw * BT
    return bos + t0, tl.minimum(tl.minimum(G - cw * BT, L - t0), BT), cw


@triton.jit
def _sequence(i_n, T, G, CPB, NC, cu_seqlens, chunk_offsets, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token as int64, length, index of its first chunk, its chunk count) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
        boc = tl.load(chunk_offsets + i_n)
        nc = (tl.load(chunk_offsets + i_n + 1) - boc).to(tl.int32)
        return bos, L, boc, nc
    return i_n.to(tl.int64) * T, T, i_n.to(tl.int64) * NC, NC


@triton.jit
def _log_decays(decay, rows, m_t, o_t, period, HAS_DECAY: tl.constexpr):
    """(ld, lb, b, log d) of a chunk: cumulative log decays, lb_i = ld_{b(i)-1} (0 where b(i) = 0), block starts."""
    bl = (o_t // period) * period
    if HAS_DECAY:
        b_lg = tl.log(tl.load(decay + rows, mask=m_t, other=1.).to(tl.float32))
        b_ld = tl.cumsum(b_lg, 0)
        b_lb = tl.sum(tl.where(o_t[None, :] == bl[:, None] - 1, b_ld[None, :], 0.), 1)
    else:
        b_lg = tl.zeros(o_t.shape, dtype=tl.float32)
        b_ld = b_lg
        b_lb = b_lg
    return b_ld, b_lb, bl, b_lg


@triton.jit
def _last(x, n, o_t):
    """x[n - 1] of a [BT] vector."""
    return tl.sum(tl.where(o_t == n - 1, x, 0.), 0)


@triton.jit
def _read_mask(o_t, bl, READ_BLOCK: tl.constexpr):
    """[BT, BT] (i, j): j <= i (current read) or j < b(i) (block-start read)."""
    if READ_BLOCK:
        return o_t[None, :] < bl[:, None]
    return o_t[None, :] <= o_t[:, None]


# ----------------------------------------------------------------------------- forward
@autotune(WY_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY"])
@triton.jit
def titans_wy_kernel(k, v, lr, decay, Mi, w, u, cu_seqlens, chunk_idx, T, period, G, CPB, NC,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, HAS_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (chunk, head): M = (I + A)^-1 [BT, BT] float32, w = M (lr exp(lb) k), u = M (lr v)."""
    i_ch = tl.program_id(0)
    i_c, i_h = i_ch // H, i_ch % H
    t0, n, cw = _chunk(i_c, T, G, CPB, NC, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t, m_k = o_t < n, o_k < K
    rows = (t0 + o_t) * H + i_h
    b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
    dt = b_k.dtype
    b_lr = tl.load(lr + rows, mask=m_t, other=0.)
    b_ld, b_lb, bl, _ = _log_decays(decay, rows, m_t, o_t, period, HAS_DECAY)
    m_a = o_t[None, :] < bl[:, None]
    b_A = b_lr[:, None] * tl.dot(b_k, tl.trans(b_k)) * tl.exp(tl.where(m_a, b_lb[:, None] - b_ld[None, :],
                                                                          float("-inf")))
    b_M = unit_lower_inverse(b_A, BT)
    tl.store(Mi + i_ch.to(tl.int64) * BT * BT + o_t[:, None] * BT + o_t[None, :], b_M)
    b_Md = b_M.to(dt)
    b_w = tl.dot(b_Md, ((b_lr * tl.exp(b_lb))[:, None] * b_k).to(dt))
    tl.store(w + rows[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = load_tile(v + rows[:, None] * V + o_v[None, :], m_tv, UPCAST)
        b_u = tl.dot(b_Md, (b_lr[:, None] * b_v).to(dt))
        tl.store(u + rows[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m_tv)


@autotune(STATE_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY"])
@triton.jit
def titans_chunk_state_kernel(k, decay, w, u, x, h, h0, ht, cu_seqlens, chunk_offsets, T, period, G, CPB, NC,
                              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
                              USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (sequence x head, V-tile): h of every chunk into `h`, x = u - w Hs into `x`, S_T."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, boc, nc = _sequence(i_n, T, G, CPB, NC, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k, o_v, m_k, m_v, m_kv, off_kv, b_h = state_tile(h0, i_nh, i_v, K, V, BK, BV, USE_INITIAL_STATE)
    b_hs = b_h
    for c in range(0, nc):
        cw = c % CPB
        t0 = (c // CPB) * G + cw * BT
        n = tl.minimum(tl.minimum(G - cw * BT, L - t0), BT)
        m_t = o_t < n
        rows = (bos + t0 + o_t) * H + i_h
        tl.store(h + ((boc + c) * H + i_h) * K * V + off_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        b_hs = tl.where(cw == 0, b_h, b_hs)
        b_w = load_tile(w + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
        dt = b_w.dtype
        b_u = tl.load(u + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_x = b_u.to(tl.float32) - tl.dot(b_w, b_hs.to(dt))
        tl.store(x + rows[:, None] * V + o_v[None, :], b_x.to(x.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        b_ld, _, _, _ = _log_decays(decay, rows, m_t, o_t, period, HAS_DECAY)
        ld_e = _last(b_ld, n, o_t)
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_kd = (b_k.to(tl.float32) * tl.exp(ld_e - b_ld)[:, None]).to(dt)
        b_h = tl.exp(ld_e) * b_h + tl.dot(tl.trans(b_kd), b_x.to(dt))
    tl.store(ht + i_nh.to(tl.int64) * K * V + off_kv, b_h, mask=m_kv)


@autotune(OUT_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY", "READ_BLOCK"])
@triton.jit
def titans_chunk_out_kernel(q, k, decay, x, h, o, cu_seqlens, chunk_idx, scale, T, period, G, CPB, NC,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, HAS_DECAY: tl.constexpr, READ_BLOCK: tl.constexpr,
                            IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (chunk x head, V-tile): o = scale (exp(la) q Hr + ((q k^T) * Da) x)."""
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    t0, n, cw = _chunk(i_c, T, G, CPB, NC, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < n, o_k < K, o_v < V
    rows = (t0 + o_t) * H + i_h
    b_q = load_tile(q + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
    b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], UPCAST)
    b_x = load_tile(x + rows[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], UPCAST)
    dt = b_q.dtype
    b_ld, b_lb, bl, _ = _log_decays(decay, rows, m_t, o_t, period, HAS_DECAY)
    i_r = i_c - cw if READ_BLOCK else i_c
    b_la = b_lb if READ_BLOCK else b_ld
    b_hr = tl.load(h + (i_r.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                   mask=m_k[:, None] & m_v[None, :], other=0.)
    b_A = tl.dot(b_q, tl.trans(b_k)) * tl.exp(tl.where(_read_mask(o_t, bl, READ_BLOCK),
                                                       b_la[:, None] - b_ld[None, :], float("-inf")))
    b_o = tl.exp(b_la)[:, None] * tl.dot(b_q, b_hr.to(dt)) + tl.dot(b_A.to(dt), b_x)
    tl.store(o + rows[:, None] * V + o_v[None, :], (scale * b_o).to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------- backward
@autotune(STATE_BWD_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY", "READ_BLOCK"])
@triton.jit
def titans_chunk_state_bwd_kernel(q, k, lr, decay, Mi, w, do, dht, dr, dv, dhn, dh0, cu_seqlens, chunk_offsets,
                                  scale, T, period, G, CPB, NC, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
                                  READ_BLOCK: tl.constexpr, USE_FINAL_GRAD: tl.constexpr,
                                  IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (sequence x head, V-tile), chunks in reverse: dh_next of every chunk into `dhn`,
    dr = M^T dx (float32) into `dr`, dv = lr dr, dS_0 into `dh0`."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, boc, nc = _sequence(i_n, T, G, CPB, NC, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k, o_v, m_k, m_v, m_kv, off_kv, b_dh = state_tile(dht, i_nh, i_v, K, V, BK, BV, USE_FINAL_GRAD)
    b_dhs = tl.zeros([BK, BV], dtype=tl.float32)
    for c_rev in range(0, nc):
        c = nc - 1 - c_rev
        cw = c % CPB
        t0 = (c // CPB) * G + cw * BT
        n = tl.minimum(tl.minimum(G - cw * BT, L - t0), BT)
        m_t = o_t < n
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        rows = (bos + t0 + o_t) * H + i_h
        tl.store(dhn + ((boc + c) * H + i_h) * K * V + off_kv, b_dh.to(dhn.dtype.element_ty), mask=m_kv)
        b_q = load_tile(q + rows[:, None] * K + o_k[None, :], m_tk, UPCAST)
        b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_tk, UPCAST)
        b_w = load_tile(w + rows[:, None] * K + o_k[None, :], m_tk, UPCAST)
        b_do = load_tile(do + rows[:, None] * V + o_v[None, :], m_tv, UPCAST)
        dt = b_q.dtype
        b_ld, b_lb, bl, _ = _log_decays(decay, rows, m_t, o_t, period, HAS_DECAY)
        ld_e = _last(b_ld, n, o_t)
        b_la = b_lb if READ_BLOCK else b_ld
        # A^T[j, i] = (k_j . q_i) Da_ij
        b_At = tl.dot(b_k, tl.trans(b_q)) * tl.exp(tl.where(tl.trans(_read_mask(o_t, bl, READ_BLOCK)),
                                                            b_la[None, :] - b_ld[:, None], float("-inf")))
        b_kd = (b_k.to(tl.float32) * tl.exp(ld_e - b_ld)[:, None]).to(dt)
        b_dx = scale * tl.dot(b_At.to(dt), b_do) + tl.dot(b_kd, b_dh.to(dt))
        b_Mt = tl.load(Mi + (boc + c) * H * BT * BT + i_h * BT * BT + o_t[None, :] * BT + o_t[:, None])
        b_dr = tl.dot(b_Mt.to(dt), b_dx.to(dt))
        tl.store(dr + rows[:, None] * V + o_v[None, :], b_dr, mask=m_tv)
        b_lr = tl.load(lr + rows, mask=m_t, other=0.)
        tl.store(dv + rows[:, None] * V + o_v[None, :], (b_lr[:, None] * b_dr).to(dv.dtype.element_ty), mask=m_tv)
        b_qa = (scale * tl.exp(b_la)[:, None] * b_q.to(tl.float32)).to(dt)
        b_dhs -= tl.dot(tl.trans(b_w), b_dx.to(dt))
        b_dh = tl.exp(ld_e) * b_dh
        if READ_BLOCK:
            b_dhs += tl.dot(tl.trans(b_qa), b_do)
        else:
            b_dh += tl.dot(tl.trans(b_qa), b_do)
        b_dh = tl.where(cw == 0, b_dh + b_dhs, b_dh)
        b_dhs = tl.where(cw == 0, 0., b_dhs)
    tl.store(dh0 + i_nh.to(tl.int64) * K * V + off_kv, b_dh, mask=m_kv)


@autotune(GRAD_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY", "READ_BLOCK"])
@triton.jit
def titans_chunk_grad_out_kernel(q, k, decay, x, h, dhn, do, dq, dk, dld, dlb, cu_seqlens, chunk_idx, scale, T, period,
                                 G, CPB, NC, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                                 BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
                                 READ_BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (chunk, head), a loop over V-tiles: the gradients through o and h_next. Writes dq, the
    float32 part of dk and the gradients of ld (and of lb, block_start only) as far as they go."""
    i_ch = tl.program_id(0)
    i_c, i_h = i_ch // H, i_ch % H
    t0, n, cw = _chunk(i_c, T, G, CPB, NC, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t, m_k = o_t < n, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    rows = (t0 + o_t) * H + i_h
    b_q = load_tile(q + rows[:, None] * K + o_k[None, :], m_tk, UPCAST)
    b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_tk, UPCAST)
    dt = b_q.dtype
    b_ld, b_lb, bl, _ = _log_decays(decay, rows, m_t, o_t, period, HAS_DECAY)
    ld_e = _last(b_ld, n, o_t)
    b_la = b_lb if READ_BLOCK else b_ld
    p_h = h + ((i_c.to(tl.int64) * H + i_h) * K * V)
    p_hr = h + (((i_c - cw if READ_BLOCK else i_c).to(tl.int64) * H + i_h) * K * V)
    p_dhn = dhn + ((i_c.to(tl.int64) * H + i_h) * K * V)
    b_P = tl.zeros([BT, BT], dtype=tl.float32)       # do x^T
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)      # do Hr^T
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)     # x dh_next^T
    b_dla = tl.zeros([BT], dtype=tl.float32)         # rows of do * (q Hr)
    b_dle = tl.zeros([BV], dtype=tl.float32)         # columns of h * dh_next
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        off_kv = o_k[:, None] * V + o_v[None, :]
        b_do = load_tile(do + rows[:, None] * V + o_v[None, :], m_tv, UPCAST)
        b_x = load_tile(x + rows[:, None] * V + o_v[None, :], m_tv, UPCAST)
        b_hr = tl.load(p_hr + off_kv, mask=m_kv, other=0.).to(dt)
        b_dn = tl.load(p_dhn + off_kv, mask=m_kv, other=0.).to(tl.float32)
        b_P += tl.dot(b_do, tl.trans(b_x))
        b_dq += tl.dot(b_do, tl.trans(b_hr))
        b_dla += tl.sum(b_do.to(tl.float32) * tl.dot(b_q, b_hr), 1)
        b_dkd += tl.dot(b_x, tl.trans(b_dn.to(dt)))
        b_dle += tl.sum(tl.load(p_h + off_kv, mask=m_kv, other=0.).to(tl.float32) * b_dn, 0)
    b_ea = tl.exp(b_la)
    # o = scale (exp(la) q Hr + ((q k^T) * Da) x)
    b_PD = scale * b_P * tl.exp(tl.where(_read_mask(o_t, bl, READ_BLOCK), b_la[:, None] - b_ld[None, :],
                                         float("-inf")))
    b_dq = scale * b_ea[:, None] * b_dq + tl.dot(b_PD.to(dt), b_k)
    tl.store(dq + rows[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    b_W = b_PD * tl.dot(b_q, tl.trans(b_k))
    b_dla = scale * b_ea * b_dla + tl.sum(b_W, 1)
    b_dld = -tl.sum(b_W, 0)
    # h_next = exp(ld_e) h + (k exp(ld_e - ld))^T x
    b_g = tl.exp(ld_e - b_ld)
    b_dk = tl.dot(tl.trans(b_PD.to(dt)), b_q) + b_g[:, None] * b_dkd
    b_t = b_g * tl.sum(b_k.to(tl.float32) * b_dkd, 1)
    b_dld += tl.where(o_t == n - 1, tl.exp(ld_e) * tl.sum(b_dle, 0) + tl.sum(b_t, 0), 0.) - b_t
    tl.store(dk + rows[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
    if READ_BLOCK:
        tl.store(dld + rows, b_dld, mask=m_t)
        tl.store(dlb + rows, b_dla, mask=m_t)
    else:
        tl.store(dld + rows, b_dld + b_dla, mask=m_t)


@autotune(GRAD_CONFIGS, key=["H", "K", "V", "BT", "HAS_DECAY", "READ_BLOCK"])
@triton.jit
def titans_chunk_grad_wy_kernel(k, v, lr, decay, x, h, dr, dk_o, dld_o, dlb_o, dk, dlr, ddecay, cu_seqlens,
                                chunk_idx, T, period, G, CPB, NC, H: tl.constexpr, K: tl.constexpr,
                                V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                HAS_DECAY: tl.constexpr, READ_BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr,
                                UPCAST: tl.constexpr):
    """One program per (chunk, head), a loop over V-tiles: the gradients through (I + A) x = lr (v - exp(lb) k Hs)
    from dr = (I + A)^-T dx, added to the output kernel's parts: dk, dlr and ddecay."""
    i_ch = tl.program_id(0)
    i_c, i_h = i_ch // H, i_ch % H
    t0, n, cw = _chunk(i_c, T, G, CPB, NC, cu_seqlens, chunk_idx, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t, m_k = o_t < n, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    rows = (t0 + o_t) * H + i_h
    b_k = load_tile(k + rows[:, None] * K + o_k[None, :], m_tk, UPCAST)
    dt = b_k.dtype
    p_hs = h + (((i_c - cw).to(tl.int64) * H + i_h) * K * V)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)      # -(dr x^T)
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)     # dr Hs^T
    b_dlr = tl.zeros([BT], dtype=tl.float32)         # rows of dr * (v - exp(lb) k Hs)
    b_dlb = tl.zeros([BT], dtype=tl.float32)         # rows of dr * (k Hs)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_x = load_tile(x + rows[:, None] * V + o_v[None, :], m_tv, UPCAST)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_dr = tl.load(dr + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_hs = tl.load(p_hs + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & (o_v < V)[None, :],
                       other=0.).to(dt)
        b_ks = tl.dot(b_k, b_hs)
        b_dlr += tl.sum(b_dr * b_v, 1)
        b_dlb += tl.sum(b_dr * b_ks, 1)
        b_dks += tl.dot(b_dr.to(dt), tl.trans(b_hs))
        b_dA -= tl.dot(b_dr.to(dt), tl.trans(b_x))
    b_lr = tl.load(lr + rows, mask=m_t, other=0.)
    b_ld, b_lb, bl, b_lg = _log_decays(decay, rows, m_t, o_t, period, HAS_DECAY)
    b_elb = tl.exp(b_lb)
    b_dlr -= b_elb * b_dlb
    b_dlb = -b_lr * b_elb * b_dlb
    b_dk = tl.load(dk_o + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.) - (b_lr * b_elb)[:, None] * b_dks
    # A_ij = lr_i (k_i . k_j) exp(lb_i - ld_j), j < b(i)
    b_dAE = b_dA * tl.exp(tl.where(o_t[None, :] < bl[:, None], b_lb[:, None] - b_ld[None, :], float("-inf")))
    b_kk = tl.dot(b_k, tl.trans(b_k))
    b_dlr += tl.sum(b_dAE * b_kk, 1)
    b_B = b_lr[:, None] * b_dAE
    b_dk += tl.dot(b_B.to(dt), b_k) + tl.dot(tl.trans(b_B).to(dt), b_k)
    tl.store(dk + rows[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dlr + rows, b_dlr, mask=m_t)
    if HAS_DECAY:
        b_W = b_B * b_kk
        b_dlb += tl.sum(b_W, 1)
        if READ_BLOCK:
            b_dlb += tl.load(dlb_o + rows, mask=m_t, other=0.)
        b_dld = tl.load(dld_o + rows, mask=m_t, other=0.) - tl.sum(b_W, 0)
        # lb_i = ld_{b(i)-1}; then d log d_t = sum_{i >= t} dld_i
        b_dld += tl.sum(tl.where(bl[None, :] - 1 == o_t[:, None], b_dlb[None, :], 0.), 1)
        b_dlg = tl.sum(b_dld, 0) - tl.cumsum(b_dld, 0) + b_dld
        tl.store(ddecay + rows, b_dlg * tl.exp(-b_lg), mask=m_t)


# ----------------------------------------------------------------------------- launchers
def _chunks(q, period, chunk_size, table):
    """Chunks of the batch: from the packed table, else B x the chunks of a T-token sequence."""
    return table[2] if table[2] is not None else q.shape[0] * chunks_of(q.shape[1], *chunk_layout(period, chunk_size))


def _flags(q, v, decay, period, chunk_size, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, G, CPB = chunk_layout(period, chunk_size)
    return dict(H=H, K=K, V=V, BT=BT, BK=_block(K), HAS_DECAY=decay is not None, IS_VARLEN=cu_seqlens is not None,
                UPCAST=upcast_dots(q.dtype)), (T, period, G, CPB, chunks_of(T, BT, G, CPB))


def loop_bv(K: int, V: int) -> int:
    """V-tile of the loops inside the WY and gradient kernels."""
    return min(LOOP_BV if K <= 64 else LOOP_BV // 2, _block(V))


def _launch(kernel, grid, *args, **kw):
    grid = check_grid(grid)
    if all(grid):
        kernel[grid](*args, **kw)


def _states(q, k, v, lr, decay, h0, period, cu_seqlens, table, chunk_size):
    """The forward's WY and state passes: (M, w, x, h, S_T)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    offsets, idx, _ = table
    NT = _chunks(q, period, chunk_size, table)
    flags, ints = _flags(q, v, decay, period, chunk_size, cu_seqlens)
    grids = launch_grids(B, T, H, K, V, period, chunk_size, N, NT)
    BT = flags["BT"]
    Mi = empty(max(NT, 1), H, BT, BT, dtype=torch.float32, device=q.device)
    w = empty(B, T, H, K, dtype=q.dtype, device=q.device)
    u = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    x = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    h = empty(max(NT, 1), H, K, V, dtype=q.dtype, device=q.device)   # they feed dots in q's dtype
    ht = empty(N, H, K, V, dtype=torch.float32, device=q.device)
    _launch(titans_wy_kernel, grids["wy"], k, v, lr, decay, Mi, w, u, cu_seqlens, idx, *ints,
            **dict(flags, BV=loop_bv(K, V)))
    _launch(titans_chunk_state_kernel, grids["state"], k, decay, w, u, x, h, h0, ht, cu_seqlens, offsets, *ints,
            **dict(flags, BV=STATE_BV, USE_INITIAL_STATE=h0 is not None))
    return Mi, w, x, h, ht


def chunk_forward(q, k, v, lr, decay, h0, scale, period, cu_seqlens, table, chunk_size, read_block):
    """(o, S_T) of the pipeline."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    _, w, x, h, ht = _states(q, k, v, lr, decay, h0, period, cu_seqlens, table, chunk_size)
    flags, ints = _flags(q, v, decay, period, chunk_size, cu_seqlens)
    o = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    _launch(titans_chunk_out_kernel, launch_grids(B, T, H, K, V, period, chunk_size, N, table[2])["out"],
            q, k, decay, x, h, o, cu_seqlens, table[1], scale, *ints,
            **dict(flags, BV=OUT_BV, READ_BLOCK=read_block))
    return o, ht


def chunk_backward(q, k, v, lr, decay, h0, do, dht, scale, period, cu_seqlens, table, chunk_size, read_block):
    """(dq, dk, dv, dlr, ddecay, dS_0): the forward's states recomputed, one reverse pass, per-chunk gradients."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    Mi, w, x, h, _ = _states(q, k, v, lr, decay, h0, period, cu_seqlens, table, chunk_size)
    offsets, idx, _ = table
    NT = _chunks(q, period, chunk_size, table)
    flags, ints = _flags(q, v, decay, period, chunk_size, cu_seqlens)
    grids = launch_grids(B, T, H, K, V, period, chunk_size, N, NT)
    f32 = dict(dtype=torch.float32, device=q.device)
    dr = empty(B, T, H, V, **f32)
    dhn = empty(max(NT, 1), H, K, V, dtype=q.dtype, device=q.device)
    dh0 = empty(N, H, K, V, **f32)
    dv = empty(B, T, H, V, dtype=v.dtype, device=v.device)
    _launch(titans_chunk_state_bwd_kernel, grids["state_bwd"], q, k, lr, decay, Mi, w, do, dht, dr, dv, dhn, dh0,
            cu_seqlens, offsets, scale, *ints,
            **dict(flags, BV=STATE_BV, READ_BLOCK=read_block, USE_FINAL_GRAD=dht is not None))
    dq, dk = empty(B, T, H, K, dtype=q.dtype, device=q.device), empty(B, T, H, K, dtype=k.dtype, device=k.device)
    dk_o, dld_o = empty(B, T, H, K, **f32), empty(B, T, H, **f32)
    dlb_o = empty(B, T, H, **f32) if read_block else None
    dlr = empty(B, T, H, **f32)
    ddecay = empty(B, T, H, **f32) if decay is not None else None
    loop = dict(flags, BV=loop_bv(K, V), READ_BLOCK=read_block)
    _launch(titans_chunk_grad_out_kernel, grids["grad_out"], q, k, decay, x, h, dhn, do, dq, dk_o, dld_o, dlb_o,
            cu_seqlens, idx, scale, *ints, **loop)
    _launch(titans_chunk_grad_wy_kernel, grids["grad_wy"], k, v, lr, decay, x, h, dr, dk_o, dld_o, dlb_o, dk, dlr,
            ddecay, cu_seqlens, idx, *ints, **loop)
    return dq, dk, dv, dlr, ddecay, dh0


def sequence_table(cu_seqlens, period: int, chunk_size: int):
    """(chunk_offsets, chunk_idx, NT) for packed sequences, (None, None, None) otherwise (NT from the shape)."""
    if cu_seqlens is None:
        return None, None, None
    return chunk_table(cu_seqlens, *chunk_layout(period, chunk_size))


# ----------------------------------------------------------------------------- AOT compile specs
def compile_specs():
    """Every pipeline kernel at K = V = 64 and 128 in bf16 (both reads), fp16 packed and fp32 at 64. (fp32 at
    K = 128 runs, but its default configs of titans_chunk_state_bwd_kernel and titans_chunk_grad_out_kernel spill
    a few hundred bytes on sm_80: fp32 tiles take twice the registers.)"""
    specs = []
    ints = {"T": "i32", "period": "i32", "G": "i32", "CPB": "i32", "NC": "i32"}
    scaled = dict(ints, scale="fp32")
    for D, dt, decay, varlen, reads in ((64, "bf16", True, False, (False, True)), (64, "fp16", True, True, (False,)),
                                        (128, "bf16", True, False, (False, True)),
                                        (64, "fp32", False, False, (False,))):
        tag = f"K={D},V={D},{dt},{'decay' if decay else 'nodecay'}" + (",varlen" if varlen else "")
        flags = dict(H=4, K=D, V=D, BT=MAX_BT, BK=D, HAS_DECAY=decay, IS_VARLEN=varlen, UPCAST=False)
        drop = ({"decay", "ddecay"} if not decay else set()) | ({"cu_seqlens", "chunk_idx", "chunk_offsets"}
                                                                 if not varlen else set())

        def spec(name, kernel, configs, ptrs, scalars, absent=frozenset(), **kw):
            ptrs = {p: ("fp32" if d == "f" else "i32" if p == "chunk_idx" else "i64" if d == "i" else dt)
                    for p, d in ptrs.items()}
            specs.append(kernel_spec(f"titans.{name}[{tag}]", kernel, configs, ptrs, set(ptrs) - drop - absent, scalars,
                                     dict(flags, **kw)))

        spec("wy", titans_wy_kernel, WY_CONFIGS, dict(k="", v="", lr="f", decay="f", Mi="f", w="", u="",
                                                      cu_seqlens="i", chunk_idx="i"), ints, BV=loop_bv(D, D))
        spec("chunk_state", titans_chunk_state_kernel, STATE_CONFIGS,
             dict(k="", decay="f", w="", u="", x="", h="", h0="f", ht="f", cu_seqlens="i", chunk_offsets="i"),
             ints, BV=STATE_BV, USE_INITIAL_STATE=True)
        for rb in reads:
            read = "block_start" if rb else "current"
            spec(f"chunk_out,{read}", titans_chunk_out_kernel, OUT_CONFIGS,
                 dict(q="", k="", decay="f", x="", h="", o="", cu_seqlens="i", chunk_idx="i"), scaled, BV=OUT_BV,
                 READ_BLOCK=rb)
            spec(f"chunk_state_bwd,{read}", titans_chunk_state_bwd_kernel, STATE_BWD_CONFIGS,
                 dict(q="", k="", lr="f", decay="f", Mi="f", w="", do="", dht="f", dr="f", dv="", dhn="", dh0="f",
                      cu_seqlens="i", chunk_offsets="i"), scaled, BV=STATE_BV, READ_BLOCK=rb, USE_FINAL_GRAD=True)
            spec(f"chunk_grad_out,{read}", titans_chunk_grad_out_kernel, GRAD_CONFIGS,
                 dict(q="", k="", decay="f", x="", h="", dhn="", do="", dq="", dk="f", dld="f", dlb="f",
                      cu_seqlens="i", chunk_idx="i"), scaled, absent=set() if rb else {"dlb"}, BV=loop_bv(D, D),
                 READ_BLOCK=rb)
            spec(f"chunk_grad_wy,{read}", titans_chunk_grad_wy_kernel, GRAD_CONFIGS,
                 dict(k="", v="", lr="f", decay="f", x="", h="", dr="f", dk_o="f", dld_o="f", dlb_o="f", dk="",
                      dlr="f", ddecay="f", cu_seqlens="i", chunk_idx="i"), ints, absent=set() if rb else {"dlb_o"},
                 BV=loop_bv(D, D), READ_BLOCK=rb)
    return specs
