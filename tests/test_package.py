"""Package-level behaviour: import hygiene and the command line."""
import os
import subprocess
import sys

import pytest

_NO_CUDA_AT_IMPORT = """
import sys, torch
def touched(*a, **k):
    raise RuntimeError("vlmkern touched CUDA at import")
for name in ("is_available", "device_count", "get_device_capability", "init", "current_device"):
    setattr(torch.cuda, name, touched)
import vlmkern, vlmkern.ops, vlmkern.nn
assert "triton" not in sys.modules, "importing vlmkern imported triton"
assert "vlmkern._C" not in sys.modules, "importing vlmkern loaded the CUDA extension"
print("ok")
"""


def test_import_touches_no_cuda_and_no_triton():
    out = subprocess.run([sys.executable, "-c", _NO_CUDA_AT_IMPORT], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_triton_kernels_package_installed():
    import vlmkern.triton_kernels  # noqa: F401


def test_cli_info_lists_backends_with_reasons():
    out = subprocess.run([sys.executable, "-m", "vlmkern", "info"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("cuda", "triton", "torch"):
        assert f"  {name} " in out.stdout
    assert "torch   available" in out.stdout
    assert "cuda.int_act_wgmma (opt-in: VLMKERN_ENABLE)" in out.stdout
    assert "cuda.int_act (opt-in" not in out.stdout
    if "gpu          none" in out.stdout:
        assert "cuda    unavailable" in out.stdout
    env = dict(os.environ, VLMKERN_DISABLE="cuda.binary_lut")
    out = subprocess.run([sys.executable, "-m", "vlmkern", "info"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert "cuda.binary_lut (off: VLMKERN_DISABLE)" in out.stdout
    assert "cuda.binary (off" not in out.stdout


def test_cli_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "vlmkern", "frobnicate"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "invalid choice" in out.stderr


def test_demo_runs_and_round_trips(capsys):
    pytest.importorskip("transformers")
    from vlmkern.demo_synthetic import SETTINGS, run_synthetic
    assert run_synthetic(seed=0) == 0
    out = capsys.readouterr().out
    for label, _ in SETTINGS:
        assert label in out
    assert "identical logits" in out
