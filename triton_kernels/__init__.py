"""Triton kernels of vlmkern, installed as the subpackage vlmkern.triton_kernels.

One module per op family:
  weight_only  group-wise W2/W3/W4/W8 x fp16/bf16/fp32 (small-M split-K path, tiled GEMM
               path, dequantize + GEMM for prefill)
  int_act      W8A8 / W6A6 / W4A4 with per-token activation quantization
  int_act_tma  W8A8 / W6A6 prefill on Hopper: TMA loads, persistent tiles
  binary       BiLLM-style binarized weights (fused GEMM; dequantize + GEMM for prefill)

Importing this package imports neither triton nor torch.cuda state: the
kernel modules are loaded by ``register_kernels``, which the triton backend's
probe calls on first use. Nothing here compiles or reads device properties
until a kernel is launched. On the CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1), which the selector uses only when
VLMKERN_BACKEND=triton is set.
"""
from __future__ import annotations

from functools import partial

__all__ = ["register_kernels", "kernel_specs"]

# Smallest M that weight-only and binary layers run as dequantize + GEMM
# (as the CUDA backend does above its tensor-core kernel's 64 tokens).
DEQUANT_MIN_M = 65
# Smallest M the persistent TMA integer GEMM is selected for: prefill sizes,
# where its 128 x 256 tiles fill the GPU.
INT_ACT_TMA_MIN_M = 129


def kernel_specs():
    """The KernelSpec of every kernel in this package (imports the kernels)."""
    import torch

    from vlmkern.ops.backends import KernelSpec

    from . import binary, int_act, int_act_tma, weight_only

    floats = frozenset({torch.float16, torch.bfloat16, torch.float32})
    devices = frozenset({"cuda", "cpu"})
    # sm_80: bf16 MMA and the int8 MMA shapes Triton emits need Ampere or newer.
    sm80 = (8, 0)

    def gemv_check(x, qweight):
        why = weight_only.gemv_reason(qweight)
        return None if why is None else f"triton.weight_only_gemv: {why}"

    def binary_gemv_check(x, qweight):
        why = binary.gemv_reason(qweight)
        return None if why is None else f"triton.binary_gemv: {why}"

    def int_act_check(x, qweight):
        why = int_act.unsupported_reason(qweight)
        return None if why is None else f"triton.int_act: {why}"

    def int_act_tma_check(x, qweight):
        why = int_act_tma.tma_reason(qweight)
        return None if why is None else f"triton.int_act_tma: {why}"

    return [
        # one token: the CUDA-core kernel, ahead of the MMA one
        KernelSpec("triton.weight_only_gemv", "weight_only", weight_only.gemv,
                   bits=frozenset({2, 3, 4, 8}), group_sizes=None, dtypes=floats,
                   devices=devices, min_m=1, max_m=1, min_sm=sm80, check=gemv_check),
        KernelSpec("triton.weight_only_splitk", "weight_only",
                   partial(weight_only.weight_only_matmul, path="small"),
                   bits=frozenset({2, 3, 4, 8}), group_sizes=None, dtypes=floats,
                   devices=devices, min_m=1, max_m=16, min_sm=sm80),
        KernelSpec("triton.weight_only_gemm", "weight_only",
                   partial(weight_only.weight_only_matmul, path="gemm"),
                   bits=frozenset({2, 3, 4, 8}), group_sizes=None, dtypes=floats,
                   devices=devices, min_m=17, max_m=DEQUANT_MIN_M - 1, min_sm=sm80),
        # Above one mid-size M tile the fused GEMM decodes the weight once per
        # tile; writing it once and running cuBLAS costs one decode in all.
        KernelSpec("triton.dequant_matmul", "weight_only", weight_only.dequant_matmul,
                   bits=frozenset({2, 3, 4, 8}), group_sizes=None, dtypes=floats,
                   devices=devices, min_m=DEQUANT_MIN_M, max_m=None, min_sm=sm80),
        # opt-in until timed on a GPU against triton.int_act (sm_90: TMA)
        KernelSpec("triton.int_act_tma", "int_act", int_act_tma.int_act_tma_matmul,
                   bits=frozenset({6, 8}), group_sizes=None, dtypes=floats, devices=devices,
                   min_m=INT_ACT_TMA_MIN_M, min_sm=(9, 0), opt_in=True, check=int_act_tma_check),
        KernelSpec("triton.int_act", "int_act", int_act.int_act_matmul,
                   bits=frozenset({4, 6, 8}), group_sizes=None, dtypes=floats,
                   devices=devices, min_sm=sm80, check=int_act_check),
        KernelSpec("triton.binary_gemv", "binary", binary.gemv,
                   bits=frozenset({1}), group_sizes=None, dtypes=floats,
                   devices=devices, min_m=1, max_m=1, min_sm=sm80, check=binary_gemv_check),
        KernelSpec("triton.binary", "binary", binary.binary_matmul,
                   bits=frozenset({1}), group_sizes=None, dtypes=floats,
                   devices=devices, max_m=DEQUANT_MIN_M - 1, min_sm=sm80),
        KernelSpec("triton.binary_dequant_matmul", "binary", binary.dequant_matmul,
                   bits=frozenset({1}), group_sizes=None, dtypes=floats,
                   devices=devices, min_m=DEQUANT_MIN_M, min_sm=sm80),
    ]


def register_kernels(backend) -> None:
    """Register every kernel with ``backend`` (idempotent: names already
    registered are skipped, so a re-probe does not duplicate entries)."""
    have = {spec.name for spec in backend.kernels}
    for spec in kernel_specs():
        if spec.name not in have:
            backend.register(spec)
