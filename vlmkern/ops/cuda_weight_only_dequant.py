"""Dense weight from the tensor-core kernels' load-time layout
(csrc/weight_only_dequant_kernel.cu, ``torch.ops.vlmkern.weight_only_dequant``).

A layer that keeps only the :class:`~vlmkern.ops.cuda_weight_only.MmaWeight`
layout on the GPU (its canonical codes freed) still needs the dense [N, K]
weight for prefill, where dequantize + cuBLAS beats the M <= 64 kernels. This
kernel writes it straight from the layout, decoding with the same device code
as the matmul kernels' exact decode: the result equals
:func:`~vlmkern.ops.cuda_weight_only.emulate_dequantize` bit for bit, and the
format's ``dequantize()`` whenever the scales are already in ``mw.dtype``.

The kernel reads ``bits / 8`` bytes and writes 2 bytes per weight (plus the
scale words), so it runs at memory bandwidth; columns are in stored
(act-order) order, like the layout.
"""
from __future__ import annotations

import torch

from .cuda_common import require_op
from .cuda_weight_only import ACT_DTYPES, SUPPORTED_BITS, MmaWeight


def dequantize_layout(mw: MmaWeight) -> torch.Tensor:
    """The weight ``[mw.out_features, mw.in_features]`` in ``mw.dtype`` on
    ``mw.wq.device`` (a CUDA device), as the exact decode's A operands hold it.

    ``mw.wq`` int32 [NB, C, 8, 64*bits] and ``mw.sz`` int32
    [NB, C, 8, 8 >> slot_log2, 8, 2], contiguous, on one CUDA device.
    """
    require_op("cuda.weight_only_dequant", "weight_only_dequant",
               "csrc/weight_only_dequant_kernel.cu")
    if mw.wq.device.type != "cuda" or mw.sz.device.type != "cuda":
        raise ValueError("cuda.weight_only_dequant: the layout must be on a CUDA device, got wq on "
                         f"{mw.wq.device} and sz on {mw.sz.device} (emulate_dequantize runs anywhere)")
    if mw.bits not in SUPPORTED_BITS:
        raise ValueError(f"cuda.weight_only_dequant: bits must be 2, 3 or 4, got {mw.bits}")
    if mw.dtype not in ACT_DTYPES:
        raise ValueError(f"cuda.weight_only_dequant: dtype must be float16 or bfloat16, got {mw.dtype}")
    return torch.ops.vlmkern.weight_only_dequant(mw.wq, mw.sz, mw.bits, mw.out_features,
                                                 mw.in_features, mw.slot_log2, mw.dtype)
