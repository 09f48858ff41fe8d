"""hope layers: the same weights give the same outputs and gradients on "triton" (interpreter on CPU),
"torch" and the token-by-token references (run in float64)."""
import copy
import functools
from unittest import mock

import pytest
import torch

import hope.block
import hope_kernels
from hope import AssociativeMemory, CMSLayer, HOPEBlock, HOPEConfig, LinearAttention, SoftmaxAttention, get_op
from hope.cms import default_taus
from hope.layers import MLP, Embeddings, RMSNorm, RotaryEmbedding
from helpers import assert_close

FAST = ["triton", "torch"]
D, H, M, B, T = 32, 2, 3, 2, 24



def _layers():
    # CMS layers without the gated read-out: rmsnorm(o) is the same torch code on every backend and
    # normalises each row of the memory's read, blowing the fp32 rounding of near-empty rows (the
    # first tokens) up to ~1e-3; the memory op's agreement is what differs between backends.
    # gated_readout is tested on its own (test_gated_readout).
    return {
        "linear_attention": lambda: LinearAttention(D, H, normalize=True),
        "linear_attention_unnormalized": lambda: LinearAttention(D, H, normalize=False),
        "cms_data_mix": lambda: CMSLayer(D, H, M, gated_readout=False),
        "cms_static_mix_shared_tau": lambda: CMSLayer(D, H, M, per_head_tau=False, data_dependent_mix=False,
                                                      gated_readout=False),
        "cms_outer": lambda: CMSLayer(D, H, M, update="outer", gated_readout=False),
        "cms_gated": lambda: CMSLayer(D, H, M),
        "cms_outer_static_mix_plain": lambda: CMSLayer(D, H, M, update="outer", data_dependent_mix=False,
                                                       gated_readout=False, conv_size=1),
        "softmax_attention": lambda: SoftmaxAttention(D, H),
        "block_softmax": lambda: _ungated_block("softmax"),
        "block_linear": lambda: _ungated_block("linear"),
    }


def _ungated_block(attention):
    """A HOPE block whose CMS reads out without the gate (the CMS ablation's design)."""
    cms = functools.partial(hope.block.make_cms, gated_readout=False)
    with mock.patch.object(hope.block, "make_cms", cms):
        return HOPEBlock(HOPEConfig(dim=D, num_heads=H, num_memory_modules=M, attention=attention))


def _randomize(module):
    """Non-trivial weights everywhere (gates, tau, norms), so every path matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "tau_logit" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return module


def _set_backend(module, backend):
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return module


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", [n for n in _layers() if n != "cms_gated"])
def test_layer_matches_reference(name, backend):
    layer = _randomize(_layers()[name]())
    ref = _set_backend(copy.deepcopy(layer).double(), "reference")
    _set_backend(layer, backend)
    x = torch.randn(B, T, D, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    out, out_ref = layer(x), ref(x64)
    assert_close(f"{name} output", out, out_ref, torch.float32, "cpu")
    w = torch.randn_like(out_ref)
    (out * w.float()).sum().backward()
    (out_ref * w).sum().backward()
    assert_close(f"{name} dx", x.grad, x64.grad, torch.float32, "cpu", grad=True)
    for (n, p), (_, p_ref) in zip(layer.named_parameters(), ref.named_parameters()):
        assert_close(f"{name} d{n}", p.grad, p_ref.grad, torch.float32, "cpu", grad=True)


@pytest.mark.parametrize("name", ["linear_attention", "cms_data_mix", "cms_static_mix_shared_tau", "cms_outer",
                                  "cms_gated", "softmax_attention"])
def test_layer_cache_continues_sequence(name):
    """Prefill on x[:, :t], then a chunk, then single tokens (the step ops): same as one call on x."""
    layer = _set_backend(_randomize(_layers()[name]()), "torch").eval()
    x = torch.randn(B, T, D)
    full = layer(x)
    cache = {}
    parts = [layer(x[:, :10], cache), layer(x[:, 10:20], cache)] + [layer(x[:, t:t + 1], cache) for t in range(20, T)]
    assert_close(f"{name} cached", torch.cat(parts, 1), full, torch.float32, "cpu")


def test_get_op_mapping():
    assert get_op("cms_scan", "reference") is hope_kernels.reference.cms_scan
    f = get_op("linear_attention", "torch")
    assert f.func is hope_kernels.linear_attention and f.keywords == {"backend": "torch"}
    with pytest.raises(ValueError, match="backend"):
        get_op("cms_scan", "cuda")
    with pytest.raises(ValueError, match="backend"):
        CMSLayer(D, H, M, backend="fast")


def test_cms_timescales():
    tau = default_taus(5, 0.01, 0.99)
    assert abs(tau[0] - 0.01) < 1e-12 and abs(tau[-1] - 0.99) < 1e-12
    horizons = 1 / (1 - tau)
    ratios = horizons[1:] / horizons[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))    # geometric spread of memory horizons
    layer = CMSLayer(D, H, 5)
    assert torch.allclose(layer.decay().double(), tau.expand(H, -1), atol=1e-6)
    assert isinstance(layer.tau_logit, torch.nn.Parameter)
    fixed = CMSLayer(D, H, 5, learn_tau=False, per_head_tau=False)
    assert "tau_logit" not in dict(fixed.named_parameters()) and fixed.decay().shape == (5,)
    with pytest.raises(ValueError, match="tau"):
        default_taus(3, 0.5, 1.0)


def test_cms_gates_are_data_dependent_and_normalised():
    layer = _randomize(CMSLayer(D, H, M))
    x = torch.randn(B, T, D)
    g = layer.mixing(x)
    assert g.shape == (B, T, H, M)
    assert torch.allclose(g.sum(-1), torch.ones(B, T, H))
    assert not torch.allclose(g[:, 0], g[:, 1])


def test_learnable_tau_receives_gradient():
    layer = _set_backend(_randomize(CMSLayer(D, H, M)), "torch")
    layer(torch.randn(B, T, D)).square().sum().backward()
    assert layer.tau_logit.grad is not None and layer.tau_logit.grad.abs().sum() > 0


def test_small_layers():
    x = torch.randn(B, T, D)
    y = RMSNorm(D)(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(B, T), atol=1e-4)
    assert MLP(D, 4 * D)(x).shape == x.shape
    rot = RotaryEmbedding(8)
    q = torch.randn(1, T, 1, 8)
    r = rot(q)
    assert torch.allclose(r.norm(dim=-1), q.norm(dim=-1), atol=1e-5)       # a rotation
    # relative: <rot(q, s), rot(k, s)> depends only on the offset difference
    k = torch.randn(1, 1, 1, 8)
    a = (rot(q[:, :1], 3) * rot(k, 5)).sum()
    b = (rot(q[:, :1], 10) * rot(k, 12)).sum()
    assert torch.allclose(a, b, atol=1e-5)
    emb = Embeddings(50, D, max_seq_len=16, position="learned")
    assert emb(torch.randint(0, 50, (B, 16))).shape == (B, 16, D)
    with pytest.raises(ValueError, match="max_seq_len"):
        emb(torch.randint(0, 50, (B, 4)), offset=14)


def test_associative_memory_recall_and_capacity():
    mem = AssociativeMemory(16, 8, capacity=32, temperature=0.01)
    keys, values = torch.randn(40, 16), torch.randn(40, 8)
    with pytest.raises(RuntimeError, match="empty"):
        mem(keys[:1])
    mem.store(keys[:20], values[:20])
    assert len(mem) == 20
    assert_close("recall", mem(keys[:20]), values[:20], torch.float32, "cpu")
    mem.store(keys[20:], values[20:])              # 40 pairs into 32 slots: the 8 oldest are gone
    assert len(mem) == 32
    assert_close("recall newest", mem(keys[8:]), values[8:], torch.float32, "cpu")
    # a high temperature reads the average of the stored values
    soft = AssociativeMemory(16, 8, capacity=32, similarity="dot", temperature=1e6)
    soft.store(keys[:10], values[:10])
    assert_close("average", soft(keys[:1])[0], values[:10].mean(0), torch.float32, "cpu")
    # differentiable in the query and in the stored pairs (detach=False)
    diff = AssociativeMemory(16, 8, capacity=8, temperature=0.5)
    k, v = keys[:4].clone().requires_grad_(True), values[:4].clone().requires_grad_(True)
    diff.store(k, v, detach=False)
    q = torch.randn(3, 16, requires_grad=True)
    diff(q).sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="keys"):
        mem.store(torch.randn(2, 15), torch.randn(2, 8))


def test_gated_readout():
    """y = rmsnorm(o) per head (no weight) * silu(g), against float64; the default CMS layer uses it and
    its cached steps continue the sequence (test_layer_cache_continues_sequence[cms_gated])."""
    from hope.layers import gated_readout
    torch.manual_seed(0)
    o, g = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 24)
    o[0, 0] = 1e-30                                          # an empty memory reads finite values
    y = gated_readout(o, g)
    o64 = o.double()
    want = (o64 / torch.sqrt(o64.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)).reshape(2, 5, 24)
    want = want * torch.nn.functional.silu(g.double())
    assert y.shape == (2, 5, 24) and torch.isfinite(y).all()
    assert_close("gated read-out", y, want, torch.float32, "cpu")
    assert CMSLayer(D, H, M).out_gate is not None and CMSLayer(D, H, M, gated_readout=False).out_gate is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_matches_grouped_conv1d(dtype):
    """ShortConv (shifted multiply-adds with a hand-written backward) against a float64 causal grouped
    conv1d over [cached history, x]: the output and the gradients of x, the weight and the history."""
    from hope.layers import ShortConv
    from helpers import as_ref, poisoned, randn
    torch.manual_seed(0)
    Bc, Tc, C, w = 2, 7, 5, 4
    conv = ShortConv(C, w, init="uniform").to(dtype)
    x = randn(Bc, Tc, C, dtype=dtype, requires_grad=True)
    hist = randn(Bc, w - 1, C, dtype=dtype, requires_grad=True)
    dy = randn(Bc, Tc, C, dtype=dtype)
    cache = {"conv": hist}
    y = poisoned(Bc, Tc, C, dtype=dtype)
    y.copy_(conv(x, cache))
    y_graph = conv(x, {"conv": hist})
    y_graph.backward(dy)
    x64, h64, w64 = as_ref(x), as_ref(hist), as_ref(conv.weight)
    want = torch.nn.functional.conv1d(torch.cat([h64, x64], 1).transpose(1, 2), w64[:, None], groups=C).transpose(1, 2)
    want.backward(dy.double())
    assert_close("short conv", y, want, dtype, "cpu")
    assert_close("short conv (graph)", y_graph, want, dtype, "cpu")
    for name, got, ref in (("dx", x.grad, x64.grad), ("dweight", conv.weight.grad, w64.grad),
                           ("dhistory", hist.grad, h64.grad)):
        assert_close(name, got, ref, dtype, "cpu", grad=True)
    assert torch.equal(cache["conv"], torch.cat([hist, x], 1)[:, -(w - 1):])


def _delta_cms_on_titans(layer, x):
    """The delta-rule CMS layer written on titans_scan (period 1) with the M memories of a head as M
    heads of one scan: the form the layer had before it ran on cms_scan(beta=...)."""
    from hope.cms import READOUT_EPS
    from hope.layers import gated_readout, split_heads
    from hope.layers import l2norm, up
    Bx, Tx, _ = x.shape
    Mm = layer.num_memories
    qkv = layer.qkv(x) if layer.conv is None else layer.conv(layer.qkv(x), None)
    q, k, v = (split_heads(t, layer.num_heads) for t in qkv.chunk(3, dim=-1))
    Hh, Dd = q.shape[2], q.shape[3]
    fold = lambda t: t.unsqueeze(3).expand(Bx, Tx, Hh, Mm, t.shape[-1]).reshape(Bx, Tx, Hh * Mm, t.shape[-1])
    beta = torch.sigmoid(up(layer.beta(x)))[..., None].expand(Bx, Tx, Hh, Mm).reshape(Bx, Tx, Hh * Mm)
    tau = layer.decay().expand(Hh, Mm).reshape(1, 1, Hh * Mm).expand(Bx, Tx, Hh * Mm)
    o, _ = hope_kernels.titans_scan(fold(l2norm(q)), fold(l2norm(k)), fold(v), beta, tau, None, 1.0, period=1,
                                    backend="torch")
    o = (o.view(Bx, Tx, Hh, Mm, Dd) * layer.mixing(x).to(o.dtype)[..., None]).sum(3)
    y = o.reshape(Bx, Tx, -1) if layer.out_gate is None else gated_readout(o, layer.out_gate(x), READOUT_EPS)
    return layer.proj(y)


@pytest.mark.parametrize("kwargs", [{}, dict(bias=True), dict(update="outer", data_dependent_mix=False,
                                                             gated_readout=False)], ids=["default", "bias", "outer"])
def test_cms_one_input_matmul_is_the_linear_modules(kwargs):
    """The layer's single input matmul gives each of its Linear modules' own outputs (those it has),
    and its parameters are exactly those modules' (a checkpoint's keys are unchanged)."""
    layer = _randomize(CMSLayer(D, H, M, **kwargs))
    x = torch.randn(B, T, D)
    p = layer._projections(x)
    for name in ("qkv", "out_gate", "gate", "beta"):
        m = getattr(layer, name)
        assert (p[name] is None) == (m is None), name
        if m is not None:
            assert_close(name, p[name], m(x).double(), torch.float32, "cpu")
    linears = {f"{n}.{w}" for n in ("qkv", "out_gate", "gate", "beta", "proj") if getattr(layer, n) is not None
               for w in ("weight", "bias") if getattr(getattr(layer, n), w) is not None}
    assert linears <= set(layer.state_dict()) and set(layer.state_dict()) - linears <= {"conv.weight", "tau_logit",
                                                                                         "mix_logit"}


@pytest.mark.parametrize("kwargs", [{}, dict(per_head_tau=False, data_dependent_mix=False, conv_size=1),
                                    dict(gated_readout=False)], ids=["default", "static", "plain"])
def test_delta_cms_equals_the_titans_form(kwargs):
    """Same weights, same outputs (float32 rounding) and gradients as the titans_scan-based form, so a
    checkpoint of that form loads and computes the same function."""
    layer = _set_backend(_randomize(CMSLayer(D, H, M, **kwargs)), "torch")
    x = torch.randn(B, T, D, requires_grad=True)
    y, y_old = layer(x), _delta_cms_on_titans(layer, x)
    assert_close("output", y, y_old.double(), torch.float32, "cpu")
    w = torch.randn_like(y)
    g = torch.autograd.grad((y * w).sum(), [x, *layer.parameters()])
    g_old = torch.autograd.grad((y_old * w).sum(), [x, *layer.parameters()])
    for n, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], g, g_old):
        assert_close("d" + n, a, b.double(), torch.float32, "cpu", grad=True)


def test_delta_cms_model_logits_equal_the_titans_form(monkeypatch):
    """A seed HOPE model (delta-rule CMS): the same weights give the same logits as with every CMS layer
    computed in the titans_scan-based form."""
    from hope import HOPE
    torch.manual_seed(0)
    model = HOPE(vocab_size=64, dim=D, num_layers=2, num_heads=H, num_memory_modules=M, backend="torch")
    tokens = torch.randint(0, 64, (B, T))
    with torch.no_grad():
        logits, _ = model(tokens)
        monkeypatch.setattr(CMSLayer, "forward", lambda self, x, cache=None: _delta_cms_on_titans(self, x))
        old, _ = model(tokens)
    assert_close("logits", logits, old.double(), torch.float32, "cpu")
