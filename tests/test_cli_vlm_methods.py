"""``vlmkern quantize --method {vlmq,qvlm,luq}`` end to end on tiny LLaVA and
Qwen2-VL folders saved by transformers: the VLM loads through the image-text
auto class, its language model is calibrated on text windows, the checkpoint
reloads into a fresh model and answers a multimodal input."""
from __future__ import annotations

import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import TEXT, build_llava, build_qwen2vl  # noqa: E402

import vlmkern  # noqa: E402
from vlmkern.cli import main  # noqa: E402
from vlmkern.io import read_plan  # noqa: E402

BUILDERS = {"llava": build_llava, "qwen2vl": build_qwen2vl}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm_folder(request, tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp(request.param)
    vocab = {f"w{i}": i for i in range(TEXT["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    model, inputs = BUILDERS[request.param]()
    model.save_pretrained(folder)
    rng = random.Random(0)
    text = folder / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 100)}" for _ in range(2000)))
    return request.param, folder, text, inputs


METHOD_ARGS = {
    "vlmq": ["--bits", "4", "--group-size", "32"],
    "qvlm": ["--act-bits", "8", "--group-size", "row", "--qvlm-max-depth", "2"],
    "luq": ["--group-size", "32", "--luq-k", "4", "--n-low", "1"],
}
EXPECTED_FORMATS = {"vlmq": {"groupwise"}, "qvlm": {"intact"}, "luq": {"groupwise", "binary"}}


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_vlm_method_through_the_cli(vlm_folder, method, tmp_path, capsys):
    arch, folder, text, inputs = vlm_folder
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(folder), "--method", method,
                 "--calib-text", str(text), "--samples", "2", "--seq-len", "32",
                 "--device", "cpu", "--out", str(out), *METHOD_ARGS[method]])
    assert code == 0
    assert "saved" in capsys.readouterr().out
    plan = read_plan(out)
    formats = {e.format for e in plan.entries.values()}
    assert formats == EXPECTED_FORMATS[method]
    assert {e.method for e in plan.entries.values()} <= {method, "billm", "gptq"}
    fresh = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    reference = copy.deepcopy(fresh)
    vlmkern.load_quantized(fresh, out)
    quantized = [n for n, m in fresh.named_modules() if isinstance(m, vlmkern.QuantLinear)]
    assert quantized and all("language_model" in n for n in quantized)
    with torch.no_grad():
        logits = fresh(**inputs).logits
        ref = reference(**inputs).logits
    assert torch.isfinite(logits).all()
    # quantized, so not identical, but still the same function (one binarized
    # layer of two, LUQ's worst case here, keeps the cosine near 0.97)
    assert not torch.equal(logits, ref)
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0)
    assert cos > 0.9, (arch, method, float(cos))


def test_vision_optimisation_needs_image_samples(vlm_folder, capsys):
    arch, folder, text, inputs = vlm_folder
    assert main(["quantize", "--model", str(folder), "--method", "qvlm", "--act-bits", "8",
                 "--qvlm-vision", "--calib-text", str(text), "--samples", "2", "--seq-len", "16",
                 "--device", "cpu"]) == 2
    assert "images" in capsys.readouterr().err


def test_qvlm_work_dir_through_the_cli(vlm_folder, tmp_path, capsys):
    from safetensors.torch import load_file

    arch, folder, text, inputs = vlm_folder
    args = ["quantize", "--model", str(folder), "--method", "qvlm", "--act-bits", "6",
            "--group-size", "row", "--calib-text", str(text), "--samples", "2",
            "--seq-len", "16", "--device", "cpu", "--work-dir", str(tmp_path / "work")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "work").glob("block_*.json"))
    assert main(args + ["--out", str(tmp_path / "b")]) == 0       # resumed: every block saved
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# Image calibration data for a VLM folder with a processor
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava_with_processor(tmp_path_factory):
    from tiny_models import llava_processor

    folder = tmp_path_factory.mktemp("llava_proc")
    model, inputs = build_llava()
    model.save_pretrained(folder)
    llava_processor().save_pretrained(folder)
    rng = random.Random(1)
    text = folder / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 100)}" for _ in range(3000)))
    return folder, text, inputs


def test_hf_mixed_samples_through_the_folder_processor(llava_with_processor):
    from tiny_models import IMAGE_TOKEN

    from vlmkern.calib.cli import load_processor
    from vlmkern.calib.hf_mixed import hf_mixed_calibration_samples

    folder, text, _ = llava_with_processor
    processor = load_processor(str(folder))
    corpus = text.read_text()
    samples = hf_mixed_calibration_samples(processor, 6, 0.5, seed=3, text_seq_len=16,
                                           corpus_text=corpus)
    images = [s for s in samples if "pixel_values" in s]
    assert len(samples) == 6 and len(images) == 3
    for s in images:
        assert s["pixel_values"].shape == (1, 3, 32, 32)
        assert int((s["input_ids"] == IMAGE_TOKEN).sum()) == 16
    assert all(s["input_ids"].shape == (1, 16) for s in samples if "pixel_values" not in s)
    again = hf_mixed_calibration_samples(processor, 6, 0.5, seed=3, text_seq_len=16,
                                         corpus_text=corpus)
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
               for a, b in zip(samples, again))
    # the crops differ from sample to sample
    assert not torch.equal(images[0]["pixel_values"], images[1]["pixel_values"])
    with pytest.raises(ValueError, match="alpha"):
        hf_mixed_calibration_samples(processor, 4, 1.5)
    # alpha as a fraction of 6 x 16 tokens: image samples until they hold about half
    by_tokens = hf_mixed_calibration_samples(processor, 6, 0.5, seed=3, text_seq_len=16,
                                             corpus_text=corpus, alpha_of="tokens")
    images = [s for s in by_tokens if "pixel_values" in s]
    held = sum(s["input_ids"].numel() for s in images)
    assert abs(held - 48) <= max(s["input_ids"].numel() for s in images) / 2
    assert sum("pixel_values" not in s for s in by_tokens) == 3


@pytest.mark.parametrize("method, extra", [
    ("vlmq", ["--bits", "4", "--group-size", "32"]),
    ("qvlm", ["--act-bits", "8", "--group-size", "row", "--qvlm-vision",
              "--qvlm-vision-epochs", "1"])])
def test_vlm_folder_calibrates_on_images_through_the_cli(llava_with_processor, tmp_path,
                                                         method, extra):
    folder, text, inputs = llava_with_processor
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(folder), "--method", method, "--calib-text",
                 str(text), "--calib-samples", "4", "--calib-alpha", "0.5", "--seq-len", "16",
                 "--device", "cpu", "--out", str(out), *extra])
    assert code == 0
    fresh = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    vlmkern.load_quantized(fresh, out)
    vision = [n for n, m in fresh.named_modules()
              if isinstance(m, vlmkern.QuantLinear) and "vision_tower" in n]
    assert bool(vision) == (method == "qvlm")
    with torch.no_grad():
        assert torch.isfinite(fresh(**inputs).logits).all()
