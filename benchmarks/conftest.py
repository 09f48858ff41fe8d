"""pytest set-up for the pytest-benchmark files in benchmarks/ (CPU paths, one thread per core)."""
import os

import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))
