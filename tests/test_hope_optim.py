"""hope.optim.DeepMomentum: plain / multi-timescale momentum against a hand-written loop, deep
momentum's online memory, decoupled weight decay, state_dict round trips, backends."""
import copy

import pytest
import torch

from hope.optim import READ_BOUND, DeepMomentum



def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    A, b = torch.randn(30, 12, generator=g), torch.randn(30, 5, generator=g)
    w = torch.nn.Parameter(torch.randn(12, 5, generator=g))
    bias = torch.nn.Parameter(torch.randn(5, generator=g))
    return A, b, [w, bias]


def _loss(A, b, params):
    w, bias = params
    return ((A @ w + bias - b) ** 2).mean()


def _run(opt, A, b, params, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(A, b, params)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("betas", [(0.9,), (0.5, 0.9, 0.99)])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_plain_momentum_matches_manual(betas, backend):
    A, b, params = _problem()
    manual = [p.detach().clone() for p in params]
    bufs = [torch.zeros(len(betas), *p.shape) for p in params]
    lr, wd = 0.05, 0.1
    opt = DeepMomentum(params, lr=lr, betas=betas, weight_decay=wd, backend=backend)
    for _ in range(3 if backend == "triton" else 6):   # the interpreter is slow
        opt.zero_grad()
        _loss(A, b, params).backward()
        opt.step()
        mp = [m.clone().requires_grad_(True) for m in manual]
        grads = torch.autograd.grad(_loss(A, b, mp), mp)
        for m, buf, g in zip(manual, bufs, grads):
            for j, beta in enumerate(betas):
                buf[j] = beta * buf[j] + (1 - beta) * g
            m.mul_(1 - lr * wd).sub_(lr * buf.mean(0))
    for p, m in zip(params, manual):
        torch.testing.assert_close(p.detach(), m, rtol=1e-5, atol=1e-6)
    assert opt.state[params[0]]["momentum"].shape == (len(betas), 12, 5)


def test_normalized_update_has_rms_lr():
    A, b, params = _problem()
    before = [p.detach().clone() for p in params]
    opt = DeepMomentum(params, lr=0.01, betas=[0.9, 0.99], normalize=True, backend="torch")
    _run(opt, A, b, params, 1)
    for p, q in zip(params, before):
        assert abs((p.detach() - q).pow(2).mean().sqrt().item() - 0.01) < 1e-6


def test_deep_momentum_starts_as_plain_and_learns():
    A, b, params = _problem()
    frozen = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    deep = DeepMomentum(params, lr=0.05, betas=[0.5, 0.9], deep=True, memory_lr=0.05, backend="torch")
    no_learning = DeepMomentum(frozen, lr=0.05, betas=[0.5, 0.9], deep=True, memory_lr=0.0, backend="torch")
    plain = DeepMomentum(plain_params, lr=0.05, betas=[0.5, 0.9], backend="torch")
    _run(no_learning, A, b, frozen, 5)
    _run(plain, A, b, plain_params, 5)
    for p, q in zip(frozen, plain_params):   # the initial memory reads out plain momentum
        torch.testing.assert_close(p.detach(), q.detach())
    losses = _run(deep, A, b, params, 150)
    assert losses[-1] < 0.2 * losses[0]
    mem = deep.state[params[0]]["memory"]
    assert mem["w2"].abs().sum() > 0        # the MLP part of the memory was trained online
    assert not torch.allclose(mem["a"], torch.full_like(mem["a"], 0.5))


def test_deep_memory_inner_objective_decreases():
    """The memory fits its inner objective (predict the next gradient from the gradient history)."""
    A, b, params = _problem(1)
    opt = DeepMomentum(params, lr=0.02, betas=[0.5, 0.9, 0.99], deep=True, memory_lr=0.1, backend="torch")
    _run(opt, A, b, params, 40)
    mem0 = DeepMomentum._new_memory(3, 16, "cpu")
    mem = opt.state[params[0]]["memory"]
    opt.zero_grad()
    _loss(A, b, params).backward()
    xs, ys = [], []
    for p in params:
        s = p.grad.pow(2).mean().sqrt() + 1e-8
        xs.append(opt.state[p]["momentum"].reshape(3, -1).t() / s)
        ys.append(p.grad.reshape(-1) / s)
    x, y = torch.cat(xs), torch.cat(ys)
    inner = lambda m: 0.5 * (DeepMomentum._read(m, x) - y).pow(2).mean().item()  # noqa: E731
    assert inner(mem) < inner(mem0)


@pytest.mark.parametrize("normalize", [False, True])
def test_deep_read_is_bounded_around_plain_momentum(normalize):
    """Whatever the memory holds (here one that reads against momentum), the update d keeps
    rms(d - p) <= READ_BOUND rms(p), p the averaged buffers, so its cosine with p is at least
    sqrt(1 - READ_BOUND^2): a descent direction where momentum is one. At the bound the memory's
    part is used in full; normalize=True only rescales d."""
    A, b, params = _problem()
    lr = 0.05
    opt = DeepMomentum(params, lr=lr, betas=[0.5, 0.9], deep=True, memory_lr=0.0, normalize=normalize,
                       backend="torch")
    _run(opt, A, b, params, 2)
    mem = opt.state[params[0]]["memory"]
    mem["a"].fill_(-1.0)                                    # f(x) = -sum_j x_j + w2 . tanh(...)
    mem["w2"].fill_(0.5)
    before = [p.detach().clone() for p in params]
    _run(opt, A, b, params, 1)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    for p, q in zip(params, before):
        d = (q - p.detach()) / lr
        plain = opt.state[p]["momentum"].mean(0)
        cos = ((d * plain).sum() / (d.norm() * plain.norm())).item()
        assert cos >= (1 - READ_BOUND ** 2) ** 0.5 - 1e-5, cos
        if normalize:
            assert abs(rms(d) - 1) < 1e-5
        else:   # the bound is reached exactly
            assert abs(rms(d - plain) / rms(plain) - READ_BOUND) < 1e-4, (rms(d - plain), rms(plain))


@pytest.mark.parametrize("deep", [False, True])
def test_state_dict_round_trip(deep):
    A, b, params = _problem()
    opt = DeepMomentum(params, lr=0.03, betas=[0.8, 0.95], deep=deep, weight_decay=0.01, backend="torch")
    _run(opt, A, b, params, 5)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = DeepMomentum(clone, lr=0.03, betas=[0.8, 0.95], deep=deep, weight_decay=0.01, backend="torch")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    a = _run(opt, A, b, params, 5)
    c = _run(opt2, A, b, clone, 5)
    assert a == c
    for p, q in zip(params, clone):
        assert torch.equal(p, q)


def test_bad_arguments():
    _, _, params = _problem()
    for kwargs, match in [(dict(lr=-1.0), "lr"), (dict(betas=[0.9, 1.0]), "betas"), (dict(betas=[]), "betas"),
                          (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="cuda"), "backend")]:
        with pytest.raises(ValueError, match=match):
            DeepMomentum(params, **kwargs)
