"""titans_selfmod_scan on its Triton kernels (the interpreter on the CPU): outputs and every gradient against
the float64 per-block reference, chained calls, the layer's cache, and kernel launches that do not grow with T."""
import contextlib

import pytest
import torch

from hope import HOPE
from hope_kernels import reference, titans_selfmod_scan
from hope_kernels.titans import triton_selfmod
from hope_kernels.utils import interpreter_enabled
from tests.helpers import as_ref, assert_close, randn, rel_err, tolerance

LEAVES = ["q", "u", "lr_bias", "decay_bias", "M0"]


def _inputs(B, T, H, D, dtype, device, seed=0):
    torch.manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1).to(dtype).to(device).requires_grad_(True)
    u = randn(B, T, H, D, dtype=dtype, device=device, requires_grad=True)
    lr_b = randn(H, device=device, requires_grad=True)
    d_b = (randn(H, device=device) + 2).requires_grad_(True)
    eye = torch.eye(D).expand(B, H, D, D)
    M0 = torch.cat([eye, eye, torch.zeros(B, H, D, 2), eye], -1) + 0.3 * torch.randn(B, H, D, 3 * D + 2)
    return [q, u, lr_b, d_b, M0.to(device).requires_grad_(True)]


def _run(fn, xs, period, scale=0.7, **kw):
    q, u, lr_b, d_b, M0 = xs
    return fn(q, u, lr_b, d_b, None, scale, lr_max=1.0, period=period, initial_state=M0, output_final_state=True,
              **kw)


def _loss(outs, seed=7):
    """A fixed random linear function of every output (so every gradient path is used)."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g).to(o.device, o.dtype)).sum() for o in outs)


def _grads(outs, leaves):
    return torch.autograd.grad(_loss(outs), leaves)


CASES = [  # (dtype, D, T, period, mem_period): T not a multiple of the period, period >= T, many blocks (segments)
    (torch.float32, 16, 21, 4, None), (torch.float32, 16, 37, 8, None), (torch.float32, 32, 11, 16, None),
    (torch.float32, 16, 50, 3, None), (torch.float32, 32, 19, 1, None), (torch.float16, 16, 21, 8, None),
    (torch.bfloat16, 16, 13, 4, None),
    # M_mem online inside each block
    (torch.float32, 16, 37, 8, 1), (torch.float32, 32, 11, 16, 1), (torch.float32, 16, 50, 3, 1),
    (torch.float16, 16, 21, 8, 1), (torch.bfloat16, 16, 13, 4, 1)]


@pytest.mark.parametrize("dtype,D,T,period,mem_period", CASES,
                         ids=[f"{str(c[0])[6:]}-D{c[1]}-T{c[2]}-p{c[3]}" + ("-online" if c[4] else "") for c in CASES])
def test_triton_matches_float64_reference(device, dtype, D, T, period, mem_period):
    """Output, final memory and the gradients of q, u, lr_bias, decay_bias and M0 (the kernels' outputs are
    NaN-poisoned before launch under the interpreter, so an unwritten element fails)."""
    assert triton_selfmod.supported(D, T, period)
    xs = _inputs(2, T, 2, D, dtype, device)
    o, M = _run(titans_selfmod_scan, xs, period, backend="triton", mem_period=mem_period)
    refs_in = [as_ref(x).cpu() for x in xs]
    ro, rM = _run(reference.titans_selfmod_scan, refs_in, period, mem_period=mem_period)
    assert o.dtype == dtype and M.dtype == torch.float32
    assert_close("o", o, ro, dtype, device)
    assert_close("M", M, rM, dtype, device)
    for name, g, r in zip(LEAVES, _grads([o, M], xs), _grads([ro, rM], refs_in)):
        assert_close("d" + name, g, r, dtype, device, grad=True)


def test_triton_matches_torch_path_with_output_gradient_only(device):
    """Without a final-state gradient (the layer's usual case) the backward matches the torch path's."""
    xs = _inputs(1, 26, 2, 16, torch.float32, device, seed=3)
    got = _grads([_run(titans_selfmod_scan, xs, 8, backend="triton")[0]], xs)
    want = _grads([_run(titans_selfmod_scan, xs, 8, backend="torch")[0]], xs)
    for name, g, w in zip(LEAVES, got, want):
        assert_close("d" + name, g, w.double(), torch.float32, device, grad=True)


@pytest.mark.parametrize("mem_period", [None, 1], ids=["block", "online"])
def test_chained_calls_from_a_state_left_mid_block(device, mem_period):
    """A second call starts from the final memory of a first call that ended inside a block; outputs and
    gradients of both calls' leaves (the first call's backward takes the second's gradient of its state)."""
    period, T1, T2 = 4, 10, 13

    def chain(fn, xs, **kw):
        q, u, lr_b, d_b, M0 = xs
        o1, M1 = _run(fn, [q[:, :T1], u[:, :T1], lr_b, d_b, M0], period, **kw)
        o2, M2 = _run(fn, [q[:, T1:], u[:, T1:], lr_b, d_b, M1], period, **kw)
        return [o1, o2, M2]

    xs = _inputs(2, T1 + T2, 2, 16, torch.float32, device, seed=1)
    outs = chain(titans_selfmod_scan, xs, backend="triton", mem_period=mem_period)
    refs_in = [as_ref(x).cpu() for x in xs]
    refs = chain(reference.titans_selfmod_scan, refs_in, mem_period=mem_period)
    for name, a, b in zip(["o1", "o2", "M"], outs, refs):
        assert_close(name, a, b, torch.float32, device)
    for name, g, r in zip(LEAVES, _grads(outs, xs), _grads(refs, refs_in)):
        assert_close("d" + name, g, r, torch.float32, device, grad=True)


@pytest.mark.parametrize("mem_period", [None, 1], ids=["block", "online"])
def test_layer_cache_continues_mid_block_on_triton(device, mem_period):
    """The self-modifying layer on the Triton kernels: a prefill ending mid-block, a step, then a chunk equal
    the uncached forward."""
    from hope.selfmod import SelfModifyingTitans
    torch.manual_seed(4)
    layer = SelfModifyingTitans(32, 2, period=4, mem_period=mem_period, selfmod_init="orthogonal",
                                backend="triton").to(device)
    x = torch.randn(1, 15, 32, device=device)
    with torch.no_grad():
        want = layer(x)
        cache = {}
        parts = [layer(x[:, :6], cache), layer(x[:, 6:7], cache), layer(x[:, 7:], cache)]
    assert rel_err(torch.cat(parts, 1), want) < tolerance(torch.float32, device)


def test_unsupported_cases_run_the_torch_path(device):
    """Momentum and blocks longer than the kernels take stay on the torch path, with the same results."""
    assert not triton_selfmod.supported(16, 100, 100) and triton_selfmod.supported(16, 100, 64)
    xs = _inputs(1, 70, 1, 16, torch.float32, device, seed=2)
    a = _run(titans_selfmod_scan, xs, 80, backend="triton")
    b = _run(titans_selfmod_scan, xs, 80, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_checkpoint_layout():
    """S ~ sqrt(#blocks) blocks per segment and enough checkpoints to cover every block."""
    for NB in range(1, 300):
        S, NCK = triton_selfmod.checkpoints(NB)
        assert (S - 1) ** 2 < NB <= S * S and (NCK - 1) * S < NB <= NCK * S


# ----------------------------------------------------------------------------- kernel launches
@contextlib.contextmanager
def counted_launches():
    """Every Triton kernel launch (by kernel name) while the context is open."""
    if interpreter_enabled():
        from triton.runtime.interpreter import InterpretedFunction as Launched
    else:
        from triton.runtime.jit import JITFunction as Launched
    counts, real = {}, Launched.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            counts[self.__name__] = counts.get(self.__name__, 0) + 1
        return real(self, *args, **kwargs)

    Launched.run = run
    try:
        yield counts
    finally:
        Launched.run = real


PAPER = dict(attention="titans", self_modifying=True, titans_period=8, cms="levels", cms_periods=[8, 16])
PAPER_ONLINE = dict(PAPER, titans_selfmod_init="orthogonal", titans_mem_period=1)
HOPE_ATTENTION = dict(attention="softmax", cms="levels", cms_periods=[8, 16])


@pytest.mark.slow
@pytest.mark.parametrize("variant", [PAPER, PAPER_ONLINE, HOPE_ATTENTION], ids=["paper", "paper-online-mem", "hope-attention"])
def test_launches_per_training_step_do_not_grow_with_t(device, variant):
    """One forward + backward of a block of the paper's HOPE (self-modifying Titans -> levels) and of
    Hope-attention on backend="triton": the same Triton launches at T = 64 and T = 256."""
    torch.manual_seed(0)
    model = HOPE(vocab_size=64, dim=32, num_layers=1, num_heads=2, max_seq_len=256, backend="triton",
                 **variant).to(device)
    counts = []
    for T in (64, 256):
        tokens = torch.randint(0, 64, (1, T), device=device)
        with counted_launches() as c:
            model(tokens, tokens)[1].backward()
        counts.append(dict(c))
    print(counts)
    assert counts[0] == counts[1] and counts[0]
    if variant is not HOPE_ATTENTION:
        assert counts[0]["selfmod_fwd_kernel"] == counts[0]["selfmod_bwd_kernel"] == 1
