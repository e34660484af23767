// Host side of the TMA kernels (int_act_sm90_tma_kernel.cu,
// weight_only_sm90_tma_kernel.cu): a 2-D tensor map for a row-major matrix,
// encoded with the driver's cuTensorMapEncodeTiled. The function is looked up
// in the driver library the CUDA runtime has loaded (libcuda.so.1), so the
// extension neither links libcuda nor needs a runtime entry-point query:
// cudaGetDriverEntryPointByVersion exists only from CUDA 12.5, and an
// extension built against it would fail to import next to a torch that
// bundles an older runtime. Includes CUDA and system headers only.
#pragma once

#include <cuda.h>          // CUtensorMap and the encode function's types
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdint.h>

#include <atomic>

namespace vlmkern_tma {

// cuTensorMapEncodeTiled of the driver (exported under that name since CUDA
// 12.0, with the v12000 signature), or null where the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (!driver) driver = dlopen("libcuda.so.1", RTLD_LAZY);
    // kept open: the pointer is used for the life of the process
    return driver ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(
                        dlsym(driver, "cuTensorMapEncodeTiled"))
                  : nullptr;
  }();
  return encode;
}

// `map` for a row-major [rows, cols] matrix of `type` at `data` (16-byte
// aligned, rows `row_bytes` apart, a multiple of 16), read in boxes of
// box_cols x box_rows with the 128-byte swizzle (box_cols elements must span
// at most 128 bytes); reads past the matrix return zeros. cudaSuccess, or the
// reason it could not be encoded.
inline cudaError_t encode_rows(CUtensorMap* map, CUtensorMapDataType type, const void* data,
                               int64_t rows, int64_t cols, int64_t row_bytes, uint32_t box_cols,
                               uint32_t box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(row_bytes)};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t steps[2] = {1, 1};
  const CUresult res = encode(map, type, 2, const_cast<void*>(data), dims, strides, box, steps,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The launch configuration of a grid of clusters of `cluster` thread blocks
// along x, each block `threads` threads and `smem` bytes of dynamic shared
// memory (the attribute lives beside the configuration that points at it,
// so the object is not copied).
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute dims = {};
  ClusterLaunch(dim3 grid, int threads, int smem, int cluster, cudaStream_t stream) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    dims.id = cudaLaunchAttributeClusterDimension;
    dims.val.clusterDim.x = cluster;
    dims.val.clusterDim.y = 1;
    dims.val.clusterDim.z = 1;
    config.attrs = &dims;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// Launch `kernel` (dynamic shared memory `smem` bytes, raised past the
// default limit first) in clusters of `cluster` thread blocks along x;
// `grid.x` must be a multiple of `cluster`. The CUDA error of the attribute
// call or the launch, else cudaSuccess.
template <class... Params, class... Args>
cudaError_t launch_clusters(void (*kernel)(Params...), dim3 grid, int threads, int smem,
                            int cluster, cudaStream_t stream, Args&&... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const ClusterLaunch launch(grid, threads, smem, cluster, stream);
  err = cudaLaunchKernelEx(&launch.config, kernel, static_cast<Args&&>(args)...);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

// How many clusters of `cluster` blocks of `kernel` (`threads` threads and
// `smem` bytes of dynamic shared memory each) the current device holds at
// once, into *count: the grid of a persistent kernel. A GPU's SMs need not
// pair up into clusters evenly, so this is not simply SMs / cluster. The
// answer is kept per device in `known` (one array per kernel, zeros at
// first), so each device is asked once.
constexpr int kKnownDevices = 64;
template <class... Params>
cudaError_t max_active_clusters(std::atomic<int> (&known)[kKnownDevices], int* count,
                                void (*kernel)(Params...), int threads, int smem, int cluster,
                                cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool keep = device >= 0 && device < kKnownDevices;
  if (keep && (*count = known[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const ClusterLaunch launch(dim3(cluster), threads, smem, cluster, stream);
  err = cudaOccupancyMaxActiveClusters(count, kernel, &launch.config);
  if (err == cudaSuccess && keep && *count > 0) known[device].store(*count, std::memory_order_relaxed);
  return err;
}

}  // namespace vlmkern_tma
