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
             (q, k, v, tau_learn, None, _state(2, 2, 3, 8, 4, dtype=sd, grad=True), None, 0.3, True, None, 16, "torch")),
            (f"cms_scan-mix-{n}", ops.cms_scan,
             (q, k, v, tau, randn(2, 20, 2, 3, dtype=dt, requires_grad=True), None, None, 0.3, False, None, 16, "torch")),
            (f"cms_scan-packed-{n}", ops.cms_scan,
             (q[:1], k[:1], v[:1], tau_learn, randn(2, 3, dtype=dt, requires_grad=True),
              _state(2, 2, 3, 8, 4, dtype=sd), None, 0.3, True, cu, 16, "torch")),
        ]
        kd = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_()
        cases += [
            (f"cms_scan-delta-{n}", ops.cms_scan,
             (q, kd, v, tau_learn, randn(2, 20, 2, 3, dtype=dt, requires_grad=True),
              _state(2, 2, 3, 8, 4, dtype=sd, grad=True), _gate(2, 20, 2, dtype=dt, lo=0.0, hi=1.0), 0.3, True, None,
              16, "torch")),
        ]
        lr = _gate(2, 20, 2, dtype=dt, lo=0.0, hi=0.5)
        decay = _gate(2, 20, 2, dtype=dt, lo=0.8, hi=1.0)
        mom = _gate(2, 20, 2, dtype=dt, lo=0.0, hi=0.9)
        kn = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_()
        cases += [
            (f"titans_scan-{n}", ops.titans_scan,
             (q, kn, v, lr, None, None, None, None, 0.3, 1, "current", None, 16, "torch")),
            (f"titans_scan-momentum-{n}", ops.titans_scan,
             (q, kn, v, lr, decay, mom, _state(2, 2, 8, 4, dtype=sd, grad=True),
              _state(2, 2, 8, 4, dtype=sd, grad=True), 0.3, 4, "block_start", None, 16, "torch")),
            (f"titans_scan-packed-{n}", ops.titans_scan,
             (q[:1], kn[:1], v[:1], lr[:1], decay[:1], None, _state(2, 2, 8, 4, dtype=sd), None, 0.3, 3, "current", cu, 16,
              "torch")),
        ]
        W = 3 * 8 + 2   # the self-modifying memory's width at D = 8
        cases += [
            (f"titans_selfmod_scan-{n}", ops.titans_selfmod_scan,
             (q, k, _gate(2, dtype=dt, lo=-1.0, hi=1.0), _gate(2, dtype=dt, lo=-1.0, hi=1.0), None,
              (0.3 * randn(2, 2, 8, W, dtype=dt)).requires_grad_(), None, 0.3, 1.0, 4, 1e-6, 4, "torch")),
            (f"titans_selfmod_scan-online-mem-{n}", ops.titans_selfmod_scan,
             (q, k, _gate(2, dtype=dt, lo=-1.0, hi=1.0), _gate(2, dtype=dt, lo=-1.0, hi=1.0), None,
              (0.3 * randn(2, 2, 8, W, dtype=dt)).requires_grad_(), None, 0.3, 1.0, 4, 1e-6, 1, "torch")),
            (f"titans_selfmod_scan-momentum-{n}", ops.titans_selfmod_scan,
             (q, k, _gate(2, dtype=dt, lo=-1.0, hi=1.0), _gate(2, dtype=dt, lo=-1.0, hi=1.0), mom,
              (0.3 * randn(2, 2, 8, W, dtype=dt)).requires_grad_(), _state(2, 2, 8, W, dtype=sd, grad=True), 0.3,
              1.0, 3, 1e-6, 3, "torch")),
        ]
        q1, k1, v1 = (x[:, 0].detach() for x in (q, kn, v))
        cases += [
            (f"linear_attention_step-{n}", ops.linear_attention_step,
             (q1, k1, v1, _state(2, 2, 8, 4, dtype=sd), None, 0.3, 1e-6, "torch")),
            (f"linear_attention_step-normalize-{n}", ops.linear_attention_step,
             (q1, k1, v1, _state(2, 2, 8, 4, dtype=sd), _state(2, 2, 8, dtype=sd).abs(), 0.3, 1e-6, "torch")),
            (f"cms_step-{n}", ops.cms_step, (q1, k1, v1, tau, _state(2, 2, 3, 8, 4, dtype=sd), None, None, 0.3, "torch")),
            (f"cms_step-delta-{n}", ops.cms_step,
             (q1, k1, v1, tau, _state(2, 2, 3, 8, 4, dtype=sd), None, _gate(2, 2, dtype=dt, lo=0.0, hi=1.0).detach(), 0.3,
              "torch")),
            (f"cms_step-mix-{n}", ops.cms_step,
             (q1, k1, v1, tau, _state(2, 2, 3, 8, 4, dtype=sd), randn(2, 2, 3, dtype=dt), None, 0.3, "torch")),
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


def _triton_cases():
    """The Triton path (the interpreter on this CPU) inside the same registered ops: the fakes' shapes,
    dtypes and strides hold for it too, and its gradients go through the kernels' own backward."""
    dt = torch.float32
    q, k, v = _scan_inputs(dt, T=16, K=16, V=16)
    kn = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_()
    tau = _gate(2, 3, dtype=dt, lo=0.05, hi=0.95)
    lr = _gate(2, 16, 2, dtype=dt, lo=0.0, hi=0.5)
    return [
        ("linear_attention-triton", ops.linear_attention,
         (q, k, v, _state(2, 2, 16, 16, dtype=dt, grad=True), 0.3, True, True, None, 16, "triton")),
        ("cms_scan-triton", ops.cms_scan,
         (q, k, v, tau, randn(2, 3, dtype=dt, requires_grad=True), None, None, 0.3, True, None, 16, "triton")),
        ("titans_scan-triton", ops.titans_scan, (q, kn, v, lr, None, None, None, None, 0.3, 4, "block_start", None, 16, "triton")),
    ]


CASES = _opcheck_cases() + _triton_cases()


@pytest.mark.parametrize("op, args", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- every HOPE variant compiles
def _variants():
    from hope import HOPEConfig
    base = HOPEConfig.from_yaml(os.path.join(CONFIGS, "tiny.yaml"))
    return {
        "seed": base,
        "paper": HOPEConfig.from_yaml(os.path.join(CONFIGS, "hope_paper_tiny.yaml")),
        "hope_attention": HOPEConfig.from_yaml(os.path.join(CONFIGS, "hope_attention_tiny.yaml")),
        "titans": dataclasses.replace(base, attention="titans"),
        "linear": dataclasses.replace(base, attention="linear"),
    }


VARIANTS = list(_variants())
COMPILE_BACKEND = "aot_eager"   # dynamo + AOT autograd, no code generation (inductor: one test below)


def _model(name, seed=0, **overrides):
    """The variant's tiny model with one block (tracing time grows with the block count; blocks are alike)."""
    from hope import HOPE
    torch.manual_seed(seed)
    cfg = dataclasses.replace(_variants()[name], **{"num_layers": 1, **overrides})
    return HOPE(cfg, backend="torch")


def _tokens(B=2, T=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


def _loss_and_grads(model, x, y):
    logits, loss = model(x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)  # a short T leaves
    # the slowest CMS level unwritten: its weights get zero gradients, in eager and compiled alike
    return logits, loss, grads


@pytest.mark.parametrize("name", VARIANTS)
def test_compiled_training_step_equals_eager(name):
    """One graph, no graph break (fullgraph=True makes a break an error; dynamo's counters, which
    torch._dynamo.explain reads, stay empty); logits, loss, every parameter gradient and the
    parameters after one AdamW step equal eager's within the float32 tolerance."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager, x_y = _model(name), _tokens()
    model = _model(name)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    ref = _loss_and_grads(eager, *x_y)
    out = _loss_and_grads(compiled, *x_y)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert_close("logits", out[0], ref[0], torch.float32, "cpu")
    assert_close("loss", out[1], ref[1], torch.float32, "cpu")
    names = [n for n, p in eager.named_parameters() if p.requires_grad]
    for n, g, g_ref in zip(names, out[2], ref[2]):
        assert_close(f"d{n}", g, g_ref, torch.float32, "cpu", grad=True)
    for m, grads in ((eager, ref[2]), (model, out[2])):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for p, g in zip([p for p in m.parameters() if p.requires_grad], grads):
            p.grad = g
        opt.step()
    for (n, p), p_ref in zip(model.named_parameters(), eager.parameters()):
        assert_close(n, p, p_ref, torch.float32, "cpu")
    assert torch.isfinite(compiled(*x_y)[1])   # the stepped model runs compiled again


@pytest.mark.parametrize("name", VARIANTS)
def test_compiled_cached_generation_step(name):
    """A prompt and then one token through the cache, compiled (fullgraph) vs eager: same logits, same cache."""
    torch._dynamo.reset()
    model = _model(name).eval()
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    prompt, _ = _tokens(T=20)
    nxt = prompt[:, :1]
    with torch.no_grad():
        caches = model.new_cache(), model.new_cache()
        ref = [model(prompt, cache=caches[0])[0], model(nxt, cache=caches[0])[0]]
        out = [compiled(prompt, cache=caches[1])[0], compiled(nxt, cache=caches[1])[0]]
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_close(f"logits[{i}]", o, r, torch.float32, "cpu")
    assert caches[1].length == caches[0].length == 21


def test_inductor_compiles_the_seed_model():
    """The default backend (inductor, C++ code generation on the CPU) around the registered ops: the
    forward and loss equal eager's. (The backward graph is AOT autograd's, checked above with
    aot_eager; generating its C++ too takes minutes on a 2-core machine.)"""
    torch._dynamo.reset()
    model, (x, y) = _model("seed"), _tokens(T=16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        ref, out = model(x, y), compiled(x, y)
    assert_close("logits", out[0], ref[0], torch.float32, "cpu")
    assert_close("loss", out[1], ref[1], torch.float32, "cpu")
