"""Ahead-of-time compile descriptions of every Triton kernel (no GPU needed to use them).

Each kernel module exposes `compile_specs() -> list[KernelSpec]`: the raw `@triton.jit`
function, a representative signature and constexprs, and every config it can be autotuned
over (the first config is the default, the one the interpreter and HOPE_KERNELS_AUTOTUNE=0
use). `tools.compile_check` (test tooling, outside the shipped kernels) compiles them for
sm_80 / sm_90 and reads registers, spills, shared memory and MMA types off the cubin;
tests/test_compile.py and `python -m tools.compile_report` are built on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class KernelConfig:
    meta: Dict[str, Any]            # constexpr values chosen by the config (block sizes, ...)
    num_warps: int = 4
    num_stages: int = 2
    default: bool = False
    maxnreg: Optional[int] = None   # registers per thread ptxas may use (None: its own choice)


@dataclass
class KernelSpec:
    name: str                        # e.g. "linear_attention.fwd_chunk[K=64,V=64,bf16]"
    fn: Any                          # the raw triton.JITFunction (unwrap autotune/heuristics)
    signature: Dict[str, str]        # arg name -> "*fp32", "*bf16", "i32", "i64", "fp32", "constexpr"
    constexprs: Dict[str, Any]       # constexpr values fixed by the shape (K, V, flags, ...)
    configs: List[KernelConfig] = field(default_factory=list)
    # integer args a typical call passes as multiples of 16 (the JIT then specialises them, which
    # enables vectorised loads); pointer args are always taken as 16-byte aligned.
    divisible_by_16: List[str] = field(default_factory=list)
