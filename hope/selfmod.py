"""Self-modifying Titans (`attention="titans"`, `self_modifying=True`): the sequence memory of the
paper's HOPE. Nested Learning (Behrouz et al. 2025), Eq. 83-93 for
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
after the token's own update, the op's convention; (6) one period for all memories unless
`mem_period=1` (config `titans_mem_period`; the paper allows one period for M_mem and one for the
rest): M_mem then takes the exact online step inside each block, with keys, values and gates still read
at the block start (hope_kernels/titans/selfmod.py). Within a block the chunk-wise rule scales every
write by lr_max / period, so M_mem recalls a pair stored in the same block at most that strongly; the
online M_mem writes a unit step (docs/findings.md: it is what lets the paper's HOPE recall on MQAR).
The output norm and gate are the usual gated-delta-net read-out. With momentum, the one momentum gate m_t = sigmoid(x_t w_m + b_m) is a
static projection (the paper's set of memories has no momentum).

A forward is one `titans_selfmod_scan` call over the sequence; the cache continues a block token by
token with `titans_selfmod_step` (at most period - 1 of them), then runs the op (hope.titans).
"""
from __future__ import annotations

from typing import Optional

import torch

from .layers import l2norm, split_heads, up
from .ops import get_op
from .config import SELFMOD_INITS
from .titans import TitansLayer


def random_orthogonal(H: int, D: int) -> torch.Tensor:
    """H independent random orthogonal D x D matrices (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(H, D, D))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


class SelfModifyingTitans(TitansLayer):
    """Self-modifying Titans; see the module docstring. x: [B, T, dim] -> [B, T, dim]. `selfmod_init`:
    M_k, M_v at initialisation, "identity" or "orthogonal" (module docstring, Initial state);
    `mem_period`: M_mem's own period, None (the layer's) or 1 (module docstring, M_mem online); the
    other arguments are TitansLayer's."""

    streams = 2            # q and u
    static_gates = 0       # the memories M_eta and M_alpha give lr and decay

    def __init__(self, *args, selfmod_init: str = "identity", mem_period: Optional[int] = None, **kwargs):
        if selfmod_init not in SELFMOD_INITS:
            raise ValueError(f"selfmod_init must be one of {SELFMOD_INITS}, got {selfmod_init!r}")
        self.selfmod_init = selfmod_init     # read by _initial_memory, which the base __init__ calls
        super().__init__(*args, **kwargs)
        if mem_period not in (None, 1, self.period):
            raise ValueError(f"mem_period must be None, 1 or period={self.period}, got {mem_period!r}")
        self.mem_period = mem_period

    def _initial_memory(self, H: int, D: int) -> torch.Tensor:
        """[M_k | M_v | M_eta | M_alpha | M_mem]: M_k, M_v (module docstring), small read-outs, I."""
        eye = torch.eye(D).expand(H, D, D)
        M_k, M_v = (eye, eye) if self.selfmod_init == "identity" else (random_orthogonal(H, D), random_orthogonal(H, D))
        return torch.cat([M_k, M_v, 0.02 * torch.randn(H, D, 2), eye], -1)

    def _inputs(self, h, gates, mom):
        q, u = (split_heads(t, self.num_heads) for t in h.chunk(2, dim=-1))
        return l2norm(q), up(u), mom

    def _scan(self, inputs, state):
        q, u, mom = inputs
        return get_op("titans_selfmod_scan", self.backend)(
            q, u, self.lr_bias, self.decay_bias, mom, 1.0, lr_max=self.lr_max, period=self.period, initial_state=state,
            output_final_state=True, mem_period=self.mem_period)

    def _continue(self, inputs, state, block_state, step: bool):
        q, u, mom = inputs   # one token at a time, in place
        outs = []
        for t in range(q.shape[1]):
            o, state = get_op("titans_selfmod_step", self.backend)(
                q[:, t], u[:, t], self.lr_bias, self.decay_bias, state, block_state,
                None if mom is None else mom[:, t], 1.0, lr_max=self.lr_max, period=self.period,
                mem_period=self.mem_period)
            outs.append(o)
        return torch.stack(outs, 1), state
