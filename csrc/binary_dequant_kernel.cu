// Dense weight of a binarized (BiLLM-style) layer, for dequantize + one cuBLAS
// GEMM at prefill sizes, from the bit planes or from the lookup-table layout
// (further down); the launcher contracts are in binary.h.
//
// Every weight of a row and block is one of 8 values, selected by its sign
// and aux bits and its column's salient flag. A thread owns one 32-column
// word of the bit planes (four 16-byte stores of the output) in every
// gridDim.y-th row, so its word index, block indices and salient flags are
// computed once. Per row and block it computes the 8 values from the
// statistics with the operations, in the order, of
// vlmkern.formats.binary.BinaryWeight.dequantize (fp32, one rounding each,
// then one rounding to the output type), packs them as two 4-entry tables of
// 16-bit patterns, and builds each pair of outputs with three byte permutes:
// the pair's entries from the ordinary and the salient table, then per column
// the one its flag picks (the decode of binary_lut_kernel.cu, with the
// selectors built in place).
//
// The per-thread work is __host__ __device__ so it can be checked on a machine
// without a GPU (tests/test_cuda_binary_dequant.py runs it for every thread
// and compares with the reference bit for bit).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "binary.h"

namespace {

constexpr int kThreads = 256;

__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(__half x) { return __half2float(x); }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

struct OutF16 {
  __host__ __device__ static uint32_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
struct OutBF16 {
  __host__ __device__ static uint32_t bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

// Byte i of the result is byte (sel >> 4i) & 7 of the 8 bytes {b:a}.
__host__ __device__ inline uint32_t permute(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, sel);
#else
  const uint64_t both = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<uint32_t>((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
#endif
}

struct Dims {
  int64_t N, K;
  int64_t words_per_row;    // ceil(K / 32): the sign and aux row stride
  int64_t blocks_per_row;   // ceil(K / block_size)
  int64_t block_size;
};

// Loads the 8 statistics of one row and block (16-byte aligned: 8 per block).
template <class Stat>
__host__ __device__ inline void load_stats(const Stat* st, float (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(st[i]);
}

// The 8 values of a row and block as two 4-entry tables of 16-bit patterns
// (entry i = s + 2a), ordinary (ord) and salient (sal), two entries a word.
// Multiplying by +-1 is exact, so each sum rounds where the reference's does.
template <class Out>
__host__ __device__ inline void make_tables(const float (&v)[8], uint32_t (&ord)[2],
                                            uint32_t (&sal)[2]) {
  uint32_t o[4], t[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const bool s = i & 1, a = i & 2;
    const float mu = a ? v[6] : v[4], alpha = a ? v[7] : v[5];
    o[i] = Out::bits(mu + (s ? alpha : -alpha));
    const float first = (v[0] + (s ? v[1] : -v[1])) + v[2];
    t[i] = Out::bits(first + (a ? v[3] : -v[3]));
  }
  ord[0] = o[0] | (o[1] << 16);
  ord[1] = o[2] | (o[3] << 16);
  sal[0] = t[0] | (t[1] << 16);
  sal[1] = t[2] | (t[3] << 16);
}

// 8 outputs (columns 8g .. 8g + 7 of the bits sb, ab, fb) as one 16-byte value.
__host__ __device__ inline uint4 eight_outputs(uint32_t sb, uint32_t ab, uint32_t fb,
                                               const uint32_t (&ord)[2], const uint32_t (&sal)[2]) {
  uint32_t words[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int j = 2 * p;
    const uint32_t i0 = ((sb >> j) & 1) | (((ab >> j) & 1) << 1);
    const uint32_t i1 = ((sb >> (j + 1)) & 1) | (((ab >> (j + 1)) & 1) << 1);
    const uint32_t sel = (i0 | (i1 << 8)) * 0x22 + 0x1010;   // bytes 2i0, 2i0+1, 2i1, 2i1+1
    const uint32_t from_ord = permute(ord[0], ord[1], sel);
    const uint32_t from_sal = permute(sal[0], sal[1], sel);
    const uint32_t pick = 0x3210 + 0x44 * ((fb >> j) & 1) + 0x4400 * ((fb >> (j + 1)) & 1);
    words[p] = permute(from_ord, from_sal, pick);
  }
  uint4 w;
  w.x = words[0];
  w.y = words[1];
  w.z = words[2];
  w.w = words[3];
  return w;
}

// Word w of rows n0, n0 + row_step, ... (< N): columns 32w .. 32w + 31 that lie
// below K, 8 at a time. The tables are rebuilt only when the block changes, so
// with blocks of 32 columns or more, once per row and word.
template <class Out, class Stat>
__host__ __device__ inline void dequant_word(const uint32_t* sign, const uint32_t* aux,
                                             const uint32_t* salient, const Stat* stats,
                                             uint4* out, const Dims& d, int64_t w, int64_t n0,
                                             int64_t row_step) {
  const int64_t col0 = 32 * w;
  const int groups = static_cast<int>(d.K - col0 >= 32 ? 4 : (d.K - col0) / 8);
  int64_t blk[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) blk[g] = (col0 + 8 * g) / d.block_size;
  const uint32_t fb = salient[w];
  for (int64_t n = n0; n < d.N; n += row_step) {
    const uint32_t sb = sign[n * d.words_per_row + w], ab = aux[n * d.words_per_row + w];
    uint32_t ord[2], sal[2];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      if (g >= groups) break;
      if (g == 0 || blk[g] != blk[g - 1]) {
        float v[8];
        load_stats(stats + (n * d.blocks_per_row + blk[g]) * 8, v);
        make_tables<Out>(v, ord, sal);
      }
      out[(n * d.K + col0) / 8 + g] = eight_outputs(sb >> (8 * g), ab >> (8 * g), fb >> (8 * g), ord, sal);
    }
  }
}

// Grid: x over the words of a row, y over rows (a row loop past 65535).
template <class Out, class Stat>
__global__ void __launch_bounds__(kThreads) binary_dequant_kernel(
    const uint32_t* __restrict__ sign, const uint32_t* __restrict__ aux,
    const uint32_t* __restrict__ salient, const Stat* __restrict__ stats, uint4* __restrict__ out,
    Dims d) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (w < d.words_per_row)
    dequant_word<Out, Stat>(sign, aux, salient, stats, out, d, w, blockIdx.y, gridDim.y);
}

// -- from the lookup-table layout -----------------------------------------------------
// The same dense weight from the layout of binary_lut_kernel.cu (binary.h),
// for a layer that holds its sign and aux bits only there. The layout's
// tables already hold each row and block's 8 values in the output type, so
// a weight is its table entry, picked by its 2-bit index i = s + 2a and its
// column's salient flag: no arithmetic, the same bits as the tables. A thread
// owns 8 columns (one 16-byte store) of every gridDim.y-th row; their indices
// sit in word kt / 2 of the 4 lanes 4g + t of their 16-row tile, at one
// shift. They are gathered into sign and aux bits, then eight_outputs runs.
struct LutDims {
  int64_t N, K;
  int64_t chunks;           // ceil(K / 128): 128-column chunks of a row block
};

__host__ __device__ inline uint4 lut_eight_outputs(const uint32_t* codes, const uint4* tables,
                                                   const uint32_t* salient, const LutDims& d,
                                                   int64_t n, int64_t k0) {
  const int64_t tile = ((n / 128) * d.chunks + k0 / 128) * 8 + (n % 128) / 16;
  const int g = static_cast<int>(n % 8), rh = static_cast<int>((n % 16) / 8);
  const int kk = static_cast<int>(k0 % 128), kt = kk / 16, ch = (kk % 16) / 8;
  const int shift = 2 * (2 * ch + rh) + 16 * (kt % 2);     // pair r = 2ch + rh of step kt
  const uint32_t* lane_words = codes + tile * 128 + 16 * g + kt / 2;   // lane 4g: [32][4]
  uint32_t sb = 0, ab = 0;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const uint32_t i = lane_words[4 * t] >> shift;    // index of column 2t at bit 0, 2t+1 at 8
    sb |= ((i & 1) | ((i >> 7) & 2)) << (2 * t);
    ab |= (((i >> 1) & 1) | ((i >> 8) & 2)) << (2 * t);
  }
  const uint4 tab = tables[(tile * 8 + g) * 2 + rh];  // row g + 8rh: ordinary, then salient
  const uint32_t ord[2] = {tab.x, tab.y}, sal[2] = {tab.z, tab.w};
  return eight_outputs(sb, ab, salient[k0 / 32] >> (k0 % 32), ord, sal);
}

// Grid: x over the 8-column groups of a row, y over rows (a row loop past 65535).
__global__ void __launch_bounds__(kThreads) binary_lut_dequant_kernel(
    const uint32_t* __restrict__ codes, const uint4* __restrict__ tables,
    const uint32_t* __restrict__ salient, uint4* __restrict__ out, LutDims d) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (group >= d.K / 8) return;
  for (int64_t n = blockIdx.y; n < d.N; n += gridDim.y)
    out[(n * d.K) / 8 + group] = lut_eight_outputs(codes, tables, salient, d, n, 8 * group);
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local char message[256];

template <class Out, class Stat>
int launch(const uint32_t* sign, const uint32_t* aux, const uint32_t* salient, const void* stats,
           void* out, const Dims& d, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((d.words_per_row + kThreads - 1) / kThreads),
                  static_cast<unsigned>(d.N < 65535 ? d.N : 65535));
  binary_dequant_kernel<Out, Stat><<<grid, kThreads, 0, stream>>>(
      sign, aux, salient, static_cast<const Stat*>(stats), static_cast<uint4*>(out), d);
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return VLMKERN_BINARY_OK;
  last_error = err;
  return VLMKERN_BINARY_ERR_LAUNCH;
}

template <class Out>
int dispatch_stats(const uint32_t* sign, const uint32_t* aux, const uint32_t* salient,
                   const void* stats, int stats_dtype, void* out, const Dims& d, cudaStream_t s) {
  if (stats_dtype == VLMKERN_BINARY_F16) return launch<Out, __half>(sign, aux, salient, stats, out, d, s);
  if (stats_dtype == VLMKERN_BINARY_BF16)
    return launch<Out, __nv_bfloat16>(sign, aux, salient, stats, out, d, s);
  return launch<Out, float>(sign, aux, salient, stats, out, d, s);
}

}  // namespace

extern "C" const char* vlmkern_binary_dequant_status_message(int status) {
  switch (status) {
    case VLMKERN_BINARY_OK: return "success";
    case VLMKERN_BINARY_ERR_NULL_POINTER: return "a required pointer (sign, aux, salient, stats, out) is null";
    case VLMKERN_BINARY_ERR_BAD_SIZE:
      return "inconsistent sizes: need N >= 1, K >= 8 a multiple of 8, block_size >= 8 a multiple "
             "of 8, and out 16-byte aligned";
    case VLMKERN_BINARY_ERR_BAD_DTYPE: return "out must be f16 or bf16 and stats f16, bf16 or f32";
    case VLMKERN_BINARY_ERR_LAUNCH:
      snprintf(message, sizeof(message), "CUDA kernel launch failed: %s (%s)",
               cudaGetErrorName(last_error), cudaGetErrorString(last_error));
      return message;
    default: return "unknown status code";
  }
}

extern "C" int vlmkern_binary_dequant(const int32_t* sign, const int32_t* aux,
                                      const int32_t* salient, const void* stats, int stats_dtype,
                                      int64_t N, int64_t K, int64_t block_size, void* out,
                                      int out_dtype, void* stream) {
  if (out_dtype != VLMKERN_BINARY_F16 && out_dtype != VLMKERN_BINARY_BF16)
    return VLMKERN_BINARY_ERR_BAD_DTYPE;
  if (stats_dtype < VLMKERN_BINARY_F16 || stats_dtype > VLMKERN_BINARY_F32)
    return VLMKERN_BINARY_ERR_BAD_DTYPE;
  if (N < 1 || K < 8 || K % 8 != 0 || block_size < 8 || block_size % 8 != 0 ||
      N > (int64_t(1) << 40) / K)
    return VLMKERN_BINARY_ERR_BAD_SIZE;
  if (!sign || !aux || !salient || !stats || !out) return VLMKERN_BINARY_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(out) % 16 != 0) return VLMKERN_BINARY_ERR_BAD_SIZE;
  Dims d;
  d.N = N;
  d.K = K;
  d.words_per_row = (K + 31) / 32;
  d.blocks_per_row = (K + block_size - 1) / block_size;
  d.block_size = block_size;
  const auto* s = reinterpret_cast<const uint32_t*>(sign);
  const auto* a = reinterpret_cast<const uint32_t*>(aux);
  const auto* f = reinterpret_cast<const uint32_t*>(salient);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return out_dtype == VLMKERN_BINARY_F16 ? dispatch_stats<OutF16>(s, a, f, stats, stats_dtype, out, d, st)
                                         : dispatch_stats<OutBF16>(s, a, f, stats, stats_dtype, out, d, st);
}

extern "C" int vlmkern_binary_lut_dequant(const int32_t* codes, const int32_t* tables,
                                          const int32_t* salient, int64_t N, int64_t K, void* out,
                                          void* stream) {
  if (N < 1 || K < 8 || K % 8 != 0 || N > (int64_t(1) << 40) / K) return VLMKERN_BINARY_ERR_BAD_SIZE;
  if (!codes || !tables || !salient || !out) return VLMKERN_BINARY_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(out) % 16 != 0 || reinterpret_cast<uintptr_t>(tables) % 16 != 0)
    return VLMKERN_BINARY_ERR_BAD_SIZE;
  LutDims d;
  d.N = N;
  d.K = K;
  d.chunks = (K + 127) / 128;
  const dim3 grid(static_cast<unsigned>((K / 8 + kThreads - 1) / kThreads),
                  static_cast<unsigned>(N < 65535 ? N : 65535));
  binary_lut_dequant_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint32_t*>(codes), reinterpret_cast<const uint4*>(tables),
      reinterpret_cast<const uint32_t*>(salient), static_cast<uint4*>(out), d);
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return VLMKERN_BINARY_OK;
  last_error = err;
  return VLMKERN_BINARY_ERR_LAUNCH;
}
