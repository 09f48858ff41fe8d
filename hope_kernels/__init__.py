"""hope-kernels: Triton kernels for linear attention, the fused multi-timescale CMS memory, EMAs and Titans.

Every op takes `backend=None | "triton" | "torch"` (keyword-only); see DESIGN.md. The ops are those
of `registry.OPS`, each defined in its op folder.
"""
from . import reference, registry
from .utils import resolve_backend

globals().update({name: registry.public(name) for name in registry.OPS})

__all__ = [*registry.OPS, "reference", "resolve_backend"]
__version__ = "0.1.0"
