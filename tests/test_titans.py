"""titans_scan / titans_step: every backend against the float64 reference (values and every gradient,
including lr, decay, momentum and the initial state pair), period = 1 against flash-linear-attention's
delta rule, periods shorter / longer than a chunk, split-and-resume, packed sequences, step loops
with a block state, NaN-poisoned buffers and bad inputs."""
import time

import numpy as np
import pytest
import torch

from hope_kernels import reference, titans_scan, titans_step
from helpers import as_ref, assert_close, randn, rel_err, simulated_autotuning

BACKENDS = ["triton", "torch"]
NAMES = ["q", "k", "v", "lr", "decay", "momentum", "S0", "Z0"]


@pytest.fixture
def poison_empty(monkeypatch):
    """Every floating torch.empty comes back NaN-filled (a buffer element nobody writes shows up)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _gate(lo, hi, *shape, device="cpu"):
    return (lo + (hi - lo) * torch.rand(*shape)).to(device).requires_grad_(True)


def _inputs(B, T, H, K, V, dtype, device, decay=True, momentum=True, h0=True, N=None):
    """q, v random; k L2-normalised (lr ||k||^2 < 2 keeps the inner descent stable); gates in range."""
    q = randn(B, T, H, K, dtype=dtype, device=device, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).to(dtype).to(device).requires_grad_(True)
    v = randn(B, T, H, V, dtype=dtype, device=device, requires_grad=True)
    lr = _gate(0., 1., B, T, H, device=device)
    d = _gate(0.6, 1., B, T, H, device=device) if decay else None
    m = _gate(0., 0.9, B, T, H, device=device) if momentum else None
    S0 = randn(N or B, H, K, V, device=device, requires_grad=True, scale=0.5) if h0 else None
    Z0 = randn(N or B, H, K, V, device=device, requires_grad=True, scale=0.5) if h0 and momentum else None
    return [q, k, v, lr, d, m, S0, Z0]


def _state(S, Z, momentum):
    if S is None:
        return None
    return (S, Z) if momentum is not None else S


def _flat(state):
    return [] if state is None else (list(state) if isinstance(state, tuple) else [state])


def _grads(outputs, inputs, seed=1):
    """Gradients of a random linear functional of `outputs` (same cotangents for every caller)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)
    live = [x for x in inputs if x is not None and x.requires_grad]
    grads = torch.autograd.grad(loss, live, allow_unused=True, materialize_grads=True)
    return dict(zip([id(x) for x in live], grads))


def _scan(fn, xs, **kw):
    q, k, v, lr, d, m, S0, Z0 = xs
    o, st = fn(q, k, v, lr, d, m, initial_state=_state(S0, Z0, m), output_final_state=True, **kw)
    return [o] + _flat(st)


def _check_scan(backend, device, dtype, B, T, H, K, V, period, decay, momentum, h0, chunk_size=16,
                read="current"):
    xs = _inputs(B, T, H, K, V, dtype, device, decay, momentum, h0)
    outs = _scan(titans_scan, xs, period=period, read=read, chunk_size=chunk_size, backend=backend)
    refs_in = [None if x is None else as_ref(x).cpu() for x in xs]
    refs = _scan(reference.titans_scan, refs_in, period=period, read=read)
    assert outs[0].dtype == dtype and all(s.dtype == torch.float32 for s in outs[1:])
    errs = {}
    for name, out, ref in zip(["o", "S", "Z"], outs, refs):
        errs[name] = assert_close(name, out, ref, dtype, device)
    g, rg = _grads(outs, xs), _grads(refs, refs_in)
    for name, x, r in zip(NAMES, xs, refs_in):
        if x is not None:
            errs["d" + name] = assert_close("d" + name, g[id(x)], rg[id(r)], dtype, device, grad=True)
    return errs


# ----------------------------------------------------------------------------- scan vs reference
# Representative rather than Cartesian: every path (period 1 with / without momentum, short periods,
# periods of a chunk, longer than a chunk and not a multiple of it), every gate, every dtype; K != V,
# T not a multiple of the chunk nor of the period.
CASES = [
    # dtype,        period, decay, momentum, h0,  B, T,  V
    (torch.float32, 1, False, False, True, 2, 21, 32),     # delta rule
    (torch.float32, 1, True, False, False, 1, 21, 16),     # gated delta rule (DGD)
    (torch.float32, 1, True, True, True, 1, 21, 16),
    (torch.float32, 3, False, True, True, 1, 21, 16),
    (torch.float32, 16, True, False, True, 1, 21, 16),
    (torch.float32, 16, True, True, True, 2, 21, 32),
    (torch.float32, 24, True, True, True, 1, 45, 16),      # a block across chunk / checkpoint boundaries
    (torch.float32, 32, True, True, True, 1, 45, 16),      # two chunks per block (chunked Triton forward)
    (torch.float32, 32, False, False, True, 1, 45, 16),    # ... and chunked Triton backward
    (torch.float16, 16, False, False, True, 2, 37, 32),
    (torch.float16, 16, True, True, False, 1, 21, 16),
    (torch.float16, 1, True, False, True, 1, 21, 16),
    (torch.bfloat16, 16, False, False, True, 1, 21, 16),
    (torch.bfloat16, 1, True, True, True, 1, 21, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,period,decay,momentum,h0,B,T,V", CASES)
def test_scan_matches_reference(backend, device, poison_empty, dtype, period, decay, momentum, h0, B, T, V):
    _check_scan(backend, device, dtype, B=B, T=T, H=2, K=32 if V == 16 else 16, V=V, period=period, decay=decay,
                momentum=momentum, h0=h0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("period", [1, 3, 16, 64])
@pytest.mark.parametrize("decay,momentum,h0", [(True, True, True), (False, False, True), (True, False, False)])
def test_block_start_read_matches_reference(backend, device, poison_empty, period, decay, momentum, h0):
    """read="block_start": o_t = scale q_t Sbar_t (period 1: the memory before the token), values and
    every gradient; T = 45 is a multiple of no period here, period 64 is longer than T."""
    _check_scan(backend, device, torch.float32, B=2, T=45, H=2, K=16, V=32, period=period, decay=decay,
                momentum=momentum, h0=h0, read="block_start")


def test_block_start_read_is_the_block_start_memory():
    """The block-start read against its definition: the final states of scans over the whole blocks
    before each token's block."""
    q, k, v, lr, d, m, S0, Z0 = [x.detach().double() for x in _inputs(1, 11, 1, 4, 4, torch.float32, "cpu")]
    o, _ = titans_scan(q, k, v, lr, d, m, period=4, read="block_start", initial_state=(S0, Z0), backend="torch")
    for t in range(11):
        n = t // 4 * 4
        _, (S, _) = titans_scan(q[:, :n], k[:, :n], v[:, :n], lr[:, :n], d[:, :n], m[:, :n], period=4,
                                initial_state=(S0, Z0), output_final_state=True, backend="torch")
        assert_close("o", o[:, t], 0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S), torch.float64, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,V,period,chunk_size", [(12, 20, 16, 16), (32, 16, 40, 32)])
def test_scan_awkward_shapes(backend, device, K, V, period, chunk_size):
    _check_scan(backend, device, torch.float32, B=1, T=50, H=1, K=K, V=V, period=period, decay=True,
                momentum=True, h0=True, chunk_size=chunk_size)


@pytest.mark.parametrize("period", [1, 16, 48])
def test_long_sequence_extreme_gates_torch(period):
    """T = 1024 with decays from 1e-3 to 1 and momenta from 0 to 0.99 (chunk-local log sums that
    would overflow as products): finite and equal to the float64 reference."""
    q, k, v, lr, d, m, S0, Z0 = [x.detach() for x in _inputs(1, 1024, 1, 8, 8, torch.float32, "cpu")]
    d = torch.rand(1, 1024, 1) ** 4 * (1 - 1e-3) + 1e-3
    m = torch.rand(1, 1024, 1) * 0.99
    xs = [q, k, v, lr, d, m, S0, Z0]
    outs = _scan(titans_scan, xs, period=period, backend="torch")
    refs = _scan(reference.titans_scan, [x.double() for x in xs], period=period)
    for name, out, ref in zip("oSZ", outs, refs):
        assert torch.isfinite(out).all(), name
        assert_close(name, out, ref, torch.float32, "cpu")


def _fla_delta_rule(q, k, v, beta, S0):
    """flash-linear-attention's naive delta rule (fla/ops/delta_rule/naive.py, `delta_rule_recurrence`),
    restated: heads-first [b, h, l, d] tensors, q scaled by d_k^-0.5, and per token
    v' = beta (v - k S), S = S + k^T v', o = q S."""
    b, h, l, dk = q.shape
    q = q * dk ** -0.5
    S = S0.clone()
    o = torch.empty(b, h, l, v.shape[-1], dtype=q.dtype)
    for i in range(l):
        ki = k[:, :, i]
        new_v = beta[:, :, i, None] * (v[:, :, i] - torch.einsum("bhk,bhkv->bhv", ki, S))
        S = S + ki[..., :, None] * new_v[..., None, :]
        o[:, :, i] = torch.einsum("bhk,bhkv->bhv", q[:, :, i], S)
    return o, S


@pytest.mark.parametrize("backend", BACKENDS)
def test_period_one_is_fla_delta_rule(backend, device):
    """period = 1, no decay, no momentum: DeltaNet's delta rule with fla's beta = lr."""
    q, k, v, lr, _, _, S0, _ = _inputs(2, 50, 2, 16, 24, torch.float32, device, False, False, True)
    with torch.no_grad():
        o, st = titans_scan(q, k, v, lr, initial_state=S0, output_final_state=True, chunk_size=16,
                            backend=backend)
        heads_first = [x.double().cpu().transpose(1, 2) for x in (q, k, v, lr)]
        fo, fst = _fla_delta_rule(*heads_first, S0.double().cpu())
    assert_close("o", o, fo.transpose(1, 2), torch.float32, device)
    assert_close("state", st, fst, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_momentum_and_unit_decay(backend, device):
    """momentum = 0 and decay = 1 at the ends of their ranges: exact values, finite gradients."""
    q, k, v, lr, d, m, S0, Z0 = _inputs(1, 20, 2, 16, 16, torch.float32, device)
    with torch.no_grad():
        m[:, ::3] = 0.
        d[:, ::2] = 1.
    xs = [q, k, v, lr, d, m, S0, Z0]
    for period in (1, 16):
        outs = _scan(titans_scan, xs, period=period, chunk_size=16, backend=backend)
        refs = _scan(reference.titans_scan, [as_ref(x).cpu() for x in xs], period=period)
        for name, out, ref in zip("oSZ", outs, refs):
            assert_close(name, out, ref, torch.float32, device)
        g = _grads(outs, xs)
        assert all(torch.isfinite(t).all() for t in g.values())


# ----------------------------------------------------------------------------- state: split, packed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("period,decay,momentum,read", [(16, True, True, "current"), (1, True, False, "current"),
                                                        (4, True, True, "current"), (16, False, False, "current"),
                                                        (16, True, True, "block_start"),
                                                        (1, True, True, "block_start"),
                                                        (8, False, False, "block_start")])
def test_split_and_resume(backend, device, period, decay, momentum, read):
    """Two calls chained through the state (split at a multiple of period) equal one call, values and
    gradients (through the state pair too)."""
    xs = _inputs(1, 40, 1, 16, 16, torch.float32, device, decay=decay, momentum=momentum)
    q, k, v, lr, d, m, S0, Z0 = xs
    t = 16
    kw = dict(period=period, read=read, chunk_size=16, backend=backend)
    one = _scan(titans_scan, xs, **kw)
    part = lambda x, sl: None if x is None else x[:, sl]
    first = _scan(titans_scan, [part(x, slice(0, t)) for x in xs[:6]] + [S0, Z0], **kw)
    second = _scan(titans_scan, [part(x, slice(t, None)) for x in xs[:6]] + first[1:] + [None] * (2 - len(first[1:])),
                   **kw)
    split = [torch.cat([first[0], second[0]], 1)] + second[1:]
    for name, a, b in zip("oSZ", split, one):
        assert_close(name, a, b.double(), torch.float32, device)
    g_one, g_split = _grads(one, xs), _grads(split, xs)
    for name, x in zip(NAMES, xs):
        if x is not None:
            assert_close("d" + name, g_split[id(x)], g_one[id(x)].double(), torch.float32, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("period,decay,momentum,read", [(16, True, True, "current"), (1, True, False, "current"),
                                                        (3, True, True, "current"), (32, False, False, "current"),
                                                        (3, True, True, "block_start"),
                                                        (1, True, True, "block_start"),
                                                        (16, True, False, "block_start")])
def test_packed_sequences_equal_a_loop(backend, device, poison_empty, period, decay, momentum, read):
    """cu_seqlens (one sequence empty, one longer than a chunk) equals one reference call per sequence;
    blocks count from each sequence's start."""
    lens = [3, 0, 35, 2]
    cu = torch.tensor([0] + lens).cumsum(0).to(device)
    xs = _inputs(1, sum(lens), 1, 16, 16, torch.float32, device, decay=decay, momentum=momentum, N=len(lens))
    q, k, v, lr, d, m, S0, Z0 = xs
    outs = _scan(titans_scan, xs, period=period, read=read, cu_seqlens=cu, chunk_size=16, backend=backend)
    parts = []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        seq = [None if x is None else x[:, a:b] for x in xs[:6]]
        states = [None if s is None else s[n:n + 1] for s in (S0, Z0)]
        parts.append(_scan(reference.titans_scan, seq + states, period=period, read=read))
    loop = [torch.cat([p[i] for p in parts], 1 if i == 0 else 0) for i in range(len(outs))]
    for name, a, b in zip("oSZ", outs, loop):
        assert_close(name, a, b.double(), torch.float32, device)
    assert torch.equal(outs[1][1], S0[1].detach()), "an empty sequence keeps its initial state"
    g, g_loop = _grads(outs, xs), _grads(loop, xs)
    for name, x in zip(NAMES, xs):
        if x is not None:
            assert_close("d" + name, g[id(x)], g_loop[id(x)].double(), torch.float32, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("period,decay,momentum", [(16, False, False), (3, True, True)])
def test_final_state_only_gradient(backend, device, period, decay, momentum):
    """A loss on the final state alone (no output gradient) still reaches every input."""
    xs = _inputs(1, 20, 1, 16, 16, torch.float32, device, decay, momentum)
    states = _scan(titans_scan, xs, period=period, chunk_size=16, backend=backend)[1:]
    refs_in = [None if x is None else as_ref(x).cpu() for x in xs]
    ref_states = _scan(reference.titans_scan, refs_in, period=period)[1:]
    g, rg = _grads(states, xs), _grads(ref_states, refs_in)
    for name, x, r in zip(NAMES, xs, refs_in):
        if x is not None:
            assert_close("d" + name, g[id(x)], rg[id(r)], torch.float32, device, grad=True)


# ----------------------------------------------------------------------------- step
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,period,decay,momentum", [(torch.float32, 1, True, True),
                                                         (torch.float32, 4, True, False),
                                                         (torch.float16, 8, False, True),
                                                         (torch.bfloat16, 3, True, True)])
def test_step_loop_equals_scan(backend, device, poison_empty, dtype, period, decay, momentum):
    """A loop of steps, block_state refreshed every `period` tokens, equals the scan with that period."""
    B, T, H, K, V = 2, 12, 2, 16, 32
    q, k, v, lr, d, m, S0, Z0 = [None if x is None else x.detach()
                                 for x in _inputs(B, T, H, K, V, dtype, device, decay, momentum)]
    o_scan, st_scan = titans_scan(q, k, v, lr, d, m, period=period, initial_state=_state(S0, Z0, m),
                                  output_final_state=True, backend=backend)
    S, Z = S0.clone(), None if Z0 is None else Z0.clone()
    state = _state(S, Z, m)
    outs = []
    for t in range(T):
        block = S.clone() if t % period == 0 else block
        at = lambda x: None if x is None else x[:, t]
        o_t, ret = titans_step(q[:, t], k[:, t], v[:, t], lr[:, t], state, at(d), at(m),
                               block_state=None if period == 1 else block, backend=backend)
        assert ret is state
        outs.append(o_t)
    o_steps = torch.stack(outs, 1)
    assert o_steps.dtype == dtype
    assert_close("o", o_steps, o_scan.double(), dtype, device)
    for name, a, b in zip("SZ", _flat(state), _flat(st_scan)):
        assert_close(name, a, b.double(), dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_reference(backend, device):
    B, H, K, V = 3, 2, 20, 24
    q, k, v = randn(B, H, K, device=device), randn(B, H, K, device=device), randn(B, H, V, device=device)
    lr, d, m = (_gate(lo, hi, B, H, device=device).detach() for lo, hi in ((0, 1), (0.5, 1), (0, 0.9)))
    state = (randn(B, H, K, V, device=device), randn(B, H, K, V, device=device))
    block = randn(B, H, K, V, device=device)
    ref_state = tuple(s.double().cpu() for s in state)
    o, _ = titans_step(q, k, v, lr, state, d, m, scale=0.3, block_state=block, backend=backend)
    ro, _ = reference.titans_step(*(x.double().cpu() for x in (q, k, v, lr)), ref_state, d.double().cpu(),
                                  m.double().cpu(), scale=0.3, block_state=block.double().cpu())
    assert_close("o", o, ro, torch.float32, device)
    for name, a, b in zip("SZ", state, ref_state):
        assert_close(name, a, b, torch.float32, device)


@pytest.mark.parametrize("momentum", [False, True])
def test_step_under_autotuning(momentum):
    """The in-place step stays exact while the autotuner times it (S and Z restored after each run)."""
    B, H, K, V = 2, 2, 16, 16
    q, k, v = randn(B, H, K), randn(B, H, K), randn(B, H, V)
    lr, d = torch.full((B, H), 0.3), torch.full((B, H), 0.9)
    m = torch.full((B, H), 0.5) if momentum else None
    state = (randn(B, H, K, V), randn(B, H, K, V)) if momentum else randn(B, H, K, V)
    want = tuple(s.double().clone() for s in _flat(state))
    want_o, _ = reference.titans_step(q.double(), k.double(), v.double(), lr.double(),
                                      want if momentum else want[0], d.double(),
                                      None if m is None else m.double())
    with simulated_autotuning():
        o, state = titans_step(q, k, v, lr, state, d, m, backend="triton")
    for name, got, exp in zip("SZ", _flat(state), want):
        assert_close(name, got, exp, torch.float32, "cpu")
    assert_close("o", o, want_o, torch.float32, "cpu")


# ----------------------------------------------------------------------------- bad inputs
def _ok(**over):
    B, T, H, K, V = 1, 6, 2, 4, 4
    args = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V), lr=torch.full((B, T, H), 0.1))
    args.update(over)
    return args


G = (1, 6, 2)
BAD_SCAN = [
    (dict(lr=torch.full(G, -0.1)), ValueError, "lr"),
    (dict(lr=torch.full(G, float("nan"))), ValueError, "lr"),
    (dict(lr=torch.full((1, 6), 0.1)), ValueError, "lr"),
    (dict(lr=None), TypeError, "lr"),
    (dict(decay=torch.full(G, 0.)), ValueError, "decay"),
    (dict(decay=torch.full(G, 1.01)), ValueError, "decay"),
    (dict(momentum=torch.full(G, 1.), initial_state=None), ValueError, "momentum"),
    (dict(momentum=torch.full(G, -0.1)), ValueError, "momentum"),
    (dict(momentum=torch.full(G, 0.5), initial_state=torch.zeros(1, 2, 4, 4)), ValueError, "pair"),
    (dict(initial_state=(torch.zeros(1, 2, 4, 4),) * 2), ValueError, "initial_state"),
    (dict(initial_state=torch.zeros(2, 2, 4, 4)), ValueError, "initial_state"),
    (dict(period=0), ValueError, "period"),
    (dict(period=2.0), TypeError, "period"),
    (dict(period=True), TypeError, "period"),
    (dict(period=np.bool_(True)), TypeError, "period"),
    (dict(period=torch.tensor(True)), TypeError, "period"),
    (dict(period=np.int64(0)), ValueError, "period"),
    (dict(read="block"), ValueError, "read"),
    (dict(read=None), ValueError, "read"),
    (dict(k=torch.randn(1, 6, 2, 5)), ValueError, "k"),
    (dict(v=torch.randn(1, 7, 2, 4)), ValueError, "v"),
    (dict(k=torch.randn(1, 6, 2, 4, dtype=torch.float16)), TypeError, "dtype"),
    (dict(cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
    (dict(chunk_size=8), ValueError, "chunk_size"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("over,exc,word", BAD_SCAN, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_SCAN)])
def test_scan_rejects_bad_input(over, exc, word):
    with pytest.raises(exc, match=word):
        titans_scan(**_ok(**over))


BAD_STEP = [
    (dict(state=None), ValueError, "state"),
    (dict(state=torch.zeros(2, 2, 4, 5)), ValueError, "state"),
    (dict(state=torch.zeros(2, 2, 4, 4, dtype=torch.float16)), TypeError, "state"),
    (dict(momentum=torch.full((2, 2), 0.5)), ValueError, "pair"),
    (dict(lr=torch.full((2, 2), -1.)), ValueError, "lr"),
    (dict(decay=torch.full((2, 2), 2.)), ValueError, "decay"),
    (dict(block_state=torch.zeros(2, 2, 4)), ValueError, "block_state"),
    (dict(q=torch.randn(2, 2, 4, 1)), ValueError, "q"),
]


@pytest.mark.parametrize("over,exc,word", BAD_STEP, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_STEP)])
def test_step_rejects_bad_input(over, exc, word):
    args = dict(q=randn(2, 2, 4), k=randn(2, 2, 4), v=randn(2, 2, 4), lr=torch.full((2, 2), 0.1),
                state=torch.zeros(2, 2, 4, 4))
    args.update(over)
    with pytest.raises(exc, match=word):
        titans_step(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_momentum_requires_z(backend):
    """(S, None) with momentum would drop the momentum: refused on both backends."""
    args = dict(q=randn(2, 2, 4), k=randn(2, 2, 4), v=randn(2, 2, 4), lr=torch.full((2, 2), 0.1),
                state=(torch.zeros(2, 2, 4, 4), None), momentum=torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="Z"):
        titans_step(**args, backend=backend)
    with pytest.raises(ValueError, match="Z"):
        reference.titans_step(**args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("period", [np.int64(4), np.int32(4), torch.tensor(4), torch.tensor([4])[0]])
def test_period_takes_any_integer(backend, device, period):
    xs = [None if x is None else x.detach() for x in _inputs(1, 10, 1, 16, 16, torch.float32, device)]
    want = _scan(titans_scan, xs, period=4, chunk_size=16, backend=backend)
    got = _scan(titans_scan, xs, period=period, chunk_size=16, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("period", [10 ** 8, 2 ** 31, 2 ** 64])
def test_huge_period_is_one_block(backend, device, period):
    """A period beyond T is one block per sequence: the same result as period = T, no int32 overflow
    in a kernel, nothing sized by the period (T = 20 and cu_seqlens)."""
    xs = [None if x is None else x.detach() for x in _inputs(1, 20, 2, 16, 16, torch.float32, device, N=2)]
    cu = torch.tensor([0, 7, 20], device=device)
    for read in ("current", "block_start"):
        want = _scan(titans_scan, xs, period=20, read=read, cu_seqlens=cu, chunk_size=16, backend=backend)
        start = time.perf_counter()
        got = _scan(titans_scan, xs, period=period, read=read, cu_seqlens=cu, chunk_size=16, backend=backend)
        assert time.perf_counter() - start < 5.0
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_torch_path_sizes_buffers_by_the_sequence(monkeypatch):
    """The chunked path itself (below the op's clamp) lays out min(period, T) tokens per block."""
    from hope_kernels.titans import torch_chunked
    sizes, real = [], torch_chunked._layout
    monkeypatch.setattr(torch_chunked, "_layout", lambda *a: sizes.append(a[1]) or real(*a))
    q, k, v, lr, d, m, S0, Z0 = [x.detach() for x in _inputs(1, 20, 1, 8, 8, torch.float32, "cpu")]
    o, S, Z = torch_chunked.titans_scan_torch(q, k, v, lr, d, m, 0.3, 2 ** 40, S0, Z0, None, 64, torch.float32)
    assert sizes == [20]
    want, (S_w, Z_w) = titans_scan(q, k, v, lr, d, m, 0.3, period=20, initial_state=(S0, Z0),
                                   output_final_state=True, backend="torch")
    assert torch.equal(o, want) and torch.equal(S, S_w) and torch.equal(Z, Z_w)


def test_float64_with_triton_raises_and_routes_to_torch_by_default():
    q, k, v = (randn(1, 32, 2, 16, dtype=torch.float64) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    lr = torch.full((1, 32, 2), 0.5, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        titans_scan(q, k, v, lr, backend="triton")
    o, _ = titans_scan(q, k, v, lr, period=4)
    want, _ = reference.titans_scan(q, k, v, lr, period=4)
    assert_close("o", o, want, torch.float64, "cpu")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("period,decay,momentum", [(1, True, False), (1, True, True), (16, True, True),
                                                   (64, False, False), (24, True, False)])
def test_scan_gpu_realistic(dtype, period, decay, momentum):
    """Realistic shapes on a GPU (tensor cores, TF32), every path: UT chunks, block chunks, recurrent."""
    _check_scan("triton", "cuda", dtype, B=2, T=300, H=4, K=64, V=64, period=period, decay=decay,
                momentum=momentum, h0=True, chunk_size=64)


# ----------------------------------------------------------------------------- self-modifying memory
def _selfmod_inputs(B, T, H, D, dtype, device, momentum):
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1).to(dtype).to(device).requires_grad_(True)
    u = randn(B, T, H, D, dtype=dtype, device=device, requires_grad=True)
    lr_b, d_b = randn(H, device=device, requires_grad=True), (randn(H, device=device) + 2).requires_grad_(True)
    m = _gate(0., 0.9, B, T, H, device=device) if momentum else None
    eye = torch.eye(D).expand(B, H, D, D)
    M0 = (torch.cat([eye, eye, torch.zeros(B, H, D, 2), eye], -1) + 0.3 * torch.randn(B, H, D, 3 * D + 2))
    M0 = M0.to(device).requires_grad_(True)
    Z0 = randn(B, H, D, 3 * D + 2, device=device, requires_grad=True, scale=0.1) if momentum else None
    return [q, u, lr_b, d_b, m, M0, Z0]


def _selfmod(fn, xs, period, **kw):
    q, u, lr_b, d_b, m, M0, Z0 = xs
    o, st = fn(q, u, lr_b, d_b, m, 1.0, lr_max=1.0, period=period, initial_state=(M0, Z0) if m is not None else M0,
               output_final_state=True, **kw)
    return [o] + _flat(st)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,period,momentum,T", [(torch.float32, 4, False, 21), (torch.float32, 5, True, 21),
                                                     (torch.float32, 1, True, 9), (torch.float32, 16, False, 37),
                                                     (torch.float32, 64, True, 21), (torch.bfloat16, 4, True, 13)])
def test_selfmod_scan_matches_reference(backend, device, dtype, period, momentum, T):
    """titans_selfmod_scan against its float64 per-block reference: output, final states, every gradient."""
    from hope_kernels import titans_selfmod_scan
    xs = _selfmod_inputs(2, T, 2, 8, dtype, device, momentum)
    outs = _selfmod(titans_selfmod_scan, xs, period, backend=backend)
    refs_in = [None if x is None else as_ref(x).cpu() for x in xs]
    refs = _selfmod(reference.titans_selfmod_scan, refs_in, period)
    assert outs[0].dtype == dtype and all(s.dtype == torch.float32 for s in outs[1:])
    for name, a, b in zip(["o", "M", "Z"], outs, refs):
        assert_close(name, a, b, dtype, device)
    g, rg = _grads(outs, xs), _grads(refs, refs_in)
    for name, x, r in zip(["q", "u", "lr_bias", "decay_bias", "momentum", "M0", "Z0"], xs, refs_in):
        if x is not None:
            assert_close("d" + name, g[id(x)], rg[id(r)], dtype, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,period,T", [(torch.float32, 4, 21), (torch.float32, 8, 5), (torch.bfloat16, 3, 13)])
def test_selfmod_scan_online_mem_matches_reference(backend, device, dtype, period, T):
    """mem_period=1 (M_mem by the online rule inside each block) against the float64 reference: output, final
    state, every gradient; and it is not the block rule."""
    from hope_kernels import titans_selfmod_scan
    xs = _selfmod_inputs(2, T, 2, 8, dtype, device, False)
    outs = _selfmod(titans_selfmod_scan, xs, period, mem_period=1, backend=backend)
    refs_in = [None if x is None else as_ref(x).cpu() for x in xs]
    refs = _selfmod(reference.titans_selfmod_scan, refs_in, period, mem_period=1)
    for name, a, b in zip(["o", "M"], outs, refs):
        assert_close(name, a, b, dtype, device)
    g, rg = _grads(outs, xs), _grads(refs, refs_in)
    for name, x, r in zip(["q", "u", "lr_bias", "decay_bias", "momentum", "M0"], xs, refs_in):
        if x is not None:
            assert_close("d" + name, g[id(x)], rg[id(r)], dtype, device, grad=True)
    with torch.no_grad():
        block = _selfmod(reference.titans_selfmod_scan, refs_in, period)
    assert rel_err(refs[0], block[0]) > 1e-3


def test_selfmod_online_mem_split_and_steps():
    """mem_period=1: two calls split at a multiple of period equal one; a loop of steps equals the scan; at
    period 1 it is the block rule."""
    from hope_kernels import titans_selfmod_scan, titans_selfmod_step
    period, T = 4, 14
    q, u, lr_b, d_b, _, M0, _ = [None if x is None else x.detach()
                                 for x in _selfmod_inputs(2, T, 2, 8, torch.float32, "cpu", False)]
    kw = dict(lr_max=1.0, period=period, output_final_state=True, mem_period=1, backend="torch")
    o, M = titans_selfmod_scan(q, u, lr_b, d_b, None, 1.0, initial_state=M0, **kw)
    o1, st = titans_selfmod_scan(q[:, :8], u[:, :8], lr_b, d_b, None, 1.0, initial_state=M0, **kw)
    o2, M2 = titans_selfmod_scan(q[:, 8:], u[:, 8:], lr_b, d_b, None, 1.0, initial_state=st, **kw)
    assert_close("o", torch.cat([o1, o2], 1), o.double(), torch.float32, "cpu")
    assert_close("M", M2, M.double(), torch.float32, "cpu")
    state, outs = M0.clone(), []
    for t in range(T):
        block = state.clone() if t % period == 0 else block
        o_t, ret = titans_selfmod_step(q[:, t], u[:, t], lr_b, d_b, state, block, None, 1.0, lr_max=1.0,
                                       period=period, mem_period=1, backend="torch")
        assert ret is state
        outs.append(o_t)
    assert_close("o", torch.stack(outs, 1), o.double(), torch.float32, "cpu")
    assert_close("M", state, M.double(), torch.float32, "cpu")
    kw1 = dict(kw, period=1)
    for a, b in zip(titans_selfmod_scan(q, u, lr_b, d_b, None, 1.0, initial_state=M0, **kw1),
                    titans_selfmod_scan(q, u, lr_b, d_b, None, 1.0, initial_state=M0, **dict(kw1, mem_period=None))):
        assert_close("period 1", a, b.double(), torch.float32, "cpu")


def test_selfmod_split_and_resume_and_steps():
    """Two calls split at a multiple of period equal one; a loop of steps (block state refreshed every
    period tokens) equals the scan."""
    from hope_kernels import titans_selfmod_scan, titans_selfmod_step
    period, T = 4, 14
    q, u, lr_b, d_b, m, M0, Z0 = [None if x is None else x.detach()
                                  for x in _selfmod_inputs(2, T, 2, 8, torch.float32, "cpu", True)]
    kw = dict(lr_max=1.0, period=period, output_final_state=True, backend="torch")
    o, (M, Z) = titans_selfmod_scan(q, u, lr_b, d_b, m, 1.0, initial_state=(M0, Z0), **kw)
    o1, st = titans_selfmod_scan(q[:, :8], u[:, :8], lr_b, d_b, m[:, :8], 1.0, initial_state=(M0, Z0), **kw)
    o2, (M2, Z2) = titans_selfmod_scan(q[:, 8:], u[:, 8:], lr_b, d_b, m[:, 8:], 1.0, initial_state=st, **kw)
    for name, a, b in zip("oMZ", (torch.cat([o1, o2], 1), M2, Z2), (o, M, Z)):
        assert_close(name, a, b.double(), torch.float32, "cpu")
    state = (M0.clone(), Z0.clone())
    outs = []
    for t in range(T):
        block = state[0].clone() if t % period == 0 else block
        o_t, ret = titans_selfmod_step(q[:, t], u[:, t], lr_b, d_b, state, block, m[:, t], 1.0, lr_max=1.0,
                                       period=period, backend="torch")
        assert ret is state
        outs.append(o_t)
    assert_close("o", torch.stack(outs, 1), o.double(), torch.float32, "cpu")
    for name, a, b in zip("MZ", state, (M, Z)):
        assert_close(name, a, b.double(), torch.float32, "cpu")


def _selfmod_ok(**over):
    B, T, H, D = 1, 6, 2, 4
    args = dict(q=randn(B, T, H, D), u=randn(B, T, H, D), lr_bias=torch.zeros(H), decay_bias=torch.zeros(H),
                lr_max=1.0, period=2, initial_state=torch.zeros(B, H, D, 3 * D + 2))
    args.update(over)
    return args


BAD_SELFMOD = [
    (dict(u=torch.randn(1, 6, 2, 5)), ValueError, "u"),
    (dict(lr_bias=torch.zeros(3)), ValueError, "lr_bias"),
    (dict(decay_bias=torch.zeros(2, 1)), ValueError, "decay_bias"),
    (dict(initial_state=None), ValueError, "initial_state"),
    (dict(initial_state=torch.zeros(1, 2, 4, 4)), ValueError, "initial_state"),
    (dict(momentum=torch.full((1, 6, 2), 0.5)), ValueError, "pair"),
    (dict(momentum=torch.full((1, 6, 2), 1.5), initial_state=(torch.zeros(1, 2, 4, 14),) * 2), ValueError,
     "momentum"),
    (dict(period=0), ValueError, "period"),
    (dict(period=True), TypeError, "period"),
    (dict(lr_max=2.0), ValueError, "lr_max"),
    (dict(lr_max=float("nan")), ValueError, "lr_max"),
    (dict(mem_period=3), ValueError, "mem_period"),
    (dict(mem_period=0), ValueError, "period"),
    (dict(mem_period=1, momentum=torch.full((1, 6, 2), 0.5), initial_state=(torch.zeros(1, 2, 4, 14),) * 2),
     ValueError, "mem_period=1 needs momentum=None"),
]


@pytest.mark.parametrize("over,exc,word", BAD_SELFMOD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_SELFMOD)])
def test_selfmod_rejects_bad_input(over, exc, word):
    from hope_kernels import titans_selfmod_scan
    with pytest.raises(exc, match=word):
        titans_selfmod_scan(**_selfmod_ok(**over))
