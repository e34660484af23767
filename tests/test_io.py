"""Checkpoints: save -> load round trips onto freshly built models, the
quantization_config metadata, rejection of bad files, and atomic writes."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

import vlmkern.io as vio  # noqa: E402
from vlmkern import (BinaryConfig, IntActConfig, QuantConfig, QuantLinear,  # noqa: E402
                     load_quantized, replace_linears, save_quantized)
from vlmkern.formats import FORMAT_VERSION  # noqa: E402
from vlmkern.io import CheckpointError, read_header  # noqa: E402

from tiny_models import IMAGE_TOKEN, TEXT, VOCAB, build_llama, build_llava, build_qwen2  # noqa: E402,F401

BUILDERS = {"llama": build_llama, "qwen2": build_qwen2, "llava": build_llava}

# Weight-only, integer-activation, binary and full-precision modules side by side;
# the LLaVA projector is quantized by exact name (it is skipped by default).
MIXED = {"*.q_proj": QuantConfig(4, 32), "*.k_proj": QuantConfig(3, 64, sym=True),
         "*.v_proj": IntActConfig(8, 8), "*.o_proj": None,
         "*.gate_proj": IntActConfig(4, 4, group_size=32),
         "*.up_proj": BinaryConfig(max_salient=8, quantiles=(0.2, 0.4, 0.6, 0.8)),
         "*.down_proj": QuantConfig(2, None),
         "model.multi_modal_projector.linear_1": QuantConfig(8, 32)}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def quantized(kind="llama", plan=MIXED, seed=0, **kw):
    model, inputs = BUILDERS[kind](seed, **kw)
    plan = {k: v for k, v in plan.items() if "multi_modal" not in k or kind == "llava"}
    replace_linears(model, plan, progress=False)
    return model, inputs


def rewrite(src, dst, edit_tensors=None, edit_config=None, raw_metadata=None):
    """Copy a checkpoint, editing its tensors and/or its quantization_config.
    Edited tensors get matching checksums: a crafted file, consistent in
    itself, whose contents the other checks must judge."""
    tensors = load_file(str(src))
    _, metadata = read_header(src)
    if edit_tensors:
        edit_tensors(tensors)
    if raw_metadata is None:
        config = json.loads(metadata["quantization_config"])
        if edit_tensors:
            config["checksums"] = {k: vio.tensor_checksum(t) for k, t in tensors.items()}
        if edit_config:
            edit_config(config)
        raw_metadata = {"quantization_config": json.dumps(config)}
    save_file(tensors, str(dst), metadata=raw_metadata)
    return dst


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    model, inputs = quantized("llama")
    path = save_quantized(model, tmp_path_factory.mktemp("ckpt") / "llama")
    return path, model, inputs


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2", "llava"])
def test_round_trip_is_bit_exact_on_a_fresh_model(kind, tmp_path):
    model, inputs = quantized(kind)
    expected = logits(model, inputs)
    path = save_quantized(model, tmp_path)
    assert path == tmp_path / "model.safetensors" and path.is_file()

    fresh, _ = BUILDERS[kind](seed=1)
    emb = "model.embed_tokens.weight" if kind != "llava" else \
        "model.language_model.embed_tokens.weight"
    assert not torch.equal(fresh.state_dict()[emb], model.state_dict()[emb])
    assert load_quantized(fresh, tmp_path) is fresh

    for name, module in model.named_modules():
        other = fresh.get_submodule(name)
        assert type(other) is type(module), name
        if isinstance(module, QuantLinear):
            assert other._meta == module._meta and other.quant_info == module.quant_info
            assert other.format == module.format
    sd, fsd = model.state_dict(), fresh.state_dict()
    assert sd.keys() == fsd.keys()
    for k in sd:
        assert fsd[k].dtype == sd[k].dtype and torch.equal(fsd[k], sd[k]), k
    for (n, b), (fn_, fb) in zip(model.named_buffers(), fresh.named_buffers()):
        assert n == fn_ and b.dtype == fb.dtype and torch.equal(b, fb), n
    assert torch.equal(logits(fresh, inputs), expected)


def test_round_trip_metadata(llama_ckpt):
    path, model, _ = llama_ckpt
    header, metadata = read_header(path)
    config = json.loads(metadata["quantization_config"])
    assert config["quant_method"] == "vlmkern" and config["format_version"] == FORMAT_VERSION
    assert isinstance(config["vlmkern_version"], str)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(config["modules"]) == set(quant) and len(quant) == 12
    for name, entry in config["modules"].items():
        m = quant[name]
        assert entry["format"] == m.format and entry["meta"] == m._meta
        assert (entry["in_features"], entry["out_features"]) == (m.in_features, m.out_features)
        assert entry["bias"] is False and entry["info"] == m.quant_info
    assert entry["info"]["method"] in ("rtn", "binarize") and "config" in entry["info"]
    assert sorted(config["skipped"]) == sorted(
        ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"])
    # The header lists exactly the state dict, with its dtypes and shapes.
    sd = model.state_dict()
    assert set(header) == set(sd)
    for k, entry in header.items():
        assert entry["shape"] == list(sd[k].shape)


def test_explicit_file_path_and_folder_path(tmp_path, llama_ckpt):
    _, model, inputs = llama_ckpt
    file = save_quantized(model, tmp_path / "sub" / "w.safetensors")
    assert file == tmp_path / "sub" / "w.safetensors" and file.is_file()
    assert os.listdir(tmp_path / "sub") == ["w.safetensors"]
    fresh, _ = build_llama(seed=2)
    assert torch.equal(logits(load_quantized(fresh, str(file)), inputs), logits(model, inputs))
    folder_file = save_quantized(model, str(tmp_path / "folder"))
    fresh, _ = build_llama(seed=3)
    load_quantized(fresh, tmp_path / "folder")
    assert torch.equal(logits(fresh, inputs), logits(model, inputs))
    assert folder_file.read_bytes() == file.read_bytes()          # deterministic output


def test_separate_embeddings_and_head_do_not_load_into_a_tied_model(tmp_path):
    model, inputs = quantized("llama", {"*": QuantConfig(4, 32)}, tie_word_embeddings=False)
    path = save_quantized(model, tmp_path)
    tied, _ = build_llama(seed=1, tie_word_embeddings=True)
    expected = logits(tied, inputs)
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight and lm_head.weight are "
                                              "one tensor in this model"):
        load_quantized(tied, path)
    assert torch.equal(logits(tied, inputs), expected)       # left as it was
    # equal values under both names are one tied tensor's: they load
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    load_quantized(tied, save_quantized(model, tmp_path / "equal"))
    assert torch.equal(logits(tied, inputs), logits(model, inputs))


@pytest.mark.parametrize("quantize_head", [False, True])
def test_tied_embeddings_survive(tmp_path, quantize_head):
    plan = {"*": QuantConfig(4, 32), **({"lm_head": QuantConfig(8, 32)} if quantize_head else {})}
    model, inputs = quantized("llama", plan, tie_word_embeddings=True)
    if not quantize_head:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = logits(model, inputs)
    path = save_quantized(model, tmp_path)
    header, metadata = read_header(path)
    config = json.loads(metadata["quantization_config"])
    if not quantize_head:
        # The shared tensor is stored once; the other name is an alias.
        assert len({"lm_head.weight", "model.embed_tokens.weight"} & set(header)) == 1
        assert set(config["aliases"].items()) <= {("lm_head.weight", "model.embed_tokens.weight"),
                                                  ("model.embed_tokens.weight", "lm_head.weight")}
        assert len(config["aliases"]) == 1
    fresh, _ = build_llama(seed=1, tie_word_embeddings=True)
    load_quantized(fresh, path)
    emb = fresh.model.embed_tokens.weight
    if quantize_head:
        assert isinstance(fresh.lm_head, QuantLinear)
    else:
        assert fresh.lm_head.weight.data_ptr() == emb.data_ptr()
        assert torch.equal(fresh.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(emb, model.model.embed_tokens.weight)
    assert torch.equal(logits(fresh, inputs), expected)


class _TransposedBuffer(torch.nn.Module):
    """A full-precision buffer and its transpose: one storage, two tensors."""

    def __init__(self):
        super().__init__()
        w = torch.arange(16.0).reshape(4, 4)
        self.register_buffer("w", w)
        self.register_buffer("wt", w.t())
        self.fc = torch.nn.Linear(4, 4)


def test_a_transposed_view_is_not_saved_as_an_alias(tmp_path):
    model, _ = replace_linears(_TransposedBuffer(), QuantConfig(4, 4), progress=False)
    path = save_quantized(model, tmp_path)
    assert json.loads(read_header(path)[1]["quantization_config"])["aliases"] == {}
    fresh = _TransposedBuffer()
    fresh.w.zero_()
    fresh.wt = torch.zeros(4, 4)
    load_quantized(fresh, path)
    assert torch.equal(fresh.w, model.w) and torch.equal(fresh.wt, model.w.t())


def test_load_into_a_model_of_another_dtype(tmp_path):
    model, inputs = quantized("qwen2", {"*.q_proj": QuantConfig(4, 32), "*": IntActConfig(8, 8)})
    path = save_quantized(model, tmp_path)
    fresh, _ = build_qwen2(seed=1)
    fresh.to(torch.bfloat16)
    load_quantized(fresh, path)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            other = fresh.get_submodule(name)
            for b, t in module.named_buffers():      # packed tensors keep their dtype
                assert torch.equal(getattr(other, b), t) and getattr(other, b).dtype == t.dtype
            if module.bias is not None:              # full-precision tensors take the model's
                assert other.bias.dtype == torch.bfloat16
                assert torch.equal(other.bias, module.bias.to(torch.bfloat16))
    assert fresh.model.embed_tokens.weight.dtype == torch.bfloat16
    assert logits(fresh, inputs).dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# Bad files: always a CheckpointError naming the problem
# ---------------------------------------------------------------------------

def _expect_error(path, match, model=None):
    model = model if model is not None else build_llama(seed=1)[0]
    with pytest.raises(CheckpointError, match=match) as e:
        load_quantized(model, path)
    assert isinstance(e.value, ValueError)
    return e.value


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nothing_here", "no checkpoint")
    _expect_error(tmp_path / "nothing.safetensors", "no checkpoint")


def test_empty_and_short_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _expect_error(tmp_path / "empty.safetensors", "not a safetensors file")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02\x03")
    _expect_error(tmp_path / "short.safetensors", "not a safetensors file")


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_truncated_checkpoint(tmp_path, llama_ckpt, cut):
    data = llama_ckpt[0].read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:-cut])
    _expect_error(bad, "truncated")


def test_trailing_garbage(tmp_path, llama_ckpt):
    bad = tmp_path / "long.safetensors"
    bad.write_bytes(llama_ckpt[0].read_bytes() + b"\0" * 16)
    _expect_error(bad, "trailing bytes")


def test_random_bytes(tmp_path):
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).numpy().tobytes()
    (tmp_path / "noise.safetensors").write_bytes(noise)
    _expect_error(tmp_path / "noise.safetensors", "truncated or not a safetensors")
    # A plausible header length followed by garbage.
    (tmp_path / "garbage.safetensors").write_bytes(struct.pack("<Q", 1000) + noise)
    _expect_error(tmp_path / "garbage.safetensors", "corrupt safetensors header")
    for header in (b"[1, 2, 3]", b'{"w": 5}', b'{"w": {"dtype": "F32"}}'):
        (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        _expect_error(tmp_path / "h.safetensors", "corrupt")


def test_header_claiming_more_bytes_than_the_file_has(tmp_path, llama_ckpt):
    data = llama_ckpt[0].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    bad = tmp_path / "big_header.safetensors"
    bad.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    _expect_error(bad, "header claims")
    # Tensor offsets that run past the end of the file.
    header = json.loads(data[8:8 + n])
    last = max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 64
    raw = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    _expect_error(bad, "truncated")


def test_malformed_metadata_block(tmp_path, llama_ckpt):
    data = llama_ckpt[0].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    config = json.loads(header["__metadata__"]["quantization_config"])
    for meta in ({"quantization_config": config}, ["quantization_config"], "x"):
        header["__metadata__"] = meta
        raw = json.dumps(header).encode()
        bad = tmp_path / "meta.safetensors"
        bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        _expect_error(bad, "metadata")


def test_foreign_safetensors_file(tmp_path):
    model, _ = build_llama()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    _expect_error(tmp_path, "not a vlmkern checkpoint")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"),
              metadata={"quantization_config": "{not json"})
    _expect_error(tmp_path / "m.safetensors", "not valid JSON")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(quant_method="gptq"), "'gptq'"),
    (lambda c: c.pop("quant_method"), "None"),
    (lambda c: c.update(format_version=FORMAT_VERSION + 1), "format_version"),
    (lambda c: c.update(format_version="1"), "format_version"),
    (lambda c: c.pop("modules"), "modules"),
    (lambda c: c.update(aliases=["lm_head.weight"]), "aliases"),
    (lambda c: c.update(aliases={"lm_head.weight": "no.such.tensor"}), "no.such.tensor"),
], ids=[
    'gptq', 'no-method', 'newer-version', 'string-version', 'no-modules', 'aliases-list',
    'alias-to-missing'])
def test_foreign_or_newer_quantization_config(tmp_path, llama_ckpt, edit, match):
    bad = rewrite(llama_ckpt[0], tmp_path / "bad.safetensors", edit_config=edit)
    _expect_error(bad, match)


def test_plain_quantization_config_json(tmp_path, llama_ckpt):
    bad = rewrite(llama_ckpt[0], tmp_path / "bad.safetensors",
                  raw_metadata={"quantization_config": json.dumps(["vlmkern"])})
    _expect_error(bad, "not a vlmkern one")


def test_checkpoint_from_another_shape_or_architecture(tmp_path, llama_ckpt):
    path = llama_ckpt[0]
    wide = build_llama(seed=1, hidden_size=96)[0]
    err = _expect_error(path, r"64x64 in the checkpoint but 96x96", model=wide)
    assert "q_proj" in str(err)
    _expect_error(path, "model has no module", model=build_llama(seed=1, num_hidden_layers=1)[0])
    _expect_error(path, "does not match this model: missing",
                  model=build_llama(seed=1, num_hidden_layers=3)[0])
    _expect_error(path, r"embed_tokens.weight has shape \(128, 64\)",
                  model=build_llama(seed=1, vocab_size=256)[0])


def test_checkpoint_from_an_architecture_with_other_biases(tmp_path):
    # Qwen2 at Llama's sizes differs only by the q/k/v biases: every tensor
    # shape agrees, the bias layout does not.
    from transformers import Qwen2Config, Qwen2ForCausalLM
    qwen = lambda: Qwen2ForCausalLM(Qwen2Config(**TEXT)).eval()  # noqa: E731
    llama, _ = quantized("llama", {"*": QuantConfig(4, 32)})
    llama_path = save_quantized(llama, tmp_path / "llama")
    _expect_error(llama_path, "bias", model=qwen())
    qwen_q = qwen()
    replace_linears(qwen_q, {"*": QuantConfig(4, 32)}, progress=False)
    qwen_path = save_quantized(qwen_q, tmp_path / "qwen")
    _expect_error(qwen_path, "bias")


Q0 = "model.layers.0.self_attn.q_proj"          # W4 g32 asym, 64 x 64
K0 = "model.layers.0.self_attn.k_proj"          # W3 g64 sym, 32 x 64


def _edit_module(name, **changes):
    def edit(config):
        entry = config["modules"][name]
        for key, value in changes.items():
            if key in ("group_size", "bits", "in_features_meta", "block_size", "w_bits"):
                entry["meta"][key.removesuffix("_meta")] = value
            elif value is KeyError:
                entry.pop(key)
            else:
                entry[key] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_edit_module(Q0, group_size=16), "scales has shape"),
    (_edit_module(Q0, group_size="32"), "group_size"),
    (_edit_module(Q0, group_size=0), "group_size"),
    (_edit_module(Q0, bits=3), "qweight has shape"),
    (_edit_module(Q0, bits=5), "bits"),
    (_edit_module(Q0, in_features_meta=63), "qweight has shape|describe"),
    (_edit_module(K0, meta={}), "lacks"),
    (_edit_module(K0, meta=None), K0),
    (_edit_module(K0, format="gptq"), "unknown format"),
    (_edit_module(K0, format=KeyError), "malformed entry"),
    (_edit_module(K0, out_features="many"), "malformed entry"),
    (_edit_module(K0, bias=True), "bias"),
    (_edit_module("model.layers.0.mlp.gate_proj", w_bits=8), "qweight has shape"),
    (_edit_module("model.layers.0.mlp.up_proj", block_size=32), "stats has shape"),
    (lambda c: c["modules"].update({"model.norm": c["modules"][K0]}), "not a linear layer"),
    (lambda c: c["modules"].update({"": c["modules"][K0]}), "not a linear layer"),
    (lambda c: c["modules"].update({K0: ["groupwise"]}), "malformed entry"),
], ids=[
    'group_size-16', 'group_size-str', 'group_size-0', 'bits-3', 'bits-5', 'in_features',
    'meta-empty', 'meta-null', 'format-gptq', 'format-missing', 'out_features-str',
    'bias-flag', 'w_bits', 'block_size', 'non-linear-target', 'root-target', 'entry-list'])
def test_corrupt_module_entry(tmp_path, llama_ckpt, edit, match):
    bad = rewrite(llama_ckpt[0], tmp_path / "bad.safetensors", edit_config=edit)
    _expect_error(bad, match)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(f"{Q0}.qweight"), "should hold tensors"),
    (lambda t: t.pop(f"{Q0}.scales"), "scales must be|scales has|should hold tensors"),
    (lambda t: t.update({f"{Q0}.scales": t[f"{Q0}.scales"].float().to(torch.int32)}), "dtype"),
    (lambda t: t.update({f"{Q0}.scales": t[f"{Q0}.scales"] * float("nan")}), "NaN"),
    (lambda t: t.update({f"{Q0}.extra": torch.zeros(2)}), "unexpected"),
    (lambda t: t.update({f"{K0}.qweight": t[f"{K0}.qweight"][:, :-1].contiguous()}),
     "qweight has shape"),
    (lambda t: t.update({"model.norm.weight": torch.ones(65)}), "model.norm.weight"),
], ids=[
    'no-qweight', 'no-scales', 'int-scales', 'nan-scales', 'extra-tensor', 'short-qweight',
    'fp-tensor-shape'])
def test_corrupt_tensors(tmp_path, llama_ckpt, edit, match):
    bad = rewrite(llama_ckpt[0], tmp_path / "bad.safetensors", edit_tensors=edit)
    _expect_error(bad, match)


class _Marker:
    """Unpickling this object creates a directory: proof that something unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickles_are_never_unpickled(tmp_path, writer):
    marker = tmp_path / "unpickled"
    payload = {"model.embed_tokens.weight": torch.zeros(3), "evil": _Marker(marker)}
    path = tmp_path / "model.safetensors"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    _expect_error(tmp_path, "not a safetensors file|corrupt")
    assert not marker.exists()
    # The payload is live: unpickling it does create the marker.
    if writer == "torch.save":
        live = tmp_path / "payload.pt"
        live.write_bytes(path.read_bytes())
        torch.load(live, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.is_dir()


# ---------------------------------------------------------------------------
# Atomic save
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, llama_ckpt, exc):
    _, model, inputs = llama_ckpt
    target = save_quantized(model, tmp_path)
    good = target.read_bytes()
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 2])
        raise exc

    monkeypatch.setattr(vio, "save_file", failing_save_file)
    other, _ = quantized("llama", {"*": QuantConfig(2, None)}, seed=5)
    with pytest.raises(type(exc)):
        save_quantized(other, tmp_path)
    assert calls and os.path.dirname(calls[0]) == str(tmp_path) and calls[0] != str(target)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert target.read_bytes() == good
    # A failed save to a new target leaves nothing behind either.
    with pytest.raises(type(exc)):
        save_quantized(other, tmp_path / "new" / "x.safetensors")
    assert os.listdir(tmp_path / "new") == []
    monkeypatch.undo()
    fresh, _ = build_llama(seed=1)
    assert torch.equal(logits(load_quantized(fresh, tmp_path), inputs), logits(model, inputs))


def test_lost_optional_tensor_is_detected(tmp_path):
    """An asymmetric weight whose qzeros vanished must not load as symmetric."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    import vlmkern
    from vlmkern.io import CheckpointError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    vlmkern.replace_linears(model, vlmkern.QuantConfig(4, 32, sym=False), skip=(), progress=False)
    path = vlmkern.save_quantized(model, tmp_path / "ok.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("qzeros")}
    config = json.loads(meta["quantization_config"])
    del config["checksums"]["0.qzeros"]         # consistent in itself: the module check finds it
    save_file(tensors, str(tmp_path / "bad.safetensors"),
              metadata={**meta, "quantization_config": json.dumps(config)})
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(CheckpointError, match="qzeros"):
        vlmkern.load_quantized(fresh, tmp_path / "bad.safetensors")
    assert json.loads(meta["quantization_config"])["modules"]["0"]["tensors"] == \
        ["qweight", "qzeros", "scales"]


def test_save_never_overwrites_a_file_vlmkern_did_not_write(tmp_path, llama_ckpt):
    _, model, inputs = llama_ckpt
    fp_weights = tmp_path / "model.safetensors"         # say, the model's own weights
    save_file({"w": torch.ones(3)}, str(fp_weights))
    before = fp_weights.read_bytes()
    with pytest.raises(FileExistsError, match="not a vlmkern checkpoint"):
        save_quantized(model, tmp_path)
    assert fp_weights.read_bytes() == before and os.listdir(tmp_path) == ["model.safetensors"]
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FileExistsError):
        save_quantized(model, tmp_path / "junk.safetensors")
    # an earlier vlmkern checkpoint is replaced
    target = save_quantized(model, tmp_path / "q")
    other, _ = quantized("llama", {"*": QuantConfig(2, None)}, seed=5)
    assert save_quantized(other, tmp_path / "q") == target
    fresh, _ = build_llama(seed=1)
    assert torch.equal(logits(load_quantized(fresh, target), inputs), logits(other, inputs))


@pytest.mark.parametrize("where", ["scales", "norm"])
def test_save_refuses_what_load_would_refuse(tmp_path, where):
    model, _ = quantized("llama")
    if where == "scales":
        model.model.layers[0].mlp.down_proj.quantized_weight.scales[0, 0] = float("nan")
    else:
        model.model.norm.weight.data[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_quantized(model, tmp_path)
    assert os.listdir(tmp_path) == []


def test_damage_inside_tensor_data_is_found(tmp_path, llama_ckpt):
    path, model, inputs = llama_ckpt
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x10                      # one bit, well inside the last tensor's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    fresh, _ = build_llama(seed=1)
    with pytest.raises(CheckpointError, match="is damaged: the bytes of"):
        load_quantized(fresh, bad)
    # a file without checksums (written before they were recorded) still loads
    old = rewrite(path, tmp_path / "old.safetensors",
                  edit_config=lambda c: c.pop("checksums"))
    fresh, _ = build_llama(seed=1)
    assert torch.equal(logits(load_quantized(fresh, old), inputs), logits(model, inputs))
    lying = rewrite(path, tmp_path / "lying.safetensors",
                    edit_config=lambda c: c["checksums"].popitem())
    with pytest.raises(CheckpointError, match="checksums table"):
        load_quantized(build_llama(seed=1)[0], lying)
