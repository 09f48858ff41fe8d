"""Triton kernel of `ema_update_`: every timescale of a multi-timescale EMA in one launch.

    states[m] <- tau_m * states[m] + (1 - tau_m) * update[m or shared],   m = 0 .. M-1

The op is bandwidth bound, so the kernel is a flat streaming pass: each program owns BLOCK
consecutive elements of the flattened `shape` (N elements) and updates them for its modules.

- Per-module update: cdiv(N, BLOCK) * M programs, one module each.
- Shared update, N >= SHARED_LOOP_MIN_N (enough blocks to fill the GPU): cdiv(N, BLOCK)
  programs; each loads its update block once and applies it to all M modules, so the update is
  read from memory once, not M times. Smaller shared updates run one program per (block,
  module): parallelism matters more there, and the repeated update reads hit L2.

States and updates come either as a strided stack (base pointer + m * stride, each module's
slice contiguous) or, for a list of separate tensors, as a device table of int64 data
pointers read inside the kernel and cast back to typed pointers. Math is float32 (float64
for float64 states); the result is rounded once to the state dtype.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ..aot import KernelConfig, KernelSpec
from ..triton_utils import autotune

# (BLOCK, num_warps): 4-16 elements per thread, i.e. one to four 128-bit loads per tensor.
_CONFIGS = [(2048, 4), (1024, 4), (4096, 4), (4096, 8), (8192, 8)]
_DEFAULT = _CONFIGS[0]
SHARED_LOOP_MIN_N = 1 << 22  # elements: >= 512 blocks even at BLOCK = 8192


def _kernel_configs():
    return [KernelConfig({"BLOCK": b}, num_warps=w, num_stages=1, default=(b, w) == _DEFAULT) for b, w in _CONFIGS]


@triton.jit
def _ema_update_kernel(
    S, U, DECAY,                      # stacked states / update base pointers (or any tensor of the right dtype)
    S_TABLE, U_TABLE,                 # int64 data pointers of list members (unused unless *_FROM_TABLE)
    N, M_PER_PROGRAM,                 # elements per module, modules per program (1, or M with a shared update)
    stride_sm, stride_um,             # element stride between modules of the stacked tensors
    N_BUCKET,                         # autotune key only: the next power of two of N
    S_FROM_TABLE: tl.constexpr, U_FROM_TABLE: tl.constexpr, U_SHARED: tl.constexpr,
    F64: tl.constexpr, BLOCK: tl.constexpr,
):
    # 1-D grid (no 65535 limit on M): consecutive programs stream consecutive blocks of a module.
    n_blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    pid_m = pid // n_blocks
    pid_n = pid % n_blocks
    start = pid_n.to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < N - start
    acc_ty = tl.float64 if F64 else tl.float32
    if U_SHARED:
        u = tl.load(U + start + offs, mask=mask, other=0.0).to(acc_ty)
    for i in range(M_PER_PROGRAM):
        m = pid_m * M_PER_PROGRAM + i
        tau = tl.load(DECAY + m).to(acc_ty)
        if S_FROM_TABLE:
            # The host only tables 16-byte aligned members: say so, or loads are not vectorised.
            s_ptr = tl.multiple_of(tl.load(S_TABLE + m).to(tl.pointer_type(S.dtype.element_ty)), 16)
        else:
            s_ptr = S + m.to(tl.int64) * stride_sm
        s_ptr = s_ptr + start + offs
        if not U_SHARED:
            if U_FROM_TABLE:
                u_ptr = tl.multiple_of(tl.load(U_TABLE + m).to(tl.pointer_type(U.dtype.element_ty)), 16)
            else:
                u_ptr = U + m.to(tl.int64) * stride_um
            u = tl.load(u_ptr + start + offs, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(acc_ty)
        s = tl.load(s_ptr, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_ty)
        s = tau * s + (1.0 - tau) * u
        tl.store(s_ptr, s.to(S.dtype.element_ty), mask=mask)


# Autotuning runs the kernel several times: restore the states it updates in place between runs.
# Only the stacked form can be tuned (the autotuner cannot restore tensors behind a pointer table).
_ema_update_tuned = autotune(_kernel_configs(), key=["N_BUCKET", "S_FROM_TABLE", "U_FROM_TABLE", "U_SHARED", "F64"],
                             restore=["S"])(_ema_update_kernel)


def ema_update(s, u, decay, *, M: int, N: int, stride_sm: int = 0, stride_um: int = 0,
               s_table=None, u_table=None, shared: bool) -> None:
    """Launch the kernel. `s`/`u` are the stacked tensors, or (with a table) any member of the list.

    Strides are in elements between module slices; every module slice must be contiguous.
    """
    from_s, from_u = s_table is not None, u_table is not None
    dummy = decay  # a valid pointer for table arguments the specialisation never reads
    loop_all = shared and N >= SHARED_LOOP_MIN_N
    args = (s, u, decay, s_table if from_s else dummy, u_table if from_u else dummy,
            N, M if loop_all else 1, stride_sm, stride_um, triton.next_power_of_2(N))
    flags = dict(S_FROM_TABLE=from_s, U_FROM_TABLE=from_u, U_SHARED=shared,
                 F64=s.dtype == torch.float64)
    grid_m = 1 if loop_all else M
    if from_s:
        block, warps = _DEFAULT
        _ema_update_kernel[(triton.cdiv(N, block) * grid_m,)](*args, **flags, BLOCK=block,
                                                             num_warps=warps, num_stages=1)
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK"]) * grid_m,)  # noqa: E731
        _ema_update_tuned[grid](*args, **flags)


# --------------------------------------------------------------------------- the op on checked inputs
def _slices_contiguous(x: torch.Tensor) -> bool:
    """Every x[m] is contiguous (the module stride is free)."""
    return x.shape[0] == 0 or x[0].is_contiguous()


_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _pointer_table(tensors: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 data pointers of `tensors` on `device`, cached (optimizers call with the same buffers)."""
    key = (str(device), tuple(t.data_ptr() for t in tensors))
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(key[1], dtype=torch.int64).to(device)
        _TABLES[key] = table
        if len(_TABLES) > 256:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def _tableable(tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Members the kernel can address (contiguous, 16-byte aligned), with (original, copy) pairs."""
    out, copies = [], []
    for t in tensors:
        if t.is_contiguous() and t.data_ptr() % 16 == 0:
            out.append(t)
        else:
            c = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
            out.append(c)
            copies.append((t, c))
    return out, copies


def ema_update_triton(p) -> None:
    """The update of a checked `ops.Plan` in one launch (states written back where a copy ran)."""
    write_back = []
    s_table = None
    if p.s is not None:
        s = p.s
        if not _slices_contiguous(s) or (p.M > 1 and s.stride(0) < p.N):
            s = s.contiguous()
            write_back.append((p.s, s))
        stride_sm = s.stride(0)
    else:
        members, copies = _tableable(p.s_list)
        write_back += copies
        s, stride_sm = members[0], 0
        s_table = _pointer_table(members, p.device)

    u_table = None
    if p.u is not None:
        u = p.u
        if p.shared:
            u, stride_um = u.contiguous(), 0
        else:
            if not _slices_contiguous(u):
                u = u.contiguous()
            stride_um = u.stride(0)
    else:
        members, _ = _tableable(p.u_list)
        u, stride_um = members[0], 0
        u_table = _pointer_table(members, p.device)

    ema_update(s, u, p.tau.contiguous(), M=p.M, N=p.N, stride_sm=stride_sm, stride_um=stride_um,
               s_table=s_table, u_table=u_table, shared=p.shared)
    for orig, work in write_back:
        orig.copy_(work)


# --------------------------------------------------------------------------- AOT compile specs
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=None)
def compile_specs() -> List[KernelSpec]:
    """The EMA kernel in its main specialisations: stacked/shared, stacked/per-module, list."""
    configs = _kernel_configs()
    specs = []
    for name, s_dt, u_dt, table, shared in (
        ("stacked,shared,fp32", torch.float32, torch.float32, False, True),
        ("stacked,per-module,bf16<-fp32", torch.bfloat16, torch.float32, False, False),
        ("list,shared,fp16", torch.float16, torch.float16, True, True),
    ):
        signature = {"S": f"*{_TL[s_dt]}", "U": f"*{_TL[u_dt]}", "DECAY": "*fp32",
                     "S_TABLE": "*i64", "U_TABLE": "*i64", "N": "i32", "M_PER_PROGRAM": "i32",
                     "stride_sm": "i64", "stride_um": "i64", "N_BUCKET": "i32",
                     "S_FROM_TABLE": "constexpr", "U_FROM_TABLE": "constexpr",
                     "U_SHARED": "constexpr", "F64": "constexpr", "BLOCK": "constexpr"}
        constexprs = {"S_FROM_TABLE": table, "U_FROM_TABLE": False, "U_SHARED": shared, "F64": False}
        # The list form always runs the default config (see ema_update): only that one is listed.
        cfgs = [c for c in configs if c.default] if table else configs
        specs.append(KernelSpec(f"ema.update[{name}]", _ema_update_kernel, signature, constexprs, cfgs,
                                divisible_by_16=["N", "stride_sm", "stride_um"]))
    return specs
