"""Backend choice as DESIGN.md states it: argument, environment override, clear errors."""
import pytest
import torch

from hope_kernels import utils


def test_default_picks_triton_where_it_runs(monkeypatch):
    monkeypatch.delenv(utils.BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.resolve_backend(None, torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert utils.resolve_backend(None, torch.device("cpu")) == "torch"


def test_env_var_overrides_default_but_not_argument(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(utils.BACKEND_ENV, "torch")
    assert utils.resolve_backend(None, torch.device("cpu")) == "torch"
    assert utils.resolve_backend("triton", torch.device("cpu")) == "triton"
    monkeypatch.setenv(utils.BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match=utils.BACKEND_ENV):
        utils.resolve_backend(None, torch.device("cpu"))


def test_triton_where_it_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        utils.resolve_backend("triton", torch.device("cpu"))


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend='cuda'"):
        utils.resolve_backend("cuda", torch.device("cpu"))


def test_autotune_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.autotune_configs(["a", "b"], "a") == ["a"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(utils.AUTOTUNE_ENV, "0")
    assert utils.autotune_configs(["a", "b"], "b") == ["b"]
    monkeypatch.setenv(utils.AUTOTUNE_ENV, "1")
    assert utils.autotune_configs(["a", "b"], "a") == ["a", "b"]


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0, 3, 2, 8]), "non-decreasing"),
    (torch.tensor([1, 4, 8]), "start at 0"),
    (torch.tensor([0, 4, 7]), "end at T"),
    (torch.tensor([0.0, 8.0]), "int32 or int64"),
    (torch.tensor([[0, 8]]), "1-D"),
])
def test_cu_seqlens_checks(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        utils.check_cu_seqlens(bad, 1, 8, torch.device("cpu"))


def test_cu_seqlens_needs_one_batch_row():
    with pytest.raises(ValueError, match="B == 1"):
        utils.check_cu_seqlens(torch.tensor([0, 8]), 2, 8, torch.device("cpu"))


def test_check_tensor_messages():
    with pytest.raises(TypeError, match="q must be a floating tensor"):
        utils.check_tensor("q", torch.ones(2, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"k must have 4 dimensions \[B, T, H, K\]"):
        utils.check_tensor("k", torch.ones(2, 3), 4, layout="[B, T, H, K]")
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        utils.check_tensor("v", [1.0], 1)
