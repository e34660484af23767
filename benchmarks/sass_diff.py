"""Which CUDA kernels changed since the build that passed the GPU tests (no GPU).

A kernel's GPU test result holds for its device code, not its source: a
refactor that leaves every instruction in place needs no new GPU run, and one
that moves a single instruction does. This compiles each csrc/*_kernel.cu of
the working tree and of a base revision (by default ``VERIFIED``, the last
revision whose kernels passed the GPU tests on a GPU) with the flags setup.py
uses, disassembles both, and reports for every base kernel whether the working
tree still holds a kernel with the same instructions (branch targets,
parameter offsets and symbol names aside; immediates count), plus how many
kernels are new.

    python benchmarks/sass_diff.py                    # sm_80 and sm_90a, every kernel file
    python benchmarks/sass_diff.py --base HEAD~3 --arch sm_90a --strict

--strict exits with status 1 when a base kernel changed (CI runs it so, for
sm_90a: a kernel that passed on a GPU is not changed without a new GPU run,
which then moves ``VERIFIED``). A clone without the base revision (a shallow
one) compares nothing and exits 0.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sass_count import compile_sass, functions

ROOT = Path(__file__).resolve().parent.parent
# The revision whose default kernels passed the GPU tests: those of 4e982ce on
# an H100 (weight-only) and an H200 (all), and on an H100 again with the four
# made default after it (post-scale decode, spread int_act GEMM, lookup-table
# binary GEMM, fast dequantize; benchmarks/results/promote_H100.md).
VERIFIED = "0485a65"
# Kernels of VERIFIED removed on purpose (file -> pattern of mangled names):
# they are reported as retired, not as changed. The shared-memory A variant
# of the Hopper cp.async kernel (SMEM_A) and the prefetching binary GEMM
# (PREFETCH) measured slower on an H100 than the variants kept.
RETIRED = {"weight_only_sm90_kernel": re.compile(r"weight_only_wgmma_kernelI.*Lb1EEEv"),
           "binary_kernel": re.compile(r"gemm_kernelI.*Lb1EEEv")}
# the macros torch's extension build passes to nvcc (setup.py adds -O3, as compile_sass does)
TORCH_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                 "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?(BRA|BRX|BSSY|CALL|JMP|JMX|RET|WARPSYNC)\b")


def normalize(instruction: str) -> str:
    """An instruction without what moves when code around it moves: branch
    targets, constant-bank offsets (kernel parameters) and symbol names.
    Immediate operands are kept."""
    text = re.sub(r"c\[0x[0-9a-f]+\]\[0x[0-9a-f]+\]", "c[#]", instruction)
    if _BRANCH.match(text):
        text = re.sub(r"0x[0-9a-f]+", "#", text)
    return re.sub(r"\b_Z\w+", "@", text)


def fingerprint(body: list[str]) -> str:
    return hashlib.sha1("\n".join(normalize(i) for i in body).encode()).hexdigest()


def compare(base: dict[str, list[str]], new: dict[str, list[str]],
            retired: re.Pattern | None = None) -> tuple[list[str], list[str], int, int]:
    """(unchanged base kernels, changed base kernels, new kernel count, retired
    base kernel count): a base kernel is unchanged when some kernel of ``new``
    has its instructions, and retired when it is gone and ``retired`` matches
    its name."""
    have = {fingerprint(body) for body in new.values()}
    same = [name for name, body in base.items() if fingerprint(body) in have]
    gone = [name for name in base if name not in same and retired is not None and retired.search(name)
            and name not in new]
    changed = [name for name in base if name not in same and name not in gone]
    base_prints = {fingerprint(body) for body in base.values()}
    added = sum(fingerprint(body) not in base_prints for body in new.values())
    return same, changed, added, len(gone)


def sass(src_dir: Path, name: str, arch: str) -> dict[str, list[str]]:
    return functions(compile_sass(f"{name}.cu", arch, src_dir, TORCH_DEFINES))


def demangle(names: list[str]) -> list[str]:
    if not names or not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines()


def has_revision(rev: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}^{{commit}}"],
                          capture_output=True).returncode == 0


def checkout_csrc(rev: str, into: Path) -> Path:
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into / "csrc"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=VERIFIED, help=f"git revision to compare with (default {VERIFIED})")
    ap.add_argument("--arch", default="sm_80,sm_90a", help="comma-separated, e.g. sm_80,sm_90a")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a base kernel changed")
    args = ap.parse_args()
    if not shutil.which("nvcc"):
        raise SystemExit("sass_diff: nvcc not found on PATH")
    archs = args.arch.split(",")
    if not has_revision(args.base):
        print(f"sass_diff: revision {args.base} is not in this clone; nothing compared")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        base_dir = checkout_csrc(args.base, tmp / "base")
        new_dir = tmp / "tree" / "csrc"
        shutil.copytree(ROOT / "csrc", new_dir)
        names = sorted(p.stem for p in base_dir.glob("*_kernel.cu") if (new_dir / p.name).exists())
        jobs = [(name, arch) for name in names for arch in archs]
        with ThreadPoolExecutor() as pool:
            base = list(pool.map(lambda j: sass(base_dir, *j), jobs))
            new = list(pool.map(lambda j: sass(new_dir, *j), jobs))
    print(f"kernels of {args.base} against the working tree\n")
    print("| file | arch | unchanged | changed | retired | new |")
    print("|---|---|---|---|---|---|")
    all_changed = []
    for (name, arch), b, n in zip(jobs, base, new):
        same, changed, added, retired = compare(b, n, RETIRED.get(name))
        print(f"| {name}.cu | {arch} | {len(same)} | {len(changed)} | {retired} | {added} |")
        all_changed += [f"{name}.cu ({arch}): {d}" for d in demangle(changed)]
    if all_changed:
        print("\nchanged since the base (need a GPU run before they are trusted again):")
        print("\n".join(f"  {c}" for c in all_changed))
    return 1 if args.strict and all_changed else 0


if __name__ == "__main__":
    sys.exit(main())
