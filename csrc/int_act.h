// C interface of the integer-activation GEMM kernels (W8A8, W6A6, W4A4 and
// mixed widths) in int_act_kernel.cu.
//
// Free of torch and CUDA types so the torch binding (and any host code) can
// include it with a plain C++ compiler. Every launcher only enqueues work on
// the given stream and returns a status code; 0 means enqueued.
//
// Padded K layout. The GEMM sees K in a padded form shared by the quantized
// activations and the re-laid-out weights: logical group i (group_size g,
// or the whole row for per-channel weights) occupies padded positions
// [i*gp, i*gp + g), gp = g rounded up to the MMA k-step, and the positions
// after it up to (i+1)*gp hold zeros; the row is zero-filled up to k_pad, a
// multiple of 2 k-steps. Zeros add nothing to an integer dot product, so the
// padded GEMM equals the unpadded one exactly.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types (same numbering as vlmkern_kernels.h).
enum vlmkern_int_act_dtype {
  VLMKERN_INT_ACT_F16 = 0,
  VLMKERN_INT_ACT_BF16 = 1,
  VLMKERN_INT_ACT_F32 = 2,
};

// How the quantized activations are stored, which fixes the MMA.
//   I8     int8 codes [M, k_pad]; int8 weights [N, k_pad]; mma m16n8k32 s8.
//   I4     int4 codes [M, k_pad/2] (element 2j in the low nibble of byte j);
//          int4 weights the same way; mma m16n8k64 s4 (sm_80..sm_89 only).
//   I4W8   int8 codes [M, k_pad], permuted inside every 32-element chunk
//          (stored byte p < 16 holds chunk element 8*(p/4) + 2*(p%4), byte
//          p >= 16 holds that element + 1 for p - 16); int4 weights as in I4.
//          The kernel widens each weight nibble to an int8 (times 16) in
//          registers and runs mma m16n8k32 s8 (Hopper has no int4 MMA).
enum vlmkern_int_act_mode {
  VLMKERN_INT_ACT_I8 = 0,
  VLMKERN_INT_ACT_I4 = 1,
  VLMKERN_INT_ACT_I4W8 = 2,
};

// The GEMM behind vlmkern_int_act_gemm.
//   MMA    mma.sync tensor-core tiles (int_act_kernel.cu), every mode, sm_80+.
//   WGMMA  Hopper warpgroup MMA from shared-memory descriptors
//          (int_act_sm90_kernel.cu), mode I8, sm_90a; same bits as MMA.
//   MMA_SPREAD  MMA with the activation reads spread for M <= 64: token rows
//          past M zero-filled, and with one weight group per row each block
//          starting its K walk at its own k-tile; same bits as MMA (exact
//          int32 sums). Larger M runs the MMA GEMM.
//   TMA    Hopper warpgroup MMA fed by TMA copies in a warp-specialized
//          pipeline, weight tiles multicast to a cluster of two thread blocks
//          (int_act_sm90_tma_kernel.cu), mode I8 with one group per row,
//          sm_90a; same bits as MMA.
enum vlmkern_int_act_gemm_kind {
  VLMKERN_INT_ACT_GEMM_MMA = 0,
  VLMKERN_INT_ACT_GEMM_WGMMA = 1,
  VLMKERN_INT_ACT_GEMM_MMA_SPREAD = 2,
  VLMKERN_INT_ACT_GEMM_TMA = 3,
};

// The most token rows one vlmkern_int_act_gemm call takes: its grid has a
// 128-token tile per block row, at most 65535 of them.
#define VLMKERN_INT_ACT_MAX_M (128LL * 65535)

enum vlmkern_int_act_status {
  VLMKERN_INT_ACT_OK = 0,
  VLMKERN_INT_ACT_ERR_NULL_POINTER = 1,  // a required pointer is null
  VLMKERN_INT_ACT_ERR_BAD_BITS = 2,      // a_bits not 4, 6 or 8
  VLMKERN_INT_ACT_ERR_BAD_SIZE = 3,      // inconsistent M, N, K, group or padding, or alignment
  VLMKERN_INT_ACT_ERR_BAD_DTYPE = 4,     // unknown element type code
  VLMKERN_INT_ACT_ERR_BAD_MODE = 5,      // unknown mode or gemm, I4 on a GPU without int4 MMA,
                                         // or WGMMA/TMA off sm_90, without sm_90a code in
                                         // this build or with a mode other than I8 (TMA:
                                         // also with more than one group)
  VLMKERN_INT_ACT_ERR_LAUNCH = 6,        // cudaGetLastError reported a failure
};

// Text for a status code; for ERR_LAUNCH it names the CUDA error of the last
// failed launch on the calling thread.
const char* vlmkern_int_act_status_message(int status);

// Per-token symmetric quantization into the padded layout of `mode`.
//   x        [M, K] row-major, row stride x_stride (elements), of x_dtype.
//   q        output codes, [M, k_pad] int8 (I8, I4W8) or [M, k_pad/2] (I4).
//   scales   output fp32 [M].
//   static_scale  > 0: use it for every token (the calibrated act_scale);
//                 <= 0: per token, absmax / (2^(a_bits-1) - 1), 1 for a zero row.
// codes = clamp(rint(x / s), -lim, lim) with IEEE division and ties to even,
// NaN -> 0. A token holding NaN gets scale NaN and one holding +-Inf (but no
// NaN) gets scale Inf, also under a static scale, so its output row is not
// finite. One thread block per token, one launch for all tokens.
int vlmkern_int_act_quantize(const void* x, int x_dtype, int64_t x_stride, void* q,
                             float* scales, int64_t M, int64_t K, int a_bits,
                             float static_scale, int64_t group, int64_t group_pad,
                             int64_t k_pad, int mode, void* stream);

// out[m, n] = cast(sum_i float(acc_i[m, n]) * w_scale[i, n]) * sx[m] + bias[n]),
// acc_i = exact int32 dot product of group i, groups summed in order with fp32
// fused multiply-adds (bitwise independent of M and of the tile shape).
//   q          quantized activations from vlmkern_int_act_quantize (same mode).
//   sx         fp32 [M] token scales.
//   w          weight codes in the padded layout: [N, k_pad] int8 (I8) or
//              [N, k_pad/2] int4 pairs (I4, I4W8); rows of any N.
//   w_scale    fp32 [G, N] (transposed: one row per group), G = number of groups.
//   bias       [N] of bias_dtype, or null.
//   out        [M, N] row-major contiguous of out_dtype (F16, BF16 or F32).
//   group_pad  gp; a multiple of 32 (I8, I4W8) or 64 (I4); k_pad a multiple
//              of 64 (I8, I4W8) or 128 (I4), and G * gp <= k_pad.
// All pointers must be 16-byte aligned. I4 is refused on sm_90 and newer.
//   gemm       which GEMM runs it (vlmkern_int_act_gemm_kind): MMA or
//              MMA_SPREAD on any GPU from sm_80, or WGMMA / TMA (mode I8 only,
//              TMA with one group; sm_90 with this build's sm_90a code, else
//              ERR_BAD_MODE; the first such call per device runs
//              vlmkern_int_act_sm90_available's probe).
int vlmkern_int_act_gemm(const void* q, const float* sx, const void* w, const float* w_scale,
                         const void* bias, int bias_dtype, void* out, int out_dtype, int64_t M,
                         int64_t N, int64_t groups, int64_t group_pad, int64_t k_pad, int mode,
                         int gemm, void* stream);

// *available = 1 when the current device is sm_90 and this build holds the
// sm_90a code of the WGMMA GEMMs (this file's and the weight-only one), else
// 0. The first call per device runs a one-thread probe kernel and waits for
// it (make it outside stream capture); later calls return the cached answer.
int vlmkern_int_act_sm90_available(int* available);

// Epilogue for an int32 product computed elsewhere (per-channel weights, one
// group): out[m, n] = cast(float(acc[m, n]) * w_scale[n] * sx[m] + bias[n]) with
// exactly the rounding steps of vlmkern_int_act_gemm, so both routes agree
// bit for bit. acc is [M, N] int32 with row stride acc_stride.
int vlmkern_int_act_scale_int32(const int32_t* acc, int64_t acc_stride, const float* sx,
                                const float* w_scale, const void* bias, int bias_dtype, void* out,
                                int out_dtype, int64_t M, int64_t N, void* stream);

#ifdef __cplusplus
}
#endif
