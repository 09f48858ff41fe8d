"""ema_update_: both backends against the float64 reference, every input form, and bad inputs."""
import pytest
import torch

from hope_kernels import ema_update_, reference
from helpers import assert_close, randn

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = (3, 37, 5)          # 555 elements: not a multiple of any BLOCK


def _decay(M, device):
    # Spread over slow and fast timescales, one exact endpoint each side of the range.
    tau = torch.tensor([0.0, 1e-3, 0.5, 0.99, 0.9999, 1.0][:M], dtype=torch.float32)
    return torch.cat([tau, torch.rand(max(0, M - tau.numel()))]).to(device)


def _expected(states, update, decay):
    """float64 reference from the same rounded inputs."""
    s = [t.detach().double().cpu().clone() for t in states]
    u = update if isinstance(update, (list, tuple)) else [update] if update.dim() == s[0].dim() else list(update)
    u = [t.double().cpu() for t in u]
    u = u * len(s) if len(u) == 1 else u
    return torch.stack(reference.ema_update_(s, u, decay.double().cpu()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["stacked", "list", "list-of-views"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-module"])
def test_matches_reference(backend, dtype, form, shared, device):
    M = 5
    stack = randn(M, *SHAPE, dtype=dtype, device=device)
    update = randn(*SHAPE, device=device) if shared else randn(M, *SHAPE, dtype=dtype, device=device)
    decay = _decay(M, device)
    expected = _expected(list(stack), update, decay)
    if form == "stacked":
        states = stack
    elif form == "list":        # separate allocations: the pointer-table path
        states = [t.clone() for t in stack]
    else:                       # views of one buffer: run as that buffer
        states = list(stack.unbind(0))
    out = ema_update_(states, update, decay, backend=backend)
    assert out is states
    got = out if form == "stacked" else torch.stack(out)
    assert_close(f"ema[{form}]", got, expected, dtype, device)
    if form == "list-of-views":
        assert_close("ema[underlying buffer]", stack, expected, dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_list_and_mixed_dtypes(backend, device):
    """fp16 update into fp32 states, update given as a list, states as a list of odd shapes."""
    M, shape = 3, (7, 3)
    states = [randn(*shape, device=device) for _ in range(M)]
    update = [randn(*shape, dtype=torch.float16, device=device) for _ in range(M)]
    decay = torch.rand(M, dtype=torch.float64, device=device)
    expected = _expected(states, update, decay)
    ema_update_(states, update, decay, backend=backend)
    assert_close("ema[list update]", torch.stack(states), expected, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided-modules", "list-of-slices"])
def test_non_contiguous_states_updated_in_place(backend, layout, device):
    M = 4
    base = randn(M, 6, 9, device=device)
    if layout == "transposed":              # slices not contiguous: copy, update, write back
        states = base.transpose(1, 2)
    elif layout == "strided-modules":       # every other module of a bigger stack
        big = randn(2 * M, 6, 9, device=device)
        neighbours = big[1::2].clone()
        states = big[::2]
    else:                                   # list members that are column slices
        states = [t[:, 1:] for t in base]
    update = randn(*(states[0].shape), device=device)
    decay = torch.rand(M, device=device)
    snapshot = [t.clone() for t in states]
    expected = _expected(snapshot, update, decay)
    ptrs = [t.data_ptr() for t in states]
    out = ema_update_(states, update, decay, backend=backend)
    assert out is states and [t.data_ptr() for t in states] == ptrs
    assert_close(f"ema[{layout}]", torch.stack(list(states)), expected, torch.float32, device)
    if layout == "strided-modules":
        assert torch.equal(big[1::2], neighbours)  # the modules in between are not touched
        assert_close("ema[strided base]", big[::2], expected, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_flat_and_scalar_modules(backend, device):
    """N spanning several blocks (with a ragged tail), and states [M] of scalars."""
    for shape in [(3 * 2048 + 17,), ()]:
        M = 2
        states = randn(M, *shape, device=device)
        update = randn(M, *shape, device=device)
        decay = torch.rand(M, device=device)
        expected = _expected(list(states), update, decay)
        ema_update_(states, update, decay, backend=backend)
        assert_close(f"ema[{shape}]", states, expected, torch.float32, device)
        # the same through the pointer tables (separate allocations for states and updates)
        states_list = [t.clone() for t in states]
        expected = _expected(states_list, update, decay)
        ema_update_(states_list, [t.clone() for t in update], decay, backend=backend)
        assert_close(f"ema[list, {shape}]", torch.stack(states_list), expected, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_endpoints_and_float_list(backend, device):
    """tau = 1 keeps a module bit for bit, tau = 0 copies the update; decay may be a list of floats."""
    states = randn(2, 33, device=device)
    before = states.clone()
    update = randn(33, device=device)
    ema_update_(states, update, [1.0, 0.0], backend=backend)
    assert torch.equal(states[0], before[0])
    assert torch.equal(states[1], update)


def test_backends_agree_and_bump_version(device):
    a = randn(4, 10, 3, dtype=torch.bfloat16, device=device)
    b = a.clone()
    u, d = randn(10, 3, device=device), torch.rand(4, device=device)
    v0 = a._version
    ema_update_(a, u, d, backend="triton")
    ema_update_(b, u, d, backend="torch")
    assert a._version > v0
    assert_close("triton vs torch", a, b.float(), torch.bfloat16, device)


def test_nan_propagates(device):
    states = randn(2, 8, device=device)
    update = randn(8, device=device)
    update[3] = float("nan")
    ema_update_(states, update, torch.tensor([0.5, 0.9], device=device), backend="triton")
    assert torch.isnan(states[:, 3]).all() and torch.isfinite(states[:, :3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend, device):
    states = torch.empty(0, 4, device=device)
    assert ema_update_(states, torch.empty(4, device=device), torch.empty(0, device=device),
                       backend=backend) is states


BAD = {
    "decay-shape": (lambda d: (randn(3, 4, device=d), randn(4, device=d), torch.rand(2, device=d)),
                    ValueError, "decay"),
    "decay-2d": (lambda d: (randn(3, 4, device=d), randn(4, device=d), torch.rand(3, 1, device=d)),
                 ValueError, "decay"),
    "decay-range": (lambda d: (randn(3, 4, device=d), randn(4, device=d), torch.tensor([0.5, 1.5, 0.2], device=d)),
                    ValueError, r"\[0, 1\]"),
    "decay-negative-list": (lambda d: (randn(2, 4, device=d), randn(4, device=d), [0.5, -0.1]),
                            ValueError, r"\[0, 1\]"),
    "decay-nan": (lambda d: (randn(2, 4, device=d), randn(4, device=d), torch.tensor([0.5, float("nan")], device=d)),
                  ValueError, "decay"),
    "decay-int": (lambda d: (randn(2, 4, device=d), randn(4, device=d), torch.ones(2, dtype=torch.int64, device=d)),
                  TypeError, "decay"),
    "decay-scalar": (lambda d: (randn(2, 4, device=d), randn(4, device=d), 0.5), TypeError, "decay"),
    "update-shape": (lambda d: (randn(3, 4, device=d), randn(5, device=d), torch.rand(3, device=d)),
                     ValueError, "update"),
    "update-modules": (lambda d: (randn(3, 4, device=d), randn(2, 4, device=d), torch.rand(3, device=d)),
                       ValueError, "update"),
    "update-list-len": (lambda d: (randn(3, 4, device=d), [randn(4, device=d)] * 2, torch.rand(3, device=d)),
                        ValueError, "update"),
    "update-int": (lambda d: (randn(3, 4, device=d), torch.ones(4, dtype=torch.int32, device=d), torch.rand(3, device=d)),
                   TypeError, "update"),
    "states-int": (lambda d: (torch.ones(3, 4, dtype=torch.int32, device=d), randn(4, device=d), torch.rand(3, device=d)),
                   TypeError, "states"),
    "states-list-shapes": (lambda d: ([randn(4, device=d), randn(5, device=d)], randn(4, device=d), torch.rand(2, device=d)),
                           ValueError, r"states\[1\]"),
    "states-list-dtypes": (lambda d: ([randn(4, device=d), randn(4, dtype=torch.float16, device=d)], randn(4, device=d),
                                      torch.rand(2, device=d)), TypeError, r"states\[1\]"),
    "states-not-tensor": (lambda d: ("abc", randn(4, device=d), torch.rand(3, device=d)), TypeError, "states"),
    "states-expanded": (lambda d: (randn(1, 4, device=d).expand(3, 4), randn(4, device=d), torch.rand(3, device=d)),
                        ValueError, "overlapping"),
    "states-aliased-list": (lambda d: ([randn(4, device=d)] * 2, randn(4, device=d), torch.rand(2, device=d)),
                            ValueError, "more than once"),
    "device": (lambda d: (randn(2, 4, device=d), randn(4, device="meta"), torch.rand(2, device=d)),
               ValueError, "device"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(case, device):
    make, exc, match = BAD[case]
    states, update, decay = make(device)
    with pytest.raises(exc, match=match):
        ema_update_(states, update, decay, backend="triton")


def test_bad_backend(device):
    with pytest.raises(ValueError, match="backend"):
        ema_update_(randn(2, 4, device=device), randn(4, device=device), torch.rand(2, device=device), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_update_and_float64(backend, device):
    """A per-module update that is an expanded view (module stride 0), and float64 states (float64 math)."""
    M, shape = 3, (5, 11)
    states = randn(M, *shape, dtype=torch.float64, device=device)
    update = randn(1, *shape, device=device).expand(M, *shape)
    decay = torch.rand(M, device=device)
    expected = _expected(list(states), update, decay)
    ema_update_(states, update, decay, backend=backend)
    assert_close("ema[float64, expanded update]", states, expected, torch.float64, device)


def test_decay_checked_again_after_in_place_change(device):
    """The range check is cached per decay tensor, but an in-place change invalidates it."""
    states, update = randn(2, 6, device=device), randn(6, device=device)
    decay = torch.tensor([0.5, 0.9], device=device)
    ema_update_(states, update, decay)
    decay[1] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_(states, update, decay)


@pytest.mark.parametrize("form", ["stacked", "list"])
def test_shared_update_read_once_path(form, device, monkeypatch):
    """Large shared updates run one program per block looping over the M modules: force that path."""
    from hope_kernels.ema import triton_kernels

    monkeypatch.setattr(triton_kernels, "SHARED_LOOP_MIN_N", 0)
    M, N = 3, 2 * 2048 + 5
    stack = randn(M, N, dtype=torch.bfloat16, device=device)
    states = stack if form == "stacked" else [t.clone() for t in stack]
    update = randn(N, device=device)
    decay = torch.rand(M, device=device)
    expected = _expected(list(stack), update, decay)
    ema_update_(states, update, decay, backend="triton")
    got = states if form == "stacked" else torch.stack(states)
    assert_close(f"ema[{form}, update read once]", got, expected, torch.bfloat16, device)
