"""Score quantized variants of the mini VLM with the evaluation harness and
write benchmarks/results/minivlm_eval.{json,md,png}.

    python benchmarks/minivlm_eval.py                # every variant but binary
    python benchmarks/minivlm_eval.py --variants fp,gptq-w4g64

Protocol (shared by the mini-VLM method tables): evaluation
``EvalSet.build(model, processor)`` defaults; calibrated variants use
``mixed_calibration_samples(processor, n_samples=32, alpha=0.5, seed=0)``
unless the variant name says otherwise (``-text``: alpha 0, text only;
``-n16``: 16 samples). Data-free variants (rtn-*, w8a8) need no samples.
``*_cpu_seconds``: CPU time of this process, far less dependent on what
else the machine runs than the wall times are.

Each variant's result is merged into the JSON as soon as it is scored, so
an interrupted run keeps what it finished; a rerun replaces the variants it
names and keeps the others. Times are wall-clock seconds on whatever
machine ran it (upper bounds on a busy shared CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from minivlm_common import load_previous, model_and_evalset, selected

RESULTS = Path(__file__).parent / "results"
# name -> (method, bits, group, alpha, calibration samples); alpha None:
# data free (replace_linears)
N_SAMPLES = 32
VARIANTS = {
    "fp": None,
    "rtn-w8g64": ("rtn", 8, 64, None, 0),
    "w8a8": ("intact", 8, None, None, 0),
    "rtn-w4g64": ("rtn", 4, 64, None, 0),
    "gptq-w4g64": ("gptq", 4, 64, 0.5, N_SAMPLES),
    "gptq-w4g64-n16": ("gptq", 4, 64, 0.5, 16),
    "gptq-w4g64-text": ("gptq", 4, 64, 0.0, N_SAMPLES),
    "gptaq-w4g64": ("gptaq", 4, 64, 0.5, N_SAMPLES),
    "gptaq-w4g64-n16": ("gptaq", 4, 64, 0.5, 16),
    "gptaq-w4g64-text": ("gptaq", 4, 64, 0.0, N_SAMPLES),
    "rtn-w3g64": ("rtn", 3, 64, None, 0),
    "gptq-w3g64": ("gptq", 3, 64, 0.5, N_SAMPLES),
    "w4a4": ("intact", 4, None, None, 0),
    # data-free binarization: ~25 s per 576x1536 linear on a loaded 2-core CPU,
    # so not in the default list
    "binary": ("binary", 1, None, None, 0),
}
DEFAULT_VARIANTS = [n for n in VARIANTS if n != "binary"]


def build_variant(name, model, processor, device):
    """(variant model, extra fields for the result)."""
    from vlmkern.config import BinaryConfig, IntActConfig
    from vlmkern.demo import method_config, quantize_vlm
    from vlmkern.replace import replace_linears

    spec = VARIANTS[name]
    if spec is None:
        return model, {"config": "fp", "quantize_seconds": 0.0}
    method, bits, group, alpha, n_samples = spec
    start, cpu = time.perf_counter(), time.process_time()
    if alpha is None:
        if method == "intact":
            cfg = IntActConfig(bits, bits)
        elif method == "binary":
            cfg = BinaryConfig()
        else:
            cfg = method_config(method, bits, group)
        variant = replace_linears(copy.deepcopy(model), cfg, progress=False)[0]
        calib = "none (data free)"
    else:
        cfg = method_config(method, bits, group)
        variant, _ = quantize_vlm(model, processor, cfg, n_samples, alpha, seed=0,
                                  device=device, progress=True)
        calib = f"mixed_calibration_samples(n_samples={n_samples}, alpha={alpha}, seed=0)"
    label = cfg.label if hasattr(cfg, "label") else str(cfg)
    if method in ("gptq", "gptaq"):
        label = f"{method.upper()} {cfg.quant.label if method == 'gptq' else cfg.gptq.quant.label}"
    return variant, {"config": label, "calibration": calib,
                     "quantize_seconds": time.perf_counter() - start,
                     "quantize_cpu_seconds": time.process_time() - cpu}


def write(results: dict, meta: dict) -> None:
    from vlmkern.eval.report import bytes_notes, markdown_table, plot_accuracy

    RESULTS.mkdir(parents=True, exist_ok=True)
    ordered = [results[n] for n in VARIANTS if n in results]
    (RESULTS / "minivlm_eval.json").write_text(
        json.dumps({"meta": meta, "results": ordered}, indent=1, default=str))
    lines = ["# Mini VLM: quantized variants scored by the evaluation harness", "",
             "Reproduce: `python benchmarks/minivlm_eval.py`. Calibrated rows: "
             f"{N_SAMPLES} mixed samples (alpha 0.5: half digit conversations, half "
             "Lee-corpus windows of 256 tokens; `-text`: text only; `-n16`: 16 samples), "
             "seed 0, through `quantize_model`. Wall times (`quant s`, `eval s`) come "
             "from a shared, heavily loaded 2-core machine: upper bounds.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [markdown_table(ordered), ""] + bytes_notes(ordered)
    lines += ["| variant | calibration | quantize CPU s | eval CPU s |", "|---|---|---:|---:|"]
    for r in ordered:
        cpu = [r.get("quantize_cpu_seconds"), r.get("eval_cpu_seconds")]
        cells = ["-" if v is None else f"{v:.0f}" for v in cpu]
        lines.append(f"| {r['name']} | {r.get('calibration', 'none')} | {cells[0]} | "
                     f"{cells[1]} |")
    lines.append("")
    (RESULTS / "minivlm_eval.md").write_text("\n".join(lines))
    why = plot_accuracy(ordered, RESULTS / "minivlm_eval.png")
    if why:
        print(why)


def main(argv=None) -> int:
    from vlmkern.eval.harness import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--device", default=None, help="calibration device (default: the model's)")
    args = ap.parse_args(argv)
    names = selected(args.variants, VARIANTS)
    model, processor, evalset, meta = model_and_evalset()
    path = RESULTS / "minivlm_eval.json"
    results = load_previous(path)
    if "fp" in names or "fp" not in results:
        cpu = time.process_time()
        fp = evaluate(model, evalset, "fp", extra={"config": "fp", "quantize_seconds": 0.0})
        fp.update({"agree_fp": 1.0, "d_vqa_accuracy": 0.0, "ppl_ratio": 1.0,
                   "eval_cpu_seconds": time.process_time() - cpu})
        results["fp"] = fp
        write(results, meta)
    fp = results["fp"]  # deterministic: a saved FP result serves as the reference
    for name in names:
        if name == "fp":
            continue
        variant, extra = build_variant(name, model, processor, args.device)
        cpu = time.process_time()
        res = evaluate(variant, evalset, name, fp_reference=fp, extra=extra)
        res["eval_cpu_seconds"] = time.process_time() - cpu
        results[name] = res
        print(f"{name}: acc {res['vqa_accuracy']:.3f}  agree {res['agree_fp']:.3f}  "
              f"KL {res['kl']:.4f}  top1 {res['top1']:.3f}  ppl {res['perplexity']:.2f}  "
              f"{res['bits_per_weight']:.2f} bits/w  quantize {extra['quantize_seconds']:.0f} s  "
              f"eval {res['eval_seconds']:.0f} s", flush=True)
        write(results, meta)
        del variant
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
