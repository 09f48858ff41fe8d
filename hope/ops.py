"""The one place where a layer's `backend=` becomes a callable op.

    backend in {None, "triton", "torch"} -> hope_kernels.<op>(..., backend=backend)
    backend == "reference"               -> hope_kernels.reference.<op>(...)

Callers pass only the arguments both share (no `chunk_size`), so the same layer code runs on the
fast kernels and on the token-by-token references: that is how numerics of a layer are compared.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import hope_kernels
from hope_kernels import reference, registry
from hope_kernels.utils import BACKENDS as KERNEL_BACKENDS

BACKENDS = (None, *KERNEL_BACKENDS, "reference")  # the kernels' own set, plus the references
OPS = tuple(registry.OPS)


def check_backend(backend: Optional[str]) -> Optional[str]:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    return backend


def get_op(name: str, backend: Optional[str]) -> Callable:
    """`hope_kernels.<name>` bound to `backend`, or the reference of `name` for backend="reference"."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}: expected one of {OPS}")
    check_backend(backend)
    if backend == "reference":
        return getattr(reference, name)
    return functools.partial(getattr(hope_kernels, name), backend=backend)
