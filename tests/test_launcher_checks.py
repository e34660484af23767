"""The C launchers' own argument checks, run on the CPU: every kernel file is
compiled with nvcc (device code to PTX, unoptimised: it never runs) and
linked into a host program that calls launchers with arguments one of their
checks must refuse. Pointers are made-up addresses that are never read: a
launcher that lets bad arguments through goes on to the CUDA runtime, which
on a machine without a GPU answers with a launch error instead of the
expected code (and on a GPU would read through them).

The torch bindings check the same things before they call a launcher; these
checks guard the C interface for any other caller."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from host_harness import TORCH_DEFINES

CSRC = Path(__file__).resolve().parent.parent / "csrc"

HARNESS = r"""
#include <stdint.h>
#include <stdio.h>

#include "binary.h"
#include "int_act.h"
#include "weight_only.h"

// Made-up device addresses: A16 is 16-byte aligned, A16 + 1 / + 2 / + 8 are not.
static char* const A16 = reinterpret_cast<char*>(0x100000);
template <class T = void> static T* at(int offset) { return reinterpret_cast<T*>(A16 + offset); }

static void report(const char* name, int code) { printf("%s %d\n", name, code); }

// vlmkern_weight_only_mma with one 128 x 128 block, M = 1, fp16, exact decode,
// changed by the named argument.
struct WeightOnly {
  const void* x = at(0); const int32_t* wq = at<int32_t>(0); const int32_t* sz = at<int32_t>(0);
  const void* bias = nullptr; int bias_dtype = VLMKERN_DTYPE_F16; void* out = at(0);
  float* workspace = at<float>(0); int32_t* counters = at<int32_t>(0); int64_t num_ctas = 1;
  int run() const {
    return vlmkern_weight_only_mma(x, 1, 128, wq, sz, 1, 1, 3, 4, bias, bias_dtype, out, 128,
                                   workspace, counters, num_ctas, VLMKERN_DTYPE_F16, 0, nullptr);
  }
};

int main() {
  {
    WeightOnly a; a.out = at(1); report("wo_out_odd", a.run());
    WeightOnly b; b.bias = at(2); b.bias_dtype = VLMKERN_DTYPE_F32; report("wo_bias_f32_at_2", b.run());
    // a 16-bit bias 2 bytes in is fine: the next check (no thread blocks) answers
    WeightOnly c; c.bias = at(2); c.num_ctas = 0; report("wo_bias_f16_at_2_then_ctas", c.run());
    WeightOnly d; d.bias = at(1); report("wo_bias_f16_odd", d.run());
    WeightOnly e; e.workspace = at<float>(2); report("wo_workspace_at_2", e.run());
    WeightOnly f; f.counters = at<int32_t>(2); report("wo_counters_at_2", f.run());
    WeightOnly g; g.x = at(8); report("wo_x_at_8", g.run());
    WeightOnly h; h.counters = nullptr; report("wo_counters_null", h.run());
  }
  // the Hopper kernel stores output pairs as 32-bit words when N is even
  report("wgmma_out_at_2",
         vlmkern_weight_only_wgmma(at(0), 1, 128, at<int32_t>(0), at<int32_t>(0), 1, 1, 3, 4,
                                   nullptr, 0, at(2), 128, VLMKERN_DTYPE_F16, 1, nullptr,
                                   nullptr));
  report("wgmma_partial_at_2",
         vlmkern_weight_only_wgmma(at(0), 1, 128, at<int32_t>(0), at<int32_t>(0), 1, 1, 3, 4,
                                   nullptr, 0, at(0), 128, VLMKERN_DTYPE_F16, 1, at<float>(2),
                                   nullptr));
  // the integer decode of the same pipeline: token scales are fp32
  report("staged_sx_at_2",
         vlmkern_int_act_staged_mma(at<int8_t>(0), 1, 256, at<int32_t>(0), at<int32_t>(0), 1, 1, 3,
                                    at<float>(2), nullptr, 0, at(0), 128, at<float>(0),
                                    at<int32_t>(0), 1, VLMKERN_DTYPE_F16, nullptr));
  report("binary_lut_dequant_tables_at_8",
         vlmkern_binary_lut_dequant(at<int32_t>(0), at<int32_t>(8), at<int32_t>(0), 4, 128, at(0),
                                    nullptr));
  report("binary_lut_mma_bias_f32_at_2",
         vlmkern_binary_lut_mma(at(0), 1, 128, at<int32_t>(0), at<int32_t>(0), at<int32_t>(0), 1, 1,
                                at(2), VLMKERN_BINARY_F32, at(0), 128, 1, at<float>(0),
                                VLMKERN_BINARY_F16, nullptr));
  // x null: the check after the bias's
  report("binary_lut_mma_bias_f16_at_2_then_null_x",
         vlmkern_binary_lut_mma(nullptr, 1, 128, at<int32_t>(0), at<int32_t>(0), at<int32_t>(0), 1,
                                1, at(2), VLMKERN_BINARY_F16, at(0), 128, 1, at<float>(0),
                                VLMKERN_BINARY_F16, nullptr));
  report("binary_lut_mma_out_odd",
         vlmkern_binary_lut_mma(at(0), 1, 128, at<int32_t>(0), at<int32_t>(0), at<int32_t>(0), 1, 1,
                                nullptr, 0, at(1), 128, 1, at<float>(0), VLMKERN_BINARY_F16,
                                nullptr));
  report("binary_lut_mma_workspace_at_2",
         vlmkern_binary_lut_mma(at(0), 1, 128, at<int32_t>(0), at<int32_t>(0), at<int32_t>(0), 1, 1,
                                nullptr, 0, at(0), 128, 1, at<float>(2), VLMKERN_BINARY_F16,
                                nullptr));
  report("binary_matmul_out_odd",
         vlmkern_binary_matmul(at(0), VLMKERN_BINARY_F16, 128, at<int32_t>(0), at<int32_t>(0),
                               at<int32_t>(0), 4, at(0), VLMKERN_BINARY_F16, nullptr, 0, at(1), 1,
                               8, 128, 128, 1, at(0), nullptr));
  report("binary_matmul_bias_f32_at_2",
         vlmkern_binary_matmul(at(0), VLMKERN_BINARY_F16, 128, at<int32_t>(0), at<int32_t>(0),
                               at<int32_t>(0), 4, at(0), VLMKERN_BINARY_F16, at(2),
                               VLMKERN_BINARY_F32, at(0), 1, 8, 128, 128, 1, at(0), nullptr));
  report("binary_matmul_bias_bf16_at_2_then_null_x",
         vlmkern_binary_matmul(nullptr, VLMKERN_BINARY_F16, 128, at<int32_t>(0), at<int32_t>(0),
                               at<int32_t>(0), 4, at(0), VLMKERN_BINARY_F16, at(2),
                               VLMKERN_BINARY_BF16, at(0), 1, 8, 128, 128, 1, at(0), nullptr));
  // W8A8: 64 codes of K in one group, M = 1, N = 8
  report("int_act_gemm_bias_f32_at_2",
         vlmkern_int_act_gemm(at(0), at<float>(0), at(0), at<float>(0), at(2), VLMKERN_INT_ACT_F32,
                              at(0), VLMKERN_INT_ACT_F16, 1, 8, 1, 64, 64, VLMKERN_INT_ACT_I8,
                              VLMKERN_INT_ACT_GEMM_MMA, nullptr));
  report("int_act_gemm_sx_at_2",
         vlmkern_int_act_gemm(at(0), at<float>(2), at(0), at<float>(0), nullptr, 0, at(0),
                              VLMKERN_INT_ACT_F16, 1, 8, 1, 64, 64, VLMKERN_INT_ACT_I8,
                              VLMKERN_INT_ACT_GEMM_MMA, nullptr));
  report("int_act_gemm_w_scale_at_2",
         vlmkern_int_act_gemm(at(0), at<float>(0), at(0), at<float>(2), nullptr, 0, at(0),
                              VLMKERN_INT_ACT_F16, 1, 8, 1, 64, 64, VLMKERN_INT_ACT_I8,
                              VLMKERN_INT_ACT_GEMM_MMA, nullptr));
  report("scale_int32_out_f32_at_2",
         vlmkern_int_act_scale_int32(at<int32_t>(0), 8, at<float>(0), at<float>(0), nullptr, 0,
                                     at(2), VLMKERN_INT_ACT_F32, 1, 8, nullptr));
  report("scale_int32_acc_at_2",
         vlmkern_int_act_scale_int32(at<int32_t>(2), 8, at<float>(0), at<float>(0), nullptr, 0,
                                     at(0), VLMKERN_INT_ACT_F16, 1, 8, nullptr));
  report("scale_int32_bias_f16_odd",
         vlmkern_int_act_scale_int32(at<int32_t>(0), 8, at<float>(0), at<float>(0), at(1),
                                     VLMKERN_INT_ACT_F16, at(0), VLMKERN_INT_ACT_F16, 1, 8,
                                     nullptr));
  return 0;
}
"""

WO_ALIGNMENT, WO_BAD_SIZE, WO_NULL = 5, 3, 1
BINARY_BAD_SIZE, BINARY_NULL = 2, 1
INT_ACT_BAD_SIZE = 3

EXPECTED = {
    "wo_out_odd": WO_ALIGNMENT,
    "wo_bias_f32_at_2": WO_ALIGNMENT,
    "wo_bias_f16_at_2_then_ctas": WO_BAD_SIZE,
    "wo_bias_f16_odd": WO_ALIGNMENT,
    "wo_workspace_at_2": WO_ALIGNMENT,
    "wo_counters_at_2": WO_ALIGNMENT,
    "wo_x_at_8": WO_ALIGNMENT,
    "wo_counters_null": WO_NULL,
    "wgmma_out_at_2": WO_ALIGNMENT,
    "wgmma_partial_at_2": WO_ALIGNMENT,
    "staged_sx_at_2": WO_ALIGNMENT,
    "binary_lut_dequant_tables_at_8": BINARY_BAD_SIZE,
    "binary_lut_mma_bias_f32_at_2": BINARY_BAD_SIZE,
    "binary_lut_mma_bias_f16_at_2_then_null_x": BINARY_NULL,
    "binary_lut_mma_out_odd": BINARY_BAD_SIZE,
    "binary_lut_mma_workspace_at_2": BINARY_BAD_SIZE,
    "binary_matmul_out_odd": BINARY_BAD_SIZE,
    "binary_matmul_bias_f32_at_2": BINARY_BAD_SIZE,
    "binary_matmul_bias_bf16_at_2_then_null_x": BINARY_NULL,
    "int_act_gemm_bias_f32_at_2": INT_ACT_BAD_SIZE,
    "int_act_gemm_sx_at_2": INT_ACT_BAD_SIZE,
    "int_act_gemm_w_scale_at_2": INT_ACT_BAD_SIZE,
    "scale_int32_out_f32_at_2": INT_ACT_BAD_SIZE,
    "scale_int32_acc_at_2": INT_ACT_BAD_SIZE,
    "scale_int32_bias_f16_odd": INT_ACT_BAD_SIZE,
}


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the launchers are compiled with nvcc")
    folder = tmp_path_factory.mktemp("launchers")
    flags = ["-std=c++17", "-O0", f"-I{CSRC}", *TORCH_DEFINES,
             # PTX only, unoptimised: the device code is never run
             "-gencode", "arch=compute_80,code=compute_80", "-Xcicc", "-O0"]
    objects, jobs = [], []
    for src in sorted(CSRC.glob("*_kernel.cu")):
        obj = folder / f"{src.stem}.o"
        objects.append(str(obj))
        jobs.append(subprocess.Popen([nvcc, "-c", str(src), "-o", str(obj), *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for job in jobs:
        log = job.communicate()[0]
        assert job.returncode == 0, log
    (folder / "main.cu").write_text(HARNESS)
    exe = folder / "launchers"
    link = [str(folder / "main.cu"), *objects, "-o", str(exe), "-ldl"]
    proc = subprocess.run([nvcc, *flags, *link], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return exe


def test_launchers_refuse_misaligned_and_missing_pointers(harness):
    proc = subprocess.run([str(harness)], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = {name: int(code) for name, code in (line.split() for line in proc.stdout.splitlines())}
    assert got == EXPECTED
