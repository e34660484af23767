// Integer-activation GEMM on Hopper for prefill (sm_90a): per-channel weights
// stored as int8 (mode I8 with one group: W8A8, W6A6), warp-specialized, with
// both operand tiles brought in by TMA and the weight tile shared by a
// cluster of two thread blocks. The launcher and the argument checks are
// vlmkern_int_act_gemm's (int_act.h, gemm = VLMKERN_INT_ACT_GEMM_TMA); the
// sums are the same exact int32 dot products, finished with the same
// rounding steps, so the result equals the mma.sync kernel's bit for bit.
//
// Why this shape. The plain wgmma kernel (int_act_sm90_kernel.cu) copies its
// tiles with cp.async from all 256 threads and reads 48 KB from L2 for each
// 128 x 256 x 128 step of MMAs; on an H100 it reached about 560 TOPS on both
// Qwen2-VL shapes, including one whose weights fit in L2, which points at the
// L2 -> SM traffic and the copy instructions rather than at DRAM.
//
// - Tiles: 128 tokens x 256 channels per thread block, K in 128-byte steps.
//   One producer warpgroup (one thread issues the copies) and two consumer
//   warpgroups, each running wgmma m64n128k32 (s8 x s8 -> s32) twice per
//   k32 step for its 64 tokens: 128 int32 sums per thread.
// - Copies: cp.async.bulk.tensor (TMA) with the 128-byte swizzle, which is
//   the K-major layout the wgmma descriptors name. Zero fill past M, N and
//   the padded row comes from the copy engine.
// - Cluster: the two thread blocks of a cluster hold adjacent token tiles
//   and the same 256 channels. Each loads half of the weight tile and
//   multicasts it to both, so a block reads 32 KB from L2 per step, not 48.
// - Pipeline: 4 stages of 48 KB, a "full" mbarrier per stage (the producer's
//   expected bytes, completed by the copies of both blocks) and an "empty"
//   one (one arrival per consumer warp of both blocks, since the peer's
//   multicast writes into this block's stage too).
// - Registers: the producer warpgroup gives registers back (setmaxnreg), so
//   the consumers can hold their sums.
// - Persistent: one cluster per pair of SMs that can hold one at a time
//   (cudaOccupancyMaxActiveClusters), each walking the (token-tile pair,
//   channel tile) grid with token tiles fastest, so a weight tile stays in
//   L2 while the token tiles pass. The stage and phase counters run on
//   across tiles: while the consumers finish one tile, the producer already
//   fills the stages with the next tile's first steps, and no block pays a
//   launch, barrier set-up or pipeline fill per tile.
// - Epilogue: through a shared-memory tile of its own (a quarter of the
//   channels at a time, 32 KB, 16-byte pieces swizzled by row), so it never
//   waits for, or blocks, the next tile's copies; store_outputs' rounding,
//   16-byte stores.
//
// Compiled to real code only for sm_90a; other targets get a kernel that
// traps, and the launcher runs only where vlmkern_int_act_sm90_available says
// the build holds sm_90a code.

#include <cuda_runtime.h>
#include <stdint.h>

#include "int_act_common.cuh"
#include "sm90_wgmma.cuh"
#include "tma_host.cuh"

namespace {

using namespace vlmkern_int_act;
#if VLMKERN_SM90A
using namespace vlmkern_sm90;
#endif

constexpr int kBM = 128;              // tokens per thread block: two consumer warpgroups of 64
constexpr int kBN = 256;              // channels per thread block
constexpr int kBK = 128;              // bytes of K per stage: one swizzle row
constexpr int kStages = 4;
constexpr int kCluster = 2;           // thread blocks sharing one weight tile
constexpr int kThreads = 384;         // producer warpgroup + two consumer warpgroups
constexpr int kATile = kBM * kBK;                // 16 KB of activation codes
constexpr int kBTile = kBN * kBK;                // 32 KB of weight codes
constexpr int kBPartRows = kBN / kCluster;       // the weight rows one block copies for both
constexpr int kStage = kATile + kBTile;
constexpr int kOutCols = kBN / 4;     // channels the epilogue tile holds at a time
constexpr int kOutTile = kStages * kStage;       // offset of the epilogue tile: [kBM][kOutCols] fp32
constexpr int kBarriers = kOutTile + kBM * kOutCols * 4;  // offset of the mbarriers
constexpr int kSmem = kBarriers + 2 * kStages * 8 + 1024;  // + slack to align tiles to 1024 B
static_assert(kSmem <= 227 * 1024, "a block's shared memory fits an sm_90 SM");

#if VLMKERN_SM90A
constexpr int kConsumerWarps = 8;
constexpr int kBPart = kBTile / kCluster;
#endif  // VLMKERN_SM90A

// Accumulator layout (PTX wgmma D, as mma.sync m16n8 repeated along N): sum
// 4j + e of half h holds token 16 * (warp in warpgroup) + lane / 4 + 8 * (e / 2)
// of its warpgroup's 64 and channel 128h + 8j + 2 * (lane % 4) + e % 2.
// Launched in clusters of kCluster blocks along x (cudaLaunchKernelEx), at
// most as many as fit on the GPU at once.
__global__ void __launch_bounds__(kThreads, 1)
    int_act_tma_kernel(const __grid_constant__ CUtensorMap q_map,
                       const __grid_constant__ CUtensorMap w_map, GemmArgs p) {
#if VLMKERN_SM90A
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t full = base + kBarriers, empty = full + kStages * 8;
  const int tid = threadIdx.x, wg = tid >> 7;
  const uint32_t rank = cluster_rank();
  const int k_tiles = int((p.k_tiles * 64 + kBK - 1) / kBK);
  // Tile t of this cluster's walk: channel tile t / pairs, token tiles
  // 2 (t % pairs) and + 1 (this block: + rank).
  const int64_t pairs = (p.M + kCluster * kBM - 1) / (kCluster * kBM);
  const int64_t tiles = pairs * ((p.N + kBN - 1) / kBN);
  const int64_t first = blockIdx.x / kCluster, clusters = gridDim.x / kCluster;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);                             // the producer's expect_tx
      mbar_init(empty + 8 * s, kConsumerWarps * kCluster);    // every consumer warp of both blocks
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster_sync();  // the peer multicasts into this block's barriers only once they exist

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid == 0) {
      int s = 0;
      uint32_t phase = 0;
      for (int64_t t = first; t < tiles; t += clusters) {
        const int m0 = int((t % pairs * kCluster + rank) * kBM), n0 = int(t / pairs * kBN);
        for (int kt = 0; kt < k_tiles; ++kt) {
          mbar_wait(empty + 8 * s, phase ^ 1);  // the first round finds every stage free
          const uint32_t stage = base + s * kStage, bar = full + 8 * s;
          mbar_expect_bytes(bar, kStage);       // A, this block's half of B and the peer's
          tma_load(stage, &q_map, kt * kBK, m0, bar);
          tma_load_multicast(stage + kATile + rank * kBPart, &w_map, kt * kBK,
                             n0 + int(rank) * kBPartRows, bar, uint16_t((1u << kCluster) - 1));
          if (++s == kStages) {
            s = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int c = wg - 1, lane = tid & 31;
    // this thread's first token of the tile (and + 8) and first channel
    const int row = 64 * c + 16 * ((tid >> 5) & 3) + (lane >> 2), col = 2 * (lane & 3);
    int s = 0;
    uint32_t phase = 0;
    for (int64_t t = first; t < tiles; t += clusters) {
      const int64_t m0 = (t % pairs * kCluster + rank) * kBM, n0 = t / pairs * kBN;
      int32_t acc[2][64];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[h][i] = 0;
      int prev = 0;
      for (int kt = 0; kt < k_tiles; ++kt) {
        mbar_wait(full + 8 * s, phase);
        const uint32_t stage = base + s * kStage;
        const uint64_t desc_a = smem_desc(stage + c * 64 * kBK), desc_b = smem_desc(stage + kATile);
#pragma unroll
        for (int h = 0; h < 2; ++h) fence_operands(acc[h]);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < kBK / 32; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            wgmma_m64n128k32(acc[h], desc_a + 2 * j, desc_b + h * (128 * kBK >> 4) + 2 * j, true);
        wgmma_commit();
#pragma unroll
        for (int h = 0; h < 2; ++h) fence_operands(acc[h]);
        wgmma_wait<1>();  // the previous stage's MMAs are done: release it in both blocks
        if (kt > 0 && lane == 0)
          for (uint32_t cta = 0; cta < kCluster; ++cta) mbar_arrive_in(empty + 8 * prev, cta);
        prev = s;
        if (++s == kStages) {
          s = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();  // the tile's last stage: release it too
#pragma unroll
      for (int h = 0; h < 2; ++h) fence_operands(acc[h]);
      if (lane == 0)
        for (uint32_t cta = 0; cta < kCluster; ++cta) mbar_arrive_in(empty + 8 * prev, cta);

      // Epilogue, a quarter of the channels at a time: each consumer thread
      // writes 0 + acc * w_scale (the per-channel group, as the mma.sync
      // kernel folds it) into the [128][64] fp32 tile, 16-byte piece i of row
      // r at piece i ^ (r % 8); then consecutive threads finish consecutive
      // runs of 8 columns of a row (token scale, bias and cast as in
      // store_outputs, one 16-byte store each).
      float* tile = reinterpret_cast<float*>(smem_raw + (base + kOutTile - smem_addr(smem_raw)));
      const int rows = int(min(int64_t(kBM), p.M - m0));
#pragma unroll
      for (int q = 0; q < kBN / kOutCols; ++q) {
        consumers_sync();  // the tile's last readers (previous quarter or tile) are done
#pragma unroll
        for (int jj = 0; jj < kOutCols / 8; ++jj) {
          const int h = q >> 1, j = 8 * (q & 1) + jj, lc = 8 * jj + col;  // lc: column in the quarter
          const int64_t n = n0 + 128 * h + 8 * j + col;
          const float s0 = p.w_scale[min(n, p.N - 1)], s1 = p.w_scale[min(n + 1, p.N - 1)];
          const int at = ((lc >> 2) ^ (row & 7)) * 4 + (lc & 3);  // rows row and row + 8 alike
          *reinterpret_cast<float2*>(tile + row * kOutCols + at) =
              make_float2(__fmaf_rn(__int2float_rn(acc[h][4 * j]), s0, 0.f),
                          __fmaf_rn(__int2float_rn(acc[h][4 * j + 1]), s1, 0.f));
          *reinterpret_cast<float2*>(tile + (row + 8) * kOutCols + at) =
              make_float2(__fmaf_rn(__int2float_rn(acc[h][4 * j + 2]), s0, 0.f),
                          __fmaf_rn(__int2float_rn(acc[h][4 * j + 3]), s1, 0.f));
        }
        consumers_sync();
#pragma unroll 1
        for (int idx = tid - 128; idx < rows * (kOutCols / 8); idx += 2 * 128) {
          const int r = idx / (kOutCols / 8), g = idx % (kOutCols / 8);
          const float4 lo = *reinterpret_cast<const float4*>(tile + r * kOutCols + ((2 * g) ^ (r & 7)) * 4);
          const float4 hi =
              *reinterpret_cast<const float4*>(tile + r * kOutCols + ((2 * g + 1) ^ (r & 7)) * 4);
          const float y[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
          store_outputs8(p, m0 + r, n0 + kOutCols * q + 8 * g, y, p.sx[m0 + r]);
        }
      }
    }
  }
  // The peer's consumers arrive on this block's barriers until their last
  // stage: neither block leaves while the other may still signal it.
  cluster_sync();
#else
  (void)q_map;
  (void)w_map;
  (void)p;
  __trap();  // built without sm_90a code: vlmkern_int_act_sm90_available() is 0
#endif
}

static_assert(kBPartRows == kBM, "one box shape serves the activation and weight maps");

}  // namespace

namespace vlmkern_int_act {

int launch_gemm_sm90_tma(const GemmArgs& args, cudaStream_t stream) {
  const int64_t row_bytes = args.k_tiles * 64;
  const int64_t m_tiles = (args.M + kBM - 1) / kBM, n_tiles = (args.N + kBN - 1) / kBN;
  // TMA coordinates are 32-bit; a cluster needs an even number of token tiles.
  if (args.M > INT32_MAX - 2 * kBM || args.N > INT32_MAX - kBN) return VLMKERN_INT_ACT_ERR_BAD_SIZE;
  // Both as [rows, row_bytes] int8, read in 128 x 128-byte boxes.
  CUtensorMap q_map, w_map;
  cudaError_t err = vlmkern_tma::encode_rows(&q_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, args.q, args.M,
                                             row_bytes, row_bytes, kBK, kBPartRows);
  if (err == cudaSuccess)
    err = vlmkern_tma::encode_rows(&w_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, args.w, args.N,
                                   row_bytes, row_bytes, kBK, kBPartRows);
  // One cluster per tile up to what the GPU holds at once; they walk the rest.
  const int64_t tiles = (m_tiles + kCluster - 1) / kCluster * n_tiles;
  static std::atomic<int> known[vlmkern_tma::kKnownDevices];
  int resident = 0;
  if (err == cudaSuccess)
    err = vlmkern_tma::max_active_clusters(known, &resident, int_act_tma_kernel, kThreads, kSmem,
                                           kCluster, stream);
  if (err == cudaSuccess && resident < 1) err = cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(kCluster * (tiles < resident ? tiles : resident)));
  if (err == cudaSuccess)
    err = vlmkern_tma::launch_clusters(int_act_tma_kernel, grid, kThreads, kSmem, kCluster, stream,
                                       q_map, w_map, args);
  if (err != cudaSuccess) {
    last_launch_error = err;
    return VLMKERN_INT_ACT_ERR_LAUNCH;
  }
  return VLMKERN_INT_ACT_OK;
}

}  // namespace vlmkern_int_act
