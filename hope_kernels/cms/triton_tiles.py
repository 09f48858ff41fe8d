"""Tile helpers shared by the CMS Triton kernels (triton_kernels.py, triton_delta.py): padded head
dimensions, row tiles of [rows, H(, M), D] tensors, the decay masks of a chunk and the mix rows."""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import load_tile


def _pad(n: int) -> int:
    """A head dimension padded to a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _rows(ptr, row0, stride, o_t, o_d, mask, UPCAST: tl.constexpr):
    """Tile [rows o_t, columns o_d] of a row-major tensor whose rows are `stride` apart, from row0 on."""
    return load_tile(ptr + row0 * stride + (o_t[:, None] * stride + o_d[None, :]), mask, UPCAST)


@triton.jit
def _store_rows(ptr, row0, stride, o_t, o_d, mask, x):
    tl.store(ptr + row0 * stride + (o_t[:, None] * stride + o_d[None, :]), x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decays(g, L, o_t):
    """Causal decay mask tau^{i-j} (j <= i < L), tau^i and tau^{L-j}, all from exponents <= 0."""
    m_t = o_t < L
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[None, :]
    # masked exponents: 1e30 * g <= -1e23 (tau < 1 - 1e-7) underflows exp to exactly 0
    b_D = tl.exp(tl.where(causal, (o_t[:, None] - o_t[None, :]).to(tl.float32), 1e30) * g)
    e_q = tl.where(m_t, tl.exp((o_t + 1).to(tl.float32) * g), 0.0)
    e_k = tl.where(m_t, tl.exp(tl.where(m_t, (L - 1 - o_t).to(tl.float32) * g, 0.0)), 0.0)
    return b_D, e_q, e_k


@triton.jit
def _mix_rows(mix, row0, i_h, i_m, o_t, m_t, H: tl.constexpr, M, HAS_MIX: tl.constexpr, MIX_PER_TOKEN: tl.constexpr):
    """mix_{i,m} of the chunk's rows ([BT] fp32): per token, per (head, memory), or ones without mix."""
    if HAS_MIX:
        if MIX_PER_TOKEN:
            return tl.load(mix + (row0 * H + i_h) * M + i_m + o_t * (H * M), mask=m_t, other=0.).to(tl.float32)
        else:
            return tl.zeros(o_t.shape, dtype=tl.float32) + tl.load(mix + i_h * M + i_m).to(tl.float32)
    else:
        return tl.where(m_t, 1.0, 0.0)

