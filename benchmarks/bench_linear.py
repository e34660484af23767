"""Per-layer latency of quantized linears against cuBLAS, in one run.

For each layer shape (K x N) and M, times on the same device, with the same
timer and L2 handling: cuBLAS fp16/bf16 (`torch.matmul`), `torch._int_mm`
(int8 x int8 -> int32, where it accepts the shape), and `vlmkern.ops.linear`
for each format forced onto each available backend. Medians of CUDA-event
timings; weights are rotated through a pool larger than L2 so every call
streams its weights from HBM as a decode step does.

Columns: us, graph us, GB/s (the format's stored weight bytes, ``nbytes``,
plus 2-byte activations and outputs, over us: the kernels read their own
layout, 2-5% larger with its padded scale words, and dequantize + cuBLAS
paths also write and read a dense copy, so this is bytes of the format per
second, not all bytes moved),
% of peak bandwidth (peak measured here with a device-to-device copy),
TFLOP/s (2*M*N*K / us), speedup vs cuBLAS fp16, graph speedup vs cuBLAS fp16,
err (largest difference from the torch reference's output, relative to the
reference's largest value: a fast wrong kernel shows here), default (whether
``ops.linear`` picks this kernel with no VLMKERN_* variable set).
"us" brackets one eager call with CUDA events behind a spin kernel; "graph us" is
the time per call of a CUDA-graph replay of one call per pool entry, which excludes
host stalls the spin may not cover: us far above graph us means the host, not the
kernel, slowed that row ("-": the call could not be captured). cuBLAS fp16 is
timed again after each (layer, M) block; the table ends with the blocks whose
baseline moved by more than 10%, whose rows are suspect.

    python benchmarks/bench_linear.py                      # full table (GPU)
    python benchmarks/bench_linear.py --quick              # a few shapes
    python benchmarks/bench_linear.py --enable cuda.weight_only_wgmma
                                  # also time opt-in kernels, next to the defaults
    python benchmarks/bench_linear.py --disable cuda.weight_only_post_scale
                                  # also time what runs with a default kernel turned off
Results go to benchmarks/results/linear_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import statistics
import sys
from pathlib import Path

from dataclasses import dataclass

import torch

import vlmkern
from vlmkern import BinaryConfig, IntActConfig, QuantConfig
from vlmkern.ops.laid_out import LaidOutWeight
from vlmkern.ops.laid_out_binary import LaidOutBinaryWeight

SHAPES = {  # name: (K, N)
    "qwen2vl-7b qkv": (3584, 4608), "qwen2vl-7b o": (3584, 3584),
    "qwen2vl-7b gate/up": (3584, 37888), "qwen2vl-7b down": (18944, 3584),
    "llava-1.5-7b qkv": (4096, 12288), "llava-1.5-7b o": (4096, 4096),
    "llava-1.5-7b gate/up": (4096, 22016), "llava-1.5-7b down": (11008, 4096),
}
MS = (1, 4, 16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class KernelLayout:
    """A group-wise or binary format whose codes are held only in a CUDA
    kernel layout (what ``vlmkern.to_kernel_layout`` makes of a layer; with
    ``binary=True`` for a binary one)."""
    config: QuantConfig | BinaryConfig


FORMATS = {
    "W4 g128": QuantConfig(4, 128), "W3 g128": QuantConfig(3, 128),
    "W2 g128": QuantConfig(2, 128), "W8 g128": QuantConfig(8, 128),
    "W4 g128 layout": KernelLayout(QuantConfig(4, 128)),
    "W8A8": IntActConfig(8, 8), "W6A6": IntActConfig(6, 6), "W4A4": IntActConfig(4, 4),
    "binary": BinaryConfig(),
    "binary layout": KernelLayout(BinaryConfig()),
}


def make_weight(w: torch.Tensor, fmt):
    """The quantized weight of one FORMATS entry (round to nearest)."""
    if isinstance(fmt, KernelLayout) and isinstance(fmt.config, BinaryConfig):
        return LaidOutBinaryWeight.from_binary(vlmkern.quantize_weight(w, fmt.config))
    if isinstance(fmt, KernelLayout):
        return LaidOutWeight.from_quantized(vlmkern.quantize_weight(w, fmt.config))
    return vlmkern.quantize_weight(w, fmt)


L2_BYTES = 64 << 20
SPIN_CYCLES = 400_000   # ~200 us at 2 GHz: longer than enqueueing one call


def measure_copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes / time)."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), warmup=3, reps=20)
    return 2 * a.numel() / t / 1e3


def time_fn(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median GPU microseconds of ``fn()`` measured with CUDA events.

    Before each timed call the GPU is kept busy with a spin kernel while the
    CPU enqueues start event, ``fn`` and end event, so the events bracket the
    GPU work alone: Python and launch overhead (tens of microseconds, larger
    than a decode-sized layer) is not counted. Decoders that replay CUDA
    graphs see these times; eager callers add their own dispatch cost.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_graph(fn, calls: int, reps: int = 10) -> float | None:
    """Median GPU microseconds per ``fn()`` when ``calls`` consecutive calls
    are replayed from one CUDA graph; None where ``fn`` cannot be captured.

    A replay is a single launch, so no Python work, allocation or host sync can
    fall between the calls it times, as it can inside ``time_fn``'s bracket when
    the host work outlasts the spin kernel. The graph keeps the pointers it was
    captured with, so ``fn`` should cycle through a whole ``rotating`` pool
    (``calls = nxt.size``): fewer entries could sit in L2 across replays.
    """
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    try:
        # warm up on the capture stream: wrappers cache workspaces per stream
        # (made under capture they would be re-zeroed by every replay), Triton
        # compiles and cuBLAS picks its workspace outside the capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(calls):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph, stream=side):
            outs = [fn() for _ in range(calls)]  # the replays write here: keep alive with graph
        us = time_fn(graph.replay, warmup=1, reps=reps) / calls
    except Exception as e:  # a kernel that cannot be captured still has its event timing
        print(f"graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
              file=sys.stderr)
        return None
    del outs, graph  # held until the last replay has run (time_fn synchronizes)
    return us


def time_both(fn, calls: int) -> tuple[float, float | None]:
    """``time_fn(fn)`` and ``time_graph(fn, calls)``."""
    return time_fn(fn), time_graph(fn, calls)


def rotating(make, bytes_each: int):
    """A pool of objects (from ``make()``) big enough that cycling through
    them never hits L2, and a getter that cycles."""
    count = max(2, -(-2 * L2_BYTES // max(bytes_each, 1)))
    pool = [make() for _ in range(min(count, 64))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(pool)
        return pool[state["i"]]
    nxt.size = len(pool)  # calls for a CUDA graph to stream the whole pool (time_graph)
    return nxt


def bench_shape(name, k, n, ms, backends, device, peak_gbs, formats=FORMATS, seed=0, enable=(),
                disable=()):
    """Rows for one layer shape, yielded as they are timed (a run cut short
    keeps them). Each backend is timed as it is, with each opt-in kernel of
    ``enable`` turned on and with each kernel of ``disable`` turned off, where
    that picks a kernel not already timed for that format and M."""
    torch.manual_seed(seed)
    w16 = (torch.randn(n, k, device=device) * 0.02).half()
    fp16_weights = rotating(lambda: w16.clone(), w16.numel() * 2)
    bf16_weights = rotating(lambda: w16.bfloat16(), w16.numel() * 2)
    # the weight as a layer stores it, [N, K] row-major, passed transposed:
    # cuBLASLt's native int8 layout (a row-major [K, N] one is far slower)
    int8_weights = rotating(
        lambda: torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8), n * k)
    packed = {}
    for label, cfg in formats.items():
        qw = make_weight(w16.float(), cfg).to(device)
        # deep copies: a pool of one object would sit in L2 for small layers
        packed[label] = rotating(lambda qw=qw: copy.deepcopy(qw), qw.nbytes)
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        base, base_g = time_both(lambda: torch.matmul(x, fp16_weights().T), fp16_weights.size)
        moved16 = 2 * (n * k + m * k + m * n)
        baseline = row(name, k, n, m, "cuBLAS fp16", "torch", base, base, moved16, peak_gbs,
                       base_g, base_g)
        yield baseline
        xb = x.bfloat16()
        t, g = time_both(lambda: torch.matmul(xb, bf16_weights().T), bf16_weights.size)
        yield row(name, k, n, m, "cuBLAS bf16", "torch", t, base, moved16, peak_gbs, g, base_g)
        xi = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
        try:
            t, g = time_both(lambda: torch._int_mm(xi, int8_weights().t()), int8_weights.size)
            int_mm = row(name, k, n, m, "torch._int_mm", "torch", t, base,
                         n * k + m * k + 4 * m * n, peak_gbs, g, base_g)
        except RuntimeError as e:
            int_mm = {"layer": name, "K": k, "N": n, "M": m, "kernel": "torch._int_mm",
                      "error": str(e).splitlines()[0]}
        yield int_mm
        for label, nxt in packed.items():
            timed = set()
            with kernel_env():
                picked = vlmkern.ops.which_kernel(x, nxt())   # what a user's call runs
            for backend in backends:
                variants = [("", "")] + [(e, "") for e in enable] + [("", d) for d in disable]
                for on, off in variants:
                    yield from time_kernel(name, k, n, x, label, nxt, backend, on, timed,
                                           base, peak_gbs, base_g, off, picked)
        # timed again after this M's kernels: a GPU whose speed changed meanwhile
        # (another process, clocks) shows here instead of in a wrong speedup
        after = time_fn(lambda x=x: torch.matmul(x, fp16_weights().T))
        baseline["baseline_after_us"] = round(after, 2)


DRIFT = 0.10   # baseline change, before vs after a block's kernels, that marks the block
# err above which a row's output is called wrong: far past 16-bit rounding and
# accumulation-order differences, which stay near 1e-3 of the largest output
ERR_LIMIT = 0.02


def wrong_output(r: dict) -> bool:
    """Whether a row's output left the torch reference's (a NaN err counts)."""
    return r.get("err") is not None and not r["err"] <= ERR_LIMIT


def drifts(rows) -> dict[tuple[str, int], tuple[dict, float]]:
    """(layer, M) -> (its cuBLAS fp16 row, relative change) for every block
    whose baseline moved by more than DRIFT between its start and its end."""
    out = {}
    for r in rows:
        after = r.get("baseline_after_us")
        if after is not None and "error" not in r and abs(after / r["us"] - 1) > DRIFT:
            out[(r["layer"], r["M"])] = (r, after / r["us"] - 1)
    return out


def drift_notes(rows) -> list[str]:
    return [f"- {layer} M={m}: cuBLAS fp16 took {r['us']} us before this block's kernels and "
            f"{r['baseline_after_us']} us after ({100 * change:+.0f}%): the GPU's speed changed "
            f"during these rows; time them again."
            for (layer, m), (r, change) in drifts(rows).items()]


@contextlib.contextmanager
def kernel_env(backend: str = "", enable: str = "", disable: str = ""):
    """VLMKERN_BACKEND / ENABLE / DISABLE set to these values (unset where
    empty) inside the block, restored after it."""
    values = {"VLMKERN_BACKEND": backend, "VLMKERN_ENABLE": enable, "VLMKERN_DISABLE": disable}
    saved = {v: os.environ.get(v) for v in values}
    for v, value in values.items():
        if value:
            os.environ[v] = value
        else:
            os.environ.pop(v, None)
    try:
        yield
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


def output_error(x, w) -> float | None:
    """Largest difference between ``ops.linear``'s output as the environment
    picks it and the torch reference's, relative to the reference's largest
    value (None where the reference cannot run)."""
    y = vlmkern.ops.linear(x, w).float()
    try:
        with kernel_env("torch"):
            ref = vlmkern.ops.linear(x, w).float()
    except Exception:  # noqa: BLE001 -- a missing reference leaves the cell empty
        return None
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def time_kernel(name, k, n, x, label, nxt, backend, enable, timed, base, peak_gbs,
                base_g=None, disable="", picked=None) -> list:
    """One row: ``ops.linear`` with VLMKERN_BACKEND=backend, VLMKERN_ENABLE=enable
    and VLMKERN_DISABLE=disable, unless the kernel it picks is in ``timed``.
    ``picked``: the kernel ``ops.linear`` runs for this call by default."""
    m = x.shape[0]
    try:
        with kernel_env(backend, enable, disable):
            kernel = vlmkern.ops.which_kernel(x, nxt())
            if kernel.startswith(("no backend", "VLMKERN_")) or kernel in timed:
                return []
            timed.add(kernel)
            # one call per pool entry first: kernels that re-lay a weight out on
            # its first use (cuda.weight_only_mma) must not time that step
            for _ in range(64):
                vlmkern.ops.linear(x, nxt())
            t, g = time_both(lambda: vlmkern.ops.linear(x, nxt()), nxt.size)  # graph: same env
            err = output_error(x, nxt())
    except Exception as e:  # a kernel failing here is a result, not a crash
        return [{"layer": name, "K": k, "N": n, "M": m, "kernel": label, "backend": backend,
                 "error": f"{type(e).__name__}: {e}"}]
    is_default = kernel == picked
    if kernel == "cuda.dequant_cublas" and getattr(nxt(), "LAID_OUT", False):
        kernel += " (layout decoded by torch operations)"   # what that kernel does with it
    moved = nxt().nbytes + 2 * (m * k + m * n)
    r = row(name, k, n, m, label, kernel, t, base, moved, peak_gbs, g, base_g)
    r.update(err=None if err is None else float(f"{err:.2g}"), default=is_default)
    return [r]


def write_sweep(out_dir, stem: str, head: list[str], lines: list[str]) -> None:
    """Write a sweep's table to <out_dir>/<stem>_<GPU model>.md (e.g. _H100)."""
    out = Path(out_dir) / f"{stem}_{torch.cuda.get_device_name().split()[1]}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + lines) + "\n")
    print(f"wrote {out}")


def row(layer, k, n, m, label, kernel, us, base_us, moved_bytes, peak_gbs, graph_us=None,
        base_graph_us=None):
    gbs = moved_bytes / us / 1e3
    return {"layer": layer, "K": k, "N": n, "M": m, "kernel": label, "backend": kernel,
            "us": round(us, 2), "GB/s": round(gbs, 1),
            "%peak": round(100 * gbs / peak_gbs, 1) if peak_gbs else None,
            "TFLOP/s": round(2 * m * n * k / us / 1e6, 2),
            "speedup": round(base_us / us, 3),
            "graph_us": None if graph_us is None else round(graph_us, 2),
            "graph_speedup": round(base_graph_us / graph_us, 3) if graph_us and base_graph_us else None}


def to_markdown(meta, rows) -> str:
    cols = ["layer", "K", "N", "M", "kernel", "backend", "us", "graph_us", "GB/s", "%peak",
            "TFLOP/s", "speedup", "graph_speedup", "err", "default"]
    out = [f"# Linear-layer latency on {meta['device']}", "",
           f"torch {meta['torch']}, copy bandwidth {meta['copy_GBs']:.0f} GB/s, "
           f"medians of CUDA-event timings of GPU time (launch overhead hidden; graph: per call of a "
           "CUDA-graph replay, '-' where not capturable), weights rotated past L2.", "",
           "| " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            cells = [r["layer"], r["K"], r["N"], r["M"], r["kernel"], r.get("backend", ""),
                     f"error: {r['error'][:80]}"]
            out.append("| " + " | ".join(map(str, cells)) + " |" + "|" * (len(cols) - len(cells)))
        else:  # rows of older JSON lack the graph columns
            out.append("| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    notes = drift_notes(rows)
    if notes:
        head = f"Baseline drift above {100 * DRIFT:.0f}% (cuBLAS fp16 timed again after each block):"
        out += ["", head] + notes
    wrong = [r for r in rows if wrong_output(r)]
    if wrong:
        out += ["", (f"Output further than {ERR_LIMIT:.0%} of its largest value from the torch "
                     "reference's (these timings are of a wrong result):")]
        out += [f"- {r['layer']} M={r['M']} {r['kernel']} {r['backend']}: err {r['err']}"
                for r in wrong]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16, 1024}")
    ap.add_argument("--backends", default="cuda,triton",
                    help="backends to time (the torch reference is a correctness oracle, not a contender)")
    ap.add_argument("--shapes", help="comma-separated shape names (default: all; see SHAPES)")
    ap.add_argument("--ms", help="comma-separated M values (default: %s)" % ",".join(map(str, MS)))
    ap.add_argument("--formats", help="comma-separated format labels (default: all; see FORMATS)")
    ap.add_argument("--enable", default="",
                    help="comma-separated opt-in kernels (VLMKERN_ENABLE) to time as well")
    ap.add_argument("--disable", default="",
                    help="comma-separated kernels to turn off (VLMKERN_DISABLE), one more run each: "
                         "times what a default kernel replaced")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear needs a CUDA GPU: timings on the CPU would say nothing about "
              "the kernels", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    shapes = dict(list(SHAPES.items())[2:4]) if args.quick else SHAPES
    if args.shapes:
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            ap.error(f"unknown shapes {unknown}; known: {list(SHAPES)}")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    ms = (1, 16, 1024) if args.quick else MS
    if args.ms:
        ms = tuple(int(m) for m in args.ms.split(","))
    formats = FORMATS
    if args.formats:
        unknown = [f for f in args.formats.split(",") if f not in FORMATS]
        if unknown:
            ap.error(f"unknown formats {unknown}; known: {list(FORMATS)}")
        formats = {f: FORMATS[f] for f in args.formats.split(",")}
    available = vlmkern.available_backends()
    backends = [b for b in args.backends.split(",") if available[b]["available"]]
    opt_in = {k.name for b in vlmkern.ops.backends.BACKENDS.values() for k in b.kernels if k.opt_in}
    unknown = [e for e in args.enable.split(",") if e and e not in opt_in]
    if unknown:
        ap.error(f"--enable: {unknown} are not opt-in kernels; those are {sorted(opt_in)}")
    known = {k.name for b in vlmkern.ops.backends.BACKENDS.values() for k in b.kernels}
    disable = [d for d in args.disable.split(",") if d]
    if set(disable) - known:
        ap.error(f"--disable: {sorted(set(disable) - known)} are not kernels; those are {sorted(known)}")
    peak = measure_copy_bandwidth(device)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "copy_GBs": peak, "backends": {b: available[b] for b in available}}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    tag = meta["device"].replace(" ", "_")

    def write():
        (args.out / f"linear_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                                indent=1))
        (args.out / f"linear_{tag}.md").write_text(to_markdown(meta, rows))

    # A time limit's SIGTERM (or a kernel's CUDA error) still leaves every row
    # timed so far: written after each M, again on the way out, and each row
    # printed as it is made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for name, (k, n) in shapes.items():
            for r in bench_shape(name, k, n, ms, backends, device, peak, formats,
                                 enable=[e for e in args.enable.split(",") if e],
                                 disable=disable):
                rows.append(r)
                print(json.dumps(r), flush=True)
                if r.get("kernel") == "cuBLAS fp16" and len(rows) > 1:
                    write()        # a new M: the last block is complete
            print(f"done {name}", file=sys.stderr)
            write()
    finally:
        write()
    print(to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
