"""Which opt-in kernels a GPU run supports making default.

An opt-in kernel (``VLMKERN_ENABLE``) may become default once its GPU tests
have passed on a GPU and it is faster than the kernel it would replace. This
reads what ``benchmarks/gpu_check.sh`` leaves behind, the pytest JUnit XML and
the ``bench_linear.py`` JSON, and prints one row per opt-in kernel: its tests
(passed / failed / skipped, and not run: collected by the test phase, in
``collected.txt``, but cut off by its time limit), and for every timed (layer,
M, format) the time of the kernel ``ops.linear`` runs there by default
divided by its own (above 1: faster; CUDA-graph replay times where both rows
have them).

    python benchmarks/promote_report.py OUTDIR            # OUTDIR of gpu_check.sh
    python benchmarks/promote_report.py --tests tests.xml --bench linear_H100.json

A kernel is "ready" when its tests ran (none failed, skipped or left unrun: a
skip may mean the machine could not run it) and it was faster in every timed case
by more than timing noise (``MARGIN``); the decision stays with the reader.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# A case counts as faster above this ratio: one run's timings of an unchanged
# kernel move by a percent or two between blocks, and a kernel that is default
# for every user should win by more than that.
MARGIN = 1.03

# opt-in kernel -> (test file, node-id pattern) pairs that exercise it
TESTS = {
    "cuda.weight_only_wgmma": [("test_cuda_weight_only_sm90.py", r"")],
    "cuda.weight_only_tma": [("test_cuda_weight_only_tma.py", r"")],
    # (the one test there that a build holding the kernel skips is left out)
    "cuda.dequant_layout_cublas": [("test_cuda_weight_only_dequant.py",
                                    r"^(?!test_wrapper_says_the_build_lacks)"),
                                   ("test_laid_out.py", r"layout_cublas")],
    "cuda.int_act_wgmma": [("test_cuda_int_act.py", r"wgmma")],
    "cuda.int_act_tma": [("test_cuda_int_act.py", r"tma")],
    "cuda.binary_lut_staged": [("test_cuda_binary_lut_staged.py", r""),
                               ("test_cuda_graphs.py", r"binary_lut_staged")],
    "cuda.binary_dequant_cublas": [("test_cuda_binary_dequant.py", r"^test_(gpu|binary)")],
    "cuda.binary_lut_dequant_cublas": [("test_cuda_binary_lut_dequant.py", r"^test_(gpu|binary)")],
    "cuda.binary_lut_tma": [("test_cuda_binary_lut_tma.py", r"")],
    "cuda.binary_lut_tma_decode": [("test_cuda_binary_lut_tma_decode.py", r"")],
    "cuda.int_act_staged": [("test_cuda_int_act_staged.py", r"^test_(gpu|int_act)")],
    "cuda.weight_only_post_scale_m64": [("test_cuda_weight_only_m64.py", r"")],
    "cuda.weight_only_tma_decode": [("test_cuda_weight_only_tma_decode.py", r"")],
    "cuda.weight_only_post_scale_acq_rel": [("test_cuda_weight_only_acq_rel.py", r"")],
    "cuda.weight_only_post_scale_3cta": [("test_cuda_weight_only_3cta.py", r"")],
    "triton.int_act_tma": [("test_triton_kernels.py", r"int_act_tma")],
}


def test_outcomes(xml_path: Path) -> dict[str, str]:
    """'file.py::test[params]' -> passed / failed / skipped, from JUnit XML."""
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        node = f"{module}.py::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out[node] = "failed"
        elif case.find("skipped") is not None:
            out[node] = "skipped"
        else:
            out[node] = "passed"
    return out


def collected_tests(path: Path) -> list[str]:
    """'file.py::test[params]' of every test the test phase collected
    (``pytest --collect-only -q`` lines, 'tests/' prefix dropped)."""
    return [line.strip().removeprefix("tests/") for line in path.read_text().splitlines()
            if "::" in line]


def kernel_tests(kernel: str, outcomes: dict[str, str],
                 collected: list[str] = ()) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "not run": 0}

    def exercises(node):
        file, _, name = node.partition("::")
        return any(file == f and re.search(pattern, name) for f, pattern in TESTS.get(kernel, ()))
    for node, outcome in outcomes.items():
        if exercises(node):
            counts[outcome] += 1
    counts["not run"] = sum(1 for node in collected if node not in outcomes and exercises(node))
    return counts


# Opt-in kernels for sizes where no default CUDA kernel runs: their baseline is
# the Triton kernel timed next to them (what ops.linear picks there today).
TRITON_BASELINE = {"cuda.binary_dequant_cublas", "cuda.binary_lut_tma"}
# Opt-in kernels measured against one named kernel: the one they would replace.
BASELINE_KERNEL = {"triton.int_act_tma": "triton.int_act"}


def relative_speed(base: dict, row: dict) -> float:
    """base time / row time, both from CUDA-graph replays where both rows have
    one (no host stall can fall inside those), both eager otherwise."""
    if base.get("graph_us") and row.get("graph_us"):
        return base["graph_us"] / row["graph_us"]
    return base["us"] / row["us"]


def speed_ratios(rows: list[dict], opt_in: set[str]) -> dict[str, list[tuple[str, float]]]:
    """opt-in kernel -> [(case, default time / its time)] over the timed cases
    where the kernel ``ops.linear`` runs by default was timed too (rows marked
    ``default`` by bench_linear; a case whose default kernel was not timed is
    left out). Runs from before that mark: the first non-opt-in CUDA kernel
    of the case (the default run comes before the ``--disable`` ones), or for
    TRITON_BASELINE kernels where none was, a Triton one. BASELINE_KERNEL
    kernels: against that kernel. Blocks whose cuBLAS baseline drifted
    (bench_linear.drifts) are left out."""
    from bench_linear import drifts  # torch only when timings are read

    drifted = drifts(rows)
    picked, cuda, triton, timed, by_kernel = {}, {}, {}, {}, {}
    for r in rows:
        backend = str(r.get("backend", ""))
        if "us" not in r or (r["layer"], r["M"]) in drifted:   # a block the GPU slowed
            continue
        case = f"{r['layer']} M={r['M']} {r['kernel']}"
        by_kernel.setdefault(backend, {})[case] = r
        if r.get("default"):
            picked[case] = r
        if backend in opt_in:
            timed.setdefault(backend, []).append((case, r))
        elif backend.startswith("triton."):
            triton.setdefault(case, r)
        elif backend.startswith("cuda."):
            cuda.setdefault(case, r)
    marked = any("default" in r for r in rows)
    out = {}
    for kernel, cases in timed.items():
        if kernel in BASELINE_KERNEL:
            base = by_kernel.get(BASELINE_KERNEL[kernel], {})
        elif marked:
            base = picked
        else:
            base = {**triton, **cuda} if kernel in TRITON_BASELINE else cuda
        out[kernel] = [(case, relative_speed(base[case], r)) for case, r in cases if case in base]
    return out


def report(outcomes: dict[str, str], rows: list[dict], collected: list[str] = ()) -> list[str]:
    from bench_linear import wrong_output

    ratios = speed_ratios(rows, set(TESTS))
    wrong = {r.get("backend") for r in rows if wrong_output(r)}
    lines = ["| opt-in kernel | tests passed / failed / skipped / not run | default time / its time "
             "| ready |", "|---|---|---|---|"]
    for kernel in TESTS:
        t = kernel_tests(kernel, outcomes, collected)
        r = ratios.get(kernel, [])
        speed = ", ".join(f"{case}: {x:.2f}" for case, x in r) or "not timed"
        if kernel in wrong:
            speed += " (output differs from the torch reference: see the timing table)"
        ready = (t["passed"] > 0 and t["failed"] == t["skipped"] == t["not run"] == 0 and bool(r)
                 and all(x > MARGIN for _, x in r) and kernel not in wrong)
        lines.append(f"| {kernel} | {t['passed']} / {t['failed']} / {t['skipped']} / "
                     f"{t['not run']} | {speed} | {'yes' if ready else 'no'} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", nargs="?", help="gpu_check.sh's OUTDIR (tests.xml, linear_*.json)")
    ap.add_argument("--tests", help="pytest JUnit XML")
    ap.add_argument("--bench", nargs="*", default=[], help="bench_linear.py JSON files")
    args = ap.parse_args(argv)
    tests = Path(args.tests) if args.tests else None
    bench = [Path(b) for b in args.bench]
    collected = []
    if args.outdir:
        out = Path(args.outdir)
        tests = tests or (out / "tests.xml")
        bench = bench or sorted(out.glob("linear_*.json"))
        if (out / "collected.txt").exists():
            collected = collected_tests(out / "collected.txt")
    outcomes = test_outcomes(tests) if tests and tests.exists() else {}
    rows = [r for b in bench for r in json.loads(b.read_text())["rows"]]
    if not outcomes and not rows:
        print("promote_report: no test results and no timings found", file=sys.stderr)
        return 2
    print("\n".join(report(outcomes, rows, collected)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
