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
//   prefetch    nonzero: the GEMM issues every load a chunk needs at its start
//               (next chunk's planes, all B fragments, the block statistics)
//               instead of next to its use; same arithmetic, same results.
//               Needs block_size a multiple of 128.
//   workspace   vlmkern_binary_workspace_bytes(...) bytes, 256-byte aligned.
int vlmkern_binary_matmul(const void* x, int x_dtype, int64_t x_stride, const int32_t* salient,
                          const int32_t* sign, const int32_t* aux, int64_t plane_stride,
                          const void* stats, int stats_dtype, const void* bias, int bias_dtype,
                          void* out, int64_t M, int64_t N, int64_t K, int64_t block_size,
                          int ksplit, int prefetch, void* workspace, void* stream);

#ifdef __cplusplus
}
#endif
