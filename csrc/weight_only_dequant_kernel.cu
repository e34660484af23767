// Dense weight from the tensor-core kernels' load-time layout (weight_only.h):
// out[n, k] = s * (q - z) rounded once to fp16/bf16, the same bits the
// mma.sync and wgmma kernels put in their A fragments. With it a layer can
// keep only that layout on the GPU and still feed cuBLAS at large M.
//
// Work split. A thread block owns one (128-row block, 128-column chunk) unit,
// whose 8 tiles of 16x128 codes are contiguous in wq; warp w decodes tile w.
// Blocks are numbered b * C + c, the order of the layout, so neighbouring
// blocks read neighbouring bytes and write neighbouring 256-byte row pieces.
//
// Decode. Each lane loads its A-fragment code words with the GEMM's own
// load_lane_words (16-byte loads: a warp reads its tile as one contiguous
// run) and turns them into 16-bit weight pairs with the GEMM's split_rows and
// exact_operand, so both round identically.
//
// Stores. A lane's pairs are scattered over 8 rows and 32 columns (the MMA
// fragment order), so they are staged in shared memory, one half tile (the 8
// rows of g or of g + 8) at a time, and written back row by row: 16-byte
// stores, 16 lanes per 256-byte row piece, when every row starts 16-byte
// aligned (K % 8 == 0 and an aligned out); 2-byte stores, 32 consecutive
// columns per instruction, otherwise. Rows >= N and columns >= K (the
// layout's padding) are never written.

#include <cuda_runtime.h>
#include <stdint.h>

#include "weight_only.h"
#include "weight_only_common.cuh"

namespace {

using namespace vlmkern_wo;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockRows = kWarps * 16;  // rows of a layout block
constexpr int kChunk = 128;              // columns of a layout chunk
constexpr int kSteps = kChunk / 16;      // k16 steps per chunk
// A staged row is 128 halves plus 16 bytes: the 68-word stride puts the
// stores of lanes 4g + t (row g, word 8kt + 4ch + t) in 32 distinct banks,
// and keeps rows 16-byte aligned for the vector reads.
constexpr int kStageRowBytes = kChunk * 2 + 16;
constexpr int kStageBytes = 8 * kStageRowBytes;  // one warp's half tile: 8 rows

struct Params {
  const unsigned char* wq;  // [NB, C, 8, 64*bits] int32
  const unsigned char* sz;  // [NB, C, 8, slots, 8, 2] int32
  uint16_t* out;            // [N, K]
  int64_t N, K;
  int C, slot_log2, slots;
};

// VEC: every output row starts 16-byte aligned (16-byte stores).
template <int BITS, class T, bool VEC>
__global__ void __launch_bounds__(kThreads) weight_only_dequant_kernel(Params p) {
  __shared__ __align__(16) unsigned char stage_all[kWarps * kStageBytes];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int unit = blockIdx.x;  // b * C + c
  const int b = unit / p.C;
  const int c = unit - b * p.C;
  const int64_t row0 = static_cast<int64_t>(b) * kBlockRows + warp * 16;
  if (row0 >= p.N) return;  // a tile of padding rows only (no block-wide barrier below)
  const int64_t tile = static_cast<int64_t>(unit) * kWarps + warp;

  uint32_t w[2 * BITS];
  load_lane_words<BITS>(p.wq + tile * (256 * BITS), lane, w);
  // Scale slot word pairs of rows g, g+8, loaded where a slot starts.
  const uint2* slots = reinterpret_cast<const uint2*>(p.sz) + tile * (p.slots * 8) + g;
  const int steps_per_slot_mask = (1 << p.slot_log2) - 1;
  uint2 sv[kSteps];
#pragma unroll
  for (int kt = 0; kt < kSteps; ++kt)
    sv[kt] = (kt & steps_per_slot_mask) == 0 ? slots[(kt >> p.slot_log2) * 8] : make_uint2(0, 0);

  unsigned char* stage = stage_all + warp * kStageBytes;
  const int64_t col0 = static_cast<int64_t>(c) * kChunk;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    // A-fragment registers r = rh and rh + 2 hold row g + 8*rh, columns
    // 16kt + 8*(r/2) + 2t + {0, 1} (PTX m16n8k16 A layout).
    uint32_t s_lo = 0, s_hi = 0, z_lo = 0, z_hi = 0;
#pragma unroll
    for (int kt = 0; kt < kSteps; ++kt) {
      if (kt == 0 || (kt & steps_per_slot_mask) == 0) split_rows(sv[kt], s_lo, s_hi, z_lo, z_hi);
#pragma unroll
      for (int ch = 0; ch < 2; ++ch) {
        const uint32_t v = exact_operand<BITS, T>(w, kt, 2 * ch + rh, rh ? s_hi : s_lo,
                                                  rh ? z_hi : z_lo);
        *reinterpret_cast<uint32_t*>(stage + g * kStageRowBytes + 4 * (8 * kt + 4 * ch + t)) = v;
      }
    }
    __syncwarp();
    const int64_t row_base = row0 + 8 * rh;
    if constexpr (VEC) {
      // 8 rows x 16 pieces of 8 halves: lanes 0-15 one row, 16-31 the next.
#pragma unroll
      for (int it = 0; it < 4; ++it) {
        const int i = 2 * it + (lane >> 4), j = lane & 15;
        const int64_t row = row_base + i, col = col0 + 8 * j;
        if (row < p.N && col < p.K) {  // K % 8 == 0: a piece is all in or all out
          const uint4 v = *reinterpret_cast<const uint4*>(stage + i * kStageRowBytes + 16 * j);
          *reinterpret_cast<uint4*>(p.out + row * p.K + col) = v;
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t row = row_base + i;
        if (row >= p.N) break;
        uint16_t* out_row = p.out + row * p.K + col0;
#pragma unroll
        for (int q = 0; q < kChunk / 32; ++q) {
          const int j = 32 * q + lane;
          if (col0 + j < p.K)
            out_row[j] = *reinterpret_cast<const uint16_t*>(stage + i * kStageRowBytes + 2 * j);
        }
      }
    }
    __syncwarp();  // the half tile is read before the next one overwrites it
  }
}

template <int BITS, class T>
cudaError_t launch(const Params& p, bool vec, unsigned blocks, cudaStream_t stream) {
  if (vec)
    weight_only_dequant_kernel<BITS, T, true><<<blocks, kThreads, 0, stream>>>(p);
  else
    weight_only_dequant_kernel<BITS, T, false><<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The explicit list of instantiations: bits {2, 3, 4} x {fp16, bf16} (x both
// store paths).
template <class T>
cudaError_t dispatch_bits(const Params& p, int bits, bool vec, unsigned blocks, cudaStream_t s) {
  switch (bits) {
    case 2: return launch<2, T>(p, vec, blocks, s);
    case 3: return launch<3, T>(p, vec, blocks, s);
    default: return launch<4, T>(p, vec, blocks, s);
  }
}

}  // namespace

extern "C" int vlmkern_weight_only_dequant(const int32_t* wq, const int32_t* sz, int64_t NB,
                                           int64_t C, int slot_log2, int bits, void* out,
                                           int64_t N, int64_t K, int act_dtype, void* stream) {
  constexpr int64_t kMaxInt = 0x7fffffff;
  const auto aligned = [](const void* ptr, uintptr_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; };
  if (bits < 2 || bits > 4) return VLMKERN_WO_ERR_BAD_BITS;
  if (act_dtype != VLMKERN_DTYPE_F16 && act_dtype != VLMKERN_DTYPE_BF16) return VLMKERN_WO_ERR_BAD_DTYPE;
  // NB and C bounded first so that the products below cannot overflow; one
  // thread block per unit, numbered in an int.
  if (NB < 1 || C < 1 || NB > kMaxInt || C > kMaxInt || NB * C > kMaxInt ||
      N <= (NB - 1) * kBlockRows || N > NB * kBlockRows || K <= (C - 1) * kChunk ||
      K > C * kChunk || slot_log2 < 0 || slot_log2 > 3)
    return VLMKERN_WO_ERR_BAD_SIZE;
  if (!wq || !sz || !out) return VLMKERN_WO_ERR_NULL_POINTER;
  if (!aligned(wq, 16) || !aligned(sz, 16) || !aligned(out, 2)) return VLMKERN_WO_ERR_ALIGNMENT;

  Params p;
  p.wq = reinterpret_cast<const unsigned char*>(wq);
  p.sz = reinterpret_cast<const unsigned char*>(sz);
  p.out = static_cast<uint16_t*>(out);
  p.N = N;
  p.K = K;
  p.C = static_cast<int>(C);
  p.slot_log2 = slot_log2;
  p.slots = 8 >> slot_log2;
  const bool vec = K % 8 == 0 && aligned(out, 16);
  const unsigned blocks = static_cast<unsigned>(NB * C);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = act_dtype == VLMKERN_DTYPE_F16 ? dispatch_bits<F16>(p, bits, vec, blocks, s)
                                                         : dispatch_bits<BF16>(p, bits, vec, blocks, s);
  return err == cudaSuccess ? VLMKERN_WO_OK : launch_failed(err);
}
