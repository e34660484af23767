"""The three backends and their kernels. Imported lazily by the dispatcher."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import reference
from .backends import Backend, KernelSpec, register_backend

# -- torch: the reference, runs everything everywhere -------------------------
TORCH = register_backend(Backend("torch", probe=lambda: None))
TORCH.register(KernelSpec("torch.weight_only", "weight_only", reference.weight_only_matmul))
TORCH.register(KernelSpec("torch.int_act", "int_act", reference.int_act_matmul))
TORCH.register(KernelSpec("torch.binary", "binary", reference.binary_matmul))


# -- triton: kernels live in vlmkern.triton_kernels and register themselves ---
def _probe_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"
    import vlmkern.triton_kernels as tk
    register = getattr(tk, "register_kernels", None)
    if register is not None:
        register(TRITON)
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
    """Dequantize with the CUDA kernel, then one cuBLAS GEMM (prefill-sized M)."""
    from ..ext import dequant_groupwise
    w = dequant_groupwise(qweight.qweight, qweight.qzeros, qweight.scales, qweight.bits,
                          qweight.group_size or qweight.in_features, qweight.in_features,
                          x.dtype)
    if qweight.perm is not None:
        x = x[:, qweight.perm.long()]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# Opt-in until its GPU tests have passed on a GPU: never picked automatically.
CUDA = register_backend(Backend("cuda", probe=_probe_cuda, auto=False))
CUDA.register(KernelSpec("cuda.dequant_cublas", "weight_only", _cuda_dequant_matmul,
                         dtypes=frozenset({torch.float16, torch.bfloat16}),
                         devices=frozenset({"cuda"}), min_sm=(8, 0)))
