"""Dense weight of a binary layer on the GPU (csrc/binary_dequant_kernel.cu,
torch.ops.vlmkern.binary_dequant) and the opt-in ``cuda.binary_dequant_cublas``.

CPU: a host program includes the kernel file and runs its __host__ __device__
thread function for every thread a launch would start; the output must equal
``BinaryWeight.dequantize`` bit for bit. Needs nvcc, not a GPU. GPU: the op
itself, the same comparison, and the kernel's selection by ``ops.linear``.
"""
import os

import pytest
import torch
from host_harness import compile_harness, run_int16_cases
from test_cuda_binary import make_binary
from tiny_models import kernel_op_reason

import vlmkern.ops as ops
from vlmkern.formats import BinaryWeight
from vlmkern.ops import cuda_binary

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

HARNESS = r"""
#include "binary_dequant_kernel.cu"

#include <stdlib.h>
#include <string.h>

#include <vector>

namespace {

// Every thread of a launch whose grid has min(N, 3) rows (so threads loop over rows).
template <class Out, class Stat>
void all_threads(const uint32_t* sign, const uint32_t* aux, const uint32_t* sal, const void* stats,
                 uint4* out, const Dims& d) {
  const int64_t grid_y = d.N < 3 ? d.N : 3;
  for (int64_t y = 0; y < grid_y; ++y)
    for (int64_t w = 0; w < d.words_per_row; ++w)
      dequant_word<Out, Stat>(sign, aux, sal, static_cast<const Stat*>(stats), out, d, w, y, grid_y);
}

template <class Out>
void by_stats(int stats_dtype, const uint32_t* sign, const uint32_t* aux, const uint32_t* sal,
              const void* stats, uint4* out, const Dims& d) {
  if (stats_dtype == 0) all_threads<Out, __half>(sign, aux, sal, stats, out, d);
  else if (stats_dtype == 1) all_threads<Out, __nv_bfloat16>(sign, aux, sal, stats, out, d);
  else all_threads<Out, float>(sign, aux, sal, stats, out, d);
}

template <typename T>
std::vector<T> read_array(FILE* in, int64_t count) {
  std::vector<T> v(count);
  if (fread(v.data(), sizeof(T), count, in) != size_t(count)) abort();
  return v;
}

}  // namespace

// Per case: five int64 (N, K, block_size, stats_dtype, out_dtype), sign and
// aux [N, ceil(K/32)], salient [ceil(K/32)], stats. Writes [N, K] 16-bit values.
int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t h[5];
  while (fread(h, sizeof h, 1, in) == 1) {
    Dims d;
    d.N = h[0];
    d.K = h[1];
    d.block_size = h[2];
    d.words_per_row = (d.K + 31) / 32;
    d.blocks_per_row = (d.K + d.block_size - 1) / d.block_size;
    const auto sign = read_array<uint32_t>(in, d.N * d.words_per_row);
    const auto aux = read_array<uint32_t>(in, d.N * d.words_per_row);
    const auto sal = read_array<uint32_t>(in, d.words_per_row);
    const auto stats = read_array<char>(in, d.N * d.blocks_per_row * 8 * (h[3] == 2 ? 4 : 2));
    std::vector<uint4> buf(d.N * d.K / 8);
    memset(buf.data(), 0xFF, buf.size() * sizeof(uint4));   // NaN marks what was never written
    const int stats_dtype = int(h[3]);
    if (h[4] == 0) by_stats<OutF16>(stats_dtype, sign.data(), aux.data(), sal.data(), stats.data(),
                                    buf.data(), d);
    else by_stats<OutBF16>(stats_dtype, sign.data(), aux.data(), sal.data(), stats.data(),
                           buf.data(), d);
    fwrite(buf.data(), 2, size_t(d.N * d.K), out);
  }
  fclose(out);
  return 0;
}
"""

@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(HARNESS, tmp_path_factory.mktemp("binary_dequant_host"))


def run_harness(harness, cases):
    """cases: (BinaryWeight, out dtype) -> [int16 [N, K]]."""
    return run_int16_cases(harness, [
        ([qw.out_features, qw.in_features, qw.block_size, DTYPE_CODE[qw.stats.dtype],
          DTYPE_CODE[out_dtype]], (qw.sign, qw.aux, qw.salient, qw.stats), qw.shape)
        for qw, out_dtype in cases])


def wide_stats(qw: BinaryWeight, seed: int) -> BinaryWeight:
    """The same planes with statistics spread over many binades (tiny, large,
    negative, exact ties), so the fp32 sums and the final rounding are tested."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-6, 4, qw.stats.shape, generator=g).float()
    st = (torch.randn(qw.stats.shape, generator=g) * scale).to(qw.stats.dtype)
    return BinaryWeight(qw.sign, qw.aux, qw.salient, st, qw.block_size, qw.in_features).validate()


SHAPES = [(1, 8), (3, 40), (5, 136), (7, 264), (2, 1024), (4, 72)]
BLOCKS = [8, 16, 48, 64, 128, 256]


@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_host_threads_match_reference(harness, stats_dtype):
    cases = []
    for n, k in SHAPES:
        for block in BLOCKS:
            for salient in (0.0, 0.3, 1.0):
                qw = make_binary(n, k, block, salient=salient, seed=n * k + block,
                                 stats_dtype=stats_dtype)
                for weight in (qw, wide_stats(qw, seed=k + block)):
                    for out_dtype in (torch.float16, torch.bfloat16):
                        cases.append((weight, out_dtype))
    for (qw, out_dtype), got in zip(cases, run_harness(harness, cases)):
        want = qw.dequantize(out_dtype).view(torch.int16)
        assert torch.equal(got, want), (qw.out_features, qw.in_features, qw.block_size, out_dtype)


def test_supported_shapes_and_registration():
    from vlmkern.ops import builtin  # noqa: F401
    from vlmkern.ops.backends import BACKENDS
    spec = next(k for k in BACKENDS["cuda"].kernels if k.name == "cuda.binary_dequant_cublas")
    assert spec.opt_in and spec.min_m == cuda_binary.DEQUANT_MIN_M == 65 and spec.max_m is None
    assert spec.check(torch.zeros(1, 136), make_binary(3, 136, 8)) is None
    assert "multiple of 8" in spec.check(torch.zeros(1, 131), make_binary(3, 131, 128))
    assert "block_size 36" in spec.check(torch.zeros(1, 144), make_binary(3, 144, 36))


# -- GPU ------------------------------------------------------------------------------------
_SKIP_GPU = kernel_op_reason("binary_dequant", "binary_dequant_kernel.cu")
gpu = pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_op_matches_reference(stats_dtype):
    for n, k in SHAPES + [(4608, 3584)]:
        for block in (8, 48, 128):
            qw = make_binary(n, k, block, salient=0.2, seed=n + k, stats_dtype=stats_dtype,
                             device="cuda")
            for out_dtype in (torch.float16, torch.bfloat16):
                got = cuda_binary.dequantize(qw, out_dtype)
                assert torch.equal(got.view(torch.int16), qw.dequantize(out_dtype).view(torch.int16))


@gpu
@pytest.mark.gpu
def test_gpu_selected_when_enabled_and_matches_the_dense_product(monkeypatch):
    qw = make_binary(300, 520, 128, salient=0.2, seed=3, device="cuda")
    x = torch.randn(200, 520, device="cuda", dtype=torch.float16)
    bias = torch.randn(300, device="cuda", dtype=torch.float16)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) != "cuda.binary_dequant_cublas"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.binary_dequant_cublas")
    assert ops.which_kernel(x, qw) == "cuda.binary_dequant_cublas"
    assert ops.which_kernel(x[:64], qw) != "cuda.binary_dequant_cublas"
    want = torch.nn.functional.linear(x, qw.dequantize(torch.float16), bias)
    assert torch.equal(ops.linear(x, qw, bias), want)     # the same weight, the same GEMM


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_inputs():
    qw = make_binary(5, 136, 8, device="cuda")
    op = torch.ops.vlmkern.binary_dequant

    def fails(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    args = (qw.sign, qw.aux, qw.salient, qw.stats)
    fails("float16 or bfloat16", *args, 136, 8, torch.float32)
    fails("multiple of 8", *args, 136, 12, torch.float16)
    fails("sign must have shape", qw.sign[:, :2].contiguous(), *args[1:], 136, 8, torch.float16)
    fails("stats must have shape", *args[:3], qw.stats[:, :3].contiguous(), 136, 8, torch.float16)
    fails("aux is on cpu", qw.sign, qw.aux.cpu(), *args[2:], 136, 8, torch.float16)


if os.environ.get("VLMKERN_SANITIZE") == "1":   # a small run under compute-sanitizer memcheck
    @gpu
    @pytest.mark.gpu
    def test_binary_dequant_sanitizer_smoke():
        for n, k in SHAPES:
            qw = make_binary(n, k, 8, salient=0.3, seed=k, device="cuda")
            got = cuda_binary.dequantize(qw, torch.bfloat16)
            assert torch.equal(got.view(torch.int16), qw.dequantize(torch.bfloat16).view(torch.int16))
