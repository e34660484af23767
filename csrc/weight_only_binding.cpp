// Torch binding of the tensor-core weight-only matmul (weight_only.h):
// argument checks with clear messages, output and workspace allocation, the
// current stream, and registration as torch.ops.vlmkern.weight_only_mma,
// torch.ops.vlmkern.weight_only_wgmma (the Hopper kernel, any M),
// torch.ops.vlmkern.weight_only_tma (the warp-specialized Hopper kernel for
// prefill), torch.ops.vlmkern.weight_only_tma_decode (the same kernel for
// M <= 16, stream-K) and torch.ops.vlmkern.weight_only_dequant (the dense weight from the layout) with
// CUDA and Meta implementations (the Meta one lets torch.compile trace it).
//
// Like bindings.cpp, only device-generic torch headers are used (so, with
// torch >= 2.11, it compiles against a CPU-only torch); this file adds to the
// vlmkern library that bindings.cpp defines and does not define the Python module.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "torch_stream.h"
#include "weight_only.h"

namespace {

constexpr const char* kOp = "vlmkern.weight_only_mma: ";
constexpr int64_t kBlockRows = 128;
constexpr int64_t kChunk = 128;

std::string shape_of(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

void expect_shape(const char* op, const at::Tensor& t, const char* name, const char* formula,
                  const std::vector<int64_t>& expected) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(expected), op, name, " must have shape ", formula,
              " = ", shape_of(expected), ", got ", shape_of(t.sizes()));
}

void expect_common(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

int dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return VLMKERN_DTYPE_F16;
    case at::kBFloat16: return VLMKERN_DTYPE_BF16;
    case at::kFloat: return VLMKERN_DTYPE_F32;
    default: return -1;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks of x, the layout and bias, shared by both ops (`op` names the op in
// messages) and by their CUDA and Meta implementations.
// The layout tensors (dtypes and shapes) and the integers that describe them.
void check_wq_sz(const char* op, const at::Tensor& wq, const at::Tensor& sz, int64_t bits,
                 int64_t slot_log2) {
  TORCH_CHECK(bits >= 2 && bits <= 4, op, "bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(slot_log2 >= 0 && slot_log2 <= 3, op, "slot_log2 must be in 0..3, got ", slot_log2);
  TORCH_CHECK(wq.scalar_type() == at::kInt && sz.scalar_type() == at::kInt, op,
              "wq and sz must be int32, got ", wq.scalar_type(), " and ", sz.scalar_type());
  TORCH_CHECK(wq.dim() == 4, op, "wq must be 4-D [NB, C, 8, 64*bits], got shape ", shape_of(wq.sizes()));
  const int64_t NB = wq.size(0), C = wq.size(1);
  TORCH_CHECK(NB >= 1 && C >= 1, op, "wq must not be empty, got shape ", shape_of(wq.sizes()));
  expect_shape(op, wq, "wq", "[NB, C, 8, 64*bits]", {NB, C, 8, 64 * bits});
  expect_shape(op, sz, "sz", "[NB, C, 8, 8 >> slot_log2, 8, 2]", {NB, C, 8, 8 >> slot_log2, 8, 2});
}

void check_layout(const char* op, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                  const std::optional<at::Tensor>& bias, int64_t bits, int64_t out_features,
                  int64_t slot_log2) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              "x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, "x must be 2-D [M, K], got shape ", shape_of(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), op, "x must be contiguous");
  TORCH_CHECK(x.size(1) % 8 == 0, op, "x's row length must be a multiple of 8 (pad with zeros), got ",
              x.size(1));
  check_wq_sz(op, wq, sz, bits, slot_log2);
  const int64_t NB = wq.size(0), C = wq.size(1);
  expect_common(op, wq, "wq", x);
  expect_common(op, sz, "sz", x);
  TORCH_CHECK(out_features > (NB - 1) * kBlockRows && out_features <= NB * kBlockRows, op,
              "out_features=", out_features, " does not match wq's ", NB, " blocks of ", kBlockRows, " rows");
  TORCH_CHECK(ceil_div(x.size(1), kChunk) == C, op, "x has ", x.size(1),
              " columns but the weight has ", C, " chunks of ", kChunk, " (in_features padded to 8)");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(dtype_code(b.scalar_type()) >= 0, op,
                "bias must be float16, bfloat16 or float32, got ", b.scalar_type());
    expect_shape(op, b, "bias", "[out_features]", {out_features});
    expect_common(op, b, "bias", x);
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                  const std::optional<at::Tensor>& bias, const at::Tensor& counters, int64_t bits,
                  int64_t out_features, int64_t slot_log2, int64_t num_ctas, int64_t decode) {
  TORCH_CHECK(decode == VLMKERN_WO_DECODE_EXACT || decode == VLMKERN_WO_DECODE_POST_SCALE ||
                  decode == VLMKERN_WO_DECODE_POST_SCALE_ACQ_REL ||
                  decode == VLMKERN_WO_DECODE_POST_SCALE_3CTA,
              kOp, "decode must be 0 (exact), 1 (post-scale), 2 (post-scale, acq_rel publish) or 3 "
              "(post-scale, three blocks per SM), got ", decode);
  TORCH_CHECK(decode != VLMKERN_WO_DECODE_POST_SCALE_3CTA || x.dim() != 2 ||
                  x.size(0) <= VLMKERN_WO_POST_SCALE_3CTA_LIMIT(slot_log2),
              kOp, "decode 3 takes M <= 16 with slot_log2 = 3 (128-column scale slots) and "
              "M <= 8 with slot_log2 = 2, got M = ", x.size(0), " with slot_log2 = ", slot_log2);
  TORCH_CHECK(decode != VLMKERN_WO_DECODE_POST_SCALE_ACQ_REL || x.dim() != 2 ||
                  (x.size(0) <= VLMKERN_WO_POST_SCALE_MAX_M && slot_log2 == 3),
              kOp, "decode 2 takes M <= ", VLMKERN_WO_POST_SCALE_MAX_M,
              " and slot_log2 = 3 (scale slots of 128 columns), got M = ", x.size(0),
              " with slot_log2 = ", slot_log2);
  TORCH_CHECK(decode != VLMKERN_WO_DECODE_POST_SCALE || x.dim() != 2 ||
                  x.size(0) <= VLMKERN_WO_POST_SCALE_LIMIT(slot_log2),
              kOp, "the post-scale decode takes M <= ", VLMKERN_WO_POST_SCALE_MAX_M, " (<= ",
              VLMKERN_WO_POST_SCALE_WIDE_MAX_M, " with slot_log2 = 3), got M = ", x.size(0),
              " with slot_log2 = ", slot_log2);
  check_layout(kOp, x, wq, sz, bias, bits, out_features, slot_log2);
  TORCH_CHECK(x.size(0) <= VLMKERN_WO_MAX_M, kOp, "M (rows of x) must be at most ",
              VLMKERN_WO_MAX_M, ", got ", x.size(0));
  const int64_t NB = wq.size(0), C = wq.size(1);
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.dim() == 1 && counters.numel() >= NB, kOp,
              "counters must be a 1-D int32 tensor of at least ", NB, " elements");
  expect_common(kOp, counters, "counters", x);
  TORCH_CHECK(num_ctas >= 1 && num_ctas <= NB * C, kOp, "num_ctas must be in 1..", NB * C,
              ", got ", num_ctas);
}

at::Tensor weight_only_mma_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                                const std::optional<at::Tensor>& bias, at::Tensor& counters,
                                int64_t bits, int64_t out_features, int64_t slot_log2,
                                int64_t num_ctas, int64_t decode) {
  TORCH_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got ", x.device());
  check_inputs(x, wq, sz, bias, counters, bits, out_features, slot_log2, num_ctas, decode);
  const int64_t M = x.size(0);
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  at::Tensor workspace =
      at::empty({vlmkern_wo_workspace_elems(M, num_ctas)}, x.options().dtype(at::kFloat));
  void* stream = vlmkern_current_stream(x);
  const int status = vlmkern_weight_only_mma(
      x.data_ptr(), M, x.size(1), wq.data_ptr<int32_t>(), sz.data_ptr<int32_t>(), wq.size(0),
      wq.size(1), static_cast<int>(slot_log2), static_cast<int>(bits),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), out_features,
      workspace.data_ptr<float>(), counters.data_ptr<int32_t>(), num_ctas,
      dtype_code(x.scalar_type()), static_cast<int>(decode), stream);
  TORCH_CHECK(status == VLMKERN_WO_OK, kOp, vlmkern_wo_status_message(status));
  return out;
}

at::Tensor weight_only_mma_meta(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                                const std::optional<at::Tensor>& bias, at::Tensor& counters,
                                int64_t bits, int64_t out_features, int64_t slot_log2,
                                int64_t num_ctas, int64_t decode) {
  check_inputs(x, wq, sz, bias, counters, bits, out_features, slot_log2, num_ctas, decode);
  return at::empty({x.size(0), out_features}, x.options());
}

// The CUDA side both Hopper ops share: the output [M, out_features], the
// fp32 partial sums of `splits` K slices when there are several, the device
// and stream, and `launch(out, partial, stream)`'s status turned into an error.
template <class Launch>
at::Tensor run_hopper(const char* op, const at::Tensor& x, int64_t out_features, int64_t splits,
                      Launch launch) {
  const int64_t M = x.size(0);
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits * M * out_features}, x.options().dtype(at::kFloat));
  void* stream = vlmkern_current_stream(x);
  const int status = launch(out, splits > 1 ? partial.data_ptr<float>() : nullptr, stream);
  TORCH_CHECK(status == VLMKERN_WO_OK, op, vlmkern_wo_status_message(status));
  return out;
}

constexpr const char* kWgOp = "vlmkern.weight_only_wgmma: ";

void check_wgmma(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                 const std::optional<at::Tensor>& bias, int64_t bits, int64_t out_features,
                 int64_t slot_log2, int64_t splits) {
  check_layout(kWgOp, x, wq, sz, bias, bits, out_features, slot_log2);
  TORCH_CHECK(wq.size(0) <= 65535, kWgOp, "at most 65535 blocks of 128 output rows, got ", wq.size(0));
  TORCH_CHECK(splits >= 1 && splits <= wq.size(1), kWgOp, "splits must be in 1..", wq.size(1),
              " (the weight's chunks of 128 columns), got ", splits);
}

at::Tensor weight_only_wgmma_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                                  const std::optional<at::Tensor>& bias, int64_t bits,
                                  int64_t out_features, int64_t slot_log2, int64_t splits) {
  TORCH_CHECK(x.is_cuda(), kWgOp, "x must be a CUDA tensor, got ", x.device());
  check_wgmma(x, wq, sz, bias, bits, out_features, slot_log2, splits);
  return run_hopper(kWgOp, x, out_features, splits, [&](at::Tensor& out, float* partial, void* s) {
    return vlmkern_weight_only_wgmma(
        x.data_ptr(), x.size(0), x.size(1), wq.data_ptr<int32_t>(), sz.data_ptr<int32_t>(),
        wq.size(0), wq.size(1), static_cast<int>(slot_log2), static_cast<int>(bits),
        bias.has_value() ? bias->data_ptr() : nullptr,
        bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), out_features,
        dtype_code(x.scalar_type()), static_cast<int>(splits), partial, s);
  });
}

at::Tensor weight_only_wgmma_meta(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                                  const std::optional<at::Tensor>& bias, int64_t bits,
                                  int64_t out_features, int64_t slot_log2, int64_t splits) {
  check_wgmma(x, wq, sz, bias, bits, out_features, slot_log2, splits);
  return at::empty({x.size(0), out_features}, x.options());
}

constexpr const char* kTmaOp = "vlmkern.weight_only_tma: ";

void check_tma(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
               const std::optional<at::Tensor>& bias, int64_t bits, int64_t out_features,
               int64_t slot_log2, int64_t splits) {
  check_layout(kTmaOp, x, wq, sz, bias, bits, out_features, slot_log2);
  TORCH_CHECK(x.size(0) <= 0x7fffff00, kTmaOp, "at most 2^31 - 256 tokens, got ", x.size(0));
  TORCH_CHECK(splits >= 1 && splits <= std::min<int64_t>(wq.size(1), 65535), kTmaOp,
              "splits must be in 1..", std::min<int64_t>(wq.size(1), 65535),
              " (the weight's chunks of 128 columns), got ", splits);
}

at::Tensor weight_only_tma_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                                const std::optional<at::Tensor>& bias, int64_t bits,
                                int64_t out_features, int64_t slot_log2, int64_t splits) {
  TORCH_CHECK(x.is_cuda(), kTmaOp, "x must be a CUDA tensor, got ", x.device());
  check_tma(x, wq, sz, bias, bits, out_features, slot_log2, splits);
  return run_hopper(kTmaOp, x, out_features, splits, [&](at::Tensor& out, float* partial, void* s) {
    return vlmkern_weight_only_tma(
        x.data_ptr(), x.size(0), x.size(1), wq.data_ptr<int32_t>(), sz.data_ptr<int32_t>(),
        wq.size(0), wq.size(1), static_cast<int>(slot_log2), static_cast<int>(bits),
        bias.has_value() ? bias->data_ptr() : nullptr,
        bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), out_features,
        dtype_code(x.scalar_type()), static_cast<int>(splits), partial, s);
  });
}

at::Tensor weight_only_tma_meta(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                                const std::optional<at::Tensor>& bias, int64_t bits,
                                int64_t out_features, int64_t slot_log2, int64_t splits) {
  check_tma(x, wq, sz, bias, bits, out_features, slot_log2, splits);
  return at::empty({x.size(0), out_features}, x.options());
}

constexpr const char* kTmaDecOp = "vlmkern.weight_only_tma_decode: ";

void check_tma_decode(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& sz,
                      const std::optional<at::Tensor>& bias, const at::Tensor& counters,
                      int64_t bits, int64_t out_features, int64_t slot_log2, int64_t max_clusters) {
  check_layout(kTmaDecOp, x, wq, sz, bias, bits, out_features, slot_log2);
  TORCH_CHECK(x.size(0) <= 16, kTmaDecOp, "takes at most 16 tokens, got ", x.size(0));
  TORCH_CHECK(max_clusters >= 1 && max_clusters <= 32767, kTmaDecOp,
              "max_clusters must be in 1..32767, got ", max_clusters);
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.dim() == 1 &&
                  counters.numel() >= wq.size(0),
              kTmaDecOp, "counters must be a 1-D int32 tensor of at least ", wq.size(0), " elements");
  expect_common(kTmaDecOp, counters, "counters", x);
}

at::Tensor weight_only_tma_decode_cuda(const at::Tensor& x, const at::Tensor& wq,
                                       const at::Tensor& sz, const std::optional<at::Tensor>& bias,
                                       at::Tensor& counters, int64_t bits, int64_t out_features,
                                       int64_t slot_log2, int64_t max_clusters) {
  TORCH_CHECK(x.is_cuda(), kTmaDecOp, "x must be a CUDA tensor, got ", x.device());
  check_tma_decode(x, wq, sz, bias, counters, bits, out_features, slot_log2, max_clusters);
  const int64_t M = x.size(0);
  c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  const int64_t elems =
      vlmkern_wo_tma_decode_workspace_elems(M, wq.size(0), wq.size(1), max_clusters);
  at::Tensor workspace = at::empty({elems}, x.options().dtype(at::kFloat));
  void* stream = vlmkern_current_stream(x);
  const int status = vlmkern_weight_only_tma_decode(
      x.data_ptr(), M, x.size(1), wq.data_ptr<int32_t>(), sz.data_ptr<int32_t>(), wq.size(0),
      wq.size(1), static_cast<int>(slot_log2), static_cast<int>(bits),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), out_features,
      dtype_code(x.scalar_type()), workspace.data_ptr<float>(), counters.data_ptr<int32_t>(),
      max_clusters, stream);
  TORCH_CHECK(status == VLMKERN_WO_OK, kTmaDecOp, vlmkern_wo_status_message(status));
  return out;
}

at::Tensor weight_only_tma_decode_meta(const at::Tensor& x, const at::Tensor& wq,
                                       const at::Tensor& sz, const std::optional<at::Tensor>& bias,
                                       at::Tensor& counters, int64_t bits, int64_t out_features,
                                       int64_t slot_log2, int64_t max_clusters) {
  check_tma_decode(x, wq, sz, bias, counters, bits, out_features, slot_log2, max_clusters);
  return at::empty({x.size(0), out_features}, x.options());
}

constexpr const char* kDqOp = "vlmkern.weight_only_dequant: ";

// Checks of the layout and the requested weight, shared by the CUDA and Meta
// implementations of weight_only_dequant.
void check_dequant(const at::Tensor& wq, const at::Tensor& sz, int64_t bits, int64_t out_features,
                   int64_t in_features, int64_t slot_log2, c10::ScalarType dtype) {
  const char* op = kDqOp;
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
              "dtype must be torch.float16 or torch.bfloat16 (the type sz was made for), got ", dtype);
  check_wq_sz(op, wq, sz, bits, slot_log2);
  const int64_t NB = wq.size(0), C = wq.size(1);
  TORCH_CHECK(sz.device() == wq.device(), op, "sz is on ", sz.device(), " but wq is on ", wq.device());
  TORCH_CHECK(wq.is_contiguous(), op, "wq must be contiguous");
  TORCH_CHECK(sz.is_contiguous(), op, "sz must be contiguous");
  TORCH_CHECK(out_features > (NB - 1) * kBlockRows && out_features <= NB * kBlockRows, op,
              "out_features=", out_features, " does not match wq's ", NB, " blocks of ", kBlockRows,
              " rows");
  TORCH_CHECK(in_features > (C - 1) * kChunk && in_features <= C * kChunk, op, "in_features=",
              in_features, " does not match wq's ", C, " chunks of ", kChunk, " columns");
  TORCH_CHECK(NB * C <= 0x7fffffff, op, "at most 2^31 - 1 units of 128x128 weights, got ", NB * C);
}

at::Tensor weight_only_dequant_cuda(const at::Tensor& wq, const at::Tensor& sz, int64_t bits,
                                    int64_t out_features, int64_t in_features, int64_t slot_log2,
                                    c10::ScalarType dtype) {
  TORCH_CHECK(wq.is_cuda(), kDqOp, "wq must be a CUDA tensor, got ", wq.device());
  check_dequant(wq, sz, bits, out_features, in_features, slot_log2, dtype);
  c10::DeviceGuard guard(wq.device());
  at::Tensor out = at::empty({out_features, in_features}, wq.options().dtype(dtype));
  void* stream = vlmkern_current_stream(wq);
  const int status = vlmkern_weight_only_dequant(
      wq.data_ptr<int32_t>(), sz.data_ptr<int32_t>(), wq.size(0), wq.size(1),
      static_cast<int>(slot_log2), static_cast<int>(bits), out.data_ptr(), out_features,
      in_features, dtype_code(dtype), stream);
  TORCH_CHECK(status == VLMKERN_WO_OK, kDqOp, vlmkern_wo_status_message(status));
  return out;
}

at::Tensor weight_only_dequant_meta(const at::Tensor& wq, const at::Tensor& sz, int64_t bits,
                                    int64_t out_features, int64_t in_features, int64_t slot_log2,
                                    c10::ScalarType dtype) {
  check_dequant(wq, sz, bits, out_features, in_features, slot_log2, dtype);
  return at::empty({out_features, in_features}, wq.options().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlmkern, m) {
  // counters is written (and left zero) by the kernel, hence the (a!).
  m.def(
      "weight_only_mma(Tensor x, Tensor wq, Tensor sz, Tensor? bias, Tensor(a!) counters, "
      "int bits, int out_features, int slot_log2, int num_ctas, int decode=0) -> Tensor");
  m.def(
      "weight_only_wgmma(Tensor x, Tensor wq, Tensor sz, Tensor? bias, int bits, "
      "int out_features, int slot_log2, int splits=1) -> Tensor");
  m.def(
      "weight_only_tma(Tensor x, Tensor wq, Tensor sz, Tensor? bias, int bits, "
      "int out_features, int slot_log2, int splits=1) -> Tensor");
  // counters: as for weight_only_mma
  m.def(
      "weight_only_tma_decode(Tensor x, Tensor wq, Tensor sz, Tensor? bias, Tensor(a!) counters, "
      "int bits, int out_features, int slot_log2, int max_clusters) -> Tensor");
  m.def(
      "weight_only_dequant(Tensor wq, Tensor sz, int bits, int out_features, int in_features, "
      "int slot_log2, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("weight_only_mma", &weight_only_mma_cuda);
  m.impl("weight_only_wgmma", &weight_only_wgmma_cuda);
  m.impl("weight_only_tma", &weight_only_tma_cuda);
  m.impl("weight_only_tma_decode", &weight_only_tma_decode_cuda);
  m.impl("weight_only_dequant", &weight_only_dequant_cuda);
}

TORCH_LIBRARY_IMPL(vlmkern, Meta, m) {
  m.impl("weight_only_mma", &weight_only_mma_meta);
  m.impl("weight_only_wgmma", &weight_only_wgmma_meta);
  m.impl("weight_only_tma", &weight_only_tma_meta);
  m.impl("weight_only_tma_decode", &weight_only_tma_decode_meta);
  m.impl("weight_only_dequant", &weight_only_dequant_meta);
}
