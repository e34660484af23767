"""Evaluation harness: score quantized variants of the mini VLM against its
full-precision model (VQA accuracy, KL / top-1, perplexity, physical bits).

    from vlmkern.eval import EvalSet, evaluate
    evalset = EvalSet.build(model, processor)
    fp = evaluate(model, evalset, "fp")
    q = evaluate(qmodel, evalset, "rtn-w4g64", fp_reference=fp)
"""
from .cli import add_arguments, build_parser, main_eval, parse_method, run_eval
from .harness import EvalSet, decoder_linear_bytes, evaluate, heldout_digits
from .metrics import kl_and_top1, parse_digit, perplexity_from_logits, vqa_accuracy
from .report import markdown_table, write_report

__all__ = ["EvalSet", "evaluate", "decoder_linear_bytes", "heldout_digits", "kl_and_top1",
           "perplexity_from_logits", "parse_digit", "vqa_accuracy", "markdown_table",
           "write_report", "main_eval", "run_eval", "add_arguments", "build_parser",
           "parse_method"]
