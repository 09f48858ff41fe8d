"""The PyTorch path of `ema_update_` (the "torch" backend): vectorised, no loop over elements.

    states[m] <- states[m] + (1 - tau_m) (update[m or shared] - states[m])     (torch.lerp)

Math in float32 (float64 for float64 states), rounded once to the state dtype. A stacked `[M, *shape]`
state is one lerp of the whole stack; a list is one `torch._foreach_lerp_` (no copy of the states when
they are float32), so either form is a handful of kernels whatever M is.
"""
from __future__ import annotations

import torch


def ema_update_torch(p) -> None:
    """The update of a checked `ops.Plan`: lerp on the stacked view, torch._foreach_lerp_ over a list."""
    dtype = p.state_tensors()[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (1 - p.tau.to(acc)).view(p.M, *([1] * len(p.shape)))  # lerp weight: s + w (u - s)
    if p.u is None:
        u = torch.stack(p.u_list)
    else:
        u = p.u
    if p.s is not None:
        if dtype == acc:
            p.s.lerp_(u.to(acc), w)
        else:
            p.s.copy_(torch.lerp(p.s.to(acc), u.to(acc), w))
        return
    if dtype == acc:
        us = [u.to(acc)] * p.M if p.shared else list(u.to(acc).unbind(0))
        torch._foreach_lerp_(p.s_list, us, list(w.expand(p.M, *p.shape).unbind(0)))
    else:
        s = torch.lerp(torch.stack(p.s_list).to(acc), u.to(acc), w)
        torch._foreach_copy_(p.s_list, list(s.unbind(0)))
