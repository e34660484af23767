// Torch binding of the integer-activation GEMM (int_act_kernel.cu): argument
// checks with readable errors, output allocation, the current CUDA stream, and
// registration as torch.ops.vlmkern.int_act_* with CUDA and Meta kernels (the
// Meta ones only compute shapes, so torch.compile can trace the ops).
//
// Only device-generic torch headers are used, like bindings.cpp; the library
// and its module init live there.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "torch_stream.h"
#include "int_act.h"
#include "weight_only.h"  // vlmkern_int_act_staged_mma: the weight-only pipeline, integer decode

namespace {

std::string dims(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

int dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return VLMKERN_INT_ACT_F16;
    case at::kBFloat16: return VLMKERN_INT_ACT_BF16;
    case at::kFloat: return VLMKERN_INT_ACT_F32;
    default: return -1;
  }
}

int k_step(int64_t mode) { return mode == VLMKERN_INT_ACT_I4 ? 64 : 32; }

// Bytes per row of codes for k_pad elements in `mode`.
int64_t row_bytes(int64_t k_pad, int64_t mode) {
  return mode == VLMKERN_INT_ACT_I4 ? k_pad / 2 : k_pad;
}

void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode >= VLMKERN_INT_ACT_I8 && mode <= VLMKERN_INT_ACT_I4W8, op,
              "mode must be 0 (int8), 1 (int4) or 2 (int8 activations, int4 weights), got ", mode);
}

void check_shape(const char* op, const at::Tensor& t, const char* name, const char* formula,
                 std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(expected), op, name, " must have shape ", formula,
              " = ", dims(expected), ", got ", dims(t.sizes()));
}

void check_same_device(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b,
                       const char* bn) {
  TORCH_CHECK(a.device() == b.device(), op, an, " is on ", a.device(), " but ", bn, " is on ",
              b.device());
}

// -- quantize ----------------------------------------------------------------
constexpr const char* kQuant = "vlmkern.int_act_quantize: ";

void check_quantize(const at::Tensor& x, int64_t a_bits, std::optional<double> static_scale,
                    int64_t group, int64_t group_pad, int64_t k_pad, int64_t mode) {
  check_mode(kQuant, mode);
  TORCH_CHECK(a_bits == 4 || a_bits == 6 || a_bits == 8, kQuant, "a_bits must be 4, 6 or 8, got ",
              a_bits);
  // mode 1 stores each code in a nibble: wider codes would lose their high bits
  TORCH_CHECK(mode != VLMKERN_INT_ACT_I4 || a_bits == 4, kQuant,
              "mode 1 (int4 codes) takes a_bits 4, got ", a_bits);
  TORCH_CHECK(x.dim() == 2, kQuant, "x must be 2-D [M, K], got shape ", dims(x.sizes()));
  TORCH_CHECK(dtype_code(x.scalar_type()) >= 0, kQuant,
              "x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1, kQuant, "x must have K >= 1 columns");
  TORCH_CHECK(x.size(0) == 0 || x.stride(1) == 1, kQuant, "x rows must be contiguous (stride 1)");
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= x.size(1), kQuant,
              "x rows must not overlap (stride(0) >= K), got stride ", x.stride(0));
  const int ks = k_step(mode);
  TORCH_CHECK(group >= 1 && group <= group_pad && group_pad % ks == 0, kQuant,
              "need 1 <= group <= group_pad and group_pad a multiple of ", ks, ", got group ",
              group, ", group_pad ", group_pad);
  const int64_t groups = (x.size(1) + group - 1) / group;
  TORCH_CHECK(k_pad % (2 * ks) == 0 && groups * group_pad <= k_pad, kQuant, "k_pad ", k_pad,
              " must be a multiple of ", 2 * ks, " holding ", groups, " groups of ", group_pad);
  if (static_scale.has_value()) {
    const double s = *static_scale;
    TORCH_CHECK(s > 0 && s < 3.4e38, kQuant, "static_scale must be positive and finite, got ", s);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, int64_t a_bits,
                                                 std::optional<double> static_scale, int64_t group,
                                                 int64_t group_pad, int64_t k_pad, int64_t mode) {
  TORCH_CHECK(x.is_cuda(), kQuant, "x must be a CUDA tensor, got ", x.device());
  check_quantize(x, a_bits, static_scale, group, group_pad, k_pad, mode);
  c10::DeviceGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, row_bytes(k_pad, mode)}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  const float scale = static_scale.has_value() ? static_cast<float>(*static_scale) : 0.f;
  TORCH_CHECK(!static_scale.has_value() || scale > 0.f, kQuant, "static_scale ", *static_scale,
              " underflows float32");
  const int status = vlmkern_int_act_quantize(
      x.data_ptr(), dtype_code(x.scalar_type()), M > 1 ? x.stride(0) : K, q.data_ptr(),
      s.data_ptr<float>(), M, K, static_cast<int>(a_bits), scale, group, group_pad, k_pad,
      static_cast<int>(mode), vlmkern_current_stream(x));
  TORCH_CHECK(status == VLMKERN_INT_ACT_OK, kQuant, vlmkern_int_act_status_message(status));
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor> quantize_meta(const at::Tensor& x, int64_t a_bits,
                                                 std::optional<double> static_scale, int64_t group,
                                                 int64_t group_pad, int64_t k_pad, int64_t mode) {
  check_quantize(x, a_bits, static_scale, group, group_pad, k_pad, mode);
  const int64_t M = x.size(0);
  return {at::empty({M, row_bytes(k_pad, mode)}, x.options().dtype(at::kChar)),
          at::empty({M}, x.options().dtype(at::kFloat))};
}

// -- GEMM ----------------------------------------------------------------------
constexpr const char* kGemm = "vlmkern.int_act_gemm: ";

void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N,
                const at::Tensor& like, const char* like_name = "the weight") {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(dtype_code(b.scalar_type()) >= 0, op,
              "bias must be float16, bfloat16 or float32, got ", b.scalar_type());
  check_shape(op, b, "bias", "[N]", {N});
  TORCH_CHECK(b.is_contiguous(), op, "bias must be contiguous");
  check_same_device(op, b, "bias", like, like_name);
}

void check_out_dtype(const char* op, c10::ScalarType out_dtype) {
  TORCH_CHECK(dtype_code(out_dtype) >= 0, op,
              "out_dtype must be float16, bfloat16 or float32, got ", out_dtype);
}

// Returns (M, N).
std::pair<int64_t, int64_t> check_gemm(const at::Tensor& q, const at::Tensor& sx,
                                       const at::Tensor& w, const at::Tensor& w_scale_t,
                                       const std::optional<at::Tensor>& bias, int64_t group_pad,
                                       int64_t mode, c10::ScalarType out_dtype, int64_t gemm) {
  check_mode(kGemm, mode);
  TORCH_CHECK(gemm >= VLMKERN_INT_ACT_GEMM_MMA && gemm <= VLMKERN_INT_ACT_GEMM_TMA, kGemm,
              "gemm must be 0 (mma), 1 (wgmma), 2 (mma, spread reads) or 3 (tma), got ", gemm);
  const bool hopper = gemm == VLMKERN_INT_ACT_GEMM_WGMMA || gemm == VLMKERN_INT_ACT_GEMM_TMA;
  TORCH_CHECK(!hopper || mode == VLMKERN_INT_ACT_I8, kGemm,
              "the wgmma and tma GEMMs take mode 0 (int8 weights) only, got mode ", mode);
  check_out_dtype(kGemm, out_dtype);
  TORCH_CHECK(q.scalar_type() == at::kChar && w.scalar_type() == at::kChar, kGemm,
              "q and w must be int8, got ", q.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(q.dim() == 2 && w.dim() == 2, kGemm, "q and w must be 2-D, got ", dims(q.sizes()),
              " and ", dims(w.sizes()));
  const int64_t M = q.size(0), N = w.size(0);
  TORCH_CHECK(M <= VLMKERN_INT_ACT_MAX_M, kGemm, "q has ", M, " rows; one call takes at most ",
              VLMKERN_INT_ACT_MAX_M, " (split the tokens)");
  const int64_t k_pad = mode == VLMKERN_INT_ACT_I8 ? w.size(1) : 2 * w.size(1);
  const int ks = k_step(mode);
  TORCH_CHECK(k_pad % (2 * ks) == 0, kGemm, "padded K ", k_pad, " must be a multiple of ", 2 * ks);
  const int64_t q_bytes = mode == VLMKERN_INT_ACT_I4 ? k_pad / 2 : k_pad;
  check_shape(kGemm, q, "q", "[M, k_pad bytes]", {M, q_bytes});
  TORCH_CHECK(sx.scalar_type() == at::kFloat && w_scale_t.scalar_type() == at::kFloat, kGemm,
              "sx and w_scale_t must be float32");
  check_shape(kGemm, sx, "sx", "[M]", {M});
  TORCH_CHECK(w_scale_t.dim() == 2 && w_scale_t.size(1) == N && w_scale_t.size(0) >= 1, kGemm,
              "w_scale_t must have shape [groups, N] with N = ", N, ", got ",
              dims(w_scale_t.sizes()));
  const int64_t groups = w_scale_t.size(0);
  TORCH_CHECK(gemm != VLMKERN_INT_ACT_GEMM_TMA || groups == 1, kGemm,
              "the tma GEMM takes one weight group per row, got ", groups, " groups");
  TORCH_CHECK(group_pad >= ks && group_pad % ks == 0 && groups * group_pad <= k_pad, kGemm,
              "group_pad ", group_pad, " must be a multiple of ", ks, " with ", groups,
              " groups fitting in padded K ", k_pad);
  TORCH_CHECK(q.is_contiguous() && w.is_contiguous() && sx.is_contiguous() &&
                  w_scale_t.is_contiguous(),
              kGemm, "q, sx, w and w_scale_t must be contiguous");
  check_same_device(kGemm, q, "q", w, "w");
  check_same_device(kGemm, sx, "sx", w, "w");
  check_same_device(kGemm, w_scale_t, "w_scale_t", w, "w");
  check_bias(kGemm, bias, N, w);
  return {M, N};
}

at::Tensor gemm_cuda(const at::Tensor& q, const at::Tensor& sx, const at::Tensor& w,
                     const at::Tensor& w_scale_t, const std::optional<at::Tensor>& bias,
                     int64_t group_pad, int64_t mode, c10::ScalarType out_dtype, int64_t gemm) {
  TORCH_CHECK(w.is_cuda(), kGemm, "w must be a CUDA tensor, got ", w.device());
  auto [M, N] = check_gemm(q, sx, w, w_scale_t, bias, group_pad, mode, out_dtype, gemm);
  c10::DeviceGuard guard(w.device());
  at::Tensor out = at::empty({M, N}, w.options().dtype(out_dtype));
  const int64_t k_pad = mode == VLMKERN_INT_ACT_I8 ? w.size(1) : 2 * w.size(1);
  const int status = vlmkern_int_act_gemm(
      q.data_ptr(), sx.data_ptr<float>(), w.data_ptr(), w_scale_t.data_ptr<float>(),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : 0, out.data_ptr(), dtype_code(out_dtype),
      M, N, w_scale_t.size(0), group_pad, k_pad, static_cast<int>(mode), static_cast<int>(gemm),
      vlmkern_current_stream(w));
  TORCH_CHECK(status == VLMKERN_INT_ACT_OK, kGemm, vlmkern_int_act_status_message(status));
  return out;
}

at::Tensor gemm_meta(const at::Tensor& q, const at::Tensor& sx, const at::Tensor& w,
                     const at::Tensor& w_scale_t, const std::optional<at::Tensor>& bias,
                     int64_t group_pad, int64_t mode, c10::ScalarType out_dtype, int64_t gemm) {
  auto [M, N] = check_gemm(q, sx, w, w_scale_t, bias, group_pad, mode, out_dtype, gemm);
  return at::empty({M, N}, w.options().dtype(out_dtype));
}

// Whether the wgmma GEMM runs on the current CUDA device with this build.
bool sm90_available() {
  int available = 0;
  const int status = vlmkern_int_act_sm90_available(&available);
  TORCH_CHECK(status == VLMKERN_INT_ACT_OK, "vlmkern.int_act_sm90_available: ",
              vlmkern_int_act_status_message(status));
  return available != 0;
}

// -- int32 epilogue ----------------------------------------------------------
constexpr const char* kScale = "vlmkern.int_act_scale_int32: ";

std::pair<int64_t, int64_t> check_scale(const at::Tensor& acc, const at::Tensor& sx,
                                        const at::Tensor& w_scale,
                                        const std::optional<at::Tensor>& bias,
                                        c10::ScalarType out_dtype) {
  check_out_dtype(kScale, out_dtype);
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.dim() == 2, kScale,
              "acc must be a 2-D int32 tensor, got ", acc.scalar_type(), " ", dims(acc.sizes()));
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(N == 0 || M == 0 || acc.stride(1) == 1, kScale, "acc rows must be contiguous");
  TORCH_CHECK(N == 0 || M <= 1 || acc.stride(0) >= N, kScale,
              "acc rows must not overlap (stride(0) >= N), got stride ", acc.stride(0));
  TORCH_CHECK(sx.scalar_type() == at::kFloat && w_scale.scalar_type() == at::kFloat, kScale,
              "sx and w_scale must be float32");
  check_shape(kScale, sx, "sx", "[M]", {M});
  check_shape(kScale, w_scale, "w_scale", "[N]", {N});
  TORCH_CHECK(sx.is_contiguous() && w_scale.is_contiguous(), kScale,
              "sx and w_scale must be contiguous");
  check_same_device(kScale, sx, "sx", acc, "acc");
  check_same_device(kScale, w_scale, "w_scale", acc, "acc");
  check_bias(kScale, bias, N, acc, "acc");
  return {M, N};
}

at::Tensor scale_cuda(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, c10::ScalarType out_dtype) {
  TORCH_CHECK(acc.is_cuda(), kScale, "acc must be a CUDA tensor, got ", acc.device());
  auto [M, N] = check_scale(acc, sx, w_scale, bias, out_dtype);
  c10::DeviceGuard guard(acc.device());
  at::Tensor out = at::empty({M, N}, acc.options().dtype(out_dtype));
  const int status = vlmkern_int_act_scale_int32(
      acc.data_ptr<int32_t>(), M > 1 ? acc.stride(0) : N, sx.data_ptr<float>(),
      w_scale.data_ptr<float>(), bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : 0, out.data_ptr(),
      dtype_code(out_dtype), M, N, vlmkern_current_stream(acc));
  TORCH_CHECK(status == VLMKERN_INT_ACT_OK, kScale, vlmkern_int_act_status_message(status));
  return out;
}

at::Tensor scale_meta(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, c10::ScalarType out_dtype) {
  auto [M, N] = check_scale(acc, sx, w_scale, bias, out_dtype);
  return at::empty({M, N}, acc.options().dtype(out_dtype));
}

// -- decode sizes on the weight-only pipeline --------------------------------------------
constexpr const char* kStaged = "vlmkern.int_act_staged_mma: ";
constexpr int64_t kStagedRows = 128, kStagedCodes = 256;  // a unit: rows x codes of K
static_assert(int(VLMKERN_INT_ACT_F16) == int(VLMKERN_DTYPE_F16) &&
                  int(VLMKERN_INT_ACT_BF16) == int(VLMKERN_DTYPE_BF16) &&
                  int(VLMKERN_INT_ACT_F32) == int(VLMKERN_DTYPE_F32),
              "the two launchers number dtypes alike");

std::pair<int64_t, int64_t> check_staged(const at::Tensor& q, const at::Tensor& sx,
                                         const at::Tensor& wq, const at::Tensor& sz,
                                         const std::optional<at::Tensor>& bias,
                                         const at::Tensor& counters, int64_t out_features,
                                         int64_t slot_log2, int64_t num_ctas,
                                         c10::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16, kStaged,
              "out_dtype must be float16 or bfloat16, got ", out_dtype);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2, kStaged,
              "q must be a 2-D int8 tensor [M, K_q], got ", q.scalar_type(), " ", dims(q.sizes()));
  TORCH_CHECK(q.is_contiguous(), kStaged, "q must be contiguous");
  const int64_t M = q.size(0), K_q = q.size(1);
  TORCH_CHECK(M <= VLMKERN_WO_INT8_MAX_M, kStaged, "M (rows of q) must be at most ",
              VLMKERN_WO_INT8_MAX_M, ", got ", M);
  TORCH_CHECK(K_q >= 16 && K_q % 16 == 0, kStaged, "q's row length must be a positive multiple of 16, got ",
              K_q);
  TORCH_CHECK(sx.scalar_type() == at::kFloat, kStaged, "sx must be float32, got ", sx.scalar_type());
  check_shape(kStaged, sx, "sx", "[M]", {M});
  TORCH_CHECK(sx.is_contiguous(), kStaged, "sx must be contiguous");
  check_same_device(kStaged, sx, "sx", q, "q");
  TORCH_CHECK(slot_log2 >= 0 && slot_log2 <= 3, kStaged, "slot_log2 must be in 0..3, got ", slot_log2);
  TORCH_CHECK(wq.scalar_type() == at::kInt && sz.scalar_type() == at::kInt, kStaged,
              "wq and sz must be int32, got ", wq.scalar_type(), " and ", sz.scalar_type());
  TORCH_CHECK(wq.dim() == 4 && wq.size(0) >= 1, kStaged, "wq must be 4-D [NB, C, 8, 1024], got ",
              dims(wq.sizes()));
  const int64_t NB = wq.size(0), C = (K_q + kStagedCodes - 1) / kStagedCodes;
  check_shape(kStaged, wq, "wq", "[NB, ceil(K_q / 256), 8, 1024]", {NB, C, 8, 1024});
  check_shape(kStaged, sz, "sz", "[NB, C, 8, 8 >> slot_log2, 8, 2]", {NB, C, 8, 8 >> slot_log2, 8, 2});
  for (const at::Tensor* t : {&wq, &sz}) {
    TORCH_CHECK(t->is_contiguous(), kStaged, "wq and sz must be contiguous");
    check_same_device(kStaged, *t, t == &wq ? "wq" : "sz", q, "q");
  }
  TORCH_CHECK(out_features > (NB - 1) * kStagedRows && out_features <= NB * kStagedRows, kStaged,
              "out_features=", out_features, " does not match wq's ", NB, " blocks of ", kStagedRows,
              " rows");
  check_bias(kStaged, bias, out_features, wq);
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.dim() == 1 && counters.numel() >= NB,
              kStaged, "counters must be a 1-D int32 tensor of at least ", NB, " elements");
  TORCH_CHECK(counters.is_contiguous(), kStaged, "counters must be contiguous");
  check_same_device(kStaged, counters, "counters", q, "q");
  TORCH_CHECK(num_ctas >= 1 && num_ctas <= NB * C, kStaged, "num_ctas must be in 1..", NB * C,
              ", got ", num_ctas);
  return {M, out_features};
}

at::Tensor staged_cuda(const at::Tensor& q, const at::Tensor& sx, const at::Tensor& wq,
                       const at::Tensor& sz, const std::optional<at::Tensor>& bias,
                       at::Tensor& counters, int64_t out_features, int64_t slot_log2,
                       int64_t num_ctas, c10::ScalarType out_dtype) {
  TORCH_CHECK(q.is_cuda(), kStaged, "q must be a CUDA tensor, got ", q.device());
  auto [M, N] = check_staged(q, sx, wq, sz, bias, counters, out_features, slot_log2, num_ctas,
                             out_dtype);
  c10::DeviceGuard guard(q.device());
  at::Tensor out = at::empty({M, N}, q.options().dtype(out_dtype));
  if (M == 0) return out;
  at::Tensor workspace =
      at::empty({vlmkern_wo_workspace_elems(M, num_ctas)}, q.options().dtype(at::kFloat));
  const int status = vlmkern_int_act_staged_mma(
      q.data_ptr<int8_t>(), M, q.size(1), wq.data_ptr<int32_t>(), sz.data_ptr<int32_t>(),
      wq.size(0), wq.size(1), static_cast<int>(slot_log2), sx.data_ptr<float>(),
      bias.has_value() ? bias->data_ptr() : nullptr,
      bias.has_value() ? dtype_code(bias->scalar_type()) : -1, out.data_ptr(), N,
      workspace.data_ptr<float>(), counters.data_ptr<int32_t>(), num_ctas, dtype_code(out_dtype),
      vlmkern_current_stream(q));
  TORCH_CHECK(status == VLMKERN_WO_OK, kStaged, vlmkern_wo_status_message(status));
  return out;
}

at::Tensor staged_meta(const at::Tensor& q, const at::Tensor& sx, const at::Tensor& wq,
                       const at::Tensor& sz, const std::optional<at::Tensor>& bias,
                       at::Tensor& counters, int64_t out_features, int64_t slot_log2,
                       int64_t num_ctas, c10::ScalarType out_dtype) {
  auto [M, N] = check_staged(q, sx, wq, sz, bias, counters, out_features, slot_log2, num_ctas,
                             out_dtype);
  return at::empty({M, N}, q.options().dtype(out_dtype));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlmkern, m) {
  m.def(
      "int_act_quantize(Tensor x, int a_bits, float? static_scale, int group, int group_pad, "
      "int k_pad, int mode) -> (Tensor, Tensor)");
  m.def(
      "int_act_gemm(Tensor q, Tensor sx, Tensor w, Tensor w_scale_t, Tensor? bias, int group_pad, "
      "int mode, ScalarType out_dtype, int gemm=0) -> Tensor");
  m.def("int_act_sm90_available() -> bool", &sm90_available);
  m.def(
      "int_act_scale_int32(Tensor acc, Tensor sx, Tensor w_scale, Tensor? bias, "
      "ScalarType out_dtype) -> Tensor");
  m.def(
      "int_act_staged_mma(Tensor q, Tensor sx, Tensor wq, Tensor sz, Tensor? bias, "
      "Tensor(a!) counters, int out_features, int slot_log2, int num_ctas, ScalarType out_dtype) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("int_act_quantize", &quantize_cuda);
  m.impl("int_act_gemm", &gemm_cuda);
  m.impl("int_act_scale_int32", &scale_cuda);
  m.impl("int_act_staged_mma", &staged_cuda);
}

TORCH_LIBRARY_IMPL(vlmkern, Meta, m) {
  m.impl("int_act_quantize", &quantize_meta);
  m.impl("int_act_gemm", &gemm_meta);
  m.impl("int_act_scale_int32", &scale_meta);
  m.impl("int_act_staged_mma", &staged_meta);
}
