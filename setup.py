"""Build script: the pure-Python package, plus the CUDA extension vlmkern._C
when a CUDA build of torch and a CUDA toolkit are available.

Project metadata lives in pyproject.toml; this file only describes packages and
the optional extension. Build with `pip install --no-build-isolation .` (or -e)
so the extension is compiled against the installed torch.

Environment:
  VLMKERN_SKIP_CUDA=1    never build the extension
  TORCH_CUDA_ARCH_LIST   GPU architectures (default below: A100, A10/3090, L4/4090, and
                         H100/H200 with the sm_90a features the wgmma kernels need)
  MAX_JOBS               parallel compile jobs (read by torch's ninja build)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0a"


def cuda_extension():
    """Return (ext_modules, cmdclass, None) or (None, None, reason to skip)."""
    if os.environ.get("VLMKERN_SKIP_CUDA") == "1":
        return None, None, "VLMKERN_SKIP_CUDA=1 is set"
    try:
        import torch
    except ImportError:
        return None, None, ("torch is not importable at build time "
                            "(install torch, then build with --no-build-isolation)")
    if getattr(torch.version, "hip", None):
        return None, None, f"torch {torch.__version__} is a ROCm build and the kernels are CUDA-only"
    if torch.version.cuda is None:
        return None, None, f"torch {torch.__version__} is a CPU-only build"

    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None:
        return None, None, (f"no CUDA toolkit found for torch {torch.__version__} "
                            f"(CUDA {torch.version.cuda}); set CUDA_HOME or put nvcc on PATH")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(
        glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return None, None, "no sources in csrc/ (an sdist made without MANIFEST.in?)"

    # torch reads this when it builds the nvcc -gencode flags; without it, it
    # would target only the GPUs of the build machine.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    ext = CUDAExtension(
        name="vlmkern._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        libraries=["dl"],     # the TMA kernels find cuTensorMapEncodeTiled with dlopen
        # No --use_fast_math: the kernels must round exactly like the Python
        # reference. The C++ standard of the host files is left to torch, whose
        # headers may need a newer one than the kernels, which include no torch.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skip_reason = cuda_extension()
if skip_reason is not None:
    print(f"vlmkern: skipping CUDA extension vlmkern._C: {skip_reason}", file=sys.stderr)

setup(
    packages=sorted(set(find_packages(include=["vlmkern", "vlmkern.*"])) | {"vlmkern.triton_kernels"}),
    package_dir={"vlmkern.triton_kernels": "triton_kernels"},
    package_data={"vlmkern.minivlm": ["projector.safetensors"]},
    ext_modules=ext_modules or [],
    cmdclass=cmdclass or {},
)
