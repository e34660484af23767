// Pieces shared by the integer-activation GEMMs: int_act_kernel.cu (mma.sync,
// every GPU from sm_80) and int_act_sm90_kernel.cu (warpgroup MMA, sm_90a).
// Both compute the same exact int32 sums and finish them with the same
// rounding steps, so they agree bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "int_act.h"

namespace vlmkern_int_act {

// ---------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------
__device__ __forceinline__ float load_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case VLMKERN_INT_ACT_F16: return __half2float(static_cast<const __half*>(p)[i]);
    case VLMKERN_INT_ACT_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_float(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case VLMKERN_INT_ACT_F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case VLMKERN_INT_ACT_BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// Two adjacent outputs (i even, buffer aligned for the pair) in one store.
__device__ __forceinline__ void store_pair(void* p, int dtype, int64_t i, float v0, float v1) {
  switch (dtype) {
    case VLMKERN_INT_ACT_F16:
      reinterpret_cast<__half2*>(static_cast<__half*>(p) + i)[0] = __floats2half2_rn(v0, v1);
      break;
    case VLMKERN_INT_ACT_BF16:
      reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p) + i)[0] =
          __floats2bfloat162_rn(v0, v1);
      break;
    default: reinterpret_cast<float2*>(static_cast<float*>(p) + i)[0] = make_float2(v0, v1); break;
  }
}

// The last two rounding steps shared by the GEMM and the int32 epilogue:
// y * token_scale + bias as one fused multiply-add.
__device__ __forceinline__ float finish(float y, float token_scale, float bias) {
  return __fmaf_rn(y, token_scale, bias);
}

// ---------------------------------------------------------------------------
// Asynchronous copies
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// 16 bytes from src, or zeros when !valid (src is then not read).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------
// GEMM arguments and launch status
// ---------------------------------------------------------------------------
struct GemmArgs {
  const uint8_t* q;      // activations, row stride kt * 64 bytes
  const float* sx;
  const uint8_t* w;      // weights, row stride kt * kBRowBytes bytes
  const float* w_scale;  // [groups, N]
  const void* bias;
  void* out;
  int64_t M, N, groups;
  int64_t k_tiles;         // k_pad / (2 k-steps)
  int64_t steps_per_group; // group_pad / k-step
  int bias_dtype, out_dtype;
  int rotate_k;            // 1: block x walks K from k-tile x % k_tiles (the spread
                           // mma.sync kernel in int_act_kernel.cu; the others ignore it)
};

// Outputs (m, n) and (m, n + 1) from their fp32 sums y0, y1 and the token
// scale sx: one fused multiply-add with the bias, the cast, and one paired
// store where both are in range and N is even (else what is in range).
__device__ __forceinline__ void store_outputs(const GemmArgs& p, int64_t m, int64_t n, float y0,
                                              float y1, float sx, bool pair_ok) {
  const bool in0 = m < p.M && n < p.N, in1 = m < p.M && n + 1 < p.N;
  const float b0 = (p.bias && in0) ? load_float(p.bias, p.bias_dtype, n) : 0.f;
  const float b1 = (p.bias && in1) ? load_float(p.bias, p.bias_dtype, n + 1) : 0.f;
  const float v0 = finish(y0, sx, b0);
  const float v1 = finish(y1, sx, b1);
  if (in1 && pair_ok) {
    store_pair(p.out, p.out_dtype, m * p.N + n, v0, v1);
  } else {
    if (in0) store_float(p.out, p.out_dtype, m * p.N + n, v0);
    if (in1) store_float(p.out, p.out_dtype, m * p.N + n + 1, v1);
  }
}

// Outputs (m, n .. n + 7) from their fp32 sums y: store_outputs' rounding,
// with one 16-byte store (two for fp32) where all eight are in range and N
// is a multiple of 8 (rows and n then 16-byte aligned), else pair by pair.
__device__ __forceinline__ void store_outputs8(const GemmArgs& p, int64_t m, int64_t n,
                                               const float (&y)[8], float sx) {
  if (m >= p.M) return;
  if (p.N % 8 != 0 || n + 8 > p.N) {
#pragma unroll
    for (int i = 0; i < 8; i += 2) store_outputs(p, m, n + i, y[i], y[i + 1], sx, p.N % 2 == 0);
    return;
  }
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = finish(y[i], sx, p.bias ? load_float(p.bias, p.bias_dtype, n + i) : 0.f);
  const int64_t at = m * p.N + n;
  if (p.out_dtype == VLMKERN_INT_ACT_F32) {
    float4* dst = reinterpret_cast<float4*>(static_cast<float*>(p.out) + at);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (p.out_dtype == VLMKERN_INT_ACT_F16) {
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.out) + at) = make_uint4(w[0], w[1], w[2], w[3]);
}

inline thread_local cudaError_t last_launch_error = cudaSuccess;
inline thread_local char message_buffer[256];

inline int launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    last_launch_error = err;
    return VLMKERN_INT_ACT_ERR_LAUNCH;
  }
  return VLMKERN_INT_ACT_OK;
}

// Compute capability major of the current device, or a launch-error status
// (the CUDA error kept for the status message).
inline int current_device_major(int* major) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) {
    last_launch_error = err;
    return VLMKERN_INT_ACT_ERR_LAUNCH;
  }
  return VLMKERN_INT_ACT_OK;
}

// Warpgroup-MMA GEMM for mode I8 (int_act_sm90_kernel.cu). The caller has
// validated the arguments and that the device is sm_90.
int launch_gemm_sm90(const GemmArgs& args, cudaStream_t stream);
// The warp-specialized TMA GEMM for mode I8 with one group
// (int_act_sm90_tma_kernel.cu); same preconditions.
int launch_gemm_sm90_tma(const GemmArgs& args, cudaStream_t stream);

}  // namespace vlmkern_int_act
