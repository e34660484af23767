"""``vlmkern quantize``: load a model, build calibration data, run a method
layer by layer, report, and save the quantized checkpoint."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

METHODS = ("rtn", "gptq", "gptaq", "billm", "binarize")


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low`` (``what`` names it in errors)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def group_size(text: str) -> int | None:
    """argparse type: columns per scale group, or None for one group per row."""
    if text.lower() in ("row", "none", "-1"):
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'row', got {text!r}") \
            from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="'minivlm' (the bundled mini VLM), 'smollm2' (the bundled "
                        "SmolLM2-135M-Instruct) or a local HuggingFace model folder")
    p.add_argument("--method", choices=METHODS, default="gptq",
                   help="calibration method (default gptq)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 6, 8),
                   help="weight bits (default 4; with --act-bits: the activation bits, and 6 "
                        "only there)")
    p.add_argument("--group-size", type=group_size, default=64,
                   help="columns per scale group, or 'row' for one group per row (default 64)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--act-bits", type=int, choices=(4, 6, 8),
                   help="integer activations too (W8A8 / W6A6 / W4A4): with --method rtn, "
                        "weights of the same bits unless --bits says otherwise; --method "
                        "qvlm needs it (its weight bits: --qvlm-w-bits)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                   help="GPTQ/GPTAQ/VLMQ: columns in descending diag(H) order (default: on for "
                        "vlmq, as its paper runs it; off otherwise)")
    p.add_argument("--static-groups", action="store_true",
                   help="GPTQ/GPTAQ/VLMQ with --act-order: group scales from the original "
                        "weights, so groups stay in column order")
    p.add_argument("--damp", type=non_negative_float, default=0.01,
                   help="GPTQ-family damping, a fraction of mean diag(H) (default 0.01)")
    p.add_argument("--block-size", type=positive_int, default=128,
                   help="GPTQ-family columns per lazy-update block (default 128)")
    p.add_argument("--alpha", type=non_negative_float, default=0.25, help="GPTAQ asymmetry weight")
    p.add_argument("--calib-text", type=Path,
                   help="calibration text file (default: the Lee corpus bundled with gensim)")
    p.add_argument("--samples", type=positive_int, default=32,
                   help="calibration text windows (default 32)")
    p.add_argument("--seq-len", type=positive_int, default=256,
                   help="tokens per text window (default 256)")
    # mixed-modal calibration data; --alpha is GPTAQ's
    mixed = p.add_argument_group(
        "mixed image+text calibration: always for --model minivlm (digit conversations); "
        "for a VLM folder with a processor when any option here is given (offline photographs "
        "and generic questions through the folder's processor and chat template)")
    mixed.add_argument("--calib-samples", type=positive_int,
                       help="calibration samples (default --samples)")
    mixed.add_argument("--calib-alpha", type=fraction,
                       help="fraction of image samples among them, the rest --seq-len text "
                            "windows (default 0.5)")
    mixed.add_argument("--calib-alpha-of", choices=("samples", "tokens"),
                       help="what --calib-alpha is a fraction of (default samples); tokens: "
                            "as LUQ's paper, of --calib-samples x --seq-len tokens, image "
                            "samples drawn until they hold that fraction, text windows the "
                            "rest")
    p.add_argument("--work-dir", type=Path, help="per-layer results; a rerun resumes there")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available)")
    p.add_argument("--out", type=Path,
                   help="folder for the quantized checkpoint (model.safetensors inside), or "
                        "a .safetensors file")
    add_awq_vlmq_arguments(p)
    add_luq_arguments(p)
    add_qvlm_arguments(p)


def method_config(args):
    """The frozen method config the arguments describe."""
    from ..config import BinaryConfig, IntActConfig, QuantConfig
    from ..quant import GPTAQConfig, GPTQConfig
    from ..quant.billm import BiLLMConfig

    group = args.group_size     # an int or None (one group per row), by the argparse type
    luq_options = [f"--{o.replace('_', '-')}" for o in
                   ("budget_bytes", "budget_bits", "threshold", "n_low")
                   if getattr(args, o) is not None]
    if luq_options and args.method != "luq":
        raise SystemExit(f"{', '.join(luq_options)}: options of --method luq, not "
                         f"--method {args.method}")
    if args.method == "qvlm":
        return qvlm_config(args, group)
    if args.act_bits is not None:
        if args.method != "rtn":
            raise SystemExit("--act-bits is only for --method rtn")
        w_bits = args.act_bits if args.bits is None else args.bits
        return IntActConfig(w_bits, args.act_bits, group_size=group)
    if args.bits == 6:
        raise SystemExit("--bits 6 is for integer-activation weights: add --act-bits 6 (W6A6)")
    if args.method in ("billm", "binarize") and (args.bits is not None or args.sym
                                                 or args.group_size != 64):
        raise SystemExit(f"--method {args.method} makes binary weights of its own format "
                         f"(block 128); --bits, --group-size and --sym do not apply")
    if args.method == "rtn" and (args.act_order or args.static_groups):
        raise SystemExit("--act-order and --static-groups are GPTQ options; --method rtn "
                         "rounds each weight alone")
    quant = QuantConfig(4 if args.bits is None else args.bits, group, args.sym)
    act_order = args.act_order if args.act_order is not None else args.method == "vlmq"
    gptq = GPTQConfig(quant, block_size=args.block_size, damp=args.damp,
                      act_order=act_order, static_groups=args.static_groups)
    if args.method in AWQ_VLMQ:
        return awq_vlmq_config(args, quant, gptq)
    if args.method == "luq":
        return luq_run_config(args, gptq)
    return {"rtn": quant, "gptq": gptq, "gptaq": GPTAQConfig(gptq, args.alpha),
            "billm": BiLLMConfig(), "binarize": BinaryConfig()}[args.method]


def load_model(name: str):
    """(model, tokenizer) for 'smollm2' or a local HuggingFace folder;
    (model, MiniVLMProcessor) for 'minivlm'."""
    if name == "minivlm":
        from ..minivlm.model import build_minivlm
        return build_minivlm()
    if name == "smollm2":
        from ..minivlm.assets import load_smollm2
        return load_smollm2()
    folder = Path(name)
    if not folder.is_dir():
        raise SystemExit(f"--model {name!r}: not 'minivlm', not 'smollm2' and not a local "
                         "folder (vlmkern never downloads models)")
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {name!r}: the folder has no config.json, so it is not a "
                         f"HuggingFace model folder")
    _check_not_a_vlmkern_checkpoint(folder)
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        try:
            # safetensors only: a pickled pytorch_model.bin is never loaded
            model, info = getattr(transformers, auto).from_pretrained(
                folder, local_files_only=True, use_safetensors=True, output_loading_info=True)
        except (ValueError, KeyError):
            continue
        missing = sorted(info.get("missing_keys") or ())
        if missing:   # transformers would start them from random values
            raise SystemExit(f"--model {name!r}: the folder's weights lack {len(missing)} "
                             f"tensors the model needs (e.g. {missing[0]}); it is not a "
                             f"complete full-precision model")
        return model.eval(), tokenizer
    raise SystemExit(f"{folder}: transformers cannot load it as an image-text or causal LM")


def _check_not_a_vlmkern_checkpoint(folder: Path) -> None:
    """A folder holding a vlmkern checkpoint is no model to quantize: transformers
    would find none of its linear weights and start them from random values."""
    from ..io import is_checkpoint
    for file in sorted(folder.glob("*.safetensors")):
        if is_checkpoint(file):
            raise SystemExit(f"--model {str(folder)!r}: {file.name} is a vlmkern checkpoint, "
                             f"not full-precision weights to quantize (load it with "
                             f"vlmkern.load_quantized into the model built from config.json)")


def run(args) -> int:
    import torch

    from ..io import save_quantized
    from .engine import quantize_model

    method = method_config(args)
    vision = qvlm_vision_config(args)
    check_paths_and_device(args)
    model, tokenizer = load_model(args.model)
    if args.calib_text is not None:
        text = args.calib_text.read_text(encoding="utf-8")
    else:
        from ..minivlm.assets import lee_corpus_path
        text = lee_corpus_path().read_text(encoding="utf-8")
    samples = calibration_data(args, tokenizer, text)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize = quantize_model
    if args.method == "awq":
        from .awq_engine import awq_quantize_model as quantize
    elif args.method == "luq":
        quantize = luq_cli_quantize
    elif args.method == "qvlm":
        def quantize(model, samples, config, work_dir=None, device=None):
            return qvlm_cli_quantize(model, samples, config, work_dir, device, vision)
    if args.smooth is not None:
        smooth_for_cli(args, model, samples)
    model, report = quantize(model, samples, method, work_dir=args.work_dir, device=device)
    print(report)
    if args.out is not None:
        path = save_quantized(model, args.out)
        print(f"saved {path} ({path.stat().st_size:,} bytes)")
    return 0


def check_device(flag: str, name: str | None) -> None:
    """ValueError unless ``name`` (a device argument; None: the default) is a
    device torch can use here."""
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{flag} {name!r}: {e}") from None
    if device.type == "meta":
        raise ValueError(f"{flag} meta: meta tensors hold no values, so nothing can be "
                         f"computed there; name a device that computes (cpu, cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: torch sees no CUDA GPU here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: torch sees no MPS device here")


def check_output_folder(flag: str, path) -> None:
    """ValueError if ``path`` names an existing file where a folder will be
    written; PermissionError where nothing can be written there: said before
    any work, not after it."""
    if path is None:
        return
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a file; it names a folder to write into")
    check_writable(flag, Path(path))


def check_writable(flag: str, path: Path) -> None:
    """PermissionError unless a file or folder can be made at ``path`` (its
    nearest existing ancestor takes writes: no read-only or foreign mount)."""
    import os
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK) or \
            existing.is_file() and not os.access(existing, os.W_OK):
        raise PermissionError(f"{flag} {path}: {existing} cannot be written here")


def check_checkpoint_target(flag: str, path) -> None:
    """``save_quantized``'s own refusals, before any work: a folder (or a
    ``.safetensors`` file) where the checkpoint can be written and that holds
    no file vlmkern did not write under the checkpoint's name."""
    from ..io import _check_replaceable, _file_path
    if path is None:
        return
    target = _file_path(path)
    if target.parent == Path(path) and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a file; name a folder to write into, or a "
                         f".safetensors file")
    _check_replaceable(target)
    check_writable(flag, target)


def check_paths_and_device(args) -> None:
    """The file, folder and device arguments, checked before any model loads."""
    if args.calib_text is not None and args.calib_text.is_dir():
        raise IsADirectoryError(f"--calib-text {args.calib_text} is a folder; name a text file")
    if args.calib_text is not None and not args.calib_text.is_file():
        raise FileNotFoundError(f"--calib-text {args.calib_text}: no such file")
    if args.calib_text is not None:
        try:
            args.calib_text.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--calib-text {args.calib_text} is not UTF-8 text (byte "
                             f"0x{e.object[e.start]:02x} at offset {e.start}); convert it to "
                             f"UTF-8") from None
    if args.out is not None and Path(args.model).is_dir() and \
            Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError("--out names the --model folder: the checkpoint would replace the "
                         "weights it was made from; give another folder")
    check_checkpoint_target("--out", args.out)
    check_output_folder("--work-dir", args.work_dir)
    if args.work_dir is not None and str(args.work_dir) == ".":   # also what "" parses to
        raise ValueError("--work-dir: name a folder of its own for the per-layer results, "
                         "not the current one")
    check_device("--device", args.device)


def calibration_data(args, tokenizer, text):
    """Text windows; for --model minivlm mixed image+text samples (``tokenizer``
    is then the mini VLM's processor); for a VLM folder, mixed samples through
    its processor when --calib-samples, --calib-alpha or --calib-alpha-of is given."""
    from .data import text_samples

    mixed_options = (args.calib_samples is not None or args.calib_alpha is not None
                     or args.calib_alpha_of is not None)
    n = args.calib_samples if args.calib_samples is not None else args.samples
    alpha = 0.5 if args.calib_alpha is None else args.calib_alpha
    alpha_of = args.calib_alpha_of or "samples"
    if args.model != "minivlm" and not mixed_options:
        return text_samples(tokenizer, text, args.samples, args.seq_len)
    if args.model != "minivlm" and alpha == 0:    # no images asked for: no processor needed
        return text_samples(tokenizer, text, n, args.seq_len)
    try:
        if args.model == "minivlm":
            from .mixed import mixed_calibration_samples
            return mixed_calibration_samples(tokenizer, n, alpha, text_seq_len=args.seq_len,
                                             corpus_text=text, alpha_of=alpha_of)
        from .hf_mixed import hf_mixed_calibration_samples
        return hf_mixed_calibration_samples(load_processor(args.model), n, alpha,
                                            text_seq_len=args.seq_len, corpus_text=text,
                                            alpha_of=alpha_of)
    except (ValueError, TypeError, ImportError) as exc:
        raise SystemExit(f"calibration data: {exc}") from None


def load_processor(name: str):
    """The multimodal processor saved in a model folder (image calibration data)."""
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(f"--calib-samples/--calib-alpha/--calib-alpha-of need --model minivlm "
                         f"or a VLM folder with a processor; {name!r} is neither")
    import transformers
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{folder}: no multimodal processor could be loaded ({exc}); image "
                         f"calibration needs its processor files") from None
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"{folder}: its processor ({type(processor).__name__}) handles no "
                         f"images; this looks like a text model (calibrate it on text: "
                         f"--samples, or --calib-alpha 0)")
    return processor


# --- AWQ and VLMQ ------------------------------------------------------------
AWQ_VLMQ = ("awq", "vlmq")
METHODS = METHODS + AWQ_VLMQ


def add_awq_vlmq_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("AWQ (--method awq) and VLMQ (--method vlmq)")
    g.add_argument("--awq-then", choices=("rtn", "gptq"), default="rtn",
                   help="after folding the scales: clip search + round to nearest (AWQ), or "
                        "GPTQ with the GPTQ options above")
    g.add_argument("--awq-grid", type=positive_int, default=20,
                   help="scale exponents tried, r = i / n for i < n (default 20)")
    g.add_argument("--awq-clip-steps", type=positive_int, default=20,
                   help="clip ratios tried in [0.5, 1] (default 20; 1: no clip search)")
    g.add_argument("--vlmq-base", choices=("gptq", "gptaq"), default="gptaq",
                   help="method run on the importance-weighted Hessians (default gptaq, the "
                        "paper's; GPTAQ uses --alpha)")
    g.add_argument("--vlmq-norm", choices=("l1", "l2"), default="l1",
                   help="token importance: mean |gradient| (l1) or its RMS (l2)")


def awq_vlmq_config(args, quant, gptq):
    """The AWQEngineConfig / VLMQConfig of --method awq / vlmq."""
    if args.method == "awq":
        from ..quant.awq import AWQConfig
        from .awq_engine import AWQEngineConfig
        try:
            awq = AWQConfig(quant, n_grid=args.awq_grid, clip_steps=args.awq_clip_steps)
        except ValueError as exc:
            raise SystemExit(f"--method awq: {exc}") from None
        return AWQEngineConfig(awq, then=args.awq_then,
                               gptq=gptq if args.awq_then == "gptq" else None)
    from ..quant import GPTAQConfig
    from ..quant.vlmq import VLMQConfig
    base = GPTAQConfig(gptq, args.alpha) if args.vlmq_base == "gptaq" else gptq
    return VLMQConfig(base, norm=args.vlmq_norm)


# --- LUQ ---------------------------------------------------------------------
METHODS = METHODS + ("luq",)


def add_luq_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "LUQ (--method luq): the lowest-entropy decoder layers binarized with BiLLM, the "
        "rest GPTQ with the GPTQ options above (default 4-bit g64); mixed image+text data "
        "with --calib-alpha; give one of --budget-bytes, --budget-bits, --threshold, --n-low")
    g.add_argument("--budget-bytes", type=positive_int,
                   help="memory budget: physical bytes of the decoder linears")
    g.add_argument("--budget-bits", type=positive_float,
                   help="memory budget: average physical bits per decoder-linear weight")
    g.add_argument("--threshold", type=finite_float,
                   help="performance threshold on held-out digits (--model minivlm): the "
                        "most binarized layers whose score still meets it")
    g.add_argument("--threshold-metric", choices=("vqa", "kl"), default="vqa",
                   help="vqa: accuracy >= threshold; kl: KL to FP <= threshold (default vqa)")
    g.add_argument("--n-low", type=non_negative_int, help="binarize exactly this many layers")
    g.add_argument("--luq-k", type=positive_int,
                   help="K-means clusters (default: chosen by rank stability over "
                        "8..128)")
    g.add_argument("--luq-tokens", type=positive_int, default=4096,
                   help="tokens clustered per layer, drawn with a fixed seed (default 4096)")


@dataclass(frozen=True)
class LUQRun:
    """A LUQ config plus how n is chosen, as the --method luq arguments say."""
    config: object
    n_low: int | None = None
    budget_bytes: int | None = None
    budget_bits: float | None = None
    threshold: float | None = None
    metric: str = "vqa"
    model: str = ""


def luq_run_config(args, gptq) -> LUQRun:
    from .luq import LUQConfig
    chosen = [o for o in ("budget_bytes", "budget_bits", "threshold", "n_low")
              if getattr(args, o) is not None]
    if len(chosen) != 1:
        raise SystemExit("--method luq needs exactly one of --budget-bytes, --budget-bits, "
                         f"--threshold, --n-low (got {len(chosen)})")
    if args.threshold is not None and args.model != "minivlm":
        raise SystemExit("--threshold scores held-out digits: it needs --model minivlm")
    try:
        config = LUQConfig(high=gptq, k=args.luq_k, max_tokens=args.luq_tokens)
    except ValueError as exc:
        raise SystemExit(f"--method luq: {exc}") from None
    return LUQRun(config, args.n_low, args.budget_bytes, args.budget_bits, args.threshold,
                  args.threshold_metric, args.model)


def luq_cli_quantize(model, samples, run: LUQRun, work_dir=None, device=None):
    """quantize_model's signature for --method luq; returns (model, LUQReport)."""
    from .luq import BudgetError, luq_quantize
    score, higher = None, True
    if run.threshold is not None:
        score, higher = _harness_score(model, run.metric)
    try:
        return luq_quantize(model, samples, run.config, n_low=run.n_low,
                            budget_bytes=run.budget_bytes, budget_bits=run.budget_bits,
                            threshold=run.threshold, score=score, higher_is_better=higher,
                            work_dir=work_dir, device=device)
    except BudgetError as exc:
        raise SystemExit(f"--method luq: {exc}") from None


def _harness_score(model, metric: str):
    """(score(model) on the evaluation harness's held-out digits, higher is better)."""
    from ..eval.harness import EvalSet, evaluate
    from ..minivlm.assets import load_smollm2_tokenizer
    from ..minivlm.model import processor_for
    evalset = EvalSet.build(model, processor_for(model, load_smollm2_tokenizer()))
    key = "vqa_accuracy" if metric == "vqa" else "kl"

    def score(q):
        value = evaluate(q, evalset, "luq probe")[key]
        print(f"luq probe: {key} = {value:.4f}")
        return value

    return score, metric == "vqa"


# --- Q-VLM and SmoothQuant ---------------------------------------------------
METHODS = METHODS + ("qvlm",)


def add_qvlm_arguments(p: argparse.ArgumentParser) -> None:
    from .qvlm import DEFAULT_PERCENTILES
    g = p.add_argument_group(
        "Q-VLM (--method qvlm --act-bits N: integer weights and activations, activation "
        "quantizers searched per block) and SmoothQuant (--smooth)")
    g.add_argument("--qvlm-w-bits", type=int, choices=(4, 6, 8),
                   help="Q-VLM weight bits (default: --act-bits, i.e. W8A8 / W6A6 / W4A4)")
    g.add_argument("--qvlm-max-depth", type=positive_int, default=3,
                   help="most decoder layers in one search block (default 3)")
    g.add_argument("--qvlm-percentiles", default=",".join(f"{p:g}" for p in DEFAULT_PERCENTILES),
                   help="static clipping percentiles of |x| searched (default %(default)s)")
    g.add_argument("--qvlm-no-token", action="store_true",
                   help="search static per-tensor scales only (no dynamic per-token candidate)")
    g.add_argument("--qvlm-h0", type=float,
                   help="block threshold on the average dependency (default: its mean)")
    g.add_argument("--qvlm-search-samples", type=positive_int,
                   help="calibration samples the block search runs on (default: all)")
    g.add_argument("--qvlm-granularity", choices=("layer", "quantizer"), default="layer",
                   help="one activation quantizer choice per decoder layer, or per linear "
                        "input (4x the search cost)")
    g.add_argument("--qvlm-objective", choices=("mse", "token"), default="mse",
                   help="block error searched: squared error (paper) or mean per-token "
                        "relative error")
    g.add_argument("--qvlm-vision", action="store_true",
                   help="also quantize the vision tower (same W/A bits) and train its "
                        "clipping with the visual-encoder optimisation (eqs. 8-10); needs "
                        "image samples (--model minivlm, or a VLM folder with --calib-alpha)")
    g.add_argument("--qvlm-vision-epochs", type=non_negative_int, default=10,
                   help="training epochs of the vision clipping (default 10, as in the "
                        "paper; 0: quantize only)")
    g.add_argument("--qvlm-vision-activation", choices=("static", "token"), default="static",
                   help="vision activation scales: learned static per-tensor, or per-token")
    g.add_argument("--qvlm-vision-lr", type=float, default=5e-3,
                   help="Adam step on the log clipping parameters (default 5e-3)")
    g.add_argument("--qvlm-vision-lambda-ent", type=float, default=1.0,
                   help="lambda_1 of eq. 10 (dependency term)")
    g.add_argument("--qvlm-vision-lambda-err", type=float, default=1.0,
                   help="lambda_2 of eq. 10 (error term)")
    g.add_argument("--qvlm-vision-eta", type=float, default=1.0,
                   help="eta of eq. 9 (weight of the last layer's error)")
    g.add_argument("--qvlm-temperature", choices=("delta", "delta2"), default="delta",
                   help="soft-assignment temperature of the entropy proxy: Delta (paper) or "
                        "Delta^2 (scale-free)")
    g.add_argument("--smooth", type=float, metavar="ALPHA",
                   help="SmoothQuant with migration strength ALPHA (paper: 0.5) before an "
                        "integer-activation method (--method rtn --act-bits N, or qvlm)")
    g.add_argument("--smooth-down", action="store_true",
                   help="--smooth also smooths down_proj through up_proj")


def qvlm_config(args, group):
    """The QVLMConfig of --method qvlm."""
    from .qvlm import QVLMConfig
    if args.act_bits is None:
        raise SystemExit("--method qvlm needs --act-bits (4, 6 or 8)")
    if args.bits is not None or args.sym:
        raise SystemExit("--method qvlm makes symmetric per-channel integer weights of "
                         "--qvlm-w-bits bits (default --act-bits): --bits and --sym do not "
                         "apply")
    w_bits = args.qvlm_w_bits if args.qvlm_w_bits is not None else args.act_bits
    try:
        percentiles = tuple(float(v) for v in args.qvlm_percentiles.split(",") if v.strip())
        return QVLMConfig(w_bits, args.act_bits, group, max_depth=args.qvlm_max_depth,
                          percentiles=percentiles, token_candidate=not args.qvlm_no_token,
                          h0=args.qvlm_h0, temperature=args.qvlm_temperature,
                          search_samples=args.qvlm_search_samples,
                          granularity=args.qvlm_granularity, objective=args.qvlm_objective)
    except ValueError as exc:
        raise SystemExit(f"--method qvlm: {exc}") from None


def qvlm_vision_config(args):
    """The VisionOptConfig of --qvlm-vision, or None."""
    if not args.qvlm_vision:
        return None
    if args.method != "qvlm":
        raise SystemExit("--qvlm-vision is an option of --method qvlm")
    from .qvlm_vision import VisionOptConfig
    try:
        return VisionOptConfig(epochs=args.qvlm_vision_epochs,
                               activation=args.qvlm_vision_activation, lr=args.qvlm_vision_lr,
                               lambda_ent=args.qvlm_vision_lambda_ent,
                               lambda_err=args.qvlm_vision_lambda_err, eta=args.qvlm_vision_eta)
    except ValueError as exc:
        raise SystemExit(f"--qvlm-vision: {exc}") from None


def qvlm_cli_quantize(model, samples, config, work_dir=None, device=None, vision=None):
    """quantize_model's signature for --method qvlm; returns (model, QVLMReport)."""
    from .qvlm import qvlm_quantize
    try:
        return qvlm_quantize(model, samples, config, device=device, vision=vision,
                             work_dir=work_dir)
    except ValueError as exc:
        raise SystemExit(f"--method qvlm: {exc}") from None


def smooth_for_cli(args, model, samples) -> None:
    """SmoothQuant on the model, in place, before an integer-activation method."""
    from .smooth_engine import smooth_model
    if args.act_bits is None or args.method not in ("rtn", "qvlm"):
        raise SystemExit("--smooth is for integer-activation methods: --method rtn or qvlm "
                         "with --act-bits")
    try:
        print(smooth_model(model, samples, args.smooth, include_down=args.smooth_down))
    except ValueError as exc:
        raise SystemExit(f"--smooth: {exc}") from None
