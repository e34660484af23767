"""Integer-activation matmul (W8A8, W6A6, W4A4) on integer tensor cores.

Two launches:

1. ``_quant_act_kernel`` (one program per token): symmetric per-token
   quantization, scale = absmax / (2^(a-1)-1) (or the static per-tensor
   act_scale), codes = round-half-even(x / scale) clamped, stored int8. The
   division is IEEE-rounded (div_rn, not the approximate fp32 divide) and the
   rounding uses the 1.5*2^23 trick, so codes equal torch's bit for bit. A
   token holding NaN/Inf gets a NaN/Inf scale, also under a static scale, so
   its output row is non-finite as in the reference.
2. ``_int_act_kernel``: int8 x int8 -> int32 tl.dot per weight group (exact:
   no rounding anywhere until the epilogue), then per group
   acc * w_scale in fp32, and at the end * token scale + bias.

W4A4 codes are int4 but run on the int8 MMA: Hopper has no int4 tensor-core
path, and int4 values are exact in int8. W6 weights are stored as int8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkern.formats.intact import int32_overflow_reason

from ._common import (bf16_fixup, bias_arg, dtype_code, get_config, kernel_entry, launch_opts,
                      round_bf16, shrink, swizzled_tile)


@triton.jit
def _quant_tile(x_row, q_row, k0, K, s, LIM: tl.constexpr, BLOCK_K: tl.constexpr):
    """Quantize x[k0 : k0 + BLOCK_K] of one token with scale s; returns the
    fp32 values so the caller can gather statistics in the same pass."""
    offs = k0 + tl.arange(0, BLOCK_K)
    v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
    r = tl.math.div_rn(v, tl.broadcast_to(s, [BLOCK_K]))
    r = tl.where(r != r, 0.0, r)
    # Clamping before rounding equals rounding before clamping (the bounds
    # are integers), and keeps |r| inside the magic-number range below.
    r = tl.minimum(tl.maximum(r, -LIM), LIM)
    # Adding then subtracting 1.5 * 2^23 rounds an fp32 |r| < 2^22 to the
    # nearest integer, ties to even (the FPU's default mode): torch.round.
    r = (r + 12582912.0) - 12582912.0
    tl.store(q_row + offs, r.to(tl.int8), mask=offs < K)
    return v


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, static_scale,
                      LIM: tl.constexpr, STATIC: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    q_row = q_ptr + m.to(tl.int64) * stride_qm
    amax = tl.zeros([1], tl.float32)
    # Hardware max drops NaN, so NaNs are counted: a NaN token gets a NaN
    # scale and an Inf token an Inf scale (non-finite output row), as in the
    # reference -- also under a static scale, which would otherwise hide it.
    nans = tl.zeros([1], tl.int32)
    if STATIC:
        s = tl.full([1], static_scale, tl.float32)
        for k0 in range(0, K, BLOCK_K):   # one pass: quantize and check
            v = _quant_tile(x_row, q_row, k0, K, s, LIM, BLOCK_K)
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
            nans += tl.sum((v != v).to(tl.int32), axis=0)
        s = tl.where(amax == float("inf"), amax, s)
    else:
        for k0 in range(0, K, BLOCK_K):   # pass 1: absmax
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
            nans += tl.sum((v != v).to(tl.int32), axis=0)
        s = tl.math.div_rn(amax, tl.full([1], LIM, tl.float32))
        s = tl.where(s == 0.0, 1.0, s)
        s = tl.where(nans > 0, float("nan"), s)
        for k0 in range(0, K, BLOCK_K):   # pass 2: codes (row is L2-resident)
            _quant_tile(x_row, q_row, k0, K, s, LIM, BLOCK_K)
    s = tl.where(nans > 0, float("nan"), s)
    tl.store(s_ptr + m + tl.arange(0, 1), s)


@triton.jit
def _int_tile_dot(a_rows, w_rows, w_rows_nk, k0, K, acc, W4: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += qx[:, k0:k0+BK] @ qw[:, k0:k0+BK]^T on the int8 tensor cores."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_row = offs_k[None, :]
    k_col = offs_k[:, None]
    a = tl.load(a_rows + k_row, mask=k_row < K, other=0)
    if W4:
        # Two int4 per byte (element k in nibble k & 1): load the BLOCK_K/2
        # bytes once, fan out the nibbles in registers, sign-extend with
        # (v ^ 8) - 8.
        bidx = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_rows_nk + bidx[None, :], mask=bidx[None, :] < (K + 1) // 2,
                       other=0).to(tl.int32)
        nib = (byte[:, :, None] >> (tl.arange(0, 2) * 4)[None, None, :]) & 15
        b = tl.trans(tl.reshape((nib ^ 8) - 8, [BLOCK_N, BLOCK_K]).to(tl.int8))
    else:
        b = tl.load(w_rows + k_col, mask=k_col < K, other=0)
    # out_dtype spelled out: newer Triton defaults integer dots to fp32 and
    # rejects an int32 accumulator without it.
    return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit
def _int_act_kernel(q_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr,
                    M, N, K, stride_qm, stride_wn, stride_sn, stride_om,
                    GROUP: tl.constexpr, W4: tl.constexpr, HAS_BIAS: tl.constexpr,
                    FIX_BF16: tl.constexpr,
                    SWIZZLE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, SWIZZLE)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m2 = offs_m[:, None]
    n_col = offs_n[None, :]
    # Out-of-range rows/columns are wrapped onto valid ones instead of masked:
    # the loads stay unpredicated along M and N (fewer live mask registers)
    # and the wrapped results are never stored.
    a_rows = q_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_qm
    w_rows = w_ptr + (offs_n % N)[None, :].to(tl.int64) * stride_wn
    w_rows_nk = w_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_wn
    # int32 accumulators: integer MMA sums are exact. Per weight group the
    # sum is scaled (fp32) once, after the group's last tile. The group loop
    # is the only runtime loop (tiles within a group are unrolled, GROUP is a
    # compile-time constant): a runtime inner loop per group compiled to
    # kernels that spilled registers, this form does not (sm_80 and sm_90).
    if GROUP == 0:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            acc = _int_tile_dot(a_rows, w_rows, w_rows_nk, k0, K, acc, W4, BLOCK_N, BLOCK_K)
        sw = tl.load(sw_ptr + n_col.to(tl.int64) * stride_sn, mask=n_col < N, other=0.0)
        acc_f = acc.to(tl.float32) * sw.to(tl.float32)
    else:
        acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, K, GROUP):
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            for kk in tl.static_range(0, GROUP, BLOCK_K):
                acc = _int_tile_dot(a_rows, w_rows, w_rows_nk, g0 + kk, K, acc, W4, BLOCK_N,
                                    BLOCK_K)
            sw = tl.load(sw_ptr + n_col.to(tl.int64) * stride_sn + g0 // GROUP,
                         mask=n_col < N, other=0.0)
            acc_f += acc.to(tl.float32) * sw.to(tl.float32)
    finish_rows(acc_f, m2, n_col, sx_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS, FIX_BF16)


@triton.jit
def finish_rows(y, m2, n_col, sx_ptr, bias_ptr, out_ptr, M, N, stride_om,
                HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr):
    """out[m2, n_col] = y * token scale (+ bias), rounded once to out's dtype;
    y holds the weight-scaled fp32 sums of rows m2 ([BM, 1]) and columns
    n_col ([1, BN]). Shared with the TMA kernel (int_act_tma.py)."""
    y = y * tl.load(sx_ptr + m2, mask=m2 < M, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n_col, mask=n_col < N, other=0.0).to(tl.float32)
    if FIX_BF16:
        y = round_bf16(y)
    tl.store(out_ptr + m2.to(tl.int64) * stride_om + n_col, y.to(out_ptr.dtype.element_ty),
             mask=(m2 < M) & (n_col < N))


def quantize_activations(x: torch.Tensor, bits: int, scale: float | None = None,
                         block_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization, same contract as
    vlmkern.ops.reference.quantize_activations: x [M, K] float -> (codes int8
    [M, K], scales fp32 [M])."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    bk = shrink(block_k, k)
    _quant_act_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0),
                            float(scale) if scale is not None else 1.0,
                            LIM=(1 << (bits - 1)) - 1, STATIC=scale is not None, BLOCK_K=bk)
    return q, s


def block_k_for(group_size: int | None, k: int, block_k: int) -> int:
    """K tile: a power of two >= 32 (the int8 MMA k-step) that divides the
    group, so a group's int32 accumulator never mixes two groups."""
    bk = shrink(block_k, k, floor=32)
    if group_size is not None and group_size < k:
        while bk > 32 and group_size % bk:
            bk //= 2
    return bk


def supports_group(group_size: int | None, k: int) -> str | None:
    if group_size is None or group_size >= k or group_size % 32 == 0:
        return None
    return f"group size {group_size} is not a multiple of 32 (the int8 MMA k-step)"


def unsupported_reason(qweight) -> str | None:
    """Why the kernels cannot run this weight (group size, or int32 sums that
    could overflow), or None."""
    k, gs = qweight.in_features, qweight.group_size
    return supports_group(gs, k) or int32_overflow_reason(
        qweight.a_bits, qweight.w_bits, k if gs is None or gs >= k else gs)


@kernel_entry
def int_act_matmul(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, *,
                   config: dict | None = None) -> torch.Tensor:
    """y = dequant(quant(x)) @ W^T + bias with exact integer accumulation.
    x [M, K] float16/bfloat16/float32, qweight an IntActWeight [N, K], bias [N]
    or None -> [M, N] in x's dtype."""
    m, k = x.shape
    n = qweight.out_features
    dtype_code(x.dtype)
    why = unsupported_reason(qweight)
    if why:
        raise ValueError(why)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    gs = qweight.group_size
    group = gs if gs is not None and gs < k else 0
    cfg = get_config("int_act_grouped" if group else "int_act", m, config)
    qx, sx = quantize_activations(x, qweight.a_bits, qweight.act_scale)
    bm, bn = cfg["BLOCK_M"], shrink(cfg["BLOCK_N"], n)
    bk = block_k_for(gs, k, cfg["BLOCK_K"])
    qw, sw = qweight.qweight.contiguous(), qweight.scales.contiguous()
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int_act_kernel[grid](qx, sx, qw, sw, bias_arg(bias, out), out,
                          m, n, k, qx.stride(0), qw.stride(0), sw.stride(0), out.stride(0),
                          GROUP=group, W4=qweight.w_bits == 4, HAS_BIAS=bias is not None,
                          FIX_BF16=bf16_fixup(x), SWIZZLE=8, BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, **launch_opts(cfg, x.device))
    return out
