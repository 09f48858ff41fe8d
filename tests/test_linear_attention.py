"""linear_attention / linear_attention_step: both backends against the float64 reference.

Kernels run in the Triton interpreter on CPU (where every kernel output buffer is NaN-poisoned,
see triton_utils.empty), so shapes stay small and the dtype x shape x flag matrix is a
representative set of cases rather than the full product.
"""
import math

import pytest
import torch

from hope_kernels import linear_attention, linear_attention_step, reference, triton_utils
from hope_kernels.linear_attention import triton_kernels
from helpers import as_ref, assert_close, randn

BACKENDS = ["triton", "torch"]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# --------------------------------------------------------------------------- helpers
def make_inputs(B, T, H, K, V, dtype, device, *, normalize=False, h0=True, N=None):
    """Leaf inputs (q, k, v, S0, z0); positive q, k with normalize so the denominator is well-conditioned."""
    N = B if N is None else N
    if normalize:
        q = torch.rand(B, T, H, K).add(0.1).to(dtype).to(device).requires_grad_()
        k = torch.rand(B, T, H, K).add(0.1).to(dtype).to(device).requires_grad_()
    else:
        q = randn(B, T, H, K, dtype=dtype, device=device, requires_grad=True)
        k = randn(B, T, H, K, dtype=dtype, device=device, requires_grad=True)
    v = randn(B, T, H, V, dtype=dtype, device=device, requires_grad=True)
    S0 = randn(N, H, K, V, device=device, requires_grad=True) if h0 else None
    z0 = torch.rand(N, H, K, device=device).add(0.5).requires_grad_() if (h0 and normalize) else None
    return q, k, v, S0, z0


def state_of(S0, z0, normalize):
    if S0 is None:
        return None
    return (S0, z0) if normalize else S0


def first(state):
    return state[0] if isinstance(state, tuple) else state


def run(fn, q, k, v, S0, z0, do, dS, *, normalize, **kw):
    """Forward with the final state, backward of <o, do> + <S_T, dS> (+ <z_T, 1>); returns outputs and grads."""
    o, ht = fn(q, k, v, initial_state=state_of(S0, z0, normalize), output_final_state=True,
               normalize=normalize, **kw)
    loss = (o.double() * do).sum() + (first(ht).double() * dS).sum()
    if normalize:
        loss = loss + ht[1].double().sum()
    leaves = [t for t in (q, k, v, S0, z0) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return o, ht, grads


def check_against_reference(q, k, v, S0, z0, device, dtype, *, normalize, causal=True, cu_seqlens=None,
                            oracle=reference.linear_attention, **kw):
    """Run op and float64 oracle (the reference) on the same rounded inputs; compare outputs, states, all grads."""
    leaves = [t for t in (q, k, v, S0, z0) if t is not None]
    refs = [as_ref(t) for t in (q, k, v, S0, z0)]
    o_r, ht_r = oracle(*refs[:3], initial_state=state_of(refs[3], refs[4], normalize),
                                           output_final_state=True, normalize=normalize, causal=causal,
                                           cu_seqlens=cu_seqlens)
    do = torch.randn(o_r.shape, dtype=torch.float64, device=device)
    dS = torch.randn(first(ht_r).shape, dtype=torch.float64, device=device)
    _, _, g_r = run(oracle, *refs, do, dS, normalize=normalize, causal=causal,
                    cu_seqlens=cu_seqlens)
    o, ht, g = run(linear_attention, q, k, v, S0, z0, do, dS, normalize=normalize, causal=causal,
                   cu_seqlens=cu_seqlens, **kw)
    assert o.dtype == dtype and first(ht).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    errs = {"o": assert_close("o", o, o_r, dtype, device),
            "S_T": assert_close("S_T", first(ht), first(ht_r), dtype, device)}
    if normalize:
        errs["z_T"] = assert_close("z_T", ht[1], ht_r[1], dtype, device)
    names = [n for n, t in zip(("dq", "dk", "dv", "dS0", "dz0"), (q, k, v, S0, z0)) if t is not None]
    for name, a, b in zip(names, g, g_r):
        errs[name] = assert_close(name, a, b, dtype, device, grad=True)
    assert len(g) == len(leaves)
    return errs


# --------------------------------------------------------------------------- forward + gradients
# (B, T, H, K, V, dtype, causal, normalize, initial_state); chunk_size 16 so most cases span chunks.
CASES = [
    (2, 37, 2, 48, 40, F32, True, False, True),     # K, V not powers of two, T not a multiple of the chunk
    (1, 1, 1, 16, 16, F32, True, False, False),     # T = 1, H = 1
    (1, 1, 2, 32, 24, BF16, False, True, True),     # T = 1 non-causal, normalized
    (2, 50, 1, 32, 32, F16, True, True, True),
    (1, 40, 3, 48, 40, BF16, True, False, True),
    (2, 33, 2, 32, 16, F32, False, False, True),
    (1, 20, 2, 80, 24, F16, False, False, False),   # K > 64: several K tiles (partial sums)
    (1, 24, 2, 16, 72, BF16, True, True, False),    # V > 64: several V tiles
    (1, 29, 2, 24, 40, F32, False, True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H,K,V,dtype,causal,normalize,h0", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-K{c[3]}V{c[4]}-{str(c[5])[6:]}-{'c' if c[6] else 'nc'}"
                              f"{'-norm' if c[7] else ''}{'-h0' if c[8] else ''}" for c in CASES])
def test_forward_and_grads(backend, B, T, H, K, V, dtype, causal, normalize, h0, device):
    q, k, v, S0, z0 = make_inputs(B, T, H, K, V, dtype, device, normalize=normalize, h0=h0)
    check_against_reference(q, k, v, S0, z0, device, dtype, normalize=normalize, causal=causal,
                            backend=backend, chunk_size=16)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_long_sequence(causal, device):
    """Long T on the torch backend, default chunk size, several chunks plus a ragged tail."""
    q, k, v, S0, z0 = make_inputs(1, 128 + 19, 1, 16, 16, F32, "cpu")
    check_against_reference(q, k, v, S0, z0, "cpu", F32, normalize=False, causal=causal, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_the_result(backend, device):
    """Chunks of 16, 32 and 64 rows give the same outputs, states and gradients (T = 70: ragged tails)."""
    q, k, v, S0, _ = make_inputs(1, 70, 2, 16, 16, F32, device)
    do = torch.randn(1, 70, 2, 16, device=device)
    results = []
    for c in (16, 32, 64):
        o, ht = linear_attention(q, k, v, initial_state=S0, output_final_state=True, chunk_size=c, backend=backend)
        results.append((o, ht, *torch.autograd.grad((o * do).sum() + ht.sum(), (q, k, v, S0))))
    for other in results[1:]:
        for name, a, b in zip(("o", "S_T", "dq", "dk", "dv", "dS0"), other, results[0]):
            assert_close(name, a, b, F32, device, grad=name.startswith("d"))


def test_chunk_size_sets_the_triton_tiles():
    """The Triton launches follow chunk_size (capped at 128 rows and at T rounded up to a power of two)."""
    assert [triton_kernels.launch_plan(1, 1024, 2, 64, 64, c).BT for c in (16, 32, 64, 128, 1 << 20)] == \
        [16, 32, 64, 128, 128]
    assert triton_kernels.launch_plan(1, 20, 2, 64, 64, 1 << 20).BT == 32
    assert triton_kernels.launch_plan(1, 1024, 2, 64, 64, 16).grids["o"] == (128, 1)


def test_torch_chunk_is_capped_at_the_sequence_length(monkeypatch):
    """A huge chunk_size on a short sequence allocates nothing of the chunk's size."""
    q, k, v, S0, _ = make_inputs(1, 32, 2, 16, 16, F32, "cpu")
    seen = []
    pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda x, p, *a, **kw: seen.append(p) or pad(x, p, *a, **kw))
    o, ht = linear_attention(q, k, v, initial_state=S0, output_final_state=True, chunk_size=1 << 20, backend="torch")
    assert not seen, "the torch path padded a 32-token sequence to the chunk size"
    o_ref, ht_ref = reference.linear_attention(*(as_ref(t) for t in (q, k, v)), initial_state=as_ref(S0),
                                               output_final_state=True)
    assert_close("o", o, o_ref, F32, "cpu")
    assert_close("S_T", ht, ht_ref, F32, "cpu")


def test_float64_torch_backend_matches_the_reference():
    """The float64 oracle of the GPU tests: torch backend in float64 vs the token-by-token reference."""
    q, k, v, S0, _ = make_inputs(1, 100, 2, 16, 24, F32, "cpu")
    q, k, v, S0 = (t.detach().double().requires_grad_() for t in (q, k, v, S0))
    errs = check_against_reference(q, k, v, S0, None, "cpu", torch.float64, normalize=False, backend="torch")
    assert max(errs.values()) < 1e-12


def test_float64_gradcheck():
    """float64 inputs run the torch path in float64: exact enough for gradcheck, through both states."""
    q, k, v, S0, z0 = (t.detach().double().requires_grad_() for t in
                       make_inputs(1, 5, 1, 3, 2, F32, "cpu", normalize=True))

    def f(q, k, v, S0, z0):
        o, (S, z) = linear_attention(q, k, v, initial_state=(S0, z0), output_final_state=True, normalize=True,
                                     chunk_size=16)
        return o, S, z
    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0))


# --------------------------------------------------------------------------- states
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize,causal,dtype", [(False, True, F32), (True, True, BF16), (False, True, F16)])
def test_split_and_resume(backend, normalize, causal, dtype, device):
    """x[:, :t] then x[:, t:] resumed from the final state == one call: values and gradients."""
    B, T, H, K, V, t = 2, 45, 2, 32, 24, 20
    q, k, v, S0, z0 = make_inputs(B, T, H, K, V, dtype, device, normalize=normalize)
    do = torch.randn(B, T, H, V, dtype=torch.float64, device=device)
    dS = torch.randn(B, H, K, V, dtype=torch.float64, device=device)
    kw = dict(normalize=normalize, causal=causal, backend=backend, chunk_size=16)
    o, ht, g = run(linear_attention, q, k, v, S0, z0, do, dS, **kw)

    o1, h1 = linear_attention(q[:, :t], k[:, :t], v[:, :t], initial_state=state_of(S0, z0, normalize),
                              output_final_state=True, **kw)
    o2, h2 = linear_attention(q[:, t:], k[:, t:], v[:, t:], initial_state=h1, output_final_state=True, **kw)
    o_split = torch.cat([o1, o2], 1)
    loss = (o_split.double() * do).sum() + (first(h2).double() * dS).sum()
    if normalize:
        loss = loss + h2[1].double().sum()
    g_split = torch.autograd.grad(loss, [x for x in (q, k, v, S0, z0) if x is not None])
    assert_close("o", o_split, o, dtype, device)
    assert_close("S_T", first(h2), first(ht), dtype, device)
    for name, a, b in zip(("dq", "dk", "dv", "dS0", "dz0"), g_split, g):
        assert_close(name, a, b, dtype, device, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype,normalize,causal", [(torch.int32, False, True), (torch.int64, True, False),
                                                          (torch.int32, True, True)])
def test_cu_seqlens_equals_loop_over_sequences(backend, index_dtype, normalize, causal, device):
    """Packed sequences (one of them empty) == one call per sequence, outputs, states and grads."""
    bounds = [0, 7, 7, 30, 45]
    N, T, H, K, V = len(bounds) - 1, bounds[-1], 2, 32, 24
    q, k, v, S0, z0 = make_inputs(1, T, H, K, V, F32, device, normalize=normalize, N=N)
    cu = torch.tensor(bounds, dtype=index_dtype, device=device)
    kw = dict(normalize=normalize, causal=causal, backend=backend, chunk_size=16)
    errs = check_against_reference(q, k, v, S0, z0, device, F32, cu_seqlens=cu, **kw)
    assert all(e < 1e-5 for e in errs.values())

    o, ht = linear_attention(q, k, v, initial_state=state_of(S0, z0, normalize), output_final_state=True,
                             cu_seqlens=cu, **kw)
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = state_of(S0[n:n + 1], None if z0 is None else z0[n:n + 1], normalize)
        o_n, ht_n = linear_attention(q[:, s:e], k[:, s:e], v[:, s:e], initial_state=init,
                                     output_final_state=True, **kw)
        assert o_n.shape == (1, e - s, H, V)
        if e > s:
            assert_close(f"o[{n}]", o[:, s:e], o_n, F32, device)
        assert_close(f"S_T[{n}]", first(ht)[n:n + 1], first(ht_n), F32, device)
    # an empty sequence passes its initial state through unchanged
    assert torch.equal(first(ht)[1], S0[1].detach())


# --------------------------------------------------------------------------- generation step
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize,dtype", [(False, F32), (True, F32), (False, BF16), (True, F16)])
def test_step_loop_equals_scan(backend, normalize, dtype, device):
    B, T, H, K, V = 2, 9, 2, 48, 40
    q, k, v, S0, z0 = (None if t is None else t.detach()
                       for t in make_inputs(B, T, H, K, V, dtype, device, normalize=normalize))
    init = state_of(S0, z0, normalize)
    o_scan, h_scan = linear_attention(q, k, v, initial_state=init, output_final_state=True, normalize=normalize,
                                      backend=backend, chunk_size=16)
    state = (S0.clone(), z0.clone()) if normalize else S0.clone()
    S_id = first(state).data_ptr()
    outs = []
    for t in range(T):
        o_t, ret = linear_attention_step(q[:, t], k[:, t], v[:, t], state, normalize=normalize, backend=backend)
        assert ret is state and first(state).data_ptr() == S_id, "the state must be updated in place"
        assert o_t.dtype == dtype and o_t.shape == (B, H, V)
        outs.append(o_t)
    assert_close("o", torch.stack(outs, 1), o_scan, dtype, device)
    assert_close("S", first(state), first(h_scan), dtype, device)
    if normalize:
        assert_close("z", state[1], h_scan[1], dtype, device)
    # and against the reference step, from a fresh random state
    S = torch.randn(B, H, K, V, device=device)
    st = (S, torch.rand(B, H, K, device=device) + 0.5) if normalize else S
    st_ref = tuple(x.double() for x in st) if normalize else S.double()
    o_ref, _ = reference.linear_attention_step(*(as_ref(x) for x in (q[:, 0], k[:, 0], v[:, 0])), st_ref,
                                               normalize=normalize)
    o1, _ = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], st, normalize=normalize, backend=backend)
    assert_close("o_step", o1, o_ref, dtype, device)
    assert_close("S_step", first(st), first(st_ref), dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_non_contiguous_state_is_updated_in_place(backend, device):
    B, H, K, V = 2, 3, 16, 24
    big = torch.randn(B, H, V, K, device=device)
    S = big.transpose(-1, -2)                      # [B, H, K, V], not contiguous
    S_ref = S.double().clone()
    q, k, v = (randn(B, H, d, device=device) for d in (K, K, V))
    o, ret = linear_attention_step(q, k, v, S, backend=backend)
    o_ref, _ = reference.linear_attention_step(q.double(), k.double(), v.double(), S_ref)
    assert ret is S
    assert_close("o", o, o_ref, F32, device)
    assert_close("S", S, S_ref, F32, device)


# --------------------------------------------------------------------------- layout, dtypes, autocast
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    B, T, H, K, V = 1, 21, 2, 16, 16
    q = randn(B, H, T, K, device=device).transpose(1, 2)
    k = randn(B, T, H, 2 * K, device=device)[..., ::2]
    v = randn(B, T, H, V, device=device)
    o, _ = linear_attention(q, k, v, backend=backend, chunk_size=16)
    o_ref, _ = reference.linear_attention(q.double(), k.double(), v.double())
    assert_close("o", o, o_ref, F32, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gives_low_precision_outputs_and_float32_states(backend, device):
    q, k, v, S0, _ = make_inputs(1, 17, 2, 16, 16, F32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        o, ht = linear_attention(q, k, v, initial_state=S0, output_final_state=True, backend=backend, chunk_size=16)
        state = S0.detach().clone()
        o_step, _ = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, backend=backend)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert o_step.dtype == torch.bfloat16 and state.dtype == torch.float32
    o.float().sum().backward()
    assert q.grad.dtype == F32 and S0.grad.dtype == F32
    refs = [as_ref(t.to(torch.bfloat16)) for t in (q, k, v)]
    o_ref, _ = reference.linear_attention(*refs, initial_state=S0.detach().double())
    assert_close("o", o, o_ref, BF16, device)


def test_default_backend_follows_the_environment(monkeypatch, device):
    q, k, v, _, _ = make_inputs(1, 5, 1, 16, 16, F32, device, h0=False)
    monkeypatch.setenv("HOPE_KERNELS_BACKEND", "torch")
    o_torch, _ = linear_attention(q, k, v)
    monkeypatch.delenv("HOPE_KERNELS_BACKEND")
    o_default, _ = linear_attention(q, k, v)
    assert_close("o", o_default, o_torch, F32, device)


def test_final_state_is_none_unless_asked(device):
    q, k, v, _, _ = make_inputs(1, 5, 1, 16, 16, F32, device, h0=False)
    for backend in BACKENDS:
        assert linear_attention(q, k, v, backend=backend)[1] is None


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_buffers_are_nan_poisoned_in_the_interpreter(causal, device):
    """Every test above then fails on any element a kernel forgets to write."""
    if device.type != "cpu":
        pytest.skip("poisoning is automatic only in the interpreter")
    buf = triton_utils.empty(4, 3, dtype=torch.bfloat16, device=device)
    assert torch.isnan(buf).all()
    # and a direct launch over the poisoned buffers writes every output element
    q, k, v, S0, _ = (None if t is None else t.detach() for t in make_inputs(1, 23, 1, 48, 40, F16, device))
    cu = torch.tensor([0, 0, 5, 23], device=device)
    h0 = S0[:1].expand(3, -1, -1, -1).contiguous()
    o, ht = triton_kernels.linear_attention_fwd(q, k, v, 0.5, causal, h0, True, cu, 16)
    do = torch.randn_like(o)
    grads = triton_kernels.linear_attention_bwd(q, k, v, do, 0.5, causal, h0, torch.randn_like(ht), cu, 16, True)
    for t in (o, ht, *grads):
        assert not torch.isnan(t).any()


# --------------------------------------------------------------------------- launch arithmetic and memory
def _programs(grid):
    return math.prod(grid)


@pytest.mark.parametrize("causal", [True, False])
def test_every_launch_has_a_program_per_chunk_and_head(causal):
    """B = 1, H = 2, T = 1024, K = V = 64: the largest forward and backward launches have >= T/64 * B * H
    programs (chunk-parallel), whatever the batch is."""
    B, T, H = 1, 1024, 2
    g = triton_kernels.launch_plan(B, T, H, 64, 64, 64, causal=causal).grids
    fwd = ["states", "o"] if causal else ["partials", "reduce", "o"]
    bwd = ["states", "dqk", "dv"] if causal else ["partials", "reduce", "dqk", "dv"]
    assert max(_programs(g[n]) for n in fwd) >= T // 64 * B * H
    assert max(_programs(g[n]) for n in bwd) >= T // 64 * B * H


@pytest.mark.parametrize("causal", [True, False])
def test_launchers_use_the_plan_grids(causal, monkeypatch, device):
    """What the tests of launch_plan check is what the launchers launch, in this order."""
    launched = []
    launch = triton_kernels._launch
    monkeypatch.setattr(triton_kernels, "_launch", lambda kernel, plan, name, *a, **kw: launched.append(
        (name, plan.grids)) or launch(kernel, plan, name, *a, **kw))
    cu = torch.tensor([0, 5, 40], device=device)
    q, k, v, S0, _ = make_inputs(1, 40, 2, 16, 80, F16, device, N=2)
    o, ht = linear_attention(q, k, v, initial_state=S0, output_final_state=True, causal=causal, cu_seqlens=cu,
                             chunk_size=16, backend="triton")
    (o.float().sum() + ht.sum()).backward()
    plan = triton_kernels.launch_plan(1, 40, 2, 16, 80, 16, cu, causal=causal)
    fwd = ["states", "o"] if causal else ["partials", "reduce", "o"]
    bwd = ["states", "states", "dqk", "dv"] if causal else ["partials", "reduce", "partials", "reduce", "dqk", "dv"]
    assert [n for n, _ in launched] == fwd + bwd and all(g == plan.grids for _, g in launched)
    assert plan.NT == 4 and plan.grids["o"] == (8, 2)


def test_autotuned_tiles_only_narrow_the_grid():
    """o, dqk and dv tune the tile of grid axis 1: the default config gives plan.grids, wider tiles fewer columns."""
    plan = triton_kernels.launch_plan(2, 1000, 3, 256, 128, 64)
    assert plan.grids["o"] == (2 * 16 * 3, 2) and plan.tuned["o"]({"BV": 128}) == (96, 1)
    assert plan.grids["dqk"] == (96, 4) and plan.tuned["dqk"]({"BK": 128, "BV": 32}) == (96, 2)
    for name, (tile, _, configs) in triton_kernels._GRID_TILES.items():
        assert plan.tuned[name](triton_utils.default_config(configs).meta) == plan.grids[name]


def test_packed_sequences_launch_real_chunks_within_the_grid_limits():
    """70 000 packed sequences x 2 heads: more than 65535 (sequence, head) pairs and chunks; every grid axis
    stays within its CUDA limit and the chunk-parallel launches cover exactly the real chunks."""
    lens = torch.tensor([1, 100, 0] * 23334)[:70000]
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    H, T = 2, int(cu[-1])
    for causal in (True, False):
        plan = triton_kernels.launch_plan(1, T, H, 64, 256, 64, cu, causal=causal)
        n_chunks = int(((lens + 63) // 64).sum())
        assert plan.N * H > triton_utils.GRID_YZ_LIMIT and plan.NT * H > triton_utils.GRID_YZ_LIMIT
        assert plan.NT == n_chunks and plan.indices.shape == (n_chunks, 2)
        assert plan.grids["o"] == (n_chunks * H, 4) and plan.grids["dqk"] == (n_chunks * H, 1)
        for grid in plan.grids.values():
            assert triton_utils.check_grid(grid) == grid
    # the check itself rejects what the old layout would launch: N * H on a limited axis
    with pytest.raises(ValueError, match="grid"):
        triton_utils.check_grid((1, 70000 * H, 1))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_memory_saved_for_backward(dtype, device):
    """The forward saves q, k, v and S_0 (chunk states are recomputed): <= 1.5x the inputs + 2 states."""
    B, T, H, K, V = 1, 256, 2, 64, 64
    q, k, v, S0, _ = make_inputs(B, T, H, K, V, dtype, device)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_attention(q, k, v, initial_state=S0, output_final_state=True, backend="triton")
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    state = S0.numel() * S0.element_size()
    assert sum(saved.values()) <= 1.5 * inputs + 2 * state, (sum(saved.values()), inputs, state)


# --------------------------------------------------------------------------- bad input
def _good(device="cpu"):
    B, T, H, K, V = 1, 8, 2, 16, 8
    return dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V))


BAD_INPUTS = [
    ("q rank", lambda d: {**d, "q": d["q"][0]}, ValueError, "q"),
    ("k shape", lambda d: {**d, "k": d["k"][..., :8]}, ValueError, "k"),
    ("v length", lambda d: {**d, "v": d["v"][:, :4]}, ValueError, "v"),
    ("int dtype", lambda d: {**d, "v": d["v"].long()}, TypeError, "v"),
    ("not a tensor", lambda d: {**d, "q": d["q"].tolist()}, TypeError, "q"),
    ("mixed dtypes", lambda d: {**d, "k": d["k"].half()}, TypeError, "share one dtype"),
    ("device", lambda d: {**d, "k": d["k"].to("meta")}, ValueError, "device"),
    ("state shape", lambda d: {**d, "initial_state": torch.randn(1, 2, 16, 9)}, ValueError, "initial_state"),
    ("state device", lambda d: {**d, "initial_state": torch.randn(1, 2, 16, 8, device="meta")}, ValueError,
     "initial_state"),
    ("state pair without normalize", lambda d: {**d, "initial_state": (torch.randn(1, 2, 16, 8),
                                                                         torch.randn(1, 2, 16))}, TypeError,
     "initial_state"),
    ("normalize without z", lambda d: {**d, "normalize": True, "initial_state": torch.randn(1, 2, 16, 8)},
     TypeError, "initial_state"),
    ("z shape", lambda d: {**d, "normalize": True, "initial_state": (torch.randn(1, 2, 16, 8), torch.randn(1, 2, 8))},
     ValueError, "initial_state"),
    ("cu_seqlens unsorted", lambda d: {**d, "cu_seqlens": torch.tensor([0, 5, 3, 8])}, ValueError, "non-decreasing"),
    ("cu_seqlens end", lambda d: {**d, "cu_seqlens": torch.tensor([0, 5, 7])}, ValueError, "end at T"),
    ("cu_seqlens start", lambda d: {**d, "cu_seqlens": torch.tensor([1, 5, 8])}, ValueError, "start at 0"),
    ("cu_seqlens float", lambda d: {**d, "cu_seqlens": torch.tensor([0., 8.])}, TypeError, "cu_seqlens"),
    ("cu_seqlens with B > 1", lambda d: {"q": d["q"].expand(2, -1, -1, -1), "k": d["k"].expand(2, -1, -1, -1),
                                         "v": d["v"].expand(2, -1, -1, -1), "cu_seqlens": torch.tensor([0, 8])},
     ValueError, "B == 1"),
    ("state N with cu_seqlens", lambda d: {**d, "cu_seqlens": torch.tensor([0, 3, 8]),
                                           "initial_state": torch.randn(1, 2, 16, 8)}, ValueError, "initial_state"),
    ("chunk_size", lambda d: {**d, "chunk_size": 24}, ValueError, "chunk_size"),
    ("chunk_size small", lambda d: {**d, "chunk_size": 8}, ValueError, "chunk_size"),
    ("backend name", lambda d: {**d, "backend": "cuda"}, ValueError, "backend"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(backend, name, mutate, exc, match):
    kwargs = mutate(_good())
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=match):
        linear_attention(**kwargs)


BAD_STEPS = [
    ("q rank", lambda d: {**d, "q": d["q"][None]}, ValueError, "q"),
    ("v batch", lambda d: {**d, "v": d["v"][:1]}, ValueError, "v"),
    ("int k", lambda d: {**d, "k": d["k"].int()}, TypeError, "k"),
    ("mixed dtypes", lambda d: {**d, "v": d["v"].half()}, TypeError, "share one dtype"),
    ("state shape", lambda d: {**d, "state": torch.randn(2, 2, 16, 9)}, ValueError, "state"),
    ("state missing", lambda d: {**d, "state": None}, ValueError, "state"),
    ("normalize without z", lambda d: {**d, "normalize": True}, TypeError, "state"),
    ("device", lambda d: {**d, "v": d["v"].to("meta")}, ValueError, "device"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mutate,exc,match", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_bad_step_input_raises(backend, name, mutate, exc, match):
    good = dict(q=torch.randn(2, 2, 16), k=torch.randn(2, 2, 16), v=torch.randn(2, 2, 8),
                state=torch.randn(2, 2, 16, 8))
    kwargs = mutate(good)
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=match):
        linear_attention_step(**kwargs)


def test_float64_with_triton_raises_and_routes_to_torch_by_default(device):
    q, k, v, S0 = (t.detach().double() for t in make_inputs(1, 8, 2, 16, 16, F32, device)[:4])
    with pytest.raises(TypeError, match="float64"):
        linear_attention(q, k, v, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], S0.clone(), backend="triton")
    o, _ = linear_attention(q, k, v)
    assert o.dtype == torch.float64
    assert_close("o", o, reference.linear_attention(q, k, v)[0], torch.float64, device)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d = _good()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_attention(**d, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_attention_step(d["q"][:, 0], d["k"][:, 0], d["v"][:, 0], torch.zeros(1, 2, 16, 8), backend="triton")
    # the default backend falls back to torch there
    o, _ = linear_attention(**d)
    assert torch.isfinite(o).all()


def test_nan_in_inputs_propagates(device):
    for backend in BACKENDS:
        q, k, v, _, _ = (None if t is None else t.detach() for t in make_inputs(1, 20, 1, 16, 16, F32, device))
        k[0, 3, 0, 0] = float("nan")
        o, _ = linear_attention(q, k, v, backend=backend, chunk_size=16)
        assert torch.isnan(o[0, 3:]).all() and not torch.isnan(o[0, :3]).any()


# --------------------------------------------------------------------------- GPU
def torch_float64(*args, **kw):
    """The torch backend on float64 inputs computes in float64: the oracle for long GPU sequences
    (it matches the token-by-token reference to ~1e-12, checked above; the reference is too slow at T = 1024)."""
    return linear_attention(*args, backend="torch", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal,normalize", [(True, False), (False, False), (True, True)])
def test_gpu_large(D, causal, normalize, device):
    q, k, v, S0, z0 = make_inputs(2, 1024, 4, D, D, BF16, device, normalize=normalize)
    check_against_reference(q, k, v, S0, z0, device, BF16, normalize=normalize, causal=causal, backend="triton",
                            oracle=torch_float64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16])
def test_gpu_varlen_and_step(dtype, device):
    bounds = [0, 100, 100, 611, 1024]
    q, k, v, S0, z0 = make_inputs(1, 1024, 4, 64, 64, dtype, device, N=len(bounds) - 1)
    cu = torch.tensor(bounds, device=device, dtype=torch.int32)
    check_against_reference(q, k, v, S0, z0, device, dtype, normalize=False, cu_seqlens=cu, backend="triton",
                            oracle=torch_float64)
    test_step_loop_equals_scan("triton", False, dtype, device)
