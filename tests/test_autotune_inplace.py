"""In-place kernels stay correct while the autotuner times them (each timed run must not re-apply the update).

On a GPU, `triton.autotune` runs every config several times on the caller's tensors before the real
launch; kernels that write an input declare it in `restore_value` (hope_kernels.triton_utils.autotune).
`helpers.simulated_autotuning` reproduces that tuning on the interpreter.
"""
import pytest
import torch

import hope_kernels as hk
from hope_kernels import reference as ref
from helpers import assert_close, randn, simulated_autotuning

B, H, K, V, M = 2, 2, 16, 16, 3


def _qkv():
    return randn(B, H, K).sigmoid(), randn(B, H, K).sigmoid(), randn(B, H, V)


def test_cms_step_under_autotuning():
    q, k, v = _qkv()
    tau = torch.tensor([0.1, 0.5, 0.9])
    mix = randn(B, H, M).softmax(-1)
    state = randn(B, H, M, K, V)
    want_state = state.double().clone()
    want_o, _ = ref.cms_step(q.double(), k.double(), v.double(), tau.double(), want_state, mix.double())
    with simulated_autotuning():
        o, state = hk.cms_step(q, k, v, tau, state, mix, backend="triton")
    assert_close("state", state, want_state, torch.float32, "cpu")
    assert_close("o", o, want_o, torch.float32, "cpu")


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_step_under_autotuning(normalize):
    q, k, v = _qkv()
    S = randn(B, H, K, V)
    state = (S, randn(B, H, K).abs() + 1) if normalize else S
    want = tuple(s.double().clone() for s in state) if normalize else S.double().clone()
    want_o, _ = ref.linear_attention_step(q.double(), k.double(), v.double(), want, normalize=normalize)
    with simulated_autotuning():
        o, state = hk.linear_attention_step(q, k, v, state, normalize=normalize, backend="triton")
    for got, exp in zip(state if normalize else (state,), want if normalize else (want,)):
        assert_close("state", got, exp, torch.float32, "cpu")
    assert_close("o", o, want_o, torch.float32, "cpu")


def test_ema_update_under_autotuning():
    states, update = randn(M, 300), randn(300)
    tau = torch.tensor([0.1, 0.5, 0.9])
    want = tau[:, None].double() * states.double() + (1 - tau[:, None].double()) * update.double()
    with simulated_autotuning():
        hk.ema_update_(states, update, tau, backend="triton")
    assert_close("states", states, want, torch.float32, "cpu")
