"""Static instruction counts of the Triton weight-only decode loops (no GPU).

Compiles the one-token kernels (``_wo_gemv_kernel``, ``_binary_gemv_kernel``)
and the small-M MMA kernels they replace at M = 1 offline to a cubin, as Triton would for a
launch whose pointers and strides are multiples of 16, disassembles it and
counts the instructions of the main loop (the longest backward branch), per
weight element a thread handles: a static stand-in for decode cost on a
machine without a GPU. Int-to-float conversions (I2F / I2FP) are counted
apart: they issue at a quarter of the rate of the other arithmetic.

    python benchmarks/sass_count_triton.py                 # sm_90
    python benchmarks/sass_count_triton.py --cap 80 --formats "W4 g128,binary"
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)      # kernels must be decorated for compiling

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sass_count import cuobjdump  # noqa: E402
from vlmkern.triton_kernels import binary as bi  # noqa: E402
from vlmkern.triton_kernels import weight_only as wo  # noqa: E402

# Arguments Triton specializes as multiples of 16 at a typical launch.
DIV16 = {"x_ptr", "qw_ptr", "s_ptr", "z_ptr", "out_ptr", "ws_ptr", "N", "K", "stride_xm",
         "stride_om", "stride_qn", "stride_sn", "stride_zn", "n_words", "z_words", "sign_ptr",
         "aux_ptr", "sal_ptr", "st_ptr", "stride_tn", "stride_tb", "words_per_split"}


def compile_cubin(fn, consts: dict, cap: int, num_warps: int, num_stages: int,
                  types: dict | None = None) -> bytes:
    types = types or dict(x_ptr="*fp16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*i32",
                          bias_ptr="*fp32", out_ptr="*fp16", ws_ptr="*fp32")
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in DIV16}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return k.asm["cubin"]


def main_loop(cubin: bytes) -> list[str]:
    """Opcodes of the instructions inside the longest backward branch."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);", sass)
    best = None
    for addr, ins in lines:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < int(addr, 16):
            span = (int(m.group(1), 16), int(addr, 16))
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        raise SystemExit("sass_count_triton: no loop found")
    return [re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]
            for addr, ins in lines if best[0] <= int(addr, 16) <= best[1]]


def binary_rows(cap: int) -> list[str]:
    """The binary (BiLLM) decode loops at block size 128."""
    types = dict(x_ptr="*fp16", sign_ptr="*i32", aux_ptr="*i32", sal_ptr="*i32", st_ptr="*fp16",
                 bias_ptr="*fp32", out_ptr="*fp16", ws_ptr="*fp32")
    kernels = [("one token, CUDA cores", bi._binary_gemv_kernel,
                dict(BLOCK=128, HAS_BIAS=False, SPLIT=True, MODE=0, BLOCK_N=bi.GEMV_ROWS,
                     W=bi.GEMV_WORDS), bi.GEMV_ROWS * 32 * bi.GEMV_WORDS, 4),
               ("M <= 16, MMA", bi._binary_kernel,
                dict(BLOCK=128, STAT_MODE=0, HAS_BIAS=False, MODE=0, SWIZZLE=8, BLOCK_M=16,
                     BLOCK_N=64, BLOCK_K=64), 64 * 64, 8)]
    out = []
    for name, fn, consts, elements, warps in kernels:
        ops = main_loop(compile_cubin(fn, consts, cap, warps, 3, types))
        count = collections.Counter(ops)
        top = ", ".join(f"{op} {n}" for op, n in count.most_common(5))
        per_thread = elements / (warps * 32)
        out.append(f"| binary b128 | {name} | {warps} warps | {len(ops) / per_thread:.1f} "
                   f"| {(count['I2F'] + count['I2FP']) / per_thread:.2f} | {top} |")
    return out


def rows(cap: int, cases) -> list[str]:
    out = []
    for label, bits, group in cases:
        common = dict(BITS=bits, GROUP=group, ASYM=True, HAS_BIAS=False, SPLIT=True, MODE=0)
        bn, bk = wo.gemv_tile(bits, group) if bits in wo.GEMV_TILES else (None, None)
        kernels = [("one token, CUDA cores", wo._wo_gemv_kernel,
                    dict(common, BLOCK_N=bn, BLOCK_K=bk), 4, 3)] if bn else []
        kernels.append(("M <= 16, MMA", wo._wo_small_kernel,
                        dict(common, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), 8, 3))
        for name, fn, consts, warps, stages in kernels:
            ops = main_loop(compile_cubin(fn, consts, cap, warps, stages))
            per_thread = consts["BLOCK_N"] * consts["BLOCK_K"] / (warps * 32)
            count = collections.Counter(ops)
            i2f = count["I2F"] + count["I2FP"]
            top = ", ".join(f"{op} {n}" for op, n in count.most_common(5))
            out.append(f"| {label} | {name} | {consts['BLOCK_N']}x{consts['BLOCK_K']}, {warps} warps "
                       f"| {len(ops) / per_thread:.1f} | {i2f / per_thread:.2f} | {top} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=90, help="compute capability (80, 90)")
    ap.add_argument("--formats", default="W4 g128,W2 g128,W8 g128,W3 g128,binary",
                    help="weight-only formats; 'binary' adds the binary kernels")
    args = ap.parse_args(argv)
    cases, binary = [], False
    for label in args.formats.split(","):
        if label.strip() == "binary":
            binary = True
            continue
        m = re.fullmatch(r"W(\d) g(\d+)", label.strip())
        if not m:
            raise SystemExit(f"sass_count_triton: format {label!r} is not like 'W4 g128'")
        cases.append((label.strip(), int(m.group(1)), int(m.group(2))))
    print(f"Triton weight-only main loops, sm_{args.cap}, fp16 activations and scales, "
          f"asymmetric: instructions per weight element per thread")
    print("| format | kernel | tile | instructions / weight | int-to-float / weight | top opcodes |")
    print("|---|---|---|---|---|---|")
    for row in rows(args.cap, cases) + (binary_rows(args.cap) if binary else []):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
