"""Train the mini VLM's projector on scikit-learn's handwritten digits.

    python -m vlmkern.minivlm.train_projector [--align-epochs 10] [--steps 40]

Only the projector learns; DINOv2 and SmolLM2 stay frozen. Each example is
one 8x8 digit (dark ink on white, upscaled to 224 px by the processor).

Two stages, because end-to-end steps are expensive on a CPU (every step
runs the 30-layer language model forward and backward, since gradients must
reach the image positions: ~3-15 s per batch of 16 here) and from a random
projector the first ~500 examples only teach the answer's wording:

1. alignment (seconds, no LM): every projected image token is pulled
   towards the LM's input embedding of the digit's character ("7") by a
   cosine-softmax over the ten digit embeddings, plus an MSE term that keeps
   the tokens at the scale of real embeddings. This is LLaVA's stage-1 idea
   (map vision into the word-embedding space) with one-word captions.
2. instruction tuning (end to end): question such as "What digit is
   this?", answer "It is 7." + <|im_end|>, loss on the answer tokens only.
   The frozen LM runs in bf16 (~3x faster than fp32 on CPUs with
   AVX512-BF16); the projector stays fp32.

The frozen vision features (after 2x2 pooling, i.e. the projector's input)
are computed once and cached. The held-out check uses the shipped fp32 model
end to end (pixels -> greedy generation), so it measures what users get.

A stratified 20% of the digits is held out (fixed seed) and never trained on.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import assets
from .model import PROJECTOR_PATH, build_minivlm, save_projector

QUESTIONS = ("What digit is this?", "Which digit is shown in the image?",
             "What number is written here?", "Read the handwritten digit.")
ANSWER = "It is {}."
DATA_VERSION = "digits-ink-on-white-v1"


def digit_images():
    """(uint8 images (1797, 8, 8), labels (1797,)): ink 0..16 mapped to dark
    on a white background, like writing on paper."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(255.0 - d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64)


def split(labels: np.ndarray, seed: int, test_frac: float = 0.2):
    """Stratified (train indices, held-out indices), both sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def eval_subset(test_idx: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first n held-out digits, balanced over classes where possible."""
    per = {d: [i for i in test_idx if labels[i] == d] for d in range(10)}
    out, k = [], 0
    while len(out) < min(n, len(test_idx)):
        for d in range(10):
            if k < len(per[d]) and len(out) < n:
                out.append(per[d][k])
        k += 1
    return np.array(sorted(out))


@torch.no_grad()
def projector_inputs(model, processor, images, batch: int = 32) -> torch.Tensor:
    """Pooled vision features (N, 64, 384) exactly as the projector receives
    them inside the model, captured with a hook on its pooling step."""
    proj = model.model.multi_modal_projector
    grabbed = []
    hook = proj.register_forward_pre_hook(lambda m, a: grabbed.append(m.pool_features(a[0])))
    try:
        for s in range(0, len(images), batch):
            pixel_values = processor.preprocess_images(list(images[s:s + batch]))
            model.model.get_image_features(pixel_values=pixel_values)
    finally:
        hook.remove()
    return torch.cat(grabbed)


def cached_features(model, processor, images, cache_dir: Path, progress: bool) -> torch.Tensor:
    """projector_inputs for all digits, cached by vision weights + data version."""
    from safetensors.torch import load_file, save_file

    h = hashlib.sha256(DATA_VERSION.encode())
    for t in model.model.vision_tower.state_dict().values():
        h.update(t.detach().contiguous().numpy().tobytes())
    h.update(json.dumps(model.config.minivlm, sort_keys=True).encode())
    path = cache_dir / f"digit_features_{h.hexdigest()[:16]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["features"]
        except Exception:  # unreadable cache file: recompute below
            pass
    assets.say(f"computing DINOv2 features of {len(images)} digits (cached in {path.name})",
               progress)
    start = time.perf_counter()
    feats = torch.cat([projector_inputs(model, processor, images[s:s + 256])
                       for s in range(0, len(images), 256)])
    assets.say(f"features done in {time.perf_counter() - start:.0f} s", progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous()}, str(path))
    return feats


class Batcher:
    """Token ids and answer labels for (digit, question) pairs."""

    def __init__(self, processor):
        self.proc = processor
        tok = processor.tokenizer
        self.prompt_ids = [tok(processor.prompt(q), add_special_tokens=False)["input_ids"]
                           for q in QUESTIONS]
        self.answer_ids = [tok(ANSWER.format(d) + tok.eos_token,
                               add_special_tokens=False)["input_ids"] for d in range(10)]
        self.pad = tok.pad_token_id

    def __call__(self, digits, question_ids):
        seqs = [self.prompt_ids[q] + self.answer_ids[d] for d, q in zip(digits, question_ids)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (seq, q) in enumerate(zip(seqs, question_ids)):
            n, p = len(seq), len(self.prompt_ids[q])
            ids[r, :n] = torch.tensor(seq)
            labels[r, p:n] = ids[r, p:n]
            mask[r, :n] = 1
        return ids, mask, labels


def answer_loss(body, proj, feats, ids, mask, labels, image_token_id, dtype):
    """Mean cross-entropy of the answer tokens with projected image tokens
    scattered into the placeholder positions; also the per-row accuracy of
    the digit token (teacher forced), for monitoring."""
    emb = body.embed_tokens(ids).to(dtype)
    img = proj.project(feats).to(dtype)
    place = ids == image_token_id
    emb = emb.masked_scatter(place.unsqueeze(-1), img.reshape(-1, img.shape[-1]))
    hidden = body(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    sel = target != -100
    # SmolLM2 ties lm_head to the input embeddings
    logits = F.linear(hidden[:, :-1][sel], body.embed_tokens.weight).float()
    loss = F.cross_entropy(logits, target[sel])
    return loss, logits.argmax(-1) == target[sel]


def align(proj, feats, labels, targets, epochs: int, lr: float = 1e-3, batch: int = 64,
          seed: int = 0, progress: bool = True) -> float:
    """Stage 1: pull each projected token towards its digit's word embedding.

    feats: (N, 64, 384) projector inputs; labels: (N,) digits;
    targets: (10, 576) input embeddings of the characters "0".."9".
    Returns the final epoch's mean loss."""
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.as_tensor(labels)
    unit = F.normalize(targets, dim=-1)
    scale = targets.pow(2).sum(-1).mean()
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    start, mean = time.perf_counter(), float("nan")
    for epoch in range(epochs):
        perm, losses = torch.randperm(len(feats), generator=gen), []
        for s in range(0, len(feats), batch):
            b = perm[s:s + batch]
            out, y = proj.project(feats[b]), y_all[b]
            # temperature 1/20: cosines live in [-1, 1], the softmax needs a wider range
            logits = 20.0 * F.normalize(out, dim=-1) @ unit.T
            ce = F.cross_entropy(logits.reshape(-1, 10), y.repeat_interleave(out.shape[1]))
            mse = (out - targets[y][:, None]).pow(2).sum(-1).mean() / scale
            loss = ce + mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        mean = float(np.mean(losses))
        assets.say(f"align epoch {epoch + 1}/{epochs}  loss {mean:.3f}  "
                   f"{time.perf_counter() - start:.0f} s", progress)
    return mean


def train(steps: int = 40, batch: int = 16, lr: float = 1e-3, seed: int = 0,
          eval_n: int = 100, cache_dir=None, out: Path = PROJECTOR_PATH,
          align_epochs: int = 10, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    root = Path(cache_dir) if cache_dir is not None else assets.default_cache_dir()
    model, processor = build_minivlm(root, progress=progress, projector=None)
    images, labels = digit_images()
    train_idx, test_idx = split(labels, seed)

    feats = cached_features(model, processor, images, root, progress)
    proj = model.model.multi_modal_projector
    for p in model.parameters():
        p.requires_grad_(False)
    for p in proj.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()  # training time, excluding the one-off feature extraction
    embed = model.model.language_model.embed_tokens.weight.detach()
    digit_ids = [processor.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    align_loss = align(proj, feats[train_idx], labels[train_idx], embed[digit_ids].clone(),
                       align_epochs, seed=seed, progress=progress)

    dtype = torch.bfloat16
    # the frozen LM runs in a bf16 copy; the projector trains in fp32
    body = copy.deepcopy(model.model.language_model).to(dtype)
    for p in body.parameters():
        p.requires_grad_(False)
    batcher = Batcher(processor)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    order = rng.permutation(train_idx)
    start, pos, hist = time.perf_counter(), 0, []
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(train_idx), 0
        rows = order[pos:pos + batch]
        pos += batch
        qs = rng.integers(0, len(QUESTIONS), size=batch)
        ids, mask, lab = batcher(labels[rows], qs)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, correct = answer_loss(body, proj, feats[rows], ids, mask, lab,
                                    processor.image_token_id, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # answer tokens per row are "It", " is", " ", digit, ".", <|im_end|>: index 3 is the digit
        digit_ok = correct.view(batch, -1)[:, 3].float().mean().item()
        hist.append((loss.item(), digit_ok))
        if progress and (step % 10 == 9 or step == steps - 1):
            recent = hist[-10:]
            assets.say(f"step {step + 1}/{steps}  loss {np.mean([h[0] for h in recent]):.3f}  "
                       f"digit acc (teacher forced) {np.mean([h[1] for h in recent]):.2f}  "
                       f"{time.perf_counter() - start:.0f} s", progress)
    train_secs = time.perf_counter() - t0
    for p in proj.parameters():
        p.requires_grad_(False)
    del body

    result = evaluate(model, processor, images, labels, eval_subset(test_idx, labels, eval_n),
                      progress=progress)
    meta = {"seed": str(seed), "align_epochs": str(align_epochs),
            "align_final_loss": f"{align_loss:.4f}",
            "steps": str(steps), "batch": str(batch), "lr": str(lr),
            "precision": "projector fp32, frozen LM bf16 during training",
            "data": "sklearn load_digits, " + DATA_VERSION,
            "split": f"stratified train_test_split(test_size=0.2, random_state={seed})",
            "n_train": str(len(train_idx)), "n_heldout": str(len(test_idx)),
            "heldout_indices": json.dumps([int(i) for i in test_idx]),
            "eval": f"greedy generation, fp32, first {result['n']} balanced held-out digits",
            "heldout_accuracy": f"{result['accuracy']:.4f}",
            "train_seconds": f"{train_secs:.0f}",
            "final_loss": f"{np.mean([h[0] for h in hist[-10:]]):.4f}"}
    save_projector(model, out, meta)
    assets.say(f"saved {out} ({Path(out).stat().st_size / 1e6:.2f} MB)", progress)
    return {**result, "train_seconds": train_secs, "path": str(out)}


@torch.no_grad()
def evaluate(model, processor, images, labels, rows, batch: int = 20,
             progress: bool = True) -> dict:
    """Greedy VQA accuracy on digits ``rows`` through the full fp32 model."""
    from ..eval.metrics import parse_digit
    start, right, answers = time.perf_counter(), 0, []
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        qs = [QUESTIONS[0]] * len(r)
        outs = processor.answer(model, list(images[r]), qs, max_new_tokens=8)
        for i, text in zip(r, outs):
            answers.append(text)
            right += parse_digit(text) == labels[i]
    acc = right / max(1, len(rows))
    assets.say(f"held-out greedy accuracy {right}/{len(rows)} = {acc:.3f} "
               f"(chance 0.1) in {time.perf_counter() - start:.0f} s; e.g. {answers[:3]}", progress)
    return {"accuracy": acc, "correct": right, "n": len(rows), "answers": answers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--align-epochs", type=int, default=10, help="stage 1 epochs (no LM)")
    ap.add_argument("--steps", type=int, default=40, help="stage 2 end-to-end steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="stage 2 peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=100, help="held-out digits to generate for")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=str(PROJECTOR_PATH))
    ap.add_argument("--eval-only", action="store_true",
                    help="measure the accuracy of the projector at --out without training")
    args = ap.parse_args(argv)
    if args.eval_only:
        model, processor = build_minivlm(args.cache_dir, projector=args.out)
        images, labels = digit_images()
        _, test_idx = split(labels, args.seed)
        evaluate(model, processor, images, labels, eval_subset(test_idx, labels, args.eval_n))
        return 0
    train(args.steps, args.batch, args.lr, args.seed, args.eval_n, args.cache_dir,
          Path(args.out), args.align_epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
