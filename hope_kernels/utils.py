"""Things every op shares: backend choice, the autotune switch, input checks, contiguity, autocast.

Nothing here knows about a particular op; each op composes these helpers so that
errors read the same everywhere and the backend rules of DESIGN.md live in one place.
Every public entry point reads the same way (DESIGN.md, "Layout and house conventions"):

    checks (check_*, require)  ->  backend, dtype, inputs = prepare(...)
                               ->  with op_context(device): the registered op (its backend dispatch)
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from typing import Optional, Sequence

import torch

BACKENDS = ("triton", "torch")
BACKEND_ENV = "HOPE_KERNELS_BACKEND"
AUTOTUNE_ENV = "HOPE_KERNELS_AUTOTUNE"  # "0" pins every kernel to its default config
DEBUG_ENV = "HOPE_KERNELS_DEBUG"        # "1": check tensor values on GPUs too (a host sync per check)


# --------------------------------------------------------------------------- backends
@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on `device`, or None when it can."""
    if not triton_installed():
        return "the `triton` package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return ("tensors are on the CPU and TRITON_INTERPRET=1 is not set "
                "(Triton runs on CUDA devices, or on the CPU through its interpreter)")
    return f"Triton kernels do not run on device type {device.type!r}"


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Map the user's `backend=` (None, "triton" or "torch") to the backend that will run.

    None picks "triton" where it can run and "torch" elsewhere; the environment variable
    HOPE_KERNELS_BACKEND overrides that default (but never an explicit argument).
    """
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r}: expected one of {BACKENDS}")
        if backend is None:
            return "triton" if triton_unavailable_reason(device) is None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected None or one of {BACKENDS}")
    if backend == "triton":
        why = triton_unavailable_reason(device)
        if why is not None:
            raise RuntimeError(f"backend='triton' cannot run: {why}")
    return backend


def route_float64(requested: Optional[str], backend: str, dtype: torch.dtype) -> str:
    """float64 (references, gradchecks) runs the exact torch path: backend=None (or the environment
    default) routes it there; an explicit backend="triton" is a TypeError (kernels compute in float32)."""
    if dtype != torch.float64:
        return backend
    if requested == "triton":
        raise TypeError("backend='triton' takes float32, float16 or bfloat16 inputs, got float64 "
                        "(backend=None or 'torch' runs float64 on the exact PyTorch path)")
    return "torch"


def autotune_enabled() -> bool:
    """Autotune only on a real GPU: the interpreter has no driver to time configs with."""
    return not interpreter_enabled() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def autotune_configs(configs: Sequence, default):
    """The configs to hand to `triton.autotune`: all of them on GPU, only `default` otherwise."""
    return list(configs) if autotune_enabled() else [default]


# --------------------------------------------------------------------------- input checks
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, ndim: Optional[int] = None, *, floating: bool = True,
                 shape: Optional[Sequence[Optional[int]]] = None, layout: str = "") -> torch.Tensor:
    """Raise a clear TypeError/ValueError unless `t` is a tensor of the expected rank, dtype and shape.

    `shape` may hold None for free dimensions; `layout` (e.g. "[B, T, H, K]") is quoted in errors.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = f" {layout}" if layout else ""
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{want}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {t.dtype}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            dims = ["*" if s is None else str(s) for s in shape]
            exp = f"({dims[0]},)" if len(dims) == 1 else "(" + ", ".join(dims) + ")"
            raise ValueError(f"{name} must have shape {exp}{want}, got {tuple(t.shape)}")
    return t


def check_same_device(**tensors) -> torch.device:
    """All given (non-None) tensors must live on one device; returns it."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    for n, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{n} is on {t.device} but {named[0][0]} is on {device}: "
                             "all inputs must be on the same device")
    return device


def check_qkv(q, k, v, lead: str):
    """q, k: [*lead, K] and v: [*lead, V] on one device, `lead` naming the leading dims ("B, T, H" for
    a scan, "B, H" for a step). Returns (q.shape, V, device)."""
    ndim = lead.count(",") + 2
    check_tensor("q", q, ndim, layout=f"[{lead}, K]")
    if q.shape[-1] == 0:
        raise ValueError(f"q and k must have a head dimension K >= 1 [{lead}, K], got shape {tuple(q.shape)}")
    check_tensor("k", k, ndim, shape=tuple(q.shape), layout=f"[{lead}, K] like q")
    check_tensor("v", v, ndim, shape=tuple(q.shape[:-1]) + (None,), layout=f"[{lead}, V] like q")
    return tuple(q.shape), v.shape[-1], check_same_device(q=q, k=k, v=v)


def check_same_dtype(**tensors) -> torch.dtype:
    """q, k, v (after autocast) must share one dtype; returns it. No silent promotion."""
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"{', '.join(dtypes)} must share one dtype, got {got}")
    return next(iter(dtypes.values()))


def check_cu_seqlens(cu_seqlens, batch: int, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
    """Validate packed-sequence offsets: 1-D int32/int64 starting at 0, non-decreasing, ending at T, B == 1.

    Returns the offsets as int64 on `device` (or None when not given).
    """
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32/int64, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into one batch row: inputs must have B == 1, got B = {batch}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if not _capturing():
        host = cu_seqlens.tolist()
        if host[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {host[0]}")
        if host[-1] != seq_len:
            raise ValueError(f"cu_seqlens must end at T = {seq_len}, got {host[-1]}")
        if any(b < a for a, b in zip(host, host[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
    return cu_seqlens.to(torch.int64)


def _capturing() -> bool:
    """True while tracing for torch.compile or capturing a CUDA graph: no host syncs allowed then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def skip_host_checks(device: Optional[torch.device] = None) -> bool:
    """True where a check of tensor *values* (gate ranges) would cost a device-to-host sync.

    Value checks are free on CPU tensors and run there; on other devices they run only with
    HOPE_KERNELS_DEBUG=1; never while compiling or capturing a CUDA graph (DESIGN.md, Errors)."""
    if _capturing():
        return True
    if device is None or torch.device(device).type == "cpu":
        return False
    return os.environ.get(DEBUG_ENV, "0") != "1"


def require(name: str, value, expected: str):
    """`value` itself, or a ValueError naming `name` and what was `expected` when it is None
    (a state a step op updates in place, an initial state an op cannot start without)."""
    if value is None:
        raise ValueError(f"{name} must be given: {expected}")
    return value


def check_state(name: str, state, shape: Sequence[int], device: torch.device, layout: str) -> Optional[torch.Tensor]:
    """A recurrent state must be a floating tensor of exactly `shape` on `device`."""
    if state is None:
        return None
    check_tensor(name, state, len(shape), shape=shape, layout=layout)
    if state.device != device:
        raise ValueError(f"{name} is on {state.device} but the inputs are on {device}")
    return state


def check_state_dtype(name: str, *states) -> None:
    """A state updated in place (the step ops) must already be float32 (float64 for references)."""
    for s in states:
        if s is not None and s.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 (recurrent states are float32 and updated in place), "
                            f"got {s.dtype}")


def check_chunk_size(chunk_size) -> int:
    """Tokens per chunk: a power of two >= 16 (the Triton tiles are chunk x head-dim, tl.dot needs >= 16)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return chunk_size


def resolve_scale(scale, head_dim: int) -> float:
    """`scale` as a finite float; None means head_dim ** -0.5."""
    if scale is None:
        if head_dim <= 0:
            raise ValueError(f"scale=None needs a head dimension K >= 1, got K = {head_dim}")
        return head_dim ** -0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return float(scale)


# --------------------------------------------------------------------------- tensors
def contiguous(*tensors):
    """`.contiguous()` on every tensor, None passes through (one place for the layout rule)."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def prepare(backend: Optional[str], device: torch.device, inputs: dict, *, cast: Sequence = (),
            state: Optional[torch.Tensor] = None):
    """The preamble every entry point shares, after its checks: (backend, dtype, tensors).

    - backend: `resolve_backend(backend, device)`, then float64 routed to the torch path
      (`route_float64`; a float64 `state` counts as float64 input);
    - tensors: `inputs` (name -> tensor) followed by `cast` (optional tensors), each floating one
      cast to the autocast dtype when autocast is on for `device` (`autocast_inputs`);
    - dtype: the one dtype the autocast `inputs` share (a TypeError naming them otherwise).
    Gates, decays and states are never passed here: tau = 0.9999 rounds to 1 in half precision.
    """
    resolved = resolve_backend(backend, device)
    names = list(inputs)
    tensors = autocast_inputs(device, *inputs.values(), *cast)
    dtype = check_same_dtype(**dict(zip(names, tensors[:len(names)]))) if names else None
    route = torch.float64 if state is not None and state.dtype == torch.float64 else dtype
    return route_float64(backend, resolved, route), dtype, tensors


def op_context(device: torch.device):
    """Where a registered op runs: autocast off (its inputs were cast by `prepare`, states stay float32).
    A plain `torch.autocast`, so torch.compile traces it; the in-place step ops add `torch.no_grad()`."""
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def contiguous_states(*states):
    """Contiguous working copies of states a kernel updates in place (None passes through); on exit
    every copy is written back into its state. The one rule for strided states on every backend."""
    work = contiguous(*states)
    yield work
    for s, w in zip(states, work):
        if w is not s:
            s.copy_(w)


def autocast_inputs(device: torch.device, *tensors):
    """Cast floating inputs to the autocast dtype when autocast is active on `device`.

    The ops then run with autocast off: states stay float32 and kernels see one dtype.
    """
    dev = device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent states are float32 (float64 stays float64, for references and gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segments(T: int, batch: int, cu_seqlens):
    """(batch_row, start, end) of every sequence: one per batch row, or one per cu_seqlens entry."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(batch)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
