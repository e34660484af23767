"""Write evaluation results: JSON (everything), a markdown table (the
headline numbers) and, when matplotlib is installed, accuracy against
physical bits per weight."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

COLUMNS = (("name", "variant", "{}"), ("bits_per_weight", "bits/w", "{:.2f}"),
           ("weight_bytes", "decoder linear bytes", "{:,}"),
           ("vqa_accuracy", "VQA acc", "{:.3f}"), ("agree_fp", "agree FP", "{:.3f}"),
           ("kl", "KL", "{:.4f}"), ("top1", "top-1", "{:.3f}"),
           ("kl_answer", "KL answer", "{:.4f}"), ("top1_answer", "top-1 answer", "{:.3f}"),
           ("perplexity", "ppl", "{:.2f}"), ("quantize_seconds", "quant s", "{:.1f}"),
           ("eval_seconds", "eval s", "{:.1f}"))


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def markdown_table(results: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" if c[0] == "name" else "---:" for c in COLUMNS) + "|"
    rows = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def plot_accuracy(results: list[dict], path: Path) -> str | None:
    """PNG of VQA accuracy vs bits per weight; returns why it was skipped, or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(r["bits_per_weight"], r["vqa_accuracy"])
        ax.annotate(r["name"], (r["bits_per_weight"], r["vqa_accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("physical bits per weight (decoder linears)")
    ax.set_ylabel("VQA accuracy (held-out digits)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def bytes_notes(results: list[dict]) -> list[str]:
    """Markdown lines saying what the bytes column counts (the same for every
    row of one harness), each followed by a blank line."""
    notes = sorted({r["weight_bytes_note"] for r in results if r.get("weight_bytes_note")})
    return [line for note in notes for line in (f"Decoder linear bytes: {note}.", "")]


def write_report(results: list[dict], out_dir, meta: dict | None = None) -> dict:
    """results.json, results.md and accuracy_vs_bits.png in ``out_dir``;
    returns {kind: path} of what was written plus 'plot_skipped' if any."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    (out / "results.json").write_text(json.dumps({"meta": meta or {}, "results": results},
                                                 indent=1, default=str))
    written["json"] = out / "results.json"
    lines = ["# Mini VLM evaluation", ""]
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [markdown_table(results), ""] + bytes_notes(results)
    (out / "results.md").write_text("\n".join(lines))
    written["markdown"] = out / "results.md"
    why = plot_accuracy(results, out / "accuracy_vs_bits.png")
    if why is None:
        written["plot"] = out / "accuracy_vs_bits.png"
    else:
        written["plot_skipped"] = why
    return written
