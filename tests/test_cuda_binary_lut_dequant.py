"""Dense weight of a binary layer from the lookup-table layout
(csrc/binary_dequant_kernel.cu, torch.ops.vlmkern.binary_lut_dequant) and the
opt-in ``cuda.binary_lut_dequant_cublas``, the prefill path of layers that
hold their sign and aux bits only in that layout (``LaidOutBinaryWeight``).

CPU: a host program includes the kernel file and runs its __host__ __device__
thread function for every thread a launch would start, on layouts made by
``cuda_binary_lut``; the output must equal ``BinaryWeight.dequantize`` bit
for bit. Needs nvcc, not a GPU. GPU: the op, the same comparison, and the
kernel's selection by ``ops.linear``.
"""
import os

import pytest
import torch
from host_harness import compile_harness, run_int16_cases
from test_cuda_binary import make_binary
from test_cuda_binary_dequant import wide_stats
from tiny_models import kernel_op_reason

import vlmkern.ops as ops
from vlmkern.ops import cuda_binary_lut as lut
from vlmkern.ops.laid_out_binary import LaidOutBinaryWeight

HARNESS = r"""
#include "binary_dequant_kernel.cu"

#include <stdlib.h>
#include <string.h>

#include <vector>

namespace {

template <typename T>
std::vector<T> read_array(FILE* in, int64_t count) {
  std::vector<T> v(count);
  if (fread(v.data(), sizeof(T), count, in) != size_t(count)) abort();
  return v;
}

}  // namespace

// Per case: two int64 (N, K), codes, tables, salient. Every thread of a
// launch whose grid has min(N, 3) rows (so threads loop over rows) writes
// its 8 columns; writes [N, K] 16-bit values.
int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t h[2];
  while (fread(h, sizeof h, 1, in) == 1) {
    LutDims d;
    d.N = h[0];
    d.K = h[1];
    d.chunks = (d.K + 127) / 128;
    const int64_t blocks = (d.N + 127) / 128;
    const auto codes = read_array<uint32_t>(in, blocks * d.chunks * 8 * 128);
    const auto tables = read_array<uint4>(in, blocks * d.chunks * 8 * 8 * 2);
    const auto sal = read_array<uint32_t>(in, (d.K + 31) / 32);
    std::vector<uint4> buf(d.N * d.K / 8);
    memset(buf.data(), 0xFF, buf.size() * sizeof(uint4));   // NaN marks what was never written
    const int64_t grid_y = d.N < 3 ? d.N : 3;
    for (int64_t y = 0; y < grid_y; ++y)
      for (int64_t group = 0; group < d.K / 8; ++group)
        for (int64_t n = y; n < d.N; n += grid_y)
          buf[(n * d.K) / 8 + group] =
              lut_eight_outputs(codes.data(), tables.data(), sal.data(), d, n, 8 * group);
    fwrite(buf.data(), 2, size_t(d.N * d.K), out);
  }
  fclose(out);
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(HARNESS, tmp_path_factory.mktemp("binary_lut_dequant_host"))


def run_harness(harness, cases):
    """cases: (LutWeight, salient) -> [int16 [N, K]]."""
    return run_int16_cases(harness, [
        ([lw.out_features, lw.in_features], (lw.codes, lw.tables, salient),
         (lw.out_features, lw.in_features)) for lw, salient in cases])


# (N, K): rows off the 128-row blocks, columns off the 128-column chunks, several chunks
SHAPES = [(1, 8), (3, 40), (17, 136), (130, 264), (2, 1024), (129, 72)]


@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_host_threads_match_reference(harness, stats_dtype):
    cases, weights = [], []
    for n, k in SHAPES:
        for salient in (0.0, 0.3, 1.0):
            bw = make_binary(n, k, 128, salient=salient, seed=n * k, stats_dtype=stats_dtype)
            for weight in (bw, wide_stats(bw, seed=k)):
                laid = LaidOutBinaryWeight.from_binary(weight)
                for dtype in (torch.float16, torch.bfloat16):
                    cases.append((lut.to_lut_layout(laid, dtype), laid.salient))
                    weights.append((weight, dtype))
    for (bw, dtype), got in zip(weights, run_harness(harness, cases)):
        want = bw.dequantize(dtype).view(torch.int16)
        assert torch.equal(got, want), (bw.out_features, bw.in_features, dtype)


def test_registration_and_what_it_declines():
    from vlmkern.ops import builtin  # noqa: F401
    from vlmkern.ops.backends import BACKENDS
    spec = next(k for k in BACKENDS["cuda"].kernels if k.name == "cuda.binary_lut_dequant_cublas")
    assert spec.opt_in and spec.laid_out and spec.min_m == 65 and spec.max_m is None
    bw = make_binary(3, 136, 128)
    assert spec.check(torch.zeros(1, 136), LaidOutBinaryWeight.from_binary(bw)) is None
    assert "table layout" in spec.check(torch.zeros(1, 136), bw)       # planes: other kernels
    odd = LaidOutBinaryWeight.from_binary(make_binary(3, 131, 128))
    assert "multiple of 8" in spec.check(torch.zeros(1, 131), odd)


# -- GPU ------------------------------------------------------------------------------------
_SKIP_GPU = kernel_op_reason("binary_lut_dequant", "binary_dequant_kernel.cu")
gpu = pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_op_matches_reference(stats_dtype):
    for n, k in SHAPES + [(4608, 3584)]:
        bw = make_binary(n, k, 128, salient=0.2, seed=n + k, stats_dtype=stats_dtype,
                         device="cuda")
        laid = LaidOutBinaryWeight.from_binary(bw)
        for dtype in (torch.float16, torch.bfloat16):
            got = lut.dequantize_layout(laid, dtype)
            assert torch.equal(got.view(torch.int16), bw.dequantize(dtype).view(torch.int16))


@gpu
@pytest.mark.gpu
def test_gpu_selected_when_enabled_and_matches_the_dense_product(monkeypatch):
    bw = make_binary(300, 520, 128, salient=0.2, seed=3, device="cuda")
    laid = LaidOutBinaryWeight.from_binary(bw)
    x = torch.randn(200, 520, device="cuda", dtype=torch.float16)
    bias = torch.randn(300, device="cuda", dtype=torch.float16)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, laid) == "torch.binary"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.binary_lut_dequant_cublas")
    assert ops.which_kernel(x, laid) == "cuda.binary_lut_dequant_cublas"
    assert ops.which_kernel(x[:64], laid) == "cuda.binary_lut"
    assert ops.which_kernel(x, bw) != "cuda.binary_lut_dequant_cublas"   # planes: not this one
    want = torch.nn.functional.linear(x, bw.dequantize(torch.float16), bias)
    assert torch.equal(ops.linear(x, laid, bias), want)     # the same weight, the same GEMM


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_inputs():
    laid = LaidOutBinaryWeight.from_binary(make_binary(5, 136, 128, device="cuda"))
    lw = lut.to_lut_layout(laid, torch.float16)
    op = torch.ops.vlmkern.binary_lut_dequant

    def fails(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    args = (lw.codes, lw.tables, laid.salient)
    fails("float16 or bfloat16", *args, 5, 136, torch.float32)
    fails("multiple of 8", *args, 5, 131, torch.float16)
    fails("codes must have shape", lw.codes[:, :1].contiguous(), *args[1:], 5, 136, torch.float16)
    fails("tables must have shape", args[0], lw.tables[:, :1].contiguous(), args[2], 5, 136,
          torch.float16)
    fails("salient is on cpu", *args[:2], laid.salient.cpu(), 5, 136, torch.float16)


if os.environ.get("VLMKERN_SANITIZE") == "1":   # a small run under compute-sanitizer memcheck
    @gpu
    @pytest.mark.gpu
    def test_binary_lut_dequant_sanitizer_smoke():
        for n, k in SHAPES:
            bw = make_binary(n, k, 128, salient=0.3, seed=k, device="cuda")
            got = lut.dequantize_layout(LaidOutBinaryWeight.from_binary(bw), torch.bfloat16)
            assert torch.equal(got.view(torch.int16), bw.dequantize(torch.bfloat16).view(torch.int16))
