"""Binarized (BiLLM-style) matmul on the CUDA extension (csrc/binary_kernel.cu).

The kernel reads the ``binary`` format's bit planes directly (2 bits per
weight plus 8 statistics per row and block) and never forms a dense weight:
tensor-core MMAs on +-1 planes give the per-block sums the statistics
multiply (see csrc/binary.h for the algebra). fp16/bf16 activations, fp32
accumulation, block sizes that are multiples of 32.

Load-time layout: the sign and aux rows must be a multiple of 4 words (one
16-byte load per 128 columns). When ceil(K/32) is not, a zero-padded copy is
made once per weight and device and cached beside the weight, never in its
state or checkpoints; otherwise the stored planes are used as they are.

Work split: K is cut into ``ksplit`` parts (whole units of
lcm(block_size, 128) columns) so that small-N layers still fill the GPU; the
parts are summed in order by a second pass. ``ksplit`` depends on the
weight's shape and the device only, never on M, so a row's result is the same
in any batch.

Prefill sizes (``cuda.binary_dequant_cublas``, opt-in until its GPU tests
pass): csrc/binary_dequant_kernel.cu writes the dense weight, bit for bit
``BinaryWeight.dequantize``, then one cuBLAS GEMM, as Triton's
dequantize + GEMM does (``triton.binary_dequant_matmul``, 0.80x of cuBLAS
fp16 at M = 4096 on an H100, where writing the weight cost about 370 us).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats.binary import BinaryWeight
from . import reference
from .cuda_common import (
    LayoutCache,
    aligned16,
    check_activations,
    dense_rows,
    multiprocessors,
    require_op,
)

ACT_DTYPES = (torch.float16, torch.bfloat16)
ROWS_PER_BLOCK = 64          # 4 warps x 16 rows (kRowsPerCta in the kernel)
CHUNK = 128                  # columns per 16-byte plane load
BLOCKS_PER_SM = 8            # thread blocks of 4 warps wanted per multiprocessor
MAX_M = 256                  # beyond this, a dense tiled GEMM does better
DEQUANT_MIN_M = 65           # dequantize + GEMM from here (the lookup-table GEMMs stop at 64)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unsupported_reason(qweight: BinaryWeight) -> str | None:
    if qweight.block_size % 32:
        return f"block_size {qweight.block_size} is not a multiple of 32"
    return None


def choose_ksplit(n: int, k: int, block_size: int, multiprocessors: int) -> int:
    """Parts to split K into: enough thread blocks for the device, at most one
    part per unit of lcm(block_size, 128) columns."""
    unit = block_size * CHUNK // math.gcd(block_size, CHUNK)
    units = _cdiv(k, unit)
    row_blocks = _cdiv(n, ROWS_PER_BLOCK)
    want = _cdiv(BLOCKS_PER_SM * multiprocessors, row_blocks)
    return max(1, min(units, want, 65535))


def padded_planes(qweight: BinaryWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """sign and aux with rows padded to a multiple of 4 int32 words (zeros)."""
    words = qweight.sign.shape[1]
    pad = -words % 4
    out = []
    for plane in (qweight.sign, qweight.aux):
        out.append(aligned16(torch.nn.functional.pad(plane, (0, pad)) if pad
                             else plane.contiguous()))
    return out[0], out[1]


@dataclass(frozen=True)
class KernelPlanes:
    sign: torch.Tensor
    aux: torch.Tensor
    ksplit: int


_LAYOUTS = LayoutCache()


def kernel_planes(qweight: BinaryWeight) -> KernelPlanes:
    """The planes as the kernel reads them and the K split, made on first use and cached."""
    def make() -> KernelPlanes:
        sign, aux = padded_planes(qweight)
        n, k = qweight.shape
        return KernelPlanes(sign, aux, choose_ksplit(n, k, qweight.block_size,
                                                     multiprocessors(qweight.device)))
    return _LAYOUTS.get(qweight, qweight.device, make)


def binary_matmul(x: torch.Tensor, qweight: BinaryWeight,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a BinaryWeight. x [M, K] float16/bfloat16 on a
    CUDA device; bias [N] (fp16/bf16/fp32) or None -> [M, N] in x's dtype."""
    require_op("cuda.binary", "binary_matmul", "csrc/binary_kernel.cu")
    check_activations("cuda.binary", x, qweight, ACT_DTYPES)
    why = unsupported_reason(qweight)
    if why:
        raise ValueError(f"cuda.binary: {why}")
    if x.shape[0] == 0:
        return x.new_empty(0, qweight.out_features)
    x = dense_rows(x)
    if bias is not None:
        if bias.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            bias = bias.float()
        bias = bias.contiguous()
    kp = kernel_planes(qweight)
    return torch.ops.vlmkern.binary_matmul(x, qweight.salient.contiguous(), kp.sign, kp.aux,
                                           qweight.stats.contiguous(), bias,
                                           qweight.in_features, qweight.block_size, kp.ksplit)


def dequant_reason(qweight: BinaryWeight) -> str | None:
    """Why the dense-weight kernel cannot take this weight, or None."""
    if qweight.in_features % 8:
        return f"in_features must be a multiple of 8, got {qweight.in_features}"
    if qweight.block_size % 8:
        return f"block_size {qweight.block_size} is not a multiple of 8"
    return None


def dequantize(qweight: BinaryWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (float16 or bfloat16) on the
    weight's GPU: ``qweight.dequantize(dtype)``, bit for bit."""
    require_op("cuda.binary_dequant_cublas", "binary_dequant", "csrc/binary_dequant_kernel.cu")
    why = dequant_reason(qweight)
    if why:
        raise ValueError(f"cuda.binary_dequant_cublas: {why}")
    if dtype not in ACT_DTYPES:
        raise ValueError(f"cuda.binary_dequant_cublas: dtype must be float16 or bfloat16, got {dtype}")
    return torch.ops.vlmkern.binary_dequant(qweight.sign.contiguous(), qweight.aux.contiguous(),
                                            qweight.salient.contiguous(), qweight.stats.contiguous(),
                                            qweight.in_features, qweight.block_size, dtype)


def binary_dequant_cublas(x: torch.Tensor, qweight: BinaryWeight,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias at prefill sizes: the dense weight, then one GEMM."""
    check_activations("cuda.binary_dequant_cublas", x, qweight, ACT_DTYPES)
    return reference.stored_order_linear(x, dequantize(qweight, x.dtype), None, bias)


def _check(x: torch.Tensor, qweight) -> str | None:
    why = unsupported_reason(qweight)
    return None if why is None else f"cuda.binary: {why}"


def _check_dequant(x: torch.Tensor, qweight) -> str | None:
    why = dequant_reason(qweight)
    return None if why is None else f"cuda.binary_dequant_cublas: {why}"


def register(backend) -> None:
    """Add the kernels to the CUDA backend (idempotent). Dequantize + cuBLAS
    (M > 64) comes first but is opt-in (``VLMKERN_ENABLE``) until it has
    passed the GPU tests."""
    from .backends import KernelSpec

    common = dict(bits=frozenset({1}), dtypes=frozenset(ACT_DTYPES), devices=frozenset({"cuda"}),
                  min_m=1, max_m=MAX_M, min_sm=(8, 0))
    specs = [KernelSpec("cuda.binary_dequant_cublas", "binary", binary_dequant_cublas,
                        opt_in=True, check=_check_dequant,
                        **dict(common, min_m=DEQUANT_MIN_M, max_m=None)),
             KernelSpec("cuda.binary", "binary", binary_matmul, check=_check, **common)]
    known = {k.name for k in backend.kernels}
    for spec in specs:
        if spec.name not in known:
            backend.register(spec)
