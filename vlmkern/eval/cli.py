"""``vlmkern eval``: score data-free variants of the mini VLM.

    vlmkern eval --methods fp,rtn-w4g64,w8a8 --out eval_out

Variant names: fp; rtn-w{2,3,4,8}g{N}[s] (group-wise RTN, asymmetric unless
the trailing s); w{4,6,8}a{4,6,8} (integer weights and activations);
binary (BiLLM-style binarization, data free).
"""
from __future__ import annotations

import argparse
import copy
import re
import time

from ..calib.cli import check_output_folder, positive_int

DEFAULT_METHODS = "fp,rtn-w8g64,rtn-w4g64,rtn-w3g64,rtn-w2g64,w8a8,w4a4,binary"


def parse_method(name: str):
    """Variant name -> config for ``replace_linears`` (None for fp)."""
    from ..config import BinaryConfig, IntActConfig, QuantConfig

    key = name.strip().lower()
    if key == "fp":
        return None
    if key == "binary":
        return BinaryConfig()
    m = re.fullmatch(r"rtn-w(\d+)g(\d+)(s?)", key)
    if m:
        return QuantConfig(bits=int(m[1]), group_size=int(m[2]), sym=bool(m[3]))
    m = re.fullmatch(r"w(\d+)a(\d+)", key)
    if m:
        return IntActConfig(w_bits=int(m[1]), a_bits=int(m[2]))
    raise ValueError(f"unknown variant {name!r}: expected fp, rtn-w<bits>g<group>[s], "
                     f"w<bits>a<bits> or binary")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated variants: fp, rtn-w<bits>g<group>[s] (s: symmetric), "
                        f"w<bits>a<bits>, binary (default {DEFAULT_METHODS})")
    p.add_argument("--out", default="eval_out",
                   help="folder for results.json/.md/.png (default ./eval_out)")
    p.add_argument("--n-vqa", type=positive_int, default=40,
                   help="held-out digits answered (default 40, at most 360)")
    p.add_argument("--n-kl", type=positive_int, default=8, help="image prompts for KL / top-1")
    p.add_argument("--n-ppl", type=positive_int, default=2, help="perplexity windows")
    p.add_argument("--ppl-seq-len", type=positive_int, default=256,
                   help="tokens per perplexity window (at least 2)")
    p.add_argument("--exact-ops", action="store_true",
                   help="run weight-only variants through vlmkern.ops (slow on CPU) instead "
                        "of fp32 matmuls with the dequantized weights")
    p.add_argument("--cache-dir", default=None, help="mini VLM cache folder")
    return p


def run_eval(args) -> int:
    import torch

    from ..minivlm.model import build_minivlm
    from ..replace import replace_linears
    from .harness import EvalSet, evaluate
    from .report import markdown_table, write_report

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    # fail on a typo, a repeat or a bad path before any work
    if not names:
        raise ValueError(f"--methods {args.methods!r} names no variant")
    repeated = sorted({n for n in names if [m.lower() for m in names].count(n.lower()) > 1})
    if repeated:
        raise ValueError(f"--methods lists {repeated} more than once")
    if args.ppl_seq_len < 2:
        raise ValueError(f"--ppl-seq-len must be at least 2 (a window predicts its tokens "
                         f"after the first), got {args.ppl_seq_len}")
    configs = {n: parse_method(n) for n in names}
    check_output_folder("--out", args.out)
    check_output_folder("--cache-dir", args.cache_dir)
    t = time.perf_counter()
    model, processor = build_minivlm(args.cache_dir, progress=True)
    evalset = EvalSet.build(model, processor, n_vqa=args.n_vqa, n_kl=args.n_kl,
                            n_ppl=args.n_ppl, ppl_seq_len=args.ppl_seq_len)
    build_s = time.perf_counter() - t
    print(f"evaluation set ready in {build_s:.1f} s: {evalset.sizes}", flush=True)
    # agreement is always measured against FP answers: FP is scored first
    names = sorted(names, key=lambda n: configs[n] is not None)
    fp_ref = None
    if configs[names[0]] is not None:
        fp_ref = evaluate(model, evalset, "fp", exact_ops=args.exact_ops)
    results = []
    for name in names:
        cfg = configs[name]
        t = time.perf_counter()
        if cfg is None:
            variant = model
        else:
            variant = copy.deepcopy(model)
            replace_linears(variant, cfg, progress=False)
        quant_s = time.perf_counter() - t
        res = evaluate(variant, evalset, name, fp_reference=fp_ref,
                       extra={"config": getattr(cfg, "label", "fp"),
                              "quantize_seconds": quant_s}, exact_ops=args.exact_ops)
        if cfg is None and fp_ref is None:
            fp_ref = res
            res.update({"agree_fp": 1.0, "d_vqa_accuracy": 0.0, "ppl_ratio": 1.0})
        results.append(res)
        print(f"{name}: acc {res['vqa_accuracy']:.3f}  KL {res['kl']:.4f}  "
              f"top1 {res['top1']:.3f}  ppl {res['perplexity']:.2f}  "
              f"{res['bits_per_weight']:.2f} bits/w  ({quant_s:.1f} s quantize, "
              f"{res['eval_seconds']:.1f} s eval)", flush=True)
        if variant is not model:
            del variant
    meta = {"model": "mini VLM (DINOv2-small + SmolLM2-135M-Instruct)",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "evalset_seconds": round(build_s, 1), **evalset.sizes}
    written = write_report(results, args.out, meta)
    print(markdown_table(results))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="vlmkern eval",
                                                 description=__doc__.split("\n\n")[0]))


def main_eval(argv=None) -> int:
    return run_eval(build_parser().parse_args(argv))
