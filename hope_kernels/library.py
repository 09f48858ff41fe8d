"""Registration of the ops with `torch.library`, so that `torch.compile` sees each one as one opaque node.

Every public op (`linear_attention`, `cms_scan`, ...) keeps its Python signature: it checks its
arguments (shapes, dtypes, devices; value checks only where they cost no host sync, see
`utils.skip_host_checks`), normalises them (a pair of states becomes two tensors, None an optional
tensor, scalars floats/ints/bools/strings) and calls its registered op `hope_kernels::<name>`,
whose implementation dispatches to the Triton or the torch path by its `backend` string.

    op(name, mutates_args=...)       -> torch.library.custom_op("hope_kernels::<name>"), name in registry.OPS
    op(name, differentiable=(...))   -> also "hope_kernels::<name>_backward" and the autograd formula

The backward of a differentiable op is a second registered op, opaque to the compiler too; only
the op's inputs are saved for it. On the Triton path it runs the kernels' own backward (whose
`autograd.Function`s save nothing but the inputs either: they recompute chunk states). Elsewhere
(the torch path) it rebuilds the forward's graph on the saved inputs and takes its
vector-Jacobian product, at the cost of one more forward of the op inside its backward:

    (d inputs) = vjp(forward_impl at the saved inputs)(d outputs)

An op may return None for an absent output (a final state that was not asked for); the registered
op returns an empty tensor there (custom ops return tensors), and the caller reads it back as None.
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional, Sequence

import torch

from .registry import OPS

NAMESPACE = "hope_kernels"


def absent(x: torch.Tensor) -> torch.Tensor:
    """The placeholder of an absent output: an empty tensor on x's device."""
    return x.new_empty(0)


def present(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An output of a registered op read back: None where it was absent."""
    return None if x is None or (x.dim() == 1 and x.shape[0] == 0) else x


def _first_tensor(args) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("a registered op needs a tensor argument")


def _outputs(out, args, fresh: bool):
    """None -> an empty tensor; with `fresh` (real outputs), every output contiguous, and one that shares
    memory with an input copied (a custom op's outputs may not alias its inputs)."""
    if out is None:
        return out
    single = isinstance(out, torch.Tensor)
    outs = (out,) if single else tuple(out)
    ref = _first_tensor(args)
    if fresh:
        storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor) and a.numel()}
    fixed = []
    for o in outs:
        if o is None:
            o = absent(ref)
        elif fresh and o.numel() and o.untyped_storage().data_ptr() in storages:
            o = o.clone(memory_format=torch.contiguous_format)
        elif fresh:
            o = o.contiguous()   # the fake implementations promise contiguous outputs
        fixed.append(o)
    return fixed[0] if single else tuple(fixed)


def op(name: str, *, mutates_args: Sequence[str] = (), differentiable: Sequence[str] = (),
       backward: Optional[Callable] = None) -> Callable:
    """Decorator: register the typed implementation `fn` as `hope_kernels::<name>`; returns the op.

    `differentiable` names the tensor arguments that get gradients; with it the op gains the
    backward op and autograd formula described in the module docstring. `backward(grads, needs,
    *args)`, where given, is tried first: the gradients of the differentiable arguments (None
    where not needed), computed from the inputs alone (a Triton path's own backward kernels), or
    None to fall back to the vjp of the forward. Register the fake (meta) implementation with
    `fake(the_op)`.
    """
    if name not in OPS:
        raise ValueError(f"op {name!r} is not a public op of hope_kernels.registry.OPS")

    def register(fn):
        @functools.wraps(fn)
        def impl(*args, **kwargs):
            return _outputs(fn(*args, **kwargs), args, fresh=True)

        schema = torch.library.infer_schema(fn, mutates_args=tuple(mutates_args))  # fn's annotations
        registered = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=tuple(mutates_args),
                                             schema=schema)
        if differentiable:
            _register_autograd(registered, fn, name, tuple(differentiable), backward)
            return _EagerTorchAutograd(registered, fn)
        return registered
    return register


class _EagerTorchAutograd:
    """A differentiable registered op, called as the op itself except in one case: in eager mode, on
    the torch path, with a gradient wanted, the torch implementation runs under plain autograd, which
    keeps its chunked intermediates for the backward instead of re-running the forward inside it
    (the registered backward's vjp). Compiled graphs, the Triton path and inference call the op."""

    def __init__(self, registered, fn):
        self.registered, self.fn = registered, fn

    def __call__(self, *args):
        if (args[-1] == "torch" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return self.fn(*args)
        return self.registered(*args)

    def __getattr__(self, name):
        return getattr(self.registered, name)


def fake(registered) -> Callable:
    """Decorator: the fake (meta) implementation of `registered`: output shapes and dtypes only.

    Like the implementation, it may return None for an absent output."""
    def register(fn):
        @functools.wraps(fn)
        def impl(*args, **kwargs):
            return _outputs(fn(*args, **kwargs), args, fresh=False)
        registered.register_fake(impl)
        return fn
    return register


class _autograd_enabled:
    """Inside a registered op's implementation the autograd dispatch keys are excluded; the backward
    op records the forward's graph, so it lifts that exclusion, and only that (the autocast keys stay
    excluded), and turns grad mode on."""

    def __enter__(self):
        exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality) \
            .remove(torch._C.DispatchKey.AutogradOther).remove(torch._C.DispatchKey.AutogradNestedTensor)
        self._guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._grad = torch.enable_grad()
        self._guard.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._guard.__exit__(*exc)


def _register_autograd(registered, fn: Callable, name: str, differentiable: tuple, direct: Optional[Callable]) -> None:
    schema = registered._opoverload._schema
    names = [a.name for a in schema.arguments]
    missing = [n for n in differentiable if n not in names]
    if missing:
        raise ValueError(f"{name}: differentiable arguments {missing} are not arguments of the op")
    diff_pos = [names.index(n) for n in differentiable]
    args_text = str(schema).split("(", 1)[1].rsplit(") ->", 1)[0]
    bwd_schema = f"(Tensor?[] grads, bool[] needs, {args_text}) -> Tensor[]"

    def backward_impl(grads, needs, *args):
        device = _first_tensor(args).device
        if direct is not None:
            with torch.autocast(device.type, enabled=False):
                gs = direct(grads, needs, *args)
            if gs is not None:
                return [_grad_like(args[p], g, device) for p, g in zip(diff_pos, gs)]
        args = list(args)
        leaves = {}
        for p, need in zip(diff_pos, needs):
            if need and args[p] is not None:
                args[p] = leaves[p] = args[p].detach().requires_grad_()
        with _autograd_enabled(), torch.autocast(device.type, enabled=False):
            outs = fn(*args)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if o is not None and g is not None and o.requires_grad]
        got = {}
        if pairs and leaves:
            with _autograd_enabled():
                gs = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), [g for _, g in pairs],
                                         allow_unused=True)
            got = dict(zip(leaves, gs))
        return [_grad_like(args[p], got.get(p), device) for p in diff_pos]

    def backward_fake(grads, needs, *args):
        device = _first_tensor(args).device
        return [_grad_like(args[p], None, device) for p in diff_pos]

    backward = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", backward_impl, mutates_args=(),
                                       schema=bwd_schema)
    backward.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in tensor_pos))
        ctx.tensor_pos = tensor_pos
        ctx.others = [None if i in tensor_pos else a for i, a in enumerate(inputs)]

    def autograd_backward(ctx, *grads):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            args[i] = t
        needs = [bool(ctx.needs_input_grad[p]) and args[p] is not None for p in diff_pos]
        out = [None] * len(args)
        if any(needs):
            gs = backward(list(grads), needs, *args)
            for p, need, g in zip(diff_pos, needs, gs):
                out[p] = g if need else None
        return tuple(out)

    registered.register_autograd(autograd_backward, setup_context=setup_context)


def _grad_like(x: Optional[torch.Tensor], g: Optional[torch.Tensor], device) -> torch.Tensor:
    """The gradient slot of input x: g, zeros like x where x got none, an empty tensor for a None x."""
    if x is None:
        return torch.empty(0, device=device)
    if g is None:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return g.to(x.dtype).contiguous()


def function_backward(function, saved: tuple, needs: Sequence[bool], grads: Sequence, **attrs) -> tuple:
    """`function.backward` (an autograd.Function that saves only its inputs) run outside autograd:
    `saved` stands for ctx.saved_tensors, `needs` for ctx.needs_input_grad, `attrs` for what its
    forward stores on ctx. Absent outputs' gradients (empty tensors) are passed as None."""
    needs = tuple(needs) + (False,) * (len(saved) - len(needs))
    ctx = types.SimpleNamespace(saved_tensors=saved, needs_input_grad=needs, **attrs)
    return function.backward(ctx, *(None if g is None else present(g) for g in grads))
