"""LUQ on the mini VLM at several memory budgets against uniform GPTQ 4/3/2-bit
and uniform BiLLM; writes benchmarks/results/minivlm_luq.{json,md} and
minivlm_luq_frontier.png.

    python benchmarks/minivlm_luq.py                 # every variant
    python benchmarks/minivlm_luq.py --only luq-3.50b,gptq-w3g64

Protocol (shared by the mini-VLM method tables): evaluation
``EvalSet.build(model, processor)`` defaults; calibration
``mixed_calibration_samples(processor, n_samples=32, alpha=0.5, seed=0)``
(half the samples are digit conversations; they hold 30% of the calibration
tokens, 18% image tokens, where the paper's 1:1 mix counts tokens). LUQ:
entropies once on the FP model
(K by rank stability over 8..128, 4096 of the calibration tokens), then one
layer-by-layer calibration per budget with the plan the budget search picks
(BiLLM on the lowest-entropy layers, GPTQ W4 g64 on the rest). Nothing is
assembled from other runs: every LUQ point is its own sequential calibration,
so each layer sees the outputs of the mixed-quantized layers before it (eq. 7).
LUQ with 0 layers binarized is uniform GPTQ-4 bitwise and with all 30 it is
uniform BiLLM (same plan resolution, tested), so those two baselines are
also LUQ's end points.

Each variant is merged into the JSON as soon as it is scored; finished layers
are kept under --work-root so an interrupted run resumes. Times are wall
seconds on whatever machine ran it (upper bounds on a busy shared CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from minivlm_common import model_and_evalset, selected

RESULTS = Path(__file__).parent / "results"
N_SAMPLES, ALPHA = 32, 0.5
# name -> ("gptq", bits) | ("billm",) | ("luq", budget) with budget in physical
# bits per weight, or "gptq3" for exactly the bytes of uniform GPTQ W3 g64
VARIANTS = {
    "gptq-w4g64": ("gptq", 4),
    "luq-4.30b": ("luq", 4.3),
    "luq-4.20b": ("luq", 4.2),
    "luq-4.00b": ("luq", 4.0),
    "luq-3.75b": ("luq", 3.75),
    "luq-3.50b": ("luq", 3.5),
    "luq-gptq3-bytes": ("luq", "gptq3"),
    "gptq-w3g64": ("gptq", 3),
    "billm": ("billm",),
    "gptq-w2g64": ("gptq", 2),
    # ablation: the same n as luq-3.50b, highest-entropy layers binarized first
    "luq-3.50b-highfirst": ("luq-reverse", 3.5),
}


def gptq(bits):
    from vlmkern import GPTQConfig, QuantConfig
    return GPTQConfig(QuantConfig(bits, 64))


def run_variant(name, model, samples, entropy, work_root, device):
    """(quantized copy, fields for the result)."""
    from vlmkern import BiLLMConfig
    from vlmkern.calib import quantize_model
    from vlmkern.calib.luq import LUQConfig, layer_bytes, luq_quantize
    from vlmkern.plan import Plan

    spec = VARIANTS[name]
    work = Path(work_root) / name
    start = time.perf_counter()
    if spec[0] in ("gptq", "billm"):
        cfg = gptq(spec[1]) if spec[0] == "gptq" else BiLLMConfig()
        q, calib = quantize_model(copy.deepcopy(model), samples, cfg, work_dir=work,
                                  device=device)
        n_low = 30 if spec[0] == "billm" else 0 if spec[1] == 4 else None   # LUQ's ends
        return q, {"method": spec[0], "n_low": n_low, "resumed_layers": calib.resumed_layers,
                   "quantize_seconds": time.perf_counter() - start}
    budget = spec[1]
    kw = {}
    if budget == "gptq3":
        kw["budget_bytes"] = sum(layer_bytes(model, gptq(3).quant))
    else:
        kw["budget_bits"] = budget
    order = entropy["order"]
    entropies = entropy["entropy"]
    if spec[0] == "luq-reverse":      # same search, entropies negated: highest first
        entropies = [-h for h in entropies]
    q, rep = luq_quantize(copy.deepcopy(model), samples, LUQConfig(), entropies=entropies,
                          work_dir=work, device=device, **kw)
    binarized = sorted(rep.order[:rep.n_low])
    assert spec[0] == "luq-reverse" or rep.order == order
    print(rep, flush=True)
    return q, {"method": spec[0], "n_low": rep.n_low, "budget": rep.target,
               "resumed_layers": rep.calib.resumed_layers,
               "binarized_layers": binarized, "planned_bytes": rep.nbytes,
               "nominal_bits_paper": rep.nominal_bits,
               "quantize_seconds": time.perf_counter() - start,
               "entropy_seconds": entropy["seconds"],
               "plan_check": Plan.from_model(q).summary(q)}


def measured_nominal_bits(model) -> float:
    """The paper's count on the real model: binary weights 1 + salient share
    (BiLLM's 2 bits per salient weight), group-wise weights their code bits."""
    from vlmkern.nn import QuantLinear
    bits = weights = 0.0
    for m in model.model.language_model.layers.modules():
        if isinstance(m, QuantLinear):
            qw = m.quantized_weight
            n = qw.shape[0] * qw.shape[1]
            per = qw.nominal_bits_per_weight() if m.format == "binary" else qw.bits
            bits += per * n
            weights += n
    return bits / weights if weights else float("nan")


def entropy_pass(model, samples, device):
    """LUQ's entropies on the FP model (cached in the results JSON)."""
    from vlmkern.calib.luq import LUQConfig, entropy_order, luq_entropies
    start = time.perf_counter()
    entropies, k, sel = luq_entropies(model, samples, LUQConfig(), device)
    out = {"k": k, "k_grid": list(sel.grid), "k_distances": sel.distances,
           "knee_found": sel.knee_found, "entropy": entropies,
           "order": entropy_order(entropies), "seconds": time.perf_counter() - start,
           "tokens": LUQConfig().max_tokens}
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

COLUMNS = (("name", "variant", "{}"), ("n_low", "layers binarized", "{}"),
           ("nominal_bits", "nominal bits", "{:.2f}"),
           ("bits_per_weight", "physical bits/w", "{:.3f}"),
           ("weight_bytes", "decoder linear bytes", "{:,}"),
           ("vqa_accuracy", "VQA acc", "{:.3f}"), ("agree_fp", "agree FP", "{:.3f}"),
           ("kl", "KL", "{:.4f}"), ("top1", "top-1", "{:.3f}"),
           ("perplexity", "ppl", "{:.2f}"), ("calib_seconds", "calib s", "{:.0f}"),
           ("eval_seconds", "eval s", "{:.0f}"))


def _cell(row, key, fmt):
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def _table(rows):
    out = ["| " + " | ".join(c[1] for c in COLUMNS) + " |",
           "|" + "|".join("---" if c[0] == "name" else "---:" for c in COLUMNS) + "|"]
    out += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return out


def _findings(by: dict) -> list[str]:
    """Comparisons computed from the numbers (nothing here is typed in by hand)."""
    out = []
    g3, luq3, bil, g4 = (by.get(n) for n in ("gptq-w3g64", "luq-gptq3-bytes", "billm",
                                               "gptq-w4g64"))
    if g3 and luq3:
        better = (luq3["vqa_accuracy"] > g3["vqa_accuracy"], luq3["kl"] < g3["kl"])
        verdict = ("beats" if all(better) else "does not beat" if not any(better)
                   else "splits with")
        out.append(f"- At the bytes of uniform GPTQ W3 g64 ({g3['weight_bytes']:,} B, "
                   f"{g3['bits_per_weight']:.3f} bits/w) LUQ binarizes {luq3['n_low']} of 30 "
                   f"layers ({luq3['weight_bytes']:,} B) and {verdict} GPTQ-3: VQA "
                   f"{luq3['vqa_accuracy']:.3f} vs {g3['vqa_accuracy']:.3f}, KL "
                   f"{luq3['kl']:.4f} vs {g3['kl']:.4f}.")
    if g3 and bil:
        out.append(f"- Uniform BiLLM stores {bil['bits_per_weight']:.3f} physical bits/w "
                   f"(nominal {bil['nominal_bits']:.2f}) against GPTQ-3's "
                   f"{g3['bits_per_weight']:.3f}: {100 * (1 - bil['weight_bytes'] / g3['weight_bytes']):.0f}% "
                   f"fewer bytes for VQA {bil['vqa_accuracy']:.3f} / KL {bil['kl']:.4f} "
                   f"against {g3['vqa_accuracy']:.3f} / {g3['kl']:.4f}.")
    if g4 and bil and g3:
        # bytes saved per unit of KL added, per method, measured from GPTQ-4
        def rate(r):
            saved = g4["weight_bytes"] - r["weight_bytes"]
            return saved / max(r["kl"] - g4["kl"], 1e-12)
        out.append(f"- Bytes saved per unit of KL added, from GPTQ-4: GPTQ-3 "
                   f"{rate(g3):,.0f}, uniform BiLLM {rate(bil):,.0f}"
                   + "".join(f", {n} {rate(by[n]):,.0f}" for n in by
                             if n.startswith("luq-") and "highfirst" not in n) + ".")
    luq_rows = [r for n, r in by.items() if n.startswith("luq-") and "highfirst" not in n]
    if g3 and luq_rows:
        near = min(luq_rows, key=lambda r: abs(r["nominal_bits"] - g3["nominal_bits"]))
        out.append(f"- In the paper's nominal bits, the LUQ point nearest GPTQ-3 ({near['name']}, "
                   f"{near['n_low']} layers binarized, {near['nominal_bits']:.2f} nominal bits) "
                   f"scores VQA {near['vqa_accuracy']:.3f} / KL {near['kl']:.4f} against "
                   f"GPTQ-3's {g3['vqa_accuracy']:.3f} / {g3['kl']:.4f}, while storing "
                   f"{near['bits_per_weight']:.3f} physical bits/w against "
                   f"{g3['bits_per_weight']:.3f}.")
    hi, lo = by.get("luq-3.50b-highfirst"), by.get("luq-3.50b")
    if hi and lo:
        out.append(f"- Entropy order, same {lo['n_low']} layers binarized: lowest-entropy "
                   f"first VQA {lo['vqa_accuracy']:.3f} / KL {lo['kl']:.4f}, highest-entropy "
                   f"first {hi['vqa_accuracy']:.3f} / {hi['kl']:.4f}.")
    return out


def write(results: dict, entropy: dict, meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    order = ["fp"] + list(VARIANTS)
    rows = [results[n] for n in order if n in results]
    for r in rows:
        r["calib_seconds"] = r.get("quantize_seconds", 0.0) + r.get("entropy_seconds", 0.0)
    (RESULTS / "minivlm_luq.json").write_text(json.dumps(
        {"meta": meta, "entropy": entropy, "results": rows}, indent=1, default=str))
    by = {r["name"]: r for r in rows}
    lines = ["# LUQ on the mini VLM: accuracy against physical bytes", "",
             "Reproduce: `python benchmarks/minivlm_luq.py` (protocol in its docstring).", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += _table(rows) + [""]
    lines += ["`nominal bits`: the paper's count on the real weights (group-wise: code bits; "
              "binary: 1 + salient share, BiLLM's 2 bits per salient weight); for LUQ rows the "
              "paper's formula `(1.08 n + 4 (30 - n)) / 30` is in the JSON "
              "(`nominal_bits_paper`). `physical bits/w`: every stored code, scale, zero, "
              "bitmap and statistic of the decoder linears. `calib s`: LUQ rows include the "
              "shared entropy pass. Every LUQ row is its own sequential calibration.", ""]
    lines += [f"- {r['name']}: {r['calib_note']}" for r in rows if r.get("calib_note")]
    lines += [""] if any(r.get("calib_note") for r in rows) else []
    lines += ["## Findings (computed from the table)", ""] + _findings(by) + [""]
    lines += ["## Layer entropies", "",
              f"K = {entropy['k']} ({'knee of the rank-stability curve' if entropy['knee_found'] else 'no knee: largest K'}); "
              f"{entropy['tokens']} calibration tokens per layer; entropy pass "
              f"{entropy['seconds']:.0f} s.", "",
              "Rank-stability curve (normalised Kendall tau distance between the layer "
              "rankings at successive K):", "",
              "| K | " + " | ".join(str(k) for k in entropy["k_grid"][1:]) + " |",
              "|---|" + "---:|" * len(entropy["k_distances"]),
              "| distance | " + " | ".join(f"{d:.3f}" for d in entropy["k_distances"]) + " |",
              "", "| layer | entropy (nats) | rank (0 = binarized first) |", "|---:|---:|---:|"]
    rank = {layer: i for i, layer in enumerate(entropy["order"])}
    lines += [f"| {i} | {h:.4f} | {rank[i]} |" for i, h in enumerate(entropy["entropy"])]
    (RESULTS / "minivlm_luq.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / "minivlm_luq_frontier.png")


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["name"]: r for r in rows}
    luq = sorted([r for r in rows if r["name"].startswith("luq-") and "highfirst" not in r["name"]]
                 + [by[n] for n in ("gptq-w4g64", "billm") if n in by],
                 key=lambda r: r["weight_bytes"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    panels = ((axes[0], "vqa_accuracy", "VQA accuracy (held-out digits)", "weight_bytes"),
              (axes[1], "kl", "KL to FP (nats/token)", "weight_bytes"),
              (axes[2], "vqa_accuracy", "VQA accuracy (held-out digits)", "nominal_bits"))
    for ax, key, label, xkey in panels:
        scale = 1e6 if xkey == "weight_bytes" else 1.0
        mb = lambda r: r[xkey] / scale  # noqa: E731
        if luq:
            ax.plot([mb(r) for r in luq], [r[key] for r in luq], "o-", color="C0",
                    label="LUQ (BiLLM on lowest-entropy layers, GPTQ-4 rest)")
            for r in luq:
                ax.annotate(f"n={r['n_low']}", (mb(r), r[key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color="C0")
        gp = [by[n] for n in ("gptq-w2g64", "gptq-w3g64", "gptq-w4g64") if n in by]
        if gp:
            ax.plot([mb(r) for r in gp], [r[key] for r in gp], "s--", color="C1",
                    label="uniform GPTQ W2/W3/W4 g64")
        if "billm" in by:
            ax.plot(mb(by["billm"]), by["billm"][key], "^", color="C2", ms=9,
                    label="uniform BiLLM")
        if "luq-3.50b-highfirst" in by:
            r = by["luq-3.50b-highfirst"]
            ax.plot(mb(r), r[key], "x", color="C3", ms=9, label="LUQ order reversed")
        if "fp" in by and key == "vqa_accuracy":
            ax.axhline(by["fp"][key], color="gray", ls=":", label="FP (212 MB, 16 bits)")
        if key == "kl":
            ax.set_yscale("log")
        ax.set_xlabel("decoder-linear bytes (MB, physical)" if xkey == "weight_bytes" else
                      "nominal bits per weight (the paper's count)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Mini VLM: LUQ frontier vs uniform quantization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from vlmkern.calib.mixed import mixed_calibration_samples
    from vlmkern.eval.harness import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--device", default=None, help="calibration device (default: the model's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine more threads "
                         "contend and run slower)")
    ap.add_argument("--work-root", default=str(Path.home() / ".cache/vlmkern/bench_luq"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown and the plot from the JSON; run nothing")
    args = ap.parse_args(argv)
    path = RESULTS / "minivlm_luq.json"
    if args.report_only:
        data = json.loads(path.read_text())
        write({r["name"]: r for r in data["results"]}, data["entropy"], data["meta"])
        return 0
    torch.set_num_threads(args.threads)
    names = selected(args.only, VARIANTS)
    model, processor, evalset, meta = model_and_evalset(
        calibration=f"mixed_calibration_samples(n_samples={N_SAMPLES}, alpha={ALPHA}, seed=0)")
    meta["model"] += ", 30 decoder layers"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    results = {r["name"]: r for r in previous.get("results", [])}
    samples = mixed_calibration_samples(processor, N_SAMPLES, ALPHA, seed=0)
    entropy = previous.get("entropy") or entropy_pass(model, samples, args.device)
    fp = evaluate(model, evalset, "fp", extra={"method": "fp", "quantize_seconds": 0.0})
    fp.update({"agree_fp": 1.0, "d_vqa_accuracy": 0.0, "ppl_ratio": 1.0,
               "nominal_bits": 16.0})
    results["fp"] = fp
    write(results, entropy, meta)
    for name in names:
        variant, extra = run_variant(name, model, samples, entropy, args.work_root, args.device)
        extra["nominal_bits"] = measured_nominal_bits(variant)
        res = evaluate(variant, evalset, name, fp_reference=fp, extra=extra)
        results[name] = res
        print(f"{name}: acc {res['vqa_accuracy']:.3f}  KL {res['kl']:.4f}  "
              f"ppl {res['perplexity']:.2f}  {res['weight_bytes']:,} B "
              f"({res['bits_per_weight']:.3f} bits/w)  quantize {extra['quantize_seconds']:.0f} s",
              flush=True)
        write(results, entropy, meta)
        del variant
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
