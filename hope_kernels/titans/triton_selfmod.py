"""The self-modifying Titans memory without momentum as two Triton kernels: one forward, one backward launch.

Math: hope_kernels/titans/selfmod.py (module docstring) and DESIGN.md ("titans_selfmod_scan"). Per block of
L <= period tokens (rows of a [BL, D] tile, BL = the padded block) with start memory Mbar [D, W], W = 3D + 2:

    r = u Mbar[:, :2D+2],  k = norm(r_k),  v = norm(r_v),  lr = c sigmoid(r_eta + b_lr),  ld = logsigmoid(r_a + b_d)
    E = v - k,  LD = cumsum(ld),  gamma = exp(LD),  C_ij = exp(LD_i - LD_j) (j <= i),  w_j = exp(LD_L - LD_j)
    X = lr (E Mbar)                                                   [BL, W]
    o = scale (gamma q Mbar[mem] + ((q k^T) * C) X[mem])
    M_end = gamma_L Mbar + (w k)^T X

ONLINE (mem_period=1, M_mem by the online rule inside each block; selfmod.py's module docstring): the M_mem
tiles take X[mem] = R Mbar[mem] with R = (I + lr' A')^-1 (lr' E') [BL, D], found by forward substitution over
the block's rows (_online_values); the backward takes dR = dX[mem] Mbar[mem]^T back through the same
triangular system (back substitution) to the keys, values, steps and log decays (_online_backward).

selfmod_fwd_kernel: one program per (batch x head) walks the blocks; the memory lives in an fp32 global
workspace (the final-state output) of [D, W] per program, read and written once per block in [D, BV]
column tiles of the [M_k], [M_v], [M_mem] blocks (BV = 16 up to D = 64, 32 above; the projections r by
row tiles of BV) and the two gate columns. Block n's keys and gates are read from the
tiles first, then each tile is read, updated and written back in place (barriers between the phases).

selfmod_bwd_kernel: one program per (batch x head). It replays the forward (no outputs) to the block-start
memories of blocks 0, S, 2S, ... (S = ceil(sqrt(#blocks))) kept in a workspace, then walks the segments in
reverse: a segment's block-start memories are recomputed from its checkpoint into S more slots, and its
blocks are differentiated last to first with the adjoint dM of the memory (fp32 workspace, the dM_0
output) updated in place, in [D, BV] column tiles (BV = 32; D = 16: 16). All of it is one flat sequence of
(NCK - 1) S + 2 #blocks - NCK steps (_step: which block, replay or backward, which slots), each one block's
replay or backward, and d lr_bias / d decay_bias are summed in their outputs:

    dX    = (w k) dM_end (+ (A^T do') on mem, A = (q k^T) * C, do' = scale do),   dY = lr dX,   dE = dY Mbar^T
    dlr   = rowsum(dX * Y),   G = X dM_end^T,  dk = w G + (P * C)^T q - dE,   dv = dE
    P     = do' X[mem]^T = ((do' Mbar[mem]^T) E^T) * lr^T,   dq = gamma (do' Mbar[mem]^T) + (P * C) k
    dLD   from gamma (o, gamma_L), C and w; d ld = reverse cumsum of dLD; dr through norm and the sigmoids
    du    = dr Mbar[:, :2D+2]^T
    dMbar = gamma_L dM_end + E^T dY (+ q^T (gamma do') on mem) (+ u^T dr on the first 2D + 2 columns)

Each of the backward's loops over tiles runs products of one orientation only, so that the compiler spreads
every product's large side over the warps: [BL, BV] ones (Y = E Mbar, dX, du_j), which contract over the
memory's D rows and take their [BL, D] factor (E, w k, dr) from a per-program fp32 scratch inside the loop, and
[D, *] ones (G^T, dE^T, dMbar, u^T dr), which contract over the block's rows or a tile's columns; lr Y and dY go
from one part to the next through the scratch.

Registers. A block's backward is seven parts, each a non-inlined call from the kernel's loop with the
registers to itself (_backward_part: PART 0 _block_backward, the keys, values and gates read from Mbar and
M_end's gate columns, or a replay step's _block_forward; 1 _block_backward_read, the read o to dq; 2
_block_backward_qk, A = (q k^T) * C to d LD; 3 _block_backward_y, Y and dX; 4 _block_backward_g, G and dE;
5 _block_backward_tail, dMbar, then the keys', values' and log decays' gradients; 6 _rows_backward, dr to du
and dMbar's first 2D + 2 columns); what one part leaves for the next waits in the scratch. Inlined, the parts'
index and address arithmetic was hoisted out of the kernel's loop and spilled; nested calls (a step function
calling the parts, parts chained at their ends) had every caller save its return address and live values to
local memory, since a callee may take all 255 registers. So the calls are flat and each part finds its step,
block, slots and the program's workspace slices from the one value it gets, `left`, the parts still to run,
and returns left - 1: the kernel keeps nothing across a call. With maxnreg = 255 in the configs (ptxas
otherwise caps a kernel with calls at 128 registers) no default config spills (sm_80 and sm_90, D = 64 and
128, bf16 and fp32, both rules).

Memory beyond inputs and outputs, per (batch x head) in the backward: (#checkpoints + S) [D, W] fp32 states
and a [BL, 15 BD + BL] fp32 scratch (E | w k | lr Y | dY | k | v | dk | G^T | dE^T | gamma q | the per-token
vectors | A^T, BD = D padded to a power of 2): 121 KB at D = 128 and BL = 16, 496 KB at BL = 64.
With ONLINE the scratch has one BD more (R). Momentum is not in these kernels (selfmod.py runs it on the torch
path).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig
from ..triton_utils import autotune, check_grid, empty, kernel_spec, load_tile, upcast_dots

# maxnreg: without it ptxas caps a kernel that calls non-inlined functions at 128 registers where the parts fit
# in fewer than 255 (D = 64), and spills; the grid is one program per (batch x head), so registers, not
# occupancy, are what the kernels need
FWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=1, default=w == 8, maxnreg=255) for w in (4, 8)]
BWD_CONFIGS = [KernelConfig({}, num_warps=w, num_stages=1, default=w == 8, maxnreg=255) for w in (4, 8)]
MAX_BLOCK = 64      # tokens per block (min(period, T)) the kernels take; longer blocks run the torch path
MAX_D = 128


def supported(D: int, T: int, period: int) -> bool:
    """Whether the kernels take this head size and block length."""
    return 1 <= D <= MAX_D and min(period, T) <= MAX_BLOCK


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def checkpoints(NB: int):
    """(S, NCK): blocks per segment and checkpoints of a sequence of NB blocks."""
    S = math.isqrt(NB - 1) + 1 if NB > 1 else 1
    return S, triton.cdiv(NB, S)


# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _copy(src, dst, N, LOAD: tl.constexpr, BLOCK: tl.constexpr):
    """dst[:N] = src[:N] (zeros unless LOAD)."""
    o = tl.arange(0, BLOCK)
    for i in range(0, tl.cdiv(N, BLOCK)):
        m = i * BLOCK + o < N
        x = tl.zeros([BLOCK], dtype=tl.float32)
        if LOAD:
            x = tl.load(src + i * BLOCK + o, mask=m, other=0.)
        tl.store(dst + i * BLOCK + o, x, mask=m)


@triton.jit
def _sub(row0, col0, o_r, m_r, o_c, m_c, W: tl.constexpr):
    """Offsets and mask of rows row0 + o_r, columns col0 + o_c of a [D, W] memory."""
    return (row0 + o_r)[:, None] * W + col0 + o_c[None, :], m_r[:, None] & m_c[None, :]


@triton.jit
def _col_offsets(rows, m_t, c0, o_v, D: tl.constexpr):
    """(offsets, mask) of columns c0 + o_v of the block's tokens of a [B, T, H, D] tensor."""
    m_v = c0 + o_v < D
    return rows[:, None] * D + c0 + o_v[None, :], m_t[:, None] & m_v[None, :]


@triton.jit
def _cols(x, rows, m_t, c0, o_v, D: tl.constexpr, UPCAST: tl.constexpr):
    """(offsets, mask, tile) of columns c0 + o_v of the block's tokens of x [B, T, H, D]."""
    off, m = _col_offsets(rows, m_t, c0, o_v, D)
    return off, m, load_tile(x + off, m, UPCAST)


@triton.jit
def _tokens(x, n, i_b, i_h, period, T, o_t, o_d, m_d, H: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """(rows, [BL] mask, [BL, BD] mask, tile of x) of block n's tokens; rows index [B, T, H] flattened."""
    t0 = n * period
    m_t = (o_t < period) & (t0 + o_t < T)
    rows = (i_b.to(tl.int64) * T + t0 + o_t) * H + i_h
    m = m_t[:, None] & m_d[None, :]
    return rows, m_t, m, load_tile(x + rows[:, None] * D + o_d[None, :], m, UPCAST)


@triton.jit
def _project(src, u, rows, b_u, b_lrb, b_db, lr_c, eps, m_t, o_d, m_d, D: tl.constexpr, W: tl.constexpr,
             BD: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    """The block's keys, values and gates from its start memory `src`, r = u Mbar summed over row tiles of BV:
    (k, v, nk, nv, E = v - k, lr, sigmoid of the step's logit, ld = log decay, sigmoid of the decay's logit)."""
    dt = b_u.dtype
    o_v = tl.arange(0, BV)
    r_k = tl.zeros([b_u.shape[0], BD], dtype=tl.float32)
    r_v = tl.zeros([b_u.shape[0], BD], dtype=tl.float32)
    for j in range(0, BD // BV):
        b_uj = _cols(u, rows, m_t, j * BV, o_v, D, UPCAST)[2]
        m_r = j * BV + o_v < D
        p, m = _sub(j * BV, 0, o_v, m_r, o_d, m_d, W)
        r_k += tl.dot(b_uj, tl.load(src + p, mask=m, other=0.).to(dt))
        p, m = _sub(j * BV, D, o_v, m_r, o_d, m_d, W)
        r_v += tl.dot(b_uj, tl.load(src + p, mask=m, other=0.).to(dt))
    uf = b_u.to(tl.float32)
    r_e = tl.sum(uf * tl.load(src + o_d * W + 2 * D, mask=m_d, other=0.)[None, :], 1)
    r_a = tl.sum(uf * tl.load(src + o_d * W + 2 * D + 1, mask=m_d, other=0.)[None, :], 1)
    nk = tl.rsqrt(tl.sum(r_k * r_k, 1) + eps)
    nv = tl.rsqrt(tl.sum(r_v * r_v, 1) + eps)
    b_k = r_k * nk[:, None]
    b_v = r_v * nv[:, None]
    s_e = tl.sigmoid(r_e + b_lrb)
    b_lr = tl.where(m_t, lr_c * s_e, 0.)
    z_a = r_a + b_db
    s_a = tl.sigmoid(z_a)
    b_ld = tl.where(m_t, tl.minimum(z_a, 0.) - tl.log(1. + tl.exp(-tl.abs(z_a))), 0.)
    return b_k, b_v, nk, nv, b_v - b_k, b_lr, s_e, b_ld, s_a


@triton.jit
def _decays(b_ld, o_t):
    """(gamma, C [BL, BL] causal, w, gamma_L) from the block's log decays (zero on padded rows)."""
    LD = tl.cumsum(b_ld, 0)
    LDL = tl.sum(b_ld, 0)
    b_C = tl.exp(tl.where(o_t[None, :] <= o_t[:, None], LD[:, None] - LD[None, :], float("-inf")))
    return tl.exp(LD), b_C, tl.exp(LDL - LD), tl.exp(LDL)


@triton.jit
def _online_factors(b_k, b_v, b_lr, b_ld, o_t, period, dt):
    """M_mem's online rule in a block (mem_period=1): (lr' = period lr, gp_t = exp(LD_t - ld_t) the decay before
    token t, E' = v - gp k, e_tj = exp(LD_t - ld_t - LD_j) on j < t, A' = (k k^T) * e)."""
    LD = tl.cumsum(b_ld, 0)
    b_gp = tl.exp(LD - b_ld)
    b_e = tl.exp(tl.where(o_t[None, :] < o_t[:, None], (LD - b_ld)[:, None] - LD[None, :], float("-inf")))
    b_kd = b_k.to(dt)
    return period * b_lr, b_gp, b_v - b_gp[:, None] * b_k, b_e, tl.dot(b_kd, tl.trans(b_kd)) * b_e


@triton.jit
def _online_values(b_k, b_v, b_lr, b_ld, o_t, L, period, dt):
    """R = (I + lr' A')^-1 (lr' E') [BL, BD] fp32 by forward substitution over the block's L rows: M_mem's
    online rule makes X[mem] = R Mbar[mem] (where the block rule has lr E Mbar[mem])."""
    lrp, b_gp, b_Ep, b_e, b_Ap = _online_factors(b_k, b_v, b_lr, b_ld, o_t, period, dt)
    b_Lm = lrp[:, None] * b_Ap
    b_R = lrp[:, None] * b_Ep
    for i in range(1, L):
        l_i = tl.sum(tl.where(o_t[:, None] == i, b_Lm, 0.), 0)
        b_R = tl.where(o_t[:, None] == i, b_R - tl.sum(l_i[:, None] * b_R, 0)[None, :], b_R)
    return b_R


@triton.jit
def _online_backward(b_dR, b_R, b_k, b_v, b_lr, b_ld, o_t, L, period, dt):
    """R's gradient to the block's keys, values, step and log decays: (dk, dv, d lr, d LD, d ld), the last
    the direct part (added after d LD's reverse cumsum). dF = (I + Lm)^-T dR by back substitution; then
    dLm = -dF R^T on j < t, Lm = lr' A', lr' E' = F and A' = (k k^T) * e, E' = v - gp k."""
    lrp, b_gp, b_Ep, b_e, b_Ap = _online_factors(b_k, b_v, b_lr, b_ld, o_t, period, dt)
    b_Lm = lrp[:, None] * b_Ap
    b_dF = b_dR
    for j in range(0, L - 1):
        i = L - 2 - j
        c_i = tl.sum(tl.where(o_t[None, :] == i, b_Lm, 0.), 1)
        b_dF = tl.where(o_t[:, None] == i, b_dF - tl.sum(c_i[:, None] * b_dF, 0)[None, :], b_dF)
    b_dLm = tl.where(o_t[None, :] < o_t[:, None], -tl.dot(b_dF.to(dt), tl.trans(b_R.to(dt))), 0.)
    b_dlrp = tl.sum(b_dF * b_Ep, 1) + tl.sum(b_dLm * b_Ap, 1)
    b_dEp = lrp[:, None] * b_dF
    b_Q = lrp[:, None] * b_dLm
    b_Z = b_Q * b_Ap
    b_Q = b_Q * b_e
    b_kd = b_k.to(dt)
    b_dk = tl.dot(b_Q.to(dt), b_kd) + tl.dot(tl.trans(b_Q).to(dt), b_kd) - b_gp[:, None] * b_dEp
    b_dgp = -tl.sum(b_dEp * b_k, 1) * b_gp
    b_zr = tl.sum(b_Z, 1)
    return b_dk, b_dEp, period * b_dlrp, b_zr - tl.sum(b_Z, 0) + b_dgp, -b_zr - b_dgp


@triton.jit
def _scr(scr, c0, o_t, o_c, SW: tl.constexpr):
    """Pointers to columns c0 + o_c of the block's rows in the program's scratch (rows of SW floats)."""
    return scr + o_t[:, None] * SW + c0 + o_c[None, :]


@triton.jit
def _scr_t(scr, c0, o_t, o_c, SW: tl.constexpr):
    """Pointers [len(o_c), BL] to the same scratch columns as _scr, transposed."""
    return scr + o_t[None, :] * SW + c0 + o_c[:, None]


@triton.jit
def _dos(do, rows, m_t, c0, o_v, scale, dt, D: tl.constexpr, UPCAST: tl.constexpr):
    """do' = scale do on columns c0 + o_v of the block's tokens (rows where m_t), in the dots' dtype."""
    return (scale * _cols(do, rows, m_t, c0, o_v, D, UPCAST)[2].to(tl.float32)).to(dt)


@triton.jit
def _tile(t, o_d, m_d, o_v, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    """(offsets, mask, is mem) of column tile t of a [D, W] memory: BD // BV tiles each of M_k, M_v, M_mem."""
    c, s = t // (BD // BV), t % (BD // BV)
    p, m = _sub(0, c * D + 2 * (c // 2) + s * BV, o_d, m_d, o_v, s * BV + o_v < D, W)
    return p, m, c == 2


@triton.jit
def _block_forward(src, dst, q, u, o, lr_bias, decay_bias, n, T, period, scale, lr_c, eps,
                   H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                   BL: tl.constexpr, WRITE_O: tl.constexpr, ONLINE: tl.constexpr, UPCAST: tl.constexpr):
    """Block n from its start memory `src` [D, W] to its end memory `dst` (may be `src`), in [D, BV] column
    tiles; o when WRITE_O; M_mem by the online rule (X[mem] = R Mbar[mem]) when ONLINE."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BL)
    o_d = tl.arange(0, BD)
    o_v = tl.arange(0, BV)
    m_d = o_d < D
    rows, m_t, m_td, b_u = _tokens(u, n, i_b, i_h, period, T, o_t, o_d, m_d, H, D, UPCAST)
    dt = b_u.dtype
    b_k, b_v, nk, nv, b_E, b_lr, s_e, b_ld, s_a = _project(src, u, rows, b_u, tl.load(lr_bias + i_h),
                                                           tl.load(decay_bias + i_h), lr_c, eps, m_t, o_d, m_d, D,
                                                           W, BD, BV, UPCAST)
    b_g, b_C, b_w, gL = _decays(b_ld, o_t)
    b_wk = (b_w[:, None] * b_k).to(dt)
    b_Ed = b_E.to(dt)
    if ONLINE:
        b_Rd = _online_values(b_k, b_v, b_lr, b_ld, o_t, tl.sum(m_t.to(tl.int32), 0), period, dt).to(dt)
    if WRITE_O:
        b_q = _tokens(q, n, i_b, i_h, period, T, o_t, o_d, m_d, H, D, UPCAST)[3]
        b_A = (tl.dot(b_q, tl.trans(b_k.to(dt))) * b_C).to(dt)
    tl.debug_barrier()
    for t in range(0, 3 * (BD // BV)):
        p, m, is_mem = _tile(t, o_d, m_d, o_v, D, W, BD, BV)
        b_M = tl.load(src + p, mask=m, other=0.)
        if ONLINE:
            b_X = tl.where(is_mem, 1., b_lr)[:, None] * tl.dot(tl.where(is_mem, b_Rd, b_Ed), b_M.to(dt))
        else:
            b_X = b_lr[:, None] * tl.dot(b_Ed, b_M.to(dt))
        b_end = gL * b_M + tl.dot(tl.trans(b_wk), b_X.to(dt))
        if WRITE_O:
            if is_mem:
                b_o = b_g[:, None] * tl.dot(b_q, b_M.to(dt)) + tl.dot(b_A, b_X.to(dt))
                po, mo = _col_offsets(rows, m_t, (t % (BD // BV)) * BV, o_v, D)
                tl.store(o + po, (scale * b_o).to(o.dtype.element_ty), mask=mo)
        tl.debug_barrier()
        tl.store(dst + p, b_end, mask=m)
    for c in tl.static_range(2):
        p = o_d * W + 2 * D + c
        b_m = tl.load(src + p, mask=m_d, other=0.)
        b_x = b_lr * tl.sum(b_E * b_m[None, :], 1)
        b_end = gL * b_m + tl.sum(b_wk.to(tl.float32) * b_x[:, None], 0)
        tl.debug_barrier()
        tl.store(dst + p, b_end, mask=m_d)
    tl.debug_barrier()


@triton.jit
def _rows_backward(src, dM0, scr0, u, du, n, T, period, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                   BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, ONLINE: tl.constexpr, UPCAST: tl.constexpr):
    """The last part of a block's backward: r = u Mbar[:, :2D + 2] differentiated by row tiles j of BV, from
    dr_k | dr_v | d r_eta | d r_a in the scratch (rows of SW floats): dMbar[j, :2D + 2] += u_j^T dr,
    du_j = dr Mbar[j, :2D + 2]^T."""
    SW: tl.constexpr = (15 + ONLINE) * BD + BL
    dM, scr, o_t, o_d, o_v, m_d, m_t, rows, vec = _handed_over(dM0, scr0, n, T, period, H, D, W, BD, BV, BL, SW)
    for j in range(0, BD // BV):
        m_r = j * BV + o_v < D
        pu, mu, b_uj = _cols(u, rows, m_t, j * BV, o_v, D, UPCAST)
        b_duj = tl.zeros([BL, BV], dtype=tl.float32)
        for c in range(0, 2):
            b_dr = tl.load(_scr(scr, (2 + c) * BD, o_t, o_d, SW)).to(b_uj.dtype)
            pj, mj = _sub(j * BV, c * D, o_v, m_r, o_d, m_d, W)
            b_acc = tl.dot(tl.trans(b_uj), b_dr, acc=tl.load(dM + pj, mask=mj, other=0.))
            b_duj += tl.dot(b_dr, tl.trans(tl.load(src + pj, mask=mj, other=0.).to(b_uj.dtype)))
            tl.debug_barrier()
            tl.store(dM + pj, b_acc, mask=mj)
        for c in tl.static_range(2):
            b_dz = tl.load(scr + o_t * SW + 4 * BD + c)
            pgj = (j * BV + o_v) * W + 2 * D + c
            b_duj += b_dz[:, None] * tl.load(src + pgj, mask=m_r, other=0.)[None, :]
            b_acc = tl.load(dM + pgj, mask=m_r, other=0.) + tl.sum(b_uj.to(tl.float32) * b_dz[:, None], 0)
            tl.debug_barrier()
            tl.store(dM + pgj, b_acc, mask=m_r)
        tl.store(du + pu, b_duj.to(du.dtype.element_ty), mask=mu)
    tl.debug_barrier()


@triton.jit
def _block_backward(src, dM0, scr0, u, lr_bias, decay_bias, n, T, period, lr_c, eps, H: tl.constexpr,
                    D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr,
                    ONLINE: tl.constexpr, UPCAST: tl.constexpr):
    """The first part of block n's backward, from its start memory `src`: the keys, values, steps and decays read
    from it, and M_end's two gate columns. The program's dM (in dM0) holds dM_end and becomes dMbar over the
    parts; the program's slices of dM0 and scr0 are found from the program id here, as in every part.

    Every part's loops keep one orientation of products: [BL, *] ones contract over the memory's rows and take
    their [BL, D] factor (E, w k, dr) from the scratch `scr` inside the loop (module docstring; dr_k | dr_v |
    d r_eta, d r_a go over lr Y once it is spent; with ONLINE a last BD holds R, whose tiles X[mem] = R Mbar[mem]
    stage X and dX in place of lr Y and dY), [D, *] ones contract over the block's rows or a tile's columns."""
    SW: tl.constexpr = (15 + ONLINE) * BD + BL
    dM, scr, o_t, o_d, o_v, m_d, m_t, rows, vec = _handed_over(dM0, scr0, n, T, period, H, D, W, BD, BV, BL, SW)
    i_h = tl.program_id(0) % H
    b_u = _tokens(u, n, tl.program_id(0) // H, i_h, period, T, o_t, o_d, m_d, H, D, UPCAST)[3]
    dt = b_u.dtype
    b_k, b_v, nk, nv, b_E, b_lr, s_e, b_ld, s_a = _project(src, u, rows, b_u, tl.load(lr_bias + i_h),
                                                           tl.load(decay_bias + i_h), lr_c, eps, m_t, o_d, m_d, D,
                                                           W, BD, BV, UPCAST)
    b_w, gL = _decays(b_ld, o_t)[2:]
    b_wkf = (b_w[:, None] * b_k).to(dt).to(tl.float32)
    tl.store(_scr(scr, 0, o_t, o_d, SW), b_E)
    tl.store(_scr(scr, BD, o_t, o_d, SW), b_wkf)
    tl.store(_scr(scr, 8 * BD, o_t, o_d, SW), b_k)   # k, v (and dk below) wait in the scratch while the loops run
    tl.store(_scr(scr, 9 * BD, o_t, o_d, SW), b_v)
    if ONLINE:
        tl.store(_scr(scr, 15 * BD + BL, o_t, o_d, SW),
                 _online_values(b_k, b_v, b_lr, b_ld, o_t, tl.sum(m_t.to(tl.int32), 0), period, dt).to(dt)
                 .to(tl.float32))
    # the end memory M_end = gamma_L Mbar + (w k)^T X, X = lr Y, Y = E Mbar: its two gate columns first (vector
    # products); G = X dM_end^T and dE = dY Mbar^T are summed transposed, [D, BL]
    b_Gt = tl.zeros([BD, BL], dtype=tl.float32)
    b_dEt = tl.zeros([BD, BL], dtype=tl.float32)
    b_dlr = tl.zeros([BL], dtype=tl.float32)
    dgL = 0.
    tl.debug_barrier()
    for c in tl.static_range(2):
        pg = o_d * W + 2 * D + c
        b_m = tl.load(src + pg, mask=m_d, other=0.)
        b_dn = tl.load(dM + pg, mask=m_d, other=0.)
        b_E = tl.load(_scr(scr, 0, o_t, o_d, SW))
        b_y = tl.sum(b_E * b_m[None, :], 1)
        b_dx = tl.sum(tl.load(_scr(scr, BD, o_t, o_d, SW)) * b_dn[None, :], 1)
        b_Gt += b_dn[:, None] * (b_lr * b_y)[None, :]
        dgL += tl.sum(b_dn * b_m, 0)
        b_dlr += b_dx * b_y
        b_dy = b_lr * b_dx
        b_dEt += b_m[:, None] * b_dy[None, :]
        tl.debug_barrier()
        tl.store(dM + pg, gL * b_dn + tl.sum(b_E * b_dy[:, None], 0), mask=m_d)
    tl.debug_barrier()
    # what the next parts need waits in the scratch: G^T and dE^T so far, the per-token vectors
    tl.store(_scr_t(scr, 11 * BD, o_t, o_d, SW), b_Gt)
    tl.store(_scr_t(scr, 12 * BD, o_t, o_d, SW), b_dEt)
    tl.store(vec, b_lr)
    tl.store(vec + 1, b_ld)
    tl.store(vec + 2, nk)
    tl.store(vec + 3, nv)
    tl.store(vec + 4, s_e)
    tl.store(vec + 5, s_a)
    tl.store(vec + 6, b_w)
    tl.store(vec + 7, b_dlr)
    tl.store(vec + 9, tl.zeros([BL], dtype=tl.float32) + dgL)
    tl.debug_barrier()


@triton.jit
def _block_backward_read(src, dM0, scr0, q, do, dq, n, T, period, scale, H: tl.constexpr, D: tl.constexpr,
                         W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, ONLINE: tl.constexpr,
                         UPCAST: tl.constexpr):
    """The second part of a block's backward: the read o = scale (gamma q Mbar[mem] + A X[mem]) to dq, to the
    keys' part (P * C)^T q and to d gamma; gamma q for the later parts."""
    NS: tl.constexpr = BD // BV
    SW: tl.constexpr = (15 + ONLINE) * BD + BL
    dM, scr, o_t, o_d, o_v, m_d, m_t, rows, vec = _handed_over(dM0, scr0, n, T, period, H, D, W, BD, BV, BL, SW)
    dt = q.dtype.element_ty
    if UPCAST:
        dt = tl.float32
    # the read o: do' Mbar[mem]^T over the mem tiles; P = do' X[mem]^T = (do' Mbar[mem]^T E^T) lr and the rows of
    # do' * (q Mbar[mem]) = rows of q * (do' Mbar[mem]^T)
    mem = 2 * D + 2
    b_dqr = tl.zeros([BL, BD], dtype=tl.float32)
    for s in range(0, NS):
        p, m = _sub(0, mem + s * BV, o_d, m_d, o_v, s * BV + o_v < D, W)
        b_Md = tl.load(src + p, mask=m, other=0.).to(dt)
        b_dqr += tl.dot(_dos(do, rows, m_t, s * BV, o_v, scale, dt, D, UPCAST), tl.trans(b_Md))
    i_bh = tl.program_id(0)
    b_q = _tokens(q, n, i_bh // H, i_bh % H, period, T, o_t, o_d, m_d, H, D, UPCAST)[3]
    m_td = m_t[:, None] & m_d[None, :]
    b_lr = tl.load(vec)
    b_g, b_C, b_w, gL = _decays(tl.load(vec + 1), o_t)
    b_kd = tl.load(_scr(scr, 8 * BD, o_t, o_d, SW)).to(dt)
    tl.store(_scr(scr, 13 * BD, o_t, o_d, SW), (b_g[:, None] * b_q.to(tl.float32)).to(dt).to(tl.float32))
    if ONLINE:
        tl.debug_barrier()
        b_P = tl.dot(b_dqr.to(dt), tl.trans(tl.load(_scr(scr, 15 * BD + BL, o_t, o_d, SW)).to(dt)))
    else:
        b_P = tl.dot(b_dqr.to(dt), tl.trans(tl.load(_scr(scr, 0, o_t, o_d, SW)).to(dt))) * b_lr[None, :]
    b_dg = tl.sum(b_q.to(tl.float32) * b_dqr, 1)
    b_PC = (b_P * b_C).to(dt)
    b_dq = b_g[:, None] * b_dqr + tl.dot(b_PC, b_kd)
    tl.store(dq + rows[:, None] * D + o_d[None, :], b_dq.to(dq.dtype.element_ty), mask=m_td)
    tl.store(_scr(scr, 10 * BD, o_t, o_d, SW), tl.dot(tl.trans(b_PC), b_q))
    tl.debug_barrier()
    tl.store(_scr(scr, 15 * BD, o_t, o_t, SW), b_P)     # for _block_backward_qk, which puts A^T here
    tl.store(vec + 8, b_g * b_dg)
    tl.debug_barrier()


@triton.jit
def _block_backward_qk(dM0, scr0, q, n, T, period, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                       BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, ONLINE: tl.constexpr,
                       UPCAST: tl.constexpr):
    """The third part of a block's backward: the read's A = (q k^T) * C to d LD (through C, with P from
    _block_backward_read) and A^T for the later parts."""
    SW: tl.constexpr = (15 + ONLINE) * BD + BL
    dM, scr, o_t, o_d, o_v, m_d, m_t, rows, vec = _handed_over(dM0, scr0, n, T, period, H, D, W, BD, BV, BL, SW)
    i_bh = tl.program_id(0)
    b_q = _tokens(q, n, i_bh // H, i_bh % H, period, T, o_t, o_d, m_d, H, D, UPCAST)[3]
    b_C = _decays(tl.load(vec + 1), o_t)[1]
    b_QK = tl.dot(b_q, tl.trans(tl.load(_scr(scr, 8 * BD, o_t, o_d, SW)).to(b_q.dtype)))
    b_dC = b_QK * tl.load(_scr(scr, 15 * BD, o_t, o_t, SW)) * b_C
    b_dLD = tl.load(vec + 8) + tl.sum(b_dC, 1) - tl.sum(b_dC, 0)
    b_At = tl.trans((b_QK * b_C).to(b_q.dtype))
    tl.debug_barrier()
    tl.store(_scr(scr, 15 * BD, o_t, o_t, SW), b_At.to(tl.float32))
    tl.store(vec + 8, b_dLD)
    tl.debug_barrier()


@triton.jit
def _handed_over(dM0, scr0, n, T, period, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr,
                 BV: tl.constexpr, BL: tl.constexpr, SW: tl.constexpr):
    """What every part of a block's backward finds from the program id and the block number: the
    program's dM and scratch, the index ranges and masks, the block's rows and the scratch's per-token vectors
    (column c of them at vec + c: lr, ld, nk, nv, sigmoid of the step's logit, of the decay's, w, d lr, d LD, dgL)."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    scr = scr0 + i_bh.to(tl.int64) * BL * SW
    o_t = tl.arange(0, BL)
    o_d = tl.arange(0, BD)
    t0 = n * period
    return (dM0 + i_bh.to(tl.int64) * D * W, scr, o_t, o_d, tl.arange(0, BV), o_d < D,
            (o_t < period) & (t0 + o_t < T), (i_b.to(tl.int64) * T + t0 + o_t) * H + i_h, scr + o_t * SW + 14 * BD)


@triton.jit
def _block_backward_y(src, dM0, scr0, q, do, n, T, period, scale, H: tl.constexpr, D: tl.constexpr,
                      W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, ONLINE: tl.constexpr,
                      UPCAST: tl.constexpr):
    """The fourth part of a block's backward, from what the first three left in the scratch: Y and dX over the
    tiles, staged as lr Y and dY, and d lr."""
    NS: tl.constexpr = BD // BV
    SW: tl.constexpr = (15 + ONLINE) * BD + BL
    dM, scr, o_t, o_d, o_v, m_d, m_t, rows, vec = _handed_over(dM0, scr0, n, T, period, H, D, W, BD, BV, BL, SW)
    dt = q.dtype.element_ty
    if UPCAST:
        dt = tl.float32
    b_lr = tl.load(vec)
    b_dlr = tl.load(vec + 7)
    b_At = tl.load(_scr(scr, 15 * BD, o_t, o_t, SW)).to(dt)
    # then M_end's column tiles t (on mem, dX and dMbar get the read's A^T do' and q^T (gamma do')). First Y and
    # dX = (w k) dM_end (+ A^T do'), staged as lr Y and dY = lr dX ...
    for t in range(0, 3 * NS):
        p, m, is_mem = _tile(t, o_d, m_d, o_v, D, W, BD, BV)
        if ONLINE:  # the mem tiles' left factor is R and their X = Y
            b_Y = tl.dot(tl.load(_scr(scr, tl.where(is_mem, 15 * BD + BL, 0), o_t, o_d, SW)).to(dt),
                         tl.load(src + p, mask=m, other=0.).to(dt))
        else:
            b_Y = tl.dot(tl.load(_scr(scr, 0, o_t, o_d, SW)).to(dt), tl.load(src + p, mask=m, other=0.).to(dt))
        b_dX = tl.dot(b_At, _dos(do, rows, m_t & is_mem, (t % NS) * BV, o_v, scale, dt, D, UPCAST))
        b_dX += tl.dot(tl.load(_scr(scr, BD, o_t, o_d, SW)).to(dt), tl.load(dM + p, mask=m, other=0.).to(dt))
        if ONLINE:
            b_dlr += tl.where(is_mem, 0., tl.sum(b_dX * b_Y, 1))
            b_f = tl.where(is_mem, 1., b_lr)
            tl.store(_scr(scr, 2 * BD + t * BV, o_t, o_v, SW), (b_f[:, None] * b_Y).to(dt).to(tl.float32))
            tl.store(_scr(scr, 5 * BD + t * BV, o_t, o_v, SW), (b_f[:, None] * b_dX).to(dt).to(tl.float32))
        else:
            b_dlr += tl.sum(b_dX * b_Y, 1)
            tl.store(_scr(scr, 2 * BD + t * BV, o_t, o_v, SW), (b_lr[:, None] * b_Y).to(dt).to(tl.float32))
            tl.store(_scr(scr, 5 * BD + t * BV, o_t, o_v, SW), (b_lr[:, None] * b_dX).to(dt).to(tl.float32))
    tl.store(vec + 7, b_dlr)
    tl.debug_barrier()


@triton.jit
def _block_backward_g(src, dM0, scr0, q, n, T, period, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                      BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, ONLINE: tl.constexpr,
                      UPCAST: tl.constexpr):
    """The fifth part of a block's backward: G = X dM_end^T and dE = dY Mbar^T (ONLINE: dR on the mem tiles),
    summed transposed over the tiles onto what _block_backward left, and d gamma_L."""
    NS: tl.constexpr = BD // BV
    SW: tl.constexpr = (15 + ONLINE) * BD + BL
    dM, scr, o_t, o_d, o_v, m_d, m_t, rows, vec = _handed_over(dM0, scr0, n, T, period, H, D, W, BD, BV, BL, SW)
    dt = q.dtype.element_ty
    if UPCAST:
        dt = tl.float32
    dgL = tl.sum(tl.where(o_t == 0, tl.load(vec + 9), 0.), 0)
    b_Gt = tl.load(_scr_t(scr, 11 * BD, o_t, o_d, SW))
    b_dEt = tl.load(_scr_t(scr, 12 * BD, o_t, o_d, SW))
    if ONLINE:
        b_dRt = tl.zeros([BD, BL], dtype=tl.float32)
    for t in range(0, 3 * NS):
        p, m, is_mem = _tile(t, o_d, m_d, o_v, D, W, BD, BV)
        b_M = tl.load(src + p, mask=m, other=0.)
        b_dN = tl.load(dM + p, mask=m, other=0.)
        b_dY = tl.load(_scr(scr, 5 * BD + t * BV, o_t, o_v, SW)).to(dt)
        b_Gt += tl.dot(b_dN.to(dt), tl.trans(tl.load(_scr(scr, 2 * BD + t * BV, o_t, o_v, SW)).to(dt)))
        if ONLINE:
            b_MdY = tl.dot(b_M.to(dt), tl.trans(b_dY))
            b_dEt += tl.where(is_mem, 0., b_MdY)
            b_dRt += tl.where(is_mem, b_MdY, 0.)
        else:
            b_dEt += tl.dot(b_M.to(dt), tl.trans(b_dY))
        dgL += tl.sum(tl.sum(b_dN * b_M, 1), 0)
    tl.debug_barrier()
    tl.store(_scr_t(scr, 11 * BD, o_t, o_d, SW), b_Gt)
    tl.store(_scr_t(scr, 12 * BD, o_t, o_d, SW), b_dEt)
    if ONLINE:
        tl.store(_scr_t(scr, 2 * BD, o_t, o_d, SW), b_dRt)      # over lr Y, spent
    tl.store(vec + 9, tl.zeros([BL], dtype=tl.float32) + dgL)
    tl.debug_barrier()


@triton.jit
def _block_backward_tail(src, dM0, scr0, q, u, do, du, dlrb, ddb, n, T, period, scale, H: tl.constexpr,
                         D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr,
                         ONLINE: tl.constexpr, UPCAST: tl.constexpr):
    """The sixth part of a block's backward, from the scratch: dMbar over the tiles, then the keys', values' and
    log decays' gradients (dr for _rows_backward)."""
    NS: tl.constexpr = BD // BV
    SW: tl.constexpr = (15 + ONLINE) * BD + BL
    i_bh = tl.program_id(0)
    dM, scr, o_t, o_d, o_v, m_d, m_t, rows, vec = _handed_over(dM0, scr0, n, T, period, H, D, W, BD, BV, BL, SW)
    dt = q.dtype.element_ty
    if UPCAST:
        dt = tl.float32
    b_lr = tl.load(vec)
    b_ld = tl.load(vec + 1)
    nk = tl.load(vec + 2)
    nv = tl.load(vec + 3)
    s_e = tl.load(vec + 4)
    s_a = tl.load(vec + 5)
    b_w = tl.load(vec + 6)
    b_dlr = tl.load(vec + 7)
    b_dLD = tl.load(vec + 8)
    dgL = tl.sum(tl.where(o_t == 0, tl.load(vec + 9), 0.), 0)
    gL = tl.exp(tl.sum(b_ld, 0))
    # ... and dMbar, in a loop of its own (fewer values live in each)
    for t in range(0, 3 * NS):
        p, m, is_mem = _tile(t, o_d, m_d, o_v, D, W, BD, BV)
        b_dN = tl.load(dM + p, mask=m, other=0.)
        b_dY = tl.load(_scr(scr, 5 * BD + t * BV, o_t, o_v, SW)).to(dt)
        b_qg = tl.load(_scr(scr, 13 * BD, o_t, o_d, SW)).to(dt)
        b_dMbar = tl.dot(tl.trans(b_qg), _dos(do, rows, m_t & is_mem, (t % NS) * BV, o_v, scale, dt, D, UPCAST))
        if ONLINE:
            b_Lf = tl.load(_scr(scr, tl.where(is_mem, 15 * BD + BL, 0), o_t, o_d, SW)).to(dt)
            b_dMbar += gL * b_dN + tl.dot(tl.trans(b_Lf), b_dY)
        else:
            b_dMbar += gL * b_dN + tl.dot(tl.trans(tl.load(_scr(scr, 0, o_t, o_d, SW)).to(dt)), b_dY)
        tl.debug_barrier()
        tl.store(dM + p, b_dMbar, mask=m)
    tl.debug_barrier()
    # keys, values and log decays
    b_G = tl.load(_scr(scr, 11 * BD, o_t, o_d, SW))
    b_dE = tl.load(_scr(scr, 12 * BD, o_t, o_d, SW))
    b_k = tl.load(_scr(scr, 8 * BD, o_t, o_d, SW))
    b_v = tl.load(_scr(scr, 9 * BD, o_t, o_d, SW))
    b_dk = tl.load(_scr(scr, 10 * BD, o_t, o_d, SW)) + b_w[:, None] * b_G - b_dE
    b_dw = tl.sum(b_k * b_G, 1)
    b_dLD -= b_dw * b_w
    L = tl.sum(m_t.to(tl.int32), 0)
    b_dLD += tl.where(o_t == L - 1, tl.sum(b_dw * b_w, 0) + dgL * gL, 0.)
    if ONLINE:
        b_dko, b_dvo, b_dlro, b_dLDo, b_dldo = _online_backward(
            tl.load(_scr(scr, 2 * BD, o_t, o_d, SW)), tl.load(_scr(scr, 15 * BD + BL, o_t, o_d, SW)), b_k, b_v, b_lr,
            b_ld, o_t, L, period, dt)
        b_dk += b_dko
        b_dE += b_dvo
        b_dlr += b_dlro
        b_dLD += b_dLDo
    b_dld = tl.sum(b_dLD, 0) - tl.cumsum(b_dLD, 0) + b_dLD
    if ONLINE:
        b_dld += b_dldo
    d_a = tl.where(m_t, b_dld * (1. - s_a), 0.)
    d_e = tl.where(m_t, b_dlr * b_lr * (1. - s_e), 0.)
    tl.store(_scr(scr, 2 * BD, o_t, o_d, SW), (nk[:, None] * (b_dk - b_k * tl.sum(b_k * b_dk, 1)[:, None])).to(dt)
             .to(tl.float32))
    tl.store(_scr(scr, 3 * BD, o_t, o_d, SW), (nv[:, None] * (b_dE - b_v * tl.sum(b_v * b_dE, 1)[:, None])).to(dt)
             .to(tl.float32))
    tl.store(scr + o_t * SW + 4 * BD, d_e)
    tl.store(scr + o_t * SW + 4 * BD + 1, d_a)
    tl.store(dlrb + i_bh, tl.load(dlrb + i_bh) + tl.sum(d_e, 0))
    tl.store(ddb + i_bh, tl.load(ddb + i_bh) + tl.sum(d_a, 0))
    tl.debug_barrier()


@triton.jit
def _step(st, k, NB, S, NCK, D: tl.constexpr, W: tl.constexpr):
    """Step k of the backward kernel's (NCK - 1) S + 2 NB - NCK: (replay, n, src, dst), block n's replay from the
    memory at src to dst, or (replay False) its backward from its start memory at src. The first (NCK - 1) S
    steps replay blocks n = k to the checkpoints (slot NCK the running memory); then the segments in reverse, a
    segment g of nb blocks in 2 nb - 1 steps j: the replay of its blocks i = j < nb - 1 to slot NCK + j + 1, then
    the backward of its blocks i = 2 nb - 2 - j, last to first (the last segment, nb = NL, first)."""
    DW: tl.constexpr = D * W
    base = st + tl.program_id(0).to(tl.int64) * (NCK + S) * DW
    R = (NCK - 1) * S
    r = k - R
    F = 2 * (NB - R) - 1
    last = r < F
    g = tl.where(last, NCK - 1, NCK - 2 - (r - F) // (2 * S - 1))
    j = tl.where(last, r, (r - F) % (2 * S - 1))
    nb = tl.where(last, NB - R, S)
    i = tl.where(j < nb - 1, j, 2 * nb - 2 - j)
    i_src = tl.where(k < R, tl.where(k % S == 0, k // S, NCK), tl.where(i == 0, g, NCK + i))
    i_dst = tl.where(k < R, tl.where((k + 1) % S == 0, (k + 1) // S, NCK), NCK + j + 1)
    return (k < R) | (j < nb - 1), tl.where(k < R, k, g * S + i), base + i_src * DW, base + i_dst * DW


@triton.jit(noinline=True)
def _forward_step(n, state, q, u, o, lr_bias, decay_bias, T, period, scale, lr_c, eps, H: tl.constexpr,
                  D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr,
                  ONLINE: tl.constexpr, UPCAST: tl.constexpr):
    """Block n of the forward kernel, its memory in place."""
    _block_forward(state, state, q, u, o, lr_bias, decay_bias, n, T, period, scale, lr_c, eps, H, D, W, BD, BV, BL,
                   True, ONLINE, UPCAST)


@triton.jit(noinline=True)
def _backward_part(left, st, dM0, scr, q, u, do, dq, du, lr_bias, decay_bias, dlrb, ddb, T, NB, S, NCK, period,
                   scale, lr_c, eps, PART: tl.constexpr, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                   BD: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, ONLINE: tl.constexpr, UPCAST: tl.constexpr):
    """Part PART (of seven) of the backward kernel's step k = #steps - 1 - (left - 1) // 7, `left` the parts
    still to run: a replay runs in part 0 (the others pass), a block's backward in all seven (module docstring).
    Returns left - 1, so that the kernel's one value comes back from each call instead of being held across it."""
    replay, n, src, dst = _step(st, (NCK - 1) * S + 2 * NB - NCK - 1 - (left - 1) // 7, NB, S, NCK, D, W)
    if PART == 0:
        if replay:
            _block_forward(src, dst, q, u, q, lr_bias, decay_bias, n, T, period, scale, lr_c, eps, H, D, W, BD, BV,
                           BL, False, ONLINE, UPCAST)
        else:
            _block_backward(src, dM0, scr, u, lr_bias, decay_bias, n, T, period, lr_c, eps, H, D, W, BD, BV, BL,
                            ONLINE, UPCAST)
    elif PART == 1:
        if not replay:
            _block_backward_read(src, dM0, scr, q, do, dq, n, T, period, scale, H, D, W, BD, BV, BL, ONLINE, UPCAST)
    elif PART == 2:
        if not replay:
            _block_backward_qk(dM0, scr, q, n, T, period, H, D, W, BD, BV, BL, ONLINE, UPCAST)
    elif PART == 3:
        if not replay:
            _block_backward_y(src, dM0, scr, q, do, n, T, period, scale, H, D, W, BD, BV, BL, ONLINE, UPCAST)
    elif PART == 4:
        if not replay:
            _block_backward_g(src, dM0, scr, q, n, T, period, H, D, W, BD, BV, BL, ONLINE, UPCAST)
    elif PART == 5:
        if not replay:
            _block_backward_tail(src, dM0, scr, q, u, do, du, dlrb, ddb, n, T, period, scale, H, D, W, BD, BV, BL,
                                 ONLINE, UPCAST)
    else:
        if not replay:
            _rows_backward(src, dM0, scr, u, du, n, T, period, H, D, W, BD, BV, BL, ONLINE, UPCAST)
    return left - 1


# ----------------------------------------------------------------------------- kernels
@autotune(FWD_CONFIGS, key=["H", "D", "BL", "ONLINE"])
@triton.jit
def selfmod_fwd_kernel(q, u, lr_bias, decay_bias, M0, o, MT, T, NB, period, scale, lr_c, eps,
                       H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                       BL: tl.constexpr, ONLINE: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (batch x head): every block in order, the memory in MT (the final-state output)."""
    i_bh = tl.program_id(0)
    state = MT + i_bh.to(tl.int64) * D * W
    _copy(M0 + i_bh.to(tl.int64) * D * W, state, D * W, True, 1024)
    tl.debug_barrier()
    for n in range(0, NB):
        _forward_step(n, state, q, u, o, lr_bias, decay_bias, T, period, scale, lr_c, eps, H, D, W, BD, BV, BL, ONLINE,
                      UPCAST)


@autotune(BWD_CONFIGS, key=["H", "D", "BL", "USE_FINAL_GRAD", "ONLINE"])
@triton.jit
def selfmod_bwd_kernel(q, u, lr_bias, decay_bias, M0, do, dMT, dq, du, dlrb, ddb, dM0, st, scr, T, NB, S, NCK, period,
                       scale, lr_c, eps, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr,
                       BV: tl.constexpr, BL: tl.constexpr, USE_FINAL_GRAD: tl.constexpr, ONLINE: tl.constexpr,
                       UPCAST: tl.constexpr):
    """One program per (batch x head): checkpoints every S blocks, then segments in reverse (module docstring).
    `st` holds NCK + S memories per program: checkpoint g in slot g, a segment's block i > 0 in slot NCK + i
    (slot NCK is also the running memory of the first replay)."""
    i_bh = tl.program_id(0)
    DW = D * W
    base = st + i_bh.to(tl.int64) * (NCK + S) * DW
    _copy(M0 + i_bh.to(tl.int64) * DW, base, DW, True, 1024)
    _copy(dMT + i_bh.to(tl.int64) * DW, dM0 + i_bh.to(tl.int64) * DW, DW, USE_FINAL_GRAD, 1024)
    tl.store(dlrb + i_bh, 0.)
    tl.store(ddb + i_bh, 0.)
    tl.debug_barrier()
    left = 7 * ((NCK - 1) * S + 2 * NB - NCK)
    while left > 0:  # the parts still to run, counted down by the calls
        for part in tl.static_range(7):
            left = _backward_part(left, st, dM0, scr, q, u, do, dq, du, lr_bias, decay_bias, dlrb, ddb, T, NB, S,
                                  NCK, period, scale, lr_c, eps, part, H, D, W, BD, BV, BL, ONLINE, UPCAST)


# ----------------------------------------------------------------------------- launchers
def column_tile(BD: int, backward: bool = False) -> int:
    """Columns (and rows) per tile of the [D, W] memory: [D, 16] up to D = 64, [D, 32] above in the forward;
    [D, 32] in the backward, whose [BL, BV] products then spread their columns over the warps (with a [16, 16]
    product the compiler lays a loop's warps along the 16 rows, every warp holding whole [D, BV] operands)."""
    return min(BD, 32 if backward or BD > 64 else 16)


def _flags(q, T: int, period: int, online: bool):
    D = q.shape[-1]
    BD = _pad(D)
    return dict(H=q.shape[2], D=D, W=3 * D + 2, BD=BD, BV=column_tile(BD), BL=_pad(min(period, T)),
                ONLINE=int(online), UPCAST=upcast_dots(q.dtype))


def selfmod_forward(q, u, lr_bias, decay_bias, M0, scale, lr_max, period, eps, online=False):
    """(o [B, T, H, D] in q's dtype, M_T float32) of contiguous q, u and float32 M0 [B, H, D, W]; `online`:
    M_mem by the online rule (mem_period=1)."""
    B, T, H, D = q.shape
    o = empty(B, T, H, D, dtype=q.dtype, device=q.device)
    MT = empty(B, H, D, 3 * D + 2, dtype=torch.float32, device=q.device)
    NB = triton.cdiv(T, period)
    if B * H:
        selfmod_fwd_kernel[check_grid((B * H,))](q, u, lr_bias, decay_bias, M0, o, MT, T, NB, period, scale,
                                                 lr_max / period, eps, **_flags(q, T, period, online))
    return o, MT


def selfmod_backward(q, u, lr_bias, decay_bias, M0, do, dMT, scale, lr_max, period, eps, online=False):
    """(dq, du, d lr_bias [H], d decay_bias [H], dM0 float32) with dMT None for no final-state gradient."""
    B, T, H, D = q.shape
    W = 3 * D + 2
    NB = triton.cdiv(T, period)
    S, NCK = checkpoints(NB)
    dq = empty(B, T, H, D, dtype=q.dtype, device=q.device)
    du = empty(B, T, H, D, dtype=u.dtype, device=u.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    dlrb, ddb, dM0 = empty(B, H, **f32), empty(B, H, **f32), empty(B, H, D, W, **f32)
    flags = _flags(q, T, period, online)
    st = empty(B * H, NCK + S, D, W, **f32)
    scr = empty(B * H, flags["BL"], (15 + online) * flags["BD"] + flags["BL"], **f32)
    if B * H:
        selfmod_bwd_kernel[check_grid((B * H,))](q, u, lr_bias, decay_bias, M0, do, dMT, dq, du, dlrb, ddb, dM0, st,
                                                 scr, T, NB, S, NCK, period, scale, lr_max / period, eps,
                                                 USE_FINAL_GRAD=dMT is not None,
                                                 **dict(flags, BV=column_tile(flags["BD"], backward=True)))
    return dq, du, dlrb.sum(0), ddb.sum(0), dM0


# ----------------------------------------------------------------------------- AOT compile specs
SCALARS = {"T": "i32", "NB": "i32", "period": "i32", "scale": "fp32", "lr_c": "fp32", "eps": "fp32"}
SPEC_SHAPES = [(D, dt) for D in (64, 128) for dt in ("bf16", "fp32")]


def _flags_spec(D: int, online: bool = False) -> dict:
    return dict(H=4, D=D, W=3 * D + 2, BD=D, BV=column_tile(D), BL=16, ONLINE=int(online), UPCAST=False)


def _fwd_spec(D: int, dt: str, online: bool = False):
    ptrs = dict(q=dt, u=dt, lr_bias="fp32", decay_bias="fp32", M0="fp32", o=dt, MT="fp32")
    return kernel_spec(f"titans.selfmod_fwd[D={D},{dt}{',online' if online else ''}]", selfmod_fwd_kernel,
                       FWD_CONFIGS, ptrs, set(ptrs), SCALARS, _flags_spec(D, online))


def _bwd_spec(D: int, dt: str, online: bool = False):
    ptrs = dict(q=dt, u=dt, lr_bias="fp32", decay_bias="fp32", M0="fp32", do=dt, dMT="fp32", dq=dt, du=dt,
                dlrb="fp32", ddb="fp32", dM0="fp32", st="fp32", scr="fp32")
    return kernel_spec(f"titans.selfmod_bwd[D={D},{dt}{',online' if online else ''}]", selfmod_bwd_kernel,
                       BWD_CONFIGS, ptrs, set(ptrs), dict(SCALARS, S="i32", NCK="i32"),
                       dict(_flags_spec(D, online), BV=column_tile(D, backward=True), USE_FINAL_GRAD=True))


def compile_specs():
    """Blocks of 16 tokens: the forward and the backward kernel at D = 64 and 128 (bf16, fp32), M_mem at the block
    period and online (ONLINE), default config (8 warps). With Triton's own ptxas flags no forward spills, and
    no backward at D = 64; at D = 128 the backward stores a few bytes per thread (over all functions: sm_80 bf16
    8, ONLINE 4; sm_90 bf16 28, fp32 16, ONLINE 32, 16), 4-12 bytes per function, registers saved around the
    calls of the non-inlined functions (each takes all 255 registers). All are recorded in
    tests/test_compile.py's KNOWN_SPILLS so that they can only go down. The per-block functions take all 255
    registers, so even the kernel's step counter is saved around their calls; the rest needs fewer [BL, D] tiles
    live in the block's backward."""
    return [spec(D, dt, online) for spec in (_fwd_spec, _bwd_spec) for online in (False, True)
            for D, dt in SPEC_SHAPES]
