"""torch.compile: every op is a registered `torch.library` op (opcheck), and every HOPE variant compiles
with fullgraph=True and no graph break, giving eager's outputs and gradients (torch backend, CPU)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import hope_kernels  # noqa: F401  (registers the ops)
from helpers import assert_close, randn

ops = torch.ops.hope_kernels
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "hope", "configs")


# --------------------------------------------------------------------------- opcheck of every op
def _scan_inputs(dtype, B=2, T=20, H=2, K=8, V=4, grad=True):
    return (randn(B, T, H, K, dtype=dtype, requires_grad=grad), randn(B, T, H, K, dtype=dtype, requires_grad=grad),
            randn(B, T, H, V, dtype=dtype, requires_grad=grad))


def _state(*shape, dtype, grad=False):
    return randn(*shape, dtype=dtype, requires_grad=grad)


def _gate(*shape, dtype, lo, hi, grad=True):
    g = (lo + (hi - lo) * torch.rand(*shape, dtype=torch.float32)).to(dtype)
    return g.requires_grad_(grad)


def _opcheck_cases():
    """(id, op, args) for every registered op: states, optional inputs and packed sequences covered."""
    cases = []
    for dt in (torch.float32, torch.float64):
        n = str(dt).split(".")[-1]
        sd = dt
        q, k, v = _scan_inputs(dt)
        cu = torch.tensor([0, 7, 20])
        cases += [
            (f"linear_attention-{n}", ops.linear_attention,
             (q, k, v, _state(2, 2, 8, 4, dtype=sd, grad=True), 0.3, True, True, None, 16, "torch")),
            (f"linear_attention-noncausal-{n}", ops.linear_attention,
             (q, k, v, None, 0.3, False, False, None, 16, "torch")),
            (f"linear_attention-packed-{n}", ops.linear_attention,
             (q[:1], k[:1], v[:1], _state(2, 2, 8, 4, dtype=sd, grad=True), 0.3, True, True, cu, 16, "torch")),
        ]
        tau = _gate(3, dtype=dt, lo=0.05, hi=0.95).detach().expand(2, 3).requires_grad_(False)
        tau_learn = _gate(2, 3, dtype=dt, lo=0.05, hi=0.95)
        cases += [
            (f"cms_scan-{n}", ops.cms_scan,
             (q, k, v, tau_learn, None, _state(2, 2, 3, 8, 4, dtype=sd, grad=True), 0.3, True, None, 16, "torch")),
            (f"cms_scan-mix-{n}", ops.cms_scan,
             (q, k, v, tau, randn(2, 20, 2, 3, dtype=dt, requires_grad=True), None, 0.3, False, None, 16, "torch")),
            (f"cms_scan-packed-{n}", ops.cms_scan,
             (q[:1], k[:1], v[:1], tau_learn, randn(2, 3, dtype=dt, requires_grad=True),
              _state(2, 2, 3, 8, 4, dtype=sd), 0.3, True, cu, 16, "torch")),
        ]
        lr = _gate(2, 20, 2, dtype=dt, lo=0.0, hi=0.5)
        decay = _gate(2, 20, 2, dtype=dt, lo=0.8, hi=1.0)
        mom = _gate(2, 20, 2, dtype=dt, lo=0.0, hi=0.9)
        kn = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_()
        cases += [
            (f"titans_scan-{n}", ops.titans_scan,
             (q, kn, v, lr, None, None, None, None, 0.3, 1, None, 16, "torch")),
            (f"titans_scan-momentum-{n}", ops.titans_scan,
             (q, kn, v, lr, decay, mom, _state(2, 2, 8, 4, dtype=sd, grad=True),
              _state(2, 2, 8, 4, dtype=sd, grad=True), 0.3, 4, None, 16, "torch")),
            (f"titans_scan-packed-{n}", ops.titans_scan,
             (q[:1], kn[:1], v[:1], lr[:1], decay[:1], None, _state(2, 2, 8, 4, dtype=sd), None, 0.3, 3, cu, 16,
              "torch")),
        ]
        q1, k1, v1 = (x[:, 0].detach() for x in (q, kn, v))
        cases += [
            (f"linear_attention_step-{n}", ops.linear_attention_step,
             (q1, k1, v1, _state(2, 2, 8, 4, dtype=sd), None, 0.3, 1e-6, "torch")),
            (f"linear_attention_step-normalize-{n}", ops.linear_attention_step,
             (q1, k1, v1, _state(2, 2, 8, 4, dtype=sd), _state(2, 2, 8, dtype=sd).abs(), 0.3, 1e-6, "torch")),
            (f"cms_step-{n}", ops.cms_step, (q1, k1, v1, tau, _state(2, 2, 3, 8, 4, dtype=sd), None, 0.3, "torch")),
            (f"cms_step-mix-{n}", ops.cms_step,
             (q1, k1, v1, tau, _state(2, 2, 3, 8, 4, dtype=sd), randn(2, 2, 3, dtype=dt), 0.3, "torch")),
            (f"titans_step-{n}", ops.titans_step,
             (q1, k1, v1, lr[:, 0].detach(), None, None, _state(2, 2, 8, 4, dtype=sd), None, None, 0.3, "torch")),
            (f"titans_step-momentum-block-{n}", ops.titans_step,
             (q1, k1, v1, lr[:, 0].detach(), decay[:, 0].detach(), mom[:, 0].detach(), _state(2, 2, 8, 4, dtype=sd),
              _state(2, 2, 8, 4, dtype=sd), _state(2, 2, 8, 4, dtype=sd), 0.3, "torch")),
            (f"ema_update_-stacked-{n}", ops.ema_update_,
             ([_state(3, 5, 4, dtype=dt)], [randn(5, 4, dtype=dt)], torch.tensor([0., .5, 1.], dtype=dt),
              False, False, "torch")),
            (f"ema_update_-list-{n}", ops.ema_update_,
             ([_state(5, 4, dtype=dt) for _ in range(3)], [randn(5, 4, dtype=dt) for _ in range(3)],
              torch.tensor([.1, .5, .9], dtype=dt), True, True, "torch")),
        ]
    return cases


CASES = _opcheck_cases()


@pytest.mark.parametrize("op, args", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opcheck(op, args):
    torch.library.opcheck(op, args)
