"""Shared test helpers: tolerances per dtype (one table), relative error, poisoned outputs, inputs."""
from __future__ import annotations

import contextlib

import torch

# Relative-error bounds ||out - ref|| / ||ref|| against a float64 reference computed from the
# same (already rounded) inputs. "cpu" covers the interpreter (tl.dot is exact fp32 there);
# "cuda" covers real cards, where tl.dot on fp32 inputs runs in TF32 (10-bit mantissa).
TOLERANCES = {
    "cpu": {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2},
    "cuda": {torch.float64: 1e-10, torch.float32: 5e-3, torch.float16: 8e-3, torch.bfloat16: 3e-2},
}
# Gradients go through one more product and a sum over T: a little more rounding.
GRAD_FACTOR = 2.0


def tolerance(dtype: torch.dtype, device, grad: bool = False) -> float:
    dev = torch.device(device).type
    tol = TOLERANCES["cuda" if dev == "cuda" else "cpu"][dtype]
    return tol * (GRAD_FACTOR if grad else 1.0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; NaN anywhere in `out` gives NaN (which fails every bound)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / max(denom, 1e-30)


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, device, grad=False):
    assert out is not None, f"{name}: got None"
    assert torch.isfinite(out).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    tol = tolerance(dtype, device, grad)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype}, {torch.device(device).type})"
    return err


def poisoned(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A NaN-filled tensor: any element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0) -> torch.Tensor:
    """Fresh random input (never zeros), rounded to `dtype`, as a leaf tensor."""
    t = (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def as_ref(t):
    """The float64 leaf a reference computes from: the same rounded values as `t`."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


@contextlib.contextmanager
def simulated_autotuning(n_configs: int = 3, runs_per_bench: int = 3):
    """Make every `triton.autotune` kernel tune as it would on a GPU, on the CPU interpreter.

    Each autotuner sees `n_configs` copies of its config and benchmarks them all; each benchmark calls
    the kernel `runs_per_bench` times (as `do_bench` does), then the winner runs once for real. A kernel
    that writes an input without declaring it in `restore_value` applies its update several times.
    """
    from triton.runtime.autotuner import Autotuner
    original_run = Autotuner.run

    def fake_bench(kernel_call, quantiles):
        for _ in range(runs_per_bench):
            kernel_call()
        return [1.0, 1.0, 1.0]

    def run(self, *args, **kwargs):
        saved = self.configs, self.cache, self.cache_results, self.__dict__.get("do_bench")
        self.configs, self.cache, self.cache_results = list(self.configs[:1]) * n_configs, {}, False
        self.__dict__["do_bench"] = fake_bench
        try:
            return original_run(self, *args, **kwargs)
        finally:
            self.configs, self.cache, self.cache_results = saved[:3]
            if saved[3] is None:
                self.__dict__.pop("do_bench", None)
            else:
                self.__dict__["do_bench"] = saved[3]

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = original_run
