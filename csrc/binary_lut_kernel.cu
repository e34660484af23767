// Lookup-table tensor-core GEMM for binarized (BiLLM-style) weights at decode
// sizes (M = 1..64); the launcher contract and the layout are in binary.h.
//
// Every weight of a row and 128-column block is one of 8 values, so the
// load-time layout stores a 2-bit index per weight, a table of the 4
// ordinary and 4 salient values per row and block, and one byte-permute
// selector per column pair that says which table each column reads. A pair of
// weights becomes an fp16/bf16 A-fragment register with
//   sel   = ((code word >> shift) & 0x0303) * 0x22 + 0x1010
//   v_ord = prmt(table words 0, 1, sel), v_sal = prmt(words 2, 3, sel)
//   a     = prmt(v_ord, v_sal, merge selector)
// (about 2 instructions for the selector, see pair_selectors, and 3 PRMT),
// and each k16 step is ONE m16n8k16 MMA per 8 tokens with fp32 accumulation.
// The table values are the weights themselves, so nothing is applied after
// the MMAs.
//
// Shape of the computation: grid (NB, ksplit), 8 warps per block, warp w owns
// the 16-row tile w of row block blockIdx.x and walks the chunks of its K part
// [C*s/ksplit, C*(s+1)/ksplit). Each lane keeps the next chunk's codes, table
// rows and merge words in registers while it computes the current chunk, so
// the DRAM latency of the weights overlaps the decode and MMAs. Activation B
// fragments are read straight from global memory (x is small and shared by
// every block, so they hit L1/L2). With ksplit > 1 each part writes fp32
// partial sums and a second kernel adds them in part order, so the result
// depends on ksplit only, never on M.

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "binary.h"
#include "binary_lut_decode.cuh"
#include "weight_only_common.cuh"  // F16/BF16: mma() and from_float()

namespace {

using vlmkern_wo::BF16;
using vlmkern_wo::F16;
using namespace vlmkern_lut;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;   // output rows per row block
constexpr int kChunk = 128;          // input columns per chunk
constexpr int kSteps = kChunk / 16;  // k16 MMA steps per chunk
constexpr int kMaxM = 64;

// uint4 strides of the layout (binary.h).
constexpr int kCodeTile = 128 / 4;               // one tile's codes: [32 lanes][4 words]
constexpr int kTableTile = 8 * 2;                // one tile's tables: [8 g][2 rh] x uint4
constexpr int kMergeChunk = 32 * 8 / 4;          // one chunk's merge words: [32 lanes][8 kt]

struct LutParams {
  const uint16_t* x;       // [M, K_x]
  const uint4* codes;      // [NB, C, 8, 32] x uint4
  const uint4* tables;     // [NB, C, 8, 8, 2] x uint4
  const uint4* merge;      // [C, 32, 2] x uint4
  const void* bias;        // [N] or null
  uint16_t* out;           // [M, N]
  float* partial;          // [ksplit, M, N], used when ksplit > 1
  int M, K_x, N, C, ksplit, bias_dtype;
};

// One chunk's weight data of this lane: its 16 code bytes, the tables of its
// rows g (t0) and g + 8 (t1), and its merge selectors of k16 steps 0..3 (m0)
// and 4..7 (m1).
struct ChunkRegs {
  uint4 codes, t0, t1, m0, m1;
};

__device__ __forceinline__ void load_chunk(ChunkRegs& cr, const uint4* codes, const uint4* tables,
                                           const uint4* merge) {
  cr.codes = __ldg(codes);
  cr.t0 = __ldg(tables);
  cr.t1 = __ldg(tables + 1);
  cr.m0 = __ldg(merge);
  cr.m1 = __ldg(merge + 1);
}

__device__ __forceinline__ float bias_value(const void* bias, int dtype, int n) {
  if (dtype == VLMKERN_BINARY_F32) return static_cast<const float*>(bias)[n];
  const uint32_t bits = static_cast<const uint16_t*>(bias)[n];
  if (dtype == VLMKERN_BINARY_BF16) return __uint_as_float(bits << 16);
  return F16::to_float(bits);
}

// acc += W-tile x X-tile over one chunk. xp[j] points at this lane's first B
// element of token tile j in the chunk (token 8j + g, column chunk*128 + 2t).
// TAIL: the chunk runs past K_x and columns >= col_limit (relative to xp)
// read as zero.
template <int M_TILES, class T, bool TAIL>
__device__ __forceinline__ void compute_chunk(const ChunkRegs& cr, const uint16_t* const (&xp)[M_TILES],
                                              int col_limit, float (&acc)[M_TILES][4]) {
#pragma unroll
  for (int kt = 0; kt < kSteps; ++kt) {
    // B fragments: b0 = columns 16kt + 2t + {0,1}, b1 = the same + 8.
    uint32_t bf[M_TILES][2];
#pragma unroll
    for (int j = 0; j < M_TILES; ++j)
#pragma unroll
      for (int ch = 0; ch < 2; ++ch) {
        const int col = 16 * kt + 8 * ch;
        const unsigned int* src = reinterpret_cast<const unsigned int*>(xp[j] + col);
        bf[j][ch] = !TAIL || col < col_limit ? __ldg(src) : 0u;
      }

    uint32_t a[4];
    lut_operands(cr.codes, cr.t0, cr.t1, cr.m0, cr.m1, kt, a);
#pragma unroll
    for (int j = 0; j < M_TILES; ++j) T::mma(acc[j], a, bf[j][0], bf[j][1]);
  }
}

// Two blocks per SM (<= 128 registers) up to 32 tokens. The 64-token kernel
// holds 32 accumulators and 8 activation row pointers on top of the two chunk
// buffers; capped at 128 registers it spills, so it runs one block per SM.
template <int M_TILES>
constexpr int min_blocks_per_sm() { return M_TILES <= 4 ? 2 : 1; }

template <int M_TILES, class T>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<M_TILES>())
binary_lut_kernel(LutParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.x;
  const int s = blockIdx.y;
  const int c_lo = static_cast<int>(static_cast<int64_t>(p.C) * s / p.ksplit);
  const int c_hi = static_cast<int>(static_cast<int64_t>(p.C) * (s + 1) / p.ksplit);

  // Running pointers, advanced one chunk per iteration.
  const int64_t tile0 = (b * p.C + c_lo) * kWarps + warp;
  const uint4* codes = p.codes + tile0 * kCodeTile + lane;
  const uint4* tables = p.tables + tile0 * kTableTile + 2 * g;
  const uint4* merge = p.merge + static_cast<int64_t>(c_lo) * kMergeChunk + 2 * lane;
  // A token >= M reads row M - 1 instead: MMA output column g depends only
  // on B column g, and the results of those tokens are never stored, so no
  // load needs a token predicate.
  const uint16_t* xp[M_TILES];
#pragma unroll
  for (int j = 0; j < M_TILES; ++j)
    xp[j] = p.x + static_cast<int64_t>(min(8 * j + g, p.M - 1)) * p.K_x + c_lo * kChunk + 2 * t;

  float acc[M_TILES][4];
#pragma unroll
  for (int j = 0; j < M_TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

  // Only the last chunk of the weight can run past K_x (by less than 128):
  // chunks [c_lo, c_full) are whole, a chunk c_full < c_hi is that tail.
  const int c_full = c_hi == p.C && p.K_x < p.C * kChunk ? c_hi - 1 : c_hi;
  // Two register buffers used in turn (no copies in the loop): the one not
  // being computed receives the next chunk's loads.
  ChunkRegs buf0, buf1 = {};
  load_chunk(buf0, codes, tables, merge);
  int c = c_lo;
  const auto prefetch = [&](ChunkRegs& into) {
    if (c + 1 < c_hi) {
      codes += kWarps * kCodeTile;
      tables += kWarps * kTableTile;
      merge += kMergeChunk;
      load_chunk(into, codes, tables, merge);
    }
  };
  const auto compute_whole = [&](const ChunkRegs& cr) {
    compute_chunk<M_TILES, T, false>(cr, xp, 0, acc);
#pragma unroll
    for (int j = 0; j < M_TILES; ++j) xp[j] += kChunk;
    ++c;
  };
  while (c < c_full) {  // buf0 holds chunk c
    prefetch(buf1);
    compute_whole(buf0);
    if (c >= c_full) {
      buf0 = buf1;
      break;
    }
    prefetch(buf0);
    compute_whole(buf1);
  }
  if (c < c_hi) compute_chunk<M_TILES, T, true>(buf0, xp, p.K_x - c * kChunk - 2 * t, acc);

  // Accumulator e of token tile j: token 8j + 2t + (e & 1), row g + 8*(e >> 1).
  const int n0 = static_cast<int>(b) * kRows + warp * 16 + g;
#pragma unroll
  for (int j = 0; j < M_TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * j + 2 * t + (e & 1);
      const int n = n0 + 8 * (e >> 1);
      if (m >= p.M || n >= p.N) continue;
      if (p.ksplit > 1) {
        p.partial[(static_cast<int64_t>(s) * p.M + m) * p.N + n] = acc[j][e];
      } else {
        const float bias = p.bias ? bias_value(p.bias, p.bias_dtype, n) : 0.f;
        p.out[static_cast<int64_t>(m) * p.N + n] = T::from_float(__fadd_rn(acc[j][e], bias));
      }
    }
}

// Sum of the K parts in part order, plus bias, rounded once.
template <class T>
__global__ void __launch_bounds__(256)
binary_lut_reduce_kernel(const float* __restrict__ partial, const void* __restrict__ bias,
                         int bias_dtype, uint16_t* __restrict__ out, int M, int N, int ksplit) {
  const int64_t total = static_cast<int64_t>(M) * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < ksplit; ++s) v = __fadd_rn(v, partial[s * total + i]);
    const float bv = bias ? bias_value(bias, bias_dtype, static_cast<int>(i % N)) : 0.f;
    out[i] = T::from_float(__fadd_rn(v, bv));
  }
}

// The CUDA error of the last failed launch on this thread, for
// vlmkern_binary_lut_status_message.
thread_local cudaError_t last_error = cudaSuccess;
thread_local char message[256];

int launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return VLMKERN_BINARY_OK;
  last_error = err;
  return VLMKERN_BINARY_ERR_LAUNCH;
}

template <int M_TILES, class T>
int launch(const LutParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + kRows - 1) / kRows), static_cast<unsigned>(p.ksplit));
  binary_lut_kernel<M_TILES, T><<<grid, kThreads, 0, stream>>>(p);
  int status = launch_status();
  if (status != VLMKERN_BINARY_OK || p.ksplit == 1) return status;
  int64_t blocks = (static_cast<int64_t>(p.M) * p.N + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  binary_lut_reduce_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      p.partial, p.bias, p.bias_dtype, p.out, p.M, p.N, p.ksplit);
  return launch_status();
}

// The instantiations: token tiles {1, 2, 4, 8} x {fp16, bf16}.
template <class T>
int dispatch(const LutParams& p, cudaStream_t stream) {
  if (p.M <= 8) return launch<1, T>(p, stream);
  if (p.M <= 16) return launch<2, T>(p, stream);
  if (p.M <= 32) return launch<4, T>(p, stream);
  return launch<8, T>(p, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

extern "C" const char* vlmkern_binary_lut_status_message(int status) {
  switch (status) {
    case VLMKERN_BINARY_OK: return "success";
    case VLMKERN_BINARY_ERR_NULL_POINTER:
      return "a required pointer (x, codes, tables, merge, out, or workspace when ksplit > 1) is null";
    case VLMKERN_BINARY_ERR_BAD_SIZE:
      return "inconsistent sizes: need 1 <= M <= 64, (NB-1)*128 < N <= NB*128, "
             "(C-1)*128 < K_x <= C*128 with K_x a multiple of 8, 1 <= ksplit <= min(C, 65535), "
             "and x, codes, tables and merge 16-byte aligned";
    case VLMKERN_BINARY_ERR_BAD_DTYPE:
      return "x must be f16 or bf16 (the type the tables were made for); bias f16, bf16 or f32";
    case VLMKERN_BINARY_ERR_LAUNCH:
      snprintf(message, sizeof(message), "CUDA kernel launch failed: %s (%s)",
               cudaGetErrorName(last_error), cudaGetErrorString(last_error));
      return message;
    default: return "unknown status code";
  }
}

extern "C" int64_t vlmkern_binary_lut_workspace_elems(int64_t M, int64_t N, int ksplit) {
  if (M < 0 || N < 0 || ksplit < 1) return -1;
  return ksplit > 1 ? static_cast<int64_t>(ksplit) * M * N : 0;
}

extern "C" int vlmkern_binary_lut_mma(const void* x, int64_t M, int64_t K_x, const int32_t* codes,
                                      const int32_t* tables, const int32_t* merge, int64_t NB,
                                      int64_t C, const void* bias, int bias_dtype, void* out,
                                      int64_t N, int ksplit, float* workspace, int act_dtype,
                                      void* stream) {
  if (act_dtype != VLMKERN_BINARY_F16 && act_dtype != VLMKERN_BINARY_BF16)
    return VLMKERN_BINARY_ERR_BAD_DTYPE;
  if (bias && (bias_dtype < VLMKERN_BINARY_F16 || bias_dtype > VLMKERN_BINARY_F32))
    return VLMKERN_BINARY_ERR_BAD_DTYPE;
  if (bias && !vlmkern_aligned_for(bias, bias_dtype)) return VLMKERN_BINARY_ERR_BAD_SIZE;
  // The int bounds keep every element index of x, out and the workspace, and
  // every chunk index, within the int arithmetic of the kernels.
  if (M < 1 || M > kMaxM || NB < 1 || C < 1 || N <= (NB - 1) * kRows || N > NB * kRows ||
      K_x <= (C - 1) * kChunk || K_x > C * kChunk || K_x % 8 != 0 || ksplit < 1 || ksplit > C ||
      ksplit > 65535 || NB > 0x7fffffff / kRows || C > 0x7fffffff / kChunk)
    return VLMKERN_BINARY_ERR_BAD_SIZE;
  if (!x || !codes || !tables || !merge || !out || (ksplit > 1 && !workspace))
    return VLMKERN_BINARY_ERR_NULL_POINTER;
  if (!aligned16(x) || !aligned16(codes) || !aligned16(tables) || !aligned16(merge) ||
      !vlmkern_aligned_for(out, act_dtype) || reinterpret_cast<uintptr_t>(workspace) % 4 != 0)
    return VLMKERN_BINARY_ERR_BAD_SIZE;

  LutParams p;
  p.x = static_cast<const uint16_t*>(x);
  p.codes = reinterpret_cast<const uint4*>(codes);
  p.tables = reinterpret_cast<const uint4*>(tables);
  p.merge = reinterpret_cast<const uint4*>(merge);
  p.bias = bias;
  p.out = static_cast<uint16_t*>(out);
  p.partial = workspace;
  p.M = static_cast<int>(M);
  p.K_x = static_cast<int>(K_x);
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.ksplit = ksplit;
  p.bias_dtype = bias ? bias_dtype : VLMKERN_BINARY_F32;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_BINARY_F16 ? dispatch<F16>(p, s) : dispatch<BF16>(p, s);
}
