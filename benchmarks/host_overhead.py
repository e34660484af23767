"""Host time of one quantized layer call: what an eager decode step pays in
Python per linear layer before (and around) its kernel.

A layer small enough that the GPU keeps up with the launches is called many
times in a row and timed by the wall clock, so the figure is the host's time
per call: checks, kernel selection, the kernel's wrapper and the launch.
nn.Linear in the same dtype is the reference. With --stub (always on the
CPU, where the torch reference's arithmetic would dominate) the selected
kernel is replaced by a function that returns a ready output, which leaves
vlmkern's own Python alone: ``ops.linear`` up to the kernel's wrapper.

    python benchmarks/host_overhead.py                 # on the GPU
    python benchmarks/host_overhead.py --stub          # the front end alone
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

import vlmkern
from vlmkern import BinaryConfig, IntActConfig, QuantConfig
from vlmkern.ops import backends

FORMATS = {"W4 g128": QuantConfig(4, 128), "W8A8": IntActConfig(8, 8), "binary": BinaryConfig()}


def per_call_us(fn, calls: int, repeats: int, device: torch.device) -> float:
    """Best of ``repeats`` wall-clock means over ``calls`` calls, in us."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def stubbed(layer, x) -> backends.KernelSpec:
    """Register, first in its backend, a copy of the kernel the layer's call
    selects whose function returns a ready output; return the copy."""
    weight = layer.quantized_weight
    x2 = x.reshape(-1, x.shape[-1])
    spec = backends.select(backends.OP_OF_FORMAT[weight.FORMAT], x2, weight)
    out = layer(x).reshape(x2.shape[0], -1)
    stub = dataclasses.replace(spec, fn=lambda x2, w, b: out)
    backends.BACKENDS[spec.name.split(".")[0]].register(stub, first=True)
    return stub


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    stub_mode = args.stub or device.type == "cpu"
    torch.manual_seed(0)
    dense = torch.nn.Linear(args.in_features, args.out_features, bias=False)
    x = torch.randn(1, 1, args.in_features, device=device, dtype=dtype)
    rows = []
    with torch.inference_mode():
        reference = copy.deepcopy(dense).to(device, dtype)
        rows.append({"layer": "nn.Linear", "kernel": "torch",
                     "us": per_call_us(lambda: reference(x), args.calls, args.repeats, device)})
        for label, config in FORMATS.items():
            layer = vlmkern.QuantLinear.from_linear(dense, config).to(device)
            layer(x)                                       # layouts made, choice remembered
            kernel = vlmkern.ops.which_kernel(x.reshape(1, -1), layer.quantized_weight)
            stub = stubbed(layer, x) if stub_mode else None
            try:
                us = per_call_us(lambda layer=layer: layer(x), args.calls, args.repeats, device)
            finally:
                if stub is not None:   # assigning the list ends the remembered choices
                    backend = backends.BACKENDS[stub.name.split(".")[0]]
                    backend.kernels = [k for k in backend.kernels if k is not stub]
            rows.append({"layer": label, "kernel": kernel + (" (stub)" if stub else ""), "us": us})
        if device.type == "cpu":   # on a GPU the check is opt-in (VLMKERN_CHECK_FINITE=1)
            rows.append({"layer": "of which: the CPU-only NaN/Inf check of x", "kernel": "",
                         "us": per_call_us(lambda: bool(torch.isfinite(x).all()), args.calls,
                                           args.repeats, device)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stub", action="store_true", help="leave the kernel out (always on the CPU)")
    p.add_argument("--in-features", type=int, default=512)
    p.add_argument("--out-features", type=int, default=256)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = run(args)
    print(f"host time per call, x [1, 1, {args.in_features}] -> {args.out_features}, "
          f"{args.device}, torch {torch.__version__}")
    print("| layer | kernel | us per call |\n|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['kernel']} | {r['us']:.2f} |")


if __name__ == "__main__":
    main()
