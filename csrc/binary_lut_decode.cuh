// The lookup-table decode of binarized weights (binary.h's lookup-table
// layout), shared by the kernels that read that layout: binary_lut_kernel.cu
// (activations straight from global memory) and the staged pipeline of
// weight_only_kernel.cu (activations through shared memory).
//
// A lane holds, per 128-column chunk of its 16-row tile: 16 code bytes (2-bit
// indices i = s + 2a of its A-fragment pairs), the tables of its rows g and
// g + 8 (4 ordinary and 4 salient 16-bit values each) and 8 merge selectors
// (which table each column reads). A pair of weights becomes an A-fragment
// register with a selector (pair_selectors) and three byte permutes.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace vlmkern_lut {

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// PTX prmt.b32, default mode: byte i of the result is byte nibble_i(sel) of
// the 8 bytes {b:a}; only sel[15:0] is read. The selectors here never set a
// nibble's bit 3 (sign replication), which __byte_perm would mask off with an
// extra instruction.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// Selectors of pair r of both k16 steps a code word holds (steps 2v and
// 2v + 1): .x for step 2v, .y for step 2v + 1, each c * 0x22 + 0x1010 in its
// low 16 bits (c = the pair's two 2-bit indices at bits 0 and 8), which is
// all prmt reads. With m = the word's index fields of pair r masked in place
// after a shift by 2r, m = a + b * 2^16 (a, b <= 0x0303: the fields of steps
// 2v and 2v + 1), the 64-bit
//   m * 0x00220022 + 0x00001010'00001010
//     = (a*0x22 + 0x1010) + (a + b)*0x22 * 2^16 + (b*0x22 + 0x1010) * 2^32
// has a*0x22 + 0x1010 in bits 0..15 and b*0x22 + 0x1010 in bits 32..47, and
// the low word never carries (0x7676 + 0xCCCC0000 < 2^32). So the selectors
// of two pairs cost a shift (none for r = 0), a mask and one 32x32->64
// multiply-add (IMAD + IMAD.HI): 2 instructions per pair instead of 3.
__device__ __forceinline__ uint2 pair_selectors(uint32_t word, int r) {
  const uint32_t m = (word >> (2 * r)) & 0x03030303u;
  const uint64_t y = static_cast<uint64_t>(m) * 0x00220022u + 0x0000101000001010ull;
  return make_uint2(static_cast<uint32_t>(y), static_cast<uint32_t>(y >> 32));
}

// A-fragment registers a[0..3] of k16 step kt: register r holds row
// g + 8*(r % 2), columns 16kt + 2t + 8*(r / 2) + {0, 1} (m16n8k16 A layout).
// t0 / t1: the tables of rows g / g + 8; m0 / m1: merge selectors of steps
// 0..3 / 4..7 (column pair 2t + {0,1} in the low half, 8 + 2t + {0,1} high).
__device__ __forceinline__ void lut_operands(const uint4& codes, const uint4& t0, const uint4& t1,
                                             const uint4& m0, const uint4& m1, int kt,
                                             uint32_t (&a)[4]) {
  const uint32_t msel0 = word_of(kt < 4 ? m0 : m1, kt % 4);
  const uint32_t msel1 = msel0 >> 16;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint4& tab = (r & 1) ? t1 : t0;
    const uint2 both = pair_selectors(word_of(codes, kt / 2), r);
    const uint32_t sel = (kt & 1) ? both.y : both.x;
    const uint32_t v_ord = prmt(tab.x, tab.y, sel);
    const uint32_t v_sal = prmt(tab.z, tab.w, sel);
    a[r] = prmt(v_ord, v_sal, (r & 2) ? msel1 : msel0);
  }
}

}  // namespace vlmkern_lut
