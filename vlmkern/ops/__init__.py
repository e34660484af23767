"""Public ops: ``linear`` dispatches a quantized matmul to the best backend.

    y = vlmkern.ops.linear(x, qweight, bias)   # == x @ qweight.dequantize().T + bias

x may have any leading shape; its last dim is in_features. Activations may be
float16, bfloat16 or float32 (float64 runs on the torch reference only).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from ..formats import PackedWeight
from . import compiled, reference
from .backends import (BACKENDS, BackendError, KernelSpec, OP_OF_FORMAT, available_backends,
                       explain, getenv, select)
from .cuda_common import forget_layouts

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BIAS_DTYPES = _ACT_DTYPES
# whether a torch.func transform (vmap, grad, ...) is running, and which
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_transform_stack = getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)


def _refuse_derivative_transforms() -> None:
    """torch.func's derivative transforms do not run through the op: its
    autograd formula serves torch.autograd only (pytorch/pytorch#168393).
    Under jvp / jacfwd torch would even return a zero tangent without a word."""
    kinds = {i.key() for i in _transform_stack() or ()}
    transforms = torch._C._functorch.TransformType
    if transforms.Jvp in kinds or transforms.Grad in kinds:
        raise NotImplementedError(
            "torch.func.grad / vjp / jacrev / jvp / jacfwd / hessian do not run through "
            "vlmkern's quantized layers (the op's autograd formula serves torch.autograd only; "
            "pytorch/pytorch#168393): use torch.autograd.grad or .backward(); "
            "torch.func.vmap works")


def _refuse_forward_ad(x, bias) -> None:
    """torch.autograd.forward_ad: the kernels drop a dual tensor's tangent (the
    output comes back with none), and the op has no forward rule; the torch
    reference alone would give a tangent, one that differs from the op's
    straight-through gradient for integer-activation layers. So no path runs."""
    if getattr(forward_ad, "_current_level", 0) < 0:    # no dual_level is open: nothing to read
        return
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in (x, bias)):
        raise NotImplementedError(
            "forward-mode AD (torch.autograd.forward_ad dual tensors) does not run through "
            "vlmkern's quantized layers: the kernels would drop the tangent; use "
            "torch.autograd.grad or .backward()")


def _check_finite_enabled(device: torch.device) -> bool:
    # On a GPU the check costs a device sync per call, so it is opt-in there;
    # integer kernels propagate NaN/Inf tokens as non-finite rows regardless.
    value = getenv("VLMKERN_CHECK_FINITE")
    if value not in (None, "", "0", "1"):    # "yes" or "true" must not read as off
        raise BackendError(f"VLMKERN_CHECK_FINITE must be 1 (check) or 0, got {value!r}")
    return device.type == "cpu" or value == "1"


def _validate(x, qweight, bias, check_finite: bool = True) -> None:
    # runs on every call of every layer: each check reads as little as it can
    if not isinstance(qweight, PackedWeight):
        raise TypeError(f"qweight must be a vlmkern quantized weight, got {type(qweight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 (or float64, on the torch "
                        f"reference), got {x.dtype}")
    k = qweight.in_features
    shape = x.shape
    if not shape or shape[-1] != k:
        raise ValueError(f"x has shape {tuple(shape)}: its last dim must be in_features={k}")
    device = x.device
    if device != qweight.device:
        raise ValueError(f"x is on {device} but the quantized weight is on {qweight.device}")
    if bias is not None:
        n = qweight.out_features
        if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
            raise ValueError(f"bias must be a tensor of shape ({n},), got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but x is on {device}")
        if bias.dtype not in _BIAS_DTYPES:
            raise TypeError(f"bias must be a float16, bfloat16, float32 or float64 tensor, "
                            f"got {bias.dtype}")
    if check_finite and _check_finite_enabled(device):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x holds NaN or Inf values")
        if bias is not None and not bool(torch.isfinite(bias).all()):
            raise ValueError("bias holds NaN or Inf values")


def linear(x: torch.Tensor, qweight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized linear layer: x [..., K] -> [..., N] in x's dtype.

    Differentiable in x and bias: the gradient is that of x @ W^T + bias
    with W the dequantized weight (integer-activation layers pass it
    straight through their activation rounding). Under torch.compile this
    is one opaque op, ``torch.ops.vlmkern.linear`` (see ``compiled``),
    which runs the same dispatch when the graph runs."""
    if torch.compiler.is_compiling():
        _validate(x, qweight, bias, check_finite=False)   # traced: shape errors at compile time
        return compiled.call(x, qweight, bias)
    _refuse_forward_ad(x, bias)
    if torch.is_grad_enabled() and (getattr(x, "requires_grad", False)
                                    or getattr(bias, "requires_grad", False)) \
            or _functorch_active():
        # The kernels have no backward; the op's autograd formula gives one
        # (a kernel's output alone would silently cut the graph). Under
        # torch.func transforms (vmap, grad) the op's rules apply; the op
        # checks values when it runs on the unwrapped tensors.
        _refuse_derivative_transforms()
        _validate(x, qweight, bias, check_finite=False)
        compiled.hold(qweight)
        return compiled.call(x, qweight, bias)
    return dispatch_linear(x, qweight, bias)


def dispatch_linear(x: torch.Tensor, qweight: PackedWeight,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear`` without autograd: check the inputs, pick a kernel, run it."""
    if not _BACKENDS_LOADED:
        _load_backends()
    _validate(x, qweight, bias)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])   # a 2-D x is not reshaped
    if x2.shape[0] == 0 or qweight.out_features == 0:     # nothing to compute
        return x.new_zeros(*x.shape[:-1], qweight.out_features)
    y = select(OP_OF_FORMAT[qweight.FORMAT], x2, qweight).fn(x2, qweight, bias)
    return y if x2 is x else y.reshape(*x.shape[:-1], y.shape[-1])


_BACKENDS_LOADED = False


def _load_backends() -> None:
    global _BACKENDS_LOADED
    from . import builtin  # noqa: F401  (registers the backends)
    _BACKENDS_LOADED = True


def which_kernel(x: torch.Tensor, qweight: PackedWeight) -> str:
    """Name of the kernel ``linear`` would run for x (or why none fits)."""
    from . import builtin  # noqa: F401

    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0 or qweight.out_features == 0:
        return "none: nothing to compute (no tokens or no outputs; linear returns an empty result)"
    return explain(OP_OF_FORMAT[qweight.FORMAT], x2, qweight)


__all__ = ["linear", "which_kernel", "available_backends", "reference", "BackendError",
           "KernelSpec", "BACKENDS", "forget_layouts"]
