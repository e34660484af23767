"""Prefill and decode time of a whole quantized decoder, next to fp16.

bench_linear.py times one layer's kernel; this times what a generate loop
sees: a Qwen2-architecture decoder with random weights (nothing downloaded),
Qwen2-VL-7B's widths and a few layers by default, in fp16, and copies of it
with every linear replaced by vlmkern layers (round to nearest, data-free).
For each: greedy ``generate`` of one token after a --prompt-token prompt (the
prefill) and of 1 + --steps tokens (the rest is decode with the KV cache),
timed by the wall clock between device synchronizations, so Python, dispatch
and every kernel of a step count. "GPU MiB" is what the model holds on the
GPU after a warm-up run (torch.cuda.memory_allocated: weights, the kernels'
cached layouts, embeddings and head), the physical bytes a deployment pays.
"graph decode" replays one decode step (static KV cache) from a CUDA graph,
as a serving loop that captures its step does: kernel time without Python
and launch overhead (on the CPU the same step runs eagerly, as a smoke test).
With --compiled, "compiled decode" is ``generate`` with a static KV cache and
the forward compiled by torch.compile(mode="reduce-overhead"), transformers'
recipe for fast decoding (CUDA graphs made by inductor; on the CPU, no graphs).

    python benchmarks/decode_model.py                       # on the GPU
    python benchmarks/decode_model.py --enable cuda.int_act_wgmma
    python benchmarks/decode_model.py --compiled --formats "W4 g128"
    python benchmarks/decode_model.py --device cpu --hidden 64 --intermediate 128 \\
        --heads 4 --kv-heads 2 --layers 1 --prompt 8 --steps 2   # smoke run

Results go to stdout and <--out>/decode_model_<device>.md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import inspect
import os
import sys
import time
from pathlib import Path

import torch

import vlmkern
from vlmkern import BinaryConfig, IntActConfig, QuantConfig

# label -> (plan for replace_linears, codes held only in the CUDA kernel
# layouts: False, "weight-only" or "all", the binary layers' too; see
# vlmkern.to_kernel_layout). The LUQ-style rows mix precisions by layer as LUQ
# does (binarized layers, the rest W4); which layers is fixed here, since the
# weights are random.
_LUQ_STYLE = {r"re:model\.layers\.\d*[02468]\..*": BinaryConfig(), "*": QuantConfig(4, 128)}
FORMATS = {"W4 g128": (QuantConfig(4, 128), False),
           "W4 g128 kernel layout": (QuantConfig(4, 128), "weight-only"),
           "W2 g128": (QuantConfig(2, 128), False), "W8A8": (IntActConfig(8, 8), False),
           "LUQ-style: binary even layers + W4 odd": (_LUQ_STYLE, "weight-only"),
           "LUQ-style: binary layers in the table layout too": (_LUQ_STYLE, "all")}


def build_model(args, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.prompt + args.steps + 8, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(torch.float16 if device.type == "cuda" else torch.float32).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels_used(model, args, device) -> tuple[str, ...]:
    """The kernels ``ops.linear`` picks for every quantized layer at decode
    (M = 1) and prefill (M = --prompt) sizes, under the current environment."""
    from vlmkern.nn import QuantLinear
    picks = []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for m in (1, args.prompt):
                x = torch.zeros(m, module.in_features, device=device, dtype=module_dtype(model))
                picks.append(vlmkern.ops.which_kernel(x, module.quantized_weight))
    return tuple(picks)


def module_dtype(model) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def allocated(device) -> int:
    """Bytes of live tensors on the GPU (0 on the CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def allocated_mib(device, since: int) -> str:
    return f"{(allocated(device) - since) / 2**20:.0f}" if device.type == "cuda" else "-"


def median(values):
    return sorted(values)[len(values) // 2]


@torch.no_grad()
def time_model(model, args, device, **generate_args) -> tuple[float, float]:
    """(prefill ms, decode ms per token), medians over --reps runs of greedy
    ``generate``: one new token is the prefill, the extra steps the decode
    (nan when the whole run did not take longer than the prefill alone: the
    steps took less than the timing noise, so their time is unknown)."""
    ids = torch.randint(3, args.vocab, (1, args.prompt), device=device,
                        generator=torch.Generator(device).manual_seed(1))

    def run(new_tokens):
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       **generate_args)
        sync(device)
        return (time.perf_counter() - t0) * 1e3

    if generate_args:     # compiled: each length (its static cache) compiles, then captures
        for _ in range(2):
            run(1), run(1 + args.steps)
    run(2)                                    # warm-up: layouts, autotuning, allocator
    prefill = [run(1) for _ in range(args.reps)]
    whole = [run(1 + args.steps) for _ in range(args.reps)]
    decode = median(whole) - median(prefill)
    return median(prefill), decode / args.steps if decode > 0 else float("nan")


def compiled_cells(model, args, device, base: float | None = None) -> tuple[str, float]:
    """The compiled decode cells (ms per token, speedup against ``base``):
    transformers' recipe for fast decoding, greedy ``generate`` with a static
    KV cache and the forward compiled with mode="reduce-overhead" (CUDA
    graphs of whole steps; the quantized layers are one opaque op each)."""
    torch._dynamo.reset()
    model.forward = torch.compile(type(model).forward.__get__(model), mode="reduce-overhead",
                                  fullgraph=True)
    try:
        _, ms = time_model(model, args, device, cache_implementation="static")
    except Exception as e:  # noqa: BLE001 -- a model that does not compile is a result
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]} | ", float("nan")
    finally:
        del model.forward                     # back to the eager forward
    speedup = 1.0 if base is None else base / ms if ms > 0 else float("nan")
    return f"{ms:.3f} | {speedup:.2f}", ms


def static_cache(model, length: int, device):
    """A static KV cache of ``length`` positions for batch 1 (transformers 5
    sizes it on first use; 4.x wants the batch, device and dtype up front)."""
    from transformers import StaticCache
    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except TypeError:
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=length,
                           device=device, dtype=module_dtype(model))


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in recent
    transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def time_graph_decode(model, args, device) -> float:
    """Decode ms per token with every step replayed from one CUDA graph: the
    prompt fills a static cache, then the captured step (forward of one token
    at the position held on the GPU, which the graph itself advances) runs
    --steps times between two events. On the CPU the step runs eagerly."""
    ids = torch.randint(3, args.vocab, (1, args.prompt), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    cache = {cache_kwarg(model): static_cache(model, args.prompt + args.steps + 1, device)}
    model(input_ids=ids, use_cache=True, cache_position=torch.arange(args.prompt, device=device),
          **cache)
    token = ids[:, -1:].clone()
    position = torch.full((1,), args.prompt, device=device)

    def step():
        model(input_ids=token, cache_position=position, use_cache=True, **cache)
        position.add_(1)

    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - t0) * 1e3 / args.steps
    side = torch.cuda.Stream(device)     # warm-up off the capture: layouts, allocator
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    position.fill_(args.prompt)
    graph.replay()                        # first replay uploads the graph
    position.fill_(args.prompt)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / args.steps


def graph_cells(model, args, device, base: float | None = None) -> tuple[str, float]:
    """The graph decode and graph speedup cells (against ``base`` ms per
    token; None: this model is the baseline) and the ms per token (nan if
    the step could not be captured)."""
    try:
        ms = time_graph_decode(model, args, device)
    except Exception as e:  # noqa: BLE001 -- a step that cannot be captured is a result
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]} | ", float("nan")
    speedup = 1.0 if base is None else base / ms if ms > 0 else float("nan")
    return f"{ms:.3f} | {speedup:.2f}", ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--intermediate", type=int, default=18944)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=1024, help="prefill tokens (a VLM prompt)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--enable", default="", help="comma-separated opt-in kernels, one more run each")
    ap.add_argument("--compiled", action="store_true",
                    help="also time generate with a static cache and the forward compiled "
                         "(mode=reduce-overhead; compiles every model, minutes)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decode_model needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    before = allocated(device)
    dense = build_model(args, device)
    head = [f"# Whole-decoder prefill and decode time on {name}", "",
            (f"Qwen2 architecture, random weights: hidden {args.hidden}, intermediate "
             f"{args.intermediate}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
             f"vocab {args.vocab}; prefill {args.prompt} tokens, {args.steps} decode steps, "
             f"medians of {args.reps}; wall time between synchronizations. Reproduce: "
             f"`python benchmarks/decode_model.py`."), "",
            "| weights | kernels | GPU MiB | prefill ms | decode ms/token | decode speedup "
            "| graph decode ms/token | graph speedup |"
            + (" compiled decode ms/token | compiled speedup |" if args.compiled else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|---|" if args.compiled else "")]
    print("\n".join(head), flush=True)
    rows = []
    base_pre, base_dec = time_model(dense, args, device)
    cells, base_graph = graph_cells(dense, args, device)
    if args.compiled:
        compiled, base_compiled = compiled_cells(dense, args, device)
        cells += f" | {compiled}"
    rows.append(f"| dense {str(next(dense.parameters()).dtype).removeprefix('torch.')} | torch | "
                f"{allocated_mib(device, before)} | {base_pre:.2f} | {base_dec:.3f} | 1.0 | {cells} |")
    print(rows[-1], flush=True)
    for label in args.formats.split(","):
        config, laid_out = FORMATS[label]
        before = allocated(device)
        model, _ = vlmkern.replace_linears(copy.deepcopy(dense), config, progress=False)
        if laid_out:
            vlmkern.to_kernel_layout(model, progress=False, binary=laid_out == "all")
        timed = set()
        for enable in ("", *[e for e in args.enable.split(",") if e]):
            # each row's GPU MiB holds the layouts of its own kernels, not an earlier row's
            vlmkern.ops.forget_layouts()
            gc.collect()
            os.environ["VLMKERN_ENABLE"] = enable
            picks = kernels_used(model, args, device)
            if picks in timed:                 # an opt-in kernel this format never reaches
                os.environ.pop("VLMKERN_ENABLE", None)
                continue
            timed.add(picks)
            try:
                pre, dec = time_model(model, args, device)
                cells, _ = graph_cells(model, args, device, base_graph)
                if args.compiled:
                    cells += f" | {compiled_cells(model, args, device, base_compiled)[0]}"
                rows.append(f"| {label} | {enable or 'default'} | {allocated_mib(device, before)} | "
                            f"{pre:.2f} | {dec:.3f} | {base_dec / dec if dec > 0 else float('nan'):.2f} "
                            f"| {cells} |")
            except Exception as e:  # noqa: BLE001 -- a failing kernel is a result here, not a crash
                rows.append(f"| {label} | {enable or 'default'} | | error: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]} | | | | |")
            finally:
                os.environ.pop("VLMKERN_ENABLE", None)
            print(rows[-1], flush=True)
        del model
    out = Path(args.out) / f"decode_model_{name.split()[1] if device.type == 'cuda' else 'cpu'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + rows) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
