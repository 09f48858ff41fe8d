"""The Triton Titans kernels on their own: both reads (`read="current" | "block_start"`) of the chunk pipeline
(no momentum, every period: blocks inside a chunk, a block per chunk, blocks over several chunks) and of the
token recurrence (momentum) against a float64 token loop, packed sequences, and the launch grids of the
pipeline (programs per launch, grid axes)."""
import pytest
import torch

from helpers import assert_close, randn
from hope_kernels.titans import triton_chunk
from hope_kernels.titans.triton_kernels import titans_scan_triton
from hope_kernels.triton_utils import GRID_YZ_LIMIT


def _loop(q, k, v, lr, d, m, period, S0, Z0, read, scale):
    """float64 token loop of DESIGN.md's titans_scan: G_t at the block-start memory, o_t = scale q_t S_t
    (current) or scale q_t Sbar_t (block_start)."""
    B, T, H, K = q.shape
    S = S0.clone() if S0 is not None else q.new_zeros(B, H, K, v.shape[-1])
    Z = Z0.clone() if Z0 is not None else torch.zeros_like(S)
    o = []
    for t in range(T):
        if t % period == 0:
            Sb = S
        x = -lr[:, t, :, None] * (torch.einsum("bhk,bhkv->bhv", k[:, t], Sb) - v[:, t])
        G = k[:, t, :, :, None] * x[:, :, None, :]
        Z = (m[:, t, :, None, None] * Z + G) if m is not None else G
        S = (d[:, t, :, None, None] if d is not None else 1.) * S + Z
        o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], Sb if read == "block_start" else S))
    o = torch.stack(o, 1) if o else q.new_zeros(B, 0, H, v.shape[-1])
    return o, S, (Z if m is not None else None)


def _inputs(B, T, H, K, V, dtype, decay, momentum, N=None):
    q = randn(B, T, H, K, dtype=dtype, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).to(dtype).requires_grad_(True)
    v = randn(B, T, H, V, dtype=dtype, requires_grad=True)
    lr = torch.rand(B, T, H).requires_grad_(True)
    d = (0.6 + 0.4 * torch.rand(B, T, H)).requires_grad_(True) if decay else None
    m = (0.9 * torch.rand(B, T, H)).requires_grad_(True) if momentum else None
    S0 = randn(N or B, H, K, V, requires_grad=True, scale=0.5)
    Z0 = randn(N or B, H, K, V, requires_grad=True, scale=0.5) if momentum else None
    return [q, k, v, lr, d, m, S0, Z0]


def _check(xs, outs, refs, refs_in, dtype, names=("q", "k", "v", "lr", "decay", "momentum", "S0", "Z0")):
    for name, a, b in zip(["o", "S", "Z"], outs, refs):
        if b is not None:
            assert_close(name, a, b, dtype, "cpu")
    gen = torch.Generator().manual_seed(3)
    cot = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in refs if r is not None]
    live = [(n, x, r) for n, x, r in zip(names, xs, refs_in) if x is not None]
    loss = lambda os: sum((o.double() * c).sum() for o, c in zip([o for o in os if o is not None], cot))
    g = torch.autograd.grad(loss(outs), [x for _, x, _ in live])
    rg = torch.autograd.grad(loss(refs), [r for _, _, r in live])
    for (name, _, _), a, b in zip(live, g, rg):
        assert_close("d" + name, a, b, dtype, "cpu", grad=True)


CASES = [
    # dtype,        period, decay, momentum, T
    (torch.float32, 1, True, False, 37),      # DGD: a UT transform per chunk
    (torch.float32, 1, False, False, 21),     # the delta rule
    (torch.float32, 3, True, False, 40),      # blocks inside a chunk (chunks of 15 tokens)
    (torch.float32, 16, True, False, 37),     # a block per chunk
    (torch.float32, 40, True, False, 90),     # blocks over several chunks, the last one partial
    (torch.float32, 32, False, False, 45),
    (torch.float32, 1, True, True, 21),       # momentum: the token recurrence
    (torch.float32, 5, True, True, 21),
    (torch.float16, 1, True, False, 37),
    (torch.bfloat16, 24, True, False, 45),
]


@pytest.mark.parametrize("read", ["current", "block_start"])
@pytest.mark.parametrize("dtype,period,decay,momentum,T", CASES)
def test_both_reads_match_a_token_loop(read, dtype, period, decay, momentum, T):
    B, H, K, V, scale = 1, 2, 16, 32, 0.3
    xs = _inputs(B, T, H, K, V, dtype, decay, momentum)
    q, k, v, lr, d, m, S0, Z0 = xs
    outs = titans_scan_triton(q, k, v, lr, d, m, scale, period, S0, Z0, None, 16, read=read)
    assert outs[0].dtype == dtype
    refs_in = [None if x is None else x.detach().double().requires_grad_(True) for x in xs]
    refs = _loop(*refs_in[:6], period, refs_in[6], refs_in[7], read, scale)
    _check(xs, outs, refs, refs_in, dtype)


@pytest.mark.parametrize("read", ["current", "block_start"])
@pytest.mark.parametrize("period,momentum", [(1, False), (3, False), (20, False), (4, True)])
def test_packed_sequences_both_reads(read, period, momentum):
    """cu_seqlens (an empty sequence, one over several chunks): one token loop per sequence."""
    lens = [5, 0, 41, 3]
    cu = torch.tensor([0] + lens).cumsum(0)
    H, K, V, scale = 2, 16, 16, 0.25
    xs = _inputs(1, sum(lens), H, K, V, torch.float32, True, momentum, N=len(lens))
    q, k, v, lr, d, m, S0, Z0 = xs
    outs = titans_scan_triton(q, k, v, lr, d, m, scale, period, S0, Z0, cu, 16, read=read)
    refs_in = [None if x is None else x.detach().double().requires_grad_(True) for x in xs]
    parts = []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        seq = [None if x is None else x[:, a:b] for x in refs_in[:6]]
        parts.append(_loop(*seq, period, refs_in[6][n:n + 1], None if Z0 is None else refs_in[7][n:n + 1],
                           read, scale))
    refs = [torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0),
            torch.cat([p[2] for p in parts], 0) if momentum else None]
    _check(xs, outs, refs, refs_in, torch.float32)


def test_read_is_checked():
    q = k = v = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="read"):
        titans_scan_triton(q, k, v, torch.rand(1, 4, 1), None, None, 1., 1, None, None, None, 16, read="start")


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("period", [1, 16, 64])
def test_launches_have_a_program_per_chunk_and_head(D, period):
    """B=1, H=2, T=1024: the largest forward launch and the largest backward launch have >= T/64 B H programs;
    sequences x heads and chunks x heads sit on grid axis 0."""
    B, H, T = 1, 2, 1024
    grids = triton_chunk.launch_grids(B, T, H, D, D, period, 64)
    programs = {name: torch.tensor(g).prod().item() for name, g in grids.items()}
    need = T // 64 * B * H
    assert max(programs[n] for n in ("wy", "state", "out")) >= need
    assert max(programs[n] for n in ("wy", "state", "state_bwd", "grad_out", "grad_wy")) >= need
    assert grids["grad_wy"][0] == grids["wy"][0] >= (T // 64) * B * H
    wide = triton_chunk.launch_grids(70_000, 64, 1, D, D, period, 64)
    assert all(len(g) == 1 or g[1] <= GRID_YZ_LIMIT for g in wide.values())


def test_launch_grids_are_the_launched_ones(monkeypatch):
    """The launchers run exactly the grids `launch_grids` reports (here at a small shape)."""
    B, T, H, K, V, period = 2, 40, 2, 16, 80, 3
    seen = {}
    real = triton_chunk._launch

    def spy(kernel, grid, *args, **kw):
        seen[next(n for n in dir(triton_chunk) if getattr(triton_chunk, n) is kernel)] = tuple(grid)
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(triton_chunk, "_launch", spy)
    xs = _inputs(B, T, H, K, V, torch.float32, True, False)
    o, S, _ = titans_scan_triton(*xs[:6], 0.25, period, xs[6], None, None, 16)
    o.sum().backward()
    grids = triton_chunk.launch_grids(B, T, H, K, V, period, 16)
    names = {"wy": "titans_wy_kernel", "state": "titans_chunk_state_kernel", "out": "titans_chunk_out_kernel",
             "state_bwd": "titans_chunk_state_bwd_kernel", "grad_out": "titans_chunk_grad_out_kernel",
             "grad_wy": "titans_chunk_grad_wy_kernel"}
    assert {names[n]: g for n, g in grids.items()} == seen


@pytest.mark.parametrize("period,momentum", [(1, False), (20, False), (3, True)])
def test_no_host_sync(period, momentum):
    """Forward + backward without cu_seqlens read no tensor value on the host (no aten._local_scalar_dense)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Syncs.count += 1
            return func(*args, **(kwargs or {}))

    xs = _inputs(1, 40, 2, 16, 16, torch.float32, True, momentum)
    with Syncs():
        o, S, Z = titans_scan_triton(*xs[:6], 0.25, period, xs[6], xs[7], None, 16, read="block_start")
        (o.sum() + S.sum()).backward()
    assert Syncs.count == 0
