"""Readable token-by-token reference of the multi-timescale EMA update (ground truth for the tests).

Same signatures as the public ops minus `backend` / `chunk_size`; any floating dtype (float64 welcome).
Slow on purpose: one Python step per token, exactly the recurrences of DESIGN.md.
"""
from __future__ import annotations


def ema_update_(states, update, decay):
    """states[m] = tau_m states[m] + (1 - tau_m) update[m or shared], in place, for every m.

    states: [M, *shape] or a list of M tensors; update: [*shape] or [M, *shape]; decay: [M].
    """
    M = len(states)
    for m in range(M):
        tau = float(decay[m])
        u = update[m] if (isinstance(update, (list, tuple)) or update.dim() == states[m].dim() + 1) else update
        states[m].mul_(tau).add_(u.to(states[m].dtype), alpha=1 - tau)
    return states
