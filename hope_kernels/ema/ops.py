"""`ema_update_`: fused multi-timescale exponential moving average of tensors, in place.

    states[m] <- tau_m * states[m] + (1 - tau_m) * update[m or shared],   m = 0 .. M-1

Used for CMS memory buffers that consolidate across batches and for multi-timescale momentum
buffers in the optimizers. The op is not differentiable: it updates buffers as under
`torch.no_grad()` (and bumps their autograd version counters, so a graph that saved them
notices the change).

Forms accepted:
- states: one tensor `[M, *shape]` (any strides; on the Triton path slices that are not contiguous
  go through a contiguous copy that is written back) or a list/tuple of M tensors of one shape and dtype.
  A list whose members are evenly spaced views of one buffer (e.g. `buf.unbind(0)`) runs as
  that buffer; any other list runs through a device table of data pointers, still one launch.
- update: `[*shape]` (shared by all modules) or `[M, *shape]` or a list of M `[*shape]` tensors.
- decay: `[M]` tau values in [0, 1], a tensor (any floating dtype) or a sequence of floats.
  tau = 1 leaves a module unchanged (frozen), tau = 0 replaces it by the update; both are
  sound EMAs (unlike `cms_scan`, nothing here takes log(tau)), so the closed interval is
  allowed. Values outside [0, 1] (or NaN) raise ValueError. A CPU decay tensor is checked on
  every call; a GPU one costs one host sync, once per tensor until its version counter moves
  (any in-place change through autograd-visible ops; writes through `.data` or a NumPy alias
  are not seen there), and the check is skipped while compiling / capturing a CUDA graph.

dtypes: states float32 / float16 / bfloat16 (float64 too), update any floating dtype; the
math is float32 (float64 for float64 states) and the result is rounded once to the state dtype.
The update must not overlap the states.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import library, utils
from ..utils import check_same_device, check_tensor, skip_host_checks
from .torch_chunked import ema_update_torch

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]
_STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def ema_update_(states: Tensors, update: Tensors, decay, *, backend: Optional[str] = None) -> Tensors:
    """states[m] = tau_m * states[m] + (1 - tau_m) * update[m or shared], in place, for every m.

    states: [M, *shape] or a list of M tensors of `shape`; update: [*shape], [M, *shape] or a
    list of M tensors; decay: [M] with values in [0, 1]. Returns `states` (the same object).
    """
    p = plan(states, update, decay)
    if p.M == 0 or p.N == 0:
        return states
    backend, _, _ = utils.prepare(backend, p.device, {})
    as_list = lambda x: list(x) if isinstance(x, (list, tuple)) else [x]  # noqa: E731
    with torch.no_grad(), utils.op_context(p.device):
        _ema_update(as_list(states), as_list(update), p.tau, isinstance(states, (list, tuple)),
                    isinstance(update, (list, tuple)), backend)
    return states


@library.op("ema_update_", mutates_args=("states",))
def _ema_update(states: List[torch.Tensor], update: List[torch.Tensor], decay: torch.Tensor, states_is_list: bool,
                update_is_list: bool, backend: str) -> None:
    """The update on `backend`; `states` / `update` hold the one tensor of the tensor forms."""
    p = plan(states if states_is_list else states[0], update if update_is_list else update[0], decay)
    if backend == "torch":
        ema_update_torch(p)
    else:
        from .triton_kernels import ema_update_triton
        ema_update_triton(p)


@library.fake(_ema_update)
def _ema_update_fake(states, update, decay, states_is_list, update_is_list, backend):
    return None


# --------------------------------------------------------------------------- input checks
@dataclass
class Plan:
    """The checked inputs of one update, in the forms both paths read."""

    s: Optional[torch.Tensor]          # stacked states [M, *shape] (possibly a view of a list)
    s_list: Optional[List[torch.Tensor]]
    u: Optional[torch.Tensor]          # [*shape] when shared, else [M, *shape]
    u_list: Optional[List[torch.Tensor]]
    shared: bool
    tau: torch.Tensor                  # [M] on the states' device
    M: int
    shape: Tuple[int, ...]
    N: int
    device: torch.device

    def state_tensors(self) -> List[torch.Tensor]:
        return [self.s] if self.s is not None else self.s_list


def plan(states, update, decay) -> Plan:
    if isinstance(states, torch.Tensor):
        check_tensor("states", states, layout="[M, *shape]")
        if states.dim() == 0:
            raise ValueError("states must have shape [M, *shape] (at least 1 dimension), got a 0-d tensor")
        s, s_list = states, None
        M, shape, dtype = states.shape[0], tuple(states.shape[1:]), states.dtype
    elif isinstance(states, (list, tuple)):
        s_list = _check_list("states", states, None)
        M = len(s_list)
        shape, dtype = (tuple(s_list[0].shape), s_list[0].dtype) if M else ((), torch.float32)
        if len({t.data_ptr() for t in s_list}) < M:
            raise ValueError("states lists the same tensor more than once: each module must be its own buffer")
        s = _as_stack(s_list)
    else:
        raise TypeError(f"states must be a tensor [M, *shape] or a list of M tensors, got {type(states).__name__}")
    if dtype not in _STATE_DTYPES:
        raise TypeError(f"states must be float32, float16 or bfloat16, got {dtype}")
    first = s if s is not None else (s_list[0] if s_list else None)
    device = first.device if first is not None else torch.device("cpu")

    u_list = None
    if isinstance(update, torch.Tensor):
        check_tensor("update", update)
        if tuple(update.shape) == shape:
            u, shared = update, True
        elif tuple(update.shape) == (M, *shape):
            u, shared = update, False
        else:
            raise ValueError(f"update must have shape {shape} (shared) or {(M, *shape)} (one per module) "
                             f"to match states [M={M}, *shape={shape}], got {tuple(update.shape)}")
    elif isinstance(update, (list, tuple)):
        if len(update) != M:
            raise ValueError(f"update is a list of {len(update)} tensors but there are M = {M} states")
        u_list = _check_list("update", update, shape)
        u, shared = _as_stack(u_list), False
    else:
        raise TypeError(f"update must be a tensor or a list of M tensors, got {type(update).__name__}")

    tau = _check_decay(decay, M, device, dtype)
    if first is not None:
        others = {"update": u if u is not None else (u_list[0] if u_list else None), "decay": tau}
        if s_list:
            others.update({f"states[{i}]": t for i, t in enumerate(s_list)})
        if u_list:
            others.update({f"update[{i}]": t for i, t in enumerate(u_list)})
        check_same_device(states=first, **others)
    if s is not None and any(st == 0 and n > 1 for st, n in zip(s.stride(), s.shape)):
        raise ValueError("states has overlapping memory (a stride of 0, e.g. from expand): "
                         "an in-place update would write one element several times")
    N = 1
    for d in shape:
        N *= d
    return Plan(s, s_list, u, u_list, shared, tau, M, shape, N, device)


def _check_list(name: str, tensors, shape) -> List[torch.Tensor]:
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        check_tensor(f"{name}[{i}]", t)
        want = shape if shape is not None else tuple(tensors[0].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but {name} must all have shape {want}")
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"{name}[{i}] is {t.dtype} but {name}[0] is {tensors[0].dtype}: "
                            f"the tensors of {name} must share one dtype")
    return tensors


def _check_decay(decay, M: int, device: torch.device, state_dt: torch.dtype) -> torch.Tensor:
    if isinstance(decay, torch.Tensor):
        check_tensor("decay", decay, 1, shape=(M,), layout="[M]")
        if not skip_host_checks(decay.device) and not _already_checked(decay):
            bad = ~((decay >= 0) & (decay <= 1))
            if bool(bad.any()):
                raise ValueError(f"decay values must lie in [0, 1], got {decay[bad].tolist()[:4]} "
                                 f"at indices {bad.nonzero().flatten().tolist()[:4]}")
            _remember_checked(decay)
        return decay
    if isinstance(decay, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               for x in decay):
        if len(decay) != M:
            raise ValueError(f"decay must hold M = {M} values (one per module), got {len(decay)}")
        bad = [x for x in decay if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"decay values must lie in [0, 1], got {bad[:4]}")
        return torch.tensor(decay, dtype=torch.float64 if state_dt == torch.float64 else torch.float32,
                            device=device)
    raise TypeError(f"decay must be a floating tensor [M] or a sequence of M floats, got {type(decay).__name__}")


# Decay tensors already range-checked, by identity and autograd version: an optimizer that calls
# ema_update_ once per parameter with one decay tensor pays the host sync once, not per call.
_CHECKED: "OrderedDict[int, Tuple[weakref.ref, int]]" = OrderedDict()


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _already_checked(decay: torch.Tensor) -> bool:
    if decay.device.type == "cpu":  # nothing to save on the CPU: check every time
        return False
    entry = _CHECKED.get(id(decay))
    if entry is None or entry[0]() is not decay:
        return False
    version = _version(decay)
    return version is not None and version == entry[1]


def _remember_checked(decay: torch.Tensor) -> None:
    version = _version(decay)
    if version is None:
        return
    _CHECKED[id(decay)] = (weakref.ref(decay), version)
    if len(_CHECKED) > 64:
        _CHECKED.popitem(last=False)


def _as_stack(tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """A [M, *shape] view over list members that are evenly spaced contiguous slices of one buffer."""
    if not tensors or not all(t.is_contiguous() for t in tensors):
        return None
    t0 = tensors[0]
    if len(tensors) == 1:
        return t0.unsqueeze(0)
    size = t0.element_size()
    base = t0.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != base for t in tensors):
        return None
    step_bytes = tensors[1].data_ptr() - t0.data_ptr()
    if step_bytes <= 0 or step_bytes % size or step_bytes // size < t0.numel():
        return None
    if any(t.data_ptr() - t0.data_ptr() != i * step_bytes for i, t in enumerate(tensors)):
        return None
    return t0.as_strided((len(tensors), *t0.shape), (step_bytes // size, *t0.stride()), t0.storage_offset())
