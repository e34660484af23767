// Dequantization of the canonical group-wise packed format to dense fp16/bf16.
// The format and the launcher contract are described in vlmkern_kernels.h.
//
// General kernel: each thread owns 8 consecutive columns of a row. Eight 16-bit
// outputs make one 16-byte store, so a warp writes 512 contiguous bytes, and
// eight codes of b <= 8 bits are at most 64 stream bits, which lie in at most
// three consecutive 32-bit words of the row. It takes any bits, group size and
// K, at the cost of 64-bit index math and a group test per code.
//
// Fast path (vlmkern_dequant_groupwise_fast, below): the common shapes with
// compile-time bits, 32-bit indices and one scale/zero per 8 codes.
//
// The per-thread work is __host__ __device__ so it can be checked on a machine
// without a GPU; the kernels only map their grids onto it.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>

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

// ---------------------------------------------------------------------------
// Fast path: bits 2/3/4/8, K a multiple of 8, a power-of-two group size >= 8
// or one group per row, sizes that fit 32-bit indices, 16-byte aligned output.
//
// A unit is 32 chunks (256 codes) of one row, one chunk per lane, so every
// store instruction writes 512 contiguous bytes. A warp takes
// kFastUnitsPerWarp consecutive units and walks across row ends itself: the
// only division (unit -> row) is paid once per warp, and lanes idle only in a
// row's last unit when K is not a multiple of 256. A chunk never crosses a
// group, so its scale and zero are read once, at a shifted index.
// ---------------------------------------------------------------------------

constexpr int kFastThreads = 256;
constexpr uint32_t kFastWarpsPerBlock = kFastThreads / 32;
constexpr uint32_t kFastUnitsPerWarp = 8;
// 0x64 is the high byte of 1024 in fp16: a code q < 1024 OR-ed into the
// mantissa gives 1024 + q exactly, and (1024 + q) - (1024 + z) is q - z
// exactly, in one HSUB2 per pair.
constexpr uint32_t kMagicF16 = 0x64646464u;

struct FastDims {
  uint32_t chunks;              // K / 8: chunks per row
  uint32_t segments;            // units per row: ceil(chunks / 32)
  uint32_t units;               // N * segments
  uint32_t words_per_row;       // ceil(K * bits / 32)
  uint32_t groups;              // G
  uint32_t zero_words_per_row;  // ceil(G * bits / 32)
  uint32_t chunk_group_shift;   // the group of chunk c is c >> chunk_group_shift
};

__host__ __device__ inline __half2 u32_as_half2(uint32_t u) {
  __half2_raw raw;
  memcpy(&raw, &u, sizeof raw);
  return __half2(raw);
}

__host__ __device__ inline uint32_t half2_bits(__half2 h) {
  const __half2_raw raw = h;
  uint32_t u;
  memcpy(&u, &raw, sizeof u);
  return u;
}

__host__ __device__ inline uint32_t bf162_bits(__nv_bfloat162 h) {
  const __nv_bfloat162_raw raw = h;
  uint32_t u;
  memcpy(&u, &raw, sizeof u);
  return u;
}

// PRMT: byte k of the result is byte (selector >> 4k) & 7 of the pair
// {a = bytes 0..3, b = bytes 4..7}; the selectors used here never set bit 3.
__host__ __device__ inline uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, selector);
#else
  const uint64_t bytes = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= uint32_t((bytes >> (8 * ((selector >> (4 * k)) & 7u))) & 0xFFu) << (8 * k);
  return r;
#endif
}

// Two fp32 values rounded once each to the output type, low element first
// (one F2FP on sm_80+).
template <typename Out>
__host__ __device__ inline uint32_t pack2(float a, float b) {
  if constexpr (std::is_same<Out, OutF16>::value) {
    return half2_bits(__floats2half2_rn(a, b));
  } else {
    return bf162_bits(__floats2bfloat162_rn(a, b));
  }
}

// The 8*BITS stream bits of chunk c of the row starting at word `row`: code j
// in bits [j*BITS, (j+1)*BITS) of lo, or of hi for 8-bit codes 4..7. Bits of
// lo above 8*BITS may hold the next chunk's codes.
template <int BITS>
__host__ __device__ inline void load_chunk(const uint32_t* qweight, uint32_t row, uint32_t c,
                                           uint32_t& lo, uint32_t& hi) {
  hi = 0;
  if constexpr (BITS == 2) {
    lo = qweight[row + (c >> 1)] >> ((c & 1u) * 16);
  } else if constexpr (BITS == 3) {
    // 24 bits at bit 24c: inside one word unless they start at bit 16 or 24.
    const uint32_t w = row + ((3 * c) >> 2);
    const uint32_t shift = ((3 * c) & 3u) * 8;
    const uint32_t w0 = qweight[w];
    const uint32_t w1 = shift > 8 ? qweight[w + 1] : 0u;
    lo = uint32_t(((uint64_t(w1) << 32) | w0) >> shift);
  } else if constexpr (BITS == 4) {
    lo = qweight[row + c];
  } else {
#ifdef __CUDA_ARCH__
    // a row is K/4 words, an even count, so these two words are 8-byte aligned
    const uint2 v = *reinterpret_cast<const uint2*>(qweight + row + 2 * c);
    lo = v.x;
    hi = v.y;
#else
    lo = qweight[row + 2 * c];
    hi = qweight[row + 2 * c + 1];
#endif
  }
}

// Codes 2i (low half) and 2i+1 (high half) of a chunk as the fp16 pair
// (1024 + q, 1024 + q').
template <int BITS>
__host__ __device__ inline void f16_pairs(uint32_t lo, uint32_t hi, uint32_t (&p)[4]) {
  if constexpr (BITS == 8) {
    p[0] = byte_perm(lo, kMagicF16, 0x4140);
    p[1] = byte_perm(lo, kMagicF16, 0x4342);
    p[2] = byte_perm(hi, kMagicF16, 0x4140);
    p[3] = byte_perm(hi, kMagicF16, 0x4342);
  } else if constexpr (BITS == 4) {
    // nibbles to bytes: even codes, odd codes, then codes 0..3 and 4..7 in order
    const uint32_t even = lo & 0x0F0F0F0Fu;
    const uint32_t odd = (lo >> 4) & 0x0F0F0F0Fu;
    const uint32_t q03 = byte_perm(even, odd, 0x5140);
    const uint32_t q47 = byte_perm(even, odd, 0x7362);
    p[0] = byte_perm(q03, kMagicF16, 0x4140);
    p[1] = byte_perm(q03, kMagicF16, 0x4342);
    p[2] = byte_perm(q47, kMagicF16, 0x4140);
    p[3] = byte_perm(q47, kMagicF16, 0x4342);
  } else if constexpr (BITS == 2) {
    // code 2i at bit 4i, code 2i+1 moved from bit 4i+2 to bit 4i+16
    const uint32_t x = ((lo & 0xFFFFu) | (lo << 14)) & 0x33333333u;
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = ((x >> (4 * i)) & 0x00030003u) | (kMagicF16 & 0xFF00FF00u);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t x = lo >> (6 * i);
      p[i] = (x & 7u) | ((x << 13) & 0x70000u) | (kMagicF16 & 0xFF00FF00u);
    }
  }
}

// Zero point of group g in the packed zero stream, from word `row` on. Only
// the low byte counts: for 8-bit codes the bits above it hold later codes.
template <int BITS>
__host__ __device__ inline uint32_t zero_code(const uint32_t* qzeros, uint32_t row, uint32_t g) {
  if constexpr (BITS == 3) {
    const uint32_t bit = g * 3;
    const uint32_t w = row + (bit >> 5);
    const uint32_t shift = bit & 31u;
    uint32_t v = qzeros[w] >> shift;
    if (shift > 29) v |= qzeros[w + 1] << (32 - shift);
    return v & 7u;
  } else {
    constexpr uint32_t per_word = 32 / BITS;  // codes never straddle words
    const uint32_t v = qzeros[row + g / per_word] >> ((g * BITS) & 31u);
    return BITS == 8 ? v : v & ((1u << BITS) - 1u);
  }
}

// Chunk c (columns 8c .. 8c+7) of row n.
template <int BITS, bool kZeros, typename Out, typename ScaleT>
__host__ __device__ inline void dequant_fast_chunk(const uint32_t* qweight, const uint32_t* qzeros,
                                                   const ScaleT* scales, uint4* out,
                                                   const FastDims& f, uint32_t n, uint32_t c) {
  const uint32_t g = c >> f.chunk_group_shift;
  uint32_t lo, hi;
  load_chunk<BITS>(qweight, n * f.words_per_row, c, lo, hi);
  const ScaleT scale = scales[n * f.groups + g];
  const uint32_t zero = kZeros ? zero_code<BITS>(qzeros, n * f.zero_words_per_row, g)
                               : (1u << (BITS - 1));

  // q - z is exact in fp16 (|q - z| <= 255), so one HSUB2 per pair of codes
  const __half2 z2 = u32_as_half2((kMagicF16 & 0xFF00FF00u) | ((zero & 0xFFu) * 0x10001u));
  uint32_t p[4];
  f16_pairs<BITS>(lo, hi, p);
  uint32_t words[4];
  if constexpr (std::is_same<Out, OutF16>::value && std::is_same<ScaleT, __half>::value) {
    // fp16 scale and output: an 11-bit significand times |q - z| <= 255 fits
    // fp32's 24 bits, so the fp32 product is exact and rounding it to fp16 is
    // the same as one fp16 multiply.
    const __half2 s2 = __half2half2(scale);
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = half2_bits(__hmul2_rn(__hsub2_rn(u32_as_half2(p[i]), z2), s2));
  } else {
    const float s = to_float(scale);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 d = __hsub2_rn(u32_as_half2(p[i]), z2);
      words[i] = pack2<Out>(s * __low2float(d), s * __high2float(d));
    }
  }
  out[n * f.chunks + c] = make_uint4(words[0], words[1], words[2], words[3]);
}

// Everything lane `lane` of warp `warp` of the fast kernel does.
template <int BITS, bool kZeros, typename Out, typename ScaleT>
__host__ __device__ inline void dequant_fast_thread(const uint32_t* qweight, const uint32_t* qzeros,
                                                    const ScaleT* scales, uint4* out,
                                                    const FastDims& f, uint32_t warp,
                                                    uint32_t lane) {
  uint32_t unit = warp * kFastUnitsPerWarp;
  if (unit >= f.units) return;
  const uint32_t end = unit + kFastUnitsPerWarp < f.units ? unit + kFastUnitsPerWarp : f.units;
  const uint32_t row_lanes = f.segments * 32;
  uint32_t n = unit / f.segments;
  uint32_t c = (unit - n * f.segments) * 32 + lane;
  for (; unit < end; ++unit) {
    if (c < f.chunks) dequant_fast_chunk<BITS, kZeros, Out, ScaleT>(qweight, qzeros, scales, out, f, n, c);
    c += 32;
    if (c >= row_lanes) {  // the warp's next unit starts the next row
      c -= row_lanes;
      ++n;
    }
  }
}

template <int BITS, bool kZeros, typename Out, typename ScaleT>
__global__ void __launch_bounds__(kFastThreads)
dequant_fast_kernel(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                    const ScaleT* __restrict__ scales, uint4* __restrict__ out, FastDims f) {
  dequant_fast_thread<BITS, kZeros, Out, ScaleT>(qweight, qzeros, scales, out, f,
                                                 blockIdx.x * kFastWarpsPerBlock + (threadIdx.x >> 5),
                                                 threadIdx.x & 31u);
}

// Blocks of the fast kernel: one warp per kFastUnitsPerWarp units.
inline uint32_t fast_blocks(const FastDims& f) {
  const uint32_t warps = (f.units + kFastUnitsPerWarp - 1) / kFastUnitsPerWarp;
  return (warps + kFastWarpsPerBlock - 1) / kFastWarpsPerBlock;
}

// Fills *f and returns true when the fast path covers this call.
inline bool plan_fast(const Dims& d, const void* qweight, const void* out, FastDims* f) {
  if (d.bits != 2 && d.bits != 3 && d.bits != 4 && d.bits != 8) return false;
  if (d.N < 1 || d.K < 1 || d.K % kCodesPerThread != 0) return false;
  if (reinterpret_cast<uintptr_t>(out) % 16 != 0) return false;
  if (d.bits == 8 && reinterpret_cast<uintptr_t>(qweight) % 8 != 0) return false;
  const int64_t limit = INT32_MAX;
  if (d.N > limit || d.K > limit) return false;
  uint32_t shift = 0;  // log2 of the group size in chunks
  if (d.group_size >= d.K) {
    shift = 31;  // one group per row: every chunk index is below 2^31
  } else {
    if (d.group_size < kCodesPerThread || (d.group_size & (d.group_size - 1)) != 0) return false;
    while ((int64_t(kCodesPerThread) << shift) < d.group_size) ++shift;
  }
  const int64_t chunks = d.K / kCodesPerThread;
  const int64_t segments = (chunks + 31) / 32;
  if (d.N * d.K > limit || d.N * d.words_per_row > limit || d.N * d.groups > limit ||
      d.N * d.zero_words_per_row > limit || d.N * segments > limit) {
    return false;
  }
  f->chunks = uint32_t(chunks);
  f->segments = uint32_t(segments);
  f->units = uint32_t(d.N * segments);
  f->words_per_row = uint32_t(d.words_per_row);
  f->groups = uint32_t(d.groups);
  f->zero_words_per_row = uint32_t(d.zero_words_per_row);
  f->chunk_group_shift = shift;
  return true;
}

template <int BITS, typename Out, typename ScaleT>
void launch_fast(const uint32_t* qweight, const uint32_t* qzeros, const void* scales, void* out,
                 const FastDims& f, cudaStream_t stream) {
  const ScaleT* s = static_cast<const ScaleT*>(scales);
  uint4* o = static_cast<uint4*>(out);
  if (qzeros) {
    dequant_fast_kernel<BITS, true, Out, ScaleT>
        <<<fast_blocks(f), kFastThreads, 0, stream>>>(qweight, qzeros, s, o, f);
  } else {
    dequant_fast_kernel<BITS, false, Out, ScaleT>
        <<<fast_blocks(f), kFastThreads, 0, stream>>>(qweight, qzeros, s, o, f);
  }
}

template <typename Out, typename ScaleT>
void launch_fast_for_bits(int bits, const uint32_t* qweight, const uint32_t* qzeros,
                          const void* scales, void* out, const FastDims& f, cudaStream_t stream) {
  switch (bits) {
    case 2: launch_fast<2, Out, ScaleT>(qweight, qzeros, scales, out, f, stream); break;
    case 3: launch_fast<3, Out, ScaleT>(qweight, qzeros, scales, out, f, stream); break;
    case 4: launch_fast<4, Out, ScaleT>(qweight, qzeros, scales, out, f, stream); break;
    default: launch_fast<8, Out, ScaleT>(qweight, qzeros, scales, out, f, stream); break;
  }
}

template <typename Out>
void launch_fast_for_scales(int scale_dtype, int bits, const uint32_t* qweight,
                            const uint32_t* qzeros, const void* scales, void* out,
                            const FastDims& f, cudaStream_t stream) {
  switch (scale_dtype) {
    case VLMKERN_DTYPE_F16:
      launch_fast_for_bits<Out, __half>(bits, qweight, qzeros, scales, out, f, stream);
      break;
    case VLMKERN_DTYPE_BF16:
      launch_fast_for_bits<Out, __nv_bfloat16>(bits, qweight, qzeros, scales, out, f, stream);
      break;
    default: launch_fast_for_bits<Out, float>(bits, qweight, qzeros, scales, out, f, stream); break;
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

extern "C" int vlmkern_stream_capture_id(void* stream, unsigned long long* id) {
  if (id == nullptr) return VLMKERN_ERR_NULL_POINTER;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture = 0;
  const cudaError_t err =
      cudaStreamGetCaptureInfo(static_cast<cudaStream_t>(stream), &status, &capture);
  if (err != cudaSuccess) {
    last_launch_error = err;
    cudaGetLastError();  // not left for the next launcher's check to find
    return VLMKERN_ERR_LAUNCH;
  }
  *id = status == cudaStreamCaptureStatusActive ? capture : 0;
  return VLMKERN_OK;
}

namespace {

Dims make_dims(int64_t N, int64_t K, int bits, int64_t group_size) {
  Dims d;
  d.N = N;
  d.K = K;
  d.group_size = group_size;
  d.bits = bits;
  d.groups = (K + group_size - 1) / group_size;
  d.words_per_row = (K * bits + 31) / 32;
  d.zero_words_per_row = (d.groups * bits + 31) / 32;
  return d;
}

int dequant(const int32_t* qweight, const int32_t* qzeros, const void* scales, int scale_dtype,
            void* out, int out_dtype, int64_t N, int64_t K, int bits, int64_t group_size,
            void* stream, bool fast) {
  if (bits < 1 || bits > 8) return VLMKERN_ERR_BAD_BITS;
  if (N < 0 || K < 0 || group_size < 1) return VLMKERN_ERR_BAD_SIZE;
  if (scale_dtype < VLMKERN_DTYPE_F16 || scale_dtype > VLMKERN_DTYPE_F32) return VLMKERN_ERR_BAD_DTYPE;
  if (out_dtype != VLMKERN_DTYPE_F16 && out_dtype != VLMKERN_DTYPE_BF16) return VLMKERN_ERR_BAD_DTYPE;
  if (N == 0 || K == 0) return VLMKERN_OK;  // nothing to write; empty tensors may have null data
  if (!qweight || !scales || !out) return VLMKERN_ERR_NULL_POINTER;

  const Dims d = make_dims(N, K, bits, group_size);
  // The streams are read as unsigned words so that right shifts bring in zeros.
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qweight);
  const uint32_t* qz = reinterpret_cast<const uint32_t*>(qzeros);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  FastDims f;
  if (fast && plan_fast(d, qweight, out, &f)) {
    if (out_dtype == VLMKERN_DTYPE_F16) {
      launch_fast_for_scales<OutF16>(scale_dtype, bits, qw, qz, scales, out, f, s);
    } else {
      launch_fast_for_scales<OutBF16>(scale_dtype, bits, qw, qz, scales, out, f, s);
    }
  } else if (out_dtype == VLMKERN_DTYPE_F16) {
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

}  // namespace

extern "C" int vlmkern_dequant_groupwise(const int32_t* qweight, const int32_t* qzeros,
                                         const void* scales, int scale_dtype, void* out,
                                         int out_dtype, int64_t N, int64_t K, int bits,
                                         int64_t group_size, void* stream) {
  return dequant(qweight, qzeros, scales, scale_dtype, out, out_dtype, N, K, bits, group_size,
                 stream, false);
}

extern "C" int vlmkern_dequant_groupwise_fast(const int32_t* qweight, const int32_t* qzeros,
                                              const void* scales, int scale_dtype, void* out,
                                              int out_dtype, int64_t N, int64_t K, int bits,
                                              int64_t group_size, void* stream) {
  return dequant(qweight, qzeros, scales, scale_dtype, out, out_dtype, N, K, bits, group_size,
                 stream, true);
}
