"""``vlmkern quantize``: load a model, build calibration data, run a method
layer by layer, report, and save the quantized checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

METHODS = ("rtn", "gptq", "gptaq", "billm", "binarize")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="'smollm2' (the bundled SmolLM2-135M-Instruct) or a local "
                        "HuggingFace model folder")
    p.add_argument("--method", choices=METHODS, default="gptq")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", default="64",
                   help="columns per scale group, or 'row' for one group per row (default 64)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--act-bits", type=int, choices=(4, 6, 8),
                   help="rtn only: integer activations too (W8A8 / W6A6 / W4A4)")
    p.add_argument("--act-order", action="store_true", help="GPTQ/GPTAQ: descending diag(H)")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--alpha", type=float, default=0.25, help="GPTAQ asymmetry weight")
    p.add_argument("--calib-text", type=Path,
                   help="calibration text file (default: the Lee corpus bundled with gensim)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--work-dir", type=Path, help="per-layer results; a rerun resumes there")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available)")
    p.add_argument("--out", type=Path, help="folder for the quantized checkpoint")


def method_config(args):
    """The frozen method config the arguments describe."""
    from ..config import BinaryConfig, IntActConfig, QuantConfig
    from ..quant import GPTAQConfig, GPTQConfig
    from ..quant.billm import BiLLMConfig

    group = None if str(args.group_size).lower() in ("row", "none", "-1") else int(args.group_size)
    if args.act_bits is not None:
        if args.method != "rtn":
            raise SystemExit("--act-bits is only for --method rtn")
        return IntActConfig(args.bits, args.act_bits, group_size=group)
    quant = QuantConfig(args.bits, group, args.sym)
    gptq = GPTQConfig(quant, block_size=args.block_size, damp=args.damp,
                      act_order=args.act_order, static_groups=args.static_groups)
    return {"rtn": quant, "gptq": gptq, "gptaq": GPTAQConfig(gptq, args.alpha),
            "billm": BiLLMConfig(), "binarize": BinaryConfig()}[args.method]


def load_model(name: str):
    """(model, tokenizer) for 'smollm2' or a local HuggingFace folder."""
    if name == "smollm2":
        from ..minivlm.assets import load_smollm2
        return load_smollm2()
    folder = Path(name)
    if not folder.is_dir():
        raise SystemExit(f"--model {name!r}: not 'smollm2' and not a local folder "
                         "(vlmkern never downloads models)")
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        try:
            model = getattr(transformers, auto).from_pretrained(folder, local_files_only=True)
            return model.eval(), tokenizer
        except (ValueError, KeyError):
            continue
    raise SystemExit(f"{folder}: transformers cannot load it as an image-text or causal LM")


def run(args) -> int:
    import torch

    from ..io import save_quantized
    from .data import text_samples
    from .engine import quantize_model

    method = method_config(args)
    model, tokenizer = load_model(args.model)
    if args.calib_text is not None:
        text = args.calib_text.read_text(encoding="utf-8")
    else:
        from ..minivlm.assets import lee_corpus_path
        text = lee_corpus_path().read_text(encoding="utf-8")
    samples = text_samples(tokenizer, text, args.samples, args.seq_len)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, report = quantize_model(model, samples, method, work_dir=args.work_dir,
                                   device=device)
    print(report)
    if args.out is not None:
        path = save_quantized(model, args.out)
        print(f"saved {path} ({path.stat().st_size:,} bytes)")
    return 0
