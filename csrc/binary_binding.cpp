// Torch binding of the binarized matmuls: argument checks with readable
// errors, output and scratch allocation, the current CUDA stream, and
// registration with a CUDA and a Meta kernel (the Meta one only checks and
// computes the shape, for torch.compile) of
//   torch.ops.vlmkern.binary_matmul   the plane GEMM (binary_kernel.cu)
//   torch.ops.vlmkern.binary_lut_mma  the lookup-table GEMM (binary_lut_kernel.cu)
//   torch.ops.vlmkern.binary_lut_staged_mma  the same layout on the weight-only
//                                     pipeline (weight_only_kernel.cu, table decode)
//   torch.ops.vlmkern.binary_lut_tma  the same layout on the warp-specialized Hopper
//                                     kernel (weight_only_sm90_tma_kernel.cu), any M
//   torch.ops.vlmkern.binary_lut_tma_decode  the same kernel's decode path (M <= 16)
//   torch.ops.vlmkern.binary_dequant  the dense weight (binary_dequant_kernel.cu)
//   torch.ops.vlmkern.binary_lut_dequant  the same from the lookup-table layout
//
// Only device-generic torch headers are used, like bindings.cpp; the library
// and its module init live there.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "torch_stream.h"
#include "binary.h"
#include "weight_only.h"  // vlmkern_binary_lut_staged_mma, vlmkern_binary_lut_tma(_decode): table decodes

namespace {

constexpr const char* kOp = "vlmkern.binary_matmul: ";

std::string dims(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

int dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return VLMKERN_BINARY_F16;
    case at::kBFloat16: return VLMKERN_BINARY_BF16;
    case at::kFloat: return VLMKERN_BINARY_F32;
    default: return -1;
  }
}

void check_shape(const at::Tensor& t, const char* name, const char* formula,
                 std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(expected), kOp, name, " must have shape ", formula,
              " = ", dims(expected), ", got ", dims(t.sizes()));
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), kOp, name, " is on ", t.device(), " but sign is on ",
              ref.device());
}

// Returns (M, N).
std::pair<int64_t, int64_t> check_inputs(const at::Tensor& x, const at::Tensor& salient,
                                         const at::Tensor& sign, const at::Tensor& aux,
                                         const at::Tensor& stats,
                                         const std::optional<at::Tensor>& bias,
                                         int64_t in_features, int64_t block_size, int64_t ksplit) {
  const int64_t K = in_features;
  TORCH_CHECK(K >= 1, kOp, "in_features must be >= 1, got ", K);
  TORCH_CHECK(block_size >= 32 && block_size % 32 == 0, kOp,
              "block_size must be a positive multiple of 32, got ", block_size);
  TORCH_CHECK(ksplit >= 1 && ksplit <= 65535, kOp, "ksplit must be in 1..65535, got ", ksplit);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, kOp, "x must have shape [M, ", K, "], got ",
              dims(x.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, kOp,
              "x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) == 0 || x.stride(1) == 1, kOp, "x rows must be contiguous (stride 1)");
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= K, kOp, "x rows must not overlap, stride(0) = ",
              x.stride(0));
  TORCH_CHECK(x.size(0) <= VLMKERN_BINARY_MAX_M, kOp, "x has ", x.size(0),
              " rows; one call takes at most ", VLMKERN_BINARY_MAX_M, " (split the tokens)");
  TORCH_CHECK(sign.dim() == 2 && sign.scalar_type() == at::kInt, kOp,
              "sign must be a 2-D int32 tensor, got ", sign.scalar_type(), " ", dims(sign.sizes()));
  const int64_t N = sign.size(0), words = sign.size(1), nblk = (K + block_size - 1) / block_size;
  TORCH_CHECK(words % 4 == 0 && words * 32 >= K, kOp, "sign rows must hold at least ceil(K/32) = ",
              (K + 31) / 32, " words, padded to a multiple of 4, got ", words);
  TORCH_CHECK(aux.scalar_type() == at::kInt, kOp, "aux must be int32, got ", aux.scalar_type());
  check_shape(aux, "aux", "sign's shape", {N, words});
  TORCH_CHECK(salient.scalar_type() == at::kInt, kOp, "salient must be int32, got ",
              salient.scalar_type());
  check_shape(salient, "salient", "[ceil(K/32)]", {(K + 31) / 32});
  TORCH_CHECK(dtype_code(stats.scalar_type()) >= 0, kOp,
              "stats must be float16, bfloat16 or float32, got ", stats.scalar_type());
  check_shape(stats, "stats", "[N, ceil(K/block_size), 8]", {N, nblk, 8});
  TORCH_CHECK(sign.is_contiguous() && aux.is_contiguous() && salient.is_contiguous() &&
                  stats.is_contiguous(),
              kOp, "sign, aux, salient and stats must be contiguous");
  check_device(x, "x", sign);
  check_device(aux, "aux", sign);
  check_device(salient, "salient", sign);
  check_device(stats, "stats", sign);
  if (bias.has_value()) {
    TORCH_CHECK(dtype_code(bias->scalar_type()) >= 0, kOp,
                "bias must be float16, bfloat16 or float32, got ", bias->scalar_type());
    check_shape(*bias, "bias", "[N]", {N});
    TORCH_CHECK(bias->is_contiguous(), kOp, "bias must be contiguous");
    check_device(*bias, "bias", sign);
  }
  return {x.size(0), N};
}

at::Tensor binary_cuda(const at::Tensor& x, const at::Tensor& salient, const at::Tensor& sign,
                       const at::Tensor& aux, const at::Tensor& stats,
                       const std::optional<at::Tensor>& bias, int64_t in_features,
                       int64_t block_size, int64_t ksplit) {
  TORCH_CHECK(sign.is_cuda(), kOp, "sign must be a CUDA tensor, got ", sign.device());
  auto [M, N] = check_inputs(x, salient, sign, aux, stats, bias, in_features, block_size, ksplit);
  c10::DeviceGuard guard(sign.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  TORCH_CHECK(reinterpret_cast<uintptr_t>(sign.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(aux.data_ptr()) % 16 == 0,
              kOp, "sign and aux must be 16-byte aligned");
  const int64_t bytes =
      vlmkern_binary_workspace_bytes(M, N, in_features, block_size, static_cast<int>(ksplit));
  TORCH_CHECK(bytes >= 0, kOp, "invalid sizes for the workspace");
  at::Tensor workspace = at::empty({bytes}, x.options().dtype(at::kByte));
  void* stream = vlmkern_current_stream(sign);
  const int status = vlmkern_binary_matmul(
      x.data_ptr(), dtype_code(x.scalar_type()), M > 1 ? x.stride(0) : in_features,
      salient.data_ptr<int32_t>(), sign.data_ptr<int32_t>(), aux.data_ptr<int32_t>(), sign.size(1),
      stats.data_ptr(), dtype_code(stats.scalar_type()),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : 0, out.data_ptr(), M, N, in_features,
      block_size, static_cast<int>(ksplit), workspace.data_ptr(), stream);
  TORCH_CHECK(status == VLMKERN_BINARY_OK, kOp, vlmkern_binary_status_message(status));
  return out;
}

at::Tensor binary_meta(const at::Tensor& x, const at::Tensor& salient, const at::Tensor& sign,
                       const at::Tensor& aux, const at::Tensor& stats,
                       const std::optional<at::Tensor>& bias, int64_t in_features,
                       int64_t block_size, int64_t ksplit) {
  auto [M, N] = check_inputs(x, salient, sign, aux, stats, bias, in_features, block_size, ksplit);
  return at::empty({M, N}, x.options());
}

// -- lookup-table GEMM ----------------------------------------------------------------------
constexpr const char* kLutOp = "vlmkern.binary_lut_mma: ";
constexpr int64_t kLutRows = 128;   // rows per layout block
constexpr int64_t kLutChunk = 128;  // columns per layout chunk
constexpr int64_t kLutMaxM = 64;

void lut_shape(const char* op, const at::Tensor& t, const char* name, const char* formula,
               std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(expected), op, name, " must have shape ", formula,
              " = ", dims(expected), ", got ", dims(t.sizes()));
}

void lut_layout_tensor(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

// Checks shared by both table ops (`op` names the op in messages) and their
// CUDA and Meta implementations.
void check_lut_inputs(const char* op, const at::Tensor& x, const at::Tensor& codes,
                      const at::Tensor& tables, const at::Tensor& merge,
                      const std::optional<at::Tensor>& bias, int64_t out_features, int64_t ksplit,
                      int64_t max_m = kLutMaxM) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              "x must be float16 or bfloat16 (the type the tables were made for), got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, "x must be 2-D [M, K_x], got shape ", dims(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), op, "x must be contiguous");
  TORCH_CHECK(x.size(0) <= max_m, op, "M (rows of x) must be at most ", max_m, ", got ",
              x.size(0));
  TORCH_CHECK(x.size(1) % 8 == 0, op,
              "x's row length must be a multiple of 8 (pad with zero columns), got ", x.size(1));
  TORCH_CHECK(codes.dim() == 4, op, "codes must be 4-D [NB, C, 8, 128], got shape ",
              dims(codes.sizes()));
  const int64_t NB = codes.size(0), C = codes.size(1);
  TORCH_CHECK(NB >= 1 && C >= 1, op, "codes must not be empty, got shape ", dims(codes.sizes()));
  lut_layout_tensor(op, codes, "codes", x);
  lut_layout_tensor(op, tables, "tables", x);
  lut_layout_tensor(op, merge, "merge", x);
  lut_shape(op, codes, "codes", "[NB, C, 8, 128]", {NB, C, 8, 128});
  lut_shape(op, tables, "tables", "[NB, C, 8, 8, 2, 4]", {NB, C, 8, 8, 2, 4});
  lut_shape(op, merge, "merge", "[C, 32, 8]", {C, 32, 8});
  TORCH_CHECK(out_features > (NB - 1) * kLutRows && out_features <= NB * kLutRows, op,
              "out_features=", out_features, " does not match the layout's ", NB, " blocks of ",
              kLutRows, " rows");
  TORCH_CHECK(x.size(1) > (C - 1) * kLutChunk && x.size(1) <= C * kLutChunk, op, "x has ",
              x.size(1), " columns but the layout has ", C, " chunks of ", kLutChunk,
              " (in_features padded to a multiple of 8)");
  TORCH_CHECK(ksplit >= 1 && ksplit <= std::min<int64_t>(C, 65535), op, "ksplit must be in 1..",
              std::min<int64_t>(C, 65535), " (at most one part per chunk of 128 columns), got ",
              ksplit);
  TORCH_CHECK(NB <= 0x7fffffff / kLutRows && C <= 0x7fffffff / kLutChunk, op,
              "the layout is too large: ", NB, " row blocks, ", C, " chunks");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(dtype_code(b.scalar_type()) >= 0, op,
                "bias must be float16, bfloat16 or float32, got ", b.scalar_type());
    lut_shape(op, b, "bias", "[out_features]", {out_features});
    TORCH_CHECK(b.device() == x.device(), op, "bias is on ", b.device(), " but x is on ",
                x.device());
    TORCH_CHECK(b.is_contiguous(), op, "bias must be contiguous");
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

at::Tensor binary_lut_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables,
                           const at::Tensor& merge, const std::optional<at::Tensor>& bias,
                           int64_t out_features, int64_t ksplit) {
  TORCH_CHECK(x.is_cuda(), kLutOp, "x must be a CUDA tensor, got ", x.device());
  check_lut_inputs(kLutOp, x, codes, tables, merge, bias, out_features, ksplit);
  const int64_t M = x.size(0);
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  TORCH_CHECK(aligned16(x), kLutOp, "x must be 16-byte aligned (a view at an odd offset? clone it)");
  TORCH_CHECK(aligned16(codes) && aligned16(tables) && aligned16(merge), kLutOp,
              "codes, tables and merge must be 16-byte aligned");
  const int64_t elems = vlmkern_binary_lut_workspace_elems(M, out_features, static_cast<int>(ksplit));
  TORCH_CHECK(elems >= 0, kLutOp, "invalid sizes for the workspace");
  at::Tensor workspace;
  if (elems > 0) workspace = at::empty({elems}, x.options().dtype(at::kFloat));
  void* stream = vlmkern_current_stream(x);
  const int status = vlmkern_binary_lut_mma(
      x.data_ptr(), M, x.size(1), codes.data_ptr<int32_t>(), tables.data_ptr<int32_t>(),
      merge.data_ptr<int32_t>(), codes.size(0), codes.size(1),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : VLMKERN_BINARY_F32, out.data_ptr(),
      out_features, static_cast<int>(ksplit), elems > 0 ? workspace.data_ptr<float>() : nullptr,
      dtype_code(x.scalar_type()), stream);
  TORCH_CHECK(status == VLMKERN_BINARY_OK, kLutOp, vlmkern_binary_lut_status_message(status));
  return out;
}

at::Tensor binary_lut_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables,
                           const at::Tensor& merge, const std::optional<at::Tensor>& bias,
                           int64_t out_features, int64_t ksplit) {
  check_lut_inputs(kLutOp, x, codes, tables, merge, bias, out_features, ksplit);
  return at::empty({x.size(0), out_features}, x.options());
}

// -- the same layout on the weight-only pipeline ------------------------------------------
constexpr const char* kStagedOp = "vlmkern.binary_lut_staged_mma: ";
static_assert(int(VLMKERN_BINARY_F16) == int(VLMKERN_DTYPE_F16) &&
                  int(VLMKERN_BINARY_BF16) == int(VLMKERN_DTYPE_BF16) &&
                  int(VLMKERN_BINARY_F32) == int(VLMKERN_DTYPE_F32),
              "the two launchers number dtypes alike");

void check_staged_inputs(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables,
                         const at::Tensor& merge, const std::optional<at::Tensor>& bias,
                         const at::Tensor& counters, int64_t out_features, int64_t num_ctas) {
  check_lut_inputs(kStagedOp, x, codes, tables, merge, bias, out_features, /*ksplit=*/1);
  const int64_t NB = codes.size(0), C = codes.size(1);
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.dim() == 1 && counters.numel() >= NB,
              kStagedOp, "counters must be a 1-D int32 tensor of at least ", NB, " elements");
  TORCH_CHECK(counters.device() == x.device(), kStagedOp, "counters is on ", counters.device(),
              " but x is on ", x.device());
  TORCH_CHECK(counters.is_contiguous(), kStagedOp, "counters must be contiguous");
  TORCH_CHECK(num_ctas >= 1 && num_ctas <= NB * C, kStagedOp, "num_ctas must be in 1..", NB * C,
              ", got ", num_ctas);
}

at::Tensor binary_lut_staged_cuda(const at::Tensor& x, const at::Tensor& codes,
                                  const at::Tensor& tables, const at::Tensor& merge,
                                  const std::optional<at::Tensor>& bias, at::Tensor& counters,
                                  int64_t out_features, int64_t num_ctas) {
  TORCH_CHECK(x.is_cuda(), kStagedOp, "x must be a CUDA tensor, got ", x.device());
  check_staged_inputs(x, codes, tables, merge, bias, counters, out_features, num_ctas);
  const int64_t M = x.size(0);
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  TORCH_CHECK(aligned16(x), kStagedOp, "x must be 16-byte aligned (a view at an odd offset? clone it)");
  TORCH_CHECK(aligned16(codes) && aligned16(tables) && aligned16(merge), kStagedOp,
              "codes, tables and merge must be 16-byte aligned");
  at::Tensor workspace =
      at::empty({vlmkern_wo_workspace_elems(M, num_ctas)}, x.options().dtype(at::kFloat));
  void* stream = vlmkern_current_stream(x);
  const int status = vlmkern_binary_lut_staged_mma(
      x.data_ptr(), M, x.size(1), codes.data_ptr<int32_t>(), tables.data_ptr<int32_t>(),
      merge.data_ptr<int32_t>(), codes.size(0), codes.size(1),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), out_features,
      workspace.data_ptr<float>(), counters.data_ptr<int32_t>(), num_ctas,
      dtype_code(x.scalar_type()), stream);
  TORCH_CHECK(status == VLMKERN_WO_OK, kStagedOp, vlmkern_wo_status_message(status));
  return out;
}

at::Tensor binary_lut_staged_meta(const at::Tensor& x, const at::Tensor& codes,
                                  const at::Tensor& tables, const at::Tensor& merge,
                                  const std::optional<at::Tensor>& bias, at::Tensor& counters,
                                  int64_t out_features, int64_t num_ctas) {
  check_staged_inputs(x, codes, tables, merge, bias, counters, out_features, num_ctas);
  return at::empty({x.size(0), out_features}, x.options());
}

// -- the same layout on the warp-specialized Hopper kernel ---------------------------------
constexpr const char* kTmaOp = "vlmkern.binary_lut_tma: ";
constexpr int64_t kTmaMaxM = 0x7fffff00;  // TMA coordinates are 32-bit

at::Tensor binary_lut_tma_cuda(const at::Tensor& x, const at::Tensor& codes,
                               const at::Tensor& tables, const at::Tensor& merge,
                               const std::optional<at::Tensor>& bias, int64_t out_features,
                               int64_t ksplit) {
  TORCH_CHECK(x.is_cuda(), kTmaOp, "x must be a CUDA tensor, got ", x.device());
  check_lut_inputs(kTmaOp, x, codes, tables, merge, bias, out_features, ksplit, kTmaMaxM);
  const int64_t M = x.size(0);
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  at::Tensor partial;
  if (ksplit > 1) partial = at::empty({ksplit * M * out_features}, x.options().dtype(at::kFloat));
  TORCH_CHECK(aligned16(x), kTmaOp, "x must be 16-byte aligned (a view at an odd offset? clone it)");
  TORCH_CHECK(aligned16(codes) && aligned16(tables) && aligned16(merge), kTmaOp,
              "codes, tables and merge must be 16-byte aligned");
  void* stream = vlmkern_current_stream(x);
  const int status = vlmkern_binary_lut_tma(
      x.data_ptr(), M, x.size(1), codes.data_ptr<int32_t>(), tables.data_ptr<int32_t>(),
      merge.data_ptr<int32_t>(), codes.size(0), codes.size(1),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), out_features,
      dtype_code(x.scalar_type()), static_cast<int>(ksplit),
      ksplit > 1 ? partial.data_ptr<float>() : nullptr, stream);
  TORCH_CHECK(status == VLMKERN_WO_OK, kTmaOp, vlmkern_wo_status_message(status));
  return out;
}

at::Tensor binary_lut_tma_meta(const at::Tensor& x, const at::Tensor& codes,
                               const at::Tensor& tables, const at::Tensor& merge,
                               const std::optional<at::Tensor>& bias, int64_t out_features,
                               int64_t ksplit) {
  check_lut_inputs(kTmaOp, x, codes, tables, merge, bias, out_features, ksplit, kTmaMaxM);
  return at::empty({x.size(0), out_features}, x.options());
}

constexpr const char* kTmaDecOp = "vlmkern.binary_lut_tma_decode: ";

void check_tma_decode_inputs(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables,
                             const at::Tensor& merge, const std::optional<at::Tensor>& bias,
                             const at::Tensor& counters, int64_t out_features,
                             int64_t max_clusters) {
  check_lut_inputs(kTmaDecOp, x, codes, tables, merge, bias, out_features, /*ksplit=*/1,
                   /*max_m=*/16);
  const int64_t NB = codes.size(0);
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.dim() == 1 && counters.numel() >= NB,
              kTmaDecOp, "counters must be a 1-D int32 tensor of at least ", NB, " elements");
  TORCH_CHECK(counters.device() == x.device(), kTmaDecOp, "counters is on ", counters.device(),
              " but x is on ", x.device());
  TORCH_CHECK(counters.is_contiguous(), kTmaDecOp, "counters must be contiguous");
  TORCH_CHECK(max_clusters >= 1 && max_clusters <= 32767, kTmaDecOp,
              "max_clusters must be in 1..32767, got ", max_clusters);
}

at::Tensor binary_lut_tma_decode_cuda(const at::Tensor& x, const at::Tensor& codes,
                                      const at::Tensor& tables, const at::Tensor& merge,
                                      const std::optional<at::Tensor>& bias, at::Tensor& counters,
                                      int64_t out_features, int64_t max_clusters) {
  TORCH_CHECK(x.is_cuda(), kTmaDecOp, "x must be a CUDA tensor, got ", x.device());
  check_tma_decode_inputs(x, codes, tables, merge, bias, counters, out_features, max_clusters);
  const int64_t M = x.size(0);
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  TORCH_CHECK(aligned16(x), kTmaDecOp, "x must be 16-byte aligned (a view at an odd offset? clone it)");
  TORCH_CHECK(aligned16(codes) && aligned16(tables) && aligned16(merge), kTmaDecOp,
              "codes, tables and merge must be 16-byte aligned");
  const int64_t elems =
      vlmkern_wo_tma_decode_workspace_elems(M, codes.size(0), codes.size(1), max_clusters);
  at::Tensor workspace = at::empty({elems}, x.options().dtype(at::kFloat));
  void* stream = vlmkern_current_stream(x);
  const int status = vlmkern_binary_lut_tma_decode(
      x.data_ptr(), M, x.size(1), codes.data_ptr<int32_t>(), tables.data_ptr<int32_t>(),
      merge.data_ptr<int32_t>(), codes.size(0), codes.size(1),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), out_features,
      dtype_code(x.scalar_type()), workspace.data_ptr<float>(), counters.data_ptr<int32_t>(),
      max_clusters, stream);
  TORCH_CHECK(status == VLMKERN_WO_OK, kTmaDecOp, vlmkern_wo_status_message(status));
  return out;
}

at::Tensor binary_lut_tma_decode_meta(const at::Tensor& x, const at::Tensor& codes,
                                      const at::Tensor& tables, const at::Tensor& merge,
                                      const std::optional<at::Tensor>& bias, at::Tensor& counters,
                                      int64_t out_features, int64_t max_clusters) {
  check_tma_decode_inputs(x, codes, tables, merge, bias, counters, out_features, max_clusters);
  return at::empty({x.size(0), out_features}, x.options());
}

// -- dense weight -----------------------------------------------------------------------
constexpr const char* kDequantOp = "vlmkern.binary_dequant: ";

void check_dequant_inputs(const at::Tensor& sign, const at::Tensor& aux, const at::Tensor& salient,
                          const at::Tensor& stats, int64_t in_features, int64_t block_size,
                          c10::ScalarType dtype) {
  const char* op = kDequantOp;
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
              "dtype must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(in_features >= 8 && in_features % 8 == 0, op,
              "in_features must be a positive multiple of 8, got ", in_features);
  TORCH_CHECK(block_size >= 8 && block_size % 8 == 0, op,
              "block_size must be a positive multiple of 8, got ", block_size);
  TORCH_CHECK(sign.dim() == 2, op, "sign must be 2-D [N, ceil(K/32)], got shape ",
              dims(sign.sizes()));
  const int64_t N = sign.size(0), words = (in_features + 31) / 32;
  const int64_t blocks = (in_features + block_size - 1) / block_size;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{sign, "sign"},
                                 {aux, "aux"}, {salient, "salient"}}) {
    TORCH_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == sign.device(), op, name, " is on ", t.device(), " but sign is on ",
                sign.device());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  }
  lut_shape(op, sign, "sign", "[N, ceil(K/32)]", {N, words});
  lut_shape(op, aux, "aux", "[N, ceil(K/32)]", {N, words});
  lut_shape(op, salient, "salient", "[ceil(K/32)]", {words});
  TORCH_CHECK(dtype_code(stats.scalar_type()) >= 0, op,
              "stats must be float16, bfloat16 or float32, got ", stats.scalar_type());
  lut_shape(op, stats, "stats", "[N, ceil(K/block_size), 8]", {N, blocks, 8});
  TORCH_CHECK(stats.device() == sign.device(), op, "stats is on ", stats.device(),
              " but sign is on ", sign.device());
  TORCH_CHECK(stats.is_contiguous(), op, "stats must be contiguous");
}

at::Tensor binary_dequant_cuda(const at::Tensor& sign, const at::Tensor& aux,
                               const at::Tensor& salient, const at::Tensor& stats,
                               int64_t in_features, int64_t block_size, c10::ScalarType dtype) {
  TORCH_CHECK(sign.is_cuda(), kDequantOp, "sign must be a CUDA tensor, got ", sign.device());
  check_dequant_inputs(sign, aux, salient, stats, in_features, block_size, dtype);
  c10::DeviceGuard guard(sign.device());
  at::Tensor out = at::empty({sign.size(0), in_features}, sign.options().dtype(dtype));
  if (sign.size(0) == 0) return out;
  void* stream = vlmkern_current_stream(sign);
  const int status = vlmkern_binary_dequant(
      sign.data_ptr<int32_t>(), aux.data_ptr<int32_t>(), salient.data_ptr<int32_t>(),
      stats.data_ptr(), dtype_code(stats.scalar_type()), sign.size(0), in_features, block_size,
      out.data_ptr(), dtype_code(dtype), stream);
  TORCH_CHECK(status == VLMKERN_BINARY_OK, kDequantOp, vlmkern_binary_dequant_status_message(status));
  return out;
}

at::Tensor binary_dequant_meta(const at::Tensor& sign, const at::Tensor& aux,
                               const at::Tensor& salient, const at::Tensor& stats,
                               int64_t in_features, int64_t block_size, c10::ScalarType dtype) {
  check_dequant_inputs(sign, aux, salient, stats, in_features, block_size, dtype);
  return at::empty({sign.size(0), in_features}, sign.options().dtype(dtype));
}

// -- dense weight from the lookup-table layout ---------------------------------------------
// The tables hold each value's 16 bits in the output dtype, copied as they are:
// `dtype` must be the one the tables were built for (the int32 storage cannot
// tell).
constexpr const char* kLutDequantOp = "vlmkern.binary_lut_dequant: ";

void check_lut_dequant_inputs(const at::Tensor& codes, const at::Tensor& tables,
                              const at::Tensor& salient, int64_t out_features,
                              int64_t in_features, c10::ScalarType dtype) {
  const char* op = kLutDequantOp;
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
              "dtype must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(in_features >= 8 && in_features % 8 == 0, op,
              "in_features must be a positive multiple of 8, got ", in_features);
  TORCH_CHECK(out_features >= 0, op, "out_features must be >= 0, got ", out_features);
  const int64_t blocks = (out_features + 127) / 128, chunks = (in_features + 127) / 128;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{codes, "codes"},
                                 {tables, "tables"}, {salient, "salient"}}) {
    TORCH_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == codes.device(), op, name, " is on ", t.device(), " but codes is on ",
                codes.device());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  }
  lut_shape(op, codes, "codes", "[ceil(N/128), ceil(K/128), 8, 128]", {blocks, chunks, 8, 128});
  lut_shape(op, tables, "tables", "[ceil(N/128), ceil(K/128), 8, 8, 2, 4]",
            {blocks, chunks, 8, 8, 2, 4});
  lut_shape(op, salient, "salient", "[ceil(K/32)]", {(in_features + 31) / 32});
}

at::Tensor binary_lut_dequant_cuda(const at::Tensor& codes, const at::Tensor& tables,
                                   const at::Tensor& salient, int64_t out_features,
                                   int64_t in_features, c10::ScalarType dtype) {
  TORCH_CHECK(codes.is_cuda(), kLutDequantOp, "codes must be a CUDA tensor, got ", codes.device());
  check_lut_dequant_inputs(codes, tables, salient, out_features, in_features, dtype);
  TORCH_CHECK(aligned16(tables), kLutDequantOp,
              "tables must be 16-byte aligned (a view at an odd offset? clone it)");
  c10::DeviceGuard guard(codes.device());
  at::Tensor out = at::empty({out_features, in_features}, codes.options().dtype(dtype));
  if (out_features == 0) return out;
  void* stream = vlmkern_current_stream(codes);
  const int status = vlmkern_binary_lut_dequant(codes.data_ptr<int32_t>(), tables.data_ptr<int32_t>(),
                                                salient.data_ptr<int32_t>(), out_features,
                                                in_features, out.data_ptr(), stream);
  TORCH_CHECK(status == VLMKERN_BINARY_OK, kLutDequantOp,
              vlmkern_binary_dequant_status_message(status));
  return out;
}

at::Tensor binary_lut_dequant_meta(const at::Tensor& codes, const at::Tensor& tables,
                                   const at::Tensor& salient, int64_t out_features,
                                   int64_t in_features, c10::ScalarType dtype) {
  check_lut_dequant_inputs(codes, tables, salient, out_features, in_features, dtype);
  return at::empty({out_features, in_features}, codes.options().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlmkern, m) {
  m.def(
      "binary_matmul(Tensor x, Tensor salient, Tensor sign, Tensor aux, Tensor stats, "
      "Tensor? bias, int in_features, int block_size, int ksplit) -> Tensor");
  m.def(
      "binary_lut_mma(Tensor x, Tensor codes, Tensor tables, Tensor merge, Tensor? bias, "
      "int out_features, int ksplit) -> Tensor");
  m.def(
      "binary_lut_staged_mma(Tensor x, Tensor codes, Tensor tables, Tensor merge, Tensor? bias, "
      "Tensor(a!) counters, int out_features, int num_ctas) -> Tensor");
  m.def(
      "binary_lut_tma(Tensor x, Tensor codes, Tensor tables, Tensor merge, Tensor? bias, "
      "int out_features, int ksplit=1) -> Tensor");
  m.def(
      "binary_lut_tma_decode(Tensor x, Tensor codes, Tensor tables, Tensor merge, Tensor? bias, "
      "Tensor(a!) counters, int out_features, int max_clusters) -> Tensor");
  m.def(
      "binary_dequant(Tensor sign, Tensor aux, Tensor salient, Tensor stats, int in_features, "
      "int block_size, ScalarType dtype) -> Tensor");
  m.def(
      "binary_lut_dequant(Tensor codes, Tensor tables, Tensor salient, int out_features, "
      "int in_features, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("binary_matmul", &binary_cuda);
  m.impl("binary_lut_mma", &binary_lut_cuda);
  m.impl("binary_lut_staged_mma", &binary_lut_staged_cuda);
  m.impl("binary_lut_tma", &binary_lut_tma_cuda);
  m.impl("binary_lut_tma_decode", &binary_lut_tma_decode_cuda);
  m.impl("binary_dequant", &binary_dequant_cuda);
  m.impl("binary_lut_dequant", &binary_lut_dequant_cuda);
}

TORCH_LIBRARY_IMPL(vlmkern, Meta, m) {
  m.impl("binary_matmul", &binary_meta);
  m.impl("binary_lut_mma", &binary_lut_meta);
  m.impl("binary_lut_staged_mma", &binary_lut_staged_meta);
  m.impl("binary_lut_tma", &binary_lut_tma_meta);
  m.impl("binary_lut_tma_decode", &binary_lut_tma_decode_meta);
  m.impl("binary_dequant", &binary_dequant_meta);
  m.impl("binary_lut_dequant", &binary_lut_dequant_meta);
}
