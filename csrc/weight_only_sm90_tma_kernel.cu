// Weight-only matmul on Hopper for batches and prefill (sm_90a): y[M, N] = x[M, K] @ W[N, K]^T
// + bias, W in 2, 3 or 4 bits in the load-time layout of weight_only.h, the
// exact decode (s * (q - z) rounded once, the weight dequantize() gives),
// fed to wgmma from registers, in a warp-specialized pipeline.
//
// Why this shape. Dequantize + cuBLAS writes and rereads the whole fp16
// weight for every call (on an H100 about 0.9x of cuBLAS fp16 at M = 4096),
// and the cp.async wgmma kernel (weight_only_sm90_kernel.cu) reached 0.5-0.6x:
// its 128 x 128 tile rereads the 32 KB token tile from L2 for each 8 KB of
// weights, and its warps decode a chunk only once the previous chunk's MMAs
// are done.
//
// - Tiles: 128 weight rows (one layout block) x 128 tokens per thread block
//   (64 tokens for M <= 64, with 7 stages instead of 4; 16 for decode, see
//   below), K in 128-column chunks (one layout chunk per stage). One
//   producer warpgroup (one thread issues the copies) and two consumer
//   warpgroups, warpgroup g holding rows 64g..64g+63 as wgmma m64nNk16 A
//   fragments (N: the token tile); N / 2 fp32 sums per thread.
// - Copies: the token tile by TMA (two 64-column boxes per chunk, 128-byte
//   swizzle: the K-major layout the B descriptor names; zero fill past M and
//   K from the copy engine), a unit's codes and scales by one bulk copy each
//   (they are contiguous in the layout).
// - Cluster: the two thread blocks of a cluster hold adjacent row blocks and
//   the same tokens; each copies half of the token tile and multicasts it to
//   both, so a block reads 16 KB of tokens + the unit's codes from L2 per
//   chunk instead of 32 KB + codes.
// - Decode: a consumer warp decodes k16 step kt + 1 while the MMA of step kt
//   runs (each step has its own fragment registers), and one warpgroup's
//   MMAs run while the other decodes, so the decode hides behind the tensor
//   cores instead of alternating with them. A code becomes a magic-number
//   half with one LOP3, and a chunk with one scale slot (groups of 128)
//   reads its scales once: 4 instructions per fragment register at 4 bits.
// - Persistent: as many clusters as the GPU holds at once
//   (cudaOccupancyMaxActiveClusters) walk the work units, groups of 16
//   token tiles row pair by row pair, so a group's tokens stay in L2 while
//   the whole weight streams past once. The stage and phase counters run on
//   from one unit into the next: the producer fills the next unit's stages
//   while the consumers store the last one's outputs.
// - Epilogue: straight from the sums in registers (the stages already hold
//   the next unit's copies), bias, one rounding; a warp's store covers 8
//   consecutive rows of 4 tokens.
// - Split-K: a layer with too few row blocks to fill the GPU (a small layer
//   at decode-like M) is cut into K slices, each a unit of its own; each
//   slice stores fp32 partial sums and wo_split_sum_kernel adds them in
//   slice order.
// - Decode (M <= 16, vlmkern_weight_only_tma_decode): a 16-token tile
//   (wgmma m64n16k16), as many stages as fit (14 for 4 bits), and a
//   stream-K walk instead of units: the layer's (row pair, chunk) positions
//   are cut into one equal range per cluster, and a row block split between
//   ranges is summed by its last part to arrive (finish_part), in cluster
//   order, inside this kernel. There the weight stream is everything: no
//   block-wide barrier stands between a chunk's arrival and its decode, one
//   thread issues each chunk's copies, and up to 14 chunks of codes (112 KB
//   at 4 bits) are in flight per SM.
//
// The same pipeline runs binarized weights in the lookup-table layout of
// binary.h (vlmkern_binary_lut_tma): codes, tables and the chunk's merge
// selectors come by bulk copies, and the byte-permute decode of
// binary_lut_decode.cuh makes the fragments.
//
// A token's sums depend only on its place in its token tile, the tile width
// and the number of K slices, so for a fixed slice count the output is
// deterministic and batch-invariant within each tile width.
//
// Compiled to real code only for sm_90a; other targets get a kernel that
// traps, and the launcher runs only where vlmkern_int_act_sm90_available says
// the build holds sm_90a code.

#include <cuda_runtime.h>
#include <stdint.h>

#include "int_act.h"  // vlmkern_int_act_sm90_available: the build's sm_90a probe
#include "sm90_wgmma.cuh"
#include "tma_host.cuh"
#include "weight_only.h"
#include "binary_lut_decode.cuh"
#include "weight_only_common.cuh"
#include "weight_only_wgmma.cuh"

namespace {

using namespace vlmkern_wo;
#if VLMKERN_SM90A
using namespace vlmkern_sm90;
constexpr int kChunk = 128;           // K columns per stage: one layout chunk
constexpr int kGroupTiles = 16;       // token tiles per raster group
constexpr int kRows = 128;            // weight rows per thread block: one layout block
#endif

constexpr int kDecodeTokens = 16;     // token tile for M <= 16: the decode walk (see DecodeWalk)
constexpr int kSmallTokens = 64;      // token tile for M <= 64, 128 above
constexpr int kCluster = 2;           // thread blocks sharing one token tile
constexpr int kThreads = 384;         // producer warpgroup + two consumer warpgroups
constexpr int kScaleBytesMax = 8 * 8 * 64;       // 8 warps x 8 slots x 64 bytes (slot_log2 0)

// A stage: the token tile (two 64-column halves of TOKENS rows of 128
// bytes), one unit's codes, its scales (or, for the table decode, its
// tables: 4 scale slots a tile) and, for the table decode, the chunk's merge
// selectors. The 64-token tile halves a stage, so it gets more of them, and
// the decode tile as many as fit (up to 16): at decode-like M the weight
// stream is what must be kept in flight.
template <int BITS, bool TABLE, int TOKENS>
struct TmaStage {
  static constexpr int kHalfBytes = TOKENS * 128;       // one 64-column half of the token tile
  static constexpr int kXBytes = 2 * kHalfBytes;
  static constexpr int kWeightBytes = 8 * 256 * BITS;  // one unit's codes
  static constexpr int kMergeOffset = kXBytes + kWeightBytes + kScaleBytesMax;
  static constexpr int kMergeBytes = TABLE ? 32 * 8 * 4 : 0;  // [32 lanes][8 steps] int32
  static constexpr int kBytes = (kMergeOffset + kMergeBytes + 1023) / 1024 * 1024;
  static constexpr int kFit = (227 * 1024 - 1024 - 16 * 16) / kBytes;  // less alignment and barriers
  static constexpr int kStages = TOKENS == kDecodeTokens ? (kFit < 16 ? kFit : 16)
                                 : TOKENS == kSmallTokens ? 7 : 4;
  static constexpr int kBarriers = kStages * kBytes;   // offset of the mbarriers
  static constexpr int kSmem = kBarriers + 2 * kStages * 8 + 1024;  // + slack to align to 1024
  static_assert(kSmem <= 227 * 1024, "a block's shared memory fits an sm_90 SM");
};

struct TmaParams {
  const unsigned char* wq;  // [NB, C, 8, 64*bits] int32
  const unsigned char* sz;  // [NB, C, 8, slots, 8, 2] int32
  const void* bias;         // [N] or null
  uint16_t* out;            // [M, N]
  int64_t M;
  int NB, N, C;
  int slot_log2, slots, bias_dtype;
  const unsigned char* merge;  // [C, 32, 8] int32: the table decode's merge selectors
  int splits;               // K slices; > 1: fp32 partial sums go to `partial`
  float* partial;           // [splits, M, N]
  // The decode walk's parts of row blocks split between clusters:
  float* ws;                // [2 * clusters, kCluster, M, 128] fp32 sums (see finish_part)
  int32_t* counters;        // [NB] parts arrived per row block, zero between launches
};

// The A fragments of one warp's 16 x 128 tile of a chunk, one k16 step at a
// time, from the stage at `st`. The exact decode of 2/3/4-bit codes (as
// exact_operand: (magic + q) - (magic + z) exact, one multiply by s);
// ONE_SLOT: one scale slot a chunk (slot_log2 3, e.g. groups of 128), read
// once instead of tested for at every step.
template <int BITS, class T, bool TABLE, int TOKENS, bool ONE_SLOT = false>
struct ChunkDecode {
  static constexpr int kXBytes = TmaStage<BITS, TABLE, TOKENS>::kXBytes;
  uint32_t w[2 * BITS];
  const uint2* slots;
  int slot_log2, slot_mask;
  uint32_t s_lo = 0, s_hi = 0, z_lo = 0, z_hi = 0;
  __device__ __forceinline__ ChunkDecode(const unsigned char* st, const TmaParams& p, int warp,
                                         int lane) {
    load_lane_words<BITS>(st + kXBytes + warp * 256 * BITS, lane, w);
    slots = reinterpret_cast<const uint2*>(st + kXBytes + TmaStage<BITS, TABLE, TOKENS>::kWeightBytes) +
            warp * p.slots * 8 + (lane >> 2);
    slot_log2 = p.slot_log2;
    slot_mask = (1 << p.slot_log2) - 1;
    if constexpr (ONE_SLOT) split_rows(slots[0], s_lo, s_hi, z_lo, z_hi);
  }
  __device__ __forceinline__ void step(int kt, uint32_t (&a)[4]) {
    if (!ONE_SLOT && (kt == 0 || (kt & slot_mask) == 0))
      split_rows(slots[(kt >> slot_log2) * 8], s_lo, s_hi, z_lo, z_hi);
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // registers 0 and 2: row g; 1 and 3: row g + 8
      uint32_t d;
      T::fma2(d, magic_codes<BITS, true>(w, kt, r, T::kMagic2), T::kOne2, (r & 1) ? z_hi : z_lo);
      T::fma2(d, d, (r & 1) ? s_hi : s_lo, kNegZero2);
      a[r] = d;
    }
  }
};
// ... and the table decode of binarized weights (binary.h's lookup-table
// layout: codes as 2-bit codes, the rows' tables in the scale slots).
template <class T, int TOKENS>
struct ChunkDecode<2, T, true, TOKENS, false> {
  uint4 codes, t0, t1, m0, m1;
  __device__ __forceinline__ ChunkDecode(const unsigned char* st, const TmaParams&, int warp,
                                         int lane) {
    using S = TmaStage<2, true, TOKENS>;
    codes = reinterpret_cast<const uint4*>(st + S::kXBytes + warp * 512)[lane];
    const uint4* tables = reinterpret_cast<const uint4*>(st + S::kXBytes + S::kWeightBytes +
                                                         warp * 256 + 32 * (lane >> 2));
    t0 = tables[0];  // row g
    t1 = tables[1];  // row g + 8
    const uint4* merge = reinterpret_cast<const uint4*>(st + S::kMergeOffset + 32 * lane);
    m0 = merge[0];   // steps 0..3
    m1 = merge[1];   // steps 4..7
  }
  __device__ __forceinline__ void step(int kt, uint32_t (&a)[4]) {
    vlmkern_lut::lut_operands(codes, t0, t1, m0, m1, kt, a);
  }
};

#if VLMKERN_SM90A
// A work unit of the persistent walk: K slice, weight row block (this block
// of the cluster) and first token. Units run K slice by K slice; within a
// slice, clusters walk groups of kGroupTiles token tiles row pair by row
// pair, so a group's tokens stay in L2 while the whole weight streams past
// once.
struct Unit {
  int b, slice, c0, c1;  // row block, K slice and its chunks [c0, c1) (never empty: splits <= C)
  int64_t m0;            // first token
  bool has_rows;         // false: the cluster's second block past the last row block only copies
  bool opens_range;      // the decode walk: the first segment of this cluster's range
};

// (Computed by each role after setmaxnreg: a value kept across it spills.)
template <int TOKENS>
__device__ __forceinline__ int64_t unit_count(const TmaParams& p) {
  return (p.M + TOKENS - 1) / TOKENS * ((p.NB + 1) / 2) * p.splits;
}

template <int TOKENS>
__device__ __forceinline__ Unit unit_of(int64_t u, const TmaParams& p, uint32_t rank) {
  const int64_t tiles = (p.M + TOKENS - 1) / TOKENS, pairs = (p.NB + 1) / 2;
  const int64_t per_slice = tiles * pairs, per_group = int64_t(kGroupTiles) * pairs;
  const int64_t slice = u / per_slice, cluster = u % per_slice;
  const int64_t first_tile = cluster / per_group * kGroupTiles;
  const int64_t in_group = min(int64_t(kGroupTiles), tiles - first_tile);
  const int64_t rest = cluster % per_group;
  Unit w;
  w.b = int(2 * (rest / in_group) + rank);
  w.m0 = (first_tile + rest % in_group) * TOKENS;
  w.has_rows = w.b < p.NB;
  w.slice = int(slice);
  w.c0 = int(slice * p.C / p.splits);
  w.c1 = int((slice + 1) * p.C / p.splits);
  w.opens_range = true;
  return w;
}

// The batch and prefill walk: cluster i takes units i, i + clusters, ... of
// unit_count, each a whole K slice of one token tile and row pair.
template <int TOKENS>
struct TileWalk {
  int64_t u, units, step;
  __device__ __forceinline__ TileWalk(const TmaParams& p, int64_t cluster, int64_t clusters)
      : u(cluster), units(unit_count<TOKENS>(p)), step(clusters) {}
  __device__ __forceinline__ bool next(Unit& w, const TmaParams& p, uint32_t rank) {
    if (u >= units) return false;
    w = unit_of<TOKENS>(u, p, rank);
    u += step;
    return true;
  }
};

// The decode walk (M <= 16, one token tile). Whole row pairs would balance
// badly: gate/up has 148 pairs for 66 clusters, so a third round would run a
// quarter full. Instead the layer's (row pair, chunk) positions, pair by
// pair, are cut into one equal range per cluster (stream-K). A range is a
// run of segments, each one row pair's chunks [c0, c1); a segment short of
// its pair's whole K range is finished by finish_part. The launch starts at
// most as many clusters as there are positions, so no range is empty: an
// empty one would be counted among a row block's parts and never arrive.
__device__ __forceinline__ int64_t range_start(int64_t cluster, int64_t total, int64_t clusters) {
  return cluster * total / clusters;
}
// The cluster whose range holds position u: the last one starting at or before it.
__device__ __forceinline__ int64_t range_owner(int64_t u, int64_t total, int64_t clusters) {
  return ((u + 1) * clusters - 1) / total;
}

struct DecodeWalk {
  int64_t start, pos, end;
  __device__ __forceinline__ DecodeWalk(const TmaParams& p, int64_t cluster, int64_t clusters) {
    const int64_t total = int64_t((p.NB + 1) / 2) * p.C;
    start = pos = range_start(cluster, total, clusters);
    end = range_start(cluster + 1, total, clusters);
  }
  __device__ __forceinline__ bool next(Unit& w, const TmaParams& p, uint32_t rank) {
    if (pos >= end) return false;
    const int64_t pair = pos / p.C;
    w.c0 = int(pos - pair * p.C);
    w.c1 = int(min(int64_t(p.C), w.c0 + (end - pos)));
    w.b = int(2 * pair + rank);
    w.m0 = 0;
    w.slice = 0;
    w.has_rows = w.b < p.NB;
    w.opens_range = pos == start;
    pos = pair * p.C + w.c1;
    return true;
  }
};

template <bool DECODE, int TOKENS> struct WalkOf { using type = TileWalk<TOKENS>; };
template <int TOKENS> struct WalkOf<true, TOKENS> { using type = DecodeWalk; };

// The end of a decode segment that holds only part of its row pair's K
// range. This block's sums go to its cluster's workspace slot (0 for the
// range's first segment, 1 for its last: a range's middle segments are whole
// pairs); the part that arrives last adds the row block's parts in cluster
// order, so the result is the same whichever arrives last, adds the bias,
// rounds once and leaves the count zero for the next launch.
// Ordering: the consumers' stores precede (barrier) one thread's release
// increment of the row block's count; the last part's increment acquires
// every earlier one's, and its consumers read after it (barrier). One
// acq_rel atomic per part, where a fence per thread (__threadfence is
// fence.sc.gpu) would wait on each thread's outstanding memory traffic.
template <class T, int TOKENS>
__device__ void finish_part(const TmaParams& p, const Unit& w, const float (&acc)[TOKENS / 2],
                            int warp, int lane) {
  __shared__ int arrived_last;
  const int64_t clusters = gridDim.x / kCluster, cluster = blockIdx.x / kCluster;
  const int64_t total = int64_t((p.NB + 1) / 2) * p.C, pair = w.b / 2;
  const int64_t plane = p.M * kRows;  // one block's sums in one slot
  const int rank = w.b & 1, row = 16 * warp + (lane >> 2), m_base = 2 * (lane & 3);
  const auto slot = [&](int64_t q, int end) { return p.ws + ((2 * q + end) * kCluster + rank) * plane; };
  float* mine = slot(cluster, w.opens_range ? 0 : 1);
#pragma unroll
  for (int i = 0; i < TOKENS / 2; ++i) {  // sum i: token m_base + 8 (i / 4) + i % 2, row + 8 (i / 2 % 2)
    const int m = m_base + 8 * (i >> 2) + (i & 1);
    if (m < p.M) mine[m * kRows + row + 4 * (i & 2)] = acc[i];
  }
  consumers_sync();
  const int64_t first = range_owner(pair * p.C, total, clusters);
  const int64_t parts = range_owner(pair * p.C + p.C - 1, total, clusters) - first + 1;
  if (threadIdx.x == 128) arrived_last = atomic_add_acq_rel(p.counters + w.b, 1) == parts - 1;
  consumers_sync();
  if (!arrived_last) return;

  // The first part is its cluster's last segment unless that range starts in this pair.
  const float* part = slot(first, range_start(first, total, clusters) / p.C == pair ? 0 : 1);
  float sum[TOKENS / 2];
  for (int64_t q = 0; q < parts; ++q, part = slot(first + q, 0)) {
#pragma unroll
    for (int i = 0; i < TOKENS / 2; ++i) {
      const int m = m_base + 8 * (i >> 2) + (i & 1);
      const float v = m < p.M ? __ldcg(part + m * kRows + row + 4 * (i & 2)) : 0.f;
      sum[i] = q == 0 ? v : sum[i] + v;
    }
  }
  const int64_t n_lo = int64_t(w.b) * kRows + row, n_hi = n_lo + 8;
  float bias_lo = -0.f, bias_hi = -0.f;  // x + -0 is x, -0 included
  if (p.bias) {
    if (n_lo < p.N) bias_lo = load_bias(p.bias, p.bias_dtype, static_cast<int>(n_lo));
    if (n_hi < p.N) bias_hi = load_bias(p.bias, p.bias_dtype, static_cast<int>(n_hi));
  }
#pragma unroll
  for (int i = 0; i < TOKENS / 2; ++i) {
    const int64_t m = m_base + 8 * (i >> 2) + (i & 1), n = (i & 2) ? n_hi : n_lo;
    if (m < p.M && n < p.N) p.out[m * p.N + n] = T::from_float(sum[i] + ((i & 2) ? bias_hi : bias_lo));
  }
  if (threadIdx.x == 128) p.counters[w.b] = 0;
}
#endif  // VLMKERN_SM90A

// The decoded weights are the A operand (registers), the token tile the B
// operand: sum 4j + e of a thread holds weight row 16 * (warp in warpgroup)
// + lane / 4 + 8 * (e / 2) of its warpgroup's 64 and token 8j + 2 * (lane % 4)
// + e % 2. Launched in clusters of kCluster blocks along x (cudaLaunchKernelEx),
// at most as many as the GPU holds at once; cluster i takes units i,
// i + clusters, ... of the pairs * tiles * splits, or, with the decode tile,
// its range of the decode walk.
template <int BITS, class T, bool TABLE, int TOKENS>
__global__ void __launch_bounds__(kThreads, 1)
    weight_only_tma_kernel(const __grid_constant__ CUtensorMap x_map, TmaParams p) {
#if VLMKERN_SM90A
  using S = TmaStage<BITS, TABLE, TOKENS>;
  constexpr int kStages = S::kStages;
  constexpr bool kDecode = TOKENS == kDecodeTokens;
  using Walk = typename WalkOf<kDecode, TOKENS>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t full = base + S::kBarriers, empty = full + kStages * 8;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const uint32_t rank = cluster_rank();
  const int64_t first = blockIdx.x / kCluster, clusters = gridDim.x / kCluster;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);                // the producer's expect_tx
      mbar_init(empty + 8 * s, 8 * kCluster);    // every consumer warp of both blocks
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster_sync();  // the peer multicasts into this block's barriers only once they exist

  // The stage and phase counters run on from one unit into the next, so the
  // producer fills the next unit's stages while the consumers store outputs.
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");  // with 40 the producer spills
    if (tid == 0) {
      constexpr int kPart = TOKENS / kCluster;  // token rows this block copies for both
      const int scale_bytes = 8 * p.slots * 64;
      int s = 0;
      uint32_t phase = 0;
      Walk walk(p, first, clusters);
      for (Unit w; walk.next(w, p, rank);) {
        const unsigned char* wsrc = p.wq + int64_t(w.b) * p.C * S::kWeightBytes;
        const unsigned char* ssrc = p.sz + int64_t(w.b) * p.C * scale_bytes;
        const uint32_t bytes =
            S::kXBytes + (w.has_rows ? S::kWeightBytes + scale_bytes + S::kMergeBytes : 0);
        for (int c = w.c0; c < w.c1; ++c) {
          mbar_wait(empty + 8 * s, phase ^ 1);  // the first round finds every stage free
          const uint32_t stage = base + s * S::kBytes, bar = full + 8 * s;
          mbar_expect_bytes(bar, bytes);        // both token halves, this block's codes and scales
#pragma unroll
          for (int h = 0; h < 2; ++h)
            tma_load_multicast(stage + h * S::kHalfBytes + rank * kPart * 128, &x_map,
                               c * kChunk + 64 * h, int(w.m0) + int(rank) * kPart, bar,
                               uint16_t((1u << kCluster) - 1));
          if (w.has_rows) {
            bulk_load(stage + S::kXBytes, wsrc + int64_t(c) * S::kWeightBytes, S::kWeightBytes,
                      bar);
            bulk_load(stage + S::kXBytes + S::kWeightBytes, ssrc + int64_t(c) * scale_bytes,
                      scale_bytes, bar);
            if constexpr (TABLE)
              bulk_load(stage + S::kMergeOffset, p.merge + int64_t(c) * S::kMergeBytes,
                        S::kMergeBytes, bar);
          }
          if (++s == kStages) {
            s = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");  // 56 * 128 + 224 * 256 = 64K
    const int warp = (tid >> 5) - 4;  // 16-row tile of the layout block
    int s = 0;
    uint32_t phase = 0;
    Walk walk(p, first, clusters);
    for (Unit w; walk.next(w, p, rank);) {
      float acc[TOKENS / 2];
#pragma unroll
      for (int i = 0; i < TOKENS / 2; ++i) acc[i] = 0.f;
      for (int c = w.c0; c < w.c1; ++c) {
        mbar_wait(full + 8 * s, phase);
        if (w.has_rows) {  // a copy-only block only keeps the pipeline's count
          const unsigned char* st = smem + s * S::kBytes;
          const uint32_t xs = base + s * S::kBytes;
          // Step kt's fragments are decoded while step kt - 1's MMA runs: each
          // step has its own registers, and the chunk's MMAs form one group,
          // waited for at the chunk's end. A wait or a commit between them, or
          // a group kept in flight across the loop's back edge, makes ptxas
          // serialize every MMA; while this warpgroup waits, the other one's
          // MMAs run.
          // A step's descriptor is the stage's plus its offset / 16: shared
          // addresses stay below 2^18, so the address field never carries.
          const uint64_t desc = smem_desc(xs);
          const auto run_chunk = [&](auto decode) {
            uint32_t a[8][4];
            fence_operands(acc);
#pragma unroll
            for (int kt = 0; kt < 8; ++kt) {
              decode.step(kt, a[kt]);
              wgmma_fence();
              wgmma_k16(acc, a[kt], desc + (((kt >> 2) * S::kHalfBytes + 32 * (kt & 3)) >> 4), T{});
            }
            wgmma_commit();
            wgmma_wait<0>();  // this chunk's MMAs are done: free its stage in both blocks
            fence_operands(acc);
            fence_operands(a);
          };
          if (TABLE || p.slot_log2 != 3)
            run_chunk(ChunkDecode<BITS, T, TABLE, TOKENS>(st, p, warp, lane));
          else
            run_chunk(ChunkDecode<BITS, T, TABLE, TOKENS, !TABLE>(st, p, warp, lane));
        }
        if (lane == 0)
          for (uint32_t cta = 0; cta < kCluster; ++cta) mbar_arrive_in(empty + 8 * s, cta);
        if (++s == kStages) {
          s = 0;
          phase ^= 1;
        }
      }
      if (!w.has_rows) continue;
      if constexpr (kDecode) {
        if (w.c0 != 0 || w.c1 != p.C) {
          finish_part<T, TOKENS>(p, w, acc, warp, lane);
          continue;
        }
      }

      // Epilogue straight from the sums (the stages already hold the next
      // unit's copies): bias and one rounding, or, with K slices, the
      // slice's sums for wo_split_sum_kernel. A warp's store covers 8
      // consecutive rows of 4 tokens.
      const int64_t n_lo = int64_t(w.b) * kRows + 16 * warp + (lane >> 2), n_hi = n_lo + 8;
      float bias_lo = -0.f, bias_hi = -0.f;  // x + -0 is x, -0 included
      if (p.bias && p.splits == 1) {
        if (n_lo < p.N) bias_lo = load_bias(p.bias, p.bias_dtype, static_cast<int>(n_lo));
        if (n_hi < p.N) bias_hi = load_bias(p.bias, p.bias_dtype, static_cast<int>(n_hi));
      }
      const int64_t m_base = w.m0 + 2 * (lane & 3);
#pragma unroll
      for (int i = 0; i < TOKENS / 2; ++i) {  // one flat loop: the sums stay in registers
        const int64_t m = m_base + 8 * (i >> 2) + (i & 1), n = (i & 2) ? n_hi : n_lo;
        if (m >= p.M || n >= p.N) continue;
        if (p.splits > 1)
          p.partial[(int64_t(w.slice) * p.M + m) * p.N + n] = acc[i];
        else
          p.out[m * p.N + n] = T::from_float(acc[i] + ((i & 2) ? bias_hi : bias_lo));
      }
    }
  }
  // The peer's consumers arrive on this block's barriers until their last
  // chunk: neither block leaves while the other may still signal it.
  cluster_sync();
#else
  (void)x_map;
  (void)p;
  __trap();  // built without sm_90a code: vlmkern_int_act_sm90_available() is 0
#endif
}

template <int BITS, class T, bool TABLE, int TOKENS>
int launch_tokens(const CUtensorMap& x_map, const TmaParams& p, int64_t max_clusters,
                  cudaStream_t stream) {
  using S = TmaStage<BITS, TABLE, TOKENS>;
  auto kernel = weight_only_tma_kernel<BITS, T, TABLE, TOKENS>;
  // work for this many clusters at most: the tile walk's units, the decode walk's positions
  const int64_t pairs = (p.NB + 1) / 2;
  const int64_t units = TOKENS == kDecodeTokens ? pairs * p.C
                                                : (p.M + TOKENS - 1) / TOKENS * pairs * p.splits;
  static std::atomic<int> known[vlmkern_tma::kKnownDevices];
  int resident = 0;
  cudaError_t err = vlmkern_tma::max_active_clusters(known, &resident, kernel, kThreads, S::kSmem,
                                                     kCluster, stream);
  if (err == cudaSuccess && resident < 1) return VLMKERN_WO_ERR_SHARED_MEMORY;
  if (err == cudaSuccess)
    err = vlmkern_tma::launch_clusters(
        kernel, dim3(unsigned(kCluster * min(min(units, int64_t(resident)), max_clusters))),
        kThreads, S::kSmem, kCluster, stream, x_map, p);
  if (err == cudaSuccess && p.splits > 1) err = launch_split_sum<T>(p, stream);
  return err == cudaSuccess ? VLMKERN_WO_OK : launch_failed(err);
}

// The token tile: 16 tokens and the decode walk when decode_clusters > 0 (at
// most that many clusters), else 64 tokens for M <= 64 (decode-like batches
// pad less) and 128 above.
int tile_tokens(int64_t M, int64_t decode_clusters) {
  return decode_clusters > 0 ? kDecodeTokens : M <= kSmallTokens ? kSmallTokens : 2 * kSmallTokens;
}

template <int BITS, class T, bool TABLE = false>
int launch(const CUtensorMap& x_map, const TmaParams& p, int64_t decode_clusters, cudaStream_t stream) {
  constexpr int64_t kAny = INT64_MAX;
  switch (tile_tokens(p.M, decode_clusters)) {
    case kDecodeTokens:
      return launch_tokens<BITS, T, TABLE, kDecodeTokens>(x_map, p, decode_clusters, stream);
    case kSmallTokens: return launch_tokens<BITS, T, TABLE, kSmallTokens>(x_map, p, kAny, stream);
    default: return launch_tokens<BITS, T, TABLE, 2 * kSmallTokens>(x_map, p, kAny, stream);
  }
}

template <class T>
int dispatch_bits(const CUtensorMap& x_map, const TmaParams& p, int bits, int64_t decode_clusters,
                  cudaStream_t s) {
  switch (bits) {
    case 2: return launch<2, T>(x_map, p, decode_clusters, s);
    case 3: return launch<3, T>(x_map, p, decode_clusters, s);
    default: return launch<4, T>(x_map, p, decode_clusters, s);
  }
}

// The checks and set-up both launchers share: the x tensor map and the
// parameters, or the status code of the first failure.
int prepare(const void* x, int64_t M, int64_t K_x, const int32_t* wq, const int32_t* sz, int64_t NB,
            int64_t C, int slot_log2, int bits, const void* bias, int bias_dtype, void* out,
            int64_t N, int act_dtype, int splits, float* partial, int64_t decode_clusters,
            CUtensorMap* x_map, TmaParams* p) {
  const int status = check_launch_args(x, M, K_x, wq, sz, NB, C, slot_log2, bits, bias, bias_dtype,
                                       out, N, act_dtype);
  if (status != VLMKERN_WO_OK) return status;
  // TMA coordinates are 32-bit.
  const int tokens = tile_tokens(M, decode_clusters);
  if (M > 0x7fffffff - tokens || splits < 1 || splits > C || splits > 65535)
    return VLMKERN_WO_ERR_BAD_SIZE;
  if (splits > 1 && !partial) return VLMKERN_WO_ERR_NULL_POINTER;
  // the epilogue stores 16-bit outputs (checked above) and fp32 partial sums one by one
  if (reinterpret_cast<uintptr_t>(partial) % 4 != 0) return VLMKERN_WO_ERR_ALIGNMENT;
  // Without sm_90a code the kernel would trap and take the CUDA context with it.
  int built = 0;
  if (vlmkern_int_act_sm90_available(&built) != VLMKERN_INT_ACT_OK || !built)
    return VLMKERN_WO_ERR_NO_SM90A;
  // x as [M rows, K_x 16-bit columns], read in boxes of 64 columns (128-byte
  // rows) x the token rows one block of a cluster copies.
  const cudaError_t encoded = vlmkern_tma::encode_rows(x_map, CU_TENSOR_MAP_DATA_TYPE_UINT16, x, M,
                                                       K_x, K_x * 2, 64, tokens / kCluster);
  if (encoded != cudaSuccess) return launch_failed(encoded);
  p->wq = reinterpret_cast<const unsigned char*>(wq);
  p->sz = reinterpret_cast<const unsigned char*>(sz);
  p->bias = bias;
  p->out = static_cast<uint16_t*>(out);
  p->M = M;
  p->NB = static_cast<int>(NB);
  p->N = static_cast<int>(N);
  p->C = static_cast<int>(C);
  p->slot_log2 = slot_log2;
  p->slots = 8 >> slot_log2;
  p->bias_dtype = bias_dtype;
  p->merge = nullptr;
  p->splits = splits;
  p->partial = partial;
  p->ws = nullptr;
  p->counters = nullptr;
  return VLMKERN_WO_OK;
}

// The decode walk's extra arguments: M within the tile, the workspace and
// counters, the cluster cap.
int check_decode(int64_t M, const float* workspace, const int32_t* counters, int64_t max_clusters) {
  if (M > kDecodeTokens || max_clusters < 1 || max_clusters > 65535 / kCluster)
    return VLMKERN_WO_ERR_BAD_SIZE;
  if (!workspace || !counters) return VLMKERN_WO_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(workspace) % 4 != 0 || reinterpret_cast<uintptr_t>(counters) % 4 != 0)
    return VLMKERN_WO_ERR_ALIGNMENT;
  return VLMKERN_WO_OK;
}

}  // namespace

extern "C" int vlmkern_weight_only_tma(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                                       const int32_t* sz, int64_t NB, int64_t C, int slot_log2,
                                       int bits, const void* bias, int bias_dtype, void* out,
                                       int64_t N, int act_dtype, int splits, float* partial,
                                       void* stream) {
  CUtensorMap x_map;
  TmaParams p;
  const int status = prepare(x, M, K_x, wq, sz, NB, C, slot_log2, bits, bias, bias_dtype, out, N,
                             act_dtype, splits, partial, 0, &x_map, &p);
  if (status != VLMKERN_WO_OK) return status;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? dispatch_bits<F16>(x_map, p, bits, 0, s)
                                        : dispatch_bits<BF16>(x_map, p, bits, 0, s);
}

extern "C" int64_t vlmkern_wo_tma_decode_workspace_elems(int64_t M, int64_t NB, int64_t C,
                                                         int64_t max_clusters) {
  // the launch's clusters: never more than the walk's positions (see DecodeWalk)
  const int64_t clusters = max_clusters < (NB + 1) / 2 * C ? max_clusters : (NB + 1) / 2 * C;
  return 2 * clusters * kCluster * M * 128;
}

extern "C" int vlmkern_weight_only_tma_decode(const void* x, int64_t M, int64_t K_x,
                                              const int32_t* wq, const int32_t* sz, int64_t NB,
                                              int64_t C, int slot_log2, int bits, const void* bias,
                                              int bias_dtype, void* out, int64_t N, int act_dtype,
                                              float* workspace, int32_t* counters,
                                              int64_t max_clusters, void* stream) {
  int status = check_decode(M, workspace, counters, max_clusters);
  CUtensorMap x_map;
  TmaParams p;
  if (status == VLMKERN_WO_OK)
    status = prepare(x, M, K_x, wq, sz, NB, C, slot_log2, bits, bias, bias_dtype, out, N, act_dtype,
                     1, nullptr, max_clusters, &x_map, &p);
  if (status != VLMKERN_WO_OK) return status;
  p.ws = workspace;
  p.counters = counters;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? dispatch_bits<F16>(x_map, p, bits, max_clusters, s)
                                        : dispatch_bits<BF16>(x_map, p, bits, max_clusters, s);
}

extern "C" int vlmkern_binary_lut_tma(const void* x, int64_t M, int64_t K_x, const int32_t* codes,
                                      const int32_t* tables, const int32_t* merge, int64_t NB,
                                      int64_t C, const void* bias, int bias_dtype, void* out,
                                      int64_t N, int act_dtype, int splits, float* partial,
                                      void* stream) {
  if (!merge) return VLMKERN_WO_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(merge) % 16 != 0) return VLMKERN_WO_ERR_ALIGNMENT;
  // codes and tables have the byte sizes of 2-bit codes and 4 scale slots a tile
  CUtensorMap x_map;
  TmaParams p;
  const int status = prepare(x, M, K_x, codes, tables, NB, C, /*slot_log2=*/1, /*bits=*/2, bias,
                             bias_dtype, out, N, act_dtype, splits, partial, 0, &x_map, &p);
  if (status != VLMKERN_WO_OK) return status;
  p.merge = reinterpret_cast<const unsigned char*>(merge);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? launch<2, F16, true>(x_map, p, 0, s)
                                        : launch<2, BF16, true>(x_map, p, 0, s);
}

extern "C" int vlmkern_binary_lut_tma_decode(const void* x, int64_t M, int64_t K_x,
                                             const int32_t* codes, const int32_t* tables,
                                             const int32_t* merge, int64_t NB, int64_t C,
                                             const void* bias, int bias_dtype, void* out, int64_t N,
                                             int act_dtype, float* workspace, int32_t* counters,
                                             int64_t max_clusters, void* stream) {
  if (!merge) return VLMKERN_WO_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(merge) % 16 != 0) return VLMKERN_WO_ERR_ALIGNMENT;
  int status = check_decode(M, workspace, counters, max_clusters);
  CUtensorMap x_map;
  TmaParams p;
  if (status == VLMKERN_WO_OK)
    status = prepare(x, M, K_x, codes, tables, NB, C, /*slot_log2=*/1, /*bits=*/2, bias, bias_dtype,
                     out, N, act_dtype, 1, nullptr, max_clusters, &x_map, &p);
  if (status != VLMKERN_WO_OK) return status;
  p.merge = reinterpret_cast<const unsigned char*>(merge);
  p.ws = workspace;
  p.counters = counters;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? launch<2, F16, true>(x_map, p, max_clusters, s)
                                        : launch<2, BF16, true>(x_map, p, max_clusters, s);
}
