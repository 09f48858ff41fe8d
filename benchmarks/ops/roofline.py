"""Roofline model: the bytes each benchmarked kernel must move and the FLOPs it must do.

Every formula of the suite lives here, so a claim such as "60 % of HBM bandwidth" can be traced
to one line. Notation (see DESIGN.md): B batch, T tokens, H heads, K key dim, V value dim,
M CMS memories, C chunk size (64), e bytes per input element, 4 bytes per float32 state element.

Bytes are the compulsory traffic: every input read once, every output written once, a recurrent
state read and written once per call, plus the chunk states of the chunk-parallel algorithms.
Linear attention (`la_chunk_state_bytes`), with n = B H ceil(T / C) K V elements: causal forward
2 e n (h_c written by the state pass, read by the output kernel), backward 5 e n (h_c recomputed
and read once, G_c written and read twice); non-causal forward 12 n (float32 per-chunk partials
written and read, the sequence state read per chunk), backward 28 n (two partial reductions, S
read once and G twice per chunk). cms_scan (`cms_chunk_state_bytes`, states in the input dtype):
the forward writes and reads every chunk's starting state of every memory, 2 e NC H M K V with
NC = B ceil(T / C) chunks, and the backward, which recomputes them memory by memory, writes and
reads them and their gradients, 4 e NC H M K V. Inputs re-read by the backward's recomputation
are not counted, so the achieved bandwidth fraction is a lower bound on what the card delivered.

FLOPs (one multiply-add = 2 FLOPs) are those of the chunked algorithm at chunk size C:

- linear_attention, causal, forward: 4 T K V (chunk states k^T v, inter-chunk q S)
  + 2 T C (K + V) (intra-chunk q k^T and (q k^T) v, full C x C blocks as the kernels compute them);
  non-causal: 4 T K V (S = sum k v^T, then q S); all times B H.
- cms_scan, forward: the intra-chunk q k^T is shared by the M memories, the rest is per memory:
  B H [2 T C K + M (2 T C V + 4 T K V)], plus 2 B T H M V for the mix when given.
- cms_scan with the delta rule (`cms_scan_delta`), forward: k k^T and q k^T shared by the M
  memories (4 T C K), per memory the chunk-system inverse (2 C^3 / 3 per chunk), the WY factors
  U, W (2 T C (K + V)), the chunk-start reads W S and q S and the state update (6 T K V) and the
  intra-chunk read-out (2 T C V); all times B H, plus 2 B T H M V for the mix. Bytes: q, k, v, mix,
  beta (float32) and the mixed output once, the chunk states as cms_scan, and the per-memory WY
  factors U, W written and read once (2 e B T H M (K + V); twice that in the backward).
- backward of the scans: 2 x forward (each forward product has two gradient products).
- softmax attention (SDPA) at the same shape, head dim D = K: 4 B H T^2 D forward (halved when
  causal), backward 2.5 x forward (the recomputation convention of FlashAttention).
- titans_scan, forward (chunk form, C = 64): per chunk the gradients at the block-start memory
  (k S: 2 C K V), the intra-chunk [C, C] products (k k^T, q k^T: 4 C^2 K; their products with the
  residuals: 4 C^2 V), the read-out q S (2 C K V) and the state update k^T u (2 C K V); the
  UT transform of period 1 adds the triangular solve (C^3 / 3 per chunk, small). All times B H T / C.
- titans_selfmod_scan (period P, blocks of C = min(P, T) tokens, W = 3K + 2 columns): per token the
  projections u Mbar[:, :2K + 2] (2 K (2K + 2)), the residual (v - k) Mbar and the update k^T X (4 K W),
  the read q Mbar[mem] (2 K^2) and the intra-block q k^T, A X[mem] (4 C K); all times B H T. Bytes: q, u and
  o once, the memory M_0 read and M_T written (float32); backward q, u, do read, dq, du written, M_0 and dM_T
  read, dM_0 written. The fp32 memory workspace (read and written once per block) is not compulsory.
- hope_selfmod_layer / hope_level_layer (hope.titans.TitansLayer: the paper's self-modifying Titans,
  period 16; a CMS level, read_with_key, period 16; dim = H K): the input projection (2 B T dim (3 dim),
  and 2 H gate columns for the level) and the output projection (2 B T dim^2) plus the op
  (titans_selfmod_scan, or titans_scan with its two gates); bytes: x read and y written, the weights read
  once, plus the op's bytes. Intermediates (projections, conv, read-out gate) are not counted.
- step kernels: 4 B H K V for linear_attention_step; cms_step B H (K V + 5 M K V) (outer product
  once, then decay-update and read-out per memory); SDPA decode over a T-token KV cache 4 B H T D.
- ema_update_: 3 M N with N the elements of one buffer; bytes 2 x 4 M N (float32 buffers read and
  written) + e N (the shared update).

`measure_peaks` measures the card's copy bandwidth and matmul throughput in the same run, the
denominators of the achieved fractions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

CHUNK = 64
STATE_BYTES = 4


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    K: int
    V: int
    M: int = 1


def _la_fwd_flops(s: Shape, causal: bool) -> float:
    C = min(CHUNK, s.T)
    inter = 4.0 * s.T * s.K * s.V
    intra = 2.0 * s.T * C * (s.K + s.V) if causal else 0.0
    return s.B * s.H * (inter + intra)


def _cms_fwd_flops(s: Shape, mix: bool) -> float:
    C = min(CHUNK, s.T)
    per_head = 2.0 * s.T * C * s.K + s.M * (2.0 * s.T * C * s.V + 4.0 * s.T * s.K * s.V)
    return s.B * s.H * per_head + (2.0 * s.B * s.T * s.H * s.M * s.V if mix else 0.0)


def _sdpa_fwd_flops(s: Shape, causal: bool) -> float:
    return 4.0 * s.B * s.H * s.T * s.T * s.K * (0.5 if causal else 1.0)


def la_chunk_state_bytes(s: Shape, e: int, causal: bool) -> Tuple[float, float]:
    """(forward, backward) bytes of linear attention's chunk states (see the module docstring)."""
    n = s.B * s.H * -(-s.T // CHUNK) * s.K * s.V
    if causal:
        return 2.0 * e * n, 5.0 * e * n
    return 3.0 * STATE_BYTES * n, 7.0 * STATE_BYTES * n


# (fwd bytes, bwd bytes, fwd flops, bwd flops) per (op, provider family); e = bytes per element
def _linear_attention(s: Shape, e: int, causal: bool, softmax: bool):
    n = s.B * s.T * s.H
    fwd_b, bwd_b = e * n * (2 * s.K + 2 * s.V), e * n * (4 * s.K + 3 * s.V)
    if softmax:
        f = _sdpa_fwd_flops(s, causal)
        return fwd_b, bwd_b, f, 2.5 * f
    state_f, state_b = la_chunk_state_bytes(s, e, causal)
    f = _la_fwd_flops(s, causal)
    return fwd_b + state_f, bwd_b + state_b, f, 2.0 * f


def cms_chunk_state_bytes(s: Shape, e: int) -> Tuple[float, float]:
    """(forward, backward) bytes of cms_scan's chunk states: each written once and read once."""
    states = e * s.B * -(-s.T // CHUNK) * s.H * s.M * s.K * s.V
    return 2.0 * states, 4.0 * states


def _cms(s: Shape, e: int, mix: bool):
    n = s.B * s.T * s.H
    if mix:
        fwd_b, bwd_b = e * n * (2 * s.K + 2 * s.V + s.M), e * n * (4 * s.K + 3 * s.V + 2 * s.M)
    else:
        fwd_b, bwd_b = e * n * (2 * s.K + s.V + s.M * s.V), e * n * (4 * s.K + 2 * s.V + s.M * s.V)
    fwd_s, bwd_s = cms_chunk_state_bytes(s, e)
    fwd_b, bwd_b = fwd_b + fwd_s, bwd_b + bwd_s
    f = _cms_fwd_flops(s, mix)
    return fwd_b, bwd_b, f, 2.0 * f


def _cms_delta(s: Shape, e: int):
    n = s.B * s.T * s.H
    C = min(CHUNK, s.T)
    fwd_b = e * n * (2 * s.K + 2 * s.V + s.M) + 4 * n
    bwd_b = e * n * (4 * s.K + 3 * s.V + 2 * s.M) + 8 * n
    fwd_s, bwd_s = cms_chunk_state_bytes(s, e)
    wy = 2.0 * e * n * s.M * (s.K + s.V)
    per_memory = 2.0 * s.T * C * (s.K + s.V) + 6.0 * s.T * s.K * s.V + 2.0 * s.T * C * s.V + 2.0 * s.T * C * C / 3
    f = s.B * s.H * (4.0 * s.T * C * s.K + s.M * per_memory) + 2.0 * n * s.M * s.V
    return fwd_b + fwd_s + wy, bwd_b + bwd_s + 2 * wy, f, 2.0 * f


def _titans(s: Shape, e: int, gates: int):
    """`gates` per-token [B, T, H] inputs (lr, and decay / momentum when given)."""
    n = s.B * s.T * s.H
    C = min(CHUNK, s.T)
    fwd_b, bwd_b = e * n * (2 * s.K + 2 * s.V) + 4 * n * gates, e * n * (4 * s.K + 3 * s.V) + 8 * n * gates
    f = s.B * s.H * s.T * (6.0 * s.K * s.V + 4.0 * C * (s.K + s.V))
    return fwd_b, bwd_b, f, 2.0 * f


def _selfmod(s: Shape, e: int):
    n, bh, W = s.B * s.T * s.H, s.B * s.H, 3 * s.K + 2
    C = min(16, s.T)
    state = STATE_BYTES * bh * s.K * W
    f = n * (2.0 * s.K * (2 * s.K + 2) + 4.0 * s.K * W + 2.0 * s.K * s.K + 4.0 * C * s.K)
    return 3 * e * n * s.K + 2 * state, 5 * e * n * s.K + 3 * state, f, 2.0 * f


def _layer(s: Shape, e: int, op):
    """A TitansLayer around `op`'s cost (module docstring)."""
    dim = s.H * s.K
    n = s.B * s.T
    gates = 2 * s.H if op is _titans else 0
    weights = e * (dim * (3 * dim + gates) + dim * dim)
    f = 2.0 * n * dim * (3 * dim + gates) + 2.0 * n * dim * dim
    fb, bb, ff, bf = op(s, e) if op is _selfmod else op(s, e, 2)
    return 2 * e * n * dim + weights + fb, 3 * e * n * dim + 2 * weights + bb, f + ff, 2.0 * f + bf


def _la_step(s: Shape, e: int, softmax: bool):
    bh = s.B * s.H
    if softmax:  # one query against a T-token KV cache
        return e * bh * (s.K + s.V + s.T * (s.K + s.V)), 0.0, 4.0 * bh * s.T * s.K, 0.0
    return 2 * STATE_BYTES * bh * s.K * s.V + e * bh * (2 * s.K + 2 * s.V), 0.0, 4.0 * bh * s.K * s.V, 0.0


def _cms_step(s: Shape, e: int):
    bh = s.B * s.H
    state = 2 * STATE_BYTES * bh * s.M * s.K * s.V
    io = e * bh * (2 * s.K + s.V + s.V + s.M)  # q, k, v, o (mixed) and the [B, H, M] gates
    flops = bh * (s.K * s.V + 5.0 * s.M * s.K * s.V) + 2.0 * bh * s.M * s.V
    return state + io, 0.0, flops, 0.0


def ema_numel(s: Shape) -> int:
    """Elements of one EMA buffer in the sweep: a [B, T, H, K] tensor (T sets the size)."""
    return s.B * s.T * s.H * s.K


def _ema(s: Shape, e: int):
    n = ema_numel(s)
    return 2 * STATE_BYTES * s.M * n + e * n, 0.0, 3.0 * s.M * n, 0.0


def _cost(op: str, provider: str, s: Shape, e: int) -> Tuple[float, float, float, float]:
    softmax = provider == "sdpa"
    table: Dict[str, Callable[[], Tuple[float, float, float, float]]] = {
        "linear_attention": lambda: _linear_attention(s, e, True, softmax),
        "linear_attention_noncausal": lambda: _linear_attention(s, e, False, softmax),
        "cms_scan": lambda: _cms(s, e, False),
        "cms_scan_mix": lambda: _cms(s, e, True),
        "cms_scan_delta": lambda: _cms_delta(s, e),
        "titans_scan": lambda: _titans(s, e, 1),
        "titans_scan_blocks": lambda: _titans(s, e, 3),
        "titans_scan_dgd": lambda: _titans(s, e, 2),
        "titans_scan_p16": lambda: _titans(s, e, 2),
        "titans_scan_p64": lambda: _titans(s, e, 2),
        "titans_selfmod_scan": lambda: _selfmod(s, e),
        "hope_selfmod_layer": lambda: _layer(s, e, _selfmod),
        "hope_level_layer": lambda: _layer(s, e, _titans),
        "linear_attention_step": lambda: _la_step(s, e, softmax),
        "cms_step": lambda: _cms_step(s, e),
        "ema_update_": lambda: _ema(s, e),
    }
    if op not in table:
        raise ValueError(f"no roofline formula for op {op!r}")
    return table[op]()


def cost(op: str, provider: str, mode: str, s: Shape, dtype: torch.dtype) -> Tuple[float, float]:
    """(bytes, flops) that `op` must move / do in `mode` ("fwd", "bwd" or "fwd+bwd")."""
    e = torch.empty((), dtype=dtype).element_size()
    fb, bb, ff, bf = _cost(op, provider, s, e)
    return {"fwd": (fb, ff), "bwd": (bb, bf), "fwd+bwd": (fb + bb, ff + bf)}[mode]


# --------------------------------------------------------------------------- card peaks
def _time_copy(device, n_bytes: int, timer) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))[0] * 1e-3


def _time_matmul(device, n: int, dtype, timer) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return timer(lambda: a @ b)[0] * 1e-3


def measure_peaks(device: torch.device, timer) -> Dict[str, float]:
    """Copy bandwidth (bytes/s) and matmul throughput (FLOP/s) measured now with `timer`.

    GPU: a 1 GiB device-to-device copy (read + write counted) and an 8192^3 bf16 matmul.
    CPU: a 64 MiB copy and a 1024^3 float32 matmul (bf16 matmuls are not a CPU fast path).
    `timer(fn) -> (p50, p20, p80)` in milliseconds.
    """
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (64 << 20)
    n, mm_dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    t_copy = _time_copy(device, n_bytes, timer)
    t_mm = _time_matmul(device, n, mm_dtype, timer)
    return {
        "peak_bw": 2.0 * n_bytes / t_copy,
        "peak_flops": 2.0 * n ** 3 / t_mm,
        "peak_flops_dtype": str(mm_dtype).replace("torch.", ""),
    }
