"""The Titans layer, the paper's CMS levels and the HOPE variants built on them.

- The layers equal independent token-by-token float64 implementations of their equations
  (self-modifying Titans with five separate memories; an MLP level with autograd inner gradients).
- Every variant trains end to end (a gradient for every outer parameter, learned initial memories
  included), is causal, and generates with caches exactly what recomputing the prefix generates.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hope import HOPE, HOPEConfig
from hope.layers import block_segments
from hope.levels import LinearLevel, MLPLevel
from hope.selfmod import SelfModifyingTitans
from hope.titans import TitansLayer
from helpers import rel_err, tolerance

V = 61
SMALL = dict(vocab_size=V, dim=32, num_layers=2, num_heads=4, max_seq_len=64)
VARIANTS = {
    "titans": dict(attention="titans", titans_period=4),
    "titans-momentum-period1": dict(attention="titans", titans_period=1, titans_momentum=True),
    "self-modifying": dict(attention="titans", self_modifying=True, titans_period=4, cms="none"),
    "paper": dict(attention="titans", self_modifying=True, titans_period=4, cms="levels", cms_periods=[4, 8]),
    "paper-orthogonal-period1": dict(attention="titans", self_modifying=True, titans_selfmod_init="orthogonal",
                                     titans_period=1, cms="levels", cms_periods=[4, 8]),
    "paper-online-mem": dict(attention="titans", self_modifying=True, titans_selfmod_init="orthogonal",
                             titans_period=4, titans_mem_period=1, cms="levels", cms_periods=[4, 8]),
    "paper-momentum-mlp": dict(attention="titans", self_modifying=True, titans_momentum=True, titans_period=4,
                               cms="levels", cms_memory="mlp", cms_periods=[4, 16]),
    "hope-attention": dict(attention="softmax", cms="levels", cms_periods=[4, 8]),
}


def memory_layer(dim, heads, head_dim, *, self_modifying, read_with_key, momentum, conv_window,
                 selfmod_init="identity", **kw):
    """Titans, self-modifying Titans (M_k, M_v initialised by selfmod_init), or a linear CMS level (read
    at the key and the block-start memory)."""
    if read_with_key:
        assert not momentum and conv_window == 0, "a linear level has no momentum and no convolution"
        return LinearLevel(dim, heads, head_dim, **kw)
    if self_modifying:
        return SelfModifyingTitans(dim, heads, head_dim, momentum=momentum, conv_window=conv_window,
                                   selfmod_init=selfmod_init, **kw)
    assert selfmod_init == "identity", "only the self-modifying memory has an M_k, M_v initialisation"
    return TitansLayer(dim, heads, head_dim, momentum=momentum, conv_window=conv_window, **kw)


# ---------------------------------------------------------------------- naive references (float64)
def naive_conv(h, weight):
    """y_t = sum_i w_i h_{t-w+1+i}, zeros before the start."""
    w = weight.shape[1]
    pad = torch.cat([h.new_zeros(h.shape[0], w - 1, h.shape[2]), h], 1)
    return sum(weight[:, i] * pad[:, i:i + h.shape[1]] for i in range(w))


def unit(x, eps=1e-6):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def naive_titans(layer: TitansLayer, x):   # any of the three kinds (memory_layer)
    """Token by token, every memory a separate matrix (Eq. 90-93 in DESIGN.md's form), float64."""
    B, T, _ = x.shape
    H, D, C = layer.num_heads, layer.head_dim, layer.period
    h, g, gates = layer.proj_in(x).split(layer.splits, -1)
    if layer.conv is not None:
        h = naive_conv(h, layer.conv.weight)
    gates = gates.view(B, T, -1, H)
    lr_of = lambda z, hh: layer.lr_max / C * torch.sigmoid(z + layer.lr_bias[hh])          # noqa: E731
    decay_of = lambda z, hh: torch.sigmoid(z + layer.decay_bias[hh])                       # noqa: E731
    out = torch.empty(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for hh in range(H):
            P0 = layer.initial_memory[hh]
            if isinstance(layer, SelfModifyingTitans):
                q_all, u_all = h[b, :, :H * D].view(T, H, D)[:, hh], h[b, :, H * D:].view(T, H, D)[:, hh]
                names = {"k": slice(0, D), "v": slice(D, 2 * D), "eta": slice(2 * D, 2 * D + 1),
                         "alpha": slice(2 * D + 1, 2 * D + 2), "mem": slice(2 * D + 2, 3 * D + 2)}
            else:
                parts = [h[b, :, i * H * D:(i + 1) * H * D].view(T, H, D)[:, hh] for i in range(h.shape[-1] // (H * D))]
                q_all, k_all, v_all = [parts[0]] + parts if isinstance(layer, LinearLevel) else parts
                names = {"mem": slice(0, D)}
            M = {n: P0[:, s].clone() for n, s in names.items()}
            Z = {n: torch.zeros_like(m) for n, m in M.items()}
            for t in range(T):
                if t % C == 0:
                    bar = {n: m.clone() for n, m in M.items()}
                q = unit(q_all[t])
                if isinstance(layer, SelfModifyingTitans):
                    u = u_all[t]
                    k, v = unit(u @ bar["k"]), unit(u @ bar["v"])
                    eta, alpha = lr_of((u @ bar["eta"])[0], hh), decay_of((u @ bar["alpha"])[0], hh)
                    targets = {n: v @ bar[n] for n in M}          # self-generated values
                else:
                    k, v = unit(k_all[t]), v_all[t]
                    eta, alpha = lr_of(gates[b, t, 0, hh], hh), decay_of(gates[b, t, 1, hh], hh)
                    targets = {"mem": v}
                for n in M:
                    grad = torch.outer(k, k @ bar[n] - targets[n])
                    if layer.use_momentum:
                        m = torch.sigmoid(gates[b, t, -1, hh] + layer.momentum_bias[hh])
                        Z[n] = m * Z[n] - eta * grad
                        M[n] = alpha * M[n] + Z[n]
                    else:
                        M[n] = alpha * M[n] - eta * grad
                out[b, t, hh] = q @ (bar["mem"] if isinstance(layer, LinearLevel) else M["mem"])   # a level reads Sbar (Eq. 71)
    o = F.rms_norm(out, (D,)).reshape(B, T, H * D)
    return layer.proj(o * F.silu(g))


def naive_mlp_level(level: MLPLevel, x):
    """y_t = M_{theta_n}(x_t); theta_{n+1} = theta_n - sum_t eta_t grad l_t(theta_n) by autograd (Eq. 71)."""
    B, T, D = x.shape
    k, v = level.proj_kv(x).chunk(2, -1)
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True))
    lr = level.lr_max / (level.period * D) * torch.sigmoid(level.proj_lr(x) + level.lr_bias)
    ys = torch.empty_like(x)
    for b in range(B):
        w_in, w_out = level.w_in, level.w_out
        for n in range(0, T, level.period):
            blk = range(n, min(n + level.period, T))
            for t in blk:
                ys[b, t] = F.silu(x[b, t] @ w_in) @ w_out
            a, c = w_in.detach().requires_grad_(), w_out.detach().requires_grad_()
            loss = sum(lr[b, t, 0].detach() * 0.5 * (F.silu(k[b, t].detach() @ a) @ c - v[b, t].detach()).pow(2).sum()
                       for t in blk)
            g_in, g_out = torch.autograd.grad(loss, (a, c))
            w_in, w_out = w_in - g_in, w_out - g_out
    return ys


@pytest.mark.parametrize("self_modifying, momentum, period, conv, read_with_key, init", [
    (False, False, 4, 4, False, "identity"), (False, True, 3, 4, False, "identity"),
    (False, False, 1, 0, False, "identity"), (False, False, 4, 0, True, "identity"),
    (True, False, 4, 4, False, "identity"), (True, True, 5, 4, False, "identity"),
    (True, False, 1, 4, False, "orthogonal"),
])
def test_titans_layer_equals_naive_recurrence(self_modifying, momentum, period, conv, read_with_key, init):
    torch.manual_seed(0)
    kw = dict(self_modifying=self_modifying, read_with_key=read_with_key, period=period, momentum=momentum,
              conv_window=conv, selfmod_init=init)
    layer = memory_layer(24, 2, 8, **kw, backend="reference").double()
    with torch.no_grad():   # non-trivial conv, gates and memories
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(layer(x), naive_titans(layer, x)) < 1e-10, "titans layer (reference op) vs naive"
    # the chunked torch op gives the same layer output and parameter gradients in float32
    layer32 = memory_layer(24, 2, 8, **kw, backend="torch")
    layer32.load_state_dict({k: t.float() for k, t in layer.state_dict().items()})
    w = torch.randn(2, 13, 24, dtype=torch.float64)
    out32 = layer32(x.float())
    (out32 * w.float()).sum().backward()
    (naive_titans(layer, x) * w).sum().backward()
    assert rel_err(out32, naive_titans(layer, x)) < 1e-4, "titans layer (torch op) vs naive"
    for (name, p32), p64 in zip(layer32.named_parameters(), layer.parameters()):
        assert rel_err(p32.grad, p64.grad) < 1e-3, f"gradient of {name}"


def test_mlp_level_equals_naive_block_updates():
    torch.manual_seed(0)
    level = MLPLevel(16, 24, period=4, lr_max=1.5).double()
    with torch.no_grad():
        level.lr_bias.fill_(3.0)                       # large steps, so the updates matter
        level.w_out.mul_(20)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        got, first = level(x), level(x[:, :4])
    want = naive_mlp_level(level, x)
    assert rel_err(got, want) < 1e-10, "mlp level vs naive"
    assert rel_err(first, got[:, :4]) < 1e-12, "the first block reads the initial weights"
    static = torch.bmm(F.silu(x @ level.w_in), level.w_out.expand(2, -1, -1))
    assert (got[:, 4:] - static[:, 4:]).abs().max() > 1e-3, "the fast weights did not move"


@pytest.mark.parametrize("period", [1, 4])
def test_selfmod_writes_at_init(period):
    """With M_k = M_v = I (the default init) every key equals its value and every write
    k^T (k Mbar - v Mbar) is exactly zero: with the decay held at 1 the memory ends where it began.
    Two random orthogonal M_k, M_v write from the first step."""
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    ends = {}
    for init in ("identity", "orthogonal"):
        torch.manual_seed(0)
        layer = SelfModifyingTitans(24, 2, 8, period=period, selfmod_init=init, backend="torch").double()
        with torch.no_grad():
            layer.decay_bias.fill_(60.0)          # sigmoid(60) == 1 in float64: no decay, only the writes
        cache = {}
        with torch.no_grad():
            layer(x, cache=cache)
        M0 = layer.initial_memory.detach().expand_as(cache["state"])
        ends[init] = rel_err(cache["state"], M0)
        if init == "orthogonal":
            D = layer.head_dim
            M_k, M_v = layer.initial_memory[..., :D].detach(), layer.initial_memory[..., D:2 * D].detach()
            assert rel_err(M_k.transpose(-1, -2) @ M_k, torch.eye(D).expand_as(M_k)) < 1e-6
            assert rel_err(M_k, M_v) > 0.5
    assert ends["identity"] < 1e-14, "identity init: the writes are not zero"
    assert ends["orthogonal"] > 1e-3, "orthogonal init: no write"


def test_block_segments():
    assert block_segments(0, 10, 4, True) == [(0, 4), (4, 8), (8, 10)]
    assert block_segments(0, 10, 4, False) == [(0, 8), (8, 10)]
    assert block_segments(6, 9, 4, True) == [(0, 2), (2, 6), (6, 9)]
    assert block_segments(5, 1, 4, True) == [(0, 1)]
    assert block_segments(3, 1, 4, False) == [(0, 1)]


# ---------------------------------------------------------------------- the model variants
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_end_to_end_and_is_causal(variant):
    torch.manual_seed(0)
    model = HOPE(**SMALL, backend="torch", **VARIANTS[variant])
    with torch.no_grad():   # at the initial M_k = M_v the keys equal the values, so every inner gradient
        for n, p in model.named_parameters():          # (and that of the step's bias) is exactly zero
            if n.endswith("attn.initial_memory"):
                p.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, V, (2, 19))
    logits, loss = model(tokens, tokens.roll(-1, 1))
    loss.backward()
    bad = [n for n, p in model.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not bad, f"no / zero / non-finite gradient for {bad}"
    names = [n for n, _ in model.named_parameters()]
    if model.config.attention == "titans":
        assert any(n.endswith("attn.initial_memory") for n in names)
    t2 = tokens.clone()
    t2[:, 11] = (t2[:, 11] + 1) % V
    with torch.no_grad():
        a, b = model(tokens)[0], model(t2)[0]
    assert torch.equal(a[:, :11], b[:, :11]) and not torch.allclose(a[:, 11:], b[:, 11:])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_cached_generation_equals_recompute(variant):
    torch.manual_seed(1)
    model = HOPE(**SMALL, backend="torch", **VARIANTS[variant])
    prompt = torch.randint(0, V, (2, 7))                     # 7: the prompt ends inside a block
    cached = model.generate(prompt, max_new_tokens=13, temperature=0.0)
    full = model.generate(prompt, max_new_tokens=13, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)
    # cached logits: a prefill ending mid-block, single steps across block ends, a chunk from mid-block
    cache = model.new_cache()
    with torch.no_grad():
        parts = [model(cached[:, :7], cache=cache)[0]] + [model(cached[:, t:t + 1], cache=cache)[0]
                                                          for t in range(7, 14)]
        parts.append(model(cached[:, 14:], cache=cache)[0])
        ref = model(cached)[0]
    assert (torch.cat(parts, 1) - ref).abs().max() < 1e-5


def test_paper_variant_on_triton_interpreter_matches_torch():
    """The Triton titans kernels (scan and step) run the paper's HOPE as the torch path does."""
    torch.manual_seed(2)
    model = HOPE(backend="torch", **dict(SMALL, num_layers=1), **VARIANTS["paper"])
    tokens = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        a = model(tokens)[0]
        b = model.set_backend("triton")(tokens)[0]
    assert rel_err(b, a) < 1e-4, "triton vs torch logits"
    prompt = tokens[:, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=3, temperature=0.0),
                       model.set_backend("torch").generate(prompt, max_new_tokens=3, temperature=0.0))


def test_seed_api_and_block_layout_unchanged():
    model = HOPE(vocab_size=97, dim=32, num_layers=2, num_heads=4, num_memory_modules=5,
                 backend="torch")
    block = model.blocks[0]
    assert model.config.cms == "multiscale" and block.cms is not None and block.mlp is not None
    assert len(block.levels) == 0
    paper = HOPE(**SMALL, backend="torch", **VARIANTS["paper"]).blocks[0]
    assert paper.cms is None and paper.mlp is None and len(paper.levels) == 2


@pytest.mark.parametrize("name", ["hope_paper", "hope_attention", "hope_paper_tiny", "hope_attention_tiny",
                                  "hope_paper_recall_tiny"])
def test_shipped_configs_build(name):
    from hope.run_config import RunConfig
    cfg = RunConfig.load(name).model
    assert cfg.cms == "levels" and (cfg.attention == "titans") == ("paper" in name)
    if "tiny" in name:
        model = HOPE(cfg, backend="torch")
        logits, loss = model(torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 9)))
        assert torch.isfinite(loss) and abs(loss.item() - math.log(256)) < 0.5


@pytest.mark.parametrize("bad, match", [
    (dict(titans_lr_max=2.0), "titans_lr_max"), (dict(titans_lr_max=0.0), "titans_lr_max"),
    (dict(titans_period=0), "titans_period"), (dict(cms="both"), "cms"), (dict(cms_memory="deep"), "cms_memory"),
    (dict(cms_periods=[]), "cms_periods"), (dict(cms_periods=[4, 0]), "cms_periods"),
    (dict(attention="titan"), "attention"), (dict(titans_selfmod_init="eye"), "titans_selfmod_init"),
    (dict(titans_mem_period=2), "titans_mem_period"),
    (dict(titans_mem_period=1, titans_momentum=True), "titans_mem_period=1 needs"),
])
def test_bad_config_values(bad, match):
    with pytest.raises(ValueError, match=match):
        HOPEConfig(**dict(SMALL, **bad))


def test_bad_selfmod_init():
    with pytest.raises(ValueError, match="selfmod_init must be one of"):
        SelfModifyingTitans(24, 2, 8, selfmod_init="eye")


@pytest.mark.parametrize("name", ["hope_paper_tiny", "hope_attention_tiny"])
def test_train_and_evaluate_variant(name, tmp_path, capsys):
    from hope import evaluate as hope_evaluate
    from hope import train as hope_train
    args = ["--config", name, "--max-steps", "3", "--out-dir", str(tmp_path), "--backend", "torch", "--no-progress",
            "--set", "train.seq_len=32", "--set", "train.batch_size=4", "--set", "data.max_bytes=100000",
            "--set", "train.eval_batches=1"]
    assert hope_train.main(args) == 0
    assert hope_evaluate.main([str(tmp_path), "--max-new-tokens", "4", "--batches", "1", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "done: step 3" in out and "bits/byte" in out


# ---------------------------------------------------------------------- one op call per forward
def per_block_forward(layer: TitansLayer, x):
    """The layer as a loop over blocks with one titans_scan call each (the form before the block-start
    read and the self-modifying op), for a forward from the sequence start without a cache."""
    from hope_kernels import titans_scan
    from hope.layers import gated_readout, split_heads
    from hope.layers import l2norm, up
    B, T, _ = x.shape
    H, D, C = layer.num_heads, layer.head_dim, layer.period
    h, g, gates = layer.proj_in(x).split(layer.splits, -1)
    if layer.conv is not None:
        h = layer.conv(h)
    gates = gates.view(B, T, -1, H)
    mom = torch.sigmoid(up(gates[:, :, -1]) + up(layer.momentum_bias)) if layer.use_momentum else None
    state = layer._initial_state(B)
    if isinstance(layer, SelfModifyingTitans):
        q, u = (split_heads(t, H) for t in h.chunk(2, -1))
        q, u = l2norm(q), up(u)
    else:
        parts = [split_heads(t, H) for t in h.chunk(2 if isinstance(layer, LinearLevel) else 3, -1)]
        q, k, v = [parts[0]] + parts if isinstance(layer, LinearLevel) else parts
        q, k = l2norm(q), l2norm(k)
        lr, decay = layer._lr(gates[:, :, 0]), layer._decay(gates[:, :, 1])
    outs = []
    for s in range(0, T, C):
        e = min(s + C, T)
        Mbar = state[0] if isinstance(state, tuple) else state
        m = None if mom is None else mom[:, s:e]
        if isinstance(layer, SelfModifyingTitans):
            r = torch.einsum("bthd,bhdw->bthw", u[:, s:e], Mbar)
            kk, vv, eta, alpha, _ = r.split([D, D, 1, 1, D], -1)
            kk, vv = l2norm(kk), l2norm(vv)
            vhat = torch.einsum("bthd,bhdw->bthw", vv, Mbar)
            o, state = titans_scan(q[:, s:e], kk, vhat, layer._lr(eta[..., 0]), layer._decay(alpha[..., 0]), m, 1.0,
                                   period=C, initial_state=state, output_final_state=True, backend="torch")
            o = o[..., 2 * D + 2:]
        else:
            qs = q[:, s:e]
            o, state = titans_scan(qs, k[:, s:e], v[:, s:e], lr[:, s:e], decay[:, s:e], m, 1.0, period=C,
                                   initial_state=state, output_final_state=True, backend="torch")
            if isinstance(layer, LinearLevel):
                o = torch.einsum("bthk,bhkv->bthv", qs, Mbar)
        outs.append(o)
    return layer.proj(gated_readout(torch.cat(outs, 1), g))


@pytest.mark.parametrize("self_modifying, momentum, period, read_with_key", [
    (True, False, 4, False), (True, True, 5, False), (True, False, 8, False),
    (False, False, 4, True), (False, False, 5, True), (False, True, 3, False),
])
@pytest.mark.parametrize("T", [13, 21, 37])
def test_one_op_call_equals_the_per_block_loop(self_modifying, momentum, period, read_with_key, T):
    """Outputs and every parameter gradient of the layer (one op call) equal the per-block loop to
    float32 rounding; a cached prefix split mid-block and its continuation equal the whole forward."""
    torch.manual_seed(T + period)
    layer = memory_layer(32, 2, 16, period=period, self_modifying=self_modifying, momentum=momentum,
                         conv_window=0 if read_with_key else 4, read_with_key=read_with_key, backend="torch")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer64 = copy.deepcopy(layer).double()    # the loop in float64: the float32 rounding of neither form
    x = torch.randn(2, T, 32)
    w = torch.randn(2, T, 32)
    got, loop32, want = layer(x), per_block_forward(layer, x), per_block_forward(layer64, x.double())
    assert rel_err(got, want) < tolerance(torch.float32, "cpu")
    params = list(layer.parameters())
    grads = [torch.autograd.grad((y * w).sum(), params) for y in (got, loop32)]
    g_want = torch.autograd.grad((want * w.double()).sum(), list(layer64.parameters()))
    # a few bias gradients are sums that cancel (relative errors up to ~1e-3 in float32 in either form):
    # the op's error may not exceed the float32 loop's by more than 2x, nor the tolerance otherwise
    for (name, _), a, b, c in zip(layer.named_parameters(), *grads, g_want):
        bound = max(tolerance(torch.float32, "cpu", grad=True), 2 * rel_err(b, c))
        assert rel_err(a, c) <= bound, f"gradient of {name}"
    split = min(period + period // 2, T - 2)   # inside the second block
    with torch.no_grad():
        cache = {}
        parts = [layer(x[:, :split], cache), layer(x[:, split:split + 1], cache), layer(x[:, split + 1:], cache)]
    assert rel_err(torch.cat(parts, 1), want) < tolerance(torch.float32, "cpu")


def test_op_calls_per_forward_do_not_grow_with_t(monkeypatch):
    """The paper's HOPE: one titans_selfmod_scan and one titans_scan per level per forward, at any T."""
    import hope_kernels
    calls = {}
    for name in ("titans_scan", "titans_selfmod_scan"):
        real = getattr(hope_kernels, name)
        monkeypatch.setattr(hope_kernels, name,
                            lambda *a, _real=real, _name=name, **k: calls.__setitem__(_name, calls.get(_name, 0) + 1)
                            or _real(*a, **k))
    model = HOPE(backend="torch", **dict(SMALL, num_layers=1, max_seq_len=256), **VARIANTS["paper"])
    counts = []
    for T in (64, 256):
        calls.clear()
        with torch.no_grad():
            model(torch.randint(0, V, (1, T)))
        counts.append(dict(calls))
    assert counts[0] == counts[1] == {"titans_selfmod_scan": 1, "titans_scan": 2}
