"""Real-model fidelity: SmolLM2-135M-Instruct perplexity on held-out Lee-corpus
text for RTN, GPTQ, GPTAQ (4/3/2 bits, group 64, sym and asym), BiLLM and
plain sign binarization, with physical bytes and calibration wall time.

    python benchmarks/smollm2_ppl.py                 # every setting (2-core CPU: ~1.5 h)
    python benchmarks/smollm2_ppl.py --only gptq     # settings whose name contains 'gptq'

Calibration uses the first ``--samples`` windows of ``--seq-len`` tokens of the
corpus; perplexity uses 8 windows of 512 tokens that come after them. Results
are appended to benchmarks/results/smollm2_ppl.json (one entry per setting,
re-running a setting replaces it) and the table is rewritten to
benchmarks/results/smollm2_ppl.md.

Caveat: SmolLM2's weights come from a 4-bit GGUF (asymmetric, group 32), so
asymmetric 4-bit settings sit unusually close to the FP model.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from vlmkern import (BiLLMConfig, GPTAQConfig, GPTQConfig, QuantConfig, QuantLinear,
                     replace_linears)
from vlmkern.calib import quantize_model
from vlmkern.calib.data import held_out_windows, perplexity, text_samples
from vlmkern.minivlm.assets import lee_corpus_path, load_smollm2

RESULTS = Path(__file__).parent / "results"


def settings():
    out = {"fp": None, "sign": "sign"}
    for bits in (4, 3, 2):
        for sym in (False, True):
            q = QuantConfig(bits, 64, sym)
            tag = f"w{bits}g64{'s' if sym else 'a'}"
            out[f"rtn {tag}"] = q
            out[f"gptq {tag}"] = GPTQConfig(q)
            out[f"gptaq {tag}"] = GPTAQConfig(GPTQConfig(q))
    out["billm"] = BiLLMConfig()
    return out


def decoder_linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear)) and ".layers." in n}


def dense_copy(model):
    """Same weights as the quantized model, as plain fp32 nn.Linear (fast to evaluate:
    weight-only and binary layers compute x @ dequantize(W)^T either way)."""
    model = copy.deepcopy(model)
    for name, m in decoder_linears(model).items():
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.quantized_weight.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def sign_binarize(model):
    """The naive 1-bit baseline: w = sign(w) * mean|w| per output row."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in decoder_linears(model).values():
            w = m.weight
            w.copy_(torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True))
    return model


def run_setting(name, cfg, model, samples, windows):
    n_weights = sum(m.weight.numel() for m in decoder_linears(model).values())
    start = time.perf_counter()
    if cfg is None:
        qmodel, nbytes = model, 2 * n_weights
    elif cfg == "sign":
        # Storage if packed: 1 bit per weight plus one fp16 scale per row.
        qmodel = sign_binarize(model)
        rows = sum(m.weight.shape[0] for m in decoder_linears(model).values())
        nbytes = n_weights // 8 + 2 * rows
    elif isinstance(cfg, QuantConfig):
        # Round to nearest needs no calibration data: quantize the weights directly.
        qmodel, report = replace_linears(copy.deepcopy(model), cfg, progress=False)
        nbytes = report.bytes_after
        qmodel = dense_copy(qmodel)
    else:
        qmodel, report = quantize_model(copy.deepcopy(model), samples, cfg, progress=True)
        nbytes = sum(r.nbytes for r in report.modules)
        qmodel = dense_copy(qmodel)
    calib_s = time.perf_counter() - start
    ppl = perplexity(qmodel, windows)
    return {"setting": name, "ppl": round(ppl, 3), "bytes": nbytes,
            "bits_per_weight": round(8 * nbytes / n_weights, 3),
            "calib_seconds": round(calib_s, 1)}


def write_table(entries, meta):
    lines = ["# SmolLM2-135M-Instruct: perplexity on held-out Lee-corpus text", "",
             f"{meta}", "", "| setting | perplexity | decoder-linear bytes | bits/weight | "
             "calibration s |", "|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['setting']} | {e['ppl']:.2f} | {e['bytes']:,} | "
                     f"{e['bits_per_weight']:.3f} | {e['calib_seconds']:.0f} |")
    (RESULTS / "smollm2_ppl.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SmolLM2 perplexity table")
    ap.add_argument("--only", default="", help="run settings whose name contains this")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    text = lee_corpus_path().read_text(encoding="utf-8")
    samples = text_samples(tokenizer, text, args.samples, args.seq_len, batch_size=4)
    windows = held_out_windows(tokenizer, text, args.samples * args.seq_len, 8, 512)
    meta = (f"Calibration: {args.samples} x {args.seq_len} tokens; perplexity: 8 x 512 "
            f"held-out tokens; CPU: {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}. Bytes count every "
            f"packed code, scale, zero, bitmap and statistic of the decoder linears "
            f"(fp row: fp16; sign row: an estimate, 1 bit per weight plus an fp16 scale per "
            f"row, a packing vlmkern does not have). Calibration seconds are wall time on a 2-core machine that other "
            f"jobs shared during most of these runs, so they are upper bounds (one GPTQ "
            f"setting measured on the idle machine took 49 s).")
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "smollm2_ppl.json"
    entries = json.loads(store.read_text())["entries"] if store.exists() else []
    for name, cfg in settings().items():
        if args.only and args.only not in name:
            continue
        entry = run_setting(name, cfg, model, samples, windows)
        print(entry, flush=True)
        entries = [e for e in entries if e["setting"] != name] + [entry]
        order = list(settings())
        entries.sort(key=lambda e: order.index(e["setting"]))
        store.write_text(json.dumps({"meta": meta, "entries": entries}, indent=1))
        write_table(entries, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
