"""Every public op, listed once: its name and the op folder that defines it.

    OPS[name] = folder    ->  hope_kernels.<folder> exports `name` (its ops.py, or another module of it),
                              hope_kernels.<folder>.reference defines `name` (the token-by-token truth),
                              hope_kernels.<folder>.triton_kernels.compile_specs() lists its kernels

`hope_kernels`, `hope_kernels.reference`, `hope.ops`, the AOT compile check and the tests that
enumerate ops read this table, so an op is added in its folder plus one line here. The folders
follow one template (DESIGN.md, "Layout and house conventions"; tests/test_layout.py checks it).
"""
from __future__ import annotations

import importlib
from typing import Callable, Tuple

OPS = {
    "linear_attention": "linear_attention",
    "linear_attention_step": "linear_attention",
    "cms_scan": "cms",
    "cms_step": "cms",
    "ema_update_": "ema",
    "titans_scan": "titans",
    "titans_step": "titans",
    "titans_selfmod_scan": "titans",
    "titans_selfmod_step": "titans",
}
FOLDERS: Tuple[str, ...] = tuple(dict.fromkeys(OPS.values()))


def _module(name: str, part: str = ""):
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}: expected one of {tuple(OPS)}")
    return importlib.import_module(f"{__package__}.{OPS[name]}{part}")


def public(name: str) -> Callable:
    """The public op `name` (what `hope_kernels.<name>` is)."""
    return getattr(_module(name), name)


def reference(name: str) -> Callable:
    """The reference of `name` (what `hope_kernels.reference.<name>` is)."""
    return getattr(_module(name, ".reference"), name)


def kernel_modules() -> Tuple[str, ...]:
    """The module of each folder whose `compile_specs()` lists every Triton kernel of that folder."""
    return tuple(f"{__package__}.{folder}.triton_kernels" for folder in FOLDERS)
