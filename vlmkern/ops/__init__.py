"""Public ops: ``linear`` dispatches a quantized matmul to the best backend.

    y = vlmkern.ops.linear(x, qweight, bias)   # == x @ qweight.dequantize().T + bias

x may have any leading shape; its last dim is in_features. Activations may be
float16, bfloat16 or float32 (float64 runs on the torch reference only).
"""
from __future__ import annotations

import os

import torch

from ..formats import PackedWeight
from . import reference
from .backends import (BACKENDS, BackendError, KernelSpec, OP_OF_FORMAT, available_backends,
                       explain, select)

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_finite_enabled(x: torch.Tensor) -> bool:
    # On a GPU the check costs a device sync per call, so it is opt-in there;
    # integer kernels propagate NaN/Inf tokens as non-finite rows regardless.
    return x.device.type == "cpu" or os.environ.get("VLMKERN_CHECK_FINITE") == "1"


def _validate(x, qweight, bias) -> None:
    if not isinstance(qweight, PackedWeight):
        raise TypeError(f"qweight must be a vlmkern quantized weight, got {type(qweight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    n, k = qweight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dim must be in_features={k}")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {qweight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be a tensor of shape ({n},), got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if _check_finite_enabled(x) and not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf values")


def linear(x: torch.Tensor, qweight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized linear layer: x [..., K] -> [..., N] in x's dtype."""
    from . import builtin  # noqa: F401  (registers backends on first call)

    _validate(x, qweight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, qweight.out_features)
    spec = select(OP_OF_FORMAT[qweight.FORMAT], x2, qweight)
    return spec.fn(x2, qweight, bias).reshape(*lead, qweight.out_features)


def which_kernel(x: torch.Tensor, qweight: PackedWeight) -> str:
    """Name of the kernel ``linear`` would run for x (or why none fits)."""
    from . import builtin  # noqa: F401

    x2 = x.reshape(-1, x.shape[-1])
    return explain(OP_OF_FORMAT[qweight.FORMAT], x2, qweight)


__all__ = ["linear", "which_kernel", "available_backends", "reference", "BackendError",
           "KernelSpec", "BACKENDS"]
