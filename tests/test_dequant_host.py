"""The dequantize launcher's per-thread work, run on the CPU.

A small host program includes csrc/dequant_kernel.cu, asks the launcher's
own plan which kernel a call gets, and runs that kernel's __host__ __device__
thread function for every thread index the launch would start (the fast
path) or every (row, chunk) (the general kernel). Its output must equal the
bit-level reference of the format bit for bit. Needs nvcc, not a GPU.
"""
import numpy as np
import pytest
import torch
from host_harness import compile_harness, raw_bytes, run
from test_ext import make_case, ref_dequant

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # vlmkern_dtype

HARNESS = r"""
#include "dequant_kernel.cu"

#include <stdlib.h>

#include <vector>

namespace {

template <int BITS, bool kZeros, typename Out, typename ScaleT>
void fast_all(const uint32_t* qw, const uint32_t* qz, const void* s, void* out, const FastDims& f) {
  const uint32_t warps = fast_blocks(f) * kFastWarpsPerBlock;
  for (uint32_t w = 0; w < warps; ++w)
    for (uint32_t lane = 0; lane < 32; ++lane)
      dequant_fast_thread<BITS, kZeros, Out, ScaleT>(qw, qz, static_cast<const ScaleT*>(s),
                                                     static_cast<uint4*>(out), f, w, lane);
}

template <int BITS, typename Out, typename ScaleT>
void fast_zeros(const uint32_t* qw, const uint32_t* qz, const void* s, void* out, const FastDims& f) {
  if (qz) fast_all<BITS, true, Out, ScaleT>(qw, qz, s, out, f);
  else fast_all<BITS, false, Out, ScaleT>(qw, qz, s, out, f);
}

template <typename Out, typename ScaleT>
bool run(const uint32_t* qw, const uint32_t* qz, const void* s, void* out, const Dims& d, bool fast) {
  FastDims f;
  if (fast && plan_fast(d, qw, out, &f)) {
    switch (d.bits) {
      case 2: fast_zeros<2, Out, ScaleT>(qw, qz, s, out, f); break;
      case 3: fast_zeros<3, Out, ScaleT>(qw, qz, s, out, f); break;
      case 4: fast_zeros<4, Out, ScaleT>(qw, qz, s, out, f); break;
      case 8: fast_zeros<8, Out, ScaleT>(qw, qz, s, out, f); break;
      default: abort();
    }
    return true;
  }
  const int64_t chunks = (d.K + kCodesPerThread - 1) / kCodesPerThread;
  const bool vector_store = d.K % kCodesPerThread == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t c = 0; c < chunks; ++c)
      dequant_chunk<Out, ScaleT>(qw, qz, static_cast<const ScaleT*>(s), static_cast<uint16_t*>(out),
                                 d, n, c, vector_store);
  return false;
}

template <typename Out>
bool run_scales(int scale_dtype, const uint32_t* qw, const uint32_t* qz, const void* s, void* out,
                const Dims& d, bool fast) {
  if (scale_dtype == VLMKERN_DTYPE_F16) return run<Out, __half>(qw, qz, s, out, d, fast);
  if (scale_dtype == VLMKERN_DTYPE_BF16) return run<Out, __nv_bfloat16>(qw, qz, s, out, d, fast);
  return run<Out, float>(qw, qz, s, out, d, fast);
}

template <typename T>
std::vector<T> read_array(FILE* in, int64_t count) {
  std::vector<T> v(count > 0 ? count : 1);
  if (count > 0 && fread(v.data(), sizeof(T), count, in) != size_t(count)) abort();
  return v;
}

}  // namespace

// Per case: eight int64 (N, K, bits, group_size, has_zeros, scale_dtype,
// out_dtype, fast), qweight, qzeros when present, scales. Writes one int64
// (1 when the fast path ran) and the [N, K] 16-bit output per case.
int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t h[8];
  while (fread(h, sizeof h, 1, in) == 1) {
    const Dims d = make_dims(h[0], h[1], int(h[2]), h[3]);
    const int scale_dtype = int(h[5]);
    const auto qw = read_array<uint32_t>(in, d.N * d.words_per_row);
    const auto qz = read_array<uint32_t>(in, h[4] ? d.N * d.zero_words_per_row : 0);
    const auto s = read_array<char>(in, d.N * d.groups * (scale_dtype == VLMKERN_DTYPE_F32 ? 4 : 2));
    // 16-byte aligned like a torch allocation, no slack (the sanitizer sees
    // any write past the end); 0xFF bytes (NaN) mark outputs never written
    std::vector<uint4> buf((d.N * d.K + 7) / 8);
    memset(buf.data(), 0xFF, buf.size() * sizeof(uint4));
    const uint32_t* zeros = h[4] ? qz.data() : nullptr;
    const bool fast = h[6] == VLMKERN_DTYPE_F16
        ? run_scales<OutF16>(scale_dtype, qw.data(), zeros, s.data(), buf.data(), d, h[7] != 0)
        : run_scales<OutBF16>(scale_dtype, qw.data(), zeros, s.data(), buf.data(), d, h[7] != 0);
    const int64_t path = fast ? 1 : 0;
    fwrite(&path, sizeof path, 1, out);
    fwrite(buf.data(), 2, size_t(d.N * d.K), out);
  }
  fclose(out);
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(HARNESS, tmp_path_factory.mktemp("dequant_host"))


def run_harness(harness, cases):
    """cases: (qweight, qzeros|None, scales, bits, group_size, K, out_dtype, fast)
    -> [(fast path taken, int16 [N, K])]."""
    payload = []
    for qweight, qzeros, scales, bits, g, k, out_dtype, fast in cases:
        header = [qweight.shape[0], k, bits, g, qzeros is not None, DTYPE_CODE[scales.dtype],
                  DTYPE_CODE[out_dtype], fast]
        payload.append(np.asarray(header, dtype="<i8").tobytes())
        payload += [raw_bytes(t) for t in (qweight, qzeros, scales) if t is not None]
    data, pos, results = run(harness, b"".join(payload)), 0, []
    for qweight, _, _, _, _, k, _, _ in cases:
        path = int(np.frombuffer(data, "<i8", 1, pos)[0])
        count = qweight.shape[0] * k
        out = np.frombuffer(data, "<i2", count, pos + 8).reshape(qweight.shape[0], k)
        results.append((bool(path), torch.from_numpy(out.copy())))
        pos += 8 + 2 * count
    assert pos == len(data)
    return results


# (N, K): K a multiple of 256, K not a multiple of 256 (idle lanes in a row's
# last unit), a warp's units crossing several rows, K below one unit, odd N,
# and K not a multiple of 8 (general kernel only).
SHAPES = [(5, 512), (7, 200), (9, 1032), (3, 264), (2, 8), (5, 203)]
GROUPS = [32, 64, 128, None, 16, 48, 4]  # None: one group per row; 48, 4: general kernel only


def _fast_applies(k, g):
    return k % 8 == 0 and (g >= k or (g >= 8 and g & (g - 1) == 0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_host_threads_match_reference(harness, bits):
    cases, wants = [], []
    for n, k in SHAPES:
        for group in GROUPS:
            g = k if group is None else group
            for sym in (True, False):
                for scale_dtype in (torch.float16, torch.bfloat16, torch.float32):
                    _, _, qweight, qzeros, scales = make_case(n, k, bits, g, sym, scale_dtype,
                                                              seed=n * k + bits + g)
                    for out_dtype in (torch.float16, torch.bfloat16):
                        want = ref_dequant(qweight, qzeros, scales, bits, g, k, out_dtype)
                        for fast in (True, False):
                            cases.append((qweight, qzeros, scales, bits, g, k, out_dtype, fast))
                            wants.append(want.view(torch.int16))
    for case, want, (fast_ran, got) in zip(cases, wants, run_harness(harness, cases)):
        _, _, scales, _, g, k, out_dtype, fast = case
        assert fast_ran == (fast and _fast_applies(k, g)), case[3:]
        assert torch.equal(got, want), (want.shape, bits, g, k, scales.dtype, out_dtype, fast)


def test_host_extreme_scales(harness):
    """Overflow to inf, subnormal results, negative scales, every code value:
    the fp16 fast path multiplies in fp16, so its exactness argument is
    checked here at the edges (on a GPU, tests/test_ext.py does the same)."""
    cases, wants = [], []
    values = {torch.float16: [65504.0, 300.0, 6e-8, 1e-5, -2.5, 0.0],
              torch.bfloat16: [3e38, 1e-38, 9e-41, -7.0, 1.0],
              torch.float32: [3e38, 1e-44, -1e-3, 12345.678]}
    for bits in (2, 3, 4, 8):
        for scale_dtype, vals in values.items():
            n, k, g = 6, 256, 32
            _, _, qweight, qzeros, _ = make_case(n, k, bits, g, False, scale_dtype, seed=bits)
            idx = torch.arange(n * (k // g)).reshape(n, k // g) % len(vals)
            scales = torch.tensor(vals, dtype=torch.float64)[idx].to(scale_dtype)
            for out_dtype in (torch.float16, torch.bfloat16):
                want = ref_dequant(qweight, qzeros, scales, bits, g, k, out_dtype)
                cases.append((qweight, qzeros, scales, bits, g, k, out_dtype, True))
                wants.append(want.view(torch.int16))
    for case, want, (fast_ran, got) in zip(cases, wants, run_harness(harness, cases)):
        assert fast_ran
        assert torch.equal(got, want), case[3:]
