// Warpgroup MMAs of the Hopper weight-only kernels (sm_90a only):
// weight_only_sm90_kernel.cu and weight_only_sm90_tma_kernel.cu. fp16 or bf16
// operands (the F16 / BF16 tags of weight_only_common.cuh), fp32 sums, the
// activations as the B operand in shared memory (a K-major 128-byte-swizzled
// tile named by a descriptor), the weights as the A operand in registers.
#pragma once

#include <stdint.h>

#include "sm90_wgmma.cuh"
#include "weight_only_common.cuh"

#if VLMKERN_SM90A
namespace vlmkern_wo {

#define VLMKERN_ACC8(i)                                                                   \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define VLMKERN_REGS32                                                                     \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                  \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define VLMKERN_REGS64                                                                     \
  VLMKERN_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// d (this thread's sums of a 64 x N tile) += A (64 x 16, this thread's
// fragment in a) * B (N tokens x 16, K-major in shared memory)^T; the
// operands after the sums: the 4 fragment registers, then the descriptor.
#define VLMKERN_WGMMA_N16(type)                                                              \
  asm volatile("wgmma.mma_async.sync.aligned.m64n16k16.f32." type "." type                       \
               " {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, 1, 1, 1, 0;\n"       \
               : VLMKERN_ACC8(0)                                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
#define VLMKERN_WGMMA_N64(type)                                                                \
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " {" VLMKERN_REGS32 \
               "}, {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"                                     \
               : VLMKERN_ACC8(0), VLMKERN_ACC8(8), VLMKERN_ACC8(16), VLMKERN_ACC8(24)           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
#define VLMKERN_WGMMA_N128(type)                                                               \
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " {" VLMKERN_REGS64 \
               "}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"                                    \
               : VLMKERN_ACC8(0), VLMKERN_ACC8(8), VLMKERN_ACC8(16), VLMKERN_ACC8(24),          \
                 VLMKERN_ACC8(32), VLMKERN_ACC8(40), VLMKERN_ACC8(48), VLMKERN_ACC8(56)         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))

__device__ __forceinline__ void wgmma_k16(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b,
                                          F16) {
  VLMKERN_WGMMA_N16("f16");
}
__device__ __forceinline__ void wgmma_k16(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b,
                                          BF16) {
  VLMKERN_WGMMA_N16("bf16");
}
__device__ __forceinline__ void wgmma_k16(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                          F16) {
  VLMKERN_WGMMA_N64("f16");
}
__device__ __forceinline__ void wgmma_k16(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                          BF16) {
  VLMKERN_WGMMA_N64("bf16");
}
__device__ __forceinline__ void wgmma_k16(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                          F16) {
  VLMKERN_WGMMA_N128("f16");
}
__device__ __forceinline__ void wgmma_k16(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                          BF16) {
  VLMKERN_WGMMA_N128("bf16");
}
#undef VLMKERN_WGMMA_N128
#undef VLMKERN_WGMMA_N64
#undef VLMKERN_WGMMA_N16
#undef VLMKERN_REGS64
#undef VLMKERN_REGS32
#undef VLMKERN_ACC8

}  // namespace vlmkern_wo
#endif  // VLMKERN_SM90A
