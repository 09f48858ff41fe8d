"""pytest-benchmark timings of the CPU paths (the chunked torch backend and the references).

    python -m pytest tools/test_bench_cpu.py --benchmark-only             # all
    python -m pytest tools/test_bench_cpu.py --benchmark-only -k torch    # one provider

Not part of `pytest tests`. The cases (inputs, calls) are those of `python -m benchmarks.ops`.
"""
import pytest
import torch

from benchmarks.ops.cases import CASES
from benchmarks.ops.roofline import Shape

# The chunked backend at a realistic small size; the token-by-token reference at a short T.
SHAPES = {"torch": Shape(B=2, T=512, H=4, K=64, V=64, M=4), "reference": Shape(B=1, T=64, H=4, K=64, V=64, M=4)}


def _params():
    for op, case in CASES.items():
        for provider in ("torch", "reference"):
            for mode in case.modes:
                yield pytest.param(op, provider, mode, id=f"{op}-{provider}-{mode}")


@pytest.mark.parametrize("op, provider, mode", list(_params()))
def test_cpu(benchmark, op, provider, mode):
    from benchmarks.ops.suite import timed_fn

    case = CASES[op]
    torch.manual_seed(0)
    inp = case.make(SHAPES[provider], torch.float32, torch.device("cpu"), len(case.modes) > 1)
    fn = timed_fn(case, provider, mode, inp)
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, shape=str(SHAPES[provider]))
    benchmark(fn)
