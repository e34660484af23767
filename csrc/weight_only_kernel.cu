// Tensor-core weight-only matmul for decode and small batches (M = 1..64):
// y[M, N] = x[M, K] @ W[N, K]^T + bias, W in 2, 3 or 4 bits per weight.
//
// Shape of the computation. The weight is the MMA's A operand (16 rows of N
// by 16 of K) and the activations the B operand (16 of K by 8 tokens), so a
// token pads only to 8, not 16. A thread block owns 128 output rows (one
// 16-row tile per warp, 8 warps) and walks K in chunks of 128 columns; each
// (block, chunk) pair is a unit of work. The NB*C units are split evenly and
// in order over the grid (stream-K): a thread block may finish one row block
// and start the next, and a row block whose K range is shared by several
// thread blocks is summed by whichever of them finishes last, reading the
// partial sums in a fixed order, so the output is deterministic.
//
// Weight decode. The load-time layout (weight_only.h, cuda_weight_only.py)
// gives each lane its A-fragment codes of a 16x128 tile in 2*bits whole words
// (16- and 8-byte shared-memory loads). A code is moved into the mantissa of a
// 16-bit float next to the exponent of a "magic" number (1024 for fp16, 128
// for bf16) with one AND-OR, so magic + q needs no int-to-float instruction;
// one fma subtracts magic + zero (precomputed per group at load time) and one
// fma multiplies by the scale. Both are exact or correctly rounded, so a
// dequantized weight equals round(s * (q - z)) when s is in the activation type.
//
// Pipeline: every stage holds one unit's weights, scales and activation tile,
// filled by cp.async; STAGES - 1 units are in flight while one is computed.
// Activation B fragments come from shared memory by ldmatrix (two k16 steps of
// 8 tokens per instruction); the row block and chunk of a unit are tracked
// incrementally, so the loop has no integer division.
//
// Two more decodes run on the same pipeline, split and epilogue: the table
// decode of binarized weights in the lookup-table layout of binary.h
// (kTableDecode) and the integer decode of int8 weights against int8
// activation codes (kInt8Decode); see their sections below.

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "binary_lut_decode.cuh"
#include "mma_int8.cuh"
#include "weight_only.h"
#include "weight_only_common.cuh"

namespace {

using namespace vlmkern_wo;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockRows = kWarps * 16;          // output rows per unit
constexpr int kChunk = 128;                      // input columns per unit
constexpr int kTiles = kChunk / 16;              // k16 MMA steps per unit
constexpr int kXRowHalves = kChunk + 8;          // padded so B loads hit 32 banks
constexpr int kXRowBytes = kXRowHalves * 2;
constexpr int kSlotBytes = 8 * 8;                // one scale slot of a tile: 8 x uint2
// The table decode of binary weights (POST_SLOT_LOG2 == kTableDecode): codes
// are laid out as 2-bit codes, the tables of a tile fill 4 scale slots, and
// each stage also holds its chunk's merge selectors, after the activations.
constexpr int kTableDecode = -2;
constexpr int kTableSlots = 4;                   // 256 table bytes per tile
constexpr int kMergeBytes = 32 * 8 * 4;          // one chunk: [32 lanes][8 steps] int32
// The integer-activation decode (POST_SLOT_LOG2 == kInt8Decode): int8 weights
// and int8 activation codes on the same pipeline, each 16-bit column of the
// activation tile holding two int8 codes, so a unit covers 256 codes of K and
// a k16 step of the tile is one k32 step of the int8 MMA. Weights take
// 16 bits' worth of layout (BITS = 16): a tile's 16 x 256 codes in A-fragment
// order, [8 steps][32 lanes][16 bytes]. Scale slots hold fp32 scales.
constexpr int kInt8Decode = -3;
constexpr int kInt8Stages = 3;                   // 32 KB of weights per stage

struct Params {
  const uint16_t* x;        // [M, ldx]
  const unsigned char* wq;  // [NB, C, 8, 64*bits] int32
  const unsigned char* sz;  // [NB, C, 8, slots, 8, 2] int32
  const void* bias;         // [N] or null
  uint16_t* out;            // [M, N]
  float* ws;                // [2 * num_ctas, M, 128]
  int32_t* counters;        // [NB]
  int64_t units;            // NB * C
  int M, ldx, N, C;
  int slot_log2, slots, bias_dtype;
  const unsigned char* merge;  // [C, 32, 8] int32: the table decode's selectors
  const float* sx;             // [M] token scales of the integer-activation decode
};

// Stream-K partition, shared by every thread block: block c owns units
// [first_unit(c), first_unit(c + 1)); unit u belongs to block owner(u).
__device__ __forceinline__ int64_t first_unit(int64_t cta, int64_t units, int64_t ctas) {
  return cta * units / ctas;
}
__device__ __forceinline__ int64_t owner(int64_t u, int64_t units, int64_t ctas) {
  return ((u + 1) * ctas - 1) / units;
}
// Workspace slot of thread block c's partial sum for row block b: 2c for the
// row block it starts in, 2c + 1 for the one it ends in (a middle row block is
// always whole, so it never needs a slot).
__device__ __forceinline__ int64_t partial_slot(int64_t cta, int64_t b, int64_t units,
                                                int64_t ctas, int64_t C) {
  return 2 * cta + (first_unit(cta, units, ctas) / C == b ? 0 : 1);
}

template <int BITS, int M_TILES>
struct StageLayout {
  static constexpr int kWeightBytes = kWarps * 256 * BITS;
  static constexpr int kXRows = M_TILES * 8;
  static constexpr int kXBytes = kXRows * kXRowBytes;
  __host__ __device__ static constexpr int bytes(int slots) {
    return kWeightBytes + kWarps * slots * kSlotBytes + kXBytes;
  }
};

// Bytes of one pipeline stage, for the kernel's offsets and the launch's
// shared-memory size alike: the post-scale decode's slots are a compile-time
// count, the table decode adds its chunk's merge selectors after the activations.
template <int BITS, int M_TILES, int POST_SLOT_LOG2>
__host__ __device__ constexpr int stage_bytes_of(int slots) {
  using L = StageLayout<BITS, M_TILES>;
  return POST_SLOT_LOG2 >= 0             ? L::bytes(8 >> POST_SLOT_LOG2)
         : POST_SLOT_LOG2 == kTableDecode ? L::bytes(kTableSlots) + kMergeBytes
                                          : L::bytes(slots);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Enqueue the copies of unit u (row block b, chunk c) into stage buffer
// `stage` (shared address). Trip counts are compile-time where the sizes are.
template <int BITS, int M_TILES>
__device__ __forceinline__ void load_unit(const Params& p, uint32_t stage, int64_t u, int c) {
  using L = StageLayout<BITS, M_TILES>;
  const int tid = threadIdx.x;
  constexpr int kWeightPieces = L::kWeightBytes / 16;
  const unsigned char* wsrc = p.wq + u * L::kWeightBytes;  // units are contiguous, in order
#pragma unroll
  for (int r = 0; r < (kWeightPieces + kThreads - 1) / kThreads; ++r) {
    const int i = tid + r * kThreads;
    if (kWeightPieces % kThreads == 0 || i < kWeightPieces) cp_async16(stage + 16 * i, wsrc + 16 * i, 16);
  }
  const int sz_pieces = kWarps * p.slots * kSlotBytes / 16;  // <= 256
  const uint32_t sdst = stage + L::kWeightBytes;
  if (tid < sz_pieces) cp_async16(sdst + 16 * tid, p.sz + u * (16 * sz_pieces) + 16 * tid, 16);
  // Activation rows < M, 16 pieces of 8 halves each; columns >= ldx are
  // zero-filled. Rows >= M were zeroed once at the start and are never written.
  const uint32_t xdst = sdst + 16 * sz_pieces;
#pragma unroll
  for (int r = 0; r < (L::kXRows * 16 + kThreads - 1) / kThreads; ++r) {
    const int i = tid + r * kThreads;
    const int row = i >> 4;
    const int col = c * kChunk + (i & 15) * 8;
    if ((L::kXRows * 16 % kThreads == 0 || i < L::kXRows * 16) && row < p.M) {
      const bool in_k = col < p.ldx;
      cp_async16(xdst + row * kXRowBytes + (i & 15) * 16,
                 in_k ? p.x + static_cast<int64_t>(row) * p.ldx + col : p.x, in_k ? 16 : 0);
    }
  }
}

// The copies of successive units for the post-scale kernel, with each
// thread's global addresses kept as running pointers: a unit costs a few
// additions instead of load_unit's 64-bit products. Same pieces, same places.
template <int BITS, int M_TILES, int SLOTS>
struct UnitStream {
  using L = StageLayout<BITS, M_TILES>;
  static constexpr int kWeightPieces = L::kWeightBytes / 16;
  static constexpr int kScaleBytes = kWarps * SLOTS * kSlotBytes;  // per unit
  static constexpr int kScalePieces = kScaleBytes / 16;
  // Activation pieces (16 per token row) per thread: 1 up to 16 tokens, 2 up
  // to 32; piece tid + i * kThreads is row (tid >> 4) + 16 * i, same column.
  static constexpr int kXPieces = L::kXRows * 16;
  static constexpr int kXPerThread = (kXPieces + kThreads - 1) / kThreads;
  static_assert(kXPerThread == 1 || kXPieces % kThreads == 0, "whole activation rows per pass");

  const unsigned char* w;   // this thread's first weight piece of the next unit
  const unsigned char* sz;  // its scale piece of the next unit
  const uint16_t* x_row[kXPerThread];  // its activation rows
  int col;                  // its first activation column in the next unit
  int col_wrap;             // C * kChunk: the next row block starts at column 0
  int ldx;
  uint32_t dst;             // its weight piece's offset in a stage
  uint32_t x_dst[kXPerThread];         // its activation pieces' offsets in a stage
  uint32_t copies_scale, copies_x[kXPerThread];  // 0 or 1

  __device__ __forceinline__ UnitStream(const Params& p, int64_t u, int c) {
    const int tid = threadIdx.x;
    w = p.wq + u * L::kWeightBytes + 16 * tid;
    sz = p.sz + u * kScaleBytes + 16 * tid;
    copies_scale = opaque(tid < kScalePieces);
#pragma unroll
    for (int i = 0; i < kXPerThread; ++i) {
      const int row = (tid >> 4) + 16 * i;
      copies_x[i] = opaque(tid + i * kThreads < kXPieces && row < p.M);  // rows >= M stay zero
      x_row[i] = p.x + static_cast<int64_t>(copies_x[i] ? row : 0) * p.ldx;
      x_dst[i] = opaque(L::kWeightBytes + kScaleBytes + row * kXRowBytes + (tid & 15) * 16);
    }
    col = c * kChunk + (tid & 15) * 8;
    col_wrap = opaque(p.C * kChunk);
    ldx = p.ldx;
    dst = opaque(16 * tid);
  }

  // Enqueue the next unit's copies into the stage at shared address `stage`.
  __device__ __forceinline__ void load(uint32_t stage) const {
    cp_async16_if(copies_scale, stage + dst + L::kWeightBytes, sz, 16);
    copy_pieces<kWeightPieces, kThreads>(stage + dst, w, dst);
    // columns >= ldx are zero-filled
    const bool in_k = col < ldx;
#pragma unroll
    for (int i = 0; i < kXPerThread; ++i)
      cp_async16_if(copies_x[i], stage + x_dst[i], in_k ? x_row[i] + col : x_row[i], in_k ? 16 : 0);
  }

  __device__ __forceinline__ void advance() {
    w += L::kWeightBytes;
    sz += kScaleBytes;
    col += kChunk;
    if (col >= col_wrap) col -= col_wrap;
  }
};

// Shared-memory address of this lane's first ldmatrix row in the activation
// tile of a stage (after the weights and `slots` scale slots per warp).
template <int BITS, int M_TILES>
__device__ __forceinline__ uint32_t x_fragment_base(uint32_t stage_addr, int slots, int lane) {
  return stage_addr + StageLayout<BITS, M_TILES>::kWeightBytes + kWarps * slots * kSlotBytes +
         ((lane & 7) * kXRowHalves + 8 * (lane >> 3)) * 2;
}

// B fragments of k16 steps 2kp and 2kp+1 for every 8-token tile.
template <int M_TILES>
__device__ __forceinline__ void load_x_fragments(uint32_t (&bfrag)[M_TILES][4], uint32_t xs,
                                                 int kp) {
#pragma unroll
  for (int j = 0; j < M_TILES; ++j) ldmatrix_x4(bfrag[j], xs + (8 * j * kXRowHalves + 32 * kp) * 2);
}

// acc += W-tile(warp) x X-tile over the 128 columns held in `stage`
// (generic pointer `stage`, shared address `stage_addr`).
template <int BITS, int M_TILES, class T>
__device__ __forceinline__ void compute_unit(const Params& p, const unsigned char* stage,
                                             uint32_t stage_addr, float (&acc)[M_TILES][4]) {
  using L = StageLayout<BITS, M_TILES>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2;

  uint32_t w[2 * BITS];
  load_lane_words<BITS>(stage + warp * 256 * BITS, lane, w);
  const uint2* slots = reinterpret_cast<const uint2*>(stage + L::kWeightBytes) + warp * p.slots * 8;
  // ldmatrix: lane l addresses row l % 8 of 8x8 matrix l / 8; matrices 0..3 are
  // columns 0-7, 8-15 of step kt and 0-7, 8-15 of step kt+1, which gives the
  // B fragments (b0, b1) of two k16 steps for 8 tokens in one instruction.
  const uint32_t xs = x_fragment_base<BITS, M_TILES>(stage_addr, p.slots, lane);
  const int steps_per_slot_mask = (1 << p.slot_log2) - 1;
  uint32_t s_lo = 0, s_hi = 0, z_lo = 0, z_hi = 0;
#pragma unroll
  for (int kp = 0; kp < kTiles / 2; ++kp) {
    uint32_t bfrag[M_TILES][4];
    load_x_fragments(bfrag, xs, kp);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kt = 2 * kp + h;
      if (kt == 0 || (kt & steps_per_slot_mask) == 0) {
        // Scales and -(magic + zero) of rows g and g+8, each in both halves.
        split_rows(slots[(kt >> p.slot_log2) * 8 + g], s_lo, s_hi, z_lo, z_hi);
      }
      uint32_t a[4];
      // Registers 0 and 2 hold row g, 1 and 3 row g+8 (PTX m16n8k16 A layout).
#pragma unroll
      for (int r = 0; r < 4; ++r)
        a[r] = exact_operand<BITS, T>(w, kt, r, (r & 1) ? s_hi : s_lo, (r & 1) ? z_hi : z_lo);
#pragma unroll
      for (int j = 0; j < M_TILES; ++j) T::mma(acc[j], a, bfrag[j][2 * h], bfrag[j][2 * h + 1]);
    }
  }
}

// -- post-scale decode: A = q - z exactly, scales applied to fp32 sums ------------
// The A operand is the integer q - z (exact in 16 bits), the k16 products are
// summed in fp32 per scale slot, and each slot's sum is multiplied by the row's
// scale once: one fma per pair of weights instead of two, and no rounding of
// s * (q - z) to 16 bits.
//
// A code field of a lane word is used where it lies when it fits in the
// mantissa of the magic number: OR-ing it in gives magic + c*q with c = 2^e,
// and one fma with 1/c and -(magic/c + z) gives q - z exactly (every term is a
// small integer or a power of two times one). A field that does not fit is
// shifted down by 8 (a shift its word's other upper fields share) or to bit 0.
__host__ __device__ constexpr int low_pos(int bits, int kt, int r) {
  return bits == 4 ? 4 * r : 2 * (4 * (kt % 2) + r);
}
__host__ __device__ constexpr int low_shift(int bits, int mantissa, int kt, int r) {
  return low_pos(bits, kt, r) + bits <= mantissa ? 0
         : low_pos(bits, kt, r) >= 8 && low_pos(bits, kt, r) - 8 + bits <= mantissa ? 8
         : low_pos(bits, kt, r);
}

// 1 - 2^-e in both halves (e >= 1), exactly.
template <class T>
__host__ __device__ constexpr uint32_t one_minus_pow2_2(int e) {
  return 0x10001u * (static_cast<uint32_t>(T::pow2_2(-1) & 0xFFFFu) |
                     ((1u << T::kMantissa) - (1u << (T::kMantissa + 1 - e))));
}

static_assert(F16::pow2_2(-4) == 0x2C002C00u && BF16::pow2_2(-4) == 0x3D803D80u, "2^-4");
static_assert(one_minus_pow2_2<F16>(2) == 0x3A003A00u && one_minus_pow2_2<BF16>(2) == 0x3F403F40u,
              "0.75");

// A-fragment register r of step kt as q - z. zmc[i] holds -(magic/4^i + z) of
// rows g (low half) and g+8 (high half).
template <int BITS, class T>
__device__ __forceinline__ uint32_t q_minus_z(const uint32_t (&w)[2 * BITS], int kt, int r,
                                              const uint32_t (&zmc)[5]) {
  const int shift = low_shift(BITS, T::kMantissa, kt, r);
  const int e = low_pos(BITS, kt, r) - shift;       // c = 2^e, e in {0, 2, 4, 6, 8}
  const uint32_t low_mask = (BITS == 4 ? 0x000F000Fu : 0x00030003u) << e;
  uint32_t v = and_or(w[BITS == 4 ? kt : kt / 2] >> shift, low_mask, T::kMagic2);
  if constexpr (BITS == 3) {
    // third bit: pair p = 4*(kt%4) + r of the 1-bit plane, moved next to the low field
    const int ph = 4 * (kt % 4) + r, to = e + 2;
    const uint32_t hi = w[4 + kt / 4];
    v = and_or(ph >= to ? hi >> (ph - to) : hi << (to - ph), 0x00010001u << to, v);
  }
  return T::fma_bcast(v, T::pow2_2(-e), zmc[e / 2], r & 1);
}

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// This lane's shared-memory offsets within a stage, computed once per kernel.
template <int BITS, int M_TILES, int SLOTS>
struct LaneOffsets {
  uint32_t words;     // its first 16 code bytes
  uint32_t words_hi;  // its remaining code bytes (bits 3 and 4)
  uint32_t slot;      // its rows' scale slot 0
  uint32_t x;         // its first ldmatrix row
  __device__ __forceinline__ LaneOffsets() {
    using L = StageLayout<BITS, M_TILES>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    words = opaque(warp * 256 * BITS + 16 * lane);
    words_hi = opaque(warp * 256 * BITS + 512 + (BITS == 3 ? 8 : 16) * lane);
    slot = opaque(L::kWeightBytes + (warp * SLOTS * 8 + (lane >> 2)) * 8);
    x = opaque(x_fragment_base<BITS, M_TILES>(0, SLOTS, lane));
  }
};

template <int BITS, int M_TILES, class T, int SLOT_LOG2>
__device__ __forceinline__ void compute_unit_post_scale(uint32_t stage,
                                                        const LaneOffsets<BITS, M_TILES, (8 >> SLOT_LOG2)>& at,
                                                        float (&acc)[M_TILES][4]) {
  constexpr int kStepsPerSlot = 1 << SLOT_LOG2;
  uint32_t w[2 * BITS];
  const uint4 lo = lds128(stage + at.words);
  w[0] = lo.x; w[1] = lo.y; w[2] = lo.z; w[3] = lo.w;
  if constexpr (BITS == 4) {
    const uint4 hi = lds128(stage + at.words_hi);
    w[4] = hi.x; w[5] = hi.y; w[6] = hi.z; w[7] = hi.w;
  } else if constexpr (BITS == 3) {
    const uint2 hi = lds64(stage + at.words_hi);
    w[4] = hi.x; w[5] = hi.y;
  }
  const uint32_t xs = stage + at.x;
  uint32_t zmc[5];
  float s_lo = 0.f, s_hi = 0.f;
  float sum[M_TILES][4];
#pragma unroll
  for (int kp = 0; kp < kTiles / 2; ++kp) {
    uint32_t bfrag[M_TILES][4];
    load_x_fragments(bfrag, xs, kp);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kt = 2 * kp + h;
      if (kt % kStepsPerSlot == 0) {
        const uint2 sv = lds64(stage + at.slot + (kt / kStepsPerSlot) * 64);
        s_lo = T::to_float(sv.x);
        s_hi = T::to_float(sv.x >> 16);
        zmc[0] = sv.y;   // -(magic + z); the others are exact: magic*(1 - 4^-i) - (magic + z)
#pragma unroll
        for (int i = 1; i < 5; ++i) T::fma2(zmc[i], T::kMagic2, one_minus_pow2_2<T>(2 * i), sv.y);
#pragma unroll
        for (int j = 0; j < M_TILES; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) sum[j][e] = 0.f;
      }
      uint32_t a[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = q_minus_z<BITS, T>(w, kt, r, zmc);
#pragma unroll
      for (int j = 0; j < M_TILES; ++j) T::mma(sum[j], a, bfrag[j][2 * h], bfrag[j][2 * h + 1]);
      if (kt % kStepsPerSlot == kStepsPerSlot - 1) {
        // C rows: elements 0, 1 are row g, elements 2, 3 row g+8
#pragma unroll
        for (int j = 0; j < M_TILES; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][e] = fmaf(e < 2 ? s_lo : s_hi, sum[j][e], acc[j][e]);
      }
    }
  }
}

// -- table decode: binary weights in the lookup-table layout ------------------------
// The stage holds the unit's codes where 2-bit codes go, its tables in the
// scale slots and its chunk's merge selectors after the activations; the
// operands are built as in binary_lut_kernel.cu, the B fragments come by
// ldmatrix like every other decode here. The weights are the table values
// themselves, so nothing is applied after the MMAs. Copies and lane offsets
// are kept as running pointers and registers, as in the post-scale kernel.
template <int M_TILES>
struct TableStream {
  UnitStream<2, M_TILES, kTableSlots> units;  // codes, tables and activations
  const unsigned char* merge;       // this thread's merge piece of the next unit's chunk
  const unsigned char* merge_first; // ... of chunk 0
  int c, C;
  uint32_t merge_dst, copies_merge;

  __device__ __forceinline__ TableStream(const Params& p, int64_t u, int c0) : units(p, u, c0) {
    const int piece = threadIdx.x % (kMergeBytes / 16);
    copies_merge = opaque(threadIdx.x < kMergeBytes / 16);
    merge_first = p.merge + 16 * piece;
    merge = merge_first + static_cast<int64_t>(c0) * kMergeBytes;
    c = c0;
    C = p.C;
    merge_dst = opaque(StageLayout<2, M_TILES>::bytes(kTableSlots) + 16 * piece);
  }
  __device__ __forceinline__ void load(uint32_t stage) const {
    units.load(stage);
    cp_async16_if(copies_merge, stage + merge_dst, merge, 16);
  }
  __device__ __forceinline__ void advance() {
    units.advance();
    merge += kMergeBytes;
    if (++c == C) {
      c = 0;
      merge = merge_first;
    }
  }
};

// This lane's shared-memory offsets within a stage of the table decode.
template <int M_TILES>
struct TableLane {
  uint32_t codes, tables, merge, x;
  __device__ __forceinline__ TableLane() {
    using L = StageLayout<2, M_TILES>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    codes = opaque(warp * 512 + 16 * lane);
    tables = opaque(L::kWeightBytes + warp * 256 + 32 * (lane >> 2));  // rows g, g + 8
    merge = opaque(L::bytes(kTableSlots) + 32 * lane);
    x = opaque(x_fragment_base<2, M_TILES>(0, kTableSlots, lane));
  }
};

template <int M_TILES, class T>
__device__ __forceinline__ void compute_unit_table(uint32_t stage, const TableLane<M_TILES>& at,
                                                   float (&acc)[M_TILES][4]) {
  const uint4 codes = lds128(stage + at.codes);
  const uint4 t0 = lds128(stage + at.tables), t1 = lds128(stage + at.tables + 16);
  const uint4 m0 = lds128(stage + at.merge), m1 = lds128(stage + at.merge + 16);
  const uint32_t xs = stage + at.x;
#pragma unroll
  for (int kp = 0; kp < kTiles / 2; ++kp) {
    uint32_t bfrag[M_TILES][4];
    load_x_fragments(bfrag, xs, kp);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a[4];
      vlmkern_lut::lut_operands(codes, t0, t1, m0, m1, 2 * kp + h, a);
#pragma unroll
      for (int j = 0; j < M_TILES; ++j) T::mma(acc[j], a, bfrag[j][2 * h], bfrag[j][2 * h + 1]);
    }
  }
}

// -- integer-activation decode --------------------------------------------------------
using vlmkern_mma::mma_s8;

// acc += sum over the unit's scale slots of scale(row) * (exact int32 sum of
// the slot's int8 products), for this warp's 16 rows and every token tile.
// Slot s covers k32 steps [s << slot_log2, (s + 1) << slot_log2) of the unit;
// its two fp32 scales (rows g, g + 8) are one uint2 of the scale slots.
template <int M_TILES>
__device__ __forceinline__ void compute_unit_int8(const Params& p, const unsigned char* stage,
                                                  uint32_t stage_addr, float (&acc)[M_TILES][4]) {
  using L = StageLayout<16, M_TILES>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned char* weights = stage + warp * 4096 + 16 * lane;
  const uint2* slots = reinterpret_cast<const uint2*>(stage + L::kWeightBytes) + warp * p.slots * 8 +
                       (lane >> 2);
  const uint32_t xs = x_fragment_base<16, M_TILES>(stage_addr, p.slots, lane);
  const int steps_per_slot_mask = (1 << p.slot_log2) - 1;
  int32_t sum[M_TILES][4];
#pragma unroll
  for (int kp = 0; kp < kTiles / 2; ++kp) {
    uint32_t bfrag[M_TILES][4];
    load_x_fragments(bfrag, xs, kp);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kt = 2 * kp + h;
      if ((kt & steps_per_slot_mask) == 0) {
#pragma unroll
        for (int j = 0; j < M_TILES; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) sum[j][e] = 0;
      }
      const uint4 w = *reinterpret_cast<const uint4*>(weights + kt * 512);
      const uint32_t a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < M_TILES; ++j) mma_s8(sum[j], a, bfrag[j][2 * h], bfrag[j][2 * h + 1]);
      if ((kt & steps_per_slot_mask) == steps_per_slot_mask) {
        const uint2 sv = slots[(kt >> p.slot_log2) * 8];
        const float s_lo = __uint_as_float(sv.x), s_hi = __uint_as_float(sv.y);
        // C rows: elements 0, 1 are row g, elements 2, 3 row g + 8
#pragma unroll
        for (int j = 0; j < M_TILES; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc[j][e] = __fmaf_rn(__int2float_rn(sum[j][e]), e < 2 ? s_lo : s_hi, acc[j][e]);
      }
    }
  }
}

// Output element (j, e) of this lane: token 8j + 2t + (e & 1), row g + 8*(e >> 1)
// of the warp's tile (PTX m16n8k16 C layout).
// TOKEN_SCALE (the integer-activation decode): v * sx[m] + bias in one fma.
template <int M_TILES, class T, bool TOKEN_SCALE = false>
__device__ __forceinline__ void store_out(const Params& p, int64_t b, int j, int e, float v) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int m = 8 * j + 2 * (lane & 3) + (e & 1);
  const int64_t n = b * kBlockRows + warp * 16 + (lane >> 2) + 8 * (e >> 1);
  if (m >= p.M || n >= p.N) return;
  if constexpr (TOKEN_SCALE) {
    const float bias = p.bias ? load_bias(p.bias, p.bias_dtype, static_cast<int>(n)) : 0.f;
    v = __fmaf_rn(v, p.sx[m], bias);
  } else if (p.bias) {
    v += load_bias(p.bias, p.bias_dtype, static_cast<int>(n));
  }
  p.out[static_cast<int64_t>(m) * p.N + n] = T::from_float(v);
}

// End of this thread block's part of row block b: write it out, or park it in
// the workspace and, if it is the last part to arrive, sum all parts in order.
// FEW_DIVISIONS (the post-scale kernel): workspace slots without a 64-bit
// division per part. Every part but the first belongs to a thread block that
// starts inside row block b, so its slot is 2c (see partial_slot); this block's
// own slot follows from b_start, the row block it started in.
// ACQ_REL: the parts published by one acq_rel atomic (atomic_add_acq_rel)
// instead of a fence in every thread; the same sums in the same order.
template <int M_TILES, class T, bool FEW_DIVISIONS = false, bool TOKEN_SCALE = false,
          bool ACQ_REL = false>
__device__ void finish_rows(const Params& p, int64_t b, float (&acc)[M_TILES][4], int* is_last,
                            int64_t b_start = 0) {
  const int64_t ctas = gridDim.x, cta = blockIdx.x;
  const int64_t first = owner(b * p.C, p.units, ctas);
  const int parts = static_cast<int>(owner(b * p.C + p.C - 1, p.units, ctas) - first + 1);
  if (parts == 1) {
#pragma unroll
    for (int j = 0; j < M_TILES; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) store_out<M_TILES, T, TOKEN_SCALE>(p, b, j, e, acc[j][e]);
    return;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col0 = warp * 16 + (lane >> 2);
  const int64_t plane = static_cast<int64_t>(p.M) * kBlockRows;
  float* mine = p.ws + (FEW_DIVISIONS ? 2 * cta + (b_start == b ? 0 : 1)
                                      : partial_slot(cta, b, p.units, ctas, p.C)) * plane;
#pragma unroll
  for (int j = 0; j < M_TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * j + 2 * (lane & 3) + (e & 1);
      if (m < p.M) mine[m * kBlockRows + col0 + 8 * (e >> 1)] = acc[j][e];
    }
  if constexpr (ACQ_REL) {
    __syncthreads();
    if (threadIdx.x == 0) *is_last = atomic_add_acq_rel(&p.counters[b], 1) == parts - 1;
    __syncthreads();
    if (!*is_last) return;
  } else {
    __threadfence();  // partial sums visible device-wide before the count
    __syncthreads();
    if (threadIdx.x == 0) *is_last = atomicAdd(&p.counters[b], 1) == parts - 1;
    __syncthreads();
    if (!*is_last) return;
    __threadfence();  // the other parts' writes are ordered before our reads
  }
  const int64_t first_slot = FEW_DIVISIONS ? partial_slot(first, b, p.units, ctas, p.C) : 0;

  // Sum the parts in thread-block order (deterministic). Loads of several
  // parts are issued before they are added, 32 per thread in flight.
  constexpr int kAtOnce = 8 / M_TILES;
  float sum[M_TILES][4];
#pragma unroll
  for (int j = 0; j < M_TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) sum[j][e] = 0.f;
  for (int q0 = 0; q0 < parts; q0 += kAtOnce) {
    float v[kAtOnce][M_TILES][4];
#pragma unroll
    for (int q = 0; q < kAtOnce; ++q) {
      const float* part = q0 + q < parts
          ? p.ws + (!FEW_DIVISIONS ? partial_slot(first + q0 + q, b, p.units, ctas, p.C)
                    : q0 + q == 0 ? first_slot : 2 * (first + q0 + q)) * plane
          : nullptr;
#pragma unroll
      for (int j = 0; j < M_TILES; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = 8 * j + 2 * (lane & 3) + (e & 1);
          v[q][j][e] = part && m < p.M ? __ldcg(part + m * kBlockRows + col0 + 8 * (e >> 1)) : 0.f;
        }
    }
#pragma unroll
    for (int q = 0; q < kAtOnce; ++q)
      if (q0 + q < parts)
#pragma unroll
        for (int j = 0; j < M_TILES; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) sum[j][e] += v[q][j][e];
  }
#pragma unroll
  for (int j = 0; j < M_TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) store_out<M_TILES, T, TOKEN_SCALE>(p, b, j, e, sum[j][e]);
  if (threadIdx.x == 0) p.counters[b] = 0;  // ready for the next launch
}

// Pick<c, A, B>::type is A if c else B.
template <bool C, class A, class B> struct Pick { using type = A; };
template <class A, class B> struct Pick<false, A, B> { using type = B; };
struct Unused {
  __device__ Unused() {}
  __device__ Unused(const Params&, int64_t, int) {}
};

// POST_SLOT_LOG2 -1: the exact decode with slots read from p.slot_log2;
// 0..3: the post-scale decode for that (compile-time) slot width;
// kTableDecode: binary weights in the lookup-table layout (BITS = 2).
// ACQ_REL: finish_rows' acq_rel publish (the post-scale decode only).
// MIN_BLOCKS: thread blocks per SM the registers are budgeted for.
template <int BITS, int M_TILES, class T, int STAGES, int POST_SLOT_LOG2, bool ACQ_REL = false,
          int MIN_BLOCKS = 2>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) weight_only_mma_kernel(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int is_last;
  using L = StageLayout<BITS, M_TILES>;
  // The post-scale kernel's slot count is a compile-time constant, and it
  // keeps the shared base in a register (the compiler would recompute it).
  constexpr bool kPost = POST_SLOT_LOG2 >= 0;
  constexpr bool kTable = POST_SLOT_LOG2 == kTableDecode;
  constexpr bool kInt8 = POST_SLOT_LOG2 == kInt8Decode;
  static_assert(!kTable || BITS == 2, "the table decode reads codes laid out as 2-bit ones");
  static_assert(!kInt8 || BITS == 16, "the integer decode reads 16 bits of layout per weight");
  constexpr int kPostSlots = kPost ? 8 >> POST_SLOT_LOG2 : 1;
  const int stage_bytes = stage_bytes_of<BITS, M_TILES, POST_SLOT_LOG2>(p.slots);
  const uint32_t smem_base = kPost || kTable
                                 ? opaque(static_cast<uint32_t>(__cvta_generic_to_shared(smem)))
                                 : static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  // Token rows >= M of every stage's activation tile stay zero (the copies
  // never touch them); the first barrier in the loop publishes these stores.
  const int x_offset = (kTable ? stage_bytes - kMergeBytes : stage_bytes) - L::kXBytes;
  for (int i = threadIdx.x; i < STAGES * L::kXRows * (kXRowBytes / 16); i += kThreads) {
    const int stage = i / (L::kXRows * (kXRowBytes / 16));
    const int rest = i - stage * (L::kXRows * (kXRowBytes / 16));
    const int row = rest / (kXRowBytes / 16);
    if (row >= p.M)
      *reinterpret_cast<uint4*>(smem + stage * stage_bytes + x_offset + rest * 16) = make_uint4(0, 0, 0, 0);
  }

  const int64_t u_begin = first_unit(blockIdx.x, p.units, gridDim.x);
  const int n_units = static_cast<int>(first_unit(blockIdx.x + 1, p.units, gridDim.x) - u_begin);
  // Row block and chunk of the unit being computed, and chunk of the next unit
  // to load, advanced one unit at a time (no division in the loop).
  int64_t b = u_begin / p.C;
  const int64_t b_start = b;
  int c = static_cast<int>(u_begin - b * p.C);
  int load_c = c;
  // The post-scale and table kernels' loaders and lane offsets (unused by the exact decode).
  using Stream = typename Pick<kPost, UnitStream<BITS, M_TILES, kPostSlots>,
                               typename Pick<kTable, TableStream<M_TILES>, Unused>::type>::type;
  using Lane = typename Pick<kPost, LaneOffsets<BITS, M_TILES, kPostSlots>,
                             typename Pick<kTable, TableLane<M_TILES>, Unused>::type>::type;
  Stream stream(p, u_begin, c);
  const Lane lane_at;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_units) {
      if constexpr (kPost || kTable) {
        stream.load(smem_base + s * stage_bytes);
        stream.advance();
      } else {
        load_unit<BITS, M_TILES>(p, smem_base + s * stage_bytes, u_begin + s, load_c);
        if (++load_c == p.C) load_c = 0;
      }
    }
    cp_async_commit();  // empty groups keep the group count uniform
  }

  float acc[M_TILES][4];
#pragma unroll
  for (int j = 0; j < M_TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

  int stage = 0;            // i % STAGES
  int next_stage = STAGES - 1;  // (i + STAGES - 1) % STAGES
  for (int i = 0; i < n_units; ++i) {
    cp_async_wait<STAGES - 2>();  // unit i has landed (for this thread's copies)
    __syncthreads();              // ... and for everyone's; stage i-1 is free again
    if (i + STAGES - 1 < n_units) {
      if constexpr (kPost || kTable) {
        stream.load(smem_base + next_stage * stage_bytes);
        stream.advance();
      } else {
        load_unit<BITS, M_TILES>(p, smem_base + next_stage * stage_bytes, u_begin + i + STAGES - 1, load_c);
        if (++load_c == p.C) load_c = 0;
      }
    }
    cp_async_commit();
    if constexpr (kTable)
      compute_unit_table<M_TILES, T>(smem_base + stage * stage_bytes, lane_at, acc);
    else if constexpr (kInt8)
      compute_unit_int8<M_TILES>(p, smem + stage * stage_bytes, smem_base + stage * stage_bytes, acc);
    else if constexpr (POST_SLOT_LOG2 < 0)
      compute_unit<BITS, M_TILES, T>(p, smem + stage * stage_bytes, smem_base + stage * stage_bytes, acc);
    else
      compute_unit_post_scale<BITS, M_TILES, T, POST_SLOT_LOG2>(smem_base + stage * stage_bytes,
                                                                 lane_at, acc);
    if (++stage == STAGES) stage = 0;
    if (++next_stage == STAGES) next_stage = 0;

    if (c == p.C - 1 || i == n_units - 1) {
      if constexpr (kPost)
        finish_rows<M_TILES, T, true, false, ACQ_REL>(p, b, acc, &is_last, b_start);
      else if constexpr (kInt8)
        finish_rows<M_TILES, T, false, true>(p, b, acc, &is_last);
      else
        finish_rows<M_TILES, T>(p, b, acc, &is_last);
#pragma unroll
      for (int j = 0; j < M_TILES; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    }
    if (++c == p.C) { c = 0; ++b; }
  }
}

// Deep pipelines where the activation tile is small; fewer stages for wide
// token tiles keep a block within the 99 KB of sm_86/89, and three blocks of
// 16 tokens within Hopper's 228 KB per SM.
template <int M_TILES, int MIN_BLOCKS = 2>
constexpr int stages_for() {
  return MIN_BLOCKS == 3 && M_TILES == 2 ? 5 : M_TILES <= 2 ? 6 : M_TILES == 4 ? 4 : 3;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local char message[256];


template <int BITS, int M_TILES, class T, int POST_SLOT_LOG2, bool ACQ_REL = false,
          int MIN_BLOCKS = 2>
int launch(const Params& p, int64_t num_ctas, cudaStream_t stream) {
  constexpr int STAGES =
      POST_SLOT_LOG2 == kInt8Decode ? kInt8Stages : stages_for<M_TILES, MIN_BLOCKS>();
  auto kernel = weight_only_mma_kernel<BITS, M_TILES, T, STAGES, POST_SLOT_LOG2, ACQ_REL, MIN_BLOCKS>;
  const int smem = STAGES * stage_bytes_of<BITS, M_TILES, POST_SLOT_LOG2>(p.slots);
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return launch_failed(err);
  if (smem > limit) return VLMKERN_WO_ERR_SHARED_MEMORY;
  if (smem > 48 * 1024) {
    // The limit belongs to the kernel, not to this launch: it is set to what the
    // most scale slots need, so host threads launching it for different group
    // sizes never lower it beneath one another's launch.
    const int most = STAGES * stage_bytes_of<BITS, M_TILES, POST_SLOT_LOG2>(8);
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               most < limit ? most : limit);
    if (err != cudaSuccess) return launch_failed(err);
  }
  if constexpr (MIN_BLOCKS > 2) {
    // a hint: the largest shared-memory carveout, so that MIN_BLOCKS blocks fit
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return launch_failed(err);
  }
  kernel<<<static_cast<unsigned>(num_ctas), kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  return err == cudaSuccess ? VLMKERN_WO_OK : launch_failed(err);
}

// The explicit list of instantiations. Exact decode: bits {2, 3, 4} x token
// tiles {8, 16, 32, 64} x {fp16, bf16}. Post-scale decode (small M, where
// decoding dominates): bits {2, 3, 4} x {fp16, bf16} x token tiles {8, 16} x
// slot widths {16, 32, 64, 128}, and token tiles 32 and 64 with 128-column
// slots only (narrower slots keep more fp32 sums live and spill at two blocks
// per SM; at 64 tokens the 128-column kernels use all 128 registers, no spills).
// Post-scale with the acq_rel publish: bits {2, 3, 4} x {fp16, bf16} x token
// tiles {8, 16}, 128-column slots. Post-scale for three blocks per SM: bits
// {2, 3, 4} x {fp16, bf16} x token tile 8 with slots of 64 and 128 columns
// (6 stages) and token tile 16 with 128-column slots (5 stages): at most 80
// registers, no spills on sm_90a; three blocks fit Hopper's 228 KB.
template <class T>
int dispatch_tokens(const Params& p, int bits, int decode, int64_t num_ctas, cudaStream_t s) {
  const int m_tiles = p.M <= 8 ? 1 : p.M <= 16 ? 2 : p.M <= 32 ? 4 : 8;
  if (decode == VLMKERN_WO_DECODE_EXACT) {
#define VLMKERN_WO_CASE(B, MT) \
  if (bits == B && m_tiles == MT) return launch<B, MT, T, -1>(p, num_ctas, s);
    VLMKERN_WO_CASE(4, 1) VLMKERN_WO_CASE(4, 2) VLMKERN_WO_CASE(4, 4) VLMKERN_WO_CASE(4, 8)
    VLMKERN_WO_CASE(3, 1) VLMKERN_WO_CASE(3, 2) VLMKERN_WO_CASE(3, 4) VLMKERN_WO_CASE(3, 8)
    VLMKERN_WO_CASE(2, 1) VLMKERN_WO_CASE(2, 2) VLMKERN_WO_CASE(2, 4) VLMKERN_WO_CASE(2, 8)
#undef VLMKERN_WO_CASE
    return VLMKERN_WO_ERR_BAD_BITS;
  }
  if (decode == VLMKERN_WO_DECODE_POST_SCALE_ACQ_REL) {  // M <= 16, slot_log2 3 (checked)
#define VLMKERN_WO_CASE(B, MT) \
  if (bits == B && m_tiles == MT) return launch<B, MT, T, 3, true>(p, num_ctas, s);
    VLMKERN_WO_CASE(4, 1) VLMKERN_WO_CASE(4, 2) VLMKERN_WO_CASE(3, 1) VLMKERN_WO_CASE(3, 2)
    VLMKERN_WO_CASE(2, 1) VLMKERN_WO_CASE(2, 2)
#undef VLMKERN_WO_CASE
    return VLMKERN_WO_ERR_BAD_BITS;
  }
  if (decode == VLMKERN_WO_DECODE_POST_SCALE_3CTA) {  // M, slot_log2 checked
#define VLMKERN_WO_CASE(B, MT, S) \
  if (bits == B && m_tiles == MT && p.slot_log2 == S) \
    return launch<B, MT, T, S, false, 3>(p, num_ctas, s);
    VLMKERN_WO_CASE(4, 1, 2) VLMKERN_WO_CASE(4, 1, 3) VLMKERN_WO_CASE(4, 2, 3)
    VLMKERN_WO_CASE(3, 1, 2) VLMKERN_WO_CASE(3, 1, 3) VLMKERN_WO_CASE(3, 2, 3)
    VLMKERN_WO_CASE(2, 1, 2) VLMKERN_WO_CASE(2, 1, 3) VLMKERN_WO_CASE(2, 2, 3)
#undef VLMKERN_WO_CASE
    return VLMKERN_WO_ERR_BAD_BITS;
  }
#define VLMKERN_WO_CASE(B, MT, S) \
  if (bits == B && m_tiles == MT && p.slot_log2 == S) return launch<B, MT, T, S>(p, num_ctas, s);
#define VLMKERN_WO_SLOTS(B, MT) \
  VLMKERN_WO_CASE(B, MT, 0) VLMKERN_WO_CASE(B, MT, 1) VLMKERN_WO_CASE(B, MT, 2) VLMKERN_WO_CASE(B, MT, 3)
  VLMKERN_WO_SLOTS(4, 1) VLMKERN_WO_SLOTS(4, 2) VLMKERN_WO_CASE(4, 4, 3) VLMKERN_WO_CASE(4, 8, 3)
  VLMKERN_WO_SLOTS(3, 1) VLMKERN_WO_SLOTS(3, 2) VLMKERN_WO_CASE(3, 4, 3) VLMKERN_WO_CASE(3, 8, 3)
  VLMKERN_WO_SLOTS(2, 1) VLMKERN_WO_SLOTS(2, 2) VLMKERN_WO_CASE(2, 4, 3) VLMKERN_WO_CASE(2, 8, 3)
#undef VLMKERN_WO_SLOTS
#undef VLMKERN_WO_CASE
  return VLMKERN_WO_ERR_BAD_BITS;
}

// The stream-K arguments every entry point checks alike.
int check_split(int64_t M, int64_t max_m, int64_t NB, int64_t C, int64_t num_ctas,
                const float* workspace, const int32_t* counters) {
  if (M > max_m || num_ctas < 1 || num_ctas > NB * C || num_ctas > 0x7fffffff)
    return VLMKERN_WO_ERR_BAD_SIZE;
  if (!counters || !workspace) return VLMKERN_WO_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(workspace) % 4 != 0 || reinterpret_cast<uintptr_t>(counters) % 4 != 0)
    return VLMKERN_WO_ERR_ALIGNMENT;
  return VLMKERN_WO_OK;
}

// The launch parameters every entry point sets alike (x in 16-bit columns;
// no merge selectors or token scales: the table and integer decodes add theirs).
Params make_params(const void* x, int64_t M, int64_t ldx, const int32_t* wq, const int32_t* sz,
                   int64_t NB, int64_t C, int slot_log2, const void* bias, int bias_dtype,
                   void* out, int64_t N, float* workspace, int32_t* counters) {
  Params p;
  p.x = static_cast<const uint16_t*>(x);
  p.wq = reinterpret_cast<const unsigned char*>(wq);
  p.sz = reinterpret_cast<const unsigned char*>(sz);
  p.bias = bias;
  p.out = static_cast<uint16_t*>(out);
  p.ws = workspace;
  p.counters = counters;
  p.units = NB * C;
  p.M = static_cast<int>(M);
  p.ldx = static_cast<int>(ldx);
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.slot_log2 = slot_log2;
  p.slots = 8 >> slot_log2;
  p.bias_dtype = bias_dtype;
  p.merge = nullptr;
  p.sx = nullptr;
  return p;
}

// The table decode: token tiles {8, 16, 32, 64} x {fp16, bf16}.
template <class T>
int dispatch_table(const Params& p, int64_t num_ctas, cudaStream_t s) {
  if (p.M <= 8) return launch<2, 1, T, kTableDecode>(p, num_ctas, s);
  if (p.M <= 16) return launch<2, 2, T, kTableDecode>(p, num_ctas, s);
  if (p.M <= 32) return launch<2, 4, T, kTableDecode>(p, num_ctas, s);
  return launch<2, 8, T, kTableDecode>(p, num_ctas, s);
}

// The integer-activation decode: token tiles {8, 16, 32} x {fp16, bf16} outputs.
template <class T>
int dispatch_int8(const Params& p, int64_t num_ctas, cudaStream_t s) {
  if (p.M <= 8) return launch<16, 1, T, kInt8Decode>(p, num_ctas, s);
  if (p.M <= 16) return launch<16, 2, T, kInt8Decode>(p, num_ctas, s);
  return launch<16, 4, T, kInt8Decode>(p, num_ctas, s);
}

}  // namespace

int vlmkern_wo::launch_failed(cudaError_t err) {
  last_error = err;
  return VLMKERN_WO_ERR_LAUNCH;
}

extern "C" const char* vlmkern_wo_status_message(int status) {
  switch (status) {
    case VLMKERN_WO_OK: return "success";
    case VLMKERN_WO_ERR_NULL_POINTER: return "a required pointer (x, wq, sz, out or counters) is null";
    case VLMKERN_WO_ERR_BAD_BITS: return "bits must be 2, 3 or 4";
    case VLMKERN_WO_ERR_BAD_SIZE:
      return "inconsistent sizes: need 1 <= M <= 64 (M <= 32 for the int8 decode), "
             "(C-1)*128 < K_x <= C*128, "
             "(NB-1)*128 < N <= NB*128, 0 <= slot_log2 <= 3 and 1 <= num_ctas <= NB*C";
    case VLMKERN_WO_ERR_BAD_DTYPE:
      return "activations must be f16 or bf16 and bias f16, bf16 or f32";
    case VLMKERN_WO_ERR_ALIGNMENT:
      return "x, wq and sz must be 16-byte aligned, K_x a multiple of 8, and out, bias, "
             "workspace, counters, token scales and partial sums aligned to their elements "
             "(out to 4 bytes for the WGMMA kernel when N is even)";
    case VLMKERN_WO_ERR_BAD_DECODE:
      return "decode must be 0 (exact), 1 (post-scale), 2 (post-scale, acq_rel publish) or 3 "
             "(post-scale, three blocks per SM); the post-scale decode takes M <= 16 (M <= 64 "
             "with scale slots of 128 columns), the acq_rel one M <= 16 with scale slots of 128 "
             "columns, decode 3 M <= 16 with slots of 128 columns and M <= 8 with 64";
    case VLMKERN_WO_ERR_NO_SM90A:
      return "the WGMMA kernel needs an sm_90 GPU and a build with sm_90a code "
             "(TORCH_CUDA_ARCH_LIST containing 9.0a): this device or build has none, or the "
             "check for it failed";
    case VLMKERN_WO_ERR_SHARED_MEMORY:
      return "the device cannot give a thread block enough shared memory for this configuration";
    case VLMKERN_WO_ERR_LAUNCH:
      snprintf(message, sizeof(message), "CUDA error: %s (%s)", cudaGetErrorName(last_error),
               cudaGetErrorString(last_error));
      return message;
    default: return "unknown vlmkern weight-only status code";
  }
}

extern "C" int64_t vlmkern_wo_workspace_elems(int64_t M, int64_t num_ctas) {
  return 2 * num_ctas * M * kBlockRows;
}

extern "C" int vlmkern_weight_only_mma(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                                       const int32_t* sz, int64_t NB, int64_t C, int slot_log2,
                                       int bits, const void* bias, int bias_dtype, void* out,
                                       int64_t N, float* workspace, int32_t* counters,
                                       int64_t num_ctas, int act_dtype, int decode, void* stream) {
  if (decode != VLMKERN_WO_DECODE_EXACT &&
      (decode != VLMKERN_WO_DECODE_POST_SCALE || M > VLMKERN_WO_POST_SCALE_LIMIT(slot_log2)) &&
      (decode != VLMKERN_WO_DECODE_POST_SCALE_ACQ_REL || M > VLMKERN_WO_POST_SCALE_MAX_M ||
       slot_log2 != 3) &&
      (decode != VLMKERN_WO_DECODE_POST_SCALE_3CTA ||
       M > VLMKERN_WO_POST_SCALE_3CTA_LIMIT(slot_log2)))
    return VLMKERN_WO_ERR_BAD_DECODE;
  const int status = check_launch_args(x, M, K_x, wq, sz, NB, C, slot_log2, bits, bias, bias_dtype,
                                       out, N, act_dtype);
  if (status != VLMKERN_WO_OK) return status;
  const int split = check_split(M, VLMKERN_WO_MAX_M, NB, C, num_ctas, workspace, counters);
  if (split != VLMKERN_WO_OK) return split;

  const Params p = make_params(x, M, K_x, wq, sz, NB, C, slot_log2, bias, bias_dtype, out, N,
                               workspace, counters);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? dispatch_tokens<F16>(p, bits, decode, num_ctas, s)
                                        : dispatch_tokens<BF16>(p, bits, decode, num_ctas, s);
}

extern "C" int vlmkern_int_act_staged_mma(const int8_t* q, int64_t M, int64_t K_q,
                                          const int32_t* wq, const int32_t* sz, int64_t NB,
                                          int64_t C, int slot_log2, const float* sx,
                                          const void* bias, int bias_dtype, void* out, int64_t N,
                                          float* workspace, int32_t* counters, int64_t num_ctas,
                                          int out_dtype, void* stream) {
  // In 16-bit columns the codes are K_q / 2 wide: C chunks of 128 such columns.
  if (K_q % 16 != 0) return VLMKERN_WO_ERR_ALIGNMENT;
  // (bits = 2 only passes the bit-width check; the layout sizes are the binding's to check)
  const int status = check_launch_args(q, M, K_q / 2, wq, sz, NB, C, slot_log2, /*bits=*/2, bias,
                                       bias_dtype, out, N, out_dtype);
  if (status != VLMKERN_WO_OK) return status;
  const int split = check_split(M, VLMKERN_WO_INT8_MAX_M, NB, C, num_ctas, workspace, counters);
  if (split != VLMKERN_WO_OK) return split;
  if (!sx) return VLMKERN_WO_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(sx) % 4 != 0) return VLMKERN_WO_ERR_ALIGNMENT;

  Params p = make_params(q, M, K_q / 2, wq, sz, NB, C, slot_log2, bias, bias_dtype, out, N,
                         workspace, counters);
  p.sx = sx;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return out_dtype == VLMKERN_DTYPE_F16 ? dispatch_int8<F16>(p, num_ctas, s)
                                        : dispatch_int8<BF16>(p, num_ctas, s);
}

extern "C" int vlmkern_binary_lut_staged_mma(const void* x, int64_t M, int64_t K_x,
                                             const int32_t* codes, const int32_t* tables,
                                             const int32_t* merge, int64_t NB, int64_t C,
                                             const void* bias, int bias_dtype, void* out,
                                             int64_t N, float* workspace, int32_t* counters,
                                             int64_t num_ctas, int act_dtype, void* stream) {
  // codes and tables have the byte sizes of 2-bit codes and 4 scale slots per tile
  const int status = check_launch_args(x, M, K_x, codes, tables, NB, C, /*slot_log2=*/1,
                                       /*bits=*/2, bias, bias_dtype, out, N, act_dtype);
  if (status != VLMKERN_WO_OK) return status;
  const int split = check_split(M, VLMKERN_WO_MAX_M, NB, C, num_ctas, workspace, counters);
  if (split != VLMKERN_WO_OK) return split;
  if (!merge) return VLMKERN_WO_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(merge) % 16 != 0) return VLMKERN_WO_ERR_ALIGNMENT;

  // tables fill kTableSlots = 4 scale slots a tile: slot_log2 = 1
  Params p = make_params(x, M, K_x, codes, tables, NB, C, 1, bias, bias_dtype, out, N, workspace,
                         counters);
  p.merge = reinterpret_cast<const unsigned char*>(merge);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? dispatch_table<F16>(p, num_ctas, s)
                                        : dispatch_table<BF16>(p, num_ctas, s);
}
