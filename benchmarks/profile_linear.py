"""Run one layer's kernels a few times each, for a profiler to wrap.

Not a benchmark (bench_linear.py times); this gives Nsight Compute a short,
fixed sequence of launches to measure, for example the default kernel and an
opt-in one side by side:

    ncu --section SpeedOfLight --section WarpStateStats -k regex:weight_only \\
        python benchmarks/profile_linear.py --shape "qwen2vl-7b gate/up" --m 1 \\
        --format "W4 g128" --enable cuda.weight_only_wgmma

Each variant (the kernel picked by default, then each --enable kernel) runs
--reps times after one warm-up call that also re-lays out the weight.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import vlmkern
from bench_linear import FORMATS, SHAPES, make_weight


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2vl-7b gate/up", choices=list(SHAPES))
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--format", default="W4 g128", choices=list(FORMATS))
    ap.add_argument("--enable", default="", help="comma-separated opt-in kernels to run too")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_linear needs a CUDA GPU", file=sys.stderr)
        return 2
    k, n = SHAPES[args.shape]
    torch.manual_seed(0)
    # quantized on the GPU: binarizing a 7B MLP weight on the CPU takes far longer
    qw = make_weight(torch.randn(n, k, device="cuda") * 0.02, FORMATS[args.format])
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    for enable in ("", *[e for e in args.enable.split(",") if e]):
        os.environ["VLMKERN_ENABLE"] = enable
        print(f"{enable or 'default'}: {vlmkern.ops.which_kernel(x, qw)}", flush=True)
        vlmkern.ops.linear(x, qw)
        for _ in range(args.reps):
            vlmkern.ops.linear(x, qw)
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
