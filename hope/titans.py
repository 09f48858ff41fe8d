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

TitansLayer is also the base of the other matrix memories: the self-modifying Titans of the paper's
HOPE (hope.selfmod) and the linear CMS levels (hope.levels.LinearLevel); each says what it projects
(`_inputs`) and how the op runs it (`_scan`, `_continue`). A forward is one op call over the whole
sequence. The cache (generation) holds the memory state (S or (S, Z)), the block-start memory, the
number of tokens seen, and the conv history: one new token is a `titans_step` with
`block_state`; a cached chunk of tokens continues the current block first, then runs the op.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from .layers import ShortConv, block_segments, gated_readout, l2norm, resolve_head_dim, split_heads, up
from .ops import check_backend, get_op


def split_time(t: Optional[torch.Tensor], sizes: List[int]):
    """t split along time into `sizes` (a list of Nones for None)."""
    return [None] * len(sizes) if t is None else t.split(sizes, 1)


def memory_of(state):
    """The memory S of a state (S, or (S, Z) with momentum)."""
    return state[0] if isinstance(state, tuple) else state


class TitansLayer(nn.Module):
    """Titans over the sequence; see the module docstring. x: [B, T, dim] -> [B, T, dim]."""

    streams = 3            # what the static projection gives per head besides the gate g: q, k, v
    static_gates = 2       # gates per head from the static projection: lr, decay (momentum comes on top)

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, *, period: int = 16,
                 momentum: bool = False, lr_max: float = 1.0, conv_window: int = 4, bias: bool = False,
                 dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if not 0.0 < lr_max < 2.0:
            raise ValueError(f"lr_max must be in (0, 2) (gradient descent on the inner loss is stable "
                             f"while lr * ||k||^2 < 2), got {lr_max}")
        if period < 1:
            raise ValueError(f"period must be a positive integer, got {period}")
        self.num_heads, self.head_dim = num_heads, resolve_head_dim(dim, num_heads, head_dim)
        H, D = num_heads, self.head_dim
        inner = H * D
        self.period, self.lr_max, self.use_momentum = period, lr_max, momentum
        # one static projection: the streams, the output gate g, the gates per head
        self.splits = [self.streams * inner, inner, (self.static_gates + (1 if momentum else 0)) * H]
        self.proj_in = nn.Linear(dim, sum(self.splits), bias=bias)
        self.conv = ShortConv(self.splits[0], conv_window) if conv_window > 1 else None
        self.lr_bias = nn.Parameter(torch.zeros(H))
        self.decay_bias = nn.Parameter(torch.full((H,), 4.0))       # alpha ~ 0.98 at init
        self.momentum_bias = nn.Parameter(torch.zeros(H)) if momentum else None
        self.initial_memory = nn.Parameter(self._initial_memory(H, D))
        self.proj = nn.Linear(inner, dim, bias=bias)
        self.proj.residual_branch = True
        self.resid_dropout = nn.Dropout(dropout)
        self.backend = check_backend(backend)

    # ------------------------------------------------------------------ what a memory kind defines
    def _initial_memory(self, H: int, D: int) -> torch.Tensor:
        return torch.zeros(H, D, D)

    def _inputs(self, h: torch.Tensor, gates: torch.Tensor, mom: Optional[torch.Tensor]) -> tuple:
        """The op's inputs from the (convolved) streams h [B, T, streams * H * D] and the gates [B, T, n, H]."""
        q, k, v = (split_heads(t, self.num_heads) for t in h.chunk(3, dim=-1))
        return l2norm(q), l2norm(k), v, self._lr(gates[:, :, 0]), self._decay(gates[:, :, 1]), mom

    def _scan(self, inputs, state):
        """An aligned stretch (starting at a block boundary) in one op call; returns (o, state)."""
        return get_op("titans_scan", self.backend)(*inputs, 1.0, period=self.period, read="current",
                                                   initial_state=state, output_final_state=True)

    def _continue(self, inputs, state, block_state, step: bool):
        """A stretch that starts inside a block (a cache's continuation), with the gradient taken at
        `block_state` rather than at the current memory S; returns (o, state)."""
        q, k, v, lr, decay, mom = inputs
        if step:   # one token, generation
            o, state = get_op("titans_step", self.backend)(
                q[:, 0], k[:, 0], v[:, 0], lr[:, 0], state, None if decay is None else decay[:, 0],
                None if mom is None else mom[:, 0], 1.0, block_state=block_state)
            return o[:, None], state
        # k (Sbar) - v = k S - (v + k (S - Sbar)): the scan runs on corrected values
        delta = memory_of(state) - block_state
        v = v + torch.einsum("bthk,bhkv->bthv", up(k), delta).to(v.dtype)
        return get_op("titans_scan", self.backend)(q, k, v, lr, decay, mom, 1.0, period=self.period,
                                                   initial_state=state, output_final_state=True)

    # ------------------------------------------------------------------ pieces
    def _lr(self, z: torch.Tensor) -> torch.Tensor:
        return (self.lr_max / self.period) * torch.sigmoid(up(z) + up(self.lr_bias))

    def _decay(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(up(z) + up(self.decay_bias))

    def _initial_state(self, B: int):
        S = up(self.initial_memory).expand(B, *self.initial_memory.shape).clone()
        return (S, torch.zeros_like(S)) if self.use_momentum else S

    def _memory_pass(self, inputs, T, pos, state, block_state, cached: bool):
        """Run the memory over T tokens (positions pos..): the rest of a block begun in the cache, then
        the whole blocks and the unfinished tail in one op call (two with a cache, which keeps the
        tail's block-start memory). `inputs` are split once per stretch, not sliced (a slice's backward
        writes a full-length gradient). Returns (o, state, block_state). A cached block-start memory
        is a copy: the step ops update the state in place."""
        stretches = block_segments(pos, T, self.period, per_block=False)
        if not cached and len(stretches) > 1 and (pos + stretches[-2][0]) % self.period == 0:
            stretches = stretches[:-2] + [(stretches[-2][0], T)]
        parts = [split_time(t, [b - a for a, b in stretches]) for t in inputs]
        outs = []
        for i, (a, b) in enumerate(stretches):
            xs = [p[i] for p in parts]
            step = cached and b - a == 1
            if (pos + a) % self.period == 0:
                block_state = memory_of(state).clone() if cached else memory_of(state)
                if not step:
                    o, state = self._scan(xs, state)
                    outs.append(o)
                    continue
            o, state = self._continue(xs, state, block_state, step)
            outs.append(o)
        if (pos + T) % self.period == 0:
            block_state = memory_of(state).clone() if cached else memory_of(state)
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0], state, block_state

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        h, g, gates = self.proj_in(x).split(self.splits, dim=-1)
        if self.conv is not None:
            h = self.conv(h, cache)
        gates = gates.view(B, T, -1, self.num_heads)
        mom = None
        if self.use_momentum:
            mom = torch.sigmoid(up(gates[:, :, -1]) + up(self.momentum_bias))
        pos = cache.get("pos", 0) if cache is not None else 0
        state = cache.get("state") if cache is not None else None
        state = self._initial_state(B) if state is None else state
        block_state = cache.get("block_state") if cache is not None else None
        block_state = memory_of(state) if block_state is None else block_state
        inputs = self._inputs(h, gates, mom)
        o, state, block_state = self._memory_pass(inputs, T, pos, state, block_state, cache is not None)
        if cache is not None:
            cache.update(state=state, block_state=block_state, pos=pos + T)
        # float32's epsilon: the memory starts empty and must be read at full scale from its first write
        # (eps = 1e-5 holds Titans period 1 on the MQAR plateau: 0.53 instead of 0.99 on seeds 0 and 1)
        return self.resid_dropout(self.proj(gated_readout(o, g)))
