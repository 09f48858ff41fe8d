"""Titans: a matrix memory per head that learns in context by gradient descent (`attention="titans"`).

Per head (head size D), with `hope_kernels.titans_scan` doing the memory (DESIGN.md, titans_scan):

    q, k, v = conv4(x W_q), conv4(x W_k), conv4(x W_v)       causal depthwise conv, window 4
    q, k    = q / ||q||, k / ||k||
    lr_t    = (lr_max / C) sigmoid(x_t w_lr + b_lr)            C = period, lr_max < 2
    alpha_t = sigmoid(x_t w_a + b_a)                           decay (retention) in (0, 1)
    G_t     = k_t^T (k_t Sbar_t - v_t)                         gradient of 1/2 ||k S - v||^2 at the block start
    Z_t     = m_t Z_{t-1} - lr_t G_t      (momentum, optional; else Z_t = -lr_t G_t)
    S_t     = alpha_t S_{t-1} + Z_t,      S_0 a learned parameter (the meta-learned initial memory)
    o_t     = q_t S_t,   y_t = W_o (rmsnorm(o_t) * silu(x_t W_g))

Gradients of a block of C = `period` tokens are taken at the block's start memory Sbar (the
paper's chunk-wise training); period 1 is the exact online rule (delta gradient descent). Keys are
unit vectors and a block holds at most C of them, so the block's step lr * ||sum_t k_t^T k_t|| <
C * lr_max / C = lr_max < 2 keeps gradient descent on the inner loss stable.

Self-modifying Titans (`self_modifying=True`), Nested Learning (Behrouz et al. 2025), Eq. 83-93 for
matrix-valued memories in their chunk-wise form (Eq. 90-91, 93). Besides the output memory M_mem,
the projections are in-context memories: M_k, M_v (D x D), M_eta, M_alpha (D x 1), each with its own
learned initial state, all read at the start of t's block (state at block start n = bar):

    u_t = conv4(x_t W_u),  q_t = conv4(x_t W_q) / ||.||                    q is the one static projection
    k_t = norm(u_t Mbar_k),  v_t = norm(u_t Mbar_v)                        (Eq. 84/90)
    eta_t = (lr_max / C) sigmoid(u_t Mbar_eta + b),  alpha_t = sigmoid(u_t Mbar_alpha + b)
    vhat_{box,t} = v_t Mbar_box        self-generated values, box in {k, v, mem, eta, alpha}  (Eq. 83/91)
    M_box,t = alpha_t M_box,t-1 - eta_t k_t^T (k_t Mbar_box - vhat_{box,t})                   (Eq. 93)
    o_t = q_t M_mem,t

Initial state (`selfmod_init`): M_mem = I, small M_eta, M_alpha, and M_k, M_v both I ("identity":
then k_t = v_t, so every write k_t^T (k_t Mbar - v_t Mbar) is exactly zero until training moves M_k
and M_v apart) or two independent random orthogonal matrices ("orthogonal": the memory writes from
the first step; docs/findings.md).

All five memories share the keys k_t, the step eta_t and the decay alpha_t (as in the paper), so they
are one memory of width 3D + 2 (the column blocks [M_k | M_v | M_eta | M_alpha | M_mem]): the
gradient of a column block is that memory's own gradient. The keys and values of a block depend on
the memories at the block's start, so blocks follow one another: `hope_kernels.titans_selfmod_scan`
runs them all in one call (DESIGN.md, titans_selfmod_scan).

Simplifications (stated): (1) matrix memories (Eq. 92-93), not the 2-layer MLP memories of Eq. 89;
(2) Eq. 93 writes the decay/DGD term M(alpha I - eta k k^T) and the gradient at the block start
together, which counts k k^T twice at period 1; we use DESIGN.md's rule (decay times the memory
minus the gradient at the block start), which at period 1 is exactly DGD with decay (Eq. 88);
(3) the projection memories read a per-head projection u_t = x_t W_u of the input (the memories
are per head, D x D) rather than x_t itself; (4) v_t is L2-normalised like q and k, which keeps
the self-generated targets bounded (lr * (1 - k.v) <= 2 lr); (5) q_t is read against the memory
after the token's own update, the op's convention; (6) one period for all memories (the paper
allows one for M_mem and one for the rest). The output norm and gate are the usual
gated-delta-net read-out. With momentum, the one momentum gate m_t = sigmoid(x_t w_m + b_m) is a
static projection (the paper's set of memories has no momentum).

A forward is one op call (titans_scan, or titans_selfmod_scan when self-modifying) over the whole
sequence. The cache (generation) holds the memory state (S or (S, Z)), the block-start memory, the
number of tokens seen, and the conv history: one new token is a `titans_step` (`titans_selfmod_step`)
with `block_state`; a cached chunk of tokens continues the current block first, then runs the op.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .attention import _head_dim
from .layers import ShortConv, gated_readout, split_heads
from .ops import check_backend, get_op


def up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (states and gates are float32 for half inputs; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(up(x).pow(2).sum(-1, keepdim=True) + eps).to(x.dtype)


def random_orthogonal(H: int, D: int) -> torch.Tensor:
    """H independent random orthogonal D x D matrices (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(H, D, D))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


def block_segments(pos: int, T: int, period: int, per_block: bool) -> List[Tuple[int, int]]:
    """Split tokens pos .. pos+T-1 (positions in the sequence) at block boundaries.

    Returns (start, end) ranges over 0..T: the rest of the current block first, then whole blocks
    (one range each when `per_block`, else together), then the unfinished tail.
    """
    out, s = [], 0
    head = (-pos) % period
    if head:
        out.append((0, min(head, T)))
        s = out[-1][1]
    body = (T - s) // period * period
    if body:
        out += [(i, i + period) for i in range(s, s + body, period)] if per_block else [(s, s + body)]
        s += body
    if s < T:
        out.append((s, T))
    return out


def _split(t: Optional[torch.Tensor], sizes: List[int]):
    """t split along time into `sizes` (a list of Nones for None)."""
    return [None] * len(sizes) if t is None else t.split(sizes, 1)


def _memory(state):
    return state[0] if isinstance(state, tuple) else state


class TitansLayer(nn.Module):
    """Titans (optionally self-modifying) over the sequence; see the module docstring.
    x: [B, T, dim] -> [B, T, dim]. Also the memory of the paper's linear CMS levels (hope.levels,
    `read_with_key`): a level reads at the key and at its block-start memory, o_t = k_t Sbar_n (Eq. 71,
    as an MLP with weights Sbar_n reads its input; titans_scan's read="block_start"); the block's
    updates are seen from the next block on."""

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, *, period: int = 16,
                 self_modifying: bool = False, momentum: bool = False, selfmod_init: str = "identity",
                 lr_max: float = 1.0, conv_window: int = 4, read_with_key: bool = False, bias: bool = False,
                 dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if not 0.0 < lr_max < 2.0:
            raise ValueError(f"lr_max must be in (0, 2) (gradient descent on the inner loss is stable "
                             f"while lr * ||k||^2 < 2), got {lr_max}")
        if period < 1:
            raise ValueError(f"period must be a positive integer, got {period}")
        if selfmod_init not in ("identity", "orthogonal"):
            raise ValueError(f"selfmod_init must be 'identity' or 'orthogonal', got {selfmod_init!r}")
        self.num_heads, self.head_dim = num_heads, _head_dim(dim, num_heads, head_dim)
        H, D = num_heads, self.head_dim
        inner = H * D
        self.period, self.self_modifying, self.lr_max = period, self_modifying, lr_max
        self.use_momentum, self.read_with_key = momentum, read_with_key and not self_modifying
        # one static projection: q (unless read_with_key) and either (k, v) or u; the output gate g;
        # the gates lr, decay (not when self-modifying: memories give them) and momentum, per head
        n_gates = (0 if self_modifying else 2) + (1 if momentum else 0)
        self.splits = [(2 if self_modifying or self.read_with_key else 3) * inner, inner, n_gates * H]
        self.proj_in = nn.Linear(dim, sum(self.splits), bias=bias)
        self.conv = ShortConv(self.splits[0], conv_window) if conv_window > 1 else None
        self.lr_bias = nn.Parameter(torch.zeros(H))
        self.decay_bias = nn.Parameter(torch.full((H,), 4.0))       # alpha ~ 0.98 at init
        self.momentum_bias = nn.Parameter(torch.zeros(H)) if momentum else None
        if self_modifying:   # [M_k | M_v | M_eta | M_alpha | M_mem]: M_k, M_v (module docstring), small read-outs, I
            eye = torch.eye(D).expand(H, D, D)
            M_k, M_v = (eye, eye) if selfmod_init == "identity" else (random_orthogonal(H, D), random_orthogonal(H, D))
            self.initial_memory = nn.Parameter(torch.cat([M_k, M_v, 0.02 * torch.randn(H, D, 2), eye], -1))
        else:
            self.initial_memory = nn.Parameter(torch.zeros(H, D, D))
        self.proj = nn.Linear(inner, dim, bias=bias)
        self.proj.residual_branch = True
        self.resid_dropout = nn.Dropout(dropout)
        self.backend = check_backend(backend)

    # ------------------------------------------------------------------ pieces
    def _lr(self, z: torch.Tensor) -> torch.Tensor:
        return (self.lr_max / self.period) * torch.sigmoid(up(z) + up(self.lr_bias))

    def _decay(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(up(z) + up(self.decay_bias))

    def _initial_state(self, B: int):
        S = up(self.initial_memory).expand(B, *self.initial_memory.shape).clone()
        return (S, torch.zeros_like(S)) if self.use_momentum else S

    def _scan(self, inputs, state):
        """An aligned stretch (starting at a block boundary) in one op call; returns (o, state)."""
        if self.self_modifying:
            q, u, mom = inputs
            return get_op("titans_selfmod_scan", self.backend)(
                q, u, self.lr_bias, self.decay_bias, mom, 1.0, lr_max=self.lr_max, period=self.period,
                initial_state=state, output_final_state=True)
        # a CMS level reads its block-start memory (Eq. 71), the Titans mixer its current memory
        return get_op("titans_scan", self.backend)(*inputs, 1.0, period=self.period,
                                                   read="block_start" if self.read_with_key else "current",
                                                   initial_state=state, output_final_state=True)

    def _continue(self, inputs, state, block_state, step: bool):
        """A stretch that starts inside a block (a cache's continuation), with the gradient taken at
        `block_state` rather than at the current memory S; returns (o, state)."""
        if self.self_modifying:   # one token at a time (at most period - 1 of them), in place
            q, u, mom = inputs
            outs = []
            for t in range(q.shape[1]):
                o, state = get_op("titans_selfmod_step", self.backend)(
                    q[:, t], u[:, t], self.lr_bias, self.decay_bias, state, block_state,
                    None if mom is None else mom[:, t], 1.0, lr_max=self.lr_max, period=self.period)
                outs.append(o)
            return torch.stack(outs, 1), state
        q, k, v, lr, decay, mom = inputs
        if step:   # one token, generation
            o, state = get_op("titans_step", self.backend)(
                q[:, 0], k[:, 0], v[:, 0], lr[:, 0], state, None if decay is None else decay[:, 0],
                None if mom is None else mom[:, 0], 1.0, block_state=block_state)
            o = o[:, None]
        else:      # k (Sbar) - v = k S - (v + k (S - Sbar)): the scan runs on corrected values
            delta = _memory(state) - block_state
            v = v + torch.einsum("bthk,bhkv->bthv", up(k), delta).to(v.dtype)
            o, state = get_op("titans_scan", self.backend)(q, k, v, lr, decay, mom, 1.0, period=self.period,
                                                           initial_state=state, output_final_state=True)
        if self.read_with_key:
            o = torch.einsum("bthk,bhkv->bthv", up(q), block_state).to(o.dtype)
        return o, state

    def _memory_pass(self, inputs, T, pos, state, block_state, cached: bool):
        """Run the memory over T tokens (positions pos..): the rest of a block begun in the cache, then
        the whole blocks and the unfinished tail in one op call (two with a cache, which keeps the
        tail's block-start memory). `inputs` are split once per stretch, not sliced (a slice's backward
        writes a full-length gradient). Returns (o, state, block_state). A cached block-start memory
        is a copy: the step ops update the state in place."""
        stretches = block_segments(pos, T, self.period, per_block=False)
        if not cached and len(stretches) > 1 and (pos + stretches[-2][0]) % self.period == 0:
            stretches = stretches[:-2] + [(stretches[-2][0], T)]
        parts = [_split(t, [b - a for a, b in stretches]) for t in inputs]
        outs = []
        for i, (a, b) in enumerate(stretches):
            xs = [p[i] for p in parts]
            step = cached and b - a == 1
            if (pos + a) % self.period == 0:
                block_state = _memory(state).clone() if cached else _memory(state)
                if not step:
                    o, state = self._scan(xs, state)
                    outs.append(o)
                    continue
            o, state = self._continue(xs, state, block_state, step)
            outs.append(o)
        if (pos + T) % self.period == 0:
            block_state = _memory(state).clone() if cached else _memory(state)
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0], state, block_state

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        h, g, gates = self.proj_in(x).split(self.splits, dim=-1)
        if self.conv is not None:
            h = self.conv(h, cache)
        gates = gates.view(B, T, -1, H)
        mom = None
        if self.use_momentum:
            mom = torch.sigmoid(up(gates[:, :, -1]) + up(self.momentum_bias))
        pos = cache.get("pos", 0) if cache is not None else 0
        state = cache.get("state") if cache is not None else None
        state = self._initial_state(B) if state is None else state
        block_state = cache.get("block_state") if cache is not None else None
        block_state = _memory(state) if block_state is None else block_state
        if self.self_modifying:
            q, u = (split_heads(t, H) for t in h.chunk(2, dim=-1))
            inputs = (l2norm(q), up(u), mom)
        else:
            if self.read_with_key:
                k, v = (split_heads(t, H) for t in h.chunk(2, dim=-1))
                q = k = l2norm(k)
            else:
                q, k, v = (split_heads(t, H) for t in h.chunk(3, dim=-1))
                q, k = l2norm(q), l2norm(k)
            inputs = (q, k, v, self._lr(gates[:, :, 0]), self._decay(gates[:, :, 1]), mom)
        o, state, block_state = self._memory_pass(inputs, T, pos, state, block_state, cache is not None)
        if cache is not None:
            cache.update(state=state, block_state=block_state, pos=pos + T)
        # float32's epsilon: the memory starts empty and must be read at full scale from its first write
        # (eps = 1e-5 holds Titans period 1 on the MQAR plateau: 0.53 instead of 0.99 on seeds 0 and 1)
        return self.resid_dropout(self.proj(gated_readout(o, g)))
