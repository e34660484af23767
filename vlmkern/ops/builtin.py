"""The three backends and their kernels. Imported lazily by the dispatcher."""
from __future__ import annotations

import os
import warnings

import torch

from . import (
    cuda_binary,
    cuda_binary_lut,
    cuda_int_act,
    cuda_weight_only,
    cuda_weight_only_sm90,
    reference,
)
from .backends import Backend, KernelSpec, register_backend

# -- torch: the reference, runs everything everywhere -------------------------
TORCH = register_backend(Backend("torch", probe=lambda: None))
TORCH.register(KernelSpec("torch.weight_only", "weight_only", reference.weight_only_matmul,
                          laid_out=True))
TORCH.register(KernelSpec("torch.int_act", "int_act", reference.int_act_matmul))
TORCH.register(KernelSpec("torch.binary", "binary", reference.binary_matmul, laid_out=True))


# -- triton: kernels live in vlmkern.triton_kernels and register themselves ---
def _probe_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"
    try:
        import vlmkern.triton_kernels as tk
    except ModuleNotFoundError as e:
        if e.name != "vlmkern.triton_kernels":
            raise
        from ..ext import source_checkout_hint
        return f"vlmkern.triton_kernels is not installed{source_checkout_hint()}"
    register = getattr(tk, "register_kernels", None)
    if register is not None:
        register(TRITON)
    if not torch.cuda.is_available():
        # Triton picks interpreter or compiler when it decorates a kernel,
        # so kernels imported before TRITON_INTERPRET=1 was set cannot run.
        from triton.runtime.interpreter import InterpretedFunction

        from vlmkern.triton_kernels import binary, int_act, int_act_tma, weight_only
        kernels = (weight_only._wo_gemm_kernel, int_act._int_act_kernel,
                   int_act_tma._int_act_tma_kernel, binary._binary_kernel)
        if not all(isinstance(k, InterpretedFunction) for k in kernels):
            return ("the Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                    "set it before they are imported (in a new process)")
    return None


TRITON = register_backend(Backend("triton", probe=_probe_triton))


# -- cuda: the compiled extension vlmkern._C ----------------------------------
def _probe_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    from ..ext import load_extension
    module, reason = load_extension()
    return None if module is not None else reason


def _cuda_dequant_matmul(x, qweight, bias):
    """Dequantize with the CUDA kernel, then one cuBLAS GEMM (prefill-sized M).
    The fast dequantize kernel runs where it applies (bits 2/3/4/8, K a
    multiple of 8, power-of-two groups >= 8 or one per row), the general one
    elsewhere; both give the same bits. On an H100 the fast one made the whole
    layer 1.06-1.26x faster at M = 4096 (benchmarks/results/promote_H100.md)."""
    if getattr(qweight, "LAID_OUT", False):
        warnings.warn("a weight held in the CUDA kernel layout is dequantized with torch "
                      "operations on every call the tensor-core kernel declines (M > 64), which "
                      "is slow; VLMKERN_ENABLE=cuda.dequant_layout_cublas dequantizes it with a "
                      "CUDA kernel instead", stacklevel=4)
        return reference.stored_order_linear(x, qweight.dequantize_stored(x.dtype), qweight.perm,
                                             bias)
    from ..ext import dequant_groupwise
    # the format lets a weight's tensors be strided; the kernel reads dense rows
    qzeros = qweight.qzeros.contiguous() if qweight.qzeros is not None else None
    w = dequant_groupwise(qweight.qweight.contiguous(), qzeros, qweight.scales.contiguous(),
                          qweight.bits, qweight.group_size or qweight.in_features,
                          qweight.in_features, x.dtype, fast=True)
    return reference.stored_order_linear(x, w, qweight.perm, bias)


def _cuda_dequant_layout_matmul(x, qweight, bias):
    """A weight held in the kernel layout: dequantized from it, then cuBLAS."""
    from .cuda_weight_only_dequant import dequantize_layout
    w = dequantize_layout(cuda_weight_only.kernel_weight(qweight, x.dtype))
    return reference.stored_order_linear(x, w, qweight.perm, bias)


def _only_laid_out(x, qweight) -> str | None:
    if not getattr(qweight, "LAID_OUT", False):
        return "cuda.dequant_layout_cublas: only for weights held in the CUDA kernel layout"
    return None


# Picked first on a GPU: its kernels pass the GPU tests on H100 and H200 and
# measured faster than the Triton kernels at the sizes timed
# (benchmarks/results/linear_*.md), except Hopper integer-activation prefill,
# which cuda.int_act leaves to triton.int_act.
CUDA = register_backend(Backend("cuda", probe=_probe_cuda))
_DEQUANT = {"dtypes": frozenset({torch.float16, torch.bfloat16}),
            "devices": frozenset({"cuda"}), "min_sm": (8, 0)}
# Weights held only in the kernel layout (vlmkern.to_kernel_layout): dequantized
# from the layout, opt-in until its GPU tests pass; without it
# cuda.dequant_cublas dequantizes them with torch operations on every call.
CUDA.register(KernelSpec("cuda.dequant_layout_cublas", "weight_only", _cuda_dequant_layout_matmul,
                         opt_in=True, laid_out=True, check=_only_laid_out, **_DEQUANT))
CUDA.register(KernelSpec("cuda.dequant_cublas", "weight_only", _cuda_dequant_matmul,
                         laid_out=True, **_DEQUANT))

# Tensor-core weight-only kernel for M <= 64 (csrc/weight_only_kernel.cu); tried
# before dequantize + cuBLAS, which keeps larger M and what it declines. The
# Hopper kernels for M >= 17 (csrc/weight_only_sm90*_kernel.cu) go first, opt-in.
cuda_weight_only.register(CUDA)
cuda_weight_only_sm90.register(CUDA)

# Integer-activation GEMM (csrc/int_act_kernel.cu) and binarized matmul
# (csrc/binary_kernel.cu).
cuda_int_act.register(CUDA)
cuda_binary.register(CUDA)
cuda_binary_lut.register(CUDA)      # decode sizes, blocks of 128: tried before the plane GEMMs
