"""Readable token-by-token references of every op, the ground truth the kernels are tested against.

Each op folder keeps its own `reference.py` beside its kernels; this module gathers them (one per
op of `registry.OPS`). Same signatures as the public ops minus `backend` / `chunk_size`; any floating
dtype works (float64 gives a float64 reference); states are float32 (float64 for float64 inputs).
"""
from . import registry

globals().update({name: registry.reference(name) for name in registry.OPS})

__all__ = list(registry.OPS)
