// Weight-only matmul on Hopper's warpgroup MMA (sm_90a), for batches and
// prefill: y[M, N] = x[M, K] @ W[N, K]^T + bias, W in 2, 3 or 4 bits, any M.
//
// The weight stays in the load-time layout of the mma.sync kernel
// (weight_only.h): a 16 x 128 tile per warp, its codes in the order a warp
// holds m16n8k16 A fragments. The wgmma A operand from registers has that
// same per-warp layout (warp w of a warpgroup holds rows 16w..16w+15), so a
// warp decodes its tile exactly as the mma.sync kernel does, s * (q - z)
// rounded once to the activation type, and hands the registers to
// wgmma.mma_async m64nNk16. The activations are the B operand, read by the
// MMA from shared memory through a matrix descriptor.
//
// Tiles: a thread block of two warpgroups owns one 128-row weight block
// (warpgroup g its rows 64g..64g+63) and N tokens (64 for M <= 64, where two
// blocks fit an SM, else 128), and walks K in chunks of 128 columns, one
// layout chunk per stage. A stage holds the tokens'
// 128 columns as two 64-column halves of 128-byte-swizzled rows (16-byte
// piece c of token row r at piece c ^ (r % 8): the K-major canonical layout
// the descriptor names, each k16 step the same descriptor advanced by 32
// bytes), then the block's codes and scales.
//
// The decoded fragments are the MMA's A operand, in registers. A 4-stage
// cp.async pipeline runs three chunks ahead; a warpgroup decodes a chunk only
// when its previous MMAs are done, since fragments written while MMAs are in
// flight make ptxas serialize every MMA, so decoding and MMAs overlap only
// across the two warpgroups, as far as the barrier allows. (Decoding into a
// shared-memory A tile instead, so that a chunk is decoded while the last
// one's MMAs run, measured slower on an H100 at M = 64 and 4096.)
// The epilogue goes through shared memory so the stores are coalesced.
//
// The grid is (token tiles, row blocks, K slices): consecutive thread blocks
// share a weight block, which is read from DRAM about once while it sits in
// L2. With more than one K slice (split-K, for grids too small to fill the
// GPU) each slice writes fp32 partial sums and wo_split_sum_kernel adds them
// in slice order.
//
// Compiled to real code only for sm_90a (wgmma is an arch-specific feature);
// other targets get a kernel that traps. Every kernel file is built for the
// same architectures, so vlmkern_int_act_sm90_available's probe says whether
// this build holds sm_90a code for the current device, for this file too.

#include <cuda_runtime.h>
#include <stdint.h>

#include "int_act.h"  // vlmkern_int_act_sm90_available: the build's sm_90a probe
#include "sm90_wgmma.cuh"
#include "weight_only.h"
#include "weight_only_common.cuh"
#include "weight_only_wgmma.cuh"

namespace {

using namespace vlmkern_wo;
#if VLMKERN_SM90A
using namespace vlmkern_sm90;
#endif

constexpr int kThreads = 256;          // two warpgroups
constexpr int kBlockRows = 128;        // weight rows per thread block: one layout block
constexpr int kPitch = kBlockRows + 4;     // epilogue tile row (floats): conflict-free writes

// A token tile of TOKENS (the wgmma N: 64 for M <= 64, else 128).
template <int TOKENS>
struct TokenTile {
  static constexpr int kHalfBytes = TOKENS * 128;  // one 64-column half
  static constexpr int kXBytes = 2 * kHalfBytes;
};

struct WgParams {
  const uint16_t* x;        // [M, ldx]
  const unsigned char* wq;  // [NB, C, 8, 64*bits] int32
  const unsigned char* sz;  // [NB, C, 8, slots, 8, 2] int32
  const void* bias;         // [N] or null
  uint16_t* out;            // [M, N]
  int64_t M;
  int ldx, N, C;
  int slot_log2, slots, bias_dtype;
  int splits;               // K slices (grid z); > 1: fp32 partial sums go to `partial`
  float* partial;           // [splits, M, N]
};

// Shared memory of one thread block: kStages stages (token tile, codes,
// scales).
template <int BITS, int TOKENS>
struct Sm90Stage {
  static constexpr int kStages = 4;
  static constexpr int kXBytes = TokenTile<TOKENS>::kXBytes;
  static constexpr int kWeightBytes = 8 * 256 * BITS;
  // Stages start 1024-byte aligned, as the swizzle pattern requires.
  __host__ __device__ static constexpr int bytes(int slots) {
    return (kXBytes + kWeightBytes + 8 * slots * 64 + 1023) / 1024 * 1024;
  }
  __host__ __device__ static constexpr int smem(int slots) {
    return kStages * bytes(slots) + 1024;  // + slack to align
  }
  static_assert(TOKENS * kPitch * 4 <= kStages * kXBytes, "the epilogue tile fits the stages");
};

#if VLMKERN_SM90A
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// This thread's copies of successive chunks of one thread block: token rows
// row0 + 16r (r < TOKENS / 16) at one 16-byte piece, whose swizzled place is the same
// for every r (16r is a multiple of 8), one weight piece or two, and one
// scale piece. What does not change from chunk to chunk is computed once.
template <int BITS, int TOKENS>
struct ChunkStream {
  static constexpr int kHalfBytes = TokenTile<TOKENS>::kHalfBytes;
  static constexpr int kXBytes = TokenTile<TOKENS>::kXBytes;
  static constexpr int kWeightBytes = 8 * 256 * BITS;
  static constexpr int kWeightPieces = kWeightBytes / 16;
  static constexpr int kChunk = 128;  // columns per chunk: one layout chunk

  const uint16_t* x;         // token row0 at column 0 (row clamped below M)
  const uint16_t* x_any;     // a valid address for zero-filled pieces
  int64_t x_step;            // 16 token rows, in elements
  const unsigned char* w;    // this thread's first weight piece of the next chunk
  const unsigned char* sz;   // its scale piece of the next chunk
  int col;                   // the piece's first column in the next chunk
  int ldx, scale_bytes;
  uint32_t x_dst, w_dst;     // offsets in a stage
  uint32_t rows_in;          // bit r: token row0 + 16r < M
  uint32_t copies_scale;     // 0 or 1

  // Starting at chunk c0 of row block b and token m0.
  __device__ __forceinline__ ChunkStream(const WgParams& p, int64_t b, int64_t m0, int c0) {
    const int tid = threadIdx.x, row0 = tid >> 4, piece = tid & 15;
    const int64_t first = m0 + row0 < p.M ? m0 + row0 : p.M - 1;
    x = p.x + first * p.ldx;   // the piece's column is in `col`
    x_any = p.x;
    x_step = int64_t(16) * p.ldx;
    ldx = p.ldx;
    col = c0 * kChunk + piece * 8;
    rows_in = 0;
#pragma unroll
    for (int r = 0; r < TOKENS / 16; ++r) rows_in |= uint32_t(m0 + row0 + 16 * r < p.M) << r;
    rows_in = opaque(rows_in);
    scale_bytes = 8 * p.slots * 64;  // 8 warps x slots x 64 bytes
    w = p.wq + (b * p.C + c0) * kWeightBytes + 16 * tid;
    sz = p.sz + (b * p.C + c0) * scale_bytes + 16 * tid;
    copies_scale = opaque(16 * tid < scale_bytes);
    x_dst = opaque((piece >> 3) * kHalfBytes + row0 * 128 + (((piece & 7) ^ (row0 & 7)) << 4));
    w_dst = opaque(kXBytes + 16 * tid);
  }

  // Enqueue the next chunk into the stage at shared address `stage`; tokens
  // >= M and columns >= ldx are zero-filled.
  __device__ __forceinline__ void load(uint32_t stage) const {
    const bool in_k = col < ldx;
#pragma unroll
    for (int r = 0; r < TOKENS / 16; ++r) {
      const bool ok = in_k && ((rows_in >> r) & 1u);
      cp_async16(stage + x_dst + r * 16 * 128, ok ? x + r * x_step + col : x_any, ok ? 16 : 0);
    }
    copy_pieces<kWeightPieces, kThreads>(stage + w_dst, w, w_dst - kXBytes);
    cp_async16_if(copies_scale, stage + w_dst + kWeightBytes, sz, 16);
  }

  __device__ __forceinline__ void advance() {
    col += kChunk;
    w += kWeightBytes;
    sz += scale_bytes;
  }
};

// This warp's A fragments of the chunk in `stage` (generic pointer), all 8
// k16 steps, decoded as s * (q - z).
template <int BITS, class T, int TOKENS>
__device__ __forceinline__ void decode_chunk(const WgParams& p, const unsigned char* stage,
                                             uint32_t (&a)[8][4]) {
  constexpr int kXBytes = TokenTile<TOKENS>::kXBytes;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t w[2 * BITS];
  load_lane_words<BITS>(stage + kXBytes + warp * 256 * BITS, lane, w);
  const uint2* slots = reinterpret_cast<const uint2*>(stage + kXBytes + 8 * 256 * BITS) +
                       warp * p.slots * 8 + (lane >> 2);
  const int slot_mask = (1 << p.slot_log2) - 1;
  uint32_t s_lo = 0, s_hi = 0, z_lo = 0, z_hi = 0;
#pragma unroll
  for (int kt = 0; kt < 8; ++kt) {
    if (kt == 0 || (kt & slot_mask) == 0) split_rows(slots[(kt >> p.slot_log2) * 8], s_lo, s_hi, z_lo, z_hi);
#pragma unroll
    for (int r = 0; r < 4; ++r)  // registers 0 and 2: row g; 1 and 3: row g + 8
      a[kt][r] = exact_operand<BITS, T>(w, kt, r, (r & 1) ? s_hi : s_lo, (r & 1) ? z_hi : z_lo);
  }
}
#endif  // VLMKERN_SM90A

// Accumulator layout (PTX wgmma D, as mma.sync m16n8 repeated along N): sum
// 4j + e of a thread holds weight row 16 * (warp in warpgroup) + lane / 4 +
// 8 * (e / 2) of its warpgroup's 64 and token 8j + 2 * (lane % 4) + e % 2.
// TOKENS = 64 leaves room for two thread blocks per SM (registers and
// shared memory), 128 for one.
template <int BITS, class T, int TOKENS>
__global__ void __launch_bounds__(kThreads, TOKENS == 64 ? 2 : 1)
weight_only_wgmma_kernel(WgParams p) {
#if VLMKERN_SM90A
  using S = Sm90Stage<BITS, TOKENS>;
  constexpr int kStages = S::kStages;
  constexpr int kHalfBytes = TokenTile<TOKENS>::kHalfBytes;
  constexpr int kSums = TOKENS / 2;  // fp32 sums per thread
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const int stage_bytes = S::bytes(p.slots);
  const int64_t b = blockIdx.y;                       // weight row block
  const int64_t m0 = int64_t(blockIdx.x) * TOKENS;  // first token
  // K slice blockIdx.z: chunks [c0, c0 + n_chunks), never empty (splits <= C)
  const int c0 = static_cast<int>(int64_t(blockIdx.z) * p.C / p.splits);
  const int n_chunks = static_cast<int>(int64_t(blockIdx.z + 1) * p.C / p.splits) - c0;
  ChunkStream<BITS, TOKENS> stream(p, b, m0, c0);
  float acc[kSums];
#pragma unroll
  for (int i = 0; i < kSums; ++i) acc[i] = 0.f;

  // Each chunk's MMAs finish before the next chunk is decoded: fragments
  // written while an MMA is in flight make ptxas serialize every MMA.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_chunks) {
      stream.load(base + s * stage_bytes);
      stream.advance();
    }
    cp_async_commit();  // empty groups keep the group count uniform
  }
  for (int c = 0; c < n_chunks; ++c) {
    cp_async_wait<kStages - 2>();  // chunk c has landed (this thread's copies)
    fence_proxy_async();
    __syncthreads();  // ... everyone's; and chunk c - 1's MMAs are done, its stage is free
    if (c + kStages - 1 < n_chunks) {
      stream.load(base + ((c + kStages - 1) % kStages) * stage_bytes);
      stream.advance();
    }
    cp_async_commit();

    const int stage = c % kStages;
    uint32_t a[8][4];
    decode_chunk<BITS, T, TOKENS>(p, smem + stage * stage_bytes, a);
    const uint32_t xs = base + stage * stage_bytes;
    fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < 8; ++kt)
      wgmma_k16(acc, a[kt], smem_desc(xs + (kt >> 2) * kHalfBytes + 32 * (kt & 3)), T{});
    wgmma_commit();
    wgmma_wait<0>();  // the fragments and the stage are in use until then
    fence_operands(acc);
    fence_operands(a);
  }
  cp_async_wait<0>();
  __syncthreads();  // every MMA has read its tiles: shared memory is free

  // Epilogue: sums into a [token][row] fp32 tile, then consecutive threads
  // finish consecutive row pairs of a token (bias, one rounding, store).
  float* tile = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = 64 * (warp >> 2) + 16 * (warp & 3) + (lane >> 2);
  const int token = 2 * (lane & 3);
#pragma unroll
  for (int j = 0; j < TOKENS / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      tile[(8 * j + token + (e & 1)) * kPitch + row + 8 * (e >> 1)] = acc[4 * j + e];
  __syncthreads();

  const int64_t tokens = p.M - m0 < TOKENS ? p.M - m0 : TOKENS;
  const int64_t n_base = b * kBlockRows;
  const bool pairs = p.N % 2 == 0;  // rows of out start 4-byte aligned
#pragma unroll 1
  for (int idx = threadIdx.x; idx < tokens * (kBlockRows / 2); idx += kThreads) {
    const int t = idx / (kBlockRows / 2), r = 2 * (idx % (kBlockRows / 2));
    const int64_t n = n_base + r;
    if (n >= p.N) continue;
    float v0 = tile[t * kPitch + r], v1 = tile[t * kPitch + r + 1];
    const bool second = n + 1 < p.N;
    if (p.splits > 1) {  // this slice's sums; wo_split_sum_kernel finishes them
      float* part = p.partial + (int64_t(blockIdx.z) * p.M + m0 + t) * p.N + n;
      part[0] = v0;
      if (second) part[1] = v1;
      continue;
    }
    uint16_t* dst = p.out + (m0 + t) * p.N + n;
    if (p.bias) {
      v0 += load_bias(p.bias, p.bias_dtype, static_cast<int>(n));
      if (second) v1 += load_bias(p.bias, p.bias_dtype, static_cast<int>(n + 1));
    }
    if (pairs && second) {
      *reinterpret_cast<uint32_t*>(dst) =
          uint32_t(T::from_float(v0)) | (uint32_t(T::from_float(v1)) << 16);
    } else {
      dst[0] = T::from_float(v0);
      if (second) dst[1] = T::from_float(v1);
    }
  }
#else
  (void)p;
  __trap();  // built without sm_90a code: vlmkern_int_act_sm90_available() is 0
#endif
}

template <int BITS, class T, int TOKENS>
int launch(const WgParams& p, int64_t NB, cudaStream_t stream) {
  auto kernel = weight_only_wgmma_kernel<BITS, T, TOKENS>;
  const int smem = Sm90Stage<BITS, TOKENS>::smem(p.slots);
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return launch_failed(err);
  if (smem > limit) return VLMKERN_WO_ERR_SHARED_MEMORY;
  // set for the most scale slots, not this launch's: concurrent launches with
  // other group sizes then never lower it beneath one another's
  const int most = Sm90Stage<BITS, TOKENS>::smem(8);
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             most < limit ? most : limit);
  if (err != cudaSuccess) return launch_failed(err);
  const dim3 grid(static_cast<unsigned>((p.M + TOKENS - 1) / TOKENS), static_cast<unsigned>(NB),
                  static_cast<unsigned>(p.splits));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err == cudaSuccess && p.splits > 1) err = launch_split_sum<T>(p, stream);
  return err == cudaSuccess ? VLMKERN_WO_OK : launch_failed(err);
}

// The explicit list of instantiations: bits {2, 3, 4} x {fp16, bf16} x
// token tiles {64 (M <= 64), 128}.
template <class T, int TOKENS>
int dispatch_bits(const WgParams& p, int bits, int64_t NB, cudaStream_t s) {
  switch (bits) {
    case 2: return launch<2, T, TOKENS>(p, NB, s);
    case 3: return launch<3, T, TOKENS>(p, NB, s);
    case 4: return launch<4, T, TOKENS>(p, NB, s);
    default: return VLMKERN_WO_ERR_BAD_BITS;
  }
}

template <class T>
int dispatch_tokens(const WgParams& p, int bits, int64_t NB, cudaStream_t s) {
  return p.M <= 64 ? dispatch_bits<T, 64>(p, bits, NB, s) : dispatch_bits<T, 128>(p, bits, NB, s);
}

}  // namespace

extern "C" int vlmkern_weight_only_wgmma(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                                         const int32_t* sz, int64_t NB, int64_t C, int slot_log2,
                                         int bits, const void* bias, int bias_dtype, void* out,
                                         int64_t N, int act_dtype, int splits,
                                         float* partial, void* stream) {
  const int status = check_launch_args(x, M, K_x, wq, sz, NB, C, slot_log2, bits, bias, bias_dtype,
                                       out, N, act_dtype);
  if (status != VLMKERN_WO_OK) return status;
  if (NB > 65535 || (M + 63) / 64 > 0x7fffffff) return VLMKERN_WO_ERR_BAD_SIZE;  // grid limits
  if (splits < 1 || splits > C || splits > 65535) return VLMKERN_WO_ERR_BAD_SIZE;
  if (splits > 1 && !partial) return VLMKERN_WO_ERR_NULL_POINTER;
  // the epilogue stores output pairs as 32-bit words when N is even, fp32 partial sums singly
  if ((N % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 != 0) ||
      reinterpret_cast<uintptr_t>(partial) % 4 != 0)
    return VLMKERN_WO_ERR_ALIGNMENT;
  // Without sm_90a code the kernel would trap and take the CUDA context with it.
  int built = 0;
  if (vlmkern_int_act_sm90_available(&built) != VLMKERN_INT_ACT_OK || !built)
    return VLMKERN_WO_ERR_NO_SM90A;

  WgParams p;
  p.x = static_cast<const uint16_t*>(x);
  p.wq = reinterpret_cast<const unsigned char*>(wq);
  p.sz = reinterpret_cast<const unsigned char*>(sz);
  p.bias = bias;
  p.out = static_cast<uint16_t*>(out);
  p.M = M;
  p.ldx = static_cast<int>(K_x);
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.slot_log2 = slot_log2;
  p.slots = 8 >> slot_log2;
  p.bias_dtype = bias_dtype;
  p.splits = splits;
  p.partial = partial;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return act_dtype == VLMKERN_DTYPE_F16 ? dispatch_tokens<F16>(p, bits, NB, s)
                                        : dispatch_tokens<BF16>(p, bits, NB, s);
}
