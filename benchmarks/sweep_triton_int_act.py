"""Tile sweep of the Triton integer-activation GEMM: time per launch config.

``triton.int_act`` takes its tiles from ``triton_kernels._common.CONFIGS``
by M bucket. On an H100 it beat every CUDA route for W8A8 at M = 4096
(1.06x of cuBLAS fp16 with 128 x 128 x 64 tiles), but reached only about
40% of the int8 tensor-core rate. This times the same call with other
tiles, warps and pipeline depths on a few layers and M, with bench_linear's
timer and weight rotation, so one GPU run shows which config to make the
default (``CONFIGS[("int_act", bucket)]``). The opt-in persistent TMA kernel
(``triton.int_act_tma``, ``CONFIGS[("int_act_tma", bucket)]``) is timed next
to it:

    python benchmarks/sweep_triton_int_act.py
    python benchmarks/sweep_triton_int_act.py --ms 64,1024 --formats W8A8,W4A4

A config that fails to compile (too much shared memory, say) prints its
error in its cell. Results go to stdout and <--out>/sweep_triton_int_act_<device>.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from bench_linear import FORMATS, SHAPES, make_weight, rotating, time_fn, write_sweep

# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): "ptr" is
# triton.int_act (the first entry its "large" default at the time of writing),
# "tma" the persistent TMA kernel triton.int_act_tma (Hopper, per-channel
# int8 weights; its first entry is its default), "tma flat" the same with
# one software pipeline across tiles (FLATTEN). Triton keeps a wgmma with an
# int32 accumulator synchronous (it waits for each K step's MMAs before the
# next step's), so the 256-column K steps spread that wait over twice the MMAs.
CONFIGS = (
    ("ptr", 128, 128, 64, 8, 3),
    ("ptr", 128, 128, 128, 8, 3),
    ("ptr", 128, 128, 128, 4, 4),
    ("ptr", 128, 256, 64, 8, 3),
    ("ptr", 128, 256, 128, 8, 3),
    ("ptr", 256, 128, 128, 8, 3),
    ("ptr", 64, 256, 128, 4, 4),
    ("ptr", 64, 128, 128, 4, 4),
    ("ptr", 128, 128, 256, 8, 2),
    ("tma", 128, 256, 128, 8, 4),
    ("tma", 128, 256, 128, 8, 3),
    ("tma", 256, 128, 128, 8, 3),
    ("tma", 128, 128, 128, 8, 5),
    ("tma flat", 128, 128, 128, 8, 4),
    ("tma flat", 64, 128, 128, 4, 4),
    ("tma", 128, 256, 256, 8, 2),
    ("tma", 128, 128, 256, 8, 3),
)


def label(cfg) -> str:
    kernel, bm, bn, bk, w, s = cfg
    return f"{kernel.upper() + ' ' if kernel != 'ptr' else ''}{bm}x{bn}x{bk} w{w} s{s}"


def sweep(shape, k, n, fmt, ms, configs, device="cuda") -> list[str]:
    from vlmkern.triton_kernels.int_act import int_act_matmul
    from vlmkern.triton_kernels.int_act_tma import int_act_tma_matmul, tma_reason

    torch.manual_seed(0)
    qw = make_weight(torch.randn(n, k, device=device) * 0.02, FORMATS[fmt])
    weights = rotating(lambda: copy.deepcopy(qw), qw.nbytes)
    lines = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        ref = int_act_matmul(x, qw)
        cells = []
        for cfg in configs:
            kernel, bm, bn, bk, w, s = cfg
            tma = kernel.startswith("tma")
            fn = int_act_tma_matmul if tma else int_act_matmul
            if tma and tma_reason(qw):
                cells.append("n/a")
                continue
            opts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
            if tma:
                opts["FLATTEN"] = int(kernel == "tma flat")
            try:
                # the sums are exact integers; a config must give the default's bits
                if not torch.equal(fn(x, qw, config=opts), ref):
                    cells.append("wrong result")
                    continue
                us = time_fn(lambda: fn(x, weights(), config=opts))
                cells.append(f"{us:.1f} ({2 * m * n * k / us / 1e6:.0f} TOP/s)")
            except Exception as e:  # noqa: BLE001 - one bad config must not end the sweep
                cells.append(f"error: {type(e).__name__}")
        lines.append(f"| {shape} | {fmt} | {m} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qwen2vl-7b qkv,qwen2vl-7b gate/up")
    ap.add_argument("--formats", default="W8A8")
    ap.add_argument("--ms", default="1024,4096")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_triton_int_act needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    head = [f"# Triton int_act GEMM time (us) by launch config on {name}", "",
            ("Tiles BLOCK_M x BLOCK_N x BLOCK_K, warps, pipeline stages; TMA: the persistent "
             "TMA kernel (triton.int_act_tma), otherwise triton.int_act. Medians of CUDA-event "
             "timings of GPU time (activation quantization included), weights rotated past L2. "
             "Reproduce: `python benchmarks/sweep_triton_int_act.py`."), "",
            "| layer | format | M | " + " | ".join(label(c) for c in CONFIGS) + " |",
            "|---|---|---|" + "---|" * len(CONFIGS)]
    print("\n".join(head), flush=True)
    lines = []
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        for fmt in args.formats.split(","):
            lines += sweep(shape, k, n, fmt, [int(m) for m in args.ms.split(",")], CONFIGS)
    write_sweep(args.out, "sweep_triton_int_act", head, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
