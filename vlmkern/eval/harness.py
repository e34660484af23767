"""Score variants of the mini VLM against its full-precision model.

``EvalSet.build`` runs the FP model once and stores everything a variant is
compared with; ``evaluate`` then costs one pass per metric:

* VQA accuracy: greedy answers to "What digit is this?" on held-out digits
  (the projector file records which digits it never trained on).
* KL / top-1: next-token distributions on image+question prompts followed by
  the FP model's own greedy answer (teacher forced), so both models are
  scored on identical token sequences; reported over every real position of
  prompt + answer and over the answer positions alone.
* Perplexity on Lee-corpus windows taken after the text calibration reads.
* Physical bytes of the decoder-layer linears and bits per weight.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .metrics import agreement, kl_and_top1, parse_digit, vqa_accuracy

QUESTION = "What digit is this?"
# Calibration (``vlmkern quantize``) reads the corpus from its start,
# 32 x 256 tokens by default; skipping 64 x 256 keeps perplexity text unseen
# by any calibration of up to 64 windows of 256 (or 32 of 512). The split is
# by position: the Lee corpus holds one ~92-token paragraph twice, once in
# each part (tokens 18-110 of the first perplexity window).
PPL_SKIP_TOKENS = 64 * 256
BYTES_NOTE = ("sum of QuantLinear.quantized_weight.nbytes (packed weights + scales/zeros) "
              "and 2 bytes per weight of any nn.Linear left in the language model's "
              "decoder layers (counted as fp16/bf16 storage, whatever dtype the model is "
              "held in for the evaluation); embeddings, lm_head, vision tower and "
              "projector excluded")


def heldout_digits(projector_path=None):
    """(images uint8 [N, 8, 8], labels [N], held-out indices) with the
    held-out split read from the projector file, so evaluation never touches
    a digit the projector was trained on."""
    from safetensors import safe_open

    from ..minivlm.model import PROJECTOR_PATH
    from ..minivlm.train_projector import digit_images

    with safe_open(str(projector_path or PROJECTOR_PATH), framework="pt") as f:
        meta = f.metadata() or {}
    if "heldout_indices" not in meta:
        raise ValueError("the projector file records no held-out digits (heldout_indices)")
    images, labels = digit_images()
    return images, labels, np.array(json.loads(meta["heldout_indices"]), dtype=np.int64)


@dataclass
class EvalSet:
    """Inputs plus the FP model's reference outputs; built once, reused for
    every variant."""

    vqa_images: list
    vqa_labels: list[int]
    vqa_indices: list[int]
    kl_inputs: dict          # input_ids, attention_mask, position_ids, pixel_values
    kl_mask: torch.Tensor    # [B, T] bool: real (non-pad) positions
    answer_mask: torch.Tensor  # [B, T] bool: positions predicting an answer token
    ref_logits: torch.Tensor   # [B, T, V] FP logits on kl_inputs
    ppl_windows: torch.Tensor  # [n, seq_len] token ids
    processor: object = None
    question: str = QUESTION
    batch_size: int = 20
    max_new_tokens: int = 8
    sizes: dict = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def build(cls, model, processor, n_vqa: int = 40, n_kl: int = 8, n_ppl: int = 2,
              ppl_seq_len: int = 256, ppl_skip_tokens: int = PPL_SKIP_TOKENS,
              batch_size: int = 20, max_new_tokens: int = 8, projector_path=None,
              corpus_text: str | None = None) -> "EvalSet":
        from ..calib.data import held_out_windows
        from ..minivlm.train_projector import eval_subset

        images, labels, test_idx = heldout_digits(projector_path)
        for what, n in (("n_vqa", n_vqa), ("n_kl", n_kl)):
            if n > len(test_idx):
                raise ValueError(f"{what}={n}: the projector holds out {len(test_idx)} digits, "
                                 f"the most it can ask about")
        # balanced over the ten classes, same rule as the projector's own check
        vqa_idx = eval_subset(test_idx, labels, n_vqa)
        kl_idx = eval_subset(test_idx, labels, n_kl)
        kl_inputs, kl_mask, answer_mask = _teacher_forced(
            model, processor, [images[i] for i in kl_idx], max_new_tokens)
        ref_logits = _logits(model, kl_inputs)
        if corpus_text is None:
            from ..minivlm.assets import lee_corpus_path
            corpus_text = lee_corpus_path().read_text(encoding="utf-8")
        windows = held_out_windows(processor.tokenizer, corpus_text, ppl_skip_tokens,
                                   n_ppl, ppl_seq_len)
        sizes = {"n_vqa": len(vqa_idx), "n_kl": len(kl_idx),
                 "kl_positions": int(kl_mask.sum()), "answer_positions": int(answer_mask.sum()),
                 "n_ppl": n_ppl, "ppl_seq_len": ppl_seq_len, "ppl_skip_tokens": ppl_skip_tokens}
        return cls([images[i] for i in vqa_idx], [int(labels[i]) for i in vqa_idx],
                   [int(i) for i in vqa_idx], kl_inputs, kl_mask, answer_mask, ref_logits,
                   windows, processor, QUESTION, batch_size, max_new_tokens, sizes)


def _teacher_forced(model, processor, images, max_new_tokens):
    """Prompt + the FP model's greedy answer (up to and including its end
    token) for each image, right-padded, with the masks of real positions
    and of positions whose next token is part of the answer."""
    inputs = processor.prepare_inputs(images, [QUESTION] * len(images))
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    eos = processor.tokenizer.eos_token_id
    rows = []
    for prompt_ids, prompt_mask, gen in zip(inputs["input_ids"], inputs["attention_mask"],
                                            out[:, inputs["input_ids"].shape[1]:]):
        gen = gen.tolist()
        answer = gen[:gen.index(eos) + 1] if eos in gen else gen
        rows.append((prompt_ids[prompt_mask.bool()].tolist(), answer))
    width = max(len(p) + len(a) for p, a in rows)
    b = len(rows)
    ids = torch.full((b, width), processor.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    answer_mask = torch.zeros((b, width), dtype=torch.bool)
    for r, (p, a) in enumerate(rows):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        mask[r, :len(p) + len(a)] = 1
        # logits at position t predict token t+1: the answer's tokens are
        # predicted from positions len(p)-1 .. len(p)+len(a)-2
        answer_mask[r, len(p) - 1:len(p) + len(a) - 1] = True
    # right padding, so positions count from 0 in every row; the last real
    # position predicts past the sequence and is not scored
    kl_mask = mask.bool().clone()
    for r, (p, a) in enumerate(rows):
        kl_mask[r, len(p) + len(a) - 1] = False
    position_ids = torch.arange(width).expand(b, width).clone()
    kl_inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids,
                 "pixel_values": inputs["pixel_values"]}
    return kl_inputs, kl_mask, answer_mask


@torch.no_grad()
def _logits(model, kl_inputs) -> torch.Tensor:
    return model(**kl_inputs).logits.float()


def decoder_linear_bytes(model) -> dict:
    """Physical bytes and weight count of the linears inside the language
    model's decoder layers (see BYTES_NOTE)."""
    from ..nn import QuantLinear

    layers = model.model.language_model.layers
    total_bytes = n_weights = n_quant = n_dense = 0
    for module in layers.modules():
        if isinstance(module, QuantLinear):
            qw = module.quantized_weight
            total_bytes += qw.nbytes
            n_weights += qw.shape[0] * qw.shape[1]
            n_quant += 1
        elif isinstance(module, nn.Linear):
            total_bytes += 2 * module.weight.numel()
            n_weights += module.weight.numel()
            n_dense += 1
    return {"weight_bytes": total_bytes, "n_weights": n_weights,
            "bits_per_weight": 8.0 * total_bytes / n_weights if n_weights else float("nan"),
            "quantized_linears": n_quant, "dense_linears": n_dense,
            "weight_bytes_note": BYTES_NOTE}


@contextlib.contextmanager
def dequantized_forward(model):
    """Run weight-only quantized linears (group-wise, binary) as fp32 matmuls
    with their dequantized weight, computed once, for the duration.

    Why: on the CPU the reference op dequantizes on every call and multiplies
    in fp64 (for batch invariance), ~5x slower than FP here. The quantized
    values are identical, so only fp32-vs-fp64 rounding changes. Integer
    activation formats (W8A8, W4A4) keep the real op: their activation
    quantization is part of what is measured."""
    from ..formats import BinaryWeight, QuantizedWeight
    from ..nn import QuantLinear

    patched = []
    for module in model.modules():
        if isinstance(module, QuantLinear) and isinstance(module.quantized_weight,
                                                          (QuantizedWeight, BinaryWeight)):
            w = module.quantized_weight.dequantize(torch.float32)
            b = None if module.bias is None else module.bias.float()
            module.forward = (lambda x, w=w, b=b:
                              torch.nn.functional.linear(x.float(), w, b).to(x.dtype))
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # back to the class's forward (ops.linear)


@torch.no_grad()
def vqa_answers(model, evalset: EvalSet) -> list[str]:
    out = []
    for s in range(0, len(evalset.vqa_images), evalset.batch_size):
        imgs = evalset.vqa_images[s:s + evalset.batch_size]
        out += evalset.processor.answer(model, imgs, [evalset.question] * len(imgs),
                                max_new_tokens=evalset.max_new_tokens)
    return out


@torch.no_grad()
def evaluate(model, evalset: EvalSet, name: str, fp_reference: dict | None = None,
             extra: dict | None = None, exact_ops: bool = False) -> dict:
    """Score one variant. ``fp_reference``: the FP model's result dict from
    an earlier ``evaluate``; adds agreement with its answers and deltas.
    exact_ops: run every quantized linear through ``vlmkern.ops.linear``
    instead of ``dequantized_forward`` (same values, several times slower)."""
    model.eval()
    start = time.perf_counter()
    with contextlib.nullcontext(0) if exact_ops else dequantized_forward(model) as n_fast:
        res = _score(model, evalset, name, fp_reference, extra)
    res["matmul"] = (f"{n_fast} weight-only linears as fp32 matmuls with dequantized "
                     f"weights; any other QuantLinear through vlmkern.ops.linear")
    res["eval_seconds"] = time.perf_counter() - start
    return res


def _score(model, evalset, name, fp_reference, extra) -> dict:
    from ..calib.data import perplexity

    res = {"name": name, **(extra or {})}

    t = time.perf_counter()
    answers = vqa_answers(model, evalset)
    res["vqa_accuracy"] = vqa_accuracy(answers, evalset.vqa_labels)
    res["vqa_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    logits = _logits(model, evalset.kl_inputs)
    res["kl"], res["top1"] = kl_and_top1(evalset.ref_logits, logits, evalset.kl_mask)
    res["kl_answer"], res["top1_answer"] = kl_and_top1(evalset.ref_logits, logits,
                                                       evalset.answer_mask)
    del logits
    res["kl_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    res["perplexity"] = perplexity(model, evalset.ppl_windows)
    res["ppl_seconds"] = time.perf_counter() - t

    res.update(decoder_linear_bytes(model))
    if fp_reference is not None:
        ref = [parse_digit(a) for a in fp_reference["answers"]]
        if len(ref) != len(answers):
            raise ValueError("fp_reference was scored on a different EvalSet")
        res["agree_fp"] = agreement(answers, ref)
        res["d_vqa_accuracy"] = res["vqa_accuracy"] - fp_reference["vqa_accuracy"]
        res["ppl_ratio"] = res["perplexity"] / fp_reference["perplexity"]
    res["answers"] = answers
    return res
