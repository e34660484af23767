"""Binarized (BiLLM-style) matmul straight from the ``binary`` format
(vlmkern.formats.binary): sign / aux bit planes per row, a salient-column
bitmap, and 8 statistics per row and block of input features.

Each K step decodes a [BLOCK_K, BLOCK_N] weight tile in registers:
  salient column:  w = mu1 + alpha1*s + mu2 + alpha2*a      (two sign planes)
  other column:    w = mu_t + alpha_t*s, t = aux bit        (inner/outer group)
then feeds tl.dot. The planes are 1 bit per weight, so per tile the kernel
reads 2 bits/weight plus one 8-value stats record per row and block (loaded
once per tile when the K tile lies inside one block); no pack-time re-layout.
For prefill-sized M, where every M tile would decode the weight again,
``dequant_matmul`` writes the dense weight once (``_binary_dequant_kernel``,
the format's values bit for bit) and runs one cuBLAS GEMM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkern.ops.reference import stored_order_linear

from ._common import (bias_arg, check_one_token, dtype_code, get_config, kernel_entry, launch_opts,
                      on_device, shrink, split_k_plan, splitk_reduce, swizzled_tile)
from .weight_only import (_mode, mma, spread, store_out, store_token, unpack_rows,
                          weight_operand)


@triton.jit
def _stat(base, j, smask, STAT_MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
          BLOCK: tl.constexpr):
    v = tl.load(base + j, mask=smask, other=0.0).to(tl.float32)
    if STAT_MODE == 1:
        v = spread(v, ROWS, BLOCK_K // BLOCK, BLOCK)
    return v


@triton.jit
def dequant_binary_tile(sign_ptr, aux_ptr, sal_ptr, st_ptr, offs_n, k0, N, K,
                        stride_sn, stride_tn, stride_tb, STAT_MODE: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile W[offs_n, k0 : k0 + BLOCK_K], [BLOCK_N, BLOCK_K]; 0 outside.
    STAT_MODE: 0 the tile lies in one block (one stats record per row),
    1 the tile holds whole blocks (records spread over their columns),
    2 unaligned blocks (per-element gather)."""
    n2 = offs_n[:, None]
    nm = n2 < N
    k2 = (k0 + tl.arange(0, BLOCK_K))[None, :]
    mask = nm & (k2 < K)
    n_words = (K + 31) // 32
    rows = n2.to(tl.int64) * stride_sn
    # Planes are 1-bit streams: BLOCK_K/32 words per row, fanned out in registers.
    sgn = unpack_rows(sign_ptr + rows, nm, k0, n_words, 1, BLOCK_N, BLOCK_K)
    aux = unpack_rows(aux_ptr + rows, nm, k0, n_words, 1, BLOCK_N, BLOCK_K)
    one = tl.full([1, 1], 1, tl.int1)
    sal = unpack_rows(sal_ptr + tl.zeros([1, 1], tl.int32), one, k0, n_words, 1, 1, BLOCK_K)
    st_rows = st_ptr + n2.to(tl.int64) * stride_tn
    if STAT_MODE == 0:
        base = st_rows + (k0 // BLOCK) * stride_tb
        smask = nm & ((n2 * 0 + k0) < K)
    elif STAT_MODE == 1:
        blk = (k0 // BLOCK + tl.arange(0, BLOCK_K // BLOCK))[None, :]
        base = st_rows + blk * stride_tb
        smask = nm & (blk * BLOCK < K)
    else:
        base = st_rows + (k2 // BLOCK) * stride_tb
        smask = mask
    mu1 = _stat(base, 0, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    al1 = _stat(base, 1, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    mu2 = _stat(base, 2, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    al2 = _stat(base, 3, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    mu_in = _stat(base, 4, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    al_in = _stat(base, 5, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    mu_out = _stat(base, 6, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    al_out = _stat(base, 7, smask, STAT_MODE, BLOCK_N, BLOCK_K, BLOCK)
    s = (sgn * 2 - 1).to(tl.float32)
    a = (aux * 2 - 1).to(tl.float32)
    # Same association as the reference; products with +-1 are exact, so an
    # FMA contraction cannot change the value.
    w_sal = mu1 + al1 * s + mu2 + al2 * a
    outer = aux != 0
    w_rest = tl.where(outer, mu_out, mu_in) + tl.where(outer, al_out, al_in) * s
    w = tl.where(sal != 0, w_sal, w_rest)
    return tl.where(mask, w, 0.0)


@triton.jit
def _binary_kernel(x_ptr, sign_ptr, aux_ptr, sal_ptr, st_ptr, bias_ptr, out_ptr,
                   M, N, K, stride_xm, stride_om, stride_sn, stride_tn, stride_tb,
                   BLOCK: tl.constexpr, STAT_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   MODE: tl.constexpr,
                   SWIZZLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, SWIZZLE)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m2 = offs_m[:, None]
    n_col = offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m2.to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(m2 < M) & (offs_k[None, :] < K), other=0.0)
        w = dequant_binary_tile(sign_ptr, aux_ptr, sal_ptr, st_ptr, offs_n, k0, N, K, stride_sn,
                                stride_tn, stride_tb, STAT_MODE, BLOCK, BLOCK_N, BLOCK_K)
        acc = mma(x, tl.trans(weight_operand(w, x, MODE)), acc, MODE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_col, mask=n_col < N, other=0.0).to(tl.float32)
    store_out(out_ptr + m2.to(tl.int64) * stride_om + n_col, acc, (m2 < M) & (n_col < N), MODE)


@kernel_entry
def binary_matmul(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, *,
                  config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a BinaryWeight. x [M, K] float16/bfloat16/float32,
    bias [N] or None -> [M, N] in x's dtype (fp32 accumulation)."""
    m, k = x.shape
    n = qweight.out_features
    dtype_code(x.dtype)
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = get_config("binary", m, config, x.dtype)
    # BLOCK_K >= 32: a K tile starts on a word boundary of the bit planes.
    bm, bn, bk = cfg["BLOCK_M"], shrink(cfg["BLOCK_N"], n), shrink(cfg["BLOCK_K"], k, floor=32)
    blk = qweight.block_size
    stat_mode = 0 if blk % bk == 0 else (1 if bk % blk == 0 else 2)
    if stat_mode == 2:
        cfg = dict(cfg, num_stages=1)   # per-element stats gathers: see weight_only
    sign, aux = qweight.sign.contiguous(), qweight.aux.contiguous()
    sal, st = qweight.salient.contiguous(), qweight.stats.contiguous()
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _binary_kernel[grid](x, sign, aux, sal, st, bias_arg(bias, out), out,
                         m, n, k, x.stride(0), out.stride(0), sign.stride(0), st.stride(0),
                         st.stride(1), BLOCK=blk, STAT_MODE=stat_mode, HAS_BIAS=bias is not None,
                         MODE=_mode(x), SWIZZLE=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         **launch_opts(cfg, x.device))
    return out


@triton.jit
def _binary_gemv_kernel(x_ptr, sign_ptr, aux_ptr, sal_ptr, st_ptr, bias_ptr, out_ptr, ws_ptr,
                        N, K, stride_sn, stride_tn, stride_tb, n_words, words_per_split,
                        BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        MODE: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr):
    # One token on the CUDA cores, for blocks of whole 32-bit words. With
    # s = 2b - 1 and a = 2t - 1 (b, t the sign and aux bits), a word's dot
    # product with x only needs five masked sums of x per row: over ordinary
    # columns t*x, b*x, b*t*x, over salient ones b*x and t*x; with the word's
    # plain sums of x over ordinary and salient columns (the same for every
    # row) they give
    #   mu_in (Xo - P1) + al_in (2 (P2 - P3) - (Xo - P1)) + mu_out P1
    #   + al_out (2 P3 - P1) + (mu1 + mu2) Xs + al1 (2 Q1 - Xs) + al2 (2 Q2 - Xs).
    # A bit selects x into a sum (no decode of the weight), and the word's
    # statistics are applied once per word: about 19 SASS instructions per
    # weight on sm_90 at 512 rows x 1 word, against 51 for the MMA kernel.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n2 = offs_n[:, None]
    nm = n2 < N
    rows = n2.to(tl.int64) * stride_sn
    st_rows = st_ptr + n2.to(tl.int64) * stride_tn
    acc = tl.zeros([BLOCK_N, W], dtype=tl.float32)
    w_first = pid_k * words_per_split
    for w0 in range(w_first, w_first + words_per_split, W):
        wid = w0 + tl.arange(0, W)                                         # [W]
        in_w = wid < tl.minimum(n_words, w_first + words_per_split)
        wmask = nm & in_w[None, :]
        sgn = tl.load(sign_ptr + rows + wid[None, :], mask=wmask, other=0)
        aux = tl.load(aux_ptr + rows + wid[None, :], mask=wmask, other=0)
        both = sgn & aux
        sal = tl.load(sal_ptr + wid, mask=in_w, other=0)
        p1 = tl.zeros([BLOCK_N, W], dtype=tl.float32)
        p2 = tl.zeros([BLOCK_N, W], dtype=tl.float32)
        p3 = tl.zeros([BLOCK_N, W], dtype=tl.float32)
        q1 = tl.zeros([BLOCK_N, W], dtype=tl.float32)
        q2 = tl.zeros([BLOCK_N, W], dtype=tl.float32)
        xo = tl.zeros([W], dtype=tl.float32)
        xsal = tl.zeros([W], dtype=tl.float32)
        for j in tl.static_range(32):
            k = wid * 32 + j
            xj = tl.load(x_ptr + k, mask=in_w & (k < K), other=0.0).to(tl.float32)
            salient = ((sal >> j) & 1) != 0
            xs_j = tl.where(salient, xj, 0.0)
            xo_j = tl.where(salient, 0.0, xj)
            xo += xo_j
            xsal += xs_j
            b = ((sgn >> j) & 1) != 0
            t = ((aux >> j) & 1) != 0
            bt = ((both >> j) & 1) != 0
            p1 += tl.where(t, xo_j[None, :], 0.0)
            p2 += tl.where(b, xo_j[None, :], 0.0)
            p3 += tl.where(bt, xo_j[None, :], 0.0)
            q1 += tl.where(b, xs_j[None, :], 0.0)
            q2 += tl.where(t, xs_j[None, :], 0.0)
        blk = (wid * 32 // BLOCK)[None, :]
        st = st_rows + blk * stride_tb
        mu1 = tl.load(st + 0, mask=wmask, other=0.0).to(tl.float32)
        al1 = tl.load(st + 1, mask=wmask, other=0.0).to(tl.float32)
        mu2 = tl.load(st + 2, mask=wmask, other=0.0).to(tl.float32)
        al2 = tl.load(st + 3, mask=wmask, other=0.0).to(tl.float32)
        mu_in = tl.load(st + 4, mask=wmask, other=0.0).to(tl.float32)
        al_in = tl.load(st + 5, mask=wmask, other=0.0).to(tl.float32)
        mu_out = tl.load(st + 6, mask=wmask, other=0.0).to(tl.float32)
        al_out = tl.load(st + 7, mask=wmask, other=0.0).to(tl.float32)
        inner = xo[None, :] - p1
        acc += (mu_in * inner + al_in * (2.0 * (p2 - p3) - inner) + mu_out * p1
                + al_out * (2.0 * p3 - p1) + (mu1 + mu2) * xsal[None, :]
                + al1 * (2.0 * q1 - xsal[None, :]) + al2 * (2.0 * q2 - xsal[None, :]))
    store_token(acc, offs_n, N, pid_k, ws_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, MODE)


@triton.jit
def _binary_dequant_kernel(sign_ptr, aux_ptr, sal_ptr, st_ptr, out_ptr, N, K, stride_sn,
                           stride_tn, stride_tb, stride_on, BLOCK: tl.constexpr,
                           STAT_MODE: tl.constexpr, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    # One [BLOCK_N, BLOCK_K] tile of the dense weight, computed in fp32 as
    # dequantize() computes it and rounded once to the output dtype.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = dequant_binary_tile(sign_ptr, aux_ptr, sal_ptr, st_ptr, offs_n, k0, N, K, stride_sn,
                            stride_tn, stride_tb, STAT_MODE, BLOCK, BLOCK_N, BLOCK_K)
    n2 = offs_n[:, None]
    k2 = (k0 + tl.arange(0, BLOCK_K))[None, :]
    store_out(out_ptr + n2.to(tl.int64) * stride_on + k2, w, (n2 < N) & (k2 < K), MODE)


DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 128


def dequantize(qweight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype``: the values of
    ``qweight.dequantize(dtype)``, bit for bit."""
    dtype_code(dtype)
    n, k = qweight.out_features, qweight.in_features
    sign, aux = qweight.sign.contiguous(), qweight.aux.contiguous()
    sal, st = qweight.salient.contiguous(), qweight.stats.contiguous()
    out = torch.empty(n, k, dtype=dtype, device=sign.device)
    bn, bk = shrink(DEQUANT_BLOCK_N, n), shrink(DEQUANT_BLOCK_K, k, floor=32)
    blk = qweight.block_size
    stat_mode = 0 if blk % bk == 0 else (1 if bk % blk == 0 else 2)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    with on_device(out.device):
        _binary_dequant_kernel[grid](sign, aux, sal, st, out, n, k, sign.stride(0),
                                     st.stride(0), st.stride(1), out.stride(0), BLOCK=blk,
                                     STAT_MODE=stat_mode, MODE=_mode(out), BLOCK_N=bn,
                                     BLOCK_K=bk, num_warps=4, num_stages=1)
    return out


@kernel_entry
def dequant_matmul(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias through the dense weight: ``dequantize`` then one
    GEMM in x's dtype (cuBLAS on a GPU), the reference's arithmetic."""
    return stored_order_linear(x, dequantize(qweight, x.dtype), None, bias)


GEMV_ROWS, GEMV_WORDS = 512, 1     # rows x words of K per tile: many rows share x's work


def gemv_reason(qweight) -> str | None:
    """Why the one-token kernel cannot take this weight, or None."""
    if qweight.block_size % 32:
        return f"block_size {qweight.block_size} is not a whole number of 32-bit words"
    return None


@kernel_entry
def gemv(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, *,
         split_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for one token (x [1, K]) on the CUDA cores
    (``_binary_gemv_kernel``), K split over the grid to fill the SMs."""
    check_one_token("triton.binary_gemv", gemv_reason(qweight), x)
    k, n = x.shape[1], qweight.out_features
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    sign, aux = qweight.sign.contiguous(), qweight.aux.contiguous()
    sal, st = qweight.salient.contiguous(), qweight.stats.contiguous()
    bn = shrink(GEMV_ROWS, n)
    n_tiles, n_words = triton.cdiv(n, bn), sign.shape[1]
    splits, per = split_k_plan(n_tiles, triton.cdiv(n_words, GEMV_WORDS), x.device, split_k)
    ws = torch.empty(splits, 1, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    opts = launch_opts(dict(num_warps=4, num_stages=3), x.device)
    _binary_gemv_kernel[(n_tiles, splits)](
        x, sign, aux, sal, st, bias_arg(bias, out), out, ws, n, k, sign.stride(0),
        st.stride(0), st.stride(1), n_words, per * GEMV_WORDS, BLOCK=qweight.block_size,
        HAS_BIAS=bias is not None, SPLIT=splits > 1, MODE=_mode(x), BLOCK_N=bn, W=GEMV_WORDS,
        **opts)
    if splits > 1:
        splitk_reduce(ws, bias, out)
    return out
