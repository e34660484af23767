// C interface of the vlmkern CUDA kernels.
//
// Deliberately free of torch and CUDA types so that the torch binding (and any
// other host code) can include it with a plain C++ compiler.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types accepted by the launchers.
enum vlmkern_dtype {
  VLMKERN_DTYPE_F16 = 0,
  VLMKERN_DTYPE_BF16 = 1,
  VLMKERN_DTYPE_F32 = 2,  // scales only
};

// Whether `p` may hold elements of `dtype`: 4-byte aligned for F32, 2-byte
// for the 16-bit types. The binary and integer-activation dtype enums number
// F16, BF16 and F32 as this one does.
static inline int vlmkern_aligned_for(const void* p, int dtype) {
  return (uintptr_t)p % (dtype == VLMKERN_DTYPE_F32 ? 4u : 2u) == 0;
}

// Return codes of the launchers; 0 means the kernel was enqueued.
enum vlmkern_status {
  VLMKERN_OK = 0,
  VLMKERN_ERR_NULL_POINTER = 1,  // qweight, scales or out is null
  VLMKERN_ERR_BAD_BITS = 2,      // bits outside 1..8
  VLMKERN_ERR_BAD_SIZE = 3,      // N < 0, K < 0 or group_size < 1
  VLMKERN_ERR_BAD_DTYPE = 4,     // unknown scale dtype, or out dtype not f16/bf16
  VLMKERN_ERR_LAUNCH = 5,        // cudaGetLastError reported a failure
};

// Human-readable text for a status code. For VLMKERN_ERR_LAUNCH it includes
// the CUDA error recorded by the last failed launch on the calling thread.
const char* vlmkern_status_message(int status);

// The id of the CUDA-graph capture running on `stream` (a cudaStream_t passed
// as void*), written to *id; 0 when the stream is not capturing. The id is
// unique to one capture sequence within the process.
int vlmkern_stream_capture_id(void* stream, unsigned long long* id);

// Dequantize the canonical group-wise packed format to a dense [N, K] matrix.
//
//   qweight  int32 [N, ceil(K*bits/32)]; row n is a little-endian bit stream,
//            code k in stream bits [k*bits, k*bits + bits).
//   qzeros   int32 [N, ceil(G*bits/32)], zero points packed the same way along
//            the group axis (G = ceil(K/group_size)); NULL means symmetric,
//            zero point 2^(bits-1) for every group.
//   scales   [N, G] of scale_dtype (F16, BF16 or F32).
//   out      [N, K] of out_dtype (F16 or BF16), row-major, contiguous.
//   stream   a cudaStream_t passed as void*.
//
// w[n, k] = scales[n, k/g] * (q[n, k] - z[n, k/g]) in fp32, rounded once.
// All pointers are to contiguous row-major device memory.
int vlmkern_dequant_groupwise(const int32_t* qweight, const int32_t* qzeros,
                              const void* scales, int scale_dtype, void* out,
                              int out_dtype, int64_t N, int64_t K, int bits,
                              int64_t group_size, void* stream);

// The same contract and the same output bits, through a faster kernel where
// it applies (bits 2, 3, 4 or 8; K a multiple of 8; group_size a power of two
// >= 8, or >= K; 16-byte aligned out; sizes below 2^31 elements) and the
// general kernel otherwise.
int vlmkern_dequant_groupwise_fast(const int32_t* qweight, const int32_t* qzeros,
                                   const void* scales, int scale_dtype, void* out,
                                   int out_dtype, int64_t N, int64_t K, int bits,
                                   int64_t group_size, void* stream);

#ifdef __cplusplus
}
#endif
