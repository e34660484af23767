"""Mixed-modal calibration data (vlmkern.calib.mixed). Needs the mini VLM's
tokenizer and the digits (skipped without the asset wheels / scikit-learn);
never builds the model itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from vlmkern.minivlm import assets  # noqa: E402

try:
    assets.lee_corpus_path()
    _ready = assets.assets_available()
except assets.AssetMissingError:
    _ready = False
if not _ready:
    pytest.skip("mini VLM assets or the Lee corpus (gensim) not installed",
                allow_module_level=True)

from vlmkern.calib import mixed  # noqa: E402
from vlmkern.eval.harness import PPL_SKIP_TOKENS, heldout_digits  # noqa: E402
from vlmkern.minivlm.model import MiniVLMProcessor  # noqa: E402
from vlmkern.minivlm.train_projector import ANSWER, QUESTIONS  # noqa: E402


@pytest.fixture(scope="module")
def processor():
    return MiniVLMProcessor(assets.load_smollm2_tokenizer())


@pytest.fixture(scope="module")
def corpus_ids(processor):
    text = assets.lee_corpus_path().read_text(encoding="utf-8")
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _is_image(sample):
    return "pixel_values" in sample


def _spy_images(monkeypatch):
    """Record the images and answers mixed_calibration_samples renders."""
    seen = []
    real = mixed.image_text_samples

    def spy(processor, images, questions, answers):
        out = real(processor, images, questions, answers)
        seen.extend(zip(images, questions, answers, out))
        return out

    monkeypatch.setattr(mixed, "image_text_samples", spy)
    return seen


@pytest.mark.parametrize("n, alpha, n_image", [(5, 0.0, 0), (3, 1.0, 3), (7, 0.5, 4),
                                               (32, 0.5, 16), (10, 0.25, 3)])
def test_counts(processor, n, alpha, n_image):
    samples = mixed.mixed_calibration_samples(processor, n, alpha, text_seq_len=64)
    assert len(samples) == n
    assert sum(map(_is_image, samples)) == n_image
    for s in samples:
        assert s["input_ids"].shape[0] == 1 and s["input_ids"].dtype == torch.long
        assert torch.equal(s["attention_mask"], torch.ones_like(s["input_ids"]))
        if _is_image(s):
            assert set(s) == {"input_ids", "attention_mask", "pixel_values"}
            assert s["pixel_values"].shape == (1, 3, processor.image_size, processor.image_size)
        else:
            assert set(s) == {"input_ids", "attention_mask"}
            assert s["input_ids"].shape == (1, 64)


def test_image_samples_are_training_digits_with_their_labels(processor, monkeypatch):
    seen = _spy_images(monkeypatch)
    samples = mixed.mixed_calibration_samples(processor, 40, 1.0, seed=3)
    assert len(seen) == 40
    images, labels, heldout = heldout_digits()
    flat = images.reshape(len(images), -1)
    held = set(int(i) for i in heldout)
    image_id = processor.image_token_id
    digits = []
    for image, question, answer, sample in seen:
        matches = np.flatnonzero((flat == np.asarray(image).reshape(-1)).all(1))
        assert len(matches) >= 1
        # no held-out digit, not even one with identical pixels
        assert not held & set(matches.tolist())
        label = int(labels[matches[0]])
        digits.append(label)
        assert question in QUESTIONS
        assert answer == ANSWER.format(label)
        ids = sample["input_ids"][0]
        assert int((ids == image_id).sum()) == processor.num_image_tokens
        assert torch.equal(sample["pixel_values"], processor.preprocess_images([image]))
    # balanced over the ten classes
    assert np.bincount(digits, minlength=10).tolist() == [4] * 10
    assert sum(map(_is_image, samples)) == 40


def test_conversation_extends_the_inference_prompt(processor):
    img = np.full((8, 8), 255, dtype=np.uint8)
    (sample,) = mixed.image_text_samples(processor, [img], ["What digit is this?"], ["It is 3."])
    tok = processor.tokenizer
    prompt = tok(processor.prompt("What digit is this?"), add_special_tokens=False)["input_ids"]
    ids = sample["input_ids"][0].tolist()
    assert ids[:len(prompt)] == prompt
    tail = tok.decode(ids[len(prompt):])
    assert tail.startswith("It is 3." + tok.eos_token)


def test_text_windows_come_from_the_calibration_part(processor, corpus_ids):
    samples = mixed.mixed_calibration_samples(processor, 6, 0.0, seed=1, text_seq_len=128)
    head = torch.tensor(corpus_ids[:PPL_SKIP_TOKENS])
    starts = []
    for s in samples:
        w = s["input_ids"][0]
        # an aligned, disjoint window of the first PPL_SKIP_TOKENS tokens
        hits = [k for k in range(PPL_SKIP_TOKENS // 128) if torch.equal(head[k * 128:(k + 1) * 128], w)]
        assert len(hits) == 1
        starts.append(hits[0])
    assert len(set(starts)) == 6


def test_deterministic_in_seed(processor):
    a = mixed.mixed_calibration_samples(processor, 6, 0.5, seed=7, text_seq_len=32)
    b = mixed.mixed_calibration_samples(processor, 6, 0.5, seed=7, text_seq_len=32)
    c = mixed.mixed_calibration_samples(processor, 6, 0.5, seed=8, text_seq_len=32)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    def key(samples):
        return [tuple(s["input_ids"][0].tolist()) + (_is_image(s),) for s in samples]
    assert key(a) != key(c)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_alpha_outside_unit_interval(processor, alpha):
    with pytest.raises(ValueError, match="alpha"):
        mixed.mixed_calibration_samples(processor, 4, alpha)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_sample_count(processor, n):
    with pytest.raises(ValueError, match="n_samples"):
        mixed.mixed_calibration_samples(processor, n, 0.5)


def test_too_few_tokens_or_images(processor):
    # the first 64 x 256 tokens hold exactly 64 windows of 256
    assert len(mixed.mixed_calibration_samples(processor, 64, 0.0)) == 64
    with pytest.raises(ValueError, match="65 requested"):
        mixed.mixed_calibration_samples(processor, 65, 0.0)
    with pytest.raises(ValueError, match="windows of 16"):
        mixed.mixed_calibration_samples(processor, 3, 0.0, text_seq_len=16,
                                        corpus_text="only a few words")
    with pytest.raises(ValueError, match="training digits"):
        mixed.mixed_calibration_samples(processor, 5000, 1.0)


def test_image_text_samples_rejects_bad_input(processor):
    img = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="one of each"):
        mixed.image_text_samples(processor, [img, img], ["q"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        mixed.image_text_samples(processor, [], [], [])
    with pytest.raises(ValueError, match="image tokens"):
        mixed.image_text_samples(processor, [img], ["what is " + processor.image_token], ["a"])
    with pytest.raises(TypeError, match="MiniVLMProcessor"):
        mixed.image_text_samples(processor.tokenizer, [img], ["q"], ["a"])


def _quantize_args(*argv):
    import argparse

    from vlmkern.calib.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--model", "minivlm", *argv])


def test_quantize_cli_builds_mixed_data_for_minivlm(processor, capsys):
    from vlmkern.calib.cli import calibration_data

    text = assets.lee_corpus_path().read_text(encoding="utf-8")
    args = _quantize_args("--calib-samples", "4", "--calib-alpha", "0.75", "--seq-len", "32")
    samples = calibration_data(args, processor, text)
    assert len(samples) == 4 and sum(map(_is_image, samples)) == 3
    # --samples is the count when --calib-samples is absent; alpha defaults to 0.5
    samples = calibration_data(_quantize_args("--samples", "6", "--seq-len", "32"), processor,
                               text)
    assert len(samples) == 6 and sum(map(_is_image, samples)) == 3
    with pytest.raises(SystemExit):     # a usage error, before any data is built
        _quantize_args("--calib-alpha", "2")
    assert "--calib-alpha: expected a number in [0, 1]" in capsys.readouterr().err


def test_quantize_cli_mixed_options_need_a_vlm(processor, tmp_path):
    from vlmkern.calib.cli import calibration_data

    args = _quantize_args("--calib-alpha", "0.5")
    args.model = "smollm2"
    with pytest.raises(SystemExit, match="minivlm or a VLM folder"):
        calibration_data(args, processor.tokenizer, "some text")
    processor.tokenizer.save_pretrained(tmp_path)     # a folder with a tokenizer only
    args.model = str(tmp_path)
    with pytest.raises(SystemExit, match="processor"):
        calibration_data(args, processor.tokenizer, "some text")


def test_quantize_cli_alpha_zero_is_text_only_for_any_model(processor):
    from vlmkern.calib.cli import calibration_data

    args = _quantize_args("--calib-alpha", "0", "--calib-samples", "3", "--seq-len", "16")
    args.model = "smollm2"       # a text model: no processor is looked for
    text = " ".join(["a few words of calibration text"] * 200)
    samples = calibration_data(args, processor.tokenizer, text)
    assert len(samples) == 3 and not any(map(_is_image, samples))
    assert all(s["input_ids"].shape[-1] == 16 for s in samples)


# -- alpha as a fraction of tokens (LUQ's mixed-modal calibration) --------------------------
def _tokens(samples):
    return sum(s["input_ids"].numel() for s in samples)


def test_token_mix_takes_image_samples_nearest_the_token_share():
    fake = [{"input_ids": torch.zeros(1, 10)}] * 50
    images, n_text = mixed.token_mix(iter(fake), 4, 0.3, 25)       # 100 tokens, 30 of images
    assert len(images) == 3 and n_text == 3                       # 70 / 25 = 2.8 windows
    images, n_text = mixed.token_mix(iter(fake), 4, 0.34, 25)      # 34: 3 samples (30) is nearer
    assert len(images) == 3 and n_text == 3
    images, n_text = mixed.token_mix(iter(fake), 4, 0.36, 25)      # 36: 4 samples (40) is nearer
    assert len(images) == 4
    images, _ = mixed.token_mix(iter(fake), 4, 0.01, 25)           # asked for images: one at least
    assert len(images) == 1
    images, n_text = mixed.token_mix(iter(fake), 4, 0.0, 25)
    assert images == [] and n_text == 4
    long = [{"input_ids": torch.zeros(1, 600)}]
    with pytest.warns(UserWarning, match="image samples hold 97% of the 616 tokens"):
        images, n_text = mixed.token_mix(iter(long), 2, 0.5, 16)
    assert len(images) == 1 and n_text == 1
    with pytest.raises(ValueError, match="ran out at 20 tokens"):
        mixed.token_mix(iter(fake[:2]), 4, 0.5, 25)
    with pytest.raises(ValueError, match="alpha"):
        mixed.token_mix(iter(fake), 4, 1.5, 25)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_alpha_of_tokens_splits_the_token_budget(processor, alpha):
    samples = mixed.mixed_calibration_samples(processor, 8, alpha, text_seq_len=64,
                                              alpha_of="tokens")
    images = [s for s in samples if _is_image(s)]
    texts = [s for s in samples if not _is_image(s)]
    longest = max(s["input_ids"].numel() for s in images)
    assert abs(_tokens(images) - alpha * 8 * 64) <= longest / 2
    assert len(texts) == round((1 - alpha) * 8) and all(s["input_ids"].shape == (1, 64)
                                                        for s in texts)


def test_alpha_of_tokens_is_deterministic_and_text_only_at_zero(processor):
    a = mixed.mixed_calibration_samples(processor, 6, 0.5, seed=4, text_seq_len=32,
                                        alpha_of="tokens")
    b = mixed.mixed_calibration_samples(processor, 6, 0.5, seed=4, text_seq_len=32,
                                        alpha_of="tokens")
    assert len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k])
                                                                 for k in x)
                                    for x, y in zip(a, b))
    zero = mixed.mixed_calibration_samples(processor, 5, 0.0, text_seq_len=32, alpha_of="tokens")
    same = mixed.mixed_calibration_samples(processor, 5, 0.0, text_seq_len=32)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(zero, same))
    with pytest.raises(ValueError, match="alpha_of"):
        mixed.mixed_calibration_samples(processor, 5, 0.5, alpha_of="words")


def test_quantize_cli_alpha_of_tokens(processor):
    from vlmkern.calib.cli import calibration_data

    text = assets.lee_corpus_path().read_text(encoding="utf-8")
    args = _quantize_args("--calib-samples", "4", "--calib-alpha-of", "tokens", "--seq-len", "64")
    samples = calibration_data(args, processor, text)
    images = [s for s in samples if _is_image(s)]
    assert sum(not _is_image(s) for s in samples) == 2               # half of 4 x 64 tokens
    assert abs(_tokens(images) - 128) <= max(s["input_ids"].numel() for s in images) / 2
