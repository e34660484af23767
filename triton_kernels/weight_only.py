"""Weight-only matmul: y = x @ W^T + bias with W a group-wise W2/W3/W4/W8 weight
(vlmkern.formats.groupwise) read straight from the canonical packed format.

No pack-time re-layout: the kernels read the canonical little-endian bit
stream (code j = stream bits [j*b, j*b+b)) as whole int32 words, BLOCK_K*b/32
per row and K tile, and fan the codes out in registers, so a checkpoint loads
with zero conversion and a tile moves through L1/shared memory at b bits per
weight. The paths, chosen by M:

* M = 1 (decode of one sequence): ``_wo_gemv_kernel`` on
  the CUDA cores (see there), with far fewer instructions per weight than the
  MMA path, whose decoded tile has to be moved into an MMA operand layout.
* M <= 16 (decode; M = 1 too where groups split a word of codes):
  ``_wo_small_kernel``. One program streams a tile of
  BLOCK_N weight rows over a slice of K, dequantizes each [BLOCK_N, BLOCK_K]
  tile in registers and multiplies it with the (at most 16) token rows on the
  tensor cores with the weight tile as the MMA's M operand ("swap AB": 16
  tokens are the narrow N side, so no MMA rows are wasted on padding tokens
  beyond 16). K is split over a second grid axis when N alone cannot fill the
  SMs; partial sums go to an fp32 workspace and a second pass adds them in a
  fixed order, so results are run-to-run identical and, for M = 2..16,
  independent of M.
* M > 16: ``_wo_gemm_kernel``, a tiled GEMM that dequantizes a [BLOCK_K,
  BLOCK_N] weight tile per K step and feeds tl.dot; no split-K. Every M tile
  decodes the whole weight again, so for prefill-sized M the selector takes
  ``dequant_matmul`` instead: ``_wo_dequant_kernel`` writes the dense weight
  once (the reference's values, bit for bit) and one cuBLAS GEMM follows.

Launch configs come from a table per M bucket, never from M itself, so a
row's result is bitwise independent of the other rows in its batch within a
bucket: M = 1, 2..16, 17..64 (the selector's kernels; ``weight_only_matmul``
called directly keeps the config buckets <= 16, <= 128, larger). Above 64
the GEMM is cuBLAS's, whose choice of kernel may depend on M. Activation
order (perm) is handled by gathering x's columns once before the launch;
weights are never gathered.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkern.ops.reference import stored_order_linear

from ._common import (bf16_fixup, bias_arg, check_one_token, dtype_code, get_config, kernel_entry,
                      launch_opts, on_device, round_bf16, shrink, split_k_plan, splitk_reduce,
                      swizzled_tile)


@triton.jit
def codes_at(row_ptrs, idx, mask, n_words, BITS: tl.constexpr):
    """Codes at stream positions ``idx`` of the bit streams starting at
    ``row_ptrs`` (int32 words; any broadcastable shapes). For b | 32 a code
    sits in one word; for b = 3 a code may straddle two, so both candidate
    words are loaded and joined with 32-bit logical shifts (the second load
    hits the same cache line almost always)."""
    bit = idx * BITS
    word = bit >> 5
    shift = bit & 31
    w0 = tl.load(row_ptrs + word, mask=mask, other=0)
    if 32 % BITS == 0:
        # Arithmetic shift is harmless: sign-fill bits land above the mask.
        q = (w0 >> shift) & ((1 << BITS) - 1)
    else:
        # The "+ 0 * mask" keeps the comparison a tensor when idx is a scalar.
        nxt = word + 1 + 0 * mask.to(tl.int32)
        w1 = tl.load(row_ptrs + word + 1, mask=mask & (nxt < n_words), other=0)
        lo = w0.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
        # (32 - shift) & 31 keeps the shift amount < 32 (a 32-bit shift by 32
        # is undefined in PTX); that lane is discarded by the where anyway.
        hi = w1.to(tl.uint32, bitcast=True) << ((32 - shift) & 31).to(tl.uint32)
        both = tl.where(shift > 32 - BITS, lo | hi, lo)
        q = (both & ((1 << BITS) - 1)).to(tl.int32)
    return q


@triton.jit
def unpack_rows(row_ptrs, n_mask, k0, n_words, BITS: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Codes k0 .. k0 + BLOCK_K of ROWS bit streams -> int32 [ROWS, BLOCK_K].

    Loads each int32 word once (BLOCK_K*b/32 words per row: the tile moves
    through L1/shared memory at b bits per code, not 32) and fans the codes
    out in registers with shifts. k0 is a multiple of 32, so a tile starts
    on a word boundary for every b. Codes past the stream end read as 0."""
    if 32 % BITS == 0:
        # 32/b codes per word, none straddles: [ROWS, words, codes] -> reshape.
        wid = k0 * BITS // 32 + tl.arange(0, BLOCK_K * BITS // 32)
        words = tl.load(row_ptrs + wid[None, :], mask=n_mask & (wid[None, :] < n_words), other=0)
        sh = tl.arange(0, 32 // BITS) * BITS
        q = (words[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
    else:
        # b = 3: every 32 codes fill exactly 3 words; code c of a period
        # starts at bit 3c of the period, in word 3c >> 5, and codes 10 and
        # 21 straddle into the next word. Select the two candidate words per
        # code, then one 32-bit funnel shift.
        base = k0 * 3 // 32 + 3 * tl.arange(0, BLOCK_K // 32)
        wmask = n_mask & (base[None, :] < n_words)
        wa = tl.load(row_ptrs + base[None, :], mask=wmask, other=0)[:, :, None]
        wb = tl.load(row_ptrs + base[None, :] + 1, mask=wmask & (base[None, :] + 1 < n_words),
                     other=0)[:, :, None]
        wc = tl.load(row_ptrs + base[None, :] + 2, mask=wmask & (base[None, :] + 2 < n_words),
                     other=0)[:, :, None]
        bit = tl.arange(0, 32) * 3
        sel = (bit >> 5)[None, None, :]
        shift = (bit & 31)[None, None, :]
        lo_w = tl.where(sel == 0, wa, tl.where(sel == 1, wb, wc))
        hi_w = tl.where(sel == 0, wb, wc)
        lo = lo_w.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
        hi = hi_w.to(tl.uint32, bitcast=True) << ((32 - shift) & 31).to(tl.uint32)
        q = (tl.where(shift > 29, lo | hi, lo) & 7).to(tl.int32)
    return tl.reshape(q, [ROWS, BLOCK_K])


@triton.jit
def spread(v, ROWS: tl.constexpr, PER: tl.constexpr, REPEAT: tl.constexpr):
    """[ROWS, PER] -> [ROWS, PER*REPEAT], each column repeated REPEAT times
    (a per-group value laid over the group's columns, in registers)."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], [ROWS, PER, REPEAT]), [ROWS, PER * REPEAT])


@triton.jit
def dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, stride_zn,
                 n_words, z_words,
                 BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile W[offs_n, k0 : k0 + BLOCK_K] = s * (q - z), [BLOCK_N, BLOCK_K].
    GROUP 0 means one group per row. Rows past N and columns past K come
    out 0: a padding column's code reads as 0, and -z * s can exceed the
    activation dtype's range (fp16) even when every real weight fits, so
    that its Inf would meet the zero activations there and make NaN."""
    n2 = offs_n[:, None]
    nm = n2 < N
    k2 = (k0 + tl.arange(0, BLOCK_K))[None, :]
    mask = nm & (k2 < K)
    q = unpack_rows(qw_ptr + n2.to(tl.int64) * stride_qn, nm, k0, n_words, BITS, BLOCK_N,
                    BLOCK_K)
    s_rows = s_ptr + n2.to(tl.int64) * stride_sn
    z_rows = z_ptr + n2.to(tl.int64) * stride_zn
    z = 1 << (BITS - 1)
    if GROUP == 0 or GROUP % BLOCK_K == 0:
        # The tile lies inside one group: one scale (and zero) per row.
        if GROUP == 0:
            gi = k0 * 0
        else:
            gi = k0 // GROUP
        gmask = nm & ((n2 * 0 + k0) < K)
        s = tl.load(s_rows + gi, mask=gmask, other=0.0).to(tl.float32)
        if ASYM:
            z = codes_at(z_rows, gi, gmask, z_words, BITS)
    elif BLOCK_K % GROUP == 0:
        # A few whole groups per tile: load BLOCK_K/GROUP scales per row and
        # spread them over their columns in registers.
        gi = (k0 // GROUP + tl.arange(0, BLOCK_K // GROUP))[None, :]
        gmask = nm & (gi * GROUP < K)
        s = spread(tl.load(s_rows + gi, mask=gmask, other=0.0).to(tl.float32),
                   BLOCK_N, BLOCK_K // GROUP, GROUP)
        if ASYM:
            z = spread(codes_at(z_rows, gi, gmask, z_words, BITS), BLOCK_N, BLOCK_K // GROUP,
                       GROUP)
    else:
        # Group not aligned to the tile (e.g. 48): per-element gather; the
        # scale row is tiny and stays in L1.
        gi = k2 // GROUP
        s = tl.load(s_rows + gi, mask=mask, other=0.0).to(tl.float32)
        if ASYM:
            z = codes_at(z_rows, gi, mask, z_words, BITS)
    return tl.where(mask, (q - z).to(tl.float32) * s, 0.0)


@triton.jit
def weight_operand(w, x, MODE: tl.constexpr):
    """The fp32 weight tile as an MMA operand next to activations ``x``."""
    if MODE == 0:
        return w.to(x.dtype)
    elif MODE == 2:
        return round_bf16(w)
    else:
        return w


@triton.jit
def mma(a, b, acc, MODE: tl.constexpr):
    """acc += a @ b. MODE 0: operands in the activation dtype (fp16/bf16
    tensor cores, fp32 accumulate). MODE 1: fp32 operands with IEEE products
    (no silent TF32 for fp32 activations). MODE 2 (interpreter, bf16): bf16
    values carried in fp32, because the interpreter's dot misreads bf16;
    products of bf16 values are exact in fp32, so this is a bf16 MMA's math."""
    if MODE == 0:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def store_out(ptrs, acc, mask, MODE: tl.constexpr):
    if MODE == 2:
        acc = round_bf16(acc)
    tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _wo_small_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr,
                     M, N, K, stride_xm, stride_om, stride_qn, stride_sn, stride_zn,
                     n_words, z_words, tiles_per_split,
                     BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, MODE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n2 = offs_n[:, None]
    m_row = offs_m[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_first = pid_k * tiles_per_split * BLOCK_K
    for t in range(0, tiles_per_split):
        k0 = k_first + t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, stride_zn,
                         n_words, z_words, BITS, GROUP, ASYM, BLOCK_N, BLOCK_K)
        # x^T tile [BLOCK_K, BLOCK_M]; padding token columns are zero and
        # never mix into real columns of the MMA result.
        xt = tl.load(x_ptr + m_row.to(tl.int64) * stride_xm + offs_k[:, None],
                     mask=(m_row < M) & (offs_k[:, None] < K), other=0.0)
        acc = mma(weight_operand(w, xt, MODE), xt, acc, MODE)
    omask = (m_row < M) & (n2 < N)
    if SPLIT:
        tl.store(ws_ptr + pid_k * M * N + m_row * N + n2, acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)
        store_out(out_ptr + m_row.to(tl.int64) * stride_om + n2, acc, omask, MODE)


@triton.jit
def store_token(acc, offs_n, N, pid_k, ws_ptr, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr,
                SPLIT: tl.constexpr, MODE: tl.constexpr):
    """A one-token kernel's end: the per-word sums acc [BLOCK_N, W] added
    across words, then stored as this K slice's fp32 partials, or with the
    bias as the output row."""
    y = tl.sum(acc, axis=1)
    if SPLIT:
        tl.store(ws_ptr + pid_k * N + offs_n, y, mask=offs_n < N)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        store_out(out_ptr + offs_n, y, offs_n < N, MODE)


@triton.jit
def _field_times_pow2(w, high, POS: tl.constexpr, BITS: tl.constexpr):
    """The BITS-bit field at bit POS of w (POS + BITS <= 32) as the fp32
    number q * 2^p, and 2^-p: the field ORed into 2^23 (0x4B000000) is
    2^23 + q * 2^p, so subtracting 2^23 leaves q * 2^p exactly, with no
    int-to-float instruction; fields ending past bit 20 are read from
    ``high`` (w >> 12), shifted once per word for all of them."""
    if POS + BITS <= 20:
        field = (w & (((1 << BITS) - 1) << POS)) | 0x4B000000
        unscale = 1.0 / (1 << POS)
    else:
        field = (high & (((1 << BITS) - 1) << (POS - 12))) | 0x4B000000
        unscale = 1.0 / (1 << (POS - 12))
    return field.to(tl.float32, bitcast=True) - 8388608.0, unscale


@triton.jit
def _wo_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr,
                    N, K, stride_qn, stride_sn, stride_zn, n_words, z_words, tiles_per_split,
                    BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, MODE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One token on the CUDA cores, groups of whole units. A unit is one 32-bit
    # word of 2/4/8-bit codes, or the three words holding 32 3-bit codes.
    # Code j of every unit of the [BLOCK_N, U] tile is taken at once, in the
    # layout the words were loaded in (nothing goes through shared memory to
    # an MMA operand layout), and multiplied with x in fp32; a unit's
    # products are summed in registers, then its group's zero and scale are
    # applied once per unit, and the per-unit sums accumulate over the K
    # tiles, reduced across units only at the end.
    CPU: tl.constexpr = 32 if BITS == 3 else 32 // BITS      # codes per unit
    U: tl.constexpr = BLOCK_K // CPU
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n2 = offs_n[:, None]
    nm = n2 < N
    rows = qw_ptr + n2.to(tl.int64) * stride_qn
    s_rows = s_ptr + n2.to(tl.int64) * stride_sn
    z_rows = z_ptr + n2.to(tl.int64) * stride_zn
    acc = tl.zeros([BLOCK_N, U], dtype=tl.float32)
    k_first = pid_k * tiles_per_split * BLOCK_K
    for t in range(0, tiles_per_split):
        k0 = k_first + t * BLOCK_K
        uid = (k0 // CPU + tl.arange(0, U))[None, :]                       # [1, U]
        if BITS == 3:
            wid = uid * 3
            w0 = tl.load(rows + wid, mask=nm & (wid < n_words), other=0)
            w1 = tl.load(rows + wid + 1, mask=nm & (wid + 1 < n_words), other=0)
            w2 = tl.load(rows + wid + 2, mask=nm & (wid + 2 < n_words), other=0)
            h0, h1, h2 = w0 >> 12, w1 >> 12, w2 >> 12
        else:
            wid = uid
            w0 = tl.load(rows + wid, mask=nm & (wid < n_words), other=0)
            h0 = w0 >> 12
        if GROUP == 0 or GROUP % BLOCK_K == 0:
            # the step lies in one group: its scale and zero as row vectors
            # (see GEMV_TILES)
            g1 = 0 if GROUP == 0 else k0 // GROUP
            rmask = (offs_n < N) & (k0 + 0 * offs_n < K)
            s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + g1, mask=rmask,
                        other=0.0).to(tl.float32)[:, None]
            if ASYM:
                z = codes_at(z_ptr + offs_n.to(tl.int64) * stride_zn, g1 + 0 * offs_n, rmask,
                             z_words, BITS).to(tl.float32)[:, None]
            else:
                z = tl.full([1, 1], 1 << (BITS - 1), tl.float32)
        else:
            gi = uid * CPU // GROUP
            umask = nm & (wid < n_words)
            s = tl.load(s_rows + gi, mask=umask, other=0.0).to(tl.float32)
            if ASYM:
                z = codes_at(z_rows, gi, umask, z_words, BITS).to(tl.float32)
            else:
                z = tl.full([1, 1], 1 << (BITS - 1), tl.float32)
        offs = k0 + tl.arange(0, U) * CPU                                  # unit starts
        dot = tl.zeros([BLOCK_N, U], dtype=tl.float32)
        xsum = tl.zeros([U], dtype=tl.float32)
        for j in tl.static_range(CPU):
            xj = tl.load(x_ptr + offs + j, mask=offs + j < K, other=0.0).to(tl.float32)
            xsum += xj
            if BITS != 3:
                qj, unscale = _field_times_pow2(w0, h0, BITS * j, BITS)
            elif (3 * j) % 32 + 3 <= 32:
                if (3 * j) // 32 == 0:
                    qj, unscale = _field_times_pow2(w0, h0, (3 * j) % 32, 3)
                elif (3 * j) // 32 == 1:
                    qj, unscale = _field_times_pow2(w1, h1, (3 * j) % 32, 3)
                else:
                    qj, unscale = _field_times_pow2(w2, h2, (3 * j) % 32, 3)
            else:
                # codes 10 and 21 straddle two words: join the two parts first
                if j == 10:
                    q = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
                else:
                    q = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
                qj = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                unscale = 1.0
            dot += qj * (xj * unscale)[None, :]
        acc += (dot - z * xsum[None, :]) * s
    store_token(acc, offs_n, N, pid_k, ws_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, MODE)


@triton.jit
def _wo_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
                    M, N, K, stride_xm, stride_om, stride_qn, stride_sn, stride_zn,
                    n_words, z_words,
                    BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, SWIZZLE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grouped program order: SWIZZLE consecutive programs share one band of
    # weight columns, so a dequantized-from-DRAM weight tile is re-read from
    # L2 by the neighbouring M tiles instead of from HBM.
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
        w = dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, stride_zn,
                         n_words, z_words, BITS, GROUP, ASYM, BLOCK_N, BLOCK_K)
        acc = mma(x, tl.trans(weight_operand(w, x, MODE)), acc, MODE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_col, mask=n_col < N, other=0.0).to(tl.float32)
    store_out(out_ptr + m2.to(tl.int64) * stride_om + n_col, acc, (m2 < M) & (n_col < N), MODE)


@triton.jit
def _wo_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_zn,
                       stride_on, n_words, z_words,
                       BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                       MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One [BLOCK_N, BLOCK_K] tile of the dense weight (stored column order):
    # s * (q - z) in fp32, rounded once to the output dtype, as dequantize().
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, stride_zn,
                     n_words, z_words, BITS, GROUP, ASYM, BLOCK_N, BLOCK_K)
    n2 = offs_n[:, None]
    k2 = (k0 + tl.arange(0, BLOCK_K))[None, :]
    store_out(out_ptr + n2.to(tl.int64) * stride_on + k2, w, (n2 < N) & (k2 < K), MODE)


DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 128


def dequantize(qweight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` with columns in stored order (act
    order not undone): s * (q - z) computed in fp32 and rounded once, the
    values of ``qweight.dequantize(dtype)``."""
    dtype_code(dtype)
    n, k = qweight.out_features, qweight.in_features
    qw, sc, qz, group = packed_operands(qweight)
    out = torch.empty(n, k, dtype=dtype, device=qw.device)
    bn, bk = shrink(DEQUANT_BLOCK_N, n), shrink(DEQUANT_BLOCK_K, k, floor=32)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    with on_device(out.device):
        _wo_dequant_kernel[grid](qw, sc, qz, out, n, k, qw.stride(0), sc.stride(0), qz.stride(0),
                                 out.stride(0), qw.shape[1], qz.shape[1], BITS=qweight.bits,
                                 GROUP=group, ASYM=qweight.qzeros is not None, MODE=_mode(out),
                                 BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1)
    return out


@kernel_entry
def dequant_matmul(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias through the dense weight: ``dequantize`` then one
    GEMM in x's dtype (cuBLAS on a GPU), the reference's arithmetic."""
    return stored_order_linear(x, dequantize(qweight, x.dtype), qweight.perm, bias)


def packed_operands(qweight):
    """(codes, scales, zero codes, GROUP) as the kernels take them: contiguous
    tensors (the codes stand in for absent zeros; ASYM says which), and the
    group size, 0 for one group per row."""
    qw, sc = qweight.qweight.contiguous(), qweight.scales.contiguous()
    qz = qweight.qzeros.contiguous() if qweight.qzeros is not None else qw
    g, k = qweight.group_size, qweight.in_features
    return qw, sc, qz, (g if g is not None and g < k else 0)


def _mode(x: torch.Tensor) -> int:
    if x.dtype == torch.float32:
        return 1
    if bf16_fixup(x):
        return 2
    return 0


# One-token tiles (rows, columns): 32 bytes of codes per row and step (a whole
# sector; W3 takes one 32-code unit) and 16K weights. With every step inside
# one group, the group's scale and zero are loaded as row vectors, which keeps
# the decode at 6-8 SASS instructions per weight on sm_90 with Triton 3.6 and
# 3.9 alike (per-unit scales cost 3.6 a layout conversion of every step's
# products: 12-18); ``gemv_tile`` narrows the step for smaller groups.
GEMV_TILES = {2: (128, 128), 3: (512, 32), 4: (256, 64), 8: (512, 32)}
_GEMV_TILE_WEIGHTS = 16384


def gemv_tile(bits: int, group: int) -> tuple[int, int]:
    """(rows, columns) of the one-token kernel's tile for a group size
    (0: one group per row): a step of ``group`` columns when groups of 32 or
    more are narrower than the default step, so each step keeps one group."""
    bn, bk = GEMV_TILES[bits]
    if 32 <= group < bk and bk % group == 0:
        return _GEMV_TILE_WEIGHTS // group, group
    return bn, bk


def gemv_reason(qweight) -> str | None:
    """Why the one-token kernel cannot take this weight, or None."""
    if qweight.bits not in GEMV_TILES:
        return f"{qweight.bits}-bit codes are not taken by the one-token kernel (2, 3, 4, 8)"
    unit = 32 if qweight.bits == 3 else 32 // qweight.bits
    g, k = qweight.group_size, qweight.in_features
    if g is not None and g < k and g % unit:
        return f"group size {g} is not a whole number of {unit}-code units"
    return None


@kernel_entry
def gemv(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, *,
         split_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for one token (x [1, K]) on the CUDA cores
    (``_wo_gemv_kernel``); fp32 products of the exact codes, scales applied
    per word of codes. K is split over the grid as in the small-M path."""
    check_one_token("triton.weight_only_gemv", gemv_reason(qweight), x)
    k, n = x.shape[1], qweight.out_features
    if qweight.perm is not None:
        x = x.index_select(1, qweight.perm.long())
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    qw, sc, qz, group = packed_operands(qweight)
    bn, bk = gemv_tile(qweight.bits, group)
    bn = shrink(bn, n)
    n_tiles = triton.cdiv(n, bn)
    splits, per = split_k_plan(n_tiles, triton.cdiv(k, bk), x.device, split_k)
    ws = torch.empty(splits, 1, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    opts = launch_opts(dict(num_warps=4, num_stages=3), x.device)
    _wo_gemv_kernel[(n_tiles, splits)](
        x, qw, sc, qz, bias_arg(bias, out), out, ws, n, k, qw.stride(0),
        sc.stride(0), qz.stride(0), qw.shape[1], qz.shape[1], per, BITS=qweight.bits,
        GROUP=group, ASYM=qweight.qzeros is not None, HAS_BIAS=bias is not None,
        SPLIT=splits > 1, MODE=_mode(x), BLOCK_N=bn, BLOCK_K=bk, **opts)
    if splits > 1:
        splitk_reduce(ws, bias, out)
    return out


@kernel_entry
def weight_only_matmul(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, *,
                       config: dict | None = None, split_k: int | None = None,
                       path: str | None = None) -> torch.Tensor:
    """y = x @ W^T + bias. x [M, K] float16/bfloat16/float32, qweight a
    QuantizedWeight [N, K], bias [N] or None -> [M, N] in x's dtype (fp32
    accumulation). ``config``/``split_k``/``path`` ("small" or "gemm")
    override the table; the defaults depend on M only through its bucket."""
    m, k = x.shape
    n = qweight.out_features
    dtype_code(x.dtype)
    if qweight.perm is not None:
        x = x.index_select(1, qweight.perm.long())
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    path = path or ("small" if m <= 16 else "gemm")
    cfg = get_config("weight_only", max(m, 17) if path == "gemm" else 1, config, x.dtype)
    # BLOCK_K >= 32 keeps every K tile on a word boundary of the bit stream.
    bn, bk = shrink(cfg["BLOCK_N"], n), shrink(cfg["BLOCK_K"], k, floor=32)
    qw, sc, qz, group = packed_operands(qweight)
    common = dict(BITS=qweight.bits, GROUP=group, ASYM=qweight.qzeros is not None,
                  MODE=_mode(x), BLOCK_N=bn, BLOCK_K=bk)
    b = bias_arg(bias, out)
    args = (m, n, k, x.stride(0), out.stride(0), qw.stride(0), sc.stride(0), qz.stride(0),
            qw.shape[1], qz.shape[1])
    if group and bk % group and group % bk:
        # Unaligned groups gather a scale per element; pipelining those
        # gathers would multiply their shared-memory footprint by the stage
        # count (past the 99 KB of sm_86/89), so this rare case runs unpipelined.
        cfg = dict(cfg, num_stages=1)
    opts = launch_opts(cfg, x.device)
    if path == "small":
        if m > 16:
            raise ValueError(f"the small-M path takes M <= 16, got {m}")
        n_tiles = triton.cdiv(n, bn)
        splits, per = split_k_plan(n_tiles, triton.cdiv(k, bk), x.device, split_k)
        ws = (torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
              if splits > 1 else out)
        _wo_small_kernel[(n_tiles, splits)](
            x, qw, sc, qz, b, out, ws, *args, per, HAS_BIAS=bias is not None,
            SPLIT=splits > 1, BLOCK_M=16, **common, **opts)
        if splits > 1:
            splitk_reduce(ws, bias, out)
        return out
    bm = cfg["BLOCK_M"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _wo_gemm_kernel[grid](x, qw, sc, qz, b, out, *args, HAS_BIAS=bias is not None,
                          SWIZZLE=8, BLOCK_M=bm, **common, **opts)
    return out
