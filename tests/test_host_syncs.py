"""No device-to-host syncs on the hot path: every op's forward + backward on the torch backend, and a
training step (forward + backward) of every shipped tiny HOPE variant.

A sync is a call of `aten._local_scalar_dense` (what `.item()`, `bool(t)`, `int(t)` and `.tolist()` of
a tensor come down to) or of an op whose output size depends on tensor values (bincount, nonzero,
unique, masked_select: they read the values on the host inside the op), counted under a
TorchDispatchMode. Value checks are treated as on a GPU
(`skip_host_checks` returns True: they run there only with HOPE_KERNELS_DEBUG=1), so what is counted
is what a CUDA tensor would pay. The one sync a call with `cu_seqlens` pays to read its offsets is
not exercised here (DESIGN.md, Errors).
"""
import inspect
import os
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hope_kernels
from hope_kernels import cms_scan, ema_update_, linear_attention, titans_scan, titans_selfmod_scan
from hope_kernels import utils
from helpers import randn

KERNELS_DIR = os.path.dirname(hope_kernels.__file__) + os.sep


SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.bincount.default,
           torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
           torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
           torch.ops.aten.unique_consecutive.default}


class HostSyncs(TorchDispatchMode):
    """Records the Python stack of every syncing op (forward, and backward through autograd)."""

    def __init__(self):
        super().__init__()
        self.stacks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.stacks.append(traceback.extract_stack()[:-1])
        return func(*args, **(kwargs or {}))

    def inside(self, prefix: str):
        """The syncs with a frame in files under `prefix`, as 'file:line' of the innermost such frame."""
        out = []
        for stack in self.stacks:
            frames = [f for f in stack if f.filename.startswith(prefix)]
            if frames:
                out.append(f"{frames[-1].filename}:{frames[-1].lineno}")
        return out


@pytest.fixture
def on_gpu_rules(monkeypatch):
    """Value checks as on a GPU: skip_host_checks returns True (in utils and wherever it was imported)."""
    real = utils.skip_host_checks
    for name, mod in list(sys.modules.items()):
        if name.startswith("hope_kernels") and getattr(mod, "skip_host_checks", None) is real:
            monkeypatch.setattr(mod, "skip_host_checks", lambda device=None: True)


def _count(fn):
    """Syncs inside hope_kernels while fn() runs forward and its outputs' backward."""
    counter = HostSyncs()
    with counter:
        outs = [o for o in fn() if isinstance(o, torch.Tensor)]
        loss = sum((o.float() * torch.randn_like(o.float())).sum() for o in outs if o.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    return counter.inside(KERNELS_DIR)


def _leaf(*shape, scale=1.0, lo=None, hi=None):
    if lo is not None:
        return (lo + (hi - lo) * torch.rand(*shape)).requires_grad_(True)
    return randn(*shape, requires_grad=True, scale=scale)


def _unit(*shape):
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1).requires_grad_(True)


B, T, H, K = 2, 40, 2, 16


@pytest.mark.parametrize("period,read,momentum", [(1, "current", False), (1, "block_start", True),
                                                  (16, "current", True), (16, "block_start", False),
                                                  (10 ** 8, "current", False)])
def test_titans_scan(on_gpu_rules, period, read, momentum):
    m = _leaf(B, T, H, lo=0., hi=0.9) if momentum else None
    S0 = _leaf(B, H, K, K, scale=0.5)
    state = (S0, torch.zeros(B, H, K, K)) if momentum else S0

    def run():
        o, st = titans_scan(_leaf(B, T, H, K), _unit(B, T, H, K), _leaf(B, T, H, K), _leaf(B, T, H, lo=0., hi=1.),
                            _leaf(B, T, H, lo=0.6, hi=1.), m, period=period, read=read, initial_state=state,
                            output_final_state=True, chunk_size=16, backend="torch")
        return [o, *(st if isinstance(st, tuple) else (st,))]
    assert _count(run) == []


@pytest.mark.parametrize("momentum", [False, True])
def test_titans_selfmod_scan(on_gpu_rules, momentum):
    D = 8
    m = _leaf(B, T, H, lo=0., hi=0.9) if momentum else None
    M0 = _leaf(B, H, D, 3 * D + 2, scale=0.5)
    state = (M0, torch.zeros(B, H, D, 3 * D + 2)) if momentum else M0

    def run():
        o, _ = titans_selfmod_scan(_unit(B, T, H, D), _leaf(B, T, H, D), _leaf(H), _leaf(H), m, 1.0, lr_max=1.0,
                                   period=8, initial_state=state, backend="torch")
        return [o]
    assert _count(run) == []


CMS_EXTRA = [{}] + ([dict(beta=None)] if "beta" in inspect.signature(cms_scan).parameters else [])


@pytest.mark.parametrize("extra", CMS_EXTRA)
@pytest.mark.parametrize("mix", [False, True])
def test_cms_scan(on_gpu_rules, extra, mix):
    M = 3
    extra = dict(extra)
    if "beta" in extra:
        extra["beta"] = _leaf(B, T, H, M, lo=0.1, hi=0.9)

    def run():
        o, _ = cms_scan(_leaf(B, T, H, K), _leaf(B, T, H, K), _leaf(B, T, H, K), torch.tensor([0.1, 0.5, 0.9]),
                        _leaf(B, T, H, M) if mix else None, chunk_size=16, backend="torch", **extra)
        return [o]
    assert _count(run) == []


@pytest.mark.parametrize("mix", [False, True])
def test_cms_scan_delta_triton_pipeline(on_gpu_rules, mix):
    """The Triton delta-rule chunk pipeline (under the interpreter here), forward and registered backward,
    a learned decay included: no host sync in its launchers."""
    M = 2

    def run():
        o, st = cms_scan(_leaf(1, T, H, K), _unit(1, T, H, K), _leaf(1, T, H, K), _leaf(M, lo=0.1, hi=0.9),
                         _leaf(H, M) if mix else None, beta=_leaf(1, T, H, lo=0.1, hi=0.9),
                         initial_state=_leaf(1, H, M, K, K), output_final_state=True, chunk_size=16,
                         backend="triton")
        return [o, st]
    assert _count(run) == []


def test_the_counter_sees_value_checks():
    """On CPU rules the gate checks read their values: the counter must see those syncs."""
    def run():
        o, _ = titans_scan(_leaf(B, T, H, K), _unit(B, T, H, K), _leaf(B, T, H, K), _leaf(B, T, H, lo=0., hi=1.),
                           backend="torch")
        return [o]
    assert len(_count(run)) >= 1


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention(on_gpu_rules, normalize):
    def run():
        o, _ = linear_attention(_leaf(B, T, H, K), _leaf(B, T, H, K).abs(), _leaf(B, T, H, K), normalize=normalize,
                                chunk_size=16, backend="torch")
        return [o]
    assert _count(run) == []


def test_ema_update(on_gpu_rules):
    states = torch.randn(3, 5, 7)
    counter = HostSyncs()
    with counter:
        ema_update_(states, torch.randn(5, 7), torch.tensor([0.1, 0.5, 0.9]), backend="torch")
    assert counter.inside(KERNELS_DIR) == []


# ---------------------------------------------------------------------- the model
CONFIGS = ["tiny", "hope_paper_tiny", "hope_attention_tiny"]


@pytest.mark.parametrize("name", CONFIGS)
def test_training_step_of_every_variant(on_gpu_rules, name):
    """Forward + backward of a training batch: at most the model's token-id check (tokens, targets)."""
    from hope import HOPE
    from hope.run_config import RunConfig
    cfg = RunConfig.load(name).model
    model = HOPE(cfg, backend="torch")
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    counter = HostSyncs()
    with counter:
        _, loss = model(tokens, tokens.roll(-1, 1))
        loss.backward()
    where = [f"{s[-1].filename}:{s[-1].lineno}" for s in counter.stacks]
    assert len(where) <= 2 and counter.inside(KERNELS_DIR) == [], where


@pytest.mark.parametrize("period,read", [(1, "current"), (1, "block_start"), (16, "block_start")])
def test_titans_torch_path_traces_with_fake_tensors(on_gpu_rules, period, read):
    """No value steers the torch path: make_fx traces it on fake tensors (a value read would raise)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    xs = [torch.randn(1, T, H, K), _unit(1, T, H, K).detach(), torch.randn(1, T, H, K), torch.rand(1, T, H),
          0.5 + 0.5 * torch.rand(1, T, H), 0.5 * torch.rand(1, T, H), torch.randn(1, H, K, K), torch.randn(1, H, K, K)]
    from hope_kernels.titans.torch_chunked import titans_scan_torch
    # the torch implementation itself (the public op is one registered node in a trace)
    run = lambda *a: titans_scan_torch(*a[:6], K ** -0.5, period, a[6], a[7], None, 16,   # noqa: E731
                                       torch.float32, read=read)
    graph = make_fx(run, tracing_mode="fake")(*xs)
    assert any(n.target is torch.ops.aten.linalg_solve_triangular.default for n in graph.graph.nodes) == (period == 1)
