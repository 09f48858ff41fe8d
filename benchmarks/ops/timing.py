"""Timers and peak-memory probes: `triton.testing.do_bench` on CUDA, a plain repeat timer on the CPU.

Times are milliseconds per call as (p50, p20, p80). Peak memory is the extra memory one call
needs above what was allocated before it (inputs and saved tensors excluded):
- CUDA: `torch.cuda.max_memory_allocated` after a peak-stats reset.
- CPU: the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs).
  `malloc_trim(0)` first hands every free page of the glibc heap back to the OS, so memory the
  call allocates (fresh or reused from the heap) is faulted in again and shows; the allocator is
  left as is while timing. Accurate to a page per allocation; where /proc or glibc is missing
  (not Linux) the memory column is reported as None ("n/a").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Quantiles = Tuple[float, float, float]


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without needing numpy."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_timer(fn: Callable[[], object], *, warmup: int = 1, min_reps: int = 3, max_reps: int = 30,
              budget_s: float = 0.25) -> Quantiles:
    """Run `fn` `warmup` times, then repeat it until `budget_s` is spent (between min_reps and max_reps)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < budget_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    return quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8)


def cuda_timer(fn: Callable[[], object], *, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
               warmup_ms: int = 25, rep_ms: int = 100) -> Quantiles:
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                             quantiles=[0.5, 0.2, 0.8])
    return float(p50), float(p20), float(p80)


def make_timer(device: torch.device, budget_s: float = 0.25, min_reps: int = 3) -> Callable[..., Quantiles]:
    if device.type == "cuda":
        return lambda fn, grad_to_none=None: cuda_timer(fn, grad_to_none=grad_to_none)
    return lambda fn, grad_to_none=None: cpu_timer(fn, budget_s=budget_s, min_reps=max(1, min_reps))


# --------------------------------------------------------------------------- peak memory
def _malloc_trim() -> bool:
    """Return the free pages of the glibc heap to the OS (False where there is no glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        ctypes.CDLL(name).malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Extra bytes one call of `fn` needs at its peak (see the module docstring); None if unknown."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if not _malloc_trim() or not _reset_peak_rss():
        return None
    base = _status_bytes("VmRSS")
    fn()
    peak = _status_bytes("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base)
