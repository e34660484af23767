"""Q-VLM on the mini VLM: W8A8, W6A6 and W4A4 against per-token RTN and
SmoothQuant + per-token RTN, scored by the evaluation harness; writes
benchmarks/results/minivlm_qvlm.{json,md}.

    python benchmarks/minivlm_qvlm.py                               # every variant
    python benchmarks/minivlm_qvlm.py --variants rtn-w4a4,qvlm-w4a4
    python benchmarks/minivlm_qvlm.py --search-samples 32           # search on all samples

Variants, for each WnAn (n = 8, 6, 4), all with symmetric RTN weights per
output channel, on the language model's decoder linears only:

* rtn-wnan: dynamic per-token activation scales (absmax), data free;
* sq-rtn-wnan: SmoothQuant (alpha 0.5, q/k/v and gate/up smoothed through
  their norms), then the same per-token quantizer;
* qvlm-wnan: Q-VLM, per decoder layer either per-token or a static
  per-tensor scale from the p-th percentile of |x|, p in 1.0 .. 0.98 step
  0.005, searched block by block (max depth 3, h0 = mean dependency);
* qvlm-q-wnan: Q-VLM with one choice per linear input (q/k/v, o, gate/up,
  down) instead of one per decoder layer;
* qvlm-tok-wnan: Q-VLM minimising the mean per-token relative error of the
  block output instead of eq. 3's squared error (ours, not the paper's);
* qvlm-static-wnan: Q-VLM with static scales only (the paper's stored
  clipping ranges; no per-token candidate);
* qvlm-d1-wnan: Q-VLM with max depth 1 (every layer its own block: the
  layer-wise greedy search of the paper's eq. 2), to isolate the blocks;
* sq-qvlm-wnan: SmoothQuant, then Q-VLM.
* qvlm-vis0-wnan: Q-VLM with the vision tower quantized too (WnAn, static
  per-tensor activation scales at the calibration absmax, weights per output
  channel at absmax): the visual-encoder optimisation with 0 epochs;
* qvlm-veo-wnan: the same, its clipping parameters trained for 2 epochs with
  eq. 10 (lambda_1 = lambda_2 = eta = 1, lr 5e-3) before the language
  model's search; qvlm-veo10-wnan: 10 epochs, as in the paper;
  qvlm-veotok-wnan: 10 epochs with per-token vision activations (only the
  weight clips learn); qvlm-veoent-wnan: 10 epochs with lambda_1 = 10, to see
  whether the dependency term can move the language model's dependency.

Protocol (shared by the mini-VLM method tables): evaluation
``EvalSet.build(model, processor)`` defaults, FP reference from the same
EvalSet; calibration ``mixed_calibration_samples(processor, n_samples=32,
alpha=0.5, seed=0)`` (the paper uses 64 ScienceQA pairs). Q-VLM computes
its statistics (percentiles, entropies) on all 32 samples and runs the block
search on ``--search-samples`` of them (default 8, evenly spaced), to keep
the search affordable on a shared 2-core CPU. Integer-activation layers run
through ``vlmkern.ops.linear`` (the torch reference of the integer kernel).

Each variant is merged into the JSON as soon as it is scored; a rerun
replaces the variants it names. Times are wall-clock seconds on whatever
machine ran it (upper bounds on a busy shared CPU).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

from minivlm_common import load_previous, model_and_evalset, selected

RESULTS = Path(__file__).parent / "results"
NAME = "minivlm_qvlm"
METHODS = ("rtn", "sq-rtn", "qvlm", "qvlm-q", "qvlm-tok", "qvlm-static", "qvlm-d1",
           "sq-qvlm", "qvlm-vis0", "qvlm-veo", "qvlm-veo10", "qvlm-veotok", "qvlm-veoent")
VARIANTS = ["fp"] + [f"{m}-w{b}a{b}" for b in (8, 6, 4) for m in METHODS]
SMOOTH_ALPHA = 0.5


_SMOOTHED = {}


def smoothed(model, samples, progress):
    """The SmoothQuant-folded model (the same for every bit width): computed
    once per run, its time charged to every variant that uses it."""
    from vlmkern.calib.smooth_engine import smooth_model

    if "model" not in _SMOOTHED:
        m = copy.deepcopy(model)
        report = smooth_model(m, samples, SMOOTH_ALPHA, progress=progress)
        _SMOOTHED.update(model=m, seconds=report.seconds)
    return copy.deepcopy(_SMOOTHED["model"]), _SMOOTHED["seconds"]


def build_variant(name, model, samples, search_samples, device, progress):
    """(variant model, extra fields for the result)."""
    from vlmkern import IntActConfig, replace_linears
    from vlmkern.calib.qvlm import QVLMConfig, qvlm_quantize
    from vlmkern.calib.qvlm_vision import VisionOptConfig

    if name == "fp":
        return model, {"config": "fp", "quantize_seconds": 0.0}
    method, tag = name.rsplit("-", 1)
    bits = int(tag[1])
    start = time.perf_counter()
    extra = {"config": name, "weights": f"RTN symmetric W{bits}, per output channel"}
    smooth_seconds = 0.0
    if method.startswith("sq-"):
        variant, smooth_seconds = smoothed(model, samples, progress)
        extra["smooth"] = {"alpha": SMOOTH_ALPHA, "seconds": smooth_seconds}
        start = time.perf_counter()
    else:
        variant = copy.deepcopy(model)
    if method.endswith("rtn"):
        replace_linears(variant, IntActConfig(bits, bits), progress=False)
        extra["activations"] = "per-token absmax"
    else:
        cfg = QVLMConfig(bits, bits, search_samples=search_samples,
                         max_depth=1 if method == "qvlm-d1" else 3,
                         token_candidate=method != "qvlm-static",
                         granularity="quantizer" if method == "qvlm-q" else "layer",
                         objective="token" if method == "qvlm-tok" else "mse")
        vision = None
        if method.startswith(("qvlm-vis0", "qvlm-veo")):
            vision = VisionOptConfig(epochs={"qvlm-vis0": 0, "qvlm-veo": 2}.get(method, 10),
                                     activation="token" if method == "qvlm-veotok" else "static",
                                     lambda_ent=10.0 if method == "qvlm-veoent" else 1.0)
        variant, report = qvlm_quantize(variant, samples, cfg, device=device,
                                        progress=progress, vision=vision)
        if report.vision is not None:
            v = report.vision
            extra["vision"] = {"linears": v.linears, "nbytes": v.nbytes,
                               "fp16_nbytes": v.fp_nbytes, "seconds": v.seconds,
                               "layer_weights": v.layer_weights, "history": v.history,
                               "before": v.before, "after": v.after,
                               "config": dataclasses.asdict(vision)}
        extra.update({"activations": "searched per layer", "search_samples": search_samples,
                      "blocks": report.blocks, "choices": report.choices,
                      "h0": report.h0, "layer_entropy": report.layer_entropy,
                      "pair_dependency": report.pair_dependency,
                      "block_errors": report.block_errors,
                      "layer_errors": report.layer_errors,
                      "qvlm_seconds": report.seconds})
        print(report, flush=True)
    if method.startswith("sq-") or method.startswith("qvlm"):
        extra["calibration"] = f"mixed_calibration_samples(n_samples={len(samples)}, " \
                               "alpha=0.5, seed=0)"
    else:
        extra["calibration"] = "none (data free)"
    extra["quantize_seconds"] = time.perf_counter() - start + smooth_seconds
    return variant, extra


def _choice_summary(choices) -> str:
    counts = {}
    for c in choices:
        counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def write(results: dict, meta: dict) -> None:
    from vlmkern.eval.report import bytes_notes, markdown_table

    RESULTS.mkdir(parents=True, exist_ok=True)
    ordered = [results[n] for n in VARIANTS if n in results]
    (RESULTS / f"{NAME}.json").write_text(
        json.dumps({"meta": meta, "results": ordered}, indent=1, default=str))
    lines = ["# Mini VLM: Q-VLM against per-token RTN and SmoothQuant (W8A8 / W6A6 / W4A4)",
             "", f"Reproduce: `python benchmarks/{NAME}.py`. Every quantized row: symmetric "
             "RTN weights per output channel on every decoder linear, integer activations "
             "run by the integer-activation op. Calibrated rows: "
             f"{meta['n_samples']} mixed samples (alpha 0.5: half digit conversations, half "
             "Lee-corpus windows of 256 tokens), seed 0; the Q-VLM block search runs on "
             f"{meta['search_samples']} of them. `quant s` is wall time on a shared 2-core "
             "CPU: an upper bound.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [markdown_table(ordered), ""] + bytes_notes(ordered)
    searched = [r for r in ordered if r.get("choices")]
    if searched:
        lines += ["## Q-VLM searches", "",
                  "| variant | blocks | h0 (nats) | activation quantizers chosen | "
                  "search block errors (mean) | last-layer error (search data) |",
                  "|---|---:|---:|---|---:|---:|"]
        for r in searched:
            errs = r["block_errors"]
            lines.append(f"| {r['name']} | {len(r['blocks'])} | {r['h0']:.3f} | "
                         f"{_choice_summary(r['choices'])} | {sum(errs) / len(errs):.4f} | "
                         f"{r['layer_errors'][-1]:.4f} |")
        lines.append("")
    vis = [r for r in ordered if r.get("vision")]
    if vis:
        lines += ["## Visual-encoder optimisation", "",
                  "Vision tower linears quantized (projector in FP). Losses on the calibration "
                  "samples with images, at the initial clipping (before) and after training: "
                  "L_reg (next-token cross-entropy), L_ent (eq. 8, Jacobian-weighted "
                  "dependency, nats), relative squared error of the vision output and of the "
                  "last decoder layer's output, and the blocks eq. 7 gives on that dependency "
                  "profile (h0 from the profile before training).", "",
                  "| variant | vision activations | vision bytes (fp16) | epochs | lambda_1 | "
                  "L_reg | L_ent | vision err | last-layer err | blocks | train s |",
                  "|---|---|---|---:|---:|---|---|---|---|---|---:|"]
        for r in vis:
            v = r["vision"]
            b, a = v["before"], v["after"] or v["before"]

            def pair(key, fmt="{:.4f}"):
                if not v["after"]:
                    return fmt.format(b[key])
                return f"{fmt.format(b[key])} -> {fmt.format(a[key])}"

            nb = (f"{len(b['blocks'])} -> {len(a['blocks'])}" if v["after"]
                  else str(len(b["blocks"])))
            lines.append(f"| {r['name']} | {v['config']['activation']} | "
                         f"{v['nbytes']:,} ({v['fp16_nbytes']:,}) | "
                         f"{v['config']['epochs']} | {v['config']['lambda_ent']:g} | "
                         f"{pair('reg')} | {pair('ent')} | "
                         f"{pair('vision_err', '{:.5f}')} | {pair('last_err', '{:.5f}')} | "
                         f"{nb} | {v['seconds']:.0f} |")
        lines.append("")
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    from vlmkern.calib.mixed import mixed_calibration_samples
    from vlmkern.eval.harness import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    ap.add_argument("--search-samples", type=int, default=8,
                    help="samples the Q-VLM block search runs on (default 8)")
    ap.add_argument("--device", default=None, help="calibration device (default: the model's)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--refresh-fp", action="store_true",
                    help="score the FP model again instead of reusing its stored row")
    args = ap.parse_args(argv)
    names = selected(args.variants, VARIANTS)
    model, processor, evalset, meta = model_and_evalset(
        args.progress, n_samples=args.samples, search_samples=args.search_samples)
    samples = mixed_calibration_samples(processor, args.samples, 0.5, seed=0)
    path = RESULTS / f"{NAME}.json"
    results = load_previous(path)
    fp = results.get("fp")
    if args.refresh_fp or fp is None or fp.get("n_vqa", evalset.sizes["n_vqa"]) != \
            evalset.sizes["n_vqa"]:
        # the FP model is deterministic: its scores are reused unless asked
        fp = evaluate(model, evalset, "fp", extra={"config": "fp", "quantize_seconds": 0.0,
                                                   "n_vqa": evalset.sizes["n_vqa"]})
        fp.update({"agree_fp": 1.0, "d_vqa_accuracy": 0.0, "ppl_ratio": 1.0})
        results["fp"] = fp
        write(results, meta)
    for name in names:
        if name == "fp":
            continue
        variant, extra = build_variant(name, model, samples, args.search_samples,
                                       args.device, args.progress)
        res = evaluate(variant, evalset, name, fp_reference=fp, extra=extra)
        results[name] = res
        write(results, meta)
        print(f"{name}: acc {res['vqa_accuracy']:.3f}  KL {res['kl']:.4f}  "
              f"top1 {res['top1']:.3f}  ppl {res['perplexity']:.2f}  "
              f"{res['bits_per_weight']:.2f} bits/w  ({extra['quantize_seconds']:.1f} s "
              f"quantize, {res['eval_seconds']:.1f} s eval)", flush=True)
        del variant
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
