"""Checkpoints and models that load_quantized must refuse: crafted plan
entries naming modules to import, aliases over stored tensors, non-finite or
non-float full-precision tensors, deeply nested JSON, malformed module
entries, bad versions, meta-device models and non-modules."""
from __future__ import annotations

import importlib
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from test_io import _expect_error, logits, quantized, rewrite
from tiny_models import TEXT, build_llama, build_qwen2

from vlmkern import QuantConfig, load_quantized, replace_linears, save_quantized
from vlmkern.io import CheckpointError, read_plan

Q0 = "model.layers.0.self_attn.q_proj"          # W4 g32, 64 x 64
V0 = "model.layers.0.self_attn.v_proj"          # W8A8 (integer activations)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, inputs = quantized("llama")
    path = save_quantized(model, tmp_path_factory.mktemp("ckpt") / "llama")
    return path, model, inputs


def _bad(ckpt, tmp_path, edit_config=None, edit_tensors=None):
    return rewrite(ckpt[0], tmp_path / "bad.safetensors", edit_config=edit_config,
                   edit_tensors=edit_tensors)


# ---------------------------------------------------------------------------
# Nothing in a file makes vlmkern import a module
# ---------------------------------------------------------------------------

def test_plan_config_cannot_import_a_module(ckpt, tmp_path, monkeypatch):
    # vlmkern.__main__ runs the CLI when executed; naming it in a plan must
    # neither import it nor end the caller's process.
    monkeypatch.delitem(sys.modules, "vlmkern.__main__", raising=False)
    monkeypatch.setattr(sys, "argv", ["vlmkern"])

    def edit(config):
        entry = config["plan"]["modules"][Q0]
        entry["config"] = {"type": "Anything", "module": "vlmkern.__main__"}

    bad = _bad(ckpt, tmp_path, edit_config=edit)
    err = _expect_error(bad, "unknown method config type 'Anything'")
    assert Q0 in str(err)
    with pytest.raises(CheckpointError, match="unknown method config type"):
        read_plan(bad)
    assert "vlmkern.__main__" not in sys.modules


def test_importing_the_main_module_does_not_run_the_cli(monkeypatch):
    monkeypatch.delitem(sys.modules, "vlmkern.__main__", raising=False)
    monkeypatch.setattr(sys, "argv", ["vlmkern"])
    importlib.import_module("vlmkern.__main__")         # no SystemExit
    done = subprocess.run([sys.executable, "-m", "vlmkern", "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "usage: vlmkern" in done.stdout


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------

def test_alias_over_a_stored_tensor_is_rejected(ckpt, tmp_path):
    target = f"{Q0}.scales"
    bad = _bad(ckpt, tmp_path, edit_config=lambda c: c.update(
        aliases={target: "model.layers.1.self_attn.q_proj.scales"}))
    err = _expect_error(bad, "names a tensor the file holds")
    assert target in str(err)


@pytest.mark.parametrize("name, value, match", [
    ("model.norm.weight", float("inf"), "NaN or Inf"),
    ("model.embed_tokens.weight", float("nan"), "NaN or Inf"),
    ("model.layers.1.input_layernorm.weight", -float("inf"), "NaN or Inf"),
    ("model.embed_tokens.weight", torch.int32, "dtype torch.int32"),
    ("model.norm.weight", torch.bool, "dtype torch.bool"),
], ids=["norm-inf", "embed-nan", "layernorm-neg-inf", "embed-int32", "norm-bool"])
def test_bad_full_precision_tensors_are_rejected(ckpt, tmp_path, name, value, match):
    def edit(tensors):
        if isinstance(value, torch.dtype):
            tensors[name] = (tensors[name] * 100).to(value)
        else:
            tensors[name][0] = value

    err = _expect_error(_bad(ckpt, tmp_path, edit_tensors=edit), match)
    assert name in str(err)


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    model, _ = quantized("qwen2", {"*": QuantConfig(4, 32)})
    return save_quantized(model, tmp_path_factory.mktemp("qwen") / "qwen")


K0_BIAS = "model.layers.0.self_attn.k_proj.bias"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t[K0_BIAS].__setitem__(1, float("nan")), "NaN or Inf"),
    (lambda t: t.update({K0_BIAS: t[K0_BIAS].to(torch.int64)}), "dtype torch.int64"),
    (lambda t: t.update({K0_BIAS: t[K0_BIAS] > 0}), "dtype torch.bool"),
    (lambda t: t.update({K0_BIAS: t[K0_BIAS][:-1].contiguous()}), "shape"),
], ids=["nan", "int64", "bool", "short"])
def test_bad_bias_of_a_quantized_module_is_rejected(qwen_ckpt, tmp_path, edit, match):
    bad = rewrite(qwen_ckpt, tmp_path / "bad.safetensors", edit_tensors=edit)
    err = _expect_error(bad, match, model=build_qwen2(seed=1)[0])
    assert "k_proj" in str(err) and "bias" in str(err)


def test_float_tensors_of_another_precision_still_load(ckpt, tmp_path):
    _, model, inputs = ckpt

    def edit(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].double()
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].half()

    fresh = load_quantized(build_llama(seed=1)[0], _bad(ckpt, tmp_path, edit_tensors=edit))
    assert fresh.model.norm.weight.dtype == torch.float32
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)
    assert torch.isfinite(logits(fresh, inputs)).all()


def test_values_beyond_the_models_dtype_are_rejected(ckpt, qwen_ckpt, tmp_path):
    def big(name):
        return lambda tensors: tensors[name].__setitem__(0, 1e5)

    for name, path, build in (("model.norm.weight", ckpt[0], build_llama),
                              (K0_BIAS, qwen_ckpt, build_qwen2)):
        bad = rewrite(path, tmp_path / "big.safetensors", edit_tensors=big(name))
        load_quantized(build(seed=1)[0], bad)                  # fine in fp32
        with pytest.raises(CheckpointError, match=f"{name}.*beyond the range.*float16"):
            load_quantized(build(seed=1)[0].half(), bad)


def test_a_tied_weight_put_on_a_quantized_layer_is_named_at_save(tmp_path):
    model, inputs = build_llama(tie_word_embeddings=True)
    replace_linears(model, QuantConfig(4, 32), skip=(), progress=False)
    model.tie_weights()         # transformers ties lm_head to the embeddings again
    with pytest.raises(ValueError, match=r"lm_head is quantized but also holds \['weight'\]"):
        save_quantized(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    del model.lm_head.weight    # what the message says: unused by the quantized layer
    fresh = load_quantized(build_llama(seed=1, tie_word_embeddings=True)[0],
                           save_quantized(model, tmp_path))
    assert torch.equal(logits(fresh, inputs), logits(model, inputs))


def test_a_refused_file_leaves_the_model_as_it_was(ckpt):
    # the file's modules fit the model's first two layers; the third has no tensors
    model, inputs = build_llama(seed=1, num_hidden_layers=3)
    before = {n: type(m) for n, m in model.named_modules()}
    expected = logits(model, inputs)
    with pytest.raises(CheckpointError, match="does not match this model"):
        load_quantized(model, ckpt[0])
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert torch.equal(logits(model, inputs), expected)


def test_an_unreadable_file_is_named_as_such(ckpt, monkeypatch):
    real_open = open

    def refuse(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(CheckpointError, match="cannot be read: Permission denied"):
        load_quantized(build_llama(seed=1)[0], ckpt[0])


# ---------------------------------------------------------------------------
# quantization_config fields
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", [0, -5, True, False, None, 1.0])
def test_format_version_must_be_a_supported_int(ckpt, tmp_path, version):
    bad = _bad(ckpt, tmp_path, edit_config=lambda c: c.update(format_version=version))
    _expect_error(bad, f"format_version {version!r}")


@pytest.mark.parametrize("field, value", [
    ("in_features", 64.7), ("in_features", 64.0), ("out_features", 64.0),
    ("in_features", True), ("out_features", "64")])
def test_module_sizes_must_be_ints(ckpt, tmp_path, field, value):
    bad = _bad(ckpt, tmp_path, edit_config=lambda c: c["modules"][Q0].update({field: value}))
    err = _expect_error(bad, "malformed entry for module")
    assert Q0 in str(err)


@pytest.mark.parametrize("info", ["x", ["rtn"], 3])
def test_module_info_must_be_an_object(ckpt, tmp_path, info):
    bad = _bad(ckpt, tmp_path, edit_config=lambda c: c["modules"][Q0].update(info=info))
    err = _expect_error(bad, r"'info' must be an object")
    assert Q0 in str(err)
    # read_plan of a checkpoint without a recorded plan reads the method from info.
    old = rewrite(bad, tmp_path / "old.safetensors", edit_config=lambda c: c.pop("plan"))
    with pytest.raises(CheckpointError, match=f"{Q0}.*'info' must be an object"):
        read_plan(old)


def test_int_activation_scale_of_the_wrong_kind(ckpt, tmp_path):
    bad = _bad(ckpt, tmp_path,
               edit_config=lambda c: c["modules"][V0]["meta"].update(act_scale="x"))
    _expect_error(bad, f"module '{V0}'")


# ---------------------------------------------------------------------------
# Deeply nested JSON
# ---------------------------------------------------------------------------

def test_deeply_nested_quantization_config(ckpt, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    bad = rewrite(ckpt[0], tmp_path / "bad.safetensors",
                  raw_metadata={"quantization_config": deep})
    _expect_error(bad, "quantization_config is not valid JSON")


def test_deeply_nested_safetensors_header(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    bad = tmp_path / "deep.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    _expect_error(bad, "corrupt safetensors header")


# ---------------------------------------------------------------------------
# Models load_quantized cannot fill
# ---------------------------------------------------------------------------

def test_meta_device_model_is_rejected(ckpt):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**TEXT)).eval()
    _expect_error(ckpt[0], "meta device", model=model)
    with pytest.raises(CheckpointError, match="meta device"):
        load_quantized(build_llama(seed=1)[0], ckpt[0], device="meta")


def test_saving_a_meta_model_is_refused_before_any_file(tmp_path):
    model, _ = build_llama()
    replace_linears(model, QuantConfig(4, 32), progress=False)
    model.to("meta")
    with pytest.raises(ValueError, match="cannot save: .* is on the meta device"):
        save_quantized(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", [object(), None, {"model.norm.weight": torch.ones(64)}],
                         ids=["object", "None", "state-dict"])
def test_non_module_is_a_type_error(ckpt, model):
    with pytest.raises(TypeError, match="nn.Module"):
        load_quantized(model, ckpt[0])
