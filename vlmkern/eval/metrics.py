"""Scores for comparing a model variant with its full-precision reference.

Pure functions on tensors and strings, so each result can be checked by hand:
all probability arithmetic is done in float64, because the KL of a good
quantized model is ~1e-3 and float32 log-softmax over a 49k vocabulary loses
digits at that scale.
"""
from __future__ import annotations

import math
import re

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# a spelled digit as a whole word ("none" is not "one")
_WORD_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` [..., V] flattened to [N, V], keeping only positions where
    ``mask`` [...] is true."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    mask = torch.as_tensor(mask, dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits "
                         f"positions {tuple(x.shape[:-1])}")
    return x[mask]


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean over positions of KL(p_ref || q), fraction of positions where the
    arg-max tokens agree).

    ref_logits, logits: [..., V] unnormalised scores for the same positions.
    mask: optional bool [...] selecting the positions to score.
    KL is in nats. Ties in the arg-max resolve to the lowest index (torch's
    argmax), identically for both inputs.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs "
                         f"{tuple(logits.shape)}")
    ref = _select(ref_logits, mask).to(torch.float64)
    q = _select(logits, mask).to(torch.float64)
    if ref.shape[0] == 0:
        raise ValueError("no positions selected")
    log_p = torch.log_softmax(ref, dim=-1)
    log_q = torch.log_softmax(q, dim=-1)
    # p * (log p - log q) with 0 * log 0 = 0 where the reference has no mass
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    kl = terms.sum(-1).clamp_min(0.0)  # rounding can leave -1e-17 for equal inputs
    top1 = (ref.argmax(-1) == q.argmax(-1)).to(torch.float64)
    return float(kl.mean()), float(top1.mean())


def perplexity_from_logits(logits: torch.Tensor, targets: torch.Tensor,
                           mask: torch.Tensor | None = None) -> float:
    """exp(mean negative log-likelihood of ``targets`` [...] under
    ``logits`` [..., V]). Logits must already be aligned with their targets
    (for a causal LM: logits[:, :-1] against input_ids[:, 1:])."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits positions {tuple(logits.shape[:-1])} do not match targets "
                         f"{tuple(targets.shape)}")
    lp = _select(logits, mask).to(torch.float64).log_softmax(-1)
    t = targets.reshape(-1) if mask is None else targets[torch.as_tensor(mask, dtype=torch.bool)]
    if t.numel() == 0:
        raise ValueError("no positions selected")
    nll = -lp.gather(-1, t.reshape(-1, 1).long()).mean()
    return math.exp(float(nll))


def parse_digit(text: str) -> int | None:
    """The digit an answer names: the one digit its numbers all spell ("It
    is 7.", "The number 7 is 7."), or without numbers its one spelled digit
    ("seven"; words such as "the only one" beside a number are prose). None
    for no digit, a number of several digits ("It is 11.", "11111") or
    numbers that disagree ("The number 6 is 8."): none names one digit."""
    numbers = re.findall(r"[0-9]+", text or "")
    if numbers:
        return int(numbers[0]) if len(set(numbers)) == 1 and len(numbers[0]) == 1 else None
    words = {w.lower() for w in _WORD_RE.findall(text or "")}
    return DIGIT_WORDS.index(words.pop()) if len(words) == 1 else None


def vqa_accuracy(answers, labels) -> float:
    """Fraction of answers whose parsed digit equals the label; an answer
    with no digit counts as wrong."""
    answers, labels = list(answers), [int(x) for x in labels]
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    if not answers:
        raise ValueError("no answers to score")
    return sum(parse_digit(a) == y for a, y in zip(answers, labels)) / len(answers)


def agreement(answers, reference_digits) -> float:
    """Fraction of answers naming the same digit as the reference's; two
    answers that name none do not agree."""
    answers, reference_digits = list(answers), list(reference_digits)
    if len(answers) != len(reference_digits) or not answers:
        raise ValueError(f"{len(answers)} answers for {len(reference_digits)} reference digits")
    return sum(d is not None and parse_digit(a) == d
               for a, d in zip(answers, reference_digits)) / len(answers)

