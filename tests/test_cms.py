"""cms_scan / cms_step: both backends against the float64 reference (values and every gradient),
timescales from 1e-3 to 1 - 1e-4, long sequences, M = 1 as decayed linear attention,
split-and-resume, step loops, packed sequences, NaN-poisoned buffers and bad inputs."""
import pytest
import torch

from hope_kernels import cms_scan, cms_step, reference
from hope_kernels.cms import triton_kernels as tk
from hope_kernels.triton_utils import GRID_YZ_LIMIT, check_grid, chunk_indices
from helpers import as_ref, assert_close, randn, simulated_autotuning

BACKENDS = ["triton", "torch"]
TAUS = [1e-3, 0.01, 0.5, 0.99, 0.9999]


@pytest.fixture
def poison_empty(monkeypatch):
    """Every floating torch.empty comes back NaN-filled: a buffer element a kernel forgets to
    write (output, gradient, state) shows up as NaN in the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _decay(M, H=None, device="cpu", requires_grad=False, taus=TAUS):
    """Timescales spread over the whole range (per head: each head a different permutation)."""
    base = torch.tensor([taus[i % len(taus)] for i in range(M)], dtype=torch.float32)
    tau = base if H is None else torch.stack([base.roll(h) for h in range(H)])
    return tau.to(device).requires_grad_(requires_grad)


def _mix(kind, B, T, H, M, dtype, device):
    shape = {None: None, "M": (M,), "HM": (H, M), "BTHM": (B, T, H, M)}[kind]
    return None if shape is None else randn(*shape, dtype=dtype, device=device, requires_grad=True)


def _inputs(B, T, H, K, V, M, dtype, device, mix=None, per_head=False, h0=True, N=None):
    q = randn(B, T, H, K, dtype=dtype, device=device, requires_grad=True)
    k = randn(B, T, H, K, dtype=dtype, device=device, requires_grad=True)
    v = randn(B, T, H, V, dtype=dtype, device=device, requires_grad=True)
    decay = _decay(M, H if per_head else None, device, requires_grad=True)
    state = randn(N or B, H, M, K, V, device=device, requires_grad=True) if h0 else None
    return q, k, v, decay, _mix(mix, B, T, H, M, dtype, device), state


def _grads(outputs, inputs, seed=1):
    """Gradients of a random linear functional of `outputs` (same cotangents for every caller)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)
    live = [x for x in inputs if x is not None and x.requires_grad]
    return dict(zip([id(x) for x in live], torch.autograd.grad(loss, live, allow_unused=True, materialize_grads=True)))


def _check_scan(backend, device, dtype, B, T, H, K, V, M, mix=None, per_head=False, h0=True,
                chunk_size=16, grad=True):
    """Forward, final state and every gradient against the float64 reference; returns the errors."""
    q, k, v, decay, mx, s0 = _inputs(B, T, H, K, V, M, dtype, device, mix, per_head, h0)
    o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True,
                     chunk_size=chunk_size, backend=backend)
    args = [as_ref(x) for x in (q, k, v, decay, mx, s0)]
    rq, rk, rv, rd, rm, rs = [None if a is None else a.cpu() for a in args]
    ro, rst = reference.cms_scan(rq, rk, rv, rd, rm, initial_state=rs, output_final_state=True)
    assert o.dtype == dtype and st.dtype == torch.float32
    errs = {"o": assert_close("o", o, ro, dtype, device), "state": assert_close("state", st, rst, dtype, device)}
    if grad:
        names = ["q", "k", "v", "decay", "mix", "initial_state"]
        ours, refs = (q, k, v, decay, mx, s0), (rq, rk, rv, rd, rm, rs)
        g, rg = _grads([o, st], ours), _grads([ro, rst], refs)
        for name, x, r in zip(names, ours, refs):
            if x is not None:
                errs["d" + name] = assert_close("d" + name, g[id(x)], rg[id(r)], dtype, device, grad=True)
    return errs


# ----------------------------------------------------------------------------- scan vs reference
# Representative rather than Cartesian: every mix form, both decay forms, with and without an
# initial state, every dtype; K, V not powers of two and T not a multiple of the chunk.
CASES = [
    # dtype,         mix,    per_head, h0
    (torch.float32, None, False, True),
    (torch.float32, "M", False, False),
    (torch.float32, "HM", True, True),
    (torch.float32, "BTHM", True, True),
    (torch.float16, "BTHM", False, True),
    (torch.float16, None, True, False),
    (torch.float16, "M", True, True),
    (torch.bfloat16, None, False, True),
    (torch.bfloat16, "HM", True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,mix,per_head,h0", CASES)
def test_scan_matches_reference(backend, device, poison_empty, dtype, mix, per_head, h0):
    _check_scan(backend, device, dtype, B=2, T=37, H=2, K=12, V=36, M=3, mix=mix, per_head=per_head, h0=h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_all_timescales_T256(backend, device):
    """tau = 1e-3 .. 0.9999 in one call, T = 256 over 4 chunks, decay gradient included."""
    _check_scan(backend, device, torch.float32, B=1, T=256, H=1, K=16, V=16, M=5, mix="HM", chunk_size=64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", TAUS)
def test_scan_single_timescale(backend, device, tau):
    """Each tau on its own (M = 1), gradients included: no over/underflow to NaN, tight errors."""
    q, k, v, _, _, s0 = _inputs(1, 40, 1, 16, 16, 1, torch.float32, device)
    decay = torch.tensor([tau], device=device, requires_grad=True)
    o, st = cms_scan(q, k, v, decay, initial_state=s0, output_final_state=True, chunk_size=16, backend=backend)
    ref = [as_ref(x).cpu() for x in (q, k, v, decay, s0)]
    ro, rst = reference.cms_scan(*ref[:4], initial_state=ref[4], output_final_state=True)
    assert_close("o", o, ro, torch.float32, device)
    assert_close("state", st, rst, torch.float32, device)
    g, rg = _grads([o, st], (q, k, v, decay, s0)), _grads([ro, rst], ref)
    for name, x, r in zip("q k v decay h0".split(), (q, k, v, decay, s0), ref):
        assert_close("d" + name, g[id(x)], rg[id(r)], torch.float32, device, grad=True)


def test_long_sequence_torch_backend():
    """T = 4096 on the torch backend: finite everywhere, values equal to the float64 reference,
    gradients equal to the float64 chunked path (the token-by-token reference's autograd is
    quadratic in T; that path is itself checked against the reference above)."""
    q, k, v, decay, mx, s0 = _inputs(1, 4096, 1, 8, 8, 5, torch.float32, "cpu", "HM")
    o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True, backend="torch")
    ref = [as_ref(x) for x in (q, k, v, decay, mx, s0)]
    with torch.no_grad():
        ro, rst = reference.cms_scan(*ref[:5], initial_state=ref[5], output_final_state=True)
    assert_close("o", o, ro, torch.float32, "cpu")
    assert_close("state", st, rst, torch.float32, "cpu")
    o64, st64 = cms_scan(*ref[:5], initial_state=ref[5], output_final_state=True, backend="torch")
    assert_close("o (float64 path)", o64, ro, torch.float64, "cpu")
    g, rg = _grads([o, st], (q, k, v, decay, mx, s0)), _grads([o64, st64], ref)
    for name, x, r in zip("q k v decay mix h0".split(), (q, k, v, decay, mx, s0), ref):
        assert torch.isfinite(g[id(x)]).all(), f"d{name} not finite"
        assert_close("d" + name, g[id(x)], rg[id(r)], torch.float32, "cpu", grad=True)


def test_long_sequence_torch_split_and_resume():
    """T = 4096: one call equals two resumed halves (and stays finite)."""
    q, k, v, decay, mx, s0 = _inputs(1, 4096, 1, 8, 8, 5, torch.float32, "cpu", "BTHM")
    with torch.no_grad():
        o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True, backend="torch")
        t = 1501
        o1, s1 = cms_scan(q[:, :t], k[:, :t], v[:, :t], decay, mx[:, :t], initial_state=s0,
                          output_final_state=True, backend="torch")
        o2, s2 = cms_scan(q[:, t:], k[:, t:], v[:, t:], decay, mx[:, t:], initial_state=s1,
                          output_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(st).all()
    assert_close("o", torch.cat([o1, o2], 1), o.double(), torch.float32, "cpu")
    assert_close("state", s2, st.double(), torch.float32, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_memory_is_decayed_linear_attention(backend, device):
    """M = 1 is linear attention with k scaled by (1 - tau) and a state decaying by tau per step:
    o = scale * ((q k'^T) * tau^(t - s) causal) v, written here as one masked matrix product."""
    B, T, H, K, V, tau = 2, 30, 2, 8, 12, 0.8
    q, k, v = (randn(B, T, H, d, device=device) for d in (K, K, V))
    o, _ = cms_scan(q, k, v, torch.tensor([tau], device=device), backend=backend)
    t = torch.arange(T, dtype=torch.float64)
    decay = torch.where(t[:, None] >= t[None, :], tau ** (t[:, None] - t[None, :]).clamp(min=0), 0.)
    q64, k64, v64 = (x.double().cpu() for x in (q, k, v))
    scores = torch.einsum("bthk,bshk->bhts", q64 * K ** -0.5, (1 - tau) * k64) * decay
    expected = torch.einsum("bhts,bshv->bthv", scores, v64)
    assert_close("o", o[..., 0, :], expected, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_tau_reads_only_the_current_token(backend, device):
    """tau -> 0: the memory holds (1 - tau) k_t v_t^T plus O(tau) history."""
    q, k, v = (randn(1, 20, 2, 16, device=device) for _ in range(3))
    tau = 1e-3
    o, st = cms_scan(q, k, v, torch.tensor([tau], device=device), output_final_state=True, backend=backend)
    now = (q * k).sum(-1, keepdim=True) * 16 ** -0.5 * v
    rel = ((o[..., 0, :] - now).norm() / now.norm()).item()
    assert 1e-6 < rel < 20 * tau, rel
    assert torch.allclose(st[0, :, 0], k[0, -1, :, :, None] * v[0, -1, :, None, :], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_and_resume(backend, device):
    """Two calls chained through the state equal one call, in values and in gradients."""
    B, T, H, K, V, M, t = 1, 40, 2, 8, 16, 3, 23
    q, k, v, decay, mx, s0 = _inputs(B, T, H, K, V, M, torch.float32, device, "BTHM", per_head=True)
    o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True, chunk_size=16, backend=backend)
    o1, s1 = cms_scan(q[:, :t], k[:, :t], v[:, :t], decay, mx[:, :t], initial_state=s0,
                      output_final_state=True, chunk_size=16, backend=backend)
    o2, s2 = cms_scan(q[:, t:], k[:, t:], v[:, t:], decay, mx[:, t:], initial_state=s1,
                      output_final_state=True, chunk_size=16, backend=backend)
    assert_close("o", torch.cat([o1, o2], 1), o.double(), torch.float32, device)
    assert_close("state", s2, st.double(), torch.float32, device)
    leaves = (q, k, v, decay, mx, s0)
    g_one, g_split = _grads([o, st], leaves), _grads([torch.cat([o1, o2], 1), s2], leaves)
    for name, x in zip("q k v decay mix h0".split(), leaves):
        assert_close("d" + name, g_split[id(x)], g_one[id(x)].double(), torch.float32, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offsets_dtype,dtype", [(torch.int32, torch.float32), (torch.int64, torch.float32),
                                                 (torch.int64, torch.float16)])
def test_packed_sequences_equal_a_loop(backend, device, poison_empty, offsets_dtype, dtype):
    """cu_seqlens (one sequence empty, one longer than a chunk) equals one call per sequence."""
    lens = [5, 0, 21, 9]
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(offsets_dtype).to(device)
    T, H, K, V, M = sum(lens), 2, 8, 12, 3
    q, k, v, decay, mx, s0 = _inputs(1, T, H, K, V, M, dtype, device, "BTHM", per_head=True, N=len(lens))
    o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                     chunk_size=16, backend=backend)
    leaves = (q, k, v, decay, mx, s0)
    refs = [as_ref(x) for x in leaves]
    rq, rk, rv, rd, rm, rs = refs
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        o_n, s_n = reference.cms_scan(rq[:, a:b], rk[:, a:b], rv[:, a:b], rd, rm[:, a:b],
                                      initial_state=rs[n:n + 1], output_final_state=True)
        outs.append(o_n)
        finals.append(s_n)
    loop_o, loop_st = torch.cat(outs, 1), torch.cat(finals)
    assert_close("o", o, loop_o, dtype, device)
    assert_close("state", st, loop_st, dtype, device)
    assert torch.equal(st[1], s0[1].detach().float()), "an empty sequence keeps its initial state"
    g, g_loop = _grads([o, st], leaves), _grads([loop_o, loop_st], refs)
    for name, x, r in zip("q k v decay mix h0".split(), leaves, refs):
        assert_close("d" + name, g[id(x)], g_loop[id(r)], dtype, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_state_only_gradient(backend, device):
    """A loss on the final state alone (no output gradient) still reaches every input."""
    q, k, v, decay, _, s0 = _inputs(1, 20, 1, 8, 8, 2, torch.float32, device)
    _, st = cms_scan(q, k, v, decay, initial_state=s0, output_final_state=True, chunk_size=16, backend=backend)
    ref = [as_ref(x).cpu() for x in (q, k, v, decay, s0)]
    _, rst = reference.cms_scan(*ref[:4], initial_state=ref[4], output_final_state=True)
    g, rg = _grads([st], (q, k, v, decay, s0)), _grads([rst], ref)
    for name, x, r in zip("q k v decay h0".split(), (q, k, v, decay, s0), ref):
        assert_close("d" + name, g[id(x)], rg[id(r)], torch.float32, device, grad=True)


@pytest.mark.parametrize("mix,decay_grad,mix_grad", [("BTHM", False, True), ("HM", True, False), ("HM", False, False),
                                                    (None, False, False)])
def test_gradients_of_a_subset_of_inputs(device, poison_empty, mix, decay_grad, mix_grad):
    """Fixed decay and/or fixed gates: the backward skips those gradients (and the kernel that
    computes them when neither is needed), the others stay exact."""
    q, k, v, decay, mx, _ = _inputs(2, 21, 2, 12, 36, 3, torch.float32, device, mix, h0=False)
    decay.requires_grad_(decay_grad)
    if mx is not None:
        mx.requires_grad_(mix_grad)
    o, _ = cms_scan(q, k, v, decay, mx, chunk_size=16, backend="triton")
    ref = [None if x is None else as_ref(x).cpu() for x in (q, k, v, decay, mx)]
    ro, _ = reference.cms_scan(*ref)
    assert_close("o", o, ro, torch.float32, device)
    g, rg = _grads([o], (q, k, v, decay, mx)), _grads([ro], ref)
    assert len(g) == 3 + decay_grad + mix_grad
    for name, x, r in zip("q k v decay mix".split(), (q, k, v, decay, mx), ref):
        if x is not None and x.requires_grad:
            assert_close("d" + name, g[id(x)], rg[id(r)], torch.float32, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [16, 32, 1 << 20])
def test_chunk_size_is_honoured(backend, device, monkeypatch, chunk_size):
    """Every chunk length gives the reference's values; the Triton path launches one program per
    (chunk of that length, head) (a chunk longer than the sequence is capped at it)."""
    grids = []
    real = tk.launch_grid
    monkeypatch.setattr(tk, "launch_grid", lambda name, **kw: grids.append((name, kw)) or real(name, **kw))
    T, H = 48, 2
    _check_scan(backend, device, torch.float32, B=1, T=T, H=H, K=16, V=16, M=2, mix="HM", chunk_size=chunk_size)
    if backend == "triton":
        n_chunks = -(-T // min(chunk_size, 64))
        assert {kw["n_chunks"] for _, kw in grids} == {n_chunks}
        assert ("fwd", (n_chunks * H, 1)) in [(name, real(name, **kw)) for name, kw in grids]


def test_float64_routes_to_torch_unless_triton_is_asked_for(device):
    """backend=None runs float64 on the exact PyTorch path; backend="triton" refuses it."""
    q, k, v, decay, mx, s0 = _inputs(1, 10, 1, 8, 8, 2, torch.float64, device, "M")
    o, _ = cms_scan(q, k, v, decay, mx, initial_state=s0)
    ro, _ = reference.cms_scan(q, k, v, decay, mx, initial_state=s0)
    assert o.dtype == torch.float64
    assert_close("o", o, ro, torch.float64, device)
    with pytest.raises(TypeError, match="float64"):
        cms_scan(q, k, v, decay, mx, initial_state=s0, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        cms_step(q[:, 0], k[:, 0], v[:, 0], decay, s0.detach().clone(), backend="triton")


# ----------------------------------------------------------------------------- launch shape and memory
def _programs(name, **dims):
    grid = tk.launch_grid(name, **dims)
    return grid[0] * (grid[1] if len(grid) > 1 else 1)


def test_launches_have_chunk_parallelism():
    """B=1, H=2, T=1024, K=V=64, M=4: the largest forward and backward launches each run at least
    T/64 x B x H = 32 programs (the fused-chunk kernels launched 4 for the forward)."""
    B, H, T, K, V, M = 1, 2, 1024, 64, 64, 4
    dims = dict(N=B, H=H, M=M, n_chunks=B * T // tk.CHUNK, K=K, V=V)
    assert max(_programs(n, **dims) for n in ("state", "fwd")) >= T // 64 * B * H
    assert max(_programs(n, **dims) for n in ("state1", "dh", "dv", "bwd")) >= T // 64 * B * H


def test_launch_grids_stay_in_cuda_limits_for_many_packed_sequences():
    """70000 packed one-token sequences x 1 head: the counts that grow (sequences, chunks, heads,
    memories) sit on grid axis 0; the old layout (N x H on axis 1) exceeded the 65535 limit."""
    N, H, M, K, V = 70000, 1, 4, 64, 64
    cu = torch.arange(N + 1)
    n_chunks = chunk_indices(cu, tk.CHUNK).shape[0]
    assert n_chunks == N
    for name in ("state", "state1", "dh", "fwd", "dv", "bwd"):
        grid = tk.launch_grid(name, N=N, H=H, M=M, n_chunks=n_chunks, K=K, V=V)
        assert grid[0] >= N * H and all(g <= GRID_YZ_LIMIT for g in grid[1:]), (name, grid)
    with pytest.raises(ValueError, match="grid"):
        check_grid((1, N * H))


def _saved_bytes(fn):
    """Bytes autograd keeps for backward while `fn` runs (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("mix", [None, "BTHM"])
def test_saved_memory_is_the_inputs(device, mix):
    """The forward saves no per-chunk states: at most 1.5 x the inputs plus two states."""
    B, T, H, K, V, M = 1, 128, 2, 16, 16, 4
    q, k, v, decay, mx, s0 = _inputs(B, T, H, K, V, M, torch.float32, device, mix)
    saved, (o, _) = _saved_bytes(lambda: cms_scan(q, k, v, decay, mx, initial_state=s0, backend="triton"))
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v, decay, mx) if x is not None)
    assert 0 < saved <= 1.5 * inputs + 2 * s0.numel() * 4, (saved, inputs)
    assert o.grad_fn is not None


def test_backward_under_autotuning(device):
    """The backward accumulates dq, dk, dv over memories in place: tuning must not add twice."""
    q, k, v, decay, mx, s0 = _inputs(1, 20, 1, 16, 16, 2, torch.float32, device, "HM")
    leaves = (q, k, v, decay, mx, s0)
    o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True, backend="triton")
    want = _grads([o, st], leaves)
    with simulated_autotuning():
        o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True, backend="triton")
        got = _grads([o, st], leaves)
    for name, x in zip("q k v decay mix h0".split(), leaves):
        assert_close("d" + name, got[id(x)], want[id(x)].double(), torch.float32, device, grad=True)


# ----------------------------------------------------------------------------- delta rule (beta)
def _beta(B, T, H, M, per_memory, device, lead=None):
    """beta in (0, 1) (a stable step for unit keys), [B, T, H] or [B, T, H, M]."""
    shape = (*(lead or (B, T)), H) + ((M,) if per_memory else ())
    return torch.rand(shape).mul(0.9).add(0.05).to(device).requires_grad_(True)


def _unit(x):
    """Unit rows (the delta rule's stable regime), as a fresh leaf in x's dtype."""
    y = torch.nn.functional.normalize(x.detach().float(), dim=-1).to(x.dtype)
    return y.requires_grad_(True)


def _check_delta(backend, device, dtype, B, T, H, K, V, M, mix=None, per_head=False, per_memory=False, h0=True,
                 chunk_size=16, cu_seqlens=None):
    """The delta rule against the float64 token loop: output, final state and every gradient."""
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, decay, mx, s0 = _inputs(B, T, H, K, V, M, dtype, device, mix, per_head, h0, N=N)
    k = _unit(k)
    beta = _beta(B, T, H, M, per_memory, device)
    o, st = cms_scan(q, k, v, decay, mx, beta=beta, initial_state=s0, output_final_state=True,
                     cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)
    ours = (q, k, v, beta, decay, mx, s0)
    refs = [None if x is None else as_ref(x).cpu() for x in ours]
    rq, rk, rv, rb, rd, rm, rs = refs
    ro, rst = reference.cms_scan(rq, rk, rv, rd, rm, beta=rb, initial_state=rs, output_final_state=True,
                                 cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu())
    assert o.dtype == dtype and st.dtype == torch.float32
    assert o.shape == ((B, T, H, V) if mix else (B, T, H, M, V))
    errs = {"o": assert_close("o", o, ro, dtype, device), "state": assert_close("state", st, rst, dtype, device)}
    g, rg = _grads([o, st], ours), _grads([ro, rst], refs)
    for name, x, r in zip(["q", "k", "v", "beta", "decay", "mix", "initial_state"], ours, refs):
        if x is not None:
            errs["d" + name] = assert_close("d" + name, g[id(x)], rg[id(r)], dtype, device, grad=True)
    return errs


DELTA_CASES = [
    # dtype,         M, mix,    per_head, per_memory, h0
    (torch.float32, 1, None, False, False, True),
    (torch.float32, 2, "M", True, True, False),
    (torch.float32, 3, "HM", False, False, True),
    (torch.float32, 4, "BTHM", True, False, True),
    (torch.float32, 5, "BTHM", False, True, True),
    (torch.float16, 3, None, True, True, True),
    (torch.bfloat16, 4, "HM", True, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,M,mix,per_head,per_memory,h0", DELTA_CASES)
def test_delta_scan_matches_reference(backend, device, poison_empty, dtype, M, mix, per_head, per_memory, h0):
    _check_delta(backend, device, dtype, B=2, T=37, H=2, K=12, V=20, M=M, mix=mix, per_head=per_head,
                 per_memory=per_memory, h0=h0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_delta_scan_all_timescales_T256(backend, device, chunk_size):
    """tau = 1e-3 .. 0.9999 in one call over several chunks, every gradient (the decay's included)."""
    _check_delta(backend, device, torch.float32, B=1, T=256, H=2, K=16, V=16, M=5, mix="BTHM", per_head=True,
                 per_memory=True, chunk_size=chunk_size)


@pytest.mark.parametrize("D", [64, 128])
def test_delta_triton_launches_fill_the_gpu(monkeypatch, D):
    """B = 1, H = 2, T = 1024: the largest forward and backward launches of the Triton delta pipeline run at
    least T / 64 x B x H programs (chunk-parallel, not one program per sequence). Launches are recorded, not run."""
    from hope_kernels.cms import triton_delta as td
    B, T, H, M = 1, 1024, 2, 3
    launched = []
    monkeypatch.setattr(td, "_launch", lambda kernel, grid, *a, **kw: launched.append((kernel, check_grid(grid))))
    q, k = randn(B, T, H, D), randn(B, T, H, D)
    v, beta, tau = randn(B, T, H, D), torch.rand(B, T, H, M), _decay(M, H)
    BT = td.chunk_tile(64, D, T)
    lay = td.layout(q, None, BT)
    programs = lambda: max(g[0] * (g[1] if len(g) > 1 else 1) for _, g in launched)
    td.forward(q, k, v, tau, beta, None, 0.1, None, None, BT, lay)
    assert [kn for kn, _ in launched] == [td.delta_wy_kernel, td.delta_state_kernel, td.delta_out_kernel]
    assert programs() >= T // 64 * B * H
    launched.clear()
    do = randn(B, T, H, M, D)
    td.backward(q, k, v, tau, beta, None, 0.1, None, None, BT, lay, do, None, dict(decay=True, mix=False, h0=False))
    assert {td.delta_state_bwd_kernel, td.delta_grad_out_kernel, td.delta_grad_wy_kernel} <= {kn for kn, _ in launched}
    assert programs() >= T // 64 * B * H


def test_packed_chunk_tables_refuse_cuda_graph_capture(monkeypatch):
    """The chunk tables of packed batches (this op's and titans_scan's) read chunk counts on the host: during a
    CUDA graph capture that is a clear RuntimeError, not a failed capture."""
    from hope_kernels.titans.triton_chunk import chunk_table
    cu = torch.tensor([0, 5, 22])          # 1 + 2 chunks of 16
    assert chunk_indices(cu, 16).shape == (3, 2) and chunk_table(cu, 16, 16, 1)[2] == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for build in (lambda: chunk_indices(cu, 16), lambda: chunk_table(cu, 16, 16, 1)):
        with pytest.raises(RuntimeError, match="cu_seqlens.*CUDA graph"):
            build()


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_packed_sequences(backend, device, poison_empty):
    """cu_seqlens (one sequence empty, one longer than a chunk) against the token loop per sequence."""
    lens = [5, 0, 21, 9]
    cu = torch.tensor([0] + lens).cumsum(0).to(device)
    _check_delta(backend, device, torch.float32, B=1, T=sum(lens), H=2, K=8, V=12, M=3, mix="BTHM",
                 per_head=True, per_memory=True, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_split_and_resume(backend, device):
    """Two calls chained through the state equal one call, in values and in gradients."""
    B, T, H, K, V, M, t = 1, 40, 2, 8, 16, 3, 23
    q, k, v, decay, mx, s0 = _inputs(B, T, H, K, V, M, torch.float32, device, "BTHM", per_head=True)
    k = _unit(k)
    beta = _beta(B, T, H, M, True, device)
    run = lambda sl, h: cms_scan(q[:, sl], k[:, sl], v[:, sl], decay, mx[:, sl], beta=beta[:, sl], initial_state=h,
                                 output_final_state=True, chunk_size=16, backend=backend)
    o, st = run(slice(None), s0)
    o1, s1 = run(slice(0, t), s0)
    o2, s2 = run(slice(t, None), s1)
    assert_close("o", torch.cat([o1, o2], 1), o.double(), torch.float32, device)
    assert_close("state", s2, st.double(), torch.float32, device)
    leaves = (q, k, v, beta, decay, mx, s0)
    g_one, g_split = _grads([o, st], leaves), _grads([torch.cat([o1, o2], 1), s2], leaves)
    for name, x in zip("q k v beta decay mix h0".split(), leaves):
        assert_close("d" + name, g_split[id(x)], g_one[id(x)].double(), torch.float32, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_memory", [False, True])
def test_delta_equals_titans_scan_on_expanded_heads(backend, device, per_memory):
    """Memory m of head h is titans_scan (period 1, lr = beta, decay = tau_m) on its own head."""
    from hope_kernels import titans_scan
    B, T, H, K, V, M = 2, 30, 2, 8, 12, 3
    q, k, v, decay, _, s0 = _inputs(B, T, H, K, V, M, torch.float32, device, per_head=True)
    k = _unit(k)
    beta = _beta(B, T, H, M, per_memory, device)
    with torch.no_grad():
        o, st = cms_scan(q, k, v, decay, beta=beta, initial_state=s0, output_final_state=True, chunk_size=16,
                         backend=backend)
        fold = lambda x: x.unsqueeze(3).expand(B, T, H, M, x.shape[-1]).reshape(B, T, H * M, x.shape[-1])
        lr = (beta if per_memory else beta[..., None].expand(B, T, H, M)).reshape(B, T, H * M)
        tau = decay.reshape(1, 1, H * M).expand(B, T, H * M).contiguous()
        ot, stt = titans_scan(fold(q), fold(k), fold(v), lr, tau, scale=K ** -0.5, period=1,
                              initial_state=s0.reshape(B, H * M, K, V), output_final_state=True, backend="torch")
    assert_close("o", o, ot.view(B, T, H, M, V).double(), torch.float32, device)
    assert_close("state", st, stt.view(B, H, M, K, V).double(), torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix,per_memory", [(None, False), ("HM", True), ("BHM", False)])
def test_delta_step_loop_equals_scan(backend, device, mix, per_memory):
    B, T, H, K, V, M = 2, 9, 2, 12, 20, 3
    q, k, v, decay, _, s0 = _inputs(B, T, H, K, V, M, torch.float32, device, per_head=True)
    k = _unit(k)
    beta = _beta(B, T, H, M, per_memory, device)
    per_token = randn(B, T, H, M, device=device) if mix == "BHM" else None
    static = randn(H, M, device=device) if mix == "HM" else None
    with torch.no_grad():
        o_scan, st_scan = cms_scan(q, k, v, decay, per_token if mix == "BHM" else static, beta=beta,
                                   initial_state=s0, output_final_state=True, backend=backend)
        state = s0.detach().clone()
        outs = []
        for t in range(T):
            m_t = per_token[:, t] if mix == "BHM" else static
            o_t, ret = cms_step(q[:, t], k[:, t], v[:, t], decay, state, m_t, beta=beta[:, t], backend=backend)
            assert ret is state
            outs.append(o_t)
    assert_close("o", torch.stack(outs, 1), o_scan.double(), torch.float32, device)
    assert_close("state", state, st_scan.double(), torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_step_matches_reference(backend, device):
    B, H, K, V, M = 3, 2, 20, 24, 5
    q, k, v = randn(B, H, K, device=device), _unit(randn(B, H, K, device=device)).detach(), randn(B, H, V, device=device)
    decay, mix, beta = _decay(M, device=device), randn(B, H, M, device=device), torch.rand(B, H, M, device=device)
    state = randn(B, H, M, K, V, device=device)
    ref_state = state.double().cpu()
    o, _ = cms_step(q, k, v, decay, state, mix, scale=0.3, beta=beta, backend=backend)
    ro, _ = reference.cms_step(*(x.double().cpu() for x in (q, k, v, decay)), ref_state, mix.double().cpu(),
                               scale=0.3, beta=beta.double().cpu())
    assert_close("o", o, ro, torch.float32, device)
    assert_close("state", state, ref_state, torch.float32, device)


BAD_BETA = [
    (torch.full((1, 6, 2), -0.1), ValueError, "beta"),
    (torch.tensor(float("nan")).expand(1, 6, 2).clone(), ValueError, "beta"),
    (torch.full((1, 6, 3), 0.5), ValueError, "beta"),
    (torch.full((1, 6, 2, 2), 0.5), ValueError, "beta"),
    (torch.ones(1, 6, 2, dtype=torch.int64), TypeError, "beta"),
]


@pytest.mark.parametrize("beta,exc,word", BAD_BETA)
def test_delta_rejects_bad_beta(beta, exc, word):
    with pytest.raises(exc, match=word):
        cms_scan(**_ok("cpu"), beta=beta)
    B, H, K, V, M = 1, 2, 4, 4, 3
    with pytest.raises(exc, match=word):
        cms_step(randn(B, H, K), randn(B, H, K), randn(B, H, V), _decay(M), randn(B, H, M, K, V), beta=beta[:, 0])


def test_unit_lower_inverse():
    """The torch path's chunk-system inverse, for every size up to a chunk (powers of two and not)."""
    from hope_kernels.cms.torch_chunked import unit_lower_inverse
    for L in (1, 2, 5, 16, 37, 64):
        A = torch.randn(3, L, L, dtype=torch.float64).tril(-1) * 0.5
        eye = torch.eye(L, dtype=torch.float64)
        assert_close(f"inverse L={L}", unit_lower_inverse(A) @ (eye + A), eye.expand(3, L, L), torch.float64, "cpu")


# ----------------------------------------------------------------------------- step
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,mix", [(torch.float32, None), (torch.float32, "M"),
                                       (torch.float16, "HM"), (torch.bfloat16, "BHM")])
def test_step_loop_equals_scan(backend, device, poison_empty, dtype, mix):
    B, T, H, K, V, M = 2, 9, 2, 12, 40, 3
    q, k, v, decay, _, s0 = _inputs(B, T, H, K, V, M, dtype, device, per_head=True)
    mixes = {None: (None, None), "M": (randn(M, dtype=dtype, device=device),) * 2,
             "HM": (randn(H, M, dtype=dtype, device=device),) * 2}
    if mix == "BHM":
        per_token = randn(B, T, H, M, dtype=dtype, device=device)
        mixes["BHM"] = (per_token, None)
    scan_mix, step_mix = mixes[mix]
    with torch.no_grad():
        o_scan, st_scan = cms_scan(q, k, v, decay, scan_mix, initial_state=s0, output_final_state=True,
                                   backend=backend)
        state = s0.detach().clone()
        outs = []
        for t in range(T):
            m_t = per_token[:, t] if mix == "BHM" else step_mix
            o_t, ret = cms_step(q[:, t], k[:, t], v[:, t], decay, state, m_t, backend=backend)
            assert ret is state
            outs.append(o_t)
    o_steps = torch.stack(outs, 1)
    assert o_steps.dtype == dtype and o_steps.shape == o_scan.shape
    assert_close("o", o_steps, o_scan.double(), dtype, device)
    assert_close("state", state, st_scan.double(), dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_reference(backend, device):
    B, H, K, V, M = 3, 2, 20, 24, 5
    q, k, v = randn(B, H, K, device=device), randn(B, H, K, device=device), randn(B, H, V, device=device)
    decay, mix = _decay(M, device=device), randn(B, H, M, device=device)
    state = randn(B, H, M, K, V, device=device)
    ref_state = state.double().cpu()
    o, _ = cms_step(q, k, v, decay, state, mix, scale=0.3, backend=backend)
    ro, _ = reference.cms_step(q.double().cpu(), k.double().cpu(), v.double().cpu(), decay.double().cpu(),
                               ref_state, mix.double().cpu(), scale=0.3)
    assert_close("o", o, ro, torch.float32, device)
    assert_close("state", state, ref_state, torch.float32, device)


# ----------------------------------------------------------------------------- bad inputs
def _ok(device, **over):
    B, T, H, K, V, M = 1, 6, 2, 4, 4, 3
    args = dict(q=randn(B, T, H, K, device=device), k=randn(B, T, H, K, device=device),
                v=randn(B, T, H, V, device=device), decay=_decay(M, device=device))
    args.update(over)
    return args


BAD_SCAN = [
    ("decay", dict(decay=torch.tensor([0.5, 1.0, 0.2])), ValueError, "decay"),
    ("decay", dict(decay=torch.tensor([0.5, 0.0, 0.2])), ValueError, "decay"),
    ("decay", dict(decay=torch.tensor([0.5, -0.1, 0.2])), ValueError, "decay"),
    ("decay", dict(decay=torch.tensor([0.5, float("nan"), 0.2])), ValueError, "decay"),
    ("decay", dict(decay=torch.full((3, 3), 0.5)), ValueError, "decay"),
    ("decay", dict(decay=torch.full((1, 2, 3), 0.5)), ValueError, "decay"),
    ("decay", dict(decay=torch.tensor([1, 2])), TypeError, "decay"),
    ("mix", dict(mix=torch.randn(4)), ValueError, "mix"),
    ("mix", dict(mix=torch.randn(1, 5, 2, 3)), ValueError, "mix"),
    ("q", dict(q=torch.randn(6, 2, 4)), ValueError, "q"),
    ("k", dict(k=torch.randn(1, 6, 2, 5)), ValueError, "k"),
    ("v", dict(v=torch.randn(1, 7, 2, 4)), ValueError, "v"),
    ("k", dict(k=torch.randn(1, 6, 2, 4, dtype=torch.float16)), TypeError, "dtype"),
    ("q", dict(q=torch.ones(1, 6, 2, 4, dtype=torch.int64)), TypeError, "q"),
    ("initial_state", dict(initial_state=torch.randn(1, 2, 3, 4, 5)), ValueError, "initial_state"),
    ("initial_state", dict(initial_state=torch.randn(2, 2, 3, 4, 4)), ValueError, "initial_state"),
    ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
    ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens"),
    ("cu_seqlens", dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
    ("chunk_size", dict(chunk_size=0), ValueError, "chunk_size"),
    ("backend", dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("what,over,exc,word", BAD_SCAN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_SCAN)])
def test_scan_rejects_bad_input(what, over, exc, word):
    args = _ok("cpu", **over)
    with pytest.raises(exc, match=word):
        cms_scan(**args)


def test_scan_rejects_cu_seqlens_with_batch():
    args = _ok("cpu", q=randn(2, 6, 2, 4), k=randn(2, 6, 2, 4), v=randn(2, 6, 2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        cms_scan(**args, cu_seqlens=torch.tensor([0, 6]))


BAD_STEP = [
    (dict(decay=torch.tensor([0.5, 1.5, 0.2])), ValueError, "decay"),
    (dict(state=None), ValueError, "state"),
    (dict(state=torch.randn(2, 2, 2, 4, 4)), ValueError, "state"),
    (dict(state=torch.randn(2, 2, 3, 4, 4, dtype=torch.float16)), TypeError, "state"),
    (dict(mix=torch.randn(2, 2, 2)), ValueError, "mix"),
    (dict(q=torch.randn(2, 2, 4, 1)), ValueError, "q"),
    (dict(v=torch.randn(3, 2, 4)), ValueError, "v"),
]


@pytest.mark.parametrize("over,exc,word", BAD_STEP)
def test_step_rejects_bad_input(over, exc, word):
    B, H, K, V, M = 2, 2, 4, 4, 3
    args = dict(q=randn(B, H, K), k=randn(B, H, K), v=randn(B, H, V), decay=_decay(M),
                state=randn(B, H, M, K, V))
    args.update(over)
    with pytest.raises(exc, match=word):
        cms_step(**args)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", [None, "BTHM"])
def test_scan_gpu_realistic(dtype, mix):
    _check_scan("triton", "cuda", dtype, B=2, T=1000, H=4, K=64, V=64, M=4, mix=mix, chunk_size=64)


@pytest.mark.gpu
def test_scan_gpu_wide_heads_packed():
    """K = V = 128 (whole-K tiles of 64-row chunks) with packed sequences, against a per-sequence loop."""
    lens = [300, 0, 513, 64]
    cu = torch.tensor([0] + lens).cumsum(0).cuda()
    q, k, v, decay, mx, s0 = _inputs(1, sum(lens), 2, 128, 128, 3, torch.bfloat16, "cuda", "HM", N=len(lens))
    o, st = cms_scan(q, k, v, decay, mx, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        r = [as_ref(x) for x in (q[:, a:b], k[:, a:b], v[:, a:b], decay, mx, s0[n:n + 1])]
        ro, rst = reference.cms_scan(*r[:5], initial_state=r[5], output_final_state=True)
        if b > a:
            assert_close(f"o[{n}]", o[:, a:b], ro, torch.bfloat16, "cuda")
        assert_close(f"state[{n}]", st[n:n + 1], rst, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_step_gpu_realistic():
    B, H, K, V, M = 8, 8, 64, 64, 4
    q, k, v = randn(B, H, K, device="cuda"), randn(B, H, K, device="cuda"), randn(B, H, V, device="cuda")
    decay, mix = _decay(M, H, "cuda"), randn(M, device="cuda")
    state = randn(B, H, M, K, V, device="cuda")
    ref_state = state.double()
    o, _ = cms_step(q, k, v, decay, state, mix)
    ro, _ = reference.cms_step(q.double(), k.double(), v.double(), decay.double(), ref_state, mix.double())
    assert_close("o", o, ro, torch.float32, "cuda")
    assert_close("state", state, ref_state, torch.float32, "cuda")
