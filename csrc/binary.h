// C interface of the binarized (BiLLM-style) matmul in binary_kernel.cu.
//
// Free of torch and CUDA types. The launcher only enqueues work on the given
// stream and returns a status code; 0 means enqueued.
//
// Weight format (vlmkern.formats.binary): per row n, bit planes sign and aux
// (bit k % 32 of word k / 32), a salient-column bitmap shared by all rows, and
// 8 statistics per row and block of block_size columns:
//   salient column:  w = mu1 + alpha1*s + mu2 + alpha2*a
//   other column:    w = mu_t + alpha_t*s with t = aux bit (1: outer group)
// with s, a = +1 for a set bit, -1 otherwise.
//
// Method. With a = +1 for the outer group, a non-salient weight is
//   w = m + dm*a + al*s + dal*(a*s),  m = (mu_out + mu_in)/2, dm = (mu_out - mu_in)/2,
//                                     al, dal likewise from alpha_out, alpha_in,
// so per row and block the dot product with x needs the +-1 sums x'.s, x'.a,
// x'.(a*s) over the non-salient part x' of x, and x''.s, x''.a over the
// salient part x'' (plus the block sums of x' and x''). Those sums come from
// fp16/bf16 tensor-core MMAs whose A operand is the sign planes turned into
// +-1 halves (one shift and one logic op per pair of weights) and whose B
// operand is x' and x'' side by side; the block statistics are applied to the
// fp32 results once per block. No dense weight is ever formed.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum vlmkern_binary_dtype {
  VLMKERN_BINARY_F16 = 0,
  VLMKERN_BINARY_BF16 = 1,
  VLMKERN_BINARY_F32 = 2,  // statistics and bias only
};

// The most token rows one vlmkern_binary_matmul call takes: its grid has a
// 16-token group per z index, at most 65535 of them.
#define VLMKERN_BINARY_MAX_M (16LL * 65535)

enum vlmkern_binary_status {
  VLMKERN_BINARY_OK = 0,
  VLMKERN_BINARY_ERR_NULL_POINTER = 1,  // a required pointer is null
  VLMKERN_BINARY_ERR_BAD_SIZE = 2,      // inconsistent sizes, block size, split or alignment
  VLMKERN_BINARY_ERR_BAD_DTYPE = 3,     // x not f16/bf16, or unknown stats/bias type
  VLMKERN_BINARY_ERR_LAUNCH = 4,        // cudaGetLastError reported a failure
};

// Text for a status code; for ERR_LAUNCH it names the last CUDA launch error
// on the calling thread.
const char* vlmkern_binary_status_message(int status);

// Bytes of scratch memory vlmkern_binary_matmul needs (-1 for invalid sizes).
int64_t vlmkern_binary_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t block_size,
                                       int ksplit);

// out[m, n] = sum_k x[m, k] * w[n, k] + bias[n], fp32 accumulation, rounded
// once to x's type.
//   x           [M, K] of x_dtype (F16 or BF16), row stride x_stride elements.
//   salient     int32 [ceil(K/32)] column bitmap.
//   sign, aux   int32 [N, plane_stride] bit planes; plane_stride >= ceil(K/32)
//               words, a multiple of 4, 16-byte aligned rows; unused bits zero.
//   stats       [N, ceil(K/block_size), 8] of stats_dtype (F16, BF16, F32), contiguous.
//   bias        [N] of bias_dtype or null.
//   out         [M, N] row-major contiguous, of x_dtype.
//   block_size  a multiple of 32.
//   ksplit      number of parts K is split into (>= 1); the split depends only
//               on the caller's choice, never on M, so results are batch-invariant.
//   workspace   vlmkern_binary_workspace_bytes(...) bytes, 256-byte aligned.
int vlmkern_binary_matmul(const void* x, int x_dtype, int64_t x_stride, const int32_t* salient,
                          const int32_t* sign, const int32_t* aux, int64_t plane_stride,
                          const void* stats, int stats_dtype, const void* bias, int bias_dtype,
                          void* out, int64_t M, int64_t N, int64_t K, int64_t block_size,
                          int ksplit, void* workspace, void* stream);

// The dense weight out[n, k] of the format, for dequantize + one GEMM at
// prefill sizes (binary_dequant_kernel.cu): each value computed from the
// statistics in fp32 with the operations and order of the Python reference
// (BinaryWeight.dequantize), then rounded once to out_dtype, so the result
// equals dequantize(out_dtype) bit for bit.
//   sign, aux   int32 [N, ceil(K/32)] bit planes, contiguous.
//   salient     int32 [ceil(K/32)] column bitmap.
//   stats       [N, ceil(K/block_size), 8] of stats_dtype (F16, BF16, F32), contiguous.
//   out         [N, K] of out_dtype (F16 or BF16), contiguous, 16-byte aligned.
//   K and block_size multiples of 8 (a thread writes 8 columns of one block).
// Returns a vlmkern_binary_status (vlmkern_binary_dequant_status_message).
int vlmkern_binary_dequant(const int32_t* sign, const int32_t* aux, const int32_t* salient,
                           const void* stats, int stats_dtype, int64_t N, int64_t K,
                           int64_t block_size, void* out, int out_dtype, void* stream);
const char* vlmkern_binary_dequant_status_message(int status);

// The same dense weight from the lookup-table layout below, for a layer that
// holds its sign and aux bits only there (binary_dequant_kernel.cu): each
// value is its row's table entry, so out equals the layout's weight (and
// dequantize() in the tables' dtype) bit for bit.
//   codes    int32 [ceil(N/128), ceil(K/128), 8, 128] 2-bit indices.
//   tables   int32 [ceil(N/128), ceil(K/128), 8, 8, 2, 4] 16-bit entries of out's dtype,
//            16-byte aligned.
//   salient  int32 [ceil(K/32)] column bitmap (the format's).
//   out      [N, K] 16-bit values, contiguous, 16-byte aligned; K a multiple of 8.
// Returns a vlmkern_binary_status (vlmkern_binary_dequant_status_message).
int vlmkern_binary_lut_dequant(const int32_t* codes, const int32_t* tables, const int32_t* salient,
                               int64_t N, int64_t K, void* out, void* stream);

#ifdef __cplusplus
}
#endif

// ---------------------------------------------------------------------------
// Lookup-table GEMM (binary_lut_kernel.cu), decode sizes M = 1..64.
//
// With block size 128, every weight of a row and 128-column block is one of 8
// values: ordinary column  w = table_ord[i],  salient column  w = table_sal[i],
// i = s + 2a of its sign and aux bits (1 = set). The load-time layout
// (vlmkern/ops/cuda_binary_lut.py) stores, for NB = ceil(N/128) row blocks and
// C = ceil(K/128) chunks, tiles (b, c, w) of rows b*128 + w*16 + 0..15 and
// columns c*128 + 0..127, in the m16n8k16 A-fragment order (lane 4g + t,
// register r of k16 step kt: rows g + 8*(r%2), columns 16kt + 2t + 8*(r/2) + h):
//   codes   int32 [NB, C, 8, 128]: per tile [32 lanes][4 words]; word kt/2
//           holds pair j = 4*(kt%2) + r, i_h at bit 2*(j%4) + 16*(j/4) + 8h.
//   tables  int32 [NB, C, 8, 8, 2, 4]: (b, c, w, g, rh) is row g + 8*rh of the
//           tile; words 0-1 the ordinary table, 2-3 the salient one, entry e
//           the 16-bit pattern of the activation type in bytes 2e, 2e+1.
//   merge   int32 [C, 32, 8]: per chunk, lane and kt, byte-permute selectors
//           0x3210 + 0x44*f0 + 0x4400*f1 (f_h = 1: salient column) for columns
//           16kt + 2t + {0,1} (low 16 bits) and 16kt + 8 + 2t + {0,1} (high).
// Padding rows have zero tables, padding columns codes 0 and selector 0x3210.
//
// Only the CUDA error of this launcher's own failures is kept for
// vlmkern_binary_lut_status_message; vlmkern_binary_status_message reports
// the other launcher's (binary_kernel.cu keeps its error in a variable local
// to that file).
// ---------------------------------------------------------------------------
#ifdef __cplusplus
extern "C" {
#endif

// Text for a status code of vlmkern_binary_lut_mma; for ERR_LAUNCH it names
// the CUDA error of the last failed launch of this launcher on the calling thread.
const char* vlmkern_binary_lut_status_message(int status);

// fp32 elements of the workspace vlmkern_binary_lut_mma needs: ksplit * M * N
// for ksplit > 1, 0 for ksplit == 1, -1 for invalid sizes.
int64_t vlmkern_binary_lut_workspace_elems(int64_t M, int64_t N, int ksplit);

// out[m, n] = sum_k x[m, k] * w[n, k] + bias[n], fp32 accumulation (one
// tensor-core MMA per k16 step and 8 tokens), bias added in fp32, rounded once
// to the activation type.
//   x          [M, K_x] of act_dtype (F16 or BF16: the type the tables were
//              made for), contiguous, 16-byte aligned; 1 <= M <= 64; K_x a
//              multiple of 8 with (C-1)*128 < K_x <= C*128. Weight columns
//              >= K_x meet zero activations (never read).
//   codes, tables, merge   the layout above, contiguous, 16-byte aligned.
//   bias       [N] of bias_dtype (F16, BF16 or F32) or null.
//   out        [M, N] of act_dtype, contiguous; (NB-1)*128 < N <= NB*128.
//   ksplit     1 <= ksplit <= min(C, 65535): K parts [C*s/ksplit, C*(s+1)/ksplit)
//              computed by separate blocks; for ksplit > 1 their fp32 sums go
//              to workspace [ksplit, M, N] and a second kernel adds them in
//              part order. Results depend on ksplit, never on M: a token's
//              output is the same alone and in any batch. The caller picks
//              ksplit from the weight's shape and the device only.
//   workspace  vlmkern_binary_lut_workspace_elems(M, N, ksplit) floats (may be
//              null when ksplit == 1).
// Returns a vlmkern_binary_status: BAD_DTYPE, BAD_SIZE (sizes, ksplit,
// alignment), NULL_POINTER, LAUNCH, or OK once the kernels are enqueued on
// `stream` (a cudaStream_t).
int vlmkern_binary_lut_mma(const void* x, int64_t M, int64_t K_x, const int32_t* codes,
                           const int32_t* tables, const int32_t* merge, int64_t NB, int64_t C,
                           const void* bias, int bias_dtype, void* out, int64_t N, int ksplit,
                           float* workspace, int act_dtype, void* stream);

#ifdef __cplusplus
}
#endif
