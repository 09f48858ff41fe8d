"""pytest set-up for tools/test_bench_cpu.py, pytest-benchmark timings of the CPU paths (one thread per core)."""
import os

import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))
