"""Host programs that run a CUDA kernel file's __host__ __device__ thread
functions on the CPU, compiled with nvcc (no GPU needed): the compile step
shared by the tests that check kernels that way."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# the half/bf16 macros torch.utils.cpp_extension passes to nvcc
TORCH_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                 "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# AddressSanitizer and UBSan on the host code: every input array is allocated
# at its exact size, so a read or write outside it aborts the harness.
SANITIZE = ["-Xcompiler", "-fsanitize=address", "-Xcompiler", "-fsanitize=undefined",
            "-Xcompiler", "-fno-sanitize-recover=all", "-lasan", "-lubsan"]


def compile_harness(source: str, folder: Path) -> Path:
    """Compile ``source`` (C++ that includes a csrc/ kernel file) into an
    executable in ``folder``, with the sanitizers where the host compiler has
    them; skips the test when nvcc is missing."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the host harness is compiled with nvcc")
    (folder / "harness.cu").write_text(source)
    # one device architecture only: the device code is compiled but never run
    cmd = [nvcc, "-std=c++17", "-O1", "-arch=sm_80", f"-I{CSRC}", *TORCH_DEFINES,
           str(folder / "harness.cu"), "-o", str(folder / "harness")]
    proc = subprocess.run(cmd + SANITIZE, check=False, capture_output=True, text=True)
    if proc.returncode != 0:  # a host compiler without the sanitizer runtimes
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return folder / "harness"


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as the harness reads them (16-bit floats as int16)."""
    t = t.contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def run(harness: Path, payload: bytes) -> bytes:
    """Run the harness on ``payload`` (its input file); return its output file."""
    inp, outp = harness.parent / "in.bin", harness.parent / "out.bin"
    inp.write_bytes(payload)
    proc = subprocess.run([str(harness), str(inp), str(outp)], check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return outp.read_bytes()


def run_int16_cases(harness: Path, cases) -> list[torch.Tensor]:
    """cases: (header ints, input tensors, (rows, cols)). The harness reads
    each case as its header (int64) and tensors, and writes one int16
    [rows, cols] array per case; returns them in order."""
    payload = []
    for header, tensors, _ in cases:
        payload.append(np.asarray(header, dtype="<i8").tobytes())
        payload += [raw_bytes(t) for t in tensors]
    data, pos, results = run(harness, b"".join(payload)), 0, []
    for _, _, (rows, cols) in cases:
        out = np.frombuffer(data, "<i2", rows * cols, pos).reshape(rows, cols)
        results.append(torch.from_numpy(out.copy()))
        pos += 2 * rows * cols
    assert pos == len(data)
    return results
