"""Smoke runs of the benchmark scripts that can run without a GPU, so they
keep working between the GPU runs that use them."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import decode_model  # noqa: E402
import host_overhead  # noqa: E402


def test_decode_model_runs_on_cpu(tmp_path, capsys):
    rc = decode_model.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128",
                            "--heads", "4", "--kv-heads", "2", "--layers", "2", "--vocab", "128",
                            "--prompt", "8", "--steps", "2", "--reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "decode_model_cpu.md").read_text().splitlines()
    rows = [r for r in table if r.startswith("| ") and not r.startswith("| weights")]
    assert [r.split(" | ")[0] for r in rows] == ["| dense float32", "| W4 g128",
                                                 "| W4 g128 kernel layout", "| W2 g128", "| W8A8",
                                                 "| LUQ-style: binary even layers + W4 odd",
                                                 "| LUQ-style: binary layers in the table layout too"]
    assert not any("error" in r for r in rows), rows
    for r in rows:
        prefill, decode, _, graph_decode = (float(v) for v in r.split(" | ")[3:7])
        # two steps of one run can hide in the noise: then the decode time is unknown (nan)
        assert prefill > 0 and (decode > 0 or math.isnan(decode)) and graph_decode > 0


def test_decode_model_compiled_column(tmp_path):
    rc = decode_model.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128",
                            "--heads", "4", "--kv-heads", "2", "--layers", "1", "--vocab", "128",
                            "--prompt", "8", "--steps", "8", "--reps", "3", "--formats", "W8A8",
                            "--compiled", "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "decode_model_cpu.md").read_text().splitlines()
    rows = [r for r in table if r.startswith("| ") and not r.startswith("| weights")]
    assert len(rows) == 2 and not any("error" in r for r in rows), rows
    assert all(float(r.split(" | ")[8]) > 0 for r in rows)     # compiled decode ms/token


def test_host_overhead_times_every_format_with_the_kernel_left_out():
    import argparse

    from vlmkern.ops import backends, builtin  # noqa: F401  (builtin registers the backends)
    before = {name: list(b.kernels) for name, b in backends.BACKENDS.items()}
    rows = host_overhead.run(argparse.Namespace(
        device="cpu", stub=False, in_features=64, out_features=32, calls=5, repeats=1))
    assert [r["layer"] for r in rows[:4]] == ["nn.Linear", "W4 g128", "W8A8", "binary"]
    assert [r["kernel"] for r in rows[1:4]] == [
        "torch.weight_only (stub)", "torch.int_act (stub)", "torch.binary (stub)"]
    assert all(r["us"] > 0 for r in rows)
    assert {name: b.kernels for name, b in backends.BACKENDS.items()} == before  # stubs removed



def test_sass_count_triton_counts_both_decode_loops():
    # a subprocess: kernels decorated in the interpreter (other tests) cannot be compiled
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "sass_count_triton.py", "--formats", "W4 g128"],
                         cwd=BENCH, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [r for r in out.stdout.splitlines() if r.startswith("| W4 g128")]
    assert [r.split(" | ")[1] for r in rows] == ["one token, CUDA cores", "M <= 16, MMA"]
    assert all(float(r.split(" | ")[3]) > 0 for r in rows)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source", ["weight_only_kernel.cu", "binary_lut_kernel.cu",
                                    "weight_only_sm90_kernel.cu"])
def test_sass_count_patterns_match_every_kernel_instantiation(tmp_path, source):
    # the kernels' names from unoptimized PTX (seconds, where SASS takes a minute)
    import sass_count
    ptx = tmp_path / "k.ptx"
    subprocess.run(["nvcc", "-ptx", "-arch=sm_90a", "-std=c++17", "-Xcicc", "-O0",
                    f"-I{sass_count.ROOT / 'csrc'}", "-o", str(ptx),
                    str(sass_count.ROOT / "csrc" / source)], check=True, timeout=300)
    function, pattern = sass_count.FAMILIES[source]
    names = re.findall(r"\.entry (\w+)\(", ptx.read_text())
    family = [n for n in names if function + "I" in n]
    assert family and all(pattern.search(n) for n in family), \
        [n for n in family if not pattern.search(n)][:3]


def test_sass_diff_matches_kernels_by_instructions():
    import sass_diff
    base = {"_Z1aIiEvv": ["MOV R1, c[0x0][0x28]", "BRA 0x40"], "_Z1bv": ["IADD R1, R1, 0x1"]}
    # a renamed a (another template argument) whose code moved; b changed; c is new
    new = {"_Z1aIiLi0EEvv": ["MOV R1, c[0x0][0x30]", "BRA 0x80"], "_Z1bv": ["IADD R1, R1, R2"],
           "_Z1cv": ["EXIT"]}
    same, changed, added, retired = sass_diff.compare(base, new)
    assert same == ["_Z1aIiEvv"] and changed == ["_Z1bv"] and added == 2 and retired == 0
    assert sass_diff.compare(base, base) == (list(base), [], 0, 0)
    # a kernel removed on purpose is retired, not changed; one that is still
    # there under its name but with other code is changed, whatever its name
    base["_Z1dILb1EEvv"] = ["FADD R1, R1, R1"]
    same, changed, added, retired = sass_diff.compare(base, new, re.compile(r"Lb1E|1bv"))
    assert changed == ["_Z1bv"] and retired == 1
    assert sass_diff.normalize("CALL.REL.NOINC `(_Z3foov) ;") == "CALL.REL.NOINC `(@) ;"
    assert sass_diff.normalize("@!P0 BRA 0x1f0") == "@!P0 BRA #"
    # an immediate operand is code: a changed shift is a changed kernel
    assert sass_diff.normalize("SHF.R.U32.HI R1, RZ, 0x4, R2") != sass_diff.normalize(
        "SHF.R.U32.HI R1, RZ, 0x8, R2")


def test_promote_report_reads_tests_and_timings(tmp_path):
    import promote_report
    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda_int_act" name="test_gpu_wgmma_equals_mma_bitwise[128-wa0]"/>'
        '<testcase classname="tests.test_cuda_int_act" name="test_gpu_wgmma_batch_invariant_and_selected"/>'
        '<testcase classname="tests.test_cuda_binary_lut_staged" name="test_gpu_equals_lut_bitwise[a]">'
        '<failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda_weight_only_sm90" name="test_kernel_awkward_shapes[a]">'
        '<skipped message="no GPU"/></testcase>'
        '</testsuite></testsuites>')
    rows = [dict(layer="qkv", M=1, kernel="W8A8", backend="cuda.int_act", us=20.0),
            dict(layer="qkv", M=1, kernel="W8A8", backend="cuda.int_act_wgmma", us=10.0),
            dict(layer="qkv", M=1, kernel="binary", backend="cuda.binary", us=30.0),
            dict(layer="qkv", M=1, kernel="binary", backend="cuda.binary_lut_staged", us=15.0),
            dict(layer="qkv", M=1, kernel="W4 g128", backend="triton.weight_only_gemv", us=9.0),
            dict(layer="qkv", M=1, kernel="W4 g128", backend="cuda.weight_only_wgmma", us=5.0),
            dict(layer="qkv", M=4096, kernel="binary", backend="triton.binary_dequant_matmul",
                 us=300.0),
            dict(layer="qkv", M=4096, kernel="binary", backend="cuda.binary_dequant_cublas",
                 us=200.0),
            # against the kernel it would replace, not the CUDA route timed next to it
            dict(layer="qkv", M=4096, kernel="W8A8", backend="cuda.int_act", us=500.0),
            dict(layer="qkv", M=4096, kernel="W8A8", backend="triton.int_act", us=300.0),
            dict(layer="qkv", M=4096, kernel="W8A8", backend="triton.int_act_tma", us=250.0),
            # a block whose cuBLAS baseline slowed by half while it ran: left out
            dict(layer="qkv", M=16, kernel="cuBLAS fp16", backend="torch", us=10.0,
                 baseline_after_us=15.0),
            dict(layer="qkv", M=16, kernel="W8A8", backend="cuda.int_act", us=20.0),
            dict(layer="qkv", M=16, kernel="W8A8", backend="cuda.int_act_wgmma", us=40.0)]
    (tmp_path / "linear_H100.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    outcomes = promote_report.test_outcomes(xml)
    table = {line.split(" | ")[0].lstrip("| "): line for line in
             promote_report.report(outcomes, rows)[2:]}
    assert table["cuda.int_act_wgmma"].endswith("| 2 / 0 / 0 / 0 | qkv M=1 W8A8: 2.00 | yes |")
    assert table["cuda.binary_lut_staged"].endswith("| 0 / 1 / 0 / 0 | qkv M=1 binary: 2.00 | no |")
    # skipped, and no default CUDA kernel timed next to it (Triton does not count)
    assert table["cuda.weight_only_wgmma"].endswith("| 0 / 0 / 1 / 0 | not timed | no |")
    # where no default CUDA kernel runs (binary prefill), against the Triton one
    assert table["cuda.binary_dequant_cublas"].endswith("| 0 / 0 / 0 / 0 | qkv M=4096 binary: 1.50 | no |")
    assert table["triton.int_act_tma"].endswith("| 0 / 0 / 0 / 0 | qkv M=4096 W8A8: 1.20 | no |")
    # a test the phase collected but never reached keeps a kernel from being ready
    (tmp_path / "collected.txt").write_text(
        "tests/test_cuda_int_act.py::test_gpu_wgmma_equals_mma_bitwise[128-wa0]\n"
        "tests/test_cuda_int_act.py::test_gpu_wgmma_equals_mma_bitwise[128-wa1]\n"
        "tests/test_cuda_int_act.py::test_gpu_4096[1]\n")
    collected = promote_report.collected_tests(tmp_path / "collected.txt")
    table = {line.split(" | ")[0].lstrip("| "): line for line in
             promote_report.report(outcomes, rows, collected)[2:]}
    assert table["cuda.int_act_wgmma"].endswith("| 2 / 0 / 0 / 1 | qkv M=1 W8A8: 2.00 | no |")
    assert promote_report.main([str(tmp_path)]) == 0


def test_promote_report_measures_against_what_runs_by_default():
    import promote_report
    opt_in = {"cuda.weight_only_wgmma", "cuda.int_act_wgmma"}
    # a run from before the "default" mark: the first CUDA row, not the --disable one after it
    older = [dict(layer="o", M=1, kernel="W4 g128", backend="cuda.weight_only_post_scale", us=36.0),
             dict(layer="o", M=1, kernel="W4 g128", backend="cuda.weight_only_wgmma", us=40.0),
             dict(layer="o", M=1, kernel="W4 g128", backend="cuda.weight_only_mma", us=45.0)]
    assert promote_report.speed_ratios(older, opt_in) == {
        "cuda.weight_only_wgmma": [("o M=1 W4 g128", 0.9)]}
    marked = [  # ops.linear runs triton.int_act here, though the CUDA kernel came first
              dict(layer="o", M=4096, kernel="W8A8", backend="cuda.int_act", us=500.0,
                   default=False),
              dict(layer="o", M=4096, kernel="W8A8", backend="cuda.int_act_wgmma", us=400.0,
                   default=False),
              dict(layer="o", M=4096, kernel="W8A8", backend="triton.int_act", us=300.0,
                   default=True),
              # graph replay times, where both rows have one, over eager ones
              dict(layer="o", M=16, kernel="W4 g128", backend="cuda.weight_only_post_scale",
                   us=50.0, graph_us=20.0, default=True),
              dict(layer="o", M=16, kernel="W4 g128", backend="cuda.weight_only_wgmma", us=25.0,
                   graph_us=40.0, default=False),
              # the default kernel not timed (a run limited to some backends): no comparison
              dict(layer="o", M=64, kernel="W4 g128", backend="cuda.weight_only_mma", us=30.0,
                   default=False),
              dict(layer="o", M=64, kernel="W4 g128", backend="cuda.weight_only_wgmma", us=20.0,
                   default=False)]
    assert promote_report.speed_ratios(marked, opt_in) == {
        "cuda.weight_only_wgmma": [("o M=16 W4 g128", 0.5)],
        "cuda.int_act_wgmma": [("o M=4096 W8A8", 0.75)]}
    # faster, but its output left the reference's: not ready
    fast_wrong = [dict(layer="o", M=1, kernel="W8A8", backend="cuda.int_act", us=20.0,
                       default=True, err=0.001),
                  dict(layer="o", M=1, kernel="W8A8", backend="cuda.int_act_wgmma", us=10.0,
                       default=False, err=float("nan"))]
    outcomes = {"test_cuda_int_act.py::test_gpu_wgmma_equals_mma_bitwise": "passed"}
    line = next(x for x in promote_report.report(outcomes, fast_wrong)
                if x.startswith("| cuda.int_act_wgmma"))
    assert "o M=1 W8A8: 2.00 (output differs" in line and line.endswith("| no |")
    # faster by less than timing noise: not ready either
    for us, ready in ((19.5, "no"), (19.0, "yes")):
        close = [dict(fast_wrong[0]), dict(fast_wrong[1], us=us, err=0.001)]
        line = next(x for x in promote_report.report(outcomes, close)
                    if x.startswith("| cuda.int_act_wgmma"))
        assert line.endswith(f"| {ready} |"), line


def test_bench_linear_table_has_graph_columns():
    import bench_linear
    base = bench_linear.row("o", 64, 32, 1, "cuBLAS fp16", "torch", 10.0, 10.0, 4096, 1000.0, 8.0, 8.0)
    slow = bench_linear.row("o", 64, 32, 1, "W4 g128", "cuda.x", 40.0, 10.0, 1024, 1000.0, 4.0, 8.0)
    uncaptured = bench_linear.row("o", 64, 32, 1, "binary", "cuda.y", 5.0, 10.0, 512, 1000.0, None, 8.0)
    assert (slow["graph_us"], slow["graph_speedup"], slow["speedup"]) == (4.0, 2.0, 0.25)
    assert uncaptured["graph_us"] is None and uncaptured["graph_speedup"] is None
    error = {"layer": "o", "K": 64, "N": 32, "M": 1, "kernel": "W8A8", "error": "boom"}
    meta = {"device": "test", "torch": "x", "copy_GBs": 1000.0}
    lines = bench_linear.to_markdown(meta, [base, slow, uncaptured, error]).splitlines()
    table = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ")]
    header = table[0]
    assert header[6:8] == ["us", "graph us"] and header[11:] == ["speedup", "graph speedup",
                                                                 "err", "default"]
    cells = [dict(zip(header, r)) for r in table[1:4]]
    assert [(c["us"], c["graph us"], c["speedup"], c["graph speedup"]) for c in cells] == [
        ("10.0", "8.0", "1.0", "1.0"), ("40.0", "4.0", "0.25", "2.0"), ("5.0", "-", "2.0", "-")]
    # an error row spans as many cells as the header
    assert lines[-1].count("|") == next(x for x in lines if x.startswith("| layer")).count("|")
    # a kernel whose output left the reference's is named under the table
    slow.update(err=0.0008, default=True)
    uncaptured.update(err=0.31, default=False)
    nan = dict(uncaptured, backend="cuda.z", err=float("nan"))
    lines = bench_linear.to_markdown(meta, [base, slow, uncaptured, nan]).splitlines()
    assert lines[-2:] == ["- o M=1 binary cuda.y: err 0.31", "- o M=1 binary cuda.z: err nan"]
    assert "wrong result" in lines[-3]
    assert [r.strip("| ").split(" | ")[-2:] for r in lines if r.startswith("| o ")][1:3] == [
        ["0.0008", "True"], ["0.31", "False"]]


def test_bench_linear_checks_each_kernel_against_the_torch_reference(monkeypatch):
    import bench_linear
    import torch

    import vlmkern
    w = vlmkern.quantize_weight(torch.randn(32, 64), vlmkern.QuantConfig(4, 32))
    x = torch.randn(3, 64)
    assert bench_linear.output_error(x, w) == 0.0       # on the CPU both runs are the reference
    real = vlmkern.ops.linear

    def ten_percent_off(x, w, bias=None):               # a kernel other than the reference
        y = real(x, w, bias)
        return y if os.environ.get("VLMKERN_BACKEND") == "torch" else 1.1 * y
    monkeypatch.setattr(vlmkern.ops, "linear", ten_percent_off)
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.weight_only_wgmma")
    assert bench_linear.output_error(x, w) == pytest.approx(0.1, rel=1e-3)
    assert os.environ["VLMKERN_ENABLE"] == "cuda.weight_only_wgmma"      # the caller's env, restored
    assert "VLMKERN_BACKEND" not in os.environ


def test_bench_linear_marks_the_kernel_a_plain_call_runs(monkeypatch):
    """``default`` follows ops.linear with no VLMKERN_* set, whatever the
    environment the benchmark itself runs in (timings stubbed: no GPU)."""
    import bench_linear
    import torch

    import vlmkern
    monkeypatch.setattr(bench_linear, "time_fn", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(bench_linear, "time_both", lambda fn, calls: (fn(), 1.0, None)[1:])
    monkeypatch.setenv("VLMKERN_DISABLE", "torch.weight_only")
    rows = list(bench_linear.bench_shape("t", 64, 32, [3, 5], ["torch"], torch.device("cpu"),
                                         None, {"W4 g64": vlmkern.QuantConfig(4, 64)}))
    # every M's block: its baseline (timed again after the block), then its kernels
    assert [r["M"] for r in rows if r["kernel"] == "cuBLAS fp16"] == [3, 5]
    assert all("baseline_after_us" in r for r in rows if r["kernel"] == "cuBLAS fp16")
    kernel = next(r for r in rows if r["kernel"] == "W4 g64")
    assert (kernel["backend"], kernel["default"], kernel["err"]) == ("torch.weight_only", True, 0.0)
    assert os.environ["VLMKERN_DISABLE"] == "torch.weight_only"


def test_sweep_triton_int_act_checks_every_config():
    # Triton's interpreter must be on before it decorates the kernels: a subprocess
    script = ("import sweep_triton_int_act as s\n"
              "s.time_fn = lambda fn: (fn(), 2.0)[1]\n"
              "tiny = s.CONFIGS[:2] + (('ptr', 16, 32, 32, 4, 2), ('tma', 16, 32, 32, 4, 2))\n"
              "for line in s.sweep('tiny', 64, 40, 'W8A8', [3], tiny, device='cpu'):\n"
              "    print(line)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = proc.stdout.strip().splitlines()[-1].strip("| ").split(" | ")
    # 2 * M * N * K / 2 us = 0.0 TOP/s at this size; each config gave the default's bits
    assert cells[:3] == ["tiny", "W8A8", "3"] and cells[3:] == ["2.0 (0 TOP/s)"] * 4, cells


def test_bench_linear_lists_blocks_whose_baseline_drifted():
    import bench_linear
    steady = bench_linear.row("qkv", 64, 32, 1, "cuBLAS fp16", "torch", 10.0, 10.0, 4096, 1000.0)
    steady["baseline_after_us"] = 10.9                               # within 10%
    slowed = bench_linear.row("qkv", 64, 32, 16, "cuBLAS fp16", "torch", 10.0, 10.0, 4096, 1000.0)
    slowed["baseline_after_us"] = 13.0
    kernel = bench_linear.row("qkv", 64, 32, 16, "W4 g128", "cuda.x", 40.0, 10.0, 1024, 1000.0)
    old_json = bench_linear.row("o", 64, 32, 1, "cuBLAS fp16", "torch", 10.0, 10.0, 4096, 1000.0)
    rows = [steady, slowed, kernel, old_json]
    assert bench_linear.drift_notes(rows) == [
        "- qkv M=16: cuBLAS fp16 took 10.0 us before this block's kernels and 13.0 us after "
        "(+30%): the GPU's speed changed during these rows; time them again."]
    table = bench_linear.to_markdown({"device": "GPU", "torch": "2", "copy_GBs": 1.0}, rows)
    assert table.rstrip().endswith("time them again.") and "Baseline drift above 10%" in table
    assert "Baseline drift" not in bench_linear.to_markdown(
        {"device": "GPU", "torch": "2", "copy_GBs": 1.0}, [steady, kernel])


def test_bench_linear_keeps_the_rows_of_a_run_that_fails(monkeypatch, tmp_path):
    """A kernel's CUDA error (or a time limit) part way leaves every row timed
    before it in the result files (no GPU here: the timing loop is stubbed)."""
    import bench_linear
    import torch

    def blocks(name, k, n, ms, *args, **kwargs):
        for m in ms:
            yield {"layer": name, "K": k, "N": n, "M": m, "kernel": "cuBLAS fp16",
                   "backend": "torch", "us": 10.0, "speedup": 1.0}
            yield {"layer": name, "K": k, "N": n, "M": m, "kernel": "W4 g128",
                   "backend": "torch.weight_only", "us": 5.0, "speedup": 2.0}
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    import vlmkern
    # no backend probed under the fake GPU (a probe's answer is kept for the session)
    monkeypatch.setattr(vlmkern, "available_backends", lambda: {
        b: {"available": b == "torch", "reason": "test"} for b in ("cuda", "triton", "torch")})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(bench_linear, "measure_copy_bandwidth", lambda device: 1000.0)
    monkeypatch.setattr(bench_linear, "bench_shape", blocks)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_linear.main(["--out", str(tmp_path), "--backends", "torch",
                           "--shapes", "qwen2vl-7b qkv", "--ms", "1,16"])
    saved = json.loads((tmp_path / "linear_Fake_GPU.json").read_text())["rows"]
    assert [(r["M"], r["kernel"]) for r in saved] == [(1, "cuBLAS fp16"), (1, "W4 g128"),
                                                      (16, "cuBLAS fp16"), (16, "W4 g128")]
    assert "W4 g128" in (tmp_path / "linear_Fake_GPU.md").read_text()
