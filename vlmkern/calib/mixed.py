"""Mixed-modal calibration data for the mini VLM.

A fraction ``alpha`` of the samples are whole image conversations (user turn:
the image placeholder tokens and a question; assistant turn: the answer),
rendered through the processor's own chat template, so the Hessians see the
projected image tokens, the template's special tokens and answer text
exactly as at inference. The rest are windows of Lee-corpus text.

Nothing here touches what the evaluation harness measures: the images are
training digits only (the held-out split is read from the projector file),
and the text windows come from the first ``PPL_SKIP_TOKENS`` tokens of the
corpus, which perplexity skips.

Each returned dict is one batch of one sequence (no padding, so no position
of a sample is wasted on pad tokens).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def _check_processor(processor) -> None:
    needed = ("tokenizer", "image_token", "num_image_tokens", "preprocess_images")
    missing = [a for a in needed if not hasattr(processor, a)]
    if missing:
        raise TypeError(f"{type(processor).__name__} lacks {', '.join(missing)}; image "
                        "conversations need a MiniVLMProcessor-like processor")


def render_conversation(processor, question: str, answer: str) -> str:
    """Chat-template text of one user turn (image placeholders + question)
    followed by the assistant's answer."""
    content = processor.image_token * processor.num_image_tokens + "\n" + question
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": answer}]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False)


def image_text_samples(processor, images, questions, answers) -> list[dict[str, torch.Tensor]]:
    """One sample per (image, question, answer): input_ids and attention_mask
    [1, T] of the rendered conversation and pixel_values [1, 3, H, W]."""
    _check_processor(processor)
    images, questions, answers = list(images), list(questions), list(answers)
    if not (len(images) == len(questions) == len(answers)):
        raise ValueError(f"{len(images)} images, {len(questions)} questions and "
                         f"{len(answers)} answers: one of each per sample")
    if not images:
        raise ValueError("image_text_samples needs at least one image")
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    samples = []
    for image, question, answer in zip(images, questions, answers):
        text = render_conversation(processor, question, answer)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        found = int((ids == image_id).sum())
        if found != processor.num_image_tokens:
            # the question or answer itself contained the placeholder token
            raise ValueError(f"conversation has {found} image tokens, expected "
                             f"{processor.num_image_tokens}: {question!r} / {answer!r}")
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "pixel_values": processor.preprocess_images([image])})
    return samples


def training_digit_indices(projector_path=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, indices of the digits the projector trained on):
    every digit outside the held-out split recorded in the projector file."""
    from ..eval.harness import heldout_digits

    images, labels, heldout = heldout_digits(projector_path)
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return images, labels, train


def _balanced_pick(indices: np.ndarray, labels: np.ndarray, n: int,
                   rng: np.random.Generator) -> list[int]:
    """n indices drawn round-robin over the classes (each class in its own
    random order), so a few samples already cover every digit."""
    classes = sorted({int(labels[i]) for i in indices})
    pools = {c: list(rng.permutation([i for i in indices if labels[i] == c])) for c in classes}
    order = list(rng.permutation(classes))
    out = []
    while len(out) < n:
        for c in order:
            if pools[c] and len(out) < n:
                out.append(int(pools[c].pop()))
    return out


def text_windows(tokenizer, corpus_text: str, n_windows: int, seq_len: int,
                 rng: np.random.Generator) -> list[dict[str, torch.Tensor]]:
    """n_windows disjoint windows of seq_len tokens, chosen at random from the
    corpus's first PPL_SKIP_TOKENS tokens (the part perplexity never reads)."""
    from ..eval.harness import PPL_SKIP_TOKENS

    ids = tokenizer(corpus_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = ids[:PPL_SKIP_TOKENS]
    available = ids.numel() // seq_len
    if available < n_windows:
        raise ValueError(f"the calibration part of the corpus ({ids.numel():,} tokens, before "
                         f"the {PPL_SKIP_TOKENS:,} held out for perplexity) holds {available} "
                         f"windows of {seq_len} tokens; {n_windows} requested")
    picks = np.sort(rng.choice(available, size=n_windows, replace=False))
    out = []
    for w in picks:
        window = ids[int(w) * seq_len:(int(w) + 1) * seq_len].unsqueeze(0)
        out.append({"input_ids": window, "attention_mask": torch.ones_like(window)})
    return out


def image_count(n_samples: int, alpha: float) -> int:
    """round(alpha * n_samples), half up: the image samples of a mixed set,
    after checking both numbers."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) \
            or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (the fraction of image samples) must lie in [0, 1], "
                         f"got {alpha!r}")
    return int(math.floor(alpha * n_samples + 0.5))


ALPHA_OF = ("samples", "tokens")


def check_alpha_of(alpha_of: str) -> None:
    if alpha_of not in ALPHA_OF:
        raise ValueError(f"alpha_of must be one of {ALPHA_OF}, got {alpha_of!r}")


def token_mix(image_samples, n_samples: int, alpha: float, seq_len: int
              ) -> tuple[list[dict], int]:
    """The token-ratio mix of LUQ's mixed-modal calibration: of a budget of
    n_samples * seq_len tokens, a fraction alpha in image samples and the
    rest in text windows of seq_len tokens.

    Every token of an image sample counts as a multimodal token (its image
    placeholders and its question and answer text). Image samples are taken
    in order from the iterable ``image_samples`` while each brings their
    token count nearer alpha * budget (at least one when alpha > 0); returns
    (those samples, the number of text windows, round((1 - alpha) * budget /
    seq_len)). Warns when image samples much longer than the budget's share
    leave the mix far from alpha."""
    image_count(n_samples, alpha)            # checks both numbers
    if seq_len < 1:
        raise ValueError(f"text_seq_len must be positive, got {seq_len}")
    budget = n_samples * seq_len
    target = alpha * budget
    images, tokens = [], 0
    if alpha > 0:
        for sample in image_samples:
            length = sample["input_ids"].numel()
            if images and tokens + length / 2 > target:
                break
            images.append(sample)
            tokens += length
        else:
            if tokens + 0.5 < target:
                raise ValueError(f"the image samples ran out at {tokens} tokens, short of "
                                 f"{target:.0f} (alpha {alpha} of {budget} tokens)")
    n_text = math.floor((1 - alpha) * budget / seq_len + 0.5)
    total = tokens + n_text * seq_len
    if total and abs(tokens / total - alpha) > 0.1:
        warnings.warn(f"mixed calibration: image samples hold {tokens / total:.0%} of the "
                      f"{total} tokens, asked for {alpha:.0%} (an image sample holds "
                      f"{tokens // max(len(images), 1)} tokens; raise the sample count or "
                      f"seq_len)", stacklevel=3)
    return images, n_text


def _digit_conversations(processor, rng: np.random.Generator, projector_path=None):
    """Digit conversations one at a time, every training digit once, balanced
    over the classes."""
    from ..minivlm.train_projector import ANSWER, QUESTIONS

    _check_processor(processor)
    images, labels, train = training_digit_indices(projector_path)
    for row in _balanced_pick(train, labels, len(train), rng):
        question = QUESTIONS[int(rng.integers(0, len(QUESTIONS)))]
        yield image_text_samples(processor, [images[row]], [question],
                                 [ANSWER.format(int(labels[row]))])[0]


def mixed_calibration_samples(processor, n_samples: int, alpha: float, seed: int = 0,
                              text_seq_len: int = 256, corpus_text: str | None = None,
                              projector_path=None, alpha_of: str = "samples"
                              ) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` calibration batches: round(alpha * n_samples) digit
    conversations (training digits, balanced over classes, questions and
    answer wording as the projector was trained) and the rest Lee-corpus
    windows of ``text_seq_len`` tokens, shuffled together. Deterministic in
    ``seed``.

    corpus_text: text to cut windows from (default the Lee corpus bundled
    with gensim); only its first PPL_SKIP_TOKENS tokens are used.
    alpha_of="tokens": alpha is a fraction of tokens, as in LUQ's paper
    (``token_mix``: n_samples * text_seq_len tokens in all, conversations
    taken until they hold about alpha of them).
    """
    check_alpha_of(alpha_of)
    n_image = image_count(n_samples, alpha)
    if text_seq_len < 1:
        raise ValueError(f"text_seq_len must be positive, got {text_seq_len}")
    from ..minivlm.train_projector import ANSWER, QUESTIONS

    n_text = n_samples - n_image
    rng = np.random.default_rng(seed)
    samples = []
    if alpha_of == "tokens":
        conversations = _digit_conversations(processor, rng, projector_path) if alpha else ()
        samples, n_text = token_mix(conversations, n_samples, alpha, text_seq_len)
    elif n_image:
        _check_processor(processor)
        images, labels, train = training_digit_indices(projector_path)
        if n_image > len(train):
            raise ValueError(f"{n_image} image samples requested, only {len(train)} "
                             f"training digits exist")
        rows = _balanced_pick(train, labels, n_image, rng)
        questions = [QUESTIONS[int(q)] for q in rng.integers(0, len(QUESTIONS), n_image)]
        answers = [ANSWER.format(int(labels[r])) for r in rows]
        samples += image_text_samples(processor, [images[r] for r in rows], questions, answers)
    if n_text:
        if corpus_text is None:
            from ..minivlm.assets import lee_corpus_path
            corpus_text = lee_corpus_path().read_text(encoding="utf-8")
        samples += text_windows(processor.tokenizer, corpus_text, n_text, text_seq_len, rng)
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]
