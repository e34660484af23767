"""Does a C++ exception thrown inside a torch extension reach Python here?

On one GPU machine, every extension op given bad arguments crashed the process
with a segmentation fault instead of raising, while torch's own checks raised.
This builds a tiny extension with the machine's compiler, calls ops that fail
in different ways, each in its own process, and reports per case whether it
raised or crashed; for a crash it prints the native stack from cuda-gdb (when
installed), which names the frame that faults. It also prints the toolchain
facts that bear on it: compilers, torch's build flags, the C++ runtime
libraries the process loaded.

    python benchmarks/check_error_path.py [BUILD_DIR]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

SOURCE = r"""
#include <stdexcept>
#include <torch/library.h>
#include <ATen/core/Tensor.h>

// TORCH_CHECK: the path every vlmkern op takes for bad arguments
int64_t torch_check(int64_t x) { TORCH_CHECK(x < 5, "x too big: ", x); return x; }
// a plain C++ exception, no c10::Error
int64_t std_throw(int64_t x) { if (x >= 5) throw std::runtime_error("plain throw"); return x; }
// thrown and caught inside this library: does unwinding work within it?
int64_t caught_here(int64_t x) {
  try { TORCH_CHECK(x < 5, "x too big"); } catch (const c10::Error&) { return -1; }
  return x;
}

TORCH_LIBRARY(errpath, m) {
  m.def("torch_check(int x) -> int");
  m.def("std_throw(int x) -> int");
  m.def("caught_here(int x) -> int");
  m.impl("torch_check", &torch_check);
  m.impl("std_throw", &std_throw);
  m.impl("caught_here", &caught_here);
}
"""

CASES = ("torch_check", "std_throw", "caught_here")


def build(build_dir: str, flags: list[str]) -> str:  # flags: extra linker flags
    """Build the library in a child process (load_inline also loads it, and a
    process can register the op namespace only once); return its path."""
    os.makedirs(build_dir, exist_ok=True)
    script = ("import sys; from torch.utils.cpp_extension import load_inline\n"
              f"load_inline('errpath', cpp_sources=[{SOURCE!r}], is_python_module=False, "
              f"build_directory={build_dir!r}, extra_ldflags={flags!r}, verbose=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr).strip() or f"rc={proc.returncode}")
    return os.path.join(build_dir, "errpath.so")


def call_script(library: str, case: str) -> str:
    return (f"import torch; torch.ops.load_library({library!r})\n"
            f"print('good value', torch.ops.errpath.{case}(3), flush=True)\n"
            f"try:\n    print('returned', torch.ops.errpath.{case}(9), flush=True)\n"
            f"except RuntimeError as e:\n    print('raised:', str(e).splitlines()[0], flush=True)\n")


def run_case(library: str, case: str) -> bool:
    """True when the bad call raised or returned (no crash)."""
    script = call_script(library, case)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    print(f"  {case}: rc={proc.returncode} | " + " | ".join(out[-2:]))
    if proc.returncode == 0:
        return True
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if gdb:
        trace = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 25", "--args", sys.executable,
                                "-c", script], capture_output=True, text=True, timeout=180)
        frames = [ln for ln in trace.stdout.splitlines() if ln.startswith("#") or "SIG" in ln]
        print("    native stack at the fault:\n      " + "\n      ".join(f[:220] for f in frames[:30]))
    return False


def toolchain() -> None:
    import torch
    for cc in ("c++", "g++", "gcc"):
        if shutil.which(cc):
            first = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
            print(f"{cc}: {first.splitlines()[0] if first else '?'}")
    print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
    for line in torch.__config__.show().splitlines():
        if any(k in line for k in ("Compiler", "CXX_COMPILER", "CXX_FLAGS", "C++ Version")):
            print("  torch build:", line.strip()[:300])
    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if "libstdc++" in ln or "libgcc_s" in ln})
    print("C++ runtime loaded:", ", ".join(libs) or "none found")


def main() -> int:
    build_root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/vlmkern_errpath"
    toolchain()
    all_ok = True
    try:
        library = build(build_root, [])
    except Exception as e:  # a failed build is a finding too
        print(f"build failed: {type(e).__name__}: {str(e).splitlines()[-1][:200]}")
        return 1
    for case in CASES:
        all_ok &= run_case(library, case)
    print("every bad call raised or returned" if all_ok else "some bad calls crashed the process")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
