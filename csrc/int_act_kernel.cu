// Integer-activation GEMM: per-token activation quantization (one pre-kernel
// for all tokens), then an int8/int4 tensor-core GEMM with exact int32
// accumulation per weight group and a fused scale + bias epilogue. The
// contract of every launcher is in int_act.h.
//
// GEMM structure: a BM x BN output tile per thread block, warps in a
// WARPS_M x WARPS_N grid, K walked in tiles of two MMA k-steps (64 bytes of
// activations per row), STAGES-deep cp.async pipeline into XOR-swizzled shared
// memory, fragments via ldmatrix. Each output element is owned by exactly one
// thread, which accumulates a group's products in int32 (exact) and then
// adds float(acc) * w_scale to an fp32 sum with one fused multiply-add per
// group, groups in order. Nothing in that arithmetic depends on the tile
// shape or on M, so every tile configuration gives the same bits: the result
// is batch-invariant and deterministic.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>

#include "int_act_common.cuh"
#include "vlmkern_kernels.h"  // vlmkern_aligned_for
#include "mma_int8.cuh"

namespace {

using namespace vlmkern_int_act;

// ---------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------
constexpr int kQuantThreads = 256;

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

struct QuantLayout {
  int64_t K, group, group_pad, k_pad;
  int lim, mode;
};

// Code of padded position pp of one token: the logical element it stands
// for (zero for padding), divided by s (IEEE), clamped, rounded half to even.
// Clamping first is equivalent (the bounds are integers) and keeps NaN out of
// nothing: NaN fails both comparisons and is mapped to 0 explicitly.
template <typename T>
__device__ __forceinline__ int code_at(const T* row, int64_t pp, float s, const QuantLayout& L) {
  const int64_t grp = pp / L.group_pad;
  const int64_t r = pp - grp * L.group_pad;
  const int64_t k = grp * L.group + r;
  if (r >= L.group || k >= L.K) return 0;
  float v = __fdiv_rn(to_f32(row[k]), s);
  if (v != v) return 0;
  const float lim = static_cast<float>(L.lim);
  v = fminf(fmaxf(v, -lim), lim);
  return static_cast<int>(rintf(v));
}

// I4W8 permutation inside a 32-element chunk (see int_act.h): stored byte p.
__device__ __forceinline__ int i4w8_source(int p) {
  const int q = p & 15;
  return 8 * (q >> 2) + 2 * (q & 3) + (p >> 4);
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
quantize_kernel(const T* __restrict__ x, int64_t x_stride, uint8_t* __restrict__ q,
                float* __restrict__ scales, QuantLayout L, float static_scale) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * x_stride;

  // Pass 1: absmax and whether a NaN occurs (fmaxf drops NaN, so count them).
  float amax = 0.f;
  bool nan = false;
  for (int64_t k = threadIdx.x; k < L.K; k += kQuantThreads) {
    const float v = to_f32(row[k]);
    nan |= (v != v);
    amax = fmaxf(amax, fabsf(v));
  }
  __shared__ float red_max[kQuantThreads / 32];
  __shared__ int red_nan[kQuantThreads / 32];
  __shared__ float token_scale;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  nan = __any_sync(0xffffffffu, nan);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    red_max[warp] = amax;
    red_nan[warp] = nan;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.f;
    int any_nan = 0;
    for (int w = 0; w < kQuantThreads / 32; ++w) {
      a = fmaxf(a, red_max[w]);
      any_nan |= red_nan[w];
    }
    float s;
    if (static_scale > 0.f) {
      s = static_scale;
    } else {
      s = __fdiv_rn(a, static_cast<float>(L.lim));
      if (s == 0.f) s = 1.f;
    }
    // A non-finite token poisons its scale, also a static one, which would
    // otherwise hide it. The codes use the static scale as given, but the
    // poisoned dynamic one (NaN: all codes 0; Inf: finite values give 0).
    const float codes_scale = s;
    if (any_nan) s = __int_as_float(0x7fc00000);
    else if (isinf(a)) s = a;
    scales[m] = s;
    token_scale = static_scale > 0.f ? codes_scale : s;
  }
  __syncthreads();
  const float s = token_scale;

  // Pass 2: four output bytes per thread per step, one 32-bit store.
  const int64_t row_bytes = (L.mode == VLMKERN_INT_ACT_I4) ? L.k_pad / 2 : L.k_pad;
  uint32_t* out = reinterpret_cast<uint32_t*>(q + m * row_bytes);
  for (int64_t word = threadIdx.x; word < row_bytes / 4; word += kQuantThreads) {
    uint32_t packed = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t byte = word * 4 + b;
      uint32_t v;
      if (L.mode == VLMKERN_INT_ACT_I4) {
        const int lo = code_at(row, 2 * byte, s, L), hi = code_at(row, 2 * byte + 1, s, L);
        v = (uint32_t(lo) & 0xFu) | ((uint32_t(hi) & 0xFu) << 4);
      } else if (L.mode == VLMKERN_INT_ACT_I4W8) {
        const int64_t chunk = byte >> 5;
        v = uint32_t(code_at(row, chunk * 32 + i4w8_source(int(byte & 31)), s, L)) & 0xFFu;
      } else {
        v = uint32_t(code_at(row, byte, s, L)) & 0xFFu;
      }
      packed |= v << (8 * b);
    }
    out[word] = packed;
  }
}

// ---------------------------------------------------------------------------
// MMA wrappers
// ---------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

using vlmkern_mma::mma_s8;

__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Hopper and newer have no int4 tensor-core path; the launcher never
  // selects I4 there (it routes W4A4 through I4W8), so this is unreachable.
  (void)d; (void)a; (void)b0; (void)b1;
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------
constexpr int kARowBytes = 64;  // activation bytes per row per K tile (2 k-steps), every mode

template <int MODE> struct ModeTraits {
  static constexpr int kBRowBytes = MODE == VLMKERN_INT_ACT_I4W8 ? 32 : 64;
  // Weight nibbles widened by a 4-bit left shift hold 16 * value.
  static constexpr int kAccShift = MODE == VLMKERN_INT_ACT_I4W8 ? 4 : 0;
};

// Byte offset of 16-byte chunk c of row r in a tile with row_bytes per row.
// The XOR spreads the 8 rows one ldmatrix reads (and the rows a warp's
// cp.async writes) over all 32 banks.
template <int kRowBytes>
__device__ __forceinline__ uint32_t swizzle(int r, int c) {
  constexpr int kChunks = kRowBytes / 16;  // 4 or 2
  constexpr int kShift = kChunks == 4 ? 1 : 2;
  return uint32_t(r * kRowBytes + ((c ^ ((r >> kShift) & (kChunks - 1))) << 4));
}

template <int MODE, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct GemmConfig {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kBRowBytes = ModeTraits<MODE>::kBRowBytes;
  static constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  static constexpr int kMI = kWarpM / 16, kNJ = kWarpN / 8;
  static constexpr int kAStage = BM * kARowBytes, kBStage = BN * kBRowBytes;
  static constexpr int kSmem = STAGES * (kAStage + kBStage);
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tile must hold 16x16 blocks");
  static_assert((BM * kARowBytes / 16) % kThreads == 0, "A tile chunks per thread");
  static_assert((BN * kBRowBytes / 16) % kThreads == 0, "B tile chunks per thread");
};

// SPREAD (the opt-in MMA_SPREAD GEMM, M <= 64): token rows past M are
// zero-filled instead of re-reading the last row, and with p.rotate_k block x
// walks K from k-tile x % k_tiles. When every block shares one activation
// tile, blocks walking K in step all read the same few activation bytes at
// once, from one L2 slice (a suspect for W8A8 measuring 2x slower at M = 1
// than at M = 16 with the same tiles). With one weight group the int32 sums
// are exact in any order, so the result is the same bits.
template <int MODE, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool SPREAD>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
int_act_gemm_kernel(GemmArgs p) {
  using C = GemmConfig<MODE, BM, BN, WARPS_M, WARPS_N, STAGES>;
  constexpr int kBRowBytes = C::kBRowBytes;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const uint32_t smem_base = smem_addr(smem);

  // Rows past M or N load a valid row (the last) instead of being masked: the
  // copies stay unpredicated and their results are never stored. SPREAD
  // zero-fills token rows past M instead.
  const int64_t a_stride = p.k_tiles * kARowBytes, b_stride = p.k_tiles * kBRowBytes;
  const int64_t k_first = SPREAD && p.rotate_k ? int64_t(blockIdx.x) % p.k_tiles : 0;
  auto load_tile = [&](int stage, int64_t kt) {
    const uint32_t a_smem = smem_base + stage * (C::kAStage + C::kBStage);
    const uint32_t b_smem = a_smem + C::kAStage;
    if constexpr (SPREAD) {
      kt += k_first;
      if (kt >= p.k_tiles) kt -= p.k_tiles;
    }
#pragma unroll
    for (int i = 0; i < BM * kARowBytes / 16 / C::kThreads; ++i) {
      const int chunk = tid + i * C::kThreads;
      const int r = chunk / (kARowBytes / 16), c = chunk % (kARowBytes / 16);
      if constexpr (SPREAD) {
        const bool in_m = m0 + r < p.M;
        cp_async16_zfill(a_smem + swizzle<kARowBytes>(r, c),
                         p.q + (in_m ? m0 + r : 0) * a_stride + kt * kARowBytes + c * 16, in_m);
      } else {
        const int64_t row = min(m0 + r, p.M - 1);
        cp_async16(a_smem + swizzle<kARowBytes>(r, c),
                   p.q + row * a_stride + kt * kARowBytes + c * 16);
      }
    }
#pragma unroll
    for (int i = 0; i < BN * kBRowBytes / 16 / C::kThreads; ++i) {
      const int chunk = tid + i * C::kThreads;
      const int r = chunk / (kBRowBytes / 16), c = chunk % (kBRowBytes / 16);
      const int64_t row = min(n0 + r, p.N - 1);
      cp_async16(b_smem + swizzle<kBRowBytes>(r, c),
                 p.w + row * b_stride + kt * kBRowBytes + c * 16);
    }
  };

  int acc[C::kMI][C::kNJ][4];
  float y[C::kMI][C::kNJ][4];
#pragma unroll
  for (int i = 0; i < C::kMI; ++i)
#pragma unroll
    for (int j = 0; j < C::kNJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[i][j][e] = 0;
        y[i][j][e] = 0.f;
      }

  // Scale the finished group's exact sums into the fp32 totals.
  auto flush = [&](int64_t group) {
#pragma unroll
    for (int j = 0; j < C::kNJ; ++j) {
      const int64_t n = n0 + wn * C::kWarpN + j * 8 + tig * 2;
      const float* srow = p.w_scale + group * p.N;
      const float s0 = srow[min(n, p.N - 1)], s1 = srow[min(n + 1, p.N - 1)];
#pragma unroll
      for (int i = 0; i < C::kMI; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float a = __int2float_rn(acc[i][j][e] >> ModeTraits<MODE>::kAccShift);
          y[i][j][e] = __fmaf_rn(a, (e & 1) ? s1 : s0, y[i][j][e]);
          acc[i][j][e] = 0;
        }
    }
  };

  const int64_t k_tiles = p.k_tiles;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();
  }

  int64_t step = 0;            // global k-step index
  int64_t group_left = p.steps_per_group;
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int64_t next = kt + STAGES - 1;
      if (next < k_tiles) load_tile(int(next % STAGES), next);
      cp_async_commit();
    }
    const int stage = int(kt % STAGES);
    const uint32_t a_smem = smem_base + stage * (C::kAStage + C::kBStage);
    const uint32_t b_smem = a_smem + C::kAStage;

#pragma unroll
    for (int s = 0; s < 2; ++s) {
      uint32_t af[C::kMI][4];
#pragma unroll
      for (int i = 0; i < C::kMI; ++i) {
        // Matrices: rows 0-7 / 8-15 of chunk 2s, then of chunk 2s+1 -> a0..a3.
        const int r = wm * C::kWarpM + i * 16 + (lane & 15);
        ldmatrix_x4(af[i], a_smem + swizzle<kARowBytes>(r, 2 * s + (lane >> 4)));
      }
      uint32_t bf[C::kNJ][2];
      if constexpr (MODE == VLMKERN_INT_ACT_I4W8) {
        // One 16-byte chunk per k-step: 32 nibbles per row, one register per
        // 8 columns. Low nibbles are the first k-step half, high the second.
#pragma unroll
        for (int j = 0; j < C::kNJ; j += 2) {
          uint32_t r2[2];
          const int r = wn * C::kWarpN + j * 8 + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x2(r2, b_smem + swizzle<kBRowBytes>(r, s));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            bf[j + h][0] = (r2[h] << 4) & 0xF0F0F0F0u;
            bf[j + h][1] = r2[h] & 0xF0F0F0F0u;
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < C::kNJ; j += 2) {
          // Matrices: (cols j, chunk 2s), (cols j, chunk 2s+1), then cols j+1.
          uint32_t r4[4];
          const int r = wn * C::kWarpN + j * 8 + (lane & 7) + (lane >> 4) * 8;
          ldmatrix_x4(r4, b_smem + swizzle<kBRowBytes>(r, 2 * s + ((lane >> 3) & 1)));
          bf[j][0] = r4[0];
          bf[j][1] = r4[1];
          bf[j + 1][0] = r4[2];
          bf[j + 1][1] = r4[3];
        }
      }
#pragma unroll
      for (int i = 0; i < C::kMI; ++i)
#pragma unroll
        for (int j = 0; j < C::kNJ; ++j) {
          if constexpr (MODE == VLMKERN_INT_ACT_I4) mma_s4(acc[i][j], af[i], bf[j][0], bf[j][1]);
          else mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);
        }
      // Steps past the last group are zero padding and are never flushed.
      if (--group_left == 0) {
        const int64_t group = step / p.steps_per_group;
        if (group < p.groups) flush(group);
        group_left = p.steps_per_group;
      }
      ++step;
    }
  }
  cp_async_wait<0>();

  // Epilogue: token scale and bias, one fused multiply-add, then the cast.
  // Every index is a compile-time constant so y stays in registers.
  const bool pair_ok = (p.N % 2) == 0;
#pragma unroll
  for (int i = 0; i < C::kMI; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wm * C::kWarpM + i * 16 + g + h * 8;
      const float sx = m < p.M ? p.sx[m] : 0.f;
#pragma unroll
      for (int j = 0; j < C::kNJ; ++j)
        store_outputs(p, m, n0 + wn * C::kWarpN + j * 8 + tig * 2, y[i][j][2 * h],
                      y[i][j][2 * h + 1], sx, pair_ok);
    }
  }
}

// ---------------------------------------------------------------------------
// Epilogue for an int32 product made elsewhere (one group per row)
// ---------------------------------------------------------------------------
__global__ void scale_int32_kernel(const int32_t* __restrict__ acc, int64_t acc_stride,
                                   const float* __restrict__ sx, const float* __restrict__ w_scale,
                                   const void* bias, int bias_dtype, void* out, int out_dtype,
                                   int64_t M, int64_t N) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i - m * N;
    // Same two steps as the GEMM with a single group: y = 0 + acc * s_w.
    const float y = __fmaf_rn(__int2float_rn(acc[m * acc_stride + n]), w_scale[n], 0.f);
    const float b = bias ? load_float(bias, bias_dtype, n) : 0.f;
    store_float(out, out_dtype, i, finish(y, sx[m], b));
  }
}

// ---------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------
template <int MODE, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool SPREAD = false>
int launch_gemm(const GemmArgs& args, cudaStream_t stream) {
  using C = GemmConfig<MODE, BM, BN, WARPS_M, WARPS_N, STAGES>;
  auto kernel = int_act_gemm_kernel<MODE, BM, BN, WARPS_M, WARPS_N, STAGES, SPREAD>;
  if (C::kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
    if (err != cudaSuccess) {
      last_launch_error = err;
      return VLMKERN_INT_ACT_ERR_LAUNCH;
    }
  }
  const dim3 grid(unsigned((args.N + BN - 1) / BN), unsigned((args.M + BM - 1) / BM));
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(args);
  return launch_status();
}

// The explicit list of tile shapes: decode (M <= 16), middle, prefill; the
// spread variants of the two shapes up to M = 64 (larger M runs the plain GEMM).
template <int MODE>
int launch_gemm_for_m(const GemmArgs& args, bool spread, cudaStream_t stream) {
  if (spread && args.M <= 16) return launch_gemm<MODE, 16, 32, 1, 2, 8, true>(args, stream);
  if (spread && args.M <= 64) return launch_gemm<MODE, 64, 64, 2, 2, 4, true>(args, stream);
  if (args.M <= 16) return launch_gemm<MODE, 16, 32, 1, 2, 8>(args, stream);
  if (args.M <= 256) return launch_gemm<MODE, 64, 64, 2, 2, 4>(args, stream);
  return launch_gemm<MODE, 128, 128, 2, 4, 4>(args, stream);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
bool valid_dtype(int d) { return d >= VLMKERN_INT_ACT_F16 && d <= VLMKERN_INT_ACT_F32; }
int k_step(int mode) { return mode == VLMKERN_INT_ACT_I4 ? 64 : 32; }

}  // namespace

extern "C" const char* vlmkern_int_act_status_message(int status) {
  switch (status) {
    case VLMKERN_INT_ACT_OK: return "success";
    case VLMKERN_INT_ACT_ERR_NULL_POINTER: return "a required pointer is null";
    case VLMKERN_INT_ACT_ERR_BAD_BITS: return "activation bits must be 4, 6 or 8";
    case VLMKERN_INT_ACT_ERR_BAD_SIZE:
      return "inconsistent sizes: need M, N, K >= 0 (the GEMM: M <= 8388480), 1 <= group <= "
             "group_pad, group_pad a multiple of the MMA k-step, k_pad a multiple of two k-steps "
             "holding every group, and 16-byte aligned buffers";
    case VLMKERN_INT_ACT_ERR_BAD_DTYPE: return "element type must be f16, bf16 or f32";
    case VLMKERN_INT_ACT_ERR_BAD_MODE:
      return "unknown mode or GEMM, the int4 MMA mode on a GPU without int4 tensor cores "
             "(sm_90+), or the WGMMA GEMM off sm_90, in a build without sm_90a code or with a "
             "mode other than I8";
    case VLMKERN_INT_ACT_ERR_LAUNCH:
      snprintf(message_buffer, sizeof(message_buffer), "CUDA kernel launch failed: %s (%s)",
               cudaGetErrorName(last_launch_error), cudaGetErrorString(last_launch_error));
      return message_buffer;
    default: return "unknown status code";
  }
}

extern "C" int vlmkern_int_act_quantize(const void* x, int x_dtype, int64_t x_stride, void* q,
                                        float* scales, int64_t M, int64_t K, int a_bits,
                                        float static_scale, int64_t group, int64_t group_pad,
                                        int64_t k_pad, int mode, void* stream) {
  if (a_bits != 4 && a_bits != 6 && a_bits != 8) return VLMKERN_INT_ACT_ERR_BAD_BITS;
  if (!valid_dtype(x_dtype)) return VLMKERN_INT_ACT_ERR_BAD_DTYPE;
  if (mode < VLMKERN_INT_ACT_I8 || mode > VLMKERN_INT_ACT_I4W8) return VLMKERN_INT_ACT_ERR_BAD_MODE;
  const int ks = k_step(mode);
  if (M < 0 || K < 1 || group < 1 || group > group_pad || group_pad % ks != 0 ||
      k_pad % (2 * ks) != 0 || x_stride < K || M > 0x7fffffff)
    return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  const int64_t groups = (K + group - 1) / group;
  if (groups * group_pad > k_pad) return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  if (M == 0) return VLMKERN_INT_ACT_OK;
  if (!x || !q || !scales) return VLMKERN_INT_ACT_ERR_NULL_POINTER;
  if (!aligned16(q)) return VLMKERN_INT_ACT_ERR_BAD_SIZE;

  QuantLayout L{K, group, group_pad, k_pad, (1 << (a_bits - 1)) - 1, mode};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid{unsigned(M)};
  switch (x_dtype) {
    case VLMKERN_INT_ACT_F16:
      quantize_kernel<__half><<<grid, kQuantThreads, 0, s>>>(
          static_cast<const __half*>(x), x_stride, static_cast<uint8_t*>(q), scales, L,
          static_scale);
      break;
    case VLMKERN_INT_ACT_BF16:
      quantize_kernel<__nv_bfloat16><<<grid, kQuantThreads, 0, s>>>(
          static_cast<const __nv_bfloat16*>(x), x_stride, static_cast<uint8_t*>(q), scales, L,
          static_scale);
      break;
    default:
      quantize_kernel<float><<<grid, kQuantThreads, 0, s>>>(
          static_cast<const float*>(x), x_stride, static_cast<uint8_t*>(q), scales, L,
          static_scale);
      break;
  }
  return launch_status();
}

extern "C" int vlmkern_int_act_gemm(const void* q, const float* sx, const void* w,
                                    const float* w_scale, const void* bias, int bias_dtype,
                                    void* out, int out_dtype, int64_t M, int64_t N,
                                    int64_t groups, int64_t group_pad, int64_t k_pad, int mode,
                                    int gemm, void* stream) {
  if (mode < VLMKERN_INT_ACT_I8 || mode > VLMKERN_INT_ACT_I4W8) return VLMKERN_INT_ACT_ERR_BAD_MODE;
  const bool hopper = gemm == VLMKERN_INT_ACT_GEMM_WGMMA || gemm == VLMKERN_INT_ACT_GEMM_TMA;
  if (gemm != VLMKERN_INT_ACT_GEMM_MMA && gemm != VLMKERN_INT_ACT_GEMM_MMA_SPREAD &&
      (!hopper || mode != VLMKERN_INT_ACT_I8 || (gemm == VLMKERN_INT_ACT_GEMM_TMA && groups != 1)))
    return VLMKERN_INT_ACT_ERR_BAD_MODE;
  if (!valid_dtype(out_dtype) || (bias && !valid_dtype(bias_dtype)))
    return VLMKERN_INT_ACT_ERR_BAD_DTYPE;
  if (bias && !vlmkern_aligned_for(bias, bias_dtype)) return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  const int ks = k_step(mode);
  if (M < 0 || N < 0 || groups < 1 || group_pad < ks || group_pad % ks != 0 ||
      k_pad % (2 * ks) != 0 || groups * group_pad > k_pad || M > VLMKERN_INT_ACT_MAX_M)
    return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  if (M == 0 || N == 0) return VLMKERN_INT_ACT_OK;
  if (!q || !sx || !w || !w_scale || !out) return VLMKERN_INT_ACT_ERR_NULL_POINTER;
  if (!aligned16(q) || !aligned16(w) || !aligned16(out) || reinterpret_cast<uintptr_t>(sx) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(w_scale) % 4 != 0)
    return VLMKERN_INT_ACT_ERR_BAD_SIZE;

  int major = 0;
  const int status = current_device_major(&major);
  if (status != VLMKERN_INT_ACT_OK) return status;
  if (major < 8 || (mode == VLMKERN_INT_ACT_I4 && major >= 9)) return VLMKERN_INT_ACT_ERR_BAD_MODE;
  if (hopper) {
    // Without sm_90a code the kernel would trap and take the CUDA context with it.
    int built = 0;
    const int probe = vlmkern_int_act_sm90_available(&built);
    if (probe != VLMKERN_INT_ACT_OK) return probe;
    if (!built) return VLMKERN_INT_ACT_ERR_BAD_MODE;
  }

  GemmArgs args;
  args.q = static_cast<const uint8_t*>(q);
  args.sx = sx;
  args.w = static_cast<const uint8_t*>(w);
  args.w_scale = w_scale;
  args.bias = bias;
  args.out = out;
  args.M = M;
  args.N = N;
  args.groups = groups;
  args.k_tiles = k_pad / (2 * ks);
  args.steps_per_group = group_pad / ks;
  args.bias_dtype = bias_dtype;
  args.out_dtype = out_dtype;
  // One group spanning every k-step (the group flush comes after the last
  // step in any order), and one activation tile for all blocks.
  const bool spread = gemm == VLMKERN_INT_ACT_GEMM_MMA_SPREAD;
  args.rotate_k = spread && groups == 1 && group_pad == k_pad && M <= 64;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (gemm == VLMKERN_INT_ACT_GEMM_WGMMA) return launch_gemm_sm90(args, s);
  if (gemm == VLMKERN_INT_ACT_GEMM_TMA) return launch_gemm_sm90_tma(args, s);
  switch (mode) {
    case VLMKERN_INT_ACT_I8: return launch_gemm_for_m<VLMKERN_INT_ACT_I8>(args, spread, s);
    case VLMKERN_INT_ACT_I4: return launch_gemm_for_m<VLMKERN_INT_ACT_I4>(args, spread, s);
    default: return launch_gemm_for_m<VLMKERN_INT_ACT_I4W8>(args, spread, s);
  }
}

extern "C" int vlmkern_int_act_scale_int32(const int32_t* acc, int64_t acc_stride,
                                           const float* sx, const float* w_scale,
                                           const void* bias, int bias_dtype, void* out,
                                           int out_dtype, int64_t M, int64_t N, void* stream) {
  if (!valid_dtype(out_dtype) || (bias && !valid_dtype(bias_dtype)))
    return VLMKERN_INT_ACT_ERR_BAD_DTYPE;
  if (bias && !vlmkern_aligned_for(bias, bias_dtype)) return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  if (M < 0 || N < 0 || acc_stride < N) return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  if (M == 0 || N == 0) return VLMKERN_INT_ACT_OK;
  if (!acc || !sx || !w_scale || !out) return VLMKERN_INT_ACT_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(acc) % 4 != 0 || reinterpret_cast<uintptr_t>(sx) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(w_scale) % 4 != 0 || !vlmkern_aligned_for(out, out_dtype))
    return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  const int threads = 256;
  int64_t blocks = (M * N + threads - 1) / threads;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;
  scale_int32_kernel<<<unsigned(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      acc, acc_stride, sx, w_scale, bias, bias_dtype, out, out_dtype, M, N);
  return launch_status();
}
