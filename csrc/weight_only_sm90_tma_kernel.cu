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
//   (64 tokens for M <= 64, with 7 stages instead of 4), K in 128-column
//   chunks (one layout chunk per stage). One producer warpgroup (one thread
//   issues the copies) and two consumer warpgroups, warpgroup g holding rows
//   64g..64g+63 as wgmma m64nNk16 A fragments (N: the token tile); N / 2
//   fp32 sums per thread.
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
//   cores instead of alternating with them.
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

constexpr int kSmallTokens = 64;      // token tile for M <= 64, 128 above
constexpr int kCluster = 2;           // thread blocks sharing one token tile
constexpr int kThreads = 384;         // producer warpgroup + two consumer warpgroups
constexpr int kScaleBytesMax = 8 * 8 * 64;       // 8 warps x 8 slots x 64 bytes (slot_log2 0)

// A stage: the token tile (two 64-column halves of TOKENS rows of 128
// bytes), one unit's codes, its scales (or, for the table decode, its
// tables: 4 scale slots a tile) and, for the table decode, the chunk's merge
// selectors. The 64-token tile halves a stage, so it gets more of them: at
// decode-like M the weight stream is what must be kept in flight.
template <int BITS, bool TABLE, int TOKENS>
struct TmaStage {
  static constexpr int kStages = TOKENS == kSmallTokens ? 7 : 4;
  static constexpr int kHalfBytes = TOKENS * 128;       // one 64-column half of the token tile
  static constexpr int kXBytes = 2 * kHalfBytes;
  static constexpr int kWeightBytes = 8 * 256 * BITS;  // one unit's codes
  static constexpr int kMergeOffset = kXBytes + kWeightBytes + kScaleBytesMax;
  static constexpr int kMergeBytes = TABLE ? 32 * 8 * 4 : 0;  // [32 lanes][8 steps] int32
  static constexpr int kBytes = (kMergeOffset + kMergeBytes + 1023) / 1024 * 1024;
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
};

// The A fragments of one warp's 16 x 128 tile of a chunk, one k16 step at a
// time, from the stage at `st`. The exact decode of 2/3/4-bit codes:
template <int BITS, class T, bool TABLE, int TOKENS>
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
  }
  __device__ __forceinline__ void step(int kt, uint32_t (&a)[4]) {
    if (kt == 0 || (kt & slot_mask) == 0) split_rows(slots[(kt >> slot_log2) * 8], s_lo, s_hi, z_lo, z_hi);
#pragma unroll
    for (int r = 0; r < 4; ++r)  // registers 0 and 2: row g; 1 and 3: row g + 8
      a[r] = exact_operand<BITS, T>(w, kt, r, (r & 1) ? s_hi : s_lo, (r & 1) ? z_hi : z_lo);
  }
};
// ... and the table decode of binarized weights (binary.h's lookup-table
// layout: codes as 2-bit codes, the rows' tables in the scale slots).
template <class T, int TOKENS>
struct ChunkDecode<2, T, true, TOKENS> {
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
  return w;
}
#endif  // VLMKERN_SM90A

// The decoded weights are the A operand (registers), the token tile the B
// operand: sum 4j + e of a thread holds weight row 16 * (warp in warpgroup)
// + lane / 4 + 8 * (e / 2) of its warpgroup's 64 and token 8j + 2 * (lane % 4)
// + e % 2. Launched in clusters of kCluster blocks along x (cudaLaunchKernelEx),
// at most as many as the GPU holds at once; cluster i takes units i,
// i + clusters, ... of the pairs * tiles * splits.
template <int BITS, class T, bool TABLE, int TOKENS>
__global__ void __launch_bounds__(kThreads, 1)
    weight_only_tma_kernel(const __grid_constant__ CUtensorMap x_map, TmaParams p) {
#if VLMKERN_SM90A
  using S = TmaStage<BITS, TABLE, TOKENS>;
  constexpr int kStages = S::kStages;
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
      const int64_t units = unit_count<TOKENS>(p);
      const int scale_bytes = 8 * p.slots * 64;
      int s = 0;
      uint32_t phase = 0;
      for (int64_t u = first; u < units; u += clusters) {
        const Unit w = unit_of<TOKENS>(u, p, rank);
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
    const int64_t units = unit_count<TOKENS>(p);
    int s = 0;
    uint32_t phase = 0;
    for (int64_t u = first; u < units; u += clusters) {
      const Unit w = unit_of<TOKENS>(u, p, rank);
      float acc[TOKENS / 2];
#pragma unroll
      for (int i = 0; i < TOKENS / 2; ++i) acc[i] = 0.f;
      for (int c = w.c0; c < w.c1; ++c) {
        mbar_wait(full + 8 * s, phase);
        if (w.has_rows) {  // a copy-only block only keeps the pipeline's count
          const unsigned char* st = smem + s * S::kBytes;
          const uint32_t xs = base + s * S::kBytes;
          ChunkDecode<BITS, T, TABLE, TOKENS> decode(st, p, warp, lane);
          uint32_t a[8][4];
          // Step kt's fragments are decoded while step kt - 1's MMA runs: each
          // step has its own registers, and the chunk's MMAs form one group,
          // waited for at the chunk's end. A wait or a commit between them, or
          // a group kept in flight across the loop's back edge, makes ptxas
          // serialize every MMA; while this warpgroup waits, the other one's
          // MMAs run.
          fence_operands(acc);
#pragma unroll
          for (int kt = 0; kt < 8; ++kt) {
            decode.step(kt, a[kt]);
            wgmma_fence();
            wgmma_k16(acc, a[kt], smem_desc(xs + (kt >> 2) * S::kHalfBytes + 32 * (kt & 3)), T{});
          }
          wgmma_commit();
          wgmma_wait<0>();  // this chunk's MMAs are done: free its stage in both blocks
          fence_operands(acc);
          fence_operands(a);
        }
        if (lane == 0)
          for (uint32_t cta = 0; cta < kCluster; ++cta) mbar_arrive_in(empty + 8 * s, cta);
        if (++s == kStages) {
          s = 0;
          phase ^= 1;
        }
      }
      if (!w.has_rows) continue;

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
int launch_tokens(const CUtensorMap& x_map, const TmaParams& p, cudaStream_t stream) {
  using S = TmaStage<BITS, TABLE, TOKENS>;
  auto kernel = weight_only_tma_kernel<BITS, T, TABLE, TOKENS>;
  const int64_t units = (p.M + TOKENS - 1) / TOKENS * ((p.NB + 1) / 2) * p.splits;
  static std::atomic<int> known[vlmkern_tma::kKnownDevices];
  int resident = 0;
  cudaError_t err = vlmkern_tma::max_active_clusters(known, &resident, kernel, kThreads, S::kSmem,
                                                     kCluster, stream);
  if (err == cudaSuccess && resident < 1) return VLMKERN_WO_ERR_SHARED_MEMORY;
  if (err == cudaSuccess)
    err = vlmkern_tma::launch_clusters(kernel, dim3(unsigned(kCluster * min(units, int64_t(resident)))),
                                       kThreads, S::kSmem, kCluster, stream, x_map, p);
  if (err == cudaSuccess && p.splits > 1) err = launch_split_sum<T>(p, stream);
  return err == cudaSuccess ? VLMKERN_WO_OK : launch_failed(err);
}

// The token tile: 64 tokens for M <= 64 (decode-like batches pad less), else 128.
template <int BITS, class T, bool TABLE = false>
int launch(const CUtensorMap& x_map, const TmaParams& p, cudaStream_t stream) {
  return p.M <= kSmallTokens ? launch_tokens<BITS, T, TABLE, kSmallTokens>(x_map, p, stream)
                             : launch_tokens<BITS, T, TABLE, 2 * kSmallTokens>(x_map, p, stream);
}

template <class T>
int dispatch_bits(const CUtensorMap& x_map, const TmaParams& p, int bits, cudaStream_t s) {
  switch (bits) {
    case 2: return launch<2, T>(x_map, p, s);
    case 3: return launch<3, T>(x_map, p, s);
    default: return launch<4, T>(x_map, p, s);
  }
}

// The checks and set-up both launchers share: the x tensor map and the
// parameters, or the status code of the first failure.
int prepare(const void* x, int64_t M, int64_t K_x, const int32_t* wq, const int32_t* sz, int64_t NB,
            int64_t C, int slot_log2, int bits, const void* bias, int bias_dtype, void* out,
            int64_t N, int act_dtype, int splits, float* partial, CUtensorMap* x_map,
            TmaParams* p) {
  const int status = check_launch_args(x, M, K_x, wq, sz, NB, C, slot_log2, bits, bias, bias_dtype,
                                       out, N, act_dtype);
  if (status != VLMKERN_WO_OK) return status;
  // TMA coordinates are 32-bit.
  const int tokens = M <= kSmallTokens ? kSmallTokens : 2 * kSmallTokens;
  if (M > 0x7fffffff - tokens || splits < 1 || splits > C || splits > 65535)
    return VLMKERN_WO_ERR_BAD_SIZE;
  if (splits > 1 && !partial) return VLMKERN_WO_ERR_NULL_POINTER;
  // the epilogue stores 16-bit outputs and fp32 partial sums one by one
  if (reinterpret_cast<uintptr_t>(out) % 2 != 0 || reinterpret_cast<uintptr_t>(partial) % 4 != 0)
    return VLMKERN_WO_ERR_ALIGNMENT;
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
                             act_dtype, splits, partial, &x_map, &p);
  if (status != VLMKERN_WO_OK) return status;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? dispatch_bits<F16>(x_map, p, bits, s)
                                        : dispatch_bits<BF16>(x_map, p, bits, s);
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
                             bias_dtype, out, N, act_dtype, splits, partial, &x_map, &p);
  if (status != VLMKERN_WO_OK) return status;
  p.merge = reinterpret_cast<const unsigned char*>(merge);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? launch<2, F16, true>(x_map, p, s)
                                        : launch<2, BF16, true>(x_map, p, s);
}
