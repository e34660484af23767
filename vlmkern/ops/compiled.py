"""``vlmkern::linear``: ``ops.linear`` as one opaque op for torch.compile.

The dispatch behind ``ops.linear`` is host-side Python that Dynamo should not
trace: environment reads, weak-keyed caches of the kernels' weight layouts,
and the stream queries that choose the stream-K kernels' counters. The last
must run when the kernel is launched: under CUDA-graph capture (``mode=
"reduce-overhead"``) a capture gets counters of its own, and a buffer picked
once at trace time would be shared by every graph and by eager work.

So under torch.compile ``ops.linear`` is one call of this op. Its fake
implementation gives the output's shape and dtype; its real one runs the
eager dispatch at run time on the same weight object, which it finds again
from the weight's first packed tensor (see ``hold``), so the cached kernel
layouts are reused rather than rebuilt on every call.

The op also carries the layers' gradient (``register_autograd``) and a
vmap rule, so an eager forward that autograd records, or that runs under a
torch.func transform, goes through it too: the kernels have no backward of
their own, and the dispatch's checks would see batched tensors.
"""
from __future__ import annotations

import ast
import warnings
import weakref
from typing import List, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..formats import WEIGHT_TYPES, PackedWeight
from .laid_out import LaidOutWeight
from .laid_out_binary import LaidOutBinaryWeight

_TYPES = {cls.__name__: cls
          for cls in (*WEIGHT_TYPES.values(), LaidOutWeight, LaidOutBinaryWeight)}

# first packed tensor -> (weakref to the weight object built over it, its description)
_HELD = WeakIdKeyDictionary()
_WARNED = False


def hold(qweight: PackedWeight) -> None:
    """Let the compiled op find ``qweight`` from its tensors at run time (the
    object stays owned by the caller; a QuantLinear holds its weight)."""
    _HELD[getattr(qweight, type(qweight).TENSORS[0])] = (weakref.ref(qweight), describe(qweight))


def describe(qweight: PackedWeight) -> str:
    """The weight's non-tensor part as a Python literal: the names of its
    present tensors (optional ones may be None) and its metadata."""
    cls = type(qweight)
    return repr((tuple(k for k in cls.TENSORS if getattr(qweight, k) is not None),
                 tuple(getattr(qweight, k) for k in cls.META)))


def call(x: torch.Tensor, qweight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear_op`` on ``qweight`` (the caller has checked the arguments)."""
    cls = type(qweight)
    if cls.__name__ not in _TYPES:
        raise TypeError(f"vlmkern.ops.linear under torch.compile or autograd takes the weight "
                        f"types {sorted(_TYPES)}, got {cls.__name__}")
    tensors = [t for t in (getattr(qweight, k) for k in cls.TENSORS) if t is not None]
    return linear_op(x, tensors, bias, cls.__name__, describe(qweight), qweight.out_features)


def _weight(tensors: list, type_name: str, description: str, warn: bool = True,
            check: bool = True) -> PackedWeight:
    """The weight object over ``tensors``: the one held for them, else a new
    one (with ``check``, validated: that reads values, so the backward, which
    AOT autograd may trace, leaves it to the forward)."""
    cls = _TYPES.get(type_name)
    if cls is None:
        raise ValueError(f"vlmkern::linear: unknown weight type {type_name!r}; the types are "
                         f"{sorted(_TYPES)}")
    if not tensors:
        raise ValueError("vlmkern::linear: no tensors given; it takes the weight's packed tensors")
    ref, held_description = _HELD.get(tensors[0], (None, None))
    held = ref() if ref is not None else None
    # asked on every call of a compiled layer: the description was made once, by hold
    if type(held) is cls and held_description == description:
        own = held.tensors().values()
        if len(own) == len(tensors) and all(a is b for a, b in zip(own, tensors)):
            return held
    if warn:
        _warn_unheld(tensors[0])
    return _rebuild(cls, tensors, description, check)


def _rebuild(cls: type, tensors: list, description: str, check: bool) -> PackedWeight:
    """A weight of ``cls`` over ``tensors`` as ``describe`` described it,
    with ``check`` validated like a loaded one (FormatError, a ValueError)."""
    try:
        names, meta = ast.literal_eval(description)
        names, meta = tuple(names), tuple(meta)
        fits = (len(names) == len(tensors) == len(set(names)) and set(names) <= set(cls.TENSORS)
                and len(meta) == len(cls.META))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        fits = False
    if not fits:
        raise ValueError(f"vlmkern::linear: {description!r} does not describe {len(tensors)} "
                         f"tensors of a {cls.__name__} (see vlmkern.ops.compiled.describe)")
    fields = dict.fromkeys(cls.TENSORS)
    fields.update(zip(names, tensors))
    fields.update(zip(cls.META, meta))
    weight = cls(**fields)
    if check and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        weight.validate()   # reads values (a sync on a GPU): its eager warm-up runs checked it
    return weight


def _warn_unheld(first: torch.Tensor) -> None:
    global _WARNED
    if first.device.type == "cuda" and not _WARNED:
        _WARNED = True
        warnings.warn("vlmkern.ops.linear under torch.compile got a quantized weight that no "
                      "QuantLinear holds: its CUDA kernel layout is rebuilt on every call. "
                      "Compile QuantLinear modules, or call vlmkern.ops.compiled.hold(weight) "
                      "and keep the weight object alive", stacklevel=3)


# typing.List / Optional: the forms the schema inference of older torch releases reads
@torch.library.custom_op("vlmkern::linear", mutates_args=())
def linear_op(x: torch.Tensor, tensors: List[torch.Tensor],  # noqa: UP006
              bias: Optional[torch.Tensor],  # noqa: UP045
              type_name: str, description: str, out_features: int) -> torch.Tensor:
    from . import dispatch_linear  # the package imports this module first (no cycle at import)
    weight = _weight(tensors, type_name, description)
    if weight.out_features != out_features:   # the fake gave the graph that many columns
        raise ValueError(f"vlmkern::linear: out_features={out_features}, but the weight has "
                         f"{weight.out_features} rows")
    return dispatch_linear(x, weight, bias)


@linear_op.register_fake
def _(x, tensors, bias, type_name, description, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, tensors, bias, type_name, description, _ = inputs
    ctx.save_for_backward(*tensors)
    ctx.weight_key = (type_name, description)
    ctx.num_tensors = len(tensors)
    ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    """The gradient of x @ W^T + bias with W the dequantized weight, in the
    precision the torch reference runs the forward in (fp64 on the CPU).
    Integer-activation layers pass it straight through their rounding."""
    x_dtype, bias_dtype = ctx.dtypes
    dt = torch.float64 if grad.device.type == "cpu" else grad.dtype
    grad = grad.to(dt)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = _weight(list(ctx.saved_tensors), *ctx.weight_key, warn=False, check=False)
        grad_x = (grad @ weight.dequantize(dt)).to(x_dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return grad_x, [None] * ctx.num_tensors, grad_bias, None, None, None


linear_op.register_autograd(_backward, setup_context=_setup_context)


@linear_op.register_vmap
def _vmap(info, in_dims, x, tensors, bias, type_name, description, out_features):
    """torch.vmap over x: the vmapped dim is one more leading dim of x."""
    x_dim, tensor_dims, bias_dim = in_dims[:3]
    if bias_dim is not None or any(d is not None for d in tensor_dims or ()):
        raise NotImplementedError("torch.vmap over vlmkern.ops.linear maps over x only, not over "
                                  "the quantized weight's tensors or the bias")
    if x_dim is None:
        return linear_op(x, tensors, bias, type_name, description, out_features), None
    return linear_op(x.movedim(x_dim, 0), tensors, bias, type_name, description, out_features), 0
