// Pieces shared by the weight-only kernels: weight_only_kernel.cu (mma.sync,
// every GPU from sm_80) and weight_only_sm90_kernel.cu (warpgroup MMA,
// sm_90a). Both read the same load-time layout (weight_only.h) and decode a
// code into a 16-bit MMA operand the same way.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "vlmkern_kernels.h"  // enum vlmkern_dtype
#include "weight_only.h"      // status codes

namespace vlmkern_wo {

// Keeps `err` for vlmkern_wo_status_message; returns VLMKERN_WO_ERR_LAUNCH.
int launch_failed(cudaError_t err);

// -- 16-bit float flavours: magic number and MMA instruction -----------------
struct F16 {
  static constexpr uint32_t kMagic2 = 0x64006400u;  // 1024.0 in both halves
  static constexpr uint32_t kOne2 = 0x3C003C00u;
  static constexpr int kMantissa = 10;
  // 2^e in both halves, for -14 <= e <= 15
  __host__ __device__ static constexpr uint32_t pow2_2(int e) { return 0x10001u * (static_cast<uint32_t>(15 + e) << 10); }
  // a * b + (the low or high half of c in both halves): the half selection is
  // an operand modifier of HFMA2, not an instruction.
  __device__ static uint32_t fma_bcast(uint32_t a, uint32_t b, uint32_t c, bool high) {
    const __half2 cc = *reinterpret_cast<const __half2*>(&c);
    __half2 d = __hfma2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b),
                        high ? __high2half2(cc) : __low2half2(cc));
    return *reinterpret_cast<uint32_t*>(&d);
  }
  __device__ static float to_float(uint32_t bits16) {
    float v;
    asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(static_cast<uint16_t>(bits16)));
    return v;
  }
  __device__ static void fma2(uint32_t& d, uint32_t a, uint32_t b, uint32_t c) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint16_t from_float(float v) {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};

struct BF16 {
  static constexpr uint32_t kMagic2 = 0x43004300u;  // 128.0 in both halves
  static constexpr uint32_t kOne2 = 0x3F803F80u;
  static constexpr int kMantissa = 7;
  __host__ __device__ static constexpr uint32_t pow2_2(int e) { return 0x10001u * (static_cast<uint32_t>(127 + e) << 7); }
  __device__ static uint32_t fma_bcast(uint32_t a, uint32_t b, uint32_t c, bool high) {
    const __nv_bfloat162 cc = *reinterpret_cast<const __nv_bfloat162*>(&c);
    __nv_bfloat162 d = __hfma2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                               *reinterpret_cast<const __nv_bfloat162*>(&b),
                               high ? __high2bfloat162(cc) : __low2bfloat162(cc));
    return *reinterpret_cast<uint32_t*>(&d);
  }
  __device__ static float to_float(uint32_t bits16) { return __uint_as_float((bits16 & 0xFFFFu) << 16); }
  __device__ static void fma2(uint32_t& d, uint32_t a, uint32_t b, uint32_t c) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint16_t from_float(float v) {
    uint16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};

constexpr uint32_t kNegZero2 = 0x80008000u;  // -0.0 in both halves: x*s + (-0) == x*s

// (a & mask) | c in one LOP3. Written as C, a mask and a magic number that
// are both constants take two instructions (LOP3 holds one immediate).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(c));
  return d;
}

// (a & mask) | c, as one LOP3 (LOP3 = true) or as C.
template <bool LOP3>
__device__ __forceinline__ uint32_t mask_or(uint32_t a, uint32_t mask, uint32_t c) {
  if constexpr (LOP3) {
    return and_or(a, mask, c);
  } else {
    return (a & mask) | c;
  }
}

// -- codes of A-fragment register r (0..3) of k16 tile kt, as magic + q --------
// Lane words: 4 bits: w[kt] holds tile kt, pair r at bits 4r and 16+4r.
// 2 bits: w[kt/2] holds tiles 2v, 2v+1, pair p = 4*(kt%2) + r at bits 2p, 16+2p.
// 3 bits: the 2-bit plane above in w[0..3] for the low two bits, and a 1-bit
// plane in w[4..5]: w[4 + kt/4] holds pair p = 4*(kt%4) + r at bits p, 16+p.
// LOP3: each mask-and-or forced into one LOP3 (the Hopper TMA kernel's
// decode, with the mask and magic number in registers); the kernels that
// passed their GPU tests with the C form keep it.
template <int BITS, bool LOP3 = false>
__device__ __forceinline__ uint32_t magic_codes(const uint32_t (&w)[2 * BITS], int kt, int r,
                                                uint32_t magic2) {
  if constexpr (BITS == 4) {
    return mask_or<LOP3>(w[kt] >> (4 * r), 0x000F000Fu, magic2);
  } else if constexpr (BITS == 2) {
    return mask_or<LOP3>(w[kt / 2] >> (2 * (4 * (kt % 2) + r)), 0x00030003u, magic2);
  } else {
    const int p = 4 * (kt % 2) + r;
    const int ph = 4 * (kt % 4) + r;
    const uint32_t hi = w[4 + kt / 4];
    const uint32_t hi_at_bit2 = ph >= 2 ? (hi >> (ph - 2)) : (hi << (2 - ph));
    if constexpr (LOP3) {
      return and_or(hi_at_bit2, 0x00040004u, and_or(w[kt / 2] >> (2 * p), 0x00030003u, magic2));
    } else {
      return ((w[kt / 2] >> (2 * p)) & 0x00030003u) | (hi_at_bit2 & 0x00040004u) | magic2;
    }
  }
}

// -- cp.async -------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  // src_bytes < 16 zero-fills the rest (used for padding rows and columns).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// The copy only where `pred` holds, as one predicated instruction (no branch).
__device__ __forceinline__ void cp_async16_if(uint32_t pred, uint32_t dst, const void* src,
                                              int src_bytes) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %0, 0;\n"
      " @p cp.async.cg.shared.global [%1], [%2], 16, %3;\n}"
      ::"r"(pred), "r"(dst), "l"(src), "r"(src_bytes)
      : "memory");
}
// A value the compiler cannot see through, so it keeps it in a register
// instead of recomputing it from threadIdx inside a kernel's main loop.
__device__ __forceinline__ uint32_t opaque(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}

// This thread's 16-byte pieces of a block of PIECES pieces copied by THREADS
// threads: piece tid + r * THREADS, r = 0, 1, ...; dst and src already point at
// the thread's first piece, lane_bytes = 16 * tid.
template <int PIECES, int THREADS>
__device__ __forceinline__ void copy_pieces(uint32_t dst, const unsigned char* src,
                                            uint32_t lane_bytes) {
#pragma unroll
  for (int r = 0; r < (PIECES + THREADS - 1) / THREADS; ++r) {
    if constexpr (PIECES % THREADS == 0)
      cp_async16(dst + 16 * r * THREADS, src + 16 * r * THREADS, 16);
    else if (r < PIECES / THREADS)
      cp_async16(dst + 16 * r * THREADS, src + 16 * r * THREADS, 16);
    else
      cp_async16_if(lane_bytes < 16 * (PIECES % THREADS), dst + 16 * r * THREADS,
                    src + 16 * r * THREADS, 16);
  }
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// This lane's code words of a warp's 16x128 tile (at `wtile` in shared memory).
template <int BITS>
__device__ __forceinline__ void load_lane_words(const unsigned char* wtile, int lane,
                                                uint32_t (&w)[2 * BITS]) {
  const uint4 lo = reinterpret_cast<const uint4*>(wtile)[lane];
  w[0] = lo.x; w[1] = lo.y; w[2] = lo.z; w[3] = lo.w;
  if constexpr (BITS == 4) {
    const uint4 hi = reinterpret_cast<const uint4*>(wtile + 512)[lane];
    w[4] = hi.x; w[5] = hi.y; w[6] = hi.z; w[7] = hi.w;
  } else if constexpr (BITS == 3) {
    const uint2 hi = reinterpret_cast<const uint2*>(wtile + 512)[lane];
    w[4] = hi.x; w[5] = hi.y;
  }
}

// A scale slot word pair of rows g, g+8 (scales; -(magic + zero)) as each
// row's value in both halves.
__device__ __forceinline__ void split_rows(uint2 sv, uint32_t& s_lo, uint32_t& s_hi,
                                           uint32_t& z_lo, uint32_t& z_hi) {
  s_lo = __byte_perm(sv.x, 0, 0x1010);
  s_hi = __byte_perm(sv.x, 0, 0x3232);
  z_lo = __byte_perm(sv.y, 0, 0x1010);
  z_hi = __byte_perm(sv.y, 0, 0x3232);
}

// A-fragment register r of step kt as s * (q - z), rounded once: (magic + q)
// - (magic + z) is exact, then one multiply. s and negz are the row's scale
// and -(magic + zero) in both halves.
template <int BITS, class T>
__device__ __forceinline__ uint32_t exact_operand(const uint32_t (&w)[2 * BITS], int kt, int r,
                                                  uint32_t s, uint32_t negz) {
  const uint32_t q = magic_codes<BITS>(w, kt, r, T::kMagic2);
  uint32_t d;
  T::fma2(d, q, T::kOne2, negz);   // q - z, exact
  T::fma2(d, d, s, kNegZero2);     // s * (q - z), rounded once
  return d;
}

// *counter += v at GPU scope with release and acquire semantics; the old
// value. The stream-K parts' publish: after a barrier, one thread's release
// covers its block's stores, and the last part's acquire covers every
// earlier part's (a fence in every thread, __threadfence = fence.sc.gpu,
// also waits on each thread's outstanding copies).
__device__ __forceinline__ int atomic_add_acq_rel(int32_t* counter, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(v)
               : "memory");
  return old;
}

// Bias element n as fp32 (dtype: a vlmkern_dtype).
__device__ __forceinline__ float load_bias(const void* bias, int dtype, int n) {
  if (dtype == VLMKERN_DTYPE_F32) return static_cast<const float*>(bias)[n];
  const uint32_t bits = static_cast<const uint16_t*>(bias)[n];
  if (dtype == VLMKERN_DTYPE_BF16) return __uint_as_float(bits << 16);
  float v;
  asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(static_cast<uint16_t>(bits)));
  return v;
}

// out = the K slices' fp32 partial sums ([splits, M, N]) added in slice
// order, + bias, rounded once: the second kernel of the Hopper kernels'
// split-K. P names partial, splits, M, N, bias, bias_dtype and out.
constexpr int kSplitSumThreads = 256;
template <class T, class P>
__global__ void __launch_bounds__(kSplitSumThreads) wo_split_sum_kernel(P p) {
  const int64_t total = p.M * p.N;
  for (int64_t i = int64_t(blockIdx.x) * kSplitSumThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kSplitSumThreads) {
    float v = 0.f;
    for (int s = 0; s < p.splits; ++s) v += p.partial[s * total + i];
    if (p.bias) v += load_bias(p.bias, p.bias_dtype, static_cast<int>(i % p.N));
    p.out[i] = T::from_float(v);
  }
}

// Enqueues wo_split_sum_kernel over p's M x N outputs; the launch's CUDA error.
template <class T, class P>
cudaError_t launch_split_sum(const P& p, cudaStream_t stream) {
  const int64_t blocks = (p.M * p.N + kSplitSumThreads - 1) / kSplitSumThreads;
  wo_split_sum_kernel<T, P><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536),
                              kSplitSumThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The argument checks both launchers share (layout, dtypes, pointers,
// alignment): VLMKERN_WO_OK or the status code of the first failure.
inline int check_launch_args(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                             const int32_t* sz, int64_t NB, int64_t C, int slot_log2, int bits,
                             const void* bias, int bias_dtype, const void* out, int64_t N,
                             int act_dtype) {
  constexpr int64_t kRows = 128, kColumns = 128;  // a layout block and chunk
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (bits < 2 || bits > 4) return VLMKERN_WO_ERR_BAD_BITS;
  if (act_dtype != VLMKERN_DTYPE_F16 && act_dtype != VLMKERN_DTYPE_BF16) return VLMKERN_WO_ERR_BAD_DTYPE;
  if (bias && bias_dtype != VLMKERN_DTYPE_F16 && bias_dtype != VLMKERN_DTYPE_BF16 &&
      bias_dtype != VLMKERN_DTYPE_F32)
    return VLMKERN_WO_ERR_BAD_DTYPE;
  if (M < 1 || NB < 1 || C < 1 || N <= (NB - 1) * kRows || N > NB * kRows ||
      K_x <= (C - 1) * kColumns || K_x > C * kColumns || slot_log2 < 0 || slot_log2 > 3 ||
      K_x > 0x7fffffff || N > 0x7fffffff)
    return VLMKERN_WO_ERR_BAD_SIZE;
  if (!x || !wq || !sz || !out) return VLMKERN_WO_ERR_NULL_POINTER;
  if (K_x % 8 != 0 || !aligned16(x) || !aligned16(wq) || !aligned16(sz) ||
      !vlmkern_aligned_for(out, act_dtype) || (bias && !vlmkern_aligned_for(bias, bias_dtype)))
    return VLMKERN_WO_ERR_ALIGNMENT;
  return VLMKERN_WO_OK;
}

}  // namespace vlmkern_wo
