// Torch binding of the vlmkern CUDA kernels: argument checks, output
// allocation and registration as the custom op torch.ops.vlmkern.*.
//
// Only torch's device-generic headers are used (no ATen/cuda), so with
// torch >= 2.11 this file compiles against a CPU-only torch as well; the CUDA
// stream comes from torch_stream.h (the device guard interface the CUDA build
// of torch registers at runtime; c10/cuda, which needs the CUDA toolkit's
// headers, before 2.11).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "torch_stream.h"
#include "vlmkern_kernels.h"

namespace {

std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

void check_shape(const at::Tensor& t, const char* name, const char* formula,
                 std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(expected), "vlmkern.dequant_groupwise: ", name,
              " must have shape ", formula, " = ", shape_str(expected), ", got ",
              shape_str(t.sizes()));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int scale_code(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return VLMKERN_DTYPE_F16;
    case at::kBFloat16: return VLMKERN_DTYPE_BF16;
    case at::kFloat: return VLMKERN_DTYPE_F32;
    default: return -1;
  }
}

// Checks shared by the CUDA and Meta implementations; returns N.
int64_t check_inputs(const at::Tensor& qweight, const std::optional<at::Tensor>& qzeros,
                     const at::Tensor& scales, int64_t bits, int64_t group_size,
                     int64_t in_features, c10::ScalarType out_dtype) {
  const char* op = "vlmkern.dequant_groupwise: ";
  TORCH_CHECK(bits >= 1 && bits <= 8, op, "bits must be in 1..8, got ", bits);
  TORCH_CHECK(group_size >= 1, op, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK(in_features >= 0, op, "in_features must be >= 0, got ", in_features);
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              "out_dtype must be torch.float16 or torch.bfloat16, got ", out_dtype);
  TORCH_CHECK(qweight.scalar_type() == at::kInt, op, "qweight must be int32, got ",
              qweight.scalar_type());
  TORCH_CHECK(scale_code(scales.scalar_type()) >= 0, op,
              "scales must be float16, bfloat16 or float32, got ", scales.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, op, "qweight must be 2-D, got shape ", shape_str(qweight.sizes()));

  const int64_t N = qweight.size(0);
  const int64_t K = in_features;
  const int64_t G = ceil_div(K, group_size);
  check_shape(qweight, "qweight", "[N, ceil(in_features*bits/32)]", {N, ceil_div(K * bits, 32)});
  check_shape(scales, "scales", "[N, ceil(in_features/group_size)]", {N, G});
  TORCH_CHECK(qweight.is_contiguous(), op, "qweight must be contiguous");
  TORCH_CHECK(scales.is_contiguous(), op, "scales must be contiguous");
  TORCH_CHECK(scales.device() == qweight.device(), op, "scales is on ", scales.device(),
              " but qweight is on ", qweight.device());
  if (qzeros.has_value()) {
    const at::Tensor& z = *qzeros;
    TORCH_CHECK(z.scalar_type() == at::kInt, op, "qzeros must be int32, got ", z.scalar_type());
    check_shape(z, "qzeros", "[N, ceil(ceil(in_features/group_size)*bits/32)]",
                {N, ceil_div(G * bits, 32)});
    TORCH_CHECK(z.is_contiguous(), op, "qzeros must be contiguous");
    TORCH_CHECK(z.device() == qweight.device(), op, "qzeros is on ", z.device(),
                " but qweight is on ", qweight.device());
  }
  return N;
}

at::Tensor dequant_groupwise_cuda(const at::Tensor& qweight, const std::optional<at::Tensor>& qzeros,
                                  const at::Tensor& scales, int64_t bits, int64_t group_size,
                                  int64_t in_features, c10::ScalarType out_dtype, bool fast) {
  TORCH_CHECK(qweight.is_cuda(), "vlmkern.dequant_groupwise: qweight must be a CUDA tensor, got ",
              qweight.device());
  const int64_t N = check_inputs(qweight, qzeros, scales, bits, group_size, in_features, out_dtype);
  const int64_t K = in_features;

  // Launch on the tensors' device and on torch's current stream for it, so
  // the kernel is ordered with the surrounding torch work.
  c10::DeviceGuard guard(qweight.device());
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(out_dtype));
  void* stream = vlmkern_current_stream(qweight);

  // fast: the fast kernel where it applies (same output bits), else the general one
  const int status = (fast ? vlmkern_dequant_groupwise_fast : vlmkern_dequant_groupwise)(
      qweight.data_ptr<int32_t>(), qzeros.has_value() ? qzeros->data_ptr<int32_t>() : nullptr,
      scales.data_ptr(), scale_code(scales.scalar_type()), out.data_ptr(),
      out_dtype == at::kHalf ? VLMKERN_DTYPE_F16 : VLMKERN_DTYPE_BF16, N, K,
      static_cast<int>(bits), group_size, stream);
  TORCH_CHECK(status == VLMKERN_OK, "vlmkern.dequant_groupwise: ", vlmkern_status_message(status));
  return out;
}

// Shape-only implementation so torch.compile / FakeTensor can trace the op.
at::Tensor dequant_groupwise_meta(const at::Tensor& qweight, const std::optional<at::Tensor>& qzeros,
                                  const at::Tensor& scales, int64_t bits, int64_t group_size,
                                  int64_t in_features, c10::ScalarType out_dtype, bool /*fast*/) {
  const int64_t N = check_inputs(qweight, qzeros, scales, bits, group_size, in_features, out_dtype);
  return at::empty({N, in_features}, qweight.options().dtype(out_dtype));
}

}  // namespace

TORCH_LIBRARY(vlmkern, m) {
  m.def(
      "dequant_groupwise(Tensor qweight, Tensor? qzeros, Tensor scales, int bits, "
      "int group_size, int in_features, ScalarType out_dtype, bool fast=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) { m.impl("dequant_groupwise", &dequant_groupwise_cuda); }

TORCH_LIBRARY_IMPL(vlmkern, Meta, m) { m.impl("dequant_groupwise", &dequant_groupwise_meta); }

namespace {

// capture_id(stream: int) -> int: the id of the CUDA-graph capture running on
// the stream whose cudaStream_t is `stream` (torch.cuda.Stream.cuda_stream),
// 0 when it is not capturing. Plain Python function, not an op: it takes no
// tensor and is never traced.
PyObject* capture_id(PyObject* /*module*/, PyObject* arg) {
  void* stream = PyLong_AsVoidPtr(arg);
  if (stream == nullptr && PyErr_Occurred()) return nullptr;
  unsigned long long id = 0;
  const int status = vlmkern_stream_capture_id(stream, &id);
  if (status != VLMKERN_OK) {
    PyErr_Format(PyExc_RuntimeError, "vlmkern._C.capture_id: %s", vlmkern_status_message(status));
    return nullptr;
  }
  return PyLong_FromUnsignedLongLong(id);
}

PyMethodDef module_methods[] = {
    {"capture_id", capture_id, METH_O,
     "capture_id(stream: int) -> int: the CUDA-graph capture id of a stream, 0 if not capturing"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing vlmkern._C loads the library, whose static initializers above
// register the ops; the module itself holds only capture_id.
// (PyMODINIT_FUNC already gives the symbol C linkage.)
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
