// Warpgroup-MMA pieces shared by the Hopper kernels (sm_90a only):
// int_act_sm90_kernel.cu, int_act_sm90_tma_kernel.cu and
// weight_only_sm90_kernel.cu. VLMKERN_SM90A is 1 while compiling sm_90a
// device code; the helpers exist only then.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define VLMKERN_SM90A 1
#else
#define VLMKERN_SM90A 0
#endif

#if VLMKERN_SM90A
namespace vlmkern_sm90 {

// Shared-memory matrix descriptor of a K-major, 128-byte-swizzled tile at
// `addr` (its 8-row groups 1024-byte aligned): start address, leading offset
// 1 (unused by swizzled K-major layouts), 1024 bytes between groups of 8
// rows, swizzle mode 128B. A k-step inside the 128-byte row advances `addr`.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return (uint64_t(1) << 62) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 16) |
         uint64_t((addr & 0x3FFFF) >> 4);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes shared memory through the generic proxy; wgmma reads it
// through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define VLMKERN_ACC8_S32(i)                                                               \
  "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), "+r"(d[i + 4]), "+r"(d[i + 5]), \
      "+r"(d[i + 6]), "+r"(d[i + 7])

// d (this thread's 64 sums of a 64 x 128 tile) = A (64 x 32) * B (128 x 32)^T
// + (accumulate ? d : 0), both operands int8 in shared memory.
__device__ __forceinline__ void wgmma_m64n128k32(int32_t (&d)[64], uint64_t desc_a,
                                                 uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n}\n"
      : VLMKERN_ACC8_S32(0), VLMKERN_ACC8_S32(8), VLMKERN_ACC8_S32(16), VLMKERN_ACC8_S32(24),
        VLMKERN_ACC8_S32(32), VLMKERN_ACC8_S32(40), VLMKERN_ACC8_S32(48), VLMKERN_ACC8_S32(56)
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
}
#undef VLMKERN_ACC8_S32

// Pin MMA operands in registers around a batch of MMAs: the compiler neither
// moves nor reads the accumulators while the MMAs are in flight, and keeps
// register A fragments alive until the MMAs reading them are done.
template <int N>
__device__ __forceinline__ void fence_operands(int32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int R, int C>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[R][C]) {
#pragma unroll
  for (int i = 0; i < R * C; ++i) asm volatile("" : "+r"(a[i / C][i % C])::"memory");
}

// -- TMA copies, mbarriers and clusters (warp-specialized pipelines) ----------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// The producer's arrival, announcing the bytes the stage's copies will bring.
__device__ __forceinline__ void mbar_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
// Wait until the barrier's phase of the given parity has completed. A
// pipeline that never completes the phase (a bug) traps after about ten
// seconds instead of holding the GPU until the process is killed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const long long start = clock64();
  while (!mbar_try_wait(bar, parity))
    if (clock64() - start > (1ll << 34)) __trap();
}
// Arrive on the barrier at the same offset in block `cta` of the cluster.
// The default (.release.cta) semantics: the arrival only says that this
// warp's reads of a stage are over (its MMAs have been waited for), and a
// .cluster release would put a GPU-wide memory fence before every arrival.
__device__ __forceinline__ void mbar_arrive_in(uint32_t bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(cta)
      : "memory");
}
// Box (x, y) of a 2-D tensor map into this block's shared memory.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int x, int y,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
// The same into the same offset of every block in `mask`, each one's barrier
// at `bar` receiving the bytes that land there.
__device__ __forceinline__ void tma_load_multicast(uint32_t dst, const CUtensorMap* map, int x,
                                                   int y, uint32_t bar, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar), "h"(mask)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// Contiguous bytes (a multiple of 16, both addresses 16-byte aligned) into
// this block's shared memory, completing on `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
// The two consumer warpgroups (threads 128..383) of a warp-specialized block:
// named barrier 1, which the producer warpgroup does not take part in.
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
}
// Every thread of both blocks: arrive, then wait for all.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

}  // namespace vlmkern_sm90
#endif  // VLMKERN_SM90A
