// The current CUDA stream of a tensor's device, as the cudaStream_t (void*)
// the C launchers take. torch >= 2.11 hands it out through the device-generic
// c10::Stream, which needs no CUDA headers (so the bindings also build
// against a CPU torch for their checks); older releases only through
// c10::cuda, whose headers include the CUDA toolkit's, present wherever
// setup.py builds the extension.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
#define VLMKERN_GENERIC_STREAM_HANDLE 1
#include <c10/core/impl/DeviceGuardImplInterface.h>
#else
#define VLMKERN_GENERIC_STREAM_HANDLE 0
#include <c10/cuda/CUDAStream.h>
#endif

inline void* vlmkern_current_stream(const at::Tensor& t) {
#if VLMKERN_GENERIC_STREAM_HANDLE
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
#else
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
}
