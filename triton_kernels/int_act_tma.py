"""Integer-activation GEMM for prefill on Hopper: TMA loads, persistent tiles.

The same product as ``int_act._int_act_kernel`` with one group per weight
row (W8A8 / W6A6 stored as int8, per-channel scales), written for large M
on sm_90:

* Operand tiles come in by TMA (``TensorDescriptor``): one bulk copy per
  tile and stage instead of per-thread address arithmetic, and the copy
  engine zero-fills past M, N and K, so no masks in the K loop.
* One program per SM walks output tiles in a fixed stride (persistent): no
  wave of fresh launches per tile, and with ``FLATTEN`` in the config one
  software pipeline runs on from one tile's K loop into the next.

The int32 sums are exact and the epilogue computes
``acc * w_scale * token_scale + bias`` in the same order as the pointer
kernel, so both give the same bits. Activation codes come from
``int_act.quantize_activations``.

TMA needs 16-byte aligned row strides: K a multiple of 16 (``tma_reason``).
"""
from __future__ import annotations

import importlib.util

import torch
import triton
import triton.language as tl

from vlmkern.formats.intact import int32_overflow_reason

from ._common import (bf16_fixup, bias_arg, dtype_code, get_config, kernel_entry, launch_opts,
                      shrink, sm_count, swizzled_tile)
from .int_act import finish_rows, quantize_activations


@triton.jit
def _int_act_tma_kernel(a_desc, w_desc, sx_ptr, sw_ptr, bias_ptr, out_ptr,
                        M, N, K, stride_sn, stride_om,
                        HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr, SWIZZLE: tl.constexpr,
                        FLATTEN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # FLATTEN: one software pipeline over all (tile, k) pairs, so the next
    # tile's loads are in flight during this one's epilogue. It keeps more
    # live (at 128 x 256 the sm_90 build spills; at 128 x 128 it does not),
    # and its epilogue cannot reuse the pipeline's shared memory.
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = swizzled_tile(tile, M, N, BLOCK_M, BLOCK_N, SWIZZLE)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for kt in range(k_tiles):
            a = a_desc.load([off_m, kt * BLOCK_K])
            w = w_desc.load([off_n, kt * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        m2 = (off_m + tl.arange(0, BLOCK_M))[:, None]
        n_col = (off_n + tl.arange(0, BLOCK_N))[None, :]
        sw = tl.load(sw_ptr + n_col.to(tl.int64) * stride_sn, mask=n_col < N, other=0.0)
        finish_rows(acc.to(tl.float32) * sw.to(tl.float32), m2, n_col, sx_ptr, bias_ptr, out_ptr,
                    M, N, stride_om, HAS_BIAS, FIX_BF16)


def tma_config(m: int, dtype: torch.dtype, override: dict | None = None) -> dict:
    """Launch config for M tokens of ``dtype`` (the table's, with ``override``)."""
    cfg = get_config("int_act_tma", m, override)
    if dtype == torch.float32 and not (override and "num_stages" in override):
        # fp32 outputs at 128 x 256 tiles and 4 stages spill (sm_90, Triton 3.9); 3 do not
        cfg["num_stages"] = min(cfg["num_stages"], 3)
    return cfg


def tma_tiles(m: int, n: int, k: int, cfg: dict) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of an M x N x K call: the config's tiles
    shrunk to the problem, K tiles never below 32 (the smallest int8 tl.dot
    the GPU compiler takes; TMA zero-fills the columns past K)."""
    return (shrink(cfg["BLOCK_M"], m), shrink(cfg["BLOCK_N"], n),
            shrink(cfg["BLOCK_K"], k, floor=32))


# host-side TMA descriptors arrived in later Triton releases than the other kernels need
HAS_TENSOR_DESCRIPTORS = importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


def tma_reason(qweight) -> str | None:
    """Why the TMA kernel cannot read this weight, or None. (The GPU must be
    sm_90 or newer: the kernel spec's ``min_sm``, checked again on a call.)"""
    if qweight.w_bits == 4:
        return "4-bit weights are stored two per byte; the TMA kernel reads int8 codes"
    gs = qweight.group_size
    if gs is not None and gs < qweight.in_features:
        return f"needs one scale per weight row, got group size {gs}"
    if qweight.in_features % 16:
        return f"TMA rows must be 16-byte aligned: K={qweight.in_features} is not a multiple of 16"
    why = int32_overflow_reason(qweight.a_bits, qweight.w_bits, qweight.in_features)
    if why:
        return why
    if not HAS_TENSOR_DESCRIPTORS:
        return f"Triton {triton.__version__} has no triton.tools.tensor_descriptor"
    return None


@kernel_entry
def int_act_tma_matmul(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, *,
                       config: dict | None = None) -> torch.Tensor:
    """y = dequant(quant(x)) @ W^T + bias, as ``int_act.int_act_matmul``, on
    the persistent TMA kernel. x [M, K] float16/bfloat16/float32, qweight an
    IntActWeight [N, K] that ``tma_reason`` accepts, bias [N] or None."""
    why = tma_reason(qweight)
    if why is None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        why = "TMA needs an sm_90 or newer GPU"
    if why:
        raise ValueError(f"triton.int_act_tma: {why}")
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, k = x.shape
    n = qweight.out_features
    dtype_code(x.dtype)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = tma_config(m, x.dtype, config)
    bm, bn, bk = tma_tiles(m, n, k, cfg)
    qx, sx = quantize_activations(x, qweight.a_bits, qweight.act_scale)
    qw, sw = qweight.qweight.contiguous(), qweight.scales.contiguous()
    if qw.data_ptr() % 16 or qw.stride(0) % 16:
        # TMA needs 16-byte aligned addresses and row strides; a view into a
        # larger buffer (or one row of it) may have neither
        qw = qw.clone(memory_format=torch.contiguous_format)
    a_desc = TensorDescriptor.from_tensor(qx, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(qw, [bn, bk])
    programs = min(triton.cdiv(m, bm) * triton.cdiv(n, bn), sm_count(x.device))
    _int_act_tma_kernel[(programs,)](
        a_desc, w_desc, sx, sw, bias_arg(bias, out), out, m, n, k, sw.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, FIX_BF16=bf16_fixup(x), SWIZZLE=8,
        FLATTEN=bool(cfg.get("FLATTEN", 0)), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch_opts(cfg, x.device))
    return out
