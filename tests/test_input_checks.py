"""Odd inputs to the ops and the HOPE model: every bad one is a ValueError / TypeError naming the
argument, every odd-but-valid one works (torch backend: the checks run before any kernel)."""
import math

import numpy as np
import pytest
import torch

from hope import HOPE
from hope_kernels import cms_scan, cms_step, ema_update_, linear_attention, linear_attention_step, reference
from helpers import as_ref, assert_close, randn

B, T, H, K, V, M = 1, 20, 2, 16, 8, 3


def qkv(lead=(B, T, H), k=K):
    return randn(*lead, k), randn(*lead, k), randn(*lead, V)


def all_ops(q, k, v, **kw):
    """Each op family on the same q, k, v (scan forms for [B, T, H, *], step forms for [B, H, *])."""
    tau = torch.tensor([0.3, 0.6, 0.9])
    if q.dim() == 4:
        return {"linear_attention": lambda: linear_attention(q, k, v, backend="torch", **kw),
                "cms_scan": lambda: cms_scan(q, k, v, tau, backend="torch", **kw)}
    Kq = q.shape[-1]
    return {"linear_attention_step": lambda: linear_attention_step(
                q, k, v, torch.zeros(B, H, Kq, V), backend="torch", **kw),
            "cms_step": lambda: cms_step(q, k, v, tau, torch.zeros(B, H, M, Kq, V), backend="torch", **kw)}


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, torch.tensor(math.nan)])
@pytest.mark.parametrize("lead", [(B, T, H), (B, H)])
def test_non_finite_scale_is_rejected(scale, lead):
    for name, op in all_ops(*qkv(lead), scale=scale).items():
        with pytest.raises(ValueError, match="scale must be a finite number"):
            op()


@pytest.mark.parametrize("lead", [(B, T, H), (B, H)])
def test_empty_head_dim_is_a_value_error(lead):
    for name, op in all_ops(*qkv(lead, k=0)).items():
        with pytest.raises(ValueError, match="head dimension K >= 1"):
            op()
    for name, op in all_ops(*qkv(lead, k=0), scale=1.0).items():
        with pytest.raises(ValueError, match="head dimension K >= 1"):
            op()


def test_huge_chunk_size_is_capped_at_the_sequence_length():
    """chunk_size = 2**20 for T = 20 would allocate [2**20, 2**20] tiles (terabytes) if not capped."""
    q, k, v = qkv()
    for causal in (True, False):
        got = linear_attention(q, k, v, causal=causal, chunk_size=1 << 20, backend="torch")[0]
        want = reference.linear_attention(*map(as_ref, (q, k, v)), causal=causal)[0]
        assert_close(f"linear_attention causal={causal} chunk_size=2**20", got, want, torch.float32, "cpu")
    got = cms_scan(q, k, v, torch.tensor([0.5, 0.9]), chunk_size=1 << 20, backend="torch")[0]
    assert got.shape == (B, T, H, 2, V) and bool(torch.isfinite(got).all())


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_attention_step_rejects_a_half_precision_state(normalize, dtype):
    q, k, v = qkv((B, H))
    S = torch.zeros(B, H, K, V, dtype=dtype)
    state = (S, torch.zeros(B, H, K)) if normalize else S
    with pytest.raises(TypeError, match="state must be float32"):
        linear_attention_step(q, k, v, state, normalize=normalize, backend="torch")
    with pytest.raises(TypeError, match="state must be float32"):   # cms_step: the same rule
        cms_step(q, k, v, torch.tensor([0.5]), torch.zeros(B, H, 1, K, V, dtype=dtype), backend="torch")


@pytest.mark.parametrize("change", ["data", "numpy", "fill_", "setitem"])
def test_ema_decay_is_rechecked_after_an_in_place_change(change):
    arr = np.array([0.5, 0.9], dtype=np.float32)
    decay = torch.from_numpy(arr) if change == "numpy" else torch.tensor([0.5, 0.9])
    states = randn(2, 7)
    ema_update_(states, randn(7), decay, backend="torch")          # a valid call (may cache the check)
    if change == "data":
        decay.data.fill_(1.5)
    elif change == "numpy":
        arr[1] = -0.25
    elif change == "fill_":
        decay.fill_(1.5)
    else:
        decay[0] = math.nan
    before = states.clone()
    with pytest.raises(ValueError, match="decay values must lie in"):
        ema_update_(states, randn(7), decay, backend="torch")
    assert torch.equal(states, before)


# ---------------------------------------------------------------------- the HOPE model
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HOPE(vocab_size=64, dim=32, num_layers=1, num_heads=2, num_memory_modules=2, backend="torch")


@pytest.mark.parametrize("tokens", [[[1, 64]], [[1, -1]], [[200, 3]]])
def test_token_ids_outside_the_vocabulary(model, tokens):
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=64\)"):
        model(torch.tensor(tokens))
    with pytest.raises(ValueError, match="tokens must be ids"):
        model.generate(tokens, max_new_tokens=1)


def test_targets_outside_the_vocabulary(model):
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="targets must be ids"):
        model(x, torch.tensor([[1, 2, 64]]))
    loss = model(x, torch.tensor([[1, -100, 3]]))[1]                 # -100 is "ignore"
    assert bool(torch.isfinite(loss))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_sequence(model, shape):
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(shape, dtype=torch.long), max_new_tokens=1)


@pytest.mark.parametrize("prompt", [torch.tensor([1.7, 2.2]), [1.7, 2.2], [[1.0, 2.0]], torch.tensor([True])])
def test_non_integer_prompt_is_a_type_error(model, prompt):
    with pytest.raises(TypeError, match="prompt must hold integer token ids"):
        model.generate(prompt, max_new_tokens=1)


def test_integer_prompts_of_any_form_work(model):
    a = model.generate([3, 4], max_new_tokens=2, temperature=0)
    b = model.generate(torch.tensor([3, 4], dtype=torch.int32), max_new_tokens=2, temperature=0)
    c = model.generate([np.int64(3), np.int64(4)], max_new_tokens=2, temperature=0)
    d = model.generate([[3, 4]], max_new_tokens=2, temperature=0)
    assert a.tolist() == b.tolist() == c.tolist() == d[0].tolist() and a[:2].tolist() == [3, 4]
