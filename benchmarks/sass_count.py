"""Static instruction counts of the weight-only kernel's unit loop (no GPU).

The decode kernels are bound by instruction issue, so the number of SASS
instructions a warp issues per unit (one 16 x 128 weight tile and one scale
slot row) is a useful figure on a machine without a GPU. This compiles
csrc/weight_only_kernel.cu for one architecture with nvcc, disassembles it
with cuobjdump (from PATH or the one Triton ships) and counts, for each
instantiation, the instructions from the loop's barrier to its back branch
(the common path: no row block finished), by opcode.

    python benchmarks/sass_count.py                 # sm_90a, M <= 16 tiles, + wgmma, LUT kernels

The weight-only kernel's table decode (binary weights in the lookup-table
layout, ``cuda.binary_lut_staged``) is listed with bits 2, its code width, and
its integer decode (``cuda.int_act_staged``) with bits 16, its layout width
(a unit there is 16 x 256 int8 weights a warp).
    python benchmarks/sass_count.py --arch sm_80 --all

Counts include predicated-off instructions, which still take issue slots.
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Mangled names of the instantiations: weight_only_mma_kernel<BITS, M_TILES, T,
# STAGES, SLOT_LOG2 (negative: exact / table / int8 decode), ACQ_REL, MIN_BLOCKS>,
# binary_lut_kernel<M_TILES, T>, weight_only_wgmma_kernel<BITS, T, TOKENS>.
# tests/test_benchmarks.py checks them against every kernel the sources define.
KERNEL = re.compile(r"weight_only_mma_kernelILi(\d+)ELi(\d)EN\w*?\d(F16|BF16)ELi\d+EL(i|in)(\d)ELb([01])ELi(\d)EEEv")
LUT_KERNEL = re.compile(r"binary_lut_kernelILi(\d)EN\w*?\d(F16|BF16)EEEv")
WGMMA_KERNEL = re.compile(r"weight_only_wgmma_kernelILi(\d)EN\w*?\d(F16|BF16)ELi(\d+)EEEv")
# source file -> (kernel function name, pattern of its instantiations)
FAMILIES = {"weight_only_kernel.cu": ("weight_only_mma_kernel", KERNEL),
            "binary_lut_kernel.cu": ("binary_lut_kernel", LUT_KERNEL),
            "weight_only_sm90_kernel.cu": ("weight_only_wgmma_kernel", WGMMA_KERNEL)}


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise SystemExit("sass_count: cuobjdump not found (install the CUDA toolkit or triton)")


def functions(sass: str, addresses: bool = False) -> dict[str, list]:
    """Mangled kernel name -> its instructions (opcode and operands), or
    (address, instruction) pairs."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and name:
            out[name].append((m.group(1), m.group(2)) if addresses else m.group(2))
    return out


def unit_loop(body: list[str]) -> list[str]:
    """From the wait before the loop's barrier to the branch after its MMAs."""
    start = next(i for i, x in enumerate(body) if x.startswith("BAR.SYNC")) - 1
    mma = [i for i, x in enumerate(body) if ("HMMA" in x or "IMMA" in x) and i > start]
    end = mma[0]
    for i in mma:          # the first run of MMAs: one unit's k16 steps
        if i - end > 80:
            break
        end = i
    while not re.search(r"\bBRA\b", body[end]):
        end += 1
    return body[start:end + 1]


def chunk_loop(body: list[str]) -> list[str]:
    """The wgmma kernel's loop, one chunk: from the back branch's target to the
    back branch (the one backward branch that follows a run of HGMMA)."""
    addr = [int(a, 16) for a, _ in body]
    last_mma = max(i for i, (_, x) in enumerate(body) if "HGMMA" in x)
    for i in range(last_mma, len(body)):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", body[i][1])
        if m and int(m.group(1), 16) < addr[i]:
            start = addr.index(int(m.group(1), 16))
            return [x for _, x in body[start:i + 1]]
    raise ValueError("no loop back branch after the MMAs")


def compile_sass(source: str, arch: str, csrc: Path = ROOT / "csrc", flags=()) -> str:
    """SASS of csrc/``source`` compiled by nvcc for ``arch`` (extra nvcc ``flags``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-O3", "-std=c++17", *flags,
                        f"-I{csrc}", "-o", str(cubin), str(csrc / source)],
                       check=True, capture_output=True, text=True)
        return subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout


def matched(rows: list, source: str) -> list:
    """``rows``, or an error when the pattern found no kernel of ``source``
    (an empty table would read as a count of nothing)."""
    if not rows:
        raise SystemExit(f"sass_count: no kernel of csrc/{source} matched its name pattern; "
                         f"did its template parameters change? (see FAMILIES)")
    return rows


def opcode(instr: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0].split(".")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--all", action="store_true", help="every token tile, not just M <= 16")
    args = ap.parse_args(argv)
    sass = compile_sass("weight_only_kernel.cu", args.arch)
    rows = []
    for name, body in functions(sass).items():
        m = KERNEL.search(name)
        if not m:
            continue
        bits, tiles, dtype = int(m.group(1)), int(m.group(2)), m.group(3)
        slot = -int(m.group(5)) if m.group(4) == "in" else int(m.group(5))
        if tiles > 2 and not args.all:
            continue
        loop = unit_loop(body)
        ops = collections.Counter(opcode(x) for x in loop)
        decode = ("table (binary)" if slot == -2 else "int8 (W8A8, 256 codes a unit)" if slot == -3
                  else "exact" if slot < 0 else f"post-scale g{16 << slot}")
        if m.group(6) == "1":
            decode += ", parts published by acq_rel"
        if m.group(7) != "2":
            decode += f", {m.group(7)} blocks per SM"
        rows.append((dtype, bits, tiles, slot, decode, len(loop), ops))
    matched(rows, "weight_only_kernel.cu")
    print("| dtype | bits | tokens | decode | instructions per unit | top opcodes |")
    print("|---|---|---|---|---|---|")
    for dtype, bits, tiles, _, decode, n, ops in sorted(rows, key=lambda r: r[:5]):
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        print(f"| {dtype} | {bits} | {8 * tiles} | {decode} | {n} | {top} |")
    if args.arch.startswith("sm_90"):
        wgmma_table(compile_sass("weight_only_sm90_kernel.cu", args.arch))
    lut_table(compile_sass("binary_lut_kernel.cu", args.arch))
    return 0


def busiest_loop(body: list, mma: str) -> list[str]:
    """The loop (back branch's target to back branch) holding the most ``mma``."""
    addr = [int(a, 16) for a, _ in body]
    loops = []
    for i, (_, x) in enumerate(body):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", x)
        if m and int(m.group(1), 16) < addr[i]:
            loops.append([y for _, y in body[addr.index(int(m.group(1), 16)):i + 1]])
    return max(loops, key=lambda seg: sum(mma in y for y in seg))


def lut_table(sass: str) -> None:
    """The lookup-table binary GEMM: instructions a warp issues per 16 x 128
    tile (its loop holds two chunks, 8 k16 steps each)."""
    rows = []
    for name, body in functions(sass, addresses=True).items():
        m = LUT_KERNEL.search(name)
        if m:
            tiles = int(m.group(1))
            loop = busiest_loop(body, "HMMA")
            chunks = sum("HMMA" in x for x in loop) // (8 * tiles)
            ops = collections.Counter(opcode(x) for x in loop)
            rows.append((m.group(2), 8 * tiles, len(loop) / chunks, chunks, ops))
    matched(rows, "binary_lut_kernel.cu")
    print("\n| dtype | tokens | lookup-table binary GEMM: instructions per tile | top opcodes "
          "(loop of 2 tiles) |")
    print("|---|---|---|---|")
    for dtype, tokens, n, _, ops in sorted(rows, key=lambda r: r[:2]):
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        print(f"| {dtype} | {tokens} | {n:.1f} | {top} |")


def wgmma_table(sass: str) -> None:
    """The Hopper kernel: instructions a warp issues per 128-column chunk."""
    rows = []
    for name, body in functions(sass, addresses=True).items():
        m = WGMMA_KERNEL.search(name)
        if m:
            loop = chunk_loop(body)
            rows.append((m.group(2), int(m.group(1)), int(m.group(3)), len(loop),
                         collections.Counter(opcode(x) for x in loop)))
    matched(rows, "weight_only_sm90_kernel.cu")
    print("\n| dtype | bits | token tile | wgmma kernel: instructions per chunk | top opcodes |")
    print("|---|---|---|---|---|")
    for dtype, bits, tokens, n, ops in sorted(rows, key=lambda r: r[:3]):
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        print(f"| {dtype} | {bits} | {tokens} | {n} | {top} |")


if __name__ == "__main__":
    sys.exit(main())
