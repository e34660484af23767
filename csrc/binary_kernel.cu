// Binarized (BiLLM-style) matmul straight from the bit planes; the method and
// the launcher contract are in binary.h.
//
// Launches:
//   1. stage_kernel: x -> the MMA B operand. For each group of 4 tokens and
//      each k16 step, lane l = 4g + t of a warp gets its two B registers as
//      one 8-byte load. Column g of the 16x8 B tile is token g/2, variant g%2
//      (0: x' = x on non-salient columns, 1: x'' = x on salient columns).
//      The same launch writes fp32 block sums of x' and x''.
//   2. gemm_kernel: 4 warps x 16 weight rows per block; each warp walks its
//      K range in chunks of 128 columns (one 16-byte load per row and plane),
//      builds +-1 A fragments for s, a and a*s and runs three MMAs per k16
//      step and group of 4 tokens; at each block end it applies the 8 row
//      statistics to the fp32 sums.
//   3. reduce_kernel (only when K is split): sums the parts in order.
//
// K-slot order inside a 32-column word: the MMA sums over its 16 k-slots in
// any order, so slot pair (2u, 2u+1) of k16 step j is given columns
// (8j + u, 8j + u + 16). A thread's pair of weights then sits at bits c and
// c + 16 of one word, and a single shift puts both sign bits in place.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>

#include "binary.h"
#include "vlmkern_kernels.h"  // vlmkern_aligned_for

namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerCta = kWarps * 16;
constexpr int kChunk = 128;          // columns per chunk: 4 words, 8 k16 steps
constexpr int kStageSteps = 8;       // k16 steps per staging block (8 warps)
constexpr int kSumBlocks = 8;        // statistic blocks per summing block (8 warps)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }
int64_t gcd64(int64_t a, int64_t b) { return b ? gcd64(b, a % b) : a; }

// Token groups of 4, processed TG at a time by one block.
struct Tokens {
  int64_t groups;      // ceil(M / 4)
  int tg;              // groups per block: 1, 2 or 4
  int64_t groups_pad;  // groups rounded up to a multiple of tg
};

Tokens token_split(int64_t M) {
  Tokens t;
  t.groups = cdiv(M, 4);
  t.tg = t.groups <= 1 ? 1 : (t.groups <= 2 ? 2 : 4);
  t.groups_pad = cdiv(t.groups, t.tg) * t.tg;
  return t;
}

struct Workspace {
  int64_t xb_offset, xsum_offset, split_offset, total;
};

Workspace workspace_layout(int64_t M, int64_t N, int64_t K, int64_t block_size, int ksplit) {
  const Tokens tok = token_split(M);
  const int64_t steps = cdiv(K, kChunk) * (kChunk / 16);
  const int64_t nblk = cdiv(K, block_size);
  Workspace w;
  w.xb_offset = 0;
  w.xsum_offset = align256(tok.groups_pad * steps * 32 * 8);
  w.split_offset = w.xsum_offset + align256(M * nblk * 2 * 4);
  w.total = w.split_offset + (ksplit > 1 ? align256(int64_t(ksplit) * M * N * 4) : 0);
  return w;
}

template <typename T> struct Act;
template <> struct Act<__half> {
  static constexpr bool kIsHalf = true;
  static constexpr uint32_t kOnePair = 0x3C003C00u;  // (+1, +1)
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static uint16_t bits(__half v) { return __half_as_ushort(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Act<__nv_bfloat16> {
  static constexpr bool kIsHalf = false;
  static constexpr uint32_t kOnePair = 0x3F803F80u;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static uint16_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float load_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case VLMKERN_BINARY_F16: return __half2float(static_cast<const __half*>(p)[i]);
    case VLMKERN_BINARY_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

struct Dims {
  int64_t M, N, K, x_stride, plane_stride, block_size, nblk, steps;
  int64_t unit;  // lcm(block_size, 128): columns per unit of the K split
  int ksplit;
};

// ---------------------------------------------------------------------------
// 1. Staging: B operand and block sums
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256)
stage_kernel(const T* __restrict__ x, const uint32_t* __restrict__ salient, uint2* __restrict__ xb,
             float* __restrict__ xsum, Dims d, int64_t stage_blocks) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t words = (d.K + 31) / 32;
  if (blockIdx.x < stage_blocks) {
    const int64_t per_group = (d.steps + kStageSteps - 1) / kStageSteps;
    const int64_t group = blockIdx.x / per_group;
    const int64_t step = (blockIdx.x % per_group) * kStageSteps + warp;
    if (step >= d.steps) return;
    const int g = lane >> 2, tig = lane & 3;
    const int64_t token = 4 * group + (g >> 1);
    const uint32_t variant = g & 1;
    const int64_t word = step >> 1;
    const int j = int(step & 1);
    const uint32_t sal = word < words ? salient[word] : 0u;
    uint32_t half_bits[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int bit = 8 * j + tig + 4 * (e >> 1) + 16 * (e & 1);
      const int64_t col = 32 * word + bit;
      uint32_t v = 0;
      if (token < d.M && col < d.K && ((sal >> bit) & 1u) == variant)
        v = Act<T>::bits(x[token * d.x_stride + col]);
      half_bits[e] = v;
    }
    xb[(group * d.steps + step) * 32 + lane] =
        make_uint2(half_bits[0] | (half_bits[1] << 16), half_bits[2] | (half_bits[3] << 16));
    return;
  }
  // Block sums: one warp per (token, block), lanes stride the block's columns,
  // then a fixed butterfly; the order never depends on M.
  const int64_t id = blockIdx.x - stage_blocks;
  const int64_t per_token = (d.nblk + kSumBlocks - 1) / kSumBlocks;
  const int64_t token = id / per_token;
  const int64_t blk = (id % per_token) * kSumBlocks + warp;
  if (token >= d.M || blk >= d.nblk) return;
  const int64_t end = min((blk + 1) * d.block_size, d.K);
  float plain = 0.f, sal_sum = 0.f;
  for (int64_t col = blk * d.block_size + lane; col < end; col += 32) {
    const float v = Act<T>::to_float(x[token * d.x_stride + col]);
    if ((salient[col >> 5] >> (col & 31)) & 1u) sal_sum += v;
    else plain += v;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    plain += __shfl_xor_sync(0xffffffffu, plain, off);
    sal_sum += __shfl_xor_sync(0xffffffffu, sal_sum, off);
  }
  if (lane == 0) {
    xsum[(token * d.nblk + blk) * 2] = plain;
    xsum[(token * d.nblk + blk) * 2 + 1] = sal_sum;
  }
}

// ---------------------------------------------------------------------------
// 2. GEMM
// ---------------------------------------------------------------------------
// +-1 pair from bits c and c + 16 of `inverted` (a set bit there means -1):
// both land on the sign bits of a half2 with value (+1, +1).
template <typename T>
__device__ __forceinline__ uint32_t pm1_pair(uint32_t inverted, int c) {
  return ((inverted << (15 - c)) & 0x80008000u) | Act<T>::kOnePair;
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint2 b) {
  if constexpr (Act<T>::kIsHalf) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
  return w == 0 ? v.x : (w == 1 ? v.y : (w == 2 ? v.z : v.w));
}

struct Coeffs {
  float m, dm, al, dal, mu12, a1, a2;
};

__device__ __forceinline__ Coeffs row_coeffs(const void* stats, int dtype, int64_t base) {
  float st[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) st[i] = load_float(stats, dtype, base + i);
  Coeffs c;
  c.mu12 = st[0] + st[2];
  c.a1 = st[1];
  c.a2 = st[3];
  c.m = 0.5f * (st[6] + st[4]);
  c.dm = 0.5f * (st[6] - st[4]);
  c.al = 0.5f * (st[7] + st[5]);
  c.dal = 0.5f * (st[7] - st[5]);
  return c;
}

template <typename T, int TG>
__global__ void __launch_bounds__(kWarps * 32, 1)
gemm_kernel(const uint2* __restrict__ xb, const float* __restrict__ xsum,
            const uint32_t* __restrict__ sign, const uint32_t* __restrict__ aux,
            const void* __restrict__ stats, int stats_dtype, const void* __restrict__ bias,
            int bias_dtype, T* __restrict__ out, float* __restrict__ partial, Dims d) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t row_a = int64_t(blockIdx.x) * kRowsPerCta + warp * 16 + g, row_b = row_a + 8;
  // Rows past N read the last row; their results are never stored.
  const uint4* sign_a = reinterpret_cast<const uint4*>(sign + min(row_a, d.N - 1) * d.plane_stride);
  const uint4* sign_b = reinterpret_cast<const uint4*>(sign + min(row_b, d.N - 1) * d.plane_stride);
  const uint4* aux_a = reinterpret_cast<const uint4*>(aux + min(row_a, d.N - 1) * d.plane_stride);
  const uint4* aux_b = reinterpret_cast<const uint4*>(aux + min(row_b, d.N - 1) * d.plane_stride);
  const int64_t group0 = int64_t(blockIdx.z) * TG;

  // This block's K range: whole units of lcm(block_size, 128) columns, so it
  // starts on a chunk and on a statistics block.
  const int64_t unit = d.unit;
  const int64_t units = (d.K + unit - 1) / unit;
  const int64_t u_lo = units * blockIdx.y / d.ksplit, u_hi = units * (blockIdx.y + 1) / d.ksplit;
  const int64_t chunk_lo = u_lo * unit / kChunk;
  const int64_t chunk_hi = (min(u_hi * unit, d.K) + kChunk - 1) / kChunk;
  const int64_t steps_per_block = d.block_size / 16;

  float acc_s[TG][4], acc_a[TG][4], acc_x[TG][4];
  float y[2][TG];
#pragma unroll
  for (int t = 0; t < TG; ++t) {
    y[0][t] = y[1][t] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_s[t][e] = acc_a[t][e] = acc_x[t][e] = 0.f;
  }

  int64_t step_left = steps_per_block;
  int64_t blk = chunk_lo * (kChunk / 16) / steps_per_block;
  const int64_t last_step = chunk_hi * (kChunk / 16) - 1;
  for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
    const uint4 sa = sign_a[chunk], sb = sign_b[chunk], xa = aux_a[chunk], xbw = aux_b[chunk];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t s_a = word_of(sa, w), s_b = word_of(sb, w);
      const uint32_t a_a = word_of(xa, w), a_b = word_of(xbw, w);
      // Inverted planes: a set bit marks a -1. a*s = -1 where the bits differ.
      const uint32_t is_a = ~s_a, is_b = ~s_b, ia_a = ~a_a, ia_b = ~a_b;
      const uint32_t ix_a = s_a ^ a_a, ix_b = s_b ^ a_b;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t step = chunk * (kChunk / 16) + 2 * w + j;
        const int c0 = 8 * j + tig, c1 = c0 + 4;
        // A fragment: a0 row g / pair tig, a1 row g+8, a2 row g / pair tig+4, a3 row g+8.
        const uint32_t fs[4] = {pm1_pair<T>(is_a, c0), pm1_pair<T>(is_b, c0),
                                pm1_pair<T>(is_a, c1), pm1_pair<T>(is_b, c1)};
        const uint32_t fa[4] = {pm1_pair<T>(ia_a, c0), pm1_pair<T>(ia_b, c0),
                                pm1_pair<T>(ia_a, c1), pm1_pair<T>(ia_b, c1)};
        const uint32_t fx[4] = {pm1_pair<T>(ix_a, c0), pm1_pair<T>(ix_b, c0),
                                pm1_pair<T>(ix_a, c1), pm1_pair<T>(ix_b, c1)};
#pragma unroll
        for (int t = 0; t < TG; ++t) {
          const uint2 b = xb[((group0 + t) * d.steps + step) * 32 + lane];
          mma16816<T>(acc_s[t], fs, b);
          mma16816<T>(acc_a[t], fa, b);
          mma16816<T>(acc_x[t], fx, b);
        }
        if (--step_left == 0 || step == last_step) {
          // c0/c1: row g with x' / x'' of token tig; c2/c3: row g + 8.
          if (blk < d.nblk) {
            const Coeffs ca = row_coeffs(stats, stats_dtype, (min(row_a, d.N - 1) * d.nblk + blk) * 8);
            const Coeffs cb = row_coeffs(stats, stats_dtype, (min(row_b, d.N - 1) * d.nblk + blk) * 8);
#pragma unroll
            for (int t = 0; t < TG; ++t) {
              const int64_t token = 4 * (group0 + t) + tig;
              float sum_plain = 0.f, sum_sal = 0.f;
              if (token < d.M) {
                sum_plain = xsum[(token * d.nblk + blk) * 2];
                sum_sal = xsum[(token * d.nblk + blk) * 2 + 1];
              }
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const Coeffs& c = r ? cb : ca;
                const float ds = acc_s[t][2 * r], da = acc_a[t][2 * r], dx = acc_x[t][2 * r];
                const float ds2 = acc_s[t][2 * r + 1], da2 = acc_a[t][2 * r + 1];
                float v = y[r][t];
                v = __fmaf_rn(c.m, sum_plain, v);
                v = __fmaf_rn(c.dm, da, v);
                v = __fmaf_rn(c.al, ds, v);
                v = __fmaf_rn(c.dal, dx, v);
                v = __fmaf_rn(c.mu12, sum_sal, v);
                v = __fmaf_rn(c.a1, ds2, v);
                v = __fmaf_rn(c.a2, da2, v);
                y[r][t] = v;
              }
            }
          }
#pragma unroll
          for (int t = 0; t < TG; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[t][e] = acc_a[t][e] = acc_x[t][e] = 0.f;
          step_left = steps_per_block;
          ++blk;
        }
      }
    }
  }

#pragma unroll
  for (int t = 0; t < TG; ++t) {
    const int64_t token = 4 * (group0 + t) + tig;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t n = r ? row_b : row_a;
      if (token >= d.M || n >= d.N) continue;
      if (d.ksplit > 1) {
        partial[(int64_t(blockIdx.y) * d.M + token) * d.N + n] = y[r][t];
      } else {
        const float b = bias ? load_float(bias, bias_dtype, n) : 0.f;
        out[token * d.N + n] = Act<T>::from_float(__fadd_rn(y[r][t], b));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 3. Sum of the K parts, in order
// ---------------------------------------------------------------------------
template <typename T>
__global__ void reduce_kernel(const float* __restrict__ partial, const void* __restrict__ bias,
                              int bias_dtype, T* __restrict__ out, int64_t M, int64_t N,
                              int ksplit) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < ksplit; ++s) v = __fadd_rn(v, partial[int64_t(s) * total + i]);
    const float b = bias ? load_float(bias, bias_dtype, i % N) : 0.f;
    out[i] = Act<T>::from_float(__fadd_rn(v, b));
  }
}

thread_local cudaError_t last_launch_error = cudaSuccess;
thread_local char message_buffer[256];

int launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    last_launch_error = err;
    return VLMKERN_BINARY_ERR_LAUNCH;
  }
  return VLMKERN_BINARY_OK;
}

template <typename T>
int launch_all(const void* x, const uint32_t* salient, const uint32_t* sign, const uint32_t* aux,
               const void* stats, int stats_dtype, const void* bias, int bias_dtype, void* out,
               const Dims& d, uint8_t* ws, const Workspace& layout, cudaStream_t stream) {
  const Tokens tok = token_split(d.M);
  uint2* xb = reinterpret_cast<uint2*>(ws + layout.xb_offset);
  float* xsum = reinterpret_cast<float*>(ws + layout.xsum_offset);
  float* partial = reinterpret_cast<float*>(ws + layout.split_offset);

  const int64_t stage_blocks = tok.groups_pad * ((d.steps + kStageSteps - 1) / kStageSteps);
  const int64_t sum_blocks = d.M * ((d.nblk + kSumBlocks - 1) / kSumBlocks);
  stage_kernel<T><<<unsigned(stage_blocks + sum_blocks), 256, 0, stream>>>(
      static_cast<const T*>(x), salient, xb, xsum, d, stage_blocks);
  int status = launch_status();
  if (status != VLMKERN_BINARY_OK) return status;

  const dim3 grid(unsigned((d.N + kRowsPerCta - 1) / kRowsPerCta), unsigned(d.ksplit),
                  unsigned(tok.groups_pad / tok.tg));
  T* o = static_cast<T*>(out);
  auto kernel = tok.tg == 1 ? gemm_kernel<T, 1> : tok.tg == 2 ? gemm_kernel<T, 2> : gemm_kernel<T, 4>;
  kernel<<<grid, kWarps * 32, 0, stream>>>(xb, xsum, sign, aux, stats, stats_dtype, bias,
                                           bias_dtype, o, partial, d);
  status = launch_status();
  if (status != VLMKERN_BINARY_OK || d.ksplit == 1) return status;

  int64_t blocks = (d.M * d.N + 255) / 256;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;
  reduce_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(partial, bias, bias_dtype, o, d.M, d.N,
                                                        d.ksplit);
  return launch_status();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

extern "C" const char* vlmkern_binary_status_message(int status) {
  switch (status) {
    case VLMKERN_BINARY_OK: return "success";
    case VLMKERN_BINARY_ERR_NULL_POINTER: return "a required pointer is null";
    case VLMKERN_BINARY_ERR_BAD_SIZE:
      return "inconsistent sizes: need 0 <= M <= 1048560, N >= 0, K >= 1, block_size a "
             "multiple of 32, 1 <= ksplit <= 65535, plane rows of >= ceil(K/32) words (a "
             "multiple of 4) and 16-byte aligned planes, statistics and workspace";
    case VLMKERN_BINARY_ERR_BAD_DTYPE:
      return "x must be f16 or bf16; statistics and bias f16, bf16 or f32";
    case VLMKERN_BINARY_ERR_LAUNCH:
      snprintf(message_buffer, sizeof(message_buffer), "CUDA kernel launch failed: %s (%s)",
               cudaGetErrorName(last_launch_error), cudaGetErrorString(last_launch_error));
      return message_buffer;
    default: return "unknown status code";
  }
}

extern "C" int64_t vlmkern_binary_workspace_bytes(int64_t M, int64_t N, int64_t K,
                                                  int64_t block_size, int ksplit) {
  if (M < 0 || N < 0 || K < 1 || block_size < 32 || block_size % 32 != 0 || ksplit < 1) return -1;
  return workspace_layout(M, N, K, block_size, ksplit).total;
}

extern "C" int vlmkern_binary_matmul(const void* x, int x_dtype, int64_t x_stride,
                                     const int32_t* salient, const int32_t* sign,
                                     const int32_t* aux, int64_t plane_stride, const void* stats,
                                     int stats_dtype, const void* bias, int bias_dtype, void* out,
                                     int64_t M, int64_t N, int64_t K, int64_t block_size,
                                     int ksplit, void* workspace, void* stream) {
  if (x_dtype != VLMKERN_BINARY_F16 && x_dtype != VLMKERN_BINARY_BF16)
    return VLMKERN_BINARY_ERR_BAD_DTYPE;
  if (stats_dtype < VLMKERN_BINARY_F16 || stats_dtype > VLMKERN_BINARY_F32)
    return VLMKERN_BINARY_ERR_BAD_DTYPE;
  if (bias && (bias_dtype < VLMKERN_BINARY_F16 || bias_dtype > VLMKERN_BINARY_F32))
    return VLMKERN_BINARY_ERR_BAD_DTYPE;
  if (bias && !vlmkern_aligned_for(bias, bias_dtype)) return VLMKERN_BINARY_ERR_BAD_SIZE;
  if (M < 0 || M > VLMKERN_BINARY_MAX_M || N < 0 || K < 1 || block_size < 32 ||
      block_size % 32 != 0 || ksplit < 1 || ksplit > 65535 || plane_stride % 4 != 0 ||
      plane_stride * 32 < K || (M > 1 && x_stride < K))
    return VLMKERN_BINARY_ERR_BAD_SIZE;
  if (M == 0 || N == 0) return VLMKERN_BINARY_OK;
  if (!x || !salient || !sign || !aux || !stats || !out || !workspace)
    return VLMKERN_BINARY_ERR_NULL_POINTER;
  if (!aligned16(sign) || !aligned16(aux) || !aligned16(workspace) ||
      !vlmkern_aligned_for(out, x_dtype))
    return VLMKERN_BINARY_ERR_BAD_SIZE;
  const Tokens tok = token_split(M);
  if (tok.groups_pad / tok.tg > 65535 || cdiv(N, kRowsPerCta) > 0x7fffffff)
    return VLMKERN_BINARY_ERR_BAD_SIZE;

  Dims d;
  d.M = M;
  d.N = N;
  d.K = K;
  d.x_stride = M > 1 ? x_stride : K;
  d.plane_stride = plane_stride;
  d.block_size = block_size;
  d.nblk = cdiv(K, block_size);
  d.steps = cdiv(K, kChunk) * (kChunk / 16);
  d.ksplit = ksplit;
  d.unit = block_size / gcd64(block_size, kChunk) * kChunk;
  const Workspace layout = workspace_layout(M, N, K, block_size, ksplit);
  const uint32_t* sal = reinterpret_cast<const uint32_t*>(salient);
  const uint32_t* sg = reinterpret_cast<const uint32_t*>(sign);
  const uint32_t* ax = reinterpret_cast<const uint32_t*>(aux);
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto launch = x_dtype == VLMKERN_BINARY_F16 ? launch_all<__half> : launch_all<__nv_bfloat16>;
  return launch(x, sal, sg, ax, stats, stats_dtype, bias, bias_dtype, out, d, ws, layout, s);
}
