"""The self-modifying Titans memory (Nested Learning Eq. 83-93, matrix memories, chunk-wise) as one op.

Five memories per head share one state M = [M_k | M_v | M_eta | M_alpha | M_mem], [D, W] with
W = 3D + 2 (column blocks of widths D, D, 1, 1, D). Tokens are grouped in blocks of `period` from the
sequence start; for t in a block whose start memory is Mbar:

    r_t      = u_t Mbar                                             [W]
    k_t      = r_t[k] / sqrt(||r_t[k]||^2 + eps),   v_t = r_t[v] / sqrt(||r_t[v]||^2 + eps)
    lr_t     = (lr_max / period) sigmoid(r_t[eta] + lr_bias),   decay_t = sigmoid(r_t[alpha] + decay_bias)
    vhat_t   = v_t Mbar                                             self-generated values of all five memories
    G_t      = k_t^T (k_t Mbar - vhat_t)                            the gradient at the block start
    Z_t      = momentum_t Z_{t-1} - lr_t G_t                        (no momentum: Z_t = -lr_t G_t)
    M_t      = decay_t M_{t-1} + Z_t
    o_t      = scale q_t M_t[mem]                                   the output memory's read, [D]

i.e. titans_scan at `period` with keys k, values vhat and gates lr, decay read from the block-start
memory; a block's inputs depend on the previous block's result, so blocks run one after another.
See DESIGN.md ("titans_selfmod_scan").

`mem_period=1` gives the output memory M_mem its own period (the paper allows one period for M_mem and
one for the rest): inside a block it takes the exact online step, the gradient at M_mem,t-1 with the
step bound of period 1, while keys, values, gates and vhat stay read at the block start:

    M_mem,t  = decay_t M_mem,t-1 - lr'_t k_t^T (k_t M_mem,t-1 - vhat_t[mem]),   lr'_t = period * lr_t

(titans_scan at period 1 on the M_mem columns, so a block stays parallel: a delta rule with given keys
and values). With the step scaled by 1 / period a pair written inside a block comes back at most
lr_max / period strong; online, a step of 1 replaces the key's value (docs/findings.md).

Inside a block the online rule is the block rule with another left factor: with E' = v - gp k (gp_t the
decay before token t), A'_tj = (k_t . k_j) exp(LD_t - ld_t - LD_j) on j < t and lr' = period lr,

    X[mem] = R Mbar[mem],   R = (I + lr' A')^-1 (lr' E')          (the block rule: X[mem] = lr E Mbar[mem])

(vhat[mem] = v Mbar[mem] makes the delta rule's right-hand side E' Mbar[mem]), and o, M_end follow from X as
below; both paths compute R (the torch path by a triangular solve, the kernels by substitution).

backend="triton" without momentum (head size D <= 128, blocks of min(period, T) <= 64 tokens, either
mem_period) runs triton_selfmod.py: one forward and one backward kernel launch, a program per (batch x head)
looping over the blocks with the memory in an fp32 workspace (its module docstring). Momentum, and longer
blocks, run the torch path on any backend: a Python loop over blocks, each block one
chunk-parallel step of ~25 tensor ops vectorised over batch, heads and the block's tokens:
with X = lr (v - k) Mbar (= lr (vhat - k Mbar)) and the decay / momentum products D, M of
torch_chunked (C = D M, a = D mu, gamma_i = d_1 ... d_i),

    M_end = gamma_L Mbar + a_L Z_0 + (C[L, :] k)^T X,    Z_end = mu_L Z_0 + (M[L, :] k)^T X
    o     = scale (gamma q Mbar[mem] + a q Z_0[mem] + ((q k^T) * C) X[mem])
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import library, utils
from .ops import _check_gate, _check_period, _check_state, titans_step
from .torch_chunked import _decay_products, _momentum_products


def width(D: int) -> int:
    """Columns of the five memories [M_k | M_v | M_eta | M_alpha | M_mem] for head size D."""
    return 3 * D + 2


def _projections(u, Mbar, lr_bias, decay_bias, lr_max: float, period: int, eps: float):
    """(k, v, lr, log decay) of tokens u [B, H, L, D] from the block-start memory Mbar [B, H, D, W]."""
    D = u.shape[-1]
    r = u @ Mbar                              # all W columns: cheaper than a slice of Mbar in backward
    # one split (backward: one concatenation), not four slices (backward: a zero [.., W] buffer each)
    kk, vv, eta, alpha, _ = r.split([D, D, 1, 1, D], -1)
    eta, alpha = eta.squeeze(-1), alpha.squeeze(-1)
    k = kk * torch.rsqrt(kk.pow(2).sum(-1, keepdim=True) + eps)
    v = vv * torch.rsqrt(vv.pow(2).sum(-1, keepdim=True) + eps)
    lr = (lr_max / period) * torch.sigmoid(eta + lr_bias[:, None])
    return k, v, lr, F.logsigmoid(alpha + decay_bias[:, None])


def _online_factor(k, v, lr, LD, log_decay, period):
    """R = (I + lr' A')^-1 (lr' E') [B, H, L, D] of the online M_mem (module docstring, mem_period=1): a unit
    lower-triangular solve. k, v [B, H, L, D]; lr, log_decay [B, H, L]; LD = cumsum(log_decay) (float64)."""
    L = k.shape[-2]
    before = LD - log_decay.double()                                       # log of the decay before each token
    low = torch.ones(L, L, dtype=torch.bool, device=k.device).tril(-1)
    e = torch.where(low, (before[..., :, None] - LD[..., None, :]).clamp(max=0).exp(), 0.).to(k.dtype)
    lrp = (period * lr)[..., None]
    eye = torch.eye(L, dtype=k.dtype, device=k.device)
    rhs = lrp * (v - before.exp().to(k.dtype)[..., None] * k)
    return torch.linalg.solve_triangular(eye + lrp * ((k @ k.transpose(-1, -2)) * e), rhs, upper=False,
                                         unitriangular=True)


def _block(q, u, m, M, Z, lr_bias, decay_bias, scale, lr_max, period, eps, online_mem=False):
    """One block of L tokens from its start memory M (and Z): (o [B, H, L, D], M_end, Z_end); with online_mem
    the M_mem columns run the online rule (mem_period=1: X[mem] = R Mbar[mem]) and the rest the block rule."""
    D = q.shape[-1]
    dt = M.dtype
    k, v, lr, log_decay = _projections(u, M, lr_bias, decay_bias, lr_max, period, eps)
    LD = log_decay.double().cumsum(-1)
    if online_mem:
        rest = lr[..., None] * ((v - k) @ M[..., :2 * D + 2])
        X = torch.cat([rest, _online_factor(k, v, lr, LD, log_decay, period) @ M[..., 2 * D + 2:]], -1)
    else:
        X = lr[..., None] * ((v - k) @ M)                                  # [B, H, L, W]
    Dp = _decay_products(LD)
    gamma = LD.exp()
    mem = slice(2 * D + 2, None)
    if m is not None:
        Mm, mu = _momentum_products(m.double())
        C = Dp @ Mm
        a = (Dp @ mu[..., None])[..., 0]
    else:
        C = Dp
    C = C.to(dt)
    M_end = gamma[..., -1, None, None].to(dt) * M + (C[..., -1, :, None] * k).transpose(-1, -2) @ X
    o = (gamma.to(dt)[..., None] * (q @ M[..., mem]) + ((q @ k.transpose(-1, -2)) * C) @ X[..., mem])
    if m is not None:
        o = o + a.to(dt)[..., None] * (q @ Z[..., mem])
        M_end = M_end + a[..., -1, None, None].to(dt) * Z
        Z = mu[..., -1, None, None].to(dt) * Z + (Mm[..., -1, :, None].to(dt) * k).transpose(-1, -2) @ X
    return scale * o, M_end, Z


def selfmod_scan_torch(q, u, lr_bias, decay_bias, momentum, scale, lr_max, period, M, Z, eps, sd, mem_period=None):
    """The scan in `sd`: a loop over blocks of min(period, T) tokens. Returns (o [B, T, H, D] in sd, M, Z)."""
    B, T, H, D = q.shape
    if T == 0:
        return q.new_zeros(B, 0, H, D, dtype=sd), M, Z
    P = min(period, T)
    sizes = [P] * (T // P) + ([T % P] if T % P else [])
    heads = lambda x: x.to(sd).transpose(1, 2).split(sizes, 2)             # noqa: E731  [B, H, L, *] per block
    qs, us = heads(q), heads(u)
    ms = [None] * len(sizes) if momentum is None else heads(momentum)
    lr_bias, decay_bias = lr_bias.to(sd), decay_bias.to(sd)
    outs = []
    for qb, ub, mb in zip(qs, us, ms):
        o, M, Z = _block(qb, ub, mb, M, Z, lr_bias, decay_bias, scale, lr_max, period, eps, mem_period != period)
        outs.append(o)
    return torch.cat(outs, 2).transpose(1, 2), M, Z


def _check_inputs(q, u, lr_bias, decay_bias, lead: str):
    n = lead.count(",") + 2
    utils.check_tensor("q", q, n, layout=f"[{lead}, D]")
    if q.shape[-1] == 0:
        raise ValueError(f"q must have a head dimension D >= 1 [{lead}, D], got shape {tuple(q.shape)}")
    utils.check_tensor("u", u, n, shape=tuple(q.shape), layout=f"[{lead}, D] like q")
    device = utils.check_same_device(q=q, u=u, lr_bias=lr_bias, decay_bias=decay_bias)
    H = q.shape[-2]
    utils.check_tensor("lr_bias", lr_bias, 1, shape=(H,), layout="[H]")
    utils.check_tensor("decay_bias", decay_bias, 1, shape=(H,), layout="[H]")
    return device


def _check_number(name: str, x, lo: float, hi: float) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not (math.isfinite(x) and lo < x < hi):
        raise ValueError(f"{name} must be a finite number in ({lo:g}, {hi:g}), got {x}")
    return float(x)


def _check_mem_period(mem_period, period: int, momentum) -> int:
    """M_mem's period: None (the period) or 1 (the online rule, no momentum) -> an int."""
    if mem_period is None:
        return period
    mem_period = _check_period(mem_period)
    if mem_period not in (1, period):
        raise ValueError(f"mem_period must be None, 1 or period={period}, got {mem_period}")
    if mem_period != period and momentum is not None:
        raise ValueError("mem_period=1 needs momentum=None (M_mem's online rule has no momentum)")
    return mem_period


def titans_selfmod_scan(q, u, lr_bias, decay_bias, momentum=None, scale=None, *, lr_max, period, initial_state,
                        output_final_state=False, eps=1e-6, mem_period=None, backend=None):
    """The self-modifying Titans memory over whole sequences (module docstring for the math).

    Args:
        q, u: [B, T, H, D] (the read and the projection memories' input; float32, float16 or bfloat16).
        lr_bias, decay_bias: [H] (learned biases of the step and decay read from M_eta, M_alpha).
        momentum: [B, T, H] gate in [0, 1), optional.
        scale: multiplies q; defaults to D ** -0.5.
        lr_max: in (0, 2); the step is lr_max / period times a sigmoid.
        period: tokens per block (an integer >= 1; a value >= T is one block).
        initial_state: M_0 [B, H, D, 3D + 2] (the five memories' columns), or (M_0, Z_0) with momentum.
        mem_period: None (M_mem at `period` like the others) or 1 (M_mem by the online rule inside each
            block, module docstring; no momentum).
    Returns:
        o [B, T, H, D] in the input dtype, and the final state (float32; M, or (M, Z) with momentum)
        when output_final_state, else None. Differentiable in q, u, lr_bias, decay_bias, momentum,
        initial_state.
    """
    device = _check_inputs(q, u, lr_bias, decay_bias, "B, T, H")
    B, T, H, D = q.shape
    momentum = _check_gate("momentum", momentum, (B, T, H), device, "[B, T, H]")
    period = _check_period(period)
    mem_period = _check_mem_period(mem_period, period, momentum)
    lr_max = _check_number("lr_max", lr_max, 0., 2.)
    eps = _check_number("eps", eps, 0., math.inf)
    utils.require("initial_state", initial_state, "M_0 [B, H, D, 3D + 2] (or (M_0, Z_0) with momentum)")
    M0, Z0 = _check_state("initial_state", initial_state, momentum is not None, (B, H, D, width(D)), device,
                          "[B, H, D, 3D + 2]")
    scale = utils.resolve_scale(scale, D)
    backend, dtype, (q, u) = utils.prepare(backend, device, dict(q=q, u=u))
    sd = utils.state_dtype(dtype)
    M0 = M0.to(sd)
    Z0 = None if momentum is None else (torch.zeros_like(M0) if Z0 is None else Z0.to(sd))
    with utils.op_context(device):
        o, M, Z = _scan(q, u, lr_bias, decay_bias, momentum, M0, Z0, scale, lr_max, period, eps, mem_period, backend)
    if not output_final_state:
        return o, None
    return o, (M if momentum is None else (M, Z))


def _triton_case(q, momentum, period: int, backend: str) -> bool:
    """Whether the Triton kernels run this call (no momentum, a head size and block they take)."""
    if backend != "triton" or momentum is not None:
        return False
    from .triton_selfmod import supported
    return supported(q.shape[-1], q.shape[1], period)


def _scan_backward(grads, needs, q, u, lr_bias, decay_bias, momentum, M0, Z0, scale, lr_max, period, eps, mem_period,
                   backend):
    """The Triton backward kernel (no forward graph rebuilt); None (the vjp of the torch path) elsewhere."""
    if not _triton_case(q, momentum, period, backend) or q.shape[1] == 0:
        return None
    from .triton_selfmod import selfmod_backward
    do, dMT = library.present(grads[0]), library.present(grads[1])
    do = torch.zeros_like(q) if do is None else do.to(q.dtype).contiguous()
    dMT = None if dMT is None else dMT.to(torch.float32).contiguous()
    dq, du, dlrb, ddb, dM0 = selfmod_backward(q.contiguous(), u.contiguous(), lr_bias.float().contiguous(),
                                              decay_bias.float().contiguous(), M0.float().contiguous(), do, dMT,
                                              scale, lr_max, period, eps, mem_period != period)
    return dq, du, dlrb, ddb, None, dM0, None


@library.op("titans_selfmod_scan", differentiable=("q", "u", "lr_bias", "decay_bias", "momentum", "M0", "Z0"),
            backward=_scan_backward)
def _scan(q: Tensor, u: Tensor, lr_bias: Tensor, decay_bias: Tensor, momentum: Optional[Tensor], M0: Tensor,
          Z0: Optional[Tensor], scale: float, lr_max: float, period: int, eps: float, mem_period: int, backend: str
          ) -> Tuple[Tensor, Tensor, Tensor]:
    """(o in q's dtype, M_T, Z_T or None) of the checked inputs: the Triton kernels where `_triton_case`,
    else the torch loop over blocks."""
    if _triton_case(q, momentum, period, backend) and q.shape[1] > 0:
        from .triton_selfmod import selfmod_forward
        o, M = selfmod_forward(q.contiguous(), u.contiguous(), lr_bias.float().contiguous(),
                               decay_bias.float().contiguous(), M0.float().contiguous(), scale, lr_max, period, eps,
                               mem_period != period)
        return o, M, None
    o, M, Z = selfmod_scan_torch(q, u, lr_bias, decay_bias, momentum, scale, lr_max, period, M0, Z0, eps,
                                 utils.state_dtype(q.dtype), mem_period)
    return o.to(q.dtype), M, (Z if momentum is not None else None)


@library.fake(_scan)
def _scan_fake(q, u, lr_bias, decay_bias, momentum, M0, Z0, scale, lr_max, period, eps, mem_period, backend):
    M = M0.new_empty(M0.shape, dtype=utils.state_dtype(q.dtype))
    return q.new_empty(q.shape), M, (torch.empty_like(M) if momentum is not None else None)


def titans_selfmod_step(q, u, lr_bias, decay_bias, state, block_state, momentum=None, scale=None, *, lr_max,
                        period, eps=1e-6, mem_period=None, backend=None):
    """One token of titans_selfmod_scan for generation, updating `state` in place.

    q, u: [B, H, D]; momentum: [B, H]; state: M [B, H, D, 3D + 2] float32, or (M, Z) with momentum;
    block_state [B, H, D, 3D + 2]: the memory at the start of the token's block (the keys, values,
    step and decay are read from it; the caller refreshes it every `period` tokens); mem_period as in
    titans_selfmod_scan (1: M_mem's gradient at its current state, step lr_max * sigmoid). Returns
    (o [B, H, D] in the input dtype, state). Not differentiable (inference). Runs titans_step on
    `backend`.
    """
    device = _check_inputs(q, u, lr_bias, decay_bias, "B, H")
    B, H, D = q.shape
    period = _check_period(period)
    mem_period = _check_mem_period(mem_period, period, momentum)
    lr_max = _check_number("lr_max", lr_max, 0., 2.)
    eps = _check_number("eps", eps, 0., math.inf)
    utils.require("block_state", block_state, "the memory at the start of the token's block")
    utils.check_state("block_state", block_state, (B, H, D, width(D)), device, "[B, H, D, 3D + 2]")
    sd = block_state.dtype
    with torch.no_grad():
        k, v, lr, log_decay = _projections(u.to(sd)[:, :, None], block_state, lr_bias.to(sd),
                                           decay_bias.to(sd), lr_max, period, eps)
        vhat = (v @ block_state)[:, :, 0].to(q.dtype)
        k, lr, decay = k[:, :, 0].to(q.dtype), lr[:, :, 0], log_decay[:, :, 0].exp()
        if mem_period == period:
            o, state = titans_step(q, k, vhat, lr, state, decay, momentum, scale, block_state=block_state,
                                   backend=backend)
            return o[..., 2 * D + 2:], state
        rest, mem = slice(None, 2 * D + 2), slice(2 * D + 2, None)     # column views of the state, in place
        titans_step(q, k, vhat[..., rest], lr, state[..., rest], decay, None, scale, block_state=block_state[..., rest],
                    backend=backend)
        o, _ = titans_step(q, k, vhat[..., mem], period * lr, state[..., mem], decay, None, scale, backend=backend)
    return o, state
