// Dequantization of the canonical group-wise packed format to dense fp16/bf16.
// The format and the launcher contract are described in vlmkern_kernels.h.
//
// Work split: each thread owns 8 consecutive columns of a row. Eight 16-bit
// outputs make one 16-byte store, so a warp writes 512 contiguous bytes, and
// eight codes of b <= 8 bits are at most 64 stream bits, which lie in at most
// three consecutive 32-bit words of the row.
//
// The per-chunk work is __host__ __device__ so it can be checked on a machine
// without a GPU; the kernel maps a 2-D grid onto it.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>

#include "vlmkern_kernels.h"

namespace {

constexpr int kCodesPerThread = 8;
constexpr int kThreadsPerBlock = 256;
// Rows beyond this many are covered by a grid-stride loop (CUDA caps gridDim.y).
constexpr int64_t kMaxRowBlocks = 65535;

struct Dims {
  int64_t N, K, group_size;
  int64_t groups;            // G = ceil(K / group_size)
  int64_t words_per_row;     // ceil(K * bits / 32)
  int64_t zero_words_per_row;  // ceil(G * bits / 32)
  int bits;
};

__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(__half x) { return __half2float(x); }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Output element types, as the raw 16-bit pattern of a round-to-nearest-even
// conversion. Storing bit patterns keeps the vector store free of type punning.
struct OutF16 {
  __host__ __device__ static uint16_t from_float(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};
struct OutBF16 {
  __host__ __device__ static uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

// Code `index` of a little-endian bit stream: its bits start in word
// (index*bits)/32 and spill into the next word when they cross a word boundary.
__host__ __device__ inline uint32_t read_code(const uint32_t* stream, int64_t index, int bits) {
  const int64_t bit = index * bits;
  const int64_t word = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  uint32_t v = stream[word] >> shift;
  if (shift + bits > 32) v |= stream[word + 1] << (32 - shift);
  return v & ((1u << bits) - 1u);
}

// Stream bits [first_bit, first_bit + 64) of one row as a 64-bit value. Words
// past the end of the row read as zero; only a row's last, partial chunk can
// reach them, and its missing codes are never stored.
__host__ __device__ inline uint64_t read_window(const uint32_t* row, int64_t words, int64_t first_bit) {
  const int64_t w = first_bit >> 5;
  const int shift = static_cast<int>(first_bit & 31);
  const uint64_t w0 = row[w];
  const uint64_t w1 = (w + 1 < words) ? row[w + 1] : 0u;
  uint64_t v = (w0 | (w1 << 32)) >> shift;
  if (shift != 0 && w + 2 < words) v |= uint64_t(row[w + 2]) << (64 - shift);
  return v;
}

// Dequantize columns [8*chunk, 8*chunk + 8) of row n.
template <typename Out, typename ScaleT>
__host__ __device__ inline void dequant_chunk(const uint32_t* qweight, const uint32_t* qzeros,
                                              const ScaleT* scales, uint16_t* out, const Dims& d,
                                              int64_t n, int64_t chunk, bool vector_store) {
  const int64_t k0 = chunk * kCodesPerThread;
  const uint32_t mask = (1u << d.bits) - 1u;
  const uint64_t window = read_window(qweight + n * d.words_per_row, d.words_per_row, k0 * d.bits);
  const ScaleT* scale_row = scales + n * d.groups;
  const uint32_t* zero_row = qzeros ? qzeros + n * d.zero_words_per_row : nullptr;

  // Track the group incrementally: a chunk crosses a group boundary only when
  // the group size is not a multiple of 8, and this avoids a division per code.
  int64_t group = k0 / d.group_size;
  int64_t group_end = (group + 1) * d.group_size;
  float scale = to_float(scale_row[group]);
  int32_t zero = zero_row ? int32_t(read_code(zero_row, group, d.bits)) : (1 << (d.bits - 1));

  uint16_t vals[kCodesPerThread];
#pragma unroll
  for (int j = 0; j < kCodesPerThread; ++j) {
    const int64_t k = k0 + j;
    if (k < d.K && k == group_end) {
      ++group;
      group_end += d.group_size;
      scale = to_float(scale_row[group]);
      zero = zero_row ? int32_t(read_code(zero_row, group, d.bits)) : (1 << (d.bits - 1));
    }
    const int32_t q = int32_t((window >> (j * d.bits)) & mask);
    // q - zero is a small integer, exact in fp32: the only rounding is the
    // product, then the single conversion to the output type.
    vals[j] = Out::from_float(scale * float(q - zero));
  }

  uint16_t* dst = out + n * d.K + k0;
  if (vector_store) {
    uint4 packed;
    packed.x = uint32_t(vals[0]) | (uint32_t(vals[1]) << 16);
    packed.y = uint32_t(vals[2]) | (uint32_t(vals[3]) << 16);
    packed.z = uint32_t(vals[4]) | (uint32_t(vals[5]) << 16);
    packed.w = uint32_t(vals[6]) | (uint32_t(vals[7]) << 16);
    *reinterpret_cast<uint4*>(dst) = packed;
  } else {
#pragma unroll
    for (int j = 0; j < kCodesPerThread; ++j) {
      if (k0 + j < d.K) dst[j] = vals[j];
    }
  }
}

// Grid: x covers the chunks of a row, y the rows (grid-stride in y, since
// gridDim.y is capped at 65535). A 2-D grid avoids a 64-bit division per
// thread to recover (row, chunk), which cost more than the memory traffic.
template <typename Out, typename ScaleT>
__global__ void __launch_bounds__(kThreadsPerBlock)
dequant_groupwise_kernel(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                         const ScaleT* __restrict__ scales, uint16_t* __restrict__ out, Dims d,
                         bool vector_store) {
  const int64_t chunks_per_row = (d.K + kCodesPerThread - 1) / kCodesPerThread;
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= chunks_per_row) return;
  for (int64_t n = blockIdx.y; n < d.N; n += gridDim.y) {
    dequant_chunk<Out, ScaleT>(qweight, qzeros, scales, out, d, n, chunk, vector_store);
  }
}

template <typename Out, typename ScaleT>
void launch(const uint32_t* qweight, const uint32_t* qzeros, const void* scales, void* out,
            const Dims& d, cudaStream_t stream) {
  const int64_t chunks_per_row = (d.K + kCodesPerThread - 1) / kCodesPerThread;
  const dim3 grid(unsigned((chunks_per_row + kThreadsPerBlock - 1) / kThreadsPerBlock),
                  unsigned(d.N < kMaxRowBlocks ? d.N : kMaxRowBlocks));
  // 16-byte stores need every chunk start 16-byte aligned: rows of a multiple
  // of 8 elements in a buffer that itself starts 16-byte aligned.
  const bool vector_store = d.K % kCodesPerThread == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  dequant_groupwise_kernel<Out, ScaleT><<<grid, kThreadsPerBlock, 0, stream>>>(
      qweight, qzeros, static_cast<const ScaleT*>(scales), static_cast<uint16_t*>(out), d,
      vector_store);
}

template <typename Out>
void launch_for_scales(int scale_dtype, const uint32_t* qweight, const uint32_t* qzeros,
                       const void* scales, void* out, const Dims& d, cudaStream_t stream) {
  switch (scale_dtype) {
    case VLMKERN_DTYPE_F16: launch<Out, __half>(qweight, qzeros, scales, out, d, stream); break;
    case VLMKERN_DTYPE_BF16: launch<Out, __nv_bfloat16>(qweight, qzeros, scales, out, d, stream); break;
    default: launch<Out, float>(qweight, qzeros, scales, out, d, stream); break;
  }
}

// cudaGetLastError clears the error, so keep it for vlmkern_status_message.
thread_local cudaError_t last_launch_error = cudaSuccess;
thread_local char message_buffer[256];

}  // namespace

extern "C" const char* vlmkern_status_message(int status) {
  switch (status) {
    case VLMKERN_OK: return "success";
    case VLMKERN_ERR_NULL_POINTER: return "a required pointer (qweight, scales or out) is null";
    case VLMKERN_ERR_BAD_BITS: return "bits must be between 1 and 8";
    case VLMKERN_ERR_BAD_SIZE: return "sizes must satisfy N >= 0, K >= 0 and group_size >= 1";
    case VLMKERN_ERR_BAD_DTYPE:
      return "scale dtype must be f16, bf16 or f32 and output dtype f16 or bf16";
    case VLMKERN_ERR_LAUNCH:
      snprintf(message_buffer, sizeof(message_buffer), "CUDA kernel launch failed: %s (%s)",
               cudaGetErrorName(last_launch_error), cudaGetErrorString(last_launch_error));
      return message_buffer;
    default: return "unknown vlmkern status code";
  }
}

extern "C" int vlmkern_dequant_groupwise(const int32_t* qweight, const int32_t* qzeros,
                                         const void* scales, int scale_dtype, void* out,
                                         int out_dtype, int64_t N, int64_t K, int bits,
                                         int64_t group_size, void* stream) {
  if (bits < 1 || bits > 8) return VLMKERN_ERR_BAD_BITS;
  if (N < 0 || K < 0 || group_size < 1) return VLMKERN_ERR_BAD_SIZE;
  if (scale_dtype < VLMKERN_DTYPE_F16 || scale_dtype > VLMKERN_DTYPE_F32) return VLMKERN_ERR_BAD_DTYPE;
  if (out_dtype != VLMKERN_DTYPE_F16 && out_dtype != VLMKERN_DTYPE_BF16) return VLMKERN_ERR_BAD_DTYPE;
  if (N == 0 || K == 0) return VLMKERN_OK;  // nothing to write; empty tensors may have null data
  if (!qweight || !scales || !out) return VLMKERN_ERR_NULL_POINTER;

  Dims d;
  d.N = N;
  d.K = K;
  d.group_size = group_size;
  d.bits = bits;
  d.groups = (K + group_size - 1) / group_size;
  d.words_per_row = (K * bits + 31) / 32;
  d.zero_words_per_row = (d.groups * bits + 31) / 32;

  // The streams are read as unsigned words so that right shifts bring in zeros.
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qweight);
  const uint32_t* qz = reinterpret_cast<const uint32_t*>(qzeros);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (out_dtype == VLMKERN_DTYPE_F16) {
    launch_for_scales<OutF16>(scale_dtype, qw, qz, scales, out, d, s);
  } else {
    launch_for_scales<OutBF16>(scale_dtype, qw, qz, scales, out, d, s);
  }

  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    last_launch_error = err;
    return VLMKERN_ERR_LAUNCH;
  }
  return VLMKERN_OK;
}
