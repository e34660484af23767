"""Calibration samples from text: contiguous token windows of a corpus."""
from __future__ import annotations

import torch


def text_samples(tokenizer, text: str, n_samples: int, seq_len: int,
                 batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` windows of ``seq_len`` tokens taken in order from ``text``,
    grouped into batches of ``batch_size`` (dicts with input_ids and attention_mask).
    Windows are disjoint, so the same text never counts twice."""
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError("n_samples, seq_len and batch_size must be positive")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seq_len
    if available < n_samples:
        raise ValueError(f"the text holds {ids.numel():,} tokens: {available} windows of "
                         f"{seq_len}, fewer than the {n_samples} requested")
    windows = ids[: n_samples * seq_len].reshape(n_samples, seq_len)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)}
            for b in windows.split(batch_size)]


def held_out_windows(tokenizer, text: str, skip_tokens: int, n_windows: int,
                     seq_len: int) -> torch.Tensor:
    """[n_windows, seq_len] token windows starting after the first ``skip_tokens``
    (the part used for calibration), for perplexity on unseen text."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    ids = ids[skip_tokens:]
    if ids.numel() < n_windows * seq_len:
        raise ValueError(f"only {ids.numel():,} held-out tokens, need {n_windows * seq_len:,}")
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over ``windows`` [B, T]."""
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
