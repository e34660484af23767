"""Work-split sweep of the weight-only decode kernel: time per thread-block count.

The kernel splits a layer's (128-row, 128-column) units evenly over
``num_ctas`` thread blocks; ``cuda_weight_only.num_ctas_for`` picks two per
SM. This times the op directly for several counts (as multiples of the SM
count), each decode and a few layer shapes and M, with bench_linear's timer
and weight rotation, so one GPU run shows whether another split is faster:

    python benchmarks/sweep_weight_only.py                  # defaults below
    python benchmarks/sweep_weight_only.py --per-sm 0.5,1,2 --ms 1,16

The decode ``tma`` times the Hopper kernel's decode path
(``cuda.weight_only_tma_decode``, M <= 16, sm_90a builds) instead: one
thread block per SM in clusters of two, so a count f per SM there means at
most f * SMs / 2 clusters (the launch takes no more than the GPU holds).

Results go to stdout and <--out>/sweep_weight_only_<device>.md (default
benchmarks/results).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from bench_linear import FORMATS, SHAPES, make_weight, rotating, time_fn, write_sweep

from vlmkern.ops import cuda_weight_only as cw
from vlmkern.ops import cuda_weight_only_sm90 as wg


def sweep(shape, k, n, fmt, ms, per_sm, decodes, sms) -> list[str]:
    torch.manual_seed(0)
    qw = make_weight(torch.randn(n, k, device="cuda") * 0.02, FORMATS[fmt])
    mw = cw.kernel_weight(qw, torch.float16)
    # copies of the kernel layout, so every call streams its weight from HBM
    layouts = rotating(lambda: copy.deepcopy(mw), mw.resident_bytes)
    units = mw.blocks * mw.chunks
    counters = cw._counters(torch.device("cuda"), mw.blocks)
    lines = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        for decode in decodes:
            limit = {"post_scale": cw.post_scale_max_m(qw), "tma": 16,
                     "post_scale_acq_rel": 16 if mw.slot_log2 == 3 else 0,
                     "post_scale_3cta": cw.post_scale_3cta_max_m(qw)}.get(decode, cw.MAX_M)
            if m > limit or (decode == "tma" and not wg.sm90_available(torch.device("cuda"))):
                continue
            cells = []
            for f in per_sm:
                ctas = max(1, min(units, round(f * sms)))

                def call(ctas=ctas, x=x, code=cw.DECODES.get(decode), f=f):
                    w = layouts()
                    if code is None:   # the TMA decode path: clusters of two blocks
                        return torch.ops.vlmkern.weight_only_tma_decode(
                            x, w.wq, w.sz, None, counters, w.bits, w.out_features, w.slot_log2,
                            max(1, round(f * sms / 2)))
                    return torch.ops.vlmkern.weight_only_mma(
                        x, w.wq, w.sz, None, counters, w.bits, w.out_features, w.slot_log2, ctas,
                        code)
                cells.append(f"{time_fn(call):.2f}")
            lines.append(f"| {shape} | {fmt} | {m} | {decode} | {units} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qwen2vl-7b qkv,qwen2vl-7b gate/up,qwen2vl-7b down")
    ap.add_argument("--formats", default="W4 g128,W3 g128,W2 g128")
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--per-sm", default="0.5,1,1.5,2,3", help="thread blocks per SM to try")
    ap.add_argument("--decodes", default="exact,post_scale,post_scale_acq_rel,post_scale_3cta,tma")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_weight_only needs a CUDA GPU", file=sys.stderr)
        return 2
    per_sm = [float(v) for v in args.per_sm.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    name = torch.cuda.get_device_name()
    head = [f"# Weight-only kernel time (us) by thread blocks per SM on {name}", "",
            (f"{sms} SMs; the default split is {cw.CTAS_PER_SM} per SM. Medians of CUDA-event "
             "timings of GPU time, layouts rotated past L2. Reproduce: "
             "`python benchmarks/sweep_weight_only.py`."), "",
            "| layer | format | M | decode | units | " + " | ".join(f"{f:g}/SM" for f in per_sm) + " |",
            "|---|---|---|---|---|" + "---|" * len(per_sm)]
    print("\n".join(head), flush=True)
    lines = []
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        for fmt in args.formats.split(","):
            lines += sweep(shape, k, n, fmt, [int(m) for m in args.ms.split(",")], per_sm,
                           args.decodes.split(","), sms)
    write_sweep(args.out, "sweep_weight_only", head, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
