"""DeepMomentum: momentum as an associative memory of past gradients (Nested Learning).

Notation per parameter tensor W with gradient g_t = dL/dW (plus nothing else: weight decay is
decoupled), timescales beta_1..beta_J (`betas`), and J momentum buffers m^(j) (one [J, *W.shape]
tensor, updated in one launch through `hope_kernels.ema_update_`):

    m^(j)_t = beta_j m^(j)_{t-1} + (1 - beta_j) g_t                 (multi-timescale memory of gradients)

Plain momentum (deep=False): the memory is linear and read by averaging the timescales,

    d_t = (1/J) sum_j m^(j)_t

(J = 1 is classical momentum in EMA form: the buffer is the minimiser of an exponentially weighted
L2 regression onto the past gradients, i.e. an associative memory that compresses them).

Deep momentum (deep=True), after Deep Momentum Gradient Descent: the read-out is a small MLP
memory f_phi: R^J -> R shared by all coordinates of all tensors of a parameter group, acting
coordinate-wise on the (scale-normalised) gradient history x_i = m_{t,i} / s_t, s_t = rms(g_t) + eps:

    f_phi(x) = a . x + w_2 . tanh(W_1 x + b_1)      (a = 1/J, w_2 = 0 at start: f starts as plain momentum)

f is an associative memory with keys = gradient histories and values = gradients, trained online by
its own inner objective, one step per optimizer step (after the buffers absorbed g_t):

    l_t(phi) = 1/2 mean_i (f_phi(m_{t,i} / s_t) - g_{t,i} / s_t)^2     (over the group's coordinates)
    u_t      = alpha u_{t-1} - eta_t grad_phi l_t(phi),  phi <- phi + u_t   (alpha = memory_momentum)
    eta_t    = memory_lr / (1 + mean_i |x_i|^2)      (normalised-LMS step: stable at any gradient scale)

and the update is the trained memory's read of that history (its estimate of the descent direction,
learned from every gradient seen so far):

    d_t = s_t f_phi(m_{t,i} / s_t)

Both variants finish with (normalize=True divides d_t by its RMS per tensor, making lr the RMS step)

    W <- W - lr * (d_t + weight_decay * W)         (weight decay decoupled, AdamW style)

`memory_samples` caps the coordinates per tensor used in l_t (a strided subset that moves every
step; reads always cover every coordinate). state_dict() holds the buffers, the memory phi and its
velocity u (in the state of each group's first parameter), so save / load round-trips exactly.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch.optim import Optimizer

from .ops import get_op

MEMORY_KEYS = ("a", "w1", "b1", "w2")


class DeepMomentum(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Sequence[float] = (0.9,), *,
                 weight_decay: float = 0.0, deep: bool = False, normalize: bool = False,
                 memory_hidden: int = 16, memory_lr: float = 1e-2, memory_momentum: float = 0.9,
                 memory_samples: int = 4096, eps: float = 1e-8, backend: Optional[str] = None):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        betas = tuple(float(b) for b in (betas if isinstance(betas, (list, tuple)) else [betas]))
        if not betas or any(not 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be a non-empty list of timescales in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if memory_hidden <= 0 or memory_samples <= 0:
            raise ValueError("memory_hidden and memory_samples must be positive")
        if not 0.0 <= memory_momentum < 1.0:
            raise ValueError(f"memory_momentum must be in [0, 1), got {memory_momentum}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, deep=deep, normalize=normalize,
                        memory_hidden=memory_hidden, memory_lr=memory_lr, memory_momentum=memory_momentum,
                        memory_samples=memory_samples, eps=eps)
        super().__init__(params, defaults)
        self.backend = backend
        get_op("ema_update_", backend)  # validates backend

    # ------------------------------------------------------------------ the MLP memory
    @staticmethod
    def _new_memory(J: int, hidden: int, device) -> dict:
        g = torch.Generator().manual_seed(0)
        return {"a": torch.full((J,), 1.0 / J, device=device),
                "w1": (torch.randn(hidden, J, generator=g) / math.sqrt(J)).to(device),
                "b1": torch.zeros(hidden, device=device),
                "w2": torch.zeros(hidden, device=device)}

    @staticmethod
    def _read(mem: dict, x: torch.Tensor) -> torch.Tensor:
        """f_phi(x) for x: [n, J] -> [n]."""
        return x @ mem["a"] + torch.tanh(x @ mem["w1"].t() + mem["b1"]) @ mem["w2"]

    def _memory_state(self, group) -> tuple:
        st = self.state[group["params"][0]]
        if "memory" not in st:
            dev = group["params"][0].device
            st["memory"] = self._new_memory(len(group["betas"]), group["memory_hidden"], dev)
            st["memory_velocity"] = {k: torch.zeros_like(v) for k, v in st["memory"].items()}
        return st["memory"], st["memory_velocity"]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ema = get_op("ema_update_", self.backend)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            J, eps = len(group["betas"]), group["eps"]
            decay = torch.tensor(group["betas"], dtype=torch.float32, device=params[0].device)
            scales, states = [], []
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("DeepMomentum does not support sparse gradients")
                st = self.state[p]
                if "momentum" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["momentum"] = torch.zeros((J, *p.shape), dtype=torch.float32, device=p.device)
                st["step"] += 1
                states.append(st)
                scales.append(p.grad.float().pow(2).mean().sqrt() + eps)
            for p, st in zip(params, states):
                ema(st["momentum"], p.grad.float(), decay)
            if group["deep"]:
                self._train_memory(group, params, states, scales)
            mem = self._memory_state(group)[0] if group["deep"] else None
            for p, st, s in zip(params, states, scales):
                buf = st["momentum"]
                if mem is None:
                    d = buf.mean(0)
                else:
                    d = s * self._read(mem, buf.reshape(J, -1).t() / s).view(p.shape)
                if group["normalize"]:
                    d = d / (d.pow(2).mean().sqrt() + eps)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(d.to(p.dtype), alpha=-group["lr"])
        return loss

    def _train_memory(self, group, params, states, scales) -> None:
        """One momentum-SGD step of the memory on l_t (see the module docstring)."""
        mem, vel = self._memory_state(group)
        J, n = len(group["betas"]), group["memory_samples"]
        xs, ys = [], []
        for p, st, s in zip(params, states, scales):
            hist, g = st["momentum"].reshape(J, -1), p.grad.reshape(-1).float()
            stride = max(1, g.numel() // n)
            idx = torch.arange(int(st["step"].item()) % stride, g.numel(), stride, device=g.device)[:n]
            xs.append(hist[:, idx].t() / s)
            ys.append(g[idx] / s)
        x, y = torch.cat(xs), torch.cat(ys)
        eta = group["memory_lr"] / (1.0 + x.pow(2).sum(-1).mean().item())
        with torch.enable_grad():
            phi = {k: v.detach().requires_grad_(True) for k, v in mem.items()}
            loss = 0.5 * (self._read(phi, x) - y).pow(2).mean()
            grads = torch.autograd.grad(loss, [phi[k] for k in MEMORY_KEYS])
        for k, gk in zip(MEMORY_KEYS, grads):
            vel[k].mul_(group["memory_momentum"]).add_(gk, alpha=-eta)
            mem[k].add_(vel[k])
