// The int8 tensor-core MMA, shared by the integer-activation GEMM
// (int_act_kernel.cu) and the integer decode of the weight-only pipeline
// (weight_only_kernel.cu). Includes CUDA headers only.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace vlmkern_mma {

// d += A (16 x 32, row-major s8) * B (32 x 8, column-major s8), s32 sums:
// a holds the lane's four A-fragment registers, b0 and b1 its two B ones.
__device__ __forceinline__ void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace vlmkern_mma
