// Integer-activation GEMM on Hopper's warpgroup MMA (sm_90a): weights stored
// as int8 (mode I8: W8A8, W6A6 and other 6/8-bit weights) at prefill sizes.
// The launcher and the argument checks are vlmkern_int_act_gemm's
// (int_act.h, gemm = VLMKERN_INT_ACT_GEMM_WGMMA); the sums are the same exact
// int32 dot products per weight group, finished with the same rounding steps,
// so the result equals the mma.sync kernel's bit for bit.
//
// Structure: a 128-token x BN-channel tile per thread block of two
// warpgroups, each issuing wgmma.mma_async m64n128k32 (s8 x s8 -> s32) for
// its 64 tokens, with both operands read from shared memory through matrix
// descriptors. K is walked in 128-byte tiles: one row of the 128-byte swizzle
// (16-byte chunk c of row r stored at chunk c ^ (r % 8)), the K-major
// canonical layout the descriptors name, so each k32 step is the same
// descriptor advanced by 32 bytes. A 4-stage cp.async pipeline fills the
// tiles (zero-filled past M, N and the padded row) two tiles ahead, while one
// batch of MMAs stays in flight. Per-channel weights use
// BN = 256 (two m64n128 per k-step, 128 int32 sums per thread); grouped
// weights use BN = 128 and fold each finished group into fp32 sums, which
// waits for the group's MMAs.
//
// Compiled to real code only for sm_90a (wgmma is an arch-specific feature);
// other targets get a kernel that traps, and vlmkern_int_act_sm90_available
// says whether this build holds the sm_90a code for the current device.

#include <cuda_runtime.h>
#include <stdint.h>

#include "int_act_common.cuh"
#include "sm90_wgmma.cuh"

namespace {

using namespace vlmkern_int_act;
#if VLMKERN_SM90A
using namespace vlmkern_sm90;
#endif

constexpr int kBM = 128;       // tokens per thread block: two warpgroups of 64
constexpr int kBK = 128;       // bytes of K per stage: one swizzle row
constexpr int kStages = 4;
constexpr int kThreads = 256;

template <bool GROUPED>
struct Sm90Config {
  static constexpr int kHalves = GROUPED ? 1 : 2;  // m64n128 MMAs per k-step
  static constexpr int kBN = 128 * kHalves;
  static constexpr int kAStage = kBM * kBK;
  static constexpr int kBStage = kBN * kBK;
  static constexpr int kStage = kAStage + kBStage;
  static constexpr int kSmem = kStages * kStage + 1024;  // slack to align tiles to 1024 B
  static_assert(kBM * (kBN + 8) * 4 <= kStages * kStage, "the epilogue tile fits the stages");
};

#if VLMKERN_SM90A
// Byte offset of 16-byte chunk c of row r in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t sw128(int r, int c) {
  return uint32_t(r * kBK + ((c ^ (r & 7)) << 4));
}

// y += float(acc) * w_scale[group] for this thread's 64 sums (grouped weights).
__device__ __forceinline__ void fold_group(const GemmArgs& p, int64_t group, int64_t col_base,
                                           const int32_t (&acc)[64], float (&y)[64]) {
  const float* srow = p.w_scale + group * p.N;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int64_t n = col_base + 8 * j;
    const float s0 = srow[min(n, p.N - 1)], s1 = srow[min(n + 1, p.N - 1)];
#pragma unroll
    for (int e = 0; e < 4; ++e)
      y[4 * j + e] = __fmaf_rn(__int2float_rn(acc[4 * j + e]), (e & 1) ? s1 : s0, y[4 * j + e]);
  }
}
#endif  // VLMKERN_SM90A

// Accumulator layout (PTX wgmma D, as mma.sync m16n8 repeated along N): sum
// 4j + e of a thread holds row 16 * (warp in warpgroup) + lane / 4 + 8 * (e / 2)
// of its warpgroup's 64 and column 8j + 2 * (lane % 4) + e % 2 of the 128.
template <bool GROUPED>
__global__ void __launch_bounds__(kThreads, 1) int_act_wgmma_kernel(GemmArgs p) {
#if VLMKERN_SM90A
  using C = Sm90Config<GROUPED>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * C::kBN;
  const int64_t row_bytes = p.k_tiles * 64;  // k_pad: two 32-byte k-steps per k_tile
  const int64_t k_tiles = (row_bytes + kBK - 1) / kBK;

  // Copies: thread t moves 16-byte chunk t % 8 of rows t / 8 + 32 i.
  const int chunk = tid & 7, row0 = tid >> 3;
  auto load = [&](int stage, int64_t kt) {
    const uint32_t a_s = base + stage * C::kStage, b_s = a_s + C::kAStage;
    const int64_t col = kt * kBK + chunk * 16;
    const bool in_k = col < row_bytes;
#pragma unroll
    for (int i = 0; i < kBM / 32; ++i) {
      const int r = row0 + 32 * i;
      const bool ok = in_k && m0 + r < p.M;
      cp_async16_zfill(a_s + sw128(r, chunk), ok ? p.q + (m0 + r) * row_bytes + col : p.q, ok);
    }
#pragma unroll
    for (int i = 0; i < C::kBN / 32; ++i) {
      const int r = row0 + 32 * i;
      const bool ok = in_k && n0 + r < p.N;
      cp_async16_zfill(b_s + sw128(r, chunk), ok ? p.w + (n0 + r) * row_bytes + col : p.w, ok);
    }
  };

  const int wg = tid >> 7, lane = tid & 31;
  const int64_t row_base = m0 + 64 * wg + 16 * ((tid >> 5) & 3) + (lane >> 2);
  const int64_t col_base = n0 + 2 * (lane & 3);
  int32_t acc[C::kHalves][64];
#pragma unroll
  for (int h = 0; h < C::kHalves; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[h][i] = 0;
  float y[GROUPED ? 64 : 1];
#pragma unroll
  for (int i = 0; i < (GROUPED ? 64 : 1); ++i) y[i] = 0.f;

  // Tiles run kStages - 2 ahead of the MMAs, so one batch of MMAs can stay in
  // flight while the next tile's copies are issued: the stage a copy refills
  // was read by the batch before the previous one.
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < k_tiles) load(s, s);
    cp_async_commit();
  }

  bool accumulate = false;  // false: the next MMA starts new sums
  int64_t step = 0;         // global k-step (32 bytes of K)
  int64_t group_left = p.steps_per_group;
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 3>();  // tile kt has landed (this thread's copies)
    fence_proxy_async();
    wgmma_wait<1>();  // batch kt - 2 is done: its stage may be refilled
    __syncthreads();
    if (kt + kStages - 2 < k_tiles) load(int((kt + kStages - 2) % kStages), kt + kStages - 2);
    cp_async_commit();

    const uint32_t a_s = base + int(kt % kStages) * C::kStage, b_s = a_s + C::kAStage;
    const uint64_t desc_a = smem_desc(a_s + 64 * kBK * wg), desc_b = smem_desc(b_s);
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) fence_operands(acc[h]);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kBK / 32; ++j) {
#pragma unroll
      for (int h = 0; h < C::kHalves; ++h)
        wgmma_m64n128k32(acc[h], desc_a + 2 * j, desc_b + h * (128 * kBK >> 4) + 2 * j, accumulate);
      accumulate = true;
      if constexpr (GROUPED) {
        // Steps past the last group are zero padding and are never folded.
        if (--group_left == 0) {
          group_left = p.steps_per_group;
          const int64_t group = step / p.steps_per_group;
          if (group < p.groups) {
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(acc[0]);
            fold_group(p, group, col_base, acc[0], y);
            accumulate = false;
            fence_operands(acc[0]);
            wgmma_fence();
          }
        }
      }
      ++step;
    }
    wgmma_commit();
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) fence_operands(acc[h]);
  }
  wgmma_wait<0>();
  cp_async_wait<0>();
  __syncthreads();  // every MMA has read its tiles: shared memory is free

  // Epilogue, through shared memory so that the stores are coalesced and the
  // code small: each thread writes its fp32 sums into a [128][BN] tile (rows
  // padded by 8 floats: one 8-byte store per lane, two wavefronts), then
  // consecutive threads finish consecutive column pairs of a row. Per-channel
  // weights fold their single group here, exactly as the mma.sync kernel does
  // (0 + acc * s); then token scale, bias and cast in store_outputs.
  constexpr int kPitch = C::kBN + 8;
  float* tile = reinterpret_cast<float*>(smem_raw + (base - smem_addr(smem_raw)));
  const int tile_row = int(row_base - m0), tile_col = int(col_base - n0);
#pragma unroll
  for (int i = 0; i < 16 * C::kHalves; ++i) {
    const int h = i / 16, j = i % 16, c = tile_col + 128 * h + 8 * j;
    float2 top, bottom;  // rows tile_row and tile_row + 8, columns c and c + 1
    if constexpr (GROUPED) {
      top = make_float2(y[4 * j], y[4 * j + 1]);
      bottom = make_float2(y[4 * j + 2], y[4 * j + 3]);
    } else {
      const int64_t n = n0 + c;
      const float s0 = p.w_scale[min(n, p.N - 1)], s1 = p.w_scale[min(n + 1, p.N - 1)];
      top = make_float2(__fmaf_rn(__int2float_rn(acc[h][4 * j]), s0, 0.f),
                        __fmaf_rn(__int2float_rn(acc[h][4 * j + 1]), s1, 0.f));
      bottom = make_float2(__fmaf_rn(__int2float_rn(acc[h][4 * j + 2]), s0, 0.f),
                           __fmaf_rn(__int2float_rn(acc[h][4 * j + 3]), s1, 0.f));
    }
    *reinterpret_cast<float2*>(tile + tile_row * kPitch + c) = top;
    *reinterpret_cast<float2*>(tile + (tile_row + 8) * kPitch + c) = bottom;
  }
  __syncthreads();
  const bool pair_ok = (p.N % 2) == 0;
  const int rows = int(min(int64_t(kBM), p.M - m0));
#pragma unroll 1
  for (int idx = tid; idx < rows * (C::kBN / 2); idx += kThreads) {
    const int r = idx / (C::kBN / 2), c = 2 * (idx % (C::kBN / 2));
    const float2 v = *reinterpret_cast<const float2*>(tile + r * kPitch + c);
    store_outputs(p, m0 + r, n0 + c, v.x, v.y, p.sx[m0 + r], pair_ok);
  }
#else
  (void)p;
  __trap();  // built without sm_90a code: vlmkern_int_act_sm90_available() is 0
#endif
}

__global__ void sm90_probe_kernel(int* built) { *built = VLMKERN_SM90A; }

template <bool GROUPED>
int launch(const GemmArgs& args, cudaStream_t stream) {
  using C = Sm90Config<GROUPED>;
  auto kernel = int_act_wgmma_kernel<GROUPED>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) {
    last_launch_error = err;
    return VLMKERN_INT_ACT_ERR_LAUNCH;
  }
  const dim3 grid(unsigned((args.N + C::kBN - 1) / C::kBN), unsigned((args.M + kBM - 1) / kBM));
  kernel<<<grid, kThreads, C::kSmem, stream>>>(args);
  return launch_status();
}

}  // namespace

namespace vlmkern_int_act {

int launch_gemm_sm90(const GemmArgs& args, cudaStream_t stream) {
  return args.groups == 1 ? launch<false>(args, stream) : launch<true>(args, stream);
}

}  // namespace vlmkern_int_act

extern "C" int vlmkern_int_act_sm90_available(int* available) {
  if (!available) return VLMKERN_INT_ACT_ERR_NULL_POINTER;
  *available = 0;
  // Per device: 0 not probed yet, 1 no sm_90a code, 2 sm_90a code. The
  // launchers ask before every WGMMA launch, so the probe runs once.
  constexpr int kMaxDevices = 64;
  static int probed[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    last_launch_error = err;
    return VLMKERN_INT_ACT_ERR_LAUNCH;
  }
  if (device < kMaxDevices && probed[device]) {
    *available = probed[device] == 2;
    return VLMKERN_INT_ACT_OK;
  }
  int major = 0;
  const int status = current_device_major(&major);
  if (status != VLMKERN_INT_ACT_OK) return status;
  if (major == 9) {
    int* flag = nullptr;
    err = cudaMalloc(&flag, sizeof(int));
    if (err == cudaSuccess) {
      sm90_probe_kernel<<<1, 1>>>(flag);
      err = cudaGetLastError();
      if (err == cudaSuccess) err = cudaMemcpy(available, flag, sizeof(int), cudaMemcpyDeviceToHost);
      const cudaError_t freed = cudaFree(flag);
      if (err == cudaSuccess) err = freed;
    }
    if (err != cudaSuccess) {
      *available = 0;
      // A build without any code for this device fails the probe launch: not available.
      if (err != cudaErrorNoKernelImageForDevice) {
        last_launch_error = err;
        return VLMKERN_INT_ACT_ERR_LAUNCH;
      }
      cudaGetLastError();
    }
  }
  if (device < kMaxDevices) probed[device] = *available ? 2 : 1;
  return VLMKERN_INT_ACT_OK;
}
