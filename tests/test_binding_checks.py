"""The torch bindings' argument checks and Meta shapes, on the CPU.

The bindings (csrc/*.cpp) are compiled against the installed torch with
stub launchers generated from the C headers, and the ops run through their
Meta implementations, which share every check with the CUDA ones (see
binding_meta_cases.py). What the Python wrappers build must pass those
checks at awkward shapes, and bad arguments must get the op's error: no GPU
needed, and no C++ exception crosses a process boundary the test depends on
(the cases run in a child process)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HEADERS = ("vlmkern_kernels.h", "binary.h", "weight_only.h", "int_act.h")
BINDINGS = ("bindings.cpp", "binary_binding.cpp", "weight_only_binding.cpp", "int_act_binding.cpp")
# a launcher declaration in the C headers: return type, name, parameters
DECLARATION = re.compile(r"^(int|int64_t|const char\*) (vlmkern_\w+)\(([^;]*?)\);", re.MULTILINE | re.DOTALL)
STUB_RESULT = {"int": "0", "int64_t": "0", "const char*": '"stub"'}


def stub_source() -> str:
    """C++ defining every launcher the headers declare, each returning
    success (0) or "stub"; including the headers makes the compiler hold each
    stub to its declaration."""
    lines = ["#include <stdint.h>"] + [f'#include "{h}"' for h in HEADERS] + ['extern "C" {']
    for header in HEADERS:
        for ret, name, params in DECLARATION.findall((CSRC / header).read_text()):
            params = " ".join(params.split())
            lines.append(f"{ret} {name}({params}) {{ return {STUB_RESULT[ret]}; }}")
    return "\n".join(lines + ["}"]) + "\n"


def test_stub_source_covers_the_launchers_the_bindings_call():
    stubbed = set(re.findall(r"(vlmkern_\w+)\(", stub_source()))
    helpers = set(re.findall(r"inline \S+ (vlmkern_\w+)\(", (CSRC / "torch_stream.h").read_text()))
    called = {name for f in BINDINGS
              for name in re.findall(r"\b(vlmkern_[a-z0-9_]+)\(", (CSRC / f).read_text())}
    called -= helpers
    assert called and called <= stubbed, sorted(called - stubbed)


def generic_stream_handle() -> bool:
    """Whether this torch has c10::Stream::native_handle (2.11 on), the
    condition csrc/torch_stream.h compiles on."""
    import torch
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 11)


@pytest.fixture(scope="module")
def stub_library(tmp_path_factory) -> Path:
    # the environment's own ninja (the test extra) first, where it is not on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("ninja", path=path) is None or shutil.which("c++", path=path) is None:
        pytest.skip("building the bindings needs ninja and a C++ compiler")
    folder = tmp_path_factory.mktemp("bindings")
    (folder / "launcher_stubs.cpp").write_text(stub_source())
    sources = [str(CSRC / f) for f in BINDINGS] + [str(folder / "launcher_stubs.cpp")]
    includes, ldflags = [str(CSRC)], []
    if not generic_stream_handle():
        # torch_stream.h takes the stream from c10::cuda: CUDA headers, libc10_cuda
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
        lib = Path(torch.__file__).parent / "lib"
        cuda_include = next((d for d in (Path(CUDA_HOME or "/nonexistent") / "include",
                                         Path("/usr/local/cuda/include"))
                             if (d / "cuda_runtime_api.h").exists()), None)
        if cuda_include is None or not (lib / "libc10_cuda.so").exists():
            pytest.skip(f"torch {torch.__version__} hands out CUDA streams only through "
                        "c10::cuda, which needs a CUDA build of torch and a CUDA toolkit")
        includes.append(str(cuda_include))
        ldflags = [f"-L{lib}", "-lc10_cuda"]
    # built in a child process: loading the library registers torch.ops.vlmkern
    script = ("from torch.utils.cpp_extension import load\n"
              f"load('_C', {sources!r}, extra_include_paths={includes!r}, "
              f"extra_ldflags={ldflags!r}, build_directory={str(folder)!r}, "
              "is_python_module=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=1200, check=False, env={**os.environ, "PATH": path})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return folder / "_C.so"


@pytest.fixture(scope="module")
def results(stub_library) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "binding_meta_cases.py"),
                           str(stub_library)], capture_output=True, text=True, timeout=1200,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_wrappers_build_what_the_ops_accept(results):
    wrapper = {k: v for k, v in results.items() if not k.startswith("bad argument")}
    assert len(wrapper) > 100
    failed = {k: detail for k, (ok, detail) in wrapper.items() if not ok}
    assert not failed, "\n".join(f"{k}: {d}" for k, d in failed.items())


def test_bad_arguments_get_the_ops_errors(results):
    bad = {k: v for k, v in results.items() if k.startswith("bad argument")}
    assert len(bad) >= 20
    failed = {k: detail for k, (ok, detail) in bad.items() if not ok}
    assert not failed, "\n".join(f"{k}: {d}" for k, d in failed.items())
