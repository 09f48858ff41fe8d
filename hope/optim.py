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
learned from every gradient seen so far), bounded around plain momentum p = (1/J) sum_j x_j per tensor:

    d_t = s_t (p + c (f_phi(x) - p)),    c = min(1, rho rms(p) / rms(f_phi(x) - p)),   rho = READ_BOUND = 1/2

so rms(d_t / s_t - p) <= rho rms(p): the memory turns the update at most arcsin(rho) = 30 degrees away
from plain momentum and scales it by 1 +- rho. d_t is a descent direction wherever momentum is one, of
plain momentum's size: deep momentum is stable at every lr where plain momentum is. (Unbounded, the
memory learns to read against momentum when the gradients oscillate: at memory_lr 0.1 on the tiny
config its read had cosine -0.35 with plain momentum by step 25, and the loss rose.)

Both variants finish with (normalize=True divides d_t by its RMS per tensor, making lr the RMS step)

    W <- W - lr * (d_t + weight_decay * W)         (weight decay decoupled, AdamW style)

Stable range (measured on the tiny config, 30 steps, linear warmup to lr at step 20, 5 seeds, under
ATEN_CPU_CAPABILITY=avx2 and =default). With normalize=True, lr is the RMS step of every tensor; a
coordinate that carries most of its tensor's gradient moves up to sqrt(numel) lr (20-40 lr on the tiny
model's embedding). lr 1e-3 converges on every seed and float path; at 3e-3 the validation loss jumps
by ~0.6 nats between steps near the peak (plain momentum too), and whether a run ends on such a spike
depends on the float rounding (one run of ten ended at 5.1 nats, near the initial 5.4); at 1e-2 it
spikes above the uniform loss. At lr 3e-3, memory_lr 0.01 to 0.1 end alike (2.9-3.3 nats on the runs
that do not spike); without the read-out bound, memory_lr 0.03 ended one run of ten at 5.05 and 0.1
ended seed 0 at 4.0-4.1 on both float paths. The normalised inner step is stable in the memory's linear
part for memory_lr < 2 (1 + memory_momentum) (heavy ball on a quadratic of curvature <= mean |x|^2).

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
# The deep read may differ from plain momentum by at most this fraction of it (RMS over a tensor).
READ_BOUND = 0.5


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

    @classmethod
    def _bounded_read(cls, mem: dict, x: torch.Tensor, eps: float) -> torch.Tensor:
        """p + c (f_phi(x) - p), p = mean_j x_j, c = min(1, READ_BOUND rms(p) / rms(f_phi(x) - p)):
        the read of one tensor's histories x: [n, J] -> [n], within READ_BOUND of plain momentum."""
        plain = x.mean(-1)
        dev = cls._read(mem, x) - plain
        return plain + dev * (READ_BOUND * _rms(plain) / (_rms(dev) + eps)).clamp(max=1.0)

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
                    d = s * self._bounded_read(mem, buf.reshape(J, -1).t() / s, eps).view(p.shape)
                if group["normalize"]:
                    d = d / (_rms(d) + eps)
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


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean().sqrt()
