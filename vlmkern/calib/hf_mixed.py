"""Mixed-modal calibration data for any HuggingFace VLM folder with a processor.

The mini VLM has its own labelled digits (vlmkern.calib.mixed); a LLaVA or
Qwen2-VL checkpoint gets real photographs that install offline with
scikit-image and scikit-learn (astronaut, coffee, rocket, the Hubble deep
field, ...), a random crop and flip of one per image sample, and a generic
question, rendered through the folder's own processor and chat template.
The processor expands the image placeholder and returns every tensor the
model's forward needs (pixel_values, image_grid_thw, ...). These images carry
no labels, so an image sample ends at the assistant's turn: the statistics
see the image tokens, the template and the question, not an answer. The text
samples are Lee-corpus windows, as for the mini VLM.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

# scikit-image sample images that ship inside the wheel (the others download)
SKIMAGE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "colorwheel", "camera", "coins", "moon",
                  "page", "text", "brick", "grass", "gravel")
QUESTIONS = ("Describe this image.", "What is shown in this picture?",
             "What are the main colours in this image?", "What could this image be used for?",
             "Describe the objects in the picture and where they are.",
             "Is there any text in this image? What does it say?")


def offline_photos() -> list[np.ndarray]:
    """The bundled photographs as HxWx3 uint8 arrays (grey ones stacked to RGB)."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ImportError("image calibration data needs scikit-image and scikit-learn: "
                          "pip install 'vlmkern[minivlm]'") from exc
    photos = [getattr(skimage.data, name)() for name in SKIMAGE_IMAGES]
    photos += list(load_sample_images().images)
    out = []
    for p in photos:
        p = np.asarray(p)
        if p.ndim == 2:
            p = np.stack([p] * 3, axis=-1)
        out.append(np.ascontiguousarray(p[..., :3]).astype(np.uint8))
    return out


def _crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of 50-100 % of each side, flipped left-right half the time."""
    h, w = photo.shape[:2]
    ch, cw = (max(1, int(s * rng.uniform(0.5, 1.0))) for s in (h, w))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = photo[y:y + ch, x:x + cw]
    return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


def hf_image_samples(processor, n: int, rng: np.random.Generator) -> list[dict]:
    """n image + question samples through ``processor`` (a transformers
    multimodal processor with a chat template). Each is one batch of one."""
    return list(itertools.islice(_image_stream(processor, rng), n))


def _image_stream(processor, rng: np.random.Generator):
    """hf_image_samples' samples, one at a time, without end."""
    if not hasattr(processor, "apply_chat_template") or not hasattr(processor, "tokenizer"):
        raise TypeError(f"{type(processor).__name__} is not a multimodal processor with a "
                        f"chat template")
    photos = offline_photos()
    for i in itertools.count():
        # every photo once, then random ones
        photo = _crop(photos[i] if i < len(photos) else photos[int(rng.integers(len(photos)))],
                      rng)
        question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        try:
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            enc = processor(images=[photo], text=[text], return_tensors="pt")
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{type(processor).__name__} could not render an image "
                             f"conversation: {exc}") from exc
        yield {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def hf_mixed_calibration_samples(processor, n_samples: int, alpha: float, seed: int = 0,
                                 text_seq_len: int = 256, corpus_text: str | None = None,
                                 alpha_of: str = "samples") -> list[dict]:
    """round(alpha * n_samples) image samples and the rest text windows of the
    Lee corpus (its part perplexity never reads), shuffled; deterministic in
    ``seed``. alpha_of="tokens": alpha is a fraction of n_samples *
    text_seq_len tokens, as in LUQ's paper (``mixed.token_mix``)."""
    from .mixed import check_alpha_of, image_count, text_windows, token_mix

    check_alpha_of(alpha_of)
    n_image = image_count(n_samples, alpha)
    n_text = n_samples - n_image
    rng = np.random.default_rng(seed)
    if alpha_of == "tokens":
        stream = _image_stream(processor, rng) if alpha else ()
        samples, n_text = token_mix(stream, n_samples, alpha, text_seq_len)
    else:
        samples = hf_image_samples(processor, n_image, rng) if n_image else []
    if n_text:
        if corpus_text is None:
            from ..minivlm.assets import lee_corpus_path
            corpus_text = lee_corpus_path().read_text(encoding="utf-8")
        samples += text_windows(processor.tokenizer, corpus_text, n_text, text_seq_len, rng)
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]


__all__ = ["offline_photos", "hf_image_samples", "hf_mixed_calibration_samples", "QUESTIONS"]
