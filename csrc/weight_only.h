// C interface of the tensor-core weight-only matmuls (W2/W3/W4): mma.sync for
// M = 1..64 on every GPU from sm_80, wgmma for any M on sm_90a.
//
// Free of torch and CUDA types so that any C++ host code can include it.
//
// The kernel reads weights in its own layout, made once at load time by
// vlmkern/ops/cuda_weight_only.py from the canonical group-wise format:
//
//   wq  int32 [NB, C, 8, 64*bits]   NB = ceil(N/128) blocks of 128 output rows,
//                                   C = ceil(K/128) chunks of 128 input columns,
//                                   8 tiles of 16 rows per block (one per warp),
//                                   then the codes of one 16x128 tile in the
//                                   order the 32 lanes of a warp hold them as
//                                   m16n8k16 A fragments (see the Python module).
//   sz  int32 [NB, C, 8, S, 8, 2]   S = 8 >> slot_log2 scale slots per chunk, each
//                                   covering 16 << slot_log2 columns; for row pair
//                                   (g, g+8) of a tile: word 0 = the two scales,
//                                   word 1 = -(magic + zero) of the two rows, as
//                                   16-bit patterns of the activation type.
//
// y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], fp32 accumulation, one rounding
// to the activation type at the end.
#pragma once

#include <stdint.h>

#include "vlmkern_kernels.h"  // enum vlmkern_dtype

#ifdef __cplusplus
extern "C" {
#endif

enum vlmkern_wo_status {
  VLMKERN_WO_OK = 0,
  VLMKERN_WO_ERR_NULL_POINTER = 1,  // x, wq, sz, out or counters is null
  VLMKERN_WO_ERR_BAD_BITS = 2,      // bits not 2, 3 or 4
  VLMKERN_WO_ERR_BAD_SIZE = 3,      // M < 1 (> 64 for the mma.sync kernel), sizes inconsistent, ...
  VLMKERN_WO_ERR_BAD_DTYPE = 4,     // activation not f16/bf16, or bias not f16/bf16/f32
  VLMKERN_WO_ERR_ALIGNMENT = 5,     // x, wq or sz not 16-byte aligned, K_x not a multiple of 8,
                                    // or out, bias, workspace, counters, sx or partial not
                                    // aligned to their elements (out to 4 bytes for the
                                    // WGMMA kernel when N is even)
  VLMKERN_WO_ERR_SHARED_MEMORY = 6, // the device cannot give a block the shared memory it needs
  VLMKERN_WO_ERR_LAUNCH = 7,        // a CUDA call failed (message has the CUDA error)
  VLMKERN_WO_ERR_BAD_DECODE = 8,    // unknown decode, or post-scale with M too large (see below)
  VLMKERN_WO_ERR_NO_SM90A = 9,      // the WGMMA kernel off sm_90 or in a build without sm_90a
                                    // code (or the probe for it failed)
};

// How the kernel turns codes into MMA operands.
//   EXACT: A = s * (q - z) rounded once to the activation type, the weight the
//          torch reference dequantizes to.
//   POST_SCALE: A = q - z (exact), products summed in fp32 per scale slot and
//          multiplied by the scale there: fewer instructions per weight and
//          no 16-bit rounding of the weight; M <= 16, or M <= 64 with
//          slots of 128 columns (slot_log2 = 3), where its per-slot sums
//          still fit the register budget.
//   POST_SCALE_ACQ_REL: POST_SCALE, the same sums and results bit for bit,
//          with a row block split between thread blocks published by one
//          acq_rel atomic per part instead of a fence.sc.gpu in every
//          thread (which also waits on the thread's outstanding copies);
//          M <= 16 and slot_log2 = 3 only.
//   POST_SCALE_3CTA: POST_SCALE compiled for three thread blocks per SM
//          (at most 80 registers a thread instead of 128; 5 pipeline stages
//          instead of 6 above 8 tokens), for grids of three blocks per SM
//          where their shared memory fits (Hopper): for a given num_ctas the
//          same sums in the same order, so the same bits; M <= 16 with
//          slot_log2 = 3, M <= 8 with slot_log2 = 2, nothing else.
enum vlmkern_wo_decode {
  VLMKERN_WO_DECODE_EXACT = 0,
  VLMKERN_WO_DECODE_POST_SCALE = 1,
  VLMKERN_WO_DECODE_POST_SCALE_ACQ_REL = 2,
  VLMKERN_WO_DECODE_POST_SCALE_3CTA = 3
};
// Largest M decode 3 takes for a slot width (0: none).
#define VLMKERN_WO_POST_SCALE_3CTA_LIMIT(slot_log2) \
  ((slot_log2) == 3 ? 16 : (slot_log2) == 2 ? 8 : 0)
#define VLMKERN_WO_POST_SCALE_MAX_M 16
#define VLMKERN_WO_POST_SCALE_WIDE_MAX_M 64  // with slot_log2 = 3
// Largest M the post-scale decode takes for a slot width.
#define VLMKERN_WO_POST_SCALE_LIMIT(slot_log2) \
  ((slot_log2) == 3 ? VLMKERN_WO_POST_SCALE_WIDE_MAX_M : VLMKERN_WO_POST_SCALE_MAX_M)

// Largest M one launch accepts; larger batches belong to dequantize + GEMM.
#define VLMKERN_WO_MAX_M 64

// Human-readable text for a status code (the CUDA error for ..._LAUNCH).
const char* vlmkern_wo_status_message(int status);

// Number of fp32 elements the workspace must hold for a launch.
int64_t vlmkern_wo_workspace_elems(int64_t M, int64_t num_ctas);

// Enqueue y = x @ W^T + bias on `stream` (a cudaStream_t as void*).
//
//   x         [M, K_x] activations (act_dtype F16 or BF16), contiguous, K_x a
//             multiple of 8 with C = ceil(K_x / 128); columns past the weight's
//             K must be zero (the caller pads).
//   wq, sz    the kernel layout above, for NB blocks and C chunks.
//   bias      [N] of bias_dtype (F16, BF16 or F32), or NULL.
//   out       [M, N] of act_dtype, contiguous.
//   workspace vlmkern_wo_workspace_elems(M, num_ctas) fp32 elements (scratch).
//   counters  NB int32 that are zero before the launch; the kernel leaves them
//             zero. Launches sharing a counters buffer must not run concurrently.
//   num_ctas  number of thread blocks, 1 .. NB*C; the NB*C (block, chunk) units
//             are split evenly over them in a fixed order (stream-K), so the
//             result depends on num_ctas but never on M or on timing.
//   decode    a vlmkern_wo_decode.
int vlmkern_weight_only_mma(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                            const int32_t* sz, int64_t NB, int64_t C, int slot_log2, int bits,
                            const void* bias, int bias_dtype, void* out, int64_t N,
                            float* workspace, int32_t* counters, int64_t num_ctas, int act_dtype,
                            int decode, void* stream);

// The same kernel with a table decode, for binarized weights in the
// lookup-table layout of binary.h (codes, tables, merge, made by
// vlmkern/ops/cuda_binary_lut.py): codes take the place of 2-bit wq, tables
// that of sz with 4 slots per tile, and each stage also receives its chunk's
// merge selectors. Activations reach the MMAs through the shared-memory
// pipeline (ldmatrix), not from global memory as in binary_lut_kernel.cu, so
// the 8 warps of a block read them once per chunk. Arguments as for
// vlmkern_weight_only_mma (no bits, slot_log2 or decode); merge 16-byte
// aligned. Returns a vlmkern_wo_status (vlmkern_wo_status_message).
int vlmkern_binary_lut_staged_mma(const void* x, int64_t M, int64_t K_x, const int32_t* codes,
                                  const int32_t* tables, const int32_t* merge, int64_t NB,
                                  int64_t C, const void* bias, int bias_dtype, void* out, int64_t N,
                                  float* workspace, int32_t* counters, int64_t num_ctas,
                                  int act_dtype, void* stream);
// The same kernel with an integer decode, for integer-activation layers whose
// weights are stored as int8 (W8A8, W6A6; vlmkern/ops/cuda_int_act.py):
// int8 MMA (m16n8k32) on int8 weights and per-token int8 activation codes,
// exact int32 sums per scale slot, each multiplied by the row's fp32 scale
// and added to fp32 sums, then out = sum * sx[m] + bias in one fma, rounded
// once. Its layout counts 16 bits per weight position: a unit is 128 rows by
// 256 codes of K, C = ceil(K_q / 256).
//   q         [M, K_q] int8 activation codes, K_q a multiple of 16, codes past
//             the weight's K zero; 16-byte aligned.
//   wq        int32 [NB, C, 8, 1024]: per 16-row tile its 16 x 256 int8
//             weights in m16n8k32 A-fragment order, [8 steps][32 lanes][16 bytes]
//             (lane 4g + t: rows g, g + 8, codes 32*step + 4t + 0..3 and + 16).
//   sz        int32 [NB, C, 8, S, 8, 2] with S = 8 >> slot_log2 slots of
//             32 << slot_log2 codes: for row pair (g, g + 8) the two fp32
//             scales of the slot's group.
//   sx        [M] fp32 token scales; out [M, N] of out_dtype (F16 or BF16).
//   M <= VLMKERN_WO_INT8_MAX_M; the rest as for vlmkern_weight_only_mma.
#define VLMKERN_WO_INT8_MAX_M 32
int vlmkern_int_act_staged_mma(const int8_t* q, int64_t M, int64_t K_q, const int32_t* wq,
                               const int32_t* sz, int64_t NB, int64_t C, int slot_log2,
                               const float* sx, const void* bias, int bias_dtype, void* out,
                               int64_t N, float* workspace, int32_t* counters, int64_t num_ctas,
                               int out_dtype, void* stream);
// The Hopper kernel (csrc/weight_only_sm90_kernel.cu, sm_90a builds): the same
// arguments without workspace, counters, num_ctas and decode (the exact
// decode), any M >= 1, NB <= 65535. One thread block per 128 weight rows and
// 64 tokens (M <= 64) or 128, per K slice; a token's result depends only on
// that tile width, its place in its tile and the number of slices.
//   splits    1..C K slices (split-K, for grids too small to fill the GPU);
//             with splits > 1, partial holds splits*M*N fp32 (scratch) and a
//             second kernel sums the slices in order.
int vlmkern_weight_only_wgmma(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                              const int32_t* sz, int64_t NB, int64_t C, int slot_log2, int bits,
                              const void* bias, int bias_dtype, void* out, int64_t N,
                              int act_dtype, int splits, float* partial, void* stream);

// The warp-specialized Hopper kernel for batches and prefill
// (csrc/weight_only_sm90_tma_kernel.cu, sm_90a builds): the arguments of
// vlmkern_weight_only_wgmma; the exact decode, fed to wgmma
// from registers; token tiles (64 tokens for M <= 64, else 128) copied by
// TMA and shared by a cluster of two thread blocks; any M >= 1; K_x * 2
// bytes a multiple of 16; splits K slices (1..min(C, 65535)), whose partial
// sums ([splits, M, N] fp32 in `partial`, needed when splits > 1) a second
// kernel adds in slice order. A token's result depends only on its place in
// its token tile, the tile width and splits.
int vlmkern_weight_only_tma(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                            const int32_t* sz, int64_t NB, int64_t C, int slot_log2, int bits,
                            const void* bias, int bias_dtype, void* out, int64_t N,
                            int act_dtype, int splits, float* partial, void* stream);

// The same kernel with the table decode of binarized weights in the
// lookup-table layout of binary.h (codes, tables, merge; arguments as for
// vlmkern_binary_lut_staged_mma without workspace, counters and num_ctas,
// and splits and partial as for vlmkern_weight_only_tma).
int vlmkern_binary_lut_tma(const void* x, int64_t M, int64_t K_x, const int32_t* codes,
                           const int32_t* tables, const int32_t* merge, int64_t NB, int64_t C,
                           const void* bias, int bias_dtype, void* out, int64_t N, int act_dtype,
                           int splits, float* partial, void* stream);

// Decode on the same kernel (M <= 16): a 16-token tile, as many pipeline
// stages as fit, and a stream-K split instead of K slices: the layer's
// (row pair, 128-column chunk) positions, pair by pair, are cut into one
// equal range per cluster (at most max_clusters, 1..32767, and at most as
// many as the GPU holds at once). A row block whose chunks span several
// ranges is finished by the part that arrives last, which adds the parts'
// fp32 sums (in `workspace`, vlmkern_wo_tma_decode_workspace_elems(M, NB, C,
// max_clusters) floats) in cluster order; `counters` ([NB] int32, zero) count
// the arrived parts and are left zero. For a given max_clusters and GPU the
// result is deterministic and the same for every M <= 16. Other arguments as
// for vlmkern_weight_only_tma / vlmkern_binary_lut_tma.
int64_t vlmkern_wo_tma_decode_workspace_elems(int64_t M, int64_t NB, int64_t C,
                                              int64_t max_clusters);
int vlmkern_weight_only_tma_decode(const void* x, int64_t M, int64_t K_x, const int32_t* wq,
                                   const int32_t* sz, int64_t NB, int64_t C, int slot_log2,
                                   int bits, const void* bias, int bias_dtype, void* out, int64_t N,
                                   int act_dtype, float* workspace, int32_t* counters,
                                   int64_t max_clusters, void* stream);
int vlmkern_binary_lut_tma_decode(const void* x, int64_t M, int64_t K_x, const int32_t* codes,
                                  const int32_t* tables, const int32_t* merge, int64_t NB,
                                  int64_t C, const void* bias, int bias_dtype, void* out, int64_t N,
                                  int act_dtype, float* workspace, int32_t* counters,
                                  int64_t max_clusters, void* stream);

// The dense weight the exact decode stands for, from the layout alone
// (csrc/weight_only_dequant_kernel.cu, every GPU from sm_80): for dequantize
// + GEMM at large M when a layer keeps only this layout on the device.
//
//   wq, sz     the kernel layout above, for NB blocks and C chunks, made for
//              act_dtype (sz holds 16-bit patterns of that type); 16-byte aligned.
//   out        [N, K] of act_dtype (F16 or BF16), row-major, contiguous, at
//              least 2-byte aligned; (NB-1)*128 < N <= NB*128 and
//              (C-1)*128 < K <= C*128. Padding rows and columns of the layout
//              are not written. Rows are written with 16-byte stores when
//              K % 8 == 0 and out is 16-byte aligned, 2-byte stores otherwise.
//   slot_log2  0..3, as the layout was made; NB*C at most 2^31 - 1.
//
// out[n, k] = s * (q - z) rounded once to act_dtype, bit for bit the A operand
// of the exact decode. Returns a vlmkern_wo_status: BAD_SIZE for inconsistent
// sizes, ALIGNMENT for a misaligned wq, sz or out.
int vlmkern_weight_only_dequant(const int32_t* wq, const int32_t* sz, int64_t NB, int64_t C,
                                int slot_log2, int bits, void* out, int64_t N, int64_t K,
                                int act_dtype, void* stream);

// Whether this build holds its sm_90a code: vlmkern_int_act_sm90_available
// (int_act.h) answers for every kernel file, all built for the same
// architectures.

#ifdef __cplusplus
}
#endif
