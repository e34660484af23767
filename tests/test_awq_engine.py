"""AWQ on whole models: folding keeps the FP function, the v -> o group folds
only without grouped-query attention, AWQ + RTN beats RTN where activations
have outlier channels, AWQ + GPTQ, checkpoints, bad inputs; and the
``vlmkern quantize --method awq / vlmq`` command."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import (build_llama, build_llava, build_qwen2, build_qwen2vl,  # noqa: E402
                         crash_on_call, padded_llama)
from tiny_models import logits as _logits, rel_error as _rel  # noqa: E402
from tiny_models import second_sample as _second_sample, state_of as _state  # noqa: E402

import vlmkern  # noqa: E402
from vlmkern import GPTQConfig, QuantConfig, QuantLinear  # noqa: E402
from vlmkern.calib import quantize_model  # noqa: E402
from vlmkern.calib.arch import decoder_layers  # noqa: E402
from vlmkern.calib.awq_engine import (LLAMA_SCALING, AWQEngineConfig, _fold,  # noqa: E402
                                      awq_quantize_model, awq_transform)
from vlmkern.quant.awq import AWQConfig, apply_awq  # noqa: E402

W3 = QuantConfig(3, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def build_mha_llama():
    """Llama without grouped-query attention: every scaling group folds."""
    return build_llama(num_key_value_heads=4)


BUILDERS = {"llama-mha": build_mha_llama, "qwen2": build_qwen2, "llava": build_llava,
            "qwen2vl": build_qwen2vl}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_folding_random_scales_keeps_the_fp_function(kind):
    """Every scaling group folds exactly: random scales, far from 1, leave
    the model's logits unchanged to fp32 rounding."""
    model, inputs = BUILDERS[kind]()
    ref = _logits(model, inputs)
    _, layers = decoder_layers(model)
    gen = torch.Generator().manual_seed(0)
    folded = []
    for layer in layers:
        for group in LLAMA_SCALING:
            prev = layer.get_submodule(group.prev)
            lins = [layer.get_submodule(n) for n in group.linears]
            k = lins[0].in_features
            if isinstance(prev, torch.nn.Linear) and prev.out_features != k:
                continue                     # grouped-query attention: v -> o cannot fold
            _fold(prev, lins, torch.exp(torch.randn(k, generator=gen)))
            folded.append(group.prev)
    assert ("self_attn.v_proj" in folded) == (kind == "llama-mha")
    got = _logits(model, inputs)
    assert not torch.equal(got, ref)
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_awq_transform_keeps_the_fp_function(kind):
    model, inputs = BUILDERS[kind]()
    ref = _logits(model, inputs)
    before = copy.deepcopy(model.state_dict())
    infos = awq_transform(model, [inputs, _second_sample(inputs)],
                          AWQEngineConfig(AWQConfig(W3)))
    got = _logits(model, inputs)
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("layernorm" in k for k in changed)           # scales were really folded
    gqa = kind != "llama-mha"
    for info in infos:
        assert ("self_attn.v_proj" in info["skipped"]) == gqa
        assert info["fold_error"] < 1e-5


def outlier_model():
    """MHA Llama whose norms emphasise a few channels ~30x: activation
    outliers like a real LLM's, the case AWQ exists for."""
    model, inputs = build_mha_llama()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in decoder_layers(model)[1]:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                idx = torch.randperm(norm.weight.numel(), generator=gen)[:4]
                norm.weight[idx] *= 30.0
    return model, inputs


def test_awq_rtn_beats_rtn_on_outlier_channels():
    model, inputs = outlier_model()
    samples = [inputs, _second_sample(inputs)]
    ref = _logits(model, inputs)
    rtn, _ = quantize_model(copy.deepcopy(model), samples, W3, progress=False)
    awq, report = awq_quantize_model(copy.deepcopy(model), samples,
                                     AWQEngineConfig(AWQConfig(W3)), progress=False)
    assert _rel(_logits(awq, inputs), ref) < 0.8 * _rel(_logits(rtn, inputs), ref)
    assert len(report.modules) == 14 and {r.method for r in report.modules} == {"awq"}
    assert len(report.layer_errors) == 2
    for row in report.modules:
        module = awq.get_submodule(row.name)
        assert isinstance(module, QuantLinear) and module.quant_info["method"] == "awq"
        assert row.bits == 3 and row.nbytes == module.quantized_weight.nbytes
        assert 0 <= row.rel_error < 0.5


@pytest.mark.parametrize("group", [0, 2])
def test_scales_minimise_the_output_error_of_the_block_the_linears_feed(group):
    """q/k/v scales are scored on the attention block's output, gate/up ones
    on the MLP's (AWQ's spec), each candidate s replacing W by Q(W s)/s; the
    chosen ratio is the argmin of that error computed here from the layer's
    own forward, and differs from the one the linears' outputs alone pick."""
    from vlmkern.calib.awq_engine import ScalingGroup, awq_layer
    from vlmkern.calib.engine import decoder_inputs
    from vlmkern.quant.awq import candidate_scales

    model, inputs = build_qwen2vl()
    path, layers = decoder_layers(model)
    hidden, kwargs, _ = decoder_inputs(model, path, layers, [inputs, _second_sample(inputs)],
                                       torch.device("cpu"))
    layer = layers[0]
    spec = LLAMA_SCALING[group]
    block = layer.get_submodule(spec.block)
    seen = {}
    hooks = [layer.get_submodule(spec.linears[0]).register_forward_pre_hook(
                 lambda m, a: seen.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1]))),
             block.register_forward_hook(lambda m, a, out: seen.setdefault("out", []).append(
                 out[0] if isinstance(out, tuple) else out))]

    def block_outputs(module):
        seen.clear()
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs):
                module(h, **kw)
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in seen["out"]]).double()

    ref = block_outputs(layer)
    x = torch.cat(seen["x"])
    errors = []
    for i in range(20):
        s = candidate_scales(x, i / 20)
        with torch.no_grad():
            for name in spec.linears:
                lin = layer.get_submodule(name)
                lin.weight.copy_(apply_awq(lin.weight.detach(), s, None, W3).dequantize(torch.float64)
                                 / s.double())
        errors.append(float((block_outputs(layer) - ref).pow(2).sum()))
        layer.load_state_dict(decoder_layers(build_qwen2vl()[0])[1][0].state_dict())
    for h in hooks:
        h.remove()
    want = min(range(20), key=errors.__getitem__) / 20

    config = AWQEngineConfig(AWQConfig(W3))
    got = awq_layer(copy.deepcopy(layer), hidden, kwargs, config, (spec,))["ratios"][spec.prev]
    own = awq_layer(copy.deepcopy(layer), hidden, kwargs, config,
                    (ScalingGroup(spec.prev, spec.linears),))["ratios"][spec.prev]
    assert got == want
    assert own != want


def test_rtn_step_is_apply_awq_with_the_searched_clip():
    """Without clipping AWQ + RTN is round to nearest of the folded weights."""
    model, inputs = build_llava()
    folded = copy.deepcopy(model)
    cfg = AWQEngineConfig(AWQConfig(W3, clip_steps=1))
    awq_transform(folded, [inputs], cfg)
    q, _ = awq_quantize_model(copy.deepcopy(model), [inputs], cfg, progress=False)
    for name, module in q.named_modules():
        if isinstance(module, QuantLinear):
            want = apply_awq(folded.get_submodule(name).weight, None, None, W3)
            assert torch.equal(module.quantized_weight.qweight, want.qweight)
            assert torch.equal(module.quantized_weight.scales, want.scales)


def test_awq_then_gptq():
    model, inputs = build_qwen2vl()
    samples = [inputs, _second_sample(inputs)]
    ref = _logits(model, inputs)
    rtn, _ = quantize_model(copy.deepcopy(model), samples, W3, progress=False)
    q, report = awq_quantize_model(copy.deepcopy(model), samples,
                                   AWQEngineConfig(AWQConfig(W3), then="gptq"), progress=False)
    assert _rel(_logits(q, inputs), ref) < 0.8 * _rel(_logits(rtn, inputs), ref)
    assert {r.method for r in report.modules} == {"awq"}
    info = q.get_submodule(report.modules[0].name).quant_info
    assert info["method"] == "awq" and info["config"]["then"] == "gptq"


def test_checkpoint_keeps_the_folded_norms(tmp_path):
    model, inputs = build_llava()
    fresh = copy.deepcopy(model)
    q, _ = awq_quantize_model(model, [inputs], AWQEngineConfig(AWQConfig(W3)), progress=False)
    vlmkern.save_quantized(q, tmp_path)
    vlmkern.load_quantized(fresh, tmp_path)
    assert torch.equal(_logits(fresh, inputs), _logits(q, inputs))


def test_bad_inputs():
    model, inputs = build_llava()
    with pytest.raises(ValueError, match="then"):
        AWQEngineConfig(then="smooth")
    with pytest.raises(ValueError, match="grid"):
        AWQEngineConfig(AWQConfig(W3), gptq=GPTQConfig(QuantConfig(4, 32)))
    with pytest.raises(TypeError, match="AWQConfig"):
        AWQEngineConfig(awq=W3)
    with pytest.raises(ValueError, match="at least one"):
        awq_quantize_model(model, [], progress=False)
    with pytest.raises(TypeError, match="awq_quantize_model"):
        quantize_model(model, [inputs], AWQEngineConfig(), progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_that_is_not_a_plain_scale_is_refused(dtype):
    """A norm computing x * (1 + w) (Gemma style) cannot take 1/s in its
    weight: the fold check (on an fp32 copy of the layer) refuses instead of
    changing the model, also for a bf16 model, whose plain folds it passes."""
    model, inputs = build_mha_llama()
    model = model.to(dtype)
    infos = awq_transform(copy.deepcopy(model), [inputs], AWQEngineConfig(AWQConfig(W3)))
    assert all(info["fold_error"] < 1e-5 for info in infos)
    for layer in decoder_layers(model)[1]:
        norm = layer.input_layernorm
        norm.forward = (lambda x, n=norm: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
                        * (1.0 + n.weight))
    with pytest.raises(ValueError, match="changed the layer's output"):
        awq_transform(model, [inputs], AWQEngineConfig(AWQConfig(W3)))


# ---------------------------------------------------------------------------
# vlmkern quantize --method awq / vlmq
# ---------------------------------------------------------------------------

def tiny_hf_folder(tmp_path):
    """A tiny Llama saved as a local HuggingFace folder with a word-level
    tokenizer, and a calibration text file."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny_models import TEXT
    vocab = {f"w{i}": i for i in range(TEXT["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    build_mha_llama()[0].save_pretrained(folder)
    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 100)}" for _ in range(1000)))
    return folder, text


@pytest.mark.parametrize("method, extra", [
    ("awq", []), ("awq", ["--awq-then", "gptq", "--awq-grid", "5"]),
    ("vlmq", []), ("vlmq", ["--vlmq-base", "gptq", "--vlmq-norm", "l2", "--act-order"])])
def test_quantize_command(tmp_path, capsys, method, extra):
    import transformers

    from vlmkern.cli import main
    folder, text = tiny_hf_folder(tmp_path)
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(folder), "--method", method, "--bits", "3",
                 "--group-size", "32", "--calib-text", str(text), "--samples", "2",
                 "--seq-len", "32", "--device", "cpu", "--out", str(out), *extra])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer output errors" in printed and "saved" in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    vlmkern.load_quantized(model, out)
    q = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert isinstance(q, QuantLinear) and q.quant_info["method"] == method
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_quantize_command_resumes_awq_rtn(tmp_path):
    from safetensors.torch import load_file

    from vlmkern.cli import main
    folder, text = tiny_hf_folder(tmp_path)
    args = ["quantize", "--model", str(folder), "--method", "awq", "--calib-text", str(text),
            "--samples", "2", "--seq-len", "32", "--group-size", "32",
            "--work-dir", str(tmp_path / "w")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0      # every layer resumed
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_awq_rtn_resumes_bit_identical(tmp_path, monkeypatch):
    import vlmkern.calib.awq_engine as engine

    model, inputs = build_qwen2vl()
    samples = [inputs, _second_sample(inputs)]
    config = AWQEngineConfig(AWQConfig(W3))
    clean, clean_report = awq_quantize_model(copy.deepcopy(model), samples, config,
                                             progress=False)
    real = engine.rtn_layer
    monkeypatch.setattr(engine, "rtn_layer",
                        crash_on_call(real, 2, KeyboardInterrupt("simulated crash")))
    with pytest.raises(KeyboardInterrupt):
        awq_quantize_model(copy.deepcopy(model), samples, config, work_dir=tmp_path,
                           progress=False)
    monkeypatch.setattr(engine, "rtn_layer", real)
    assert (tmp_path / "layer_0000.safetensors").exists()
    assert not (tmp_path / "layer_0001.safetensors").exists()

    searched = []
    real_awq = engine.awq_layer
    monkeypatch.setattr(engine, "awq_layer",
                        lambda *a, **k: (searched.append(1), real_awq(*a, **k))[1])
    resumed, report = awq_quantize_model(copy.deepcopy(model), samples, config,
                                         work_dir=tmp_path, progress=False)
    assert report.resumed_layers == 1 and len(searched) == 1
    a, b = _state(clean), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(clean, inputs), _logits(resumed, inputs))
    assert [r.rel_error for r in report.modules] == [r.rel_error for r in clean_report.modules]
    assert report.layer_errors == clean_report.layer_errors
    # another configuration is refused
    with pytest.raises(ValueError, match="different"):
        awq_quantize_model(copy.deepcopy(model), samples,
                           AWQEngineConfig(AWQConfig(QuantConfig(4, 32))), work_dir=tmp_path,
                           progress=False)


def test_padding_never_enters_awq_or_smoothquant_statistics():
    from vlmkern.calib.smooth_engine import activation_maxima, smoothing_groups

    model, padded, separate = padded_llama()
    names = [n for _, _, linears in smoothing_groups(model) for n in linears]
    with_pads = activation_maxima(model, [padded], names, progress=False)
    without = activation_maxima(model, separate, names, progress=False)
    unmasked = activation_maxima(model, [{"input_ids": padded["input_ids"]}], names,
                                 progress=False)
    for n in names:
        assert torch.allclose(with_pads[n], without[n], rtol=1e-5, atol=1e-6), n
    assert any(not torch.allclose(unmasked[n], without[n], rtol=1e-3) for n in names)

    config = AWQEngineConfig(AWQConfig(W3))
    a = awq_transform(copy.deepcopy(model), [padded], config)
    b = awq_transform(copy.deepcopy(model), separate, config)
    assert [info["ratios"] for info in a] == [info["ratios"] for info in b]
    # with the pads counted the search picks other ratios: the check can fail
    c = awq_transform(copy.deepcopy(model), [{"input_ids": padded["input_ids"]}], config)
    assert [info["ratios"] for info in c] != [info["ratios"] for info in b]


def test_clip_skip_names_match_whole_trailing_components():
    from vlmkern.calib.awq_engine import _name_ends_with
    assert _name_ends_with("self_attn.q_proj", ("q_proj",))
    assert _name_ends_with("self_attn.q_proj", ("self_attn.q_proj",))
    assert not _name_ends_with("self_attn.q_proj", ("proj",))
    assert not _name_ends_with("self_attn.q_proj", ("k_proj", "mlp.q_proj"))


def test_an_interrupted_awq_run_leaves_a_model_that_is_refused(monkeypatch):
    from vlmkern.calib import awq_engine

    model, inputs = build_llama()
    cfg = AWQEngineConfig(AWQConfig(W3, clip_steps=1))
    calls = []
    real = awq_engine.rtn_layer

    def stop_at_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(awq_engine, "rtn_layer", stop_at_second_layer)
    with pytest.raises(KeyboardInterrupt):
        awq_quantize_model(model, [inputs], cfg, progress=False)
    monkeypatch.setattr(awq_engine, "rtn_layer", real)
    for run in (lambda: awq_quantize_model(model, [inputs], cfg, progress=False),
                lambda: quantize_model(model, [inputs], W3, progress=False)):
        with pytest.raises(ValueError, match="interrupted and left it partly changed"):
            run()


def test_a_bad_work_dir_is_found_before_awq_rescales_the_model(tmp_path):
    model, inputs = build_llama()
    before = _state(model)
    (tmp_path / "a_file").write_text("x")
    for work_dir in ("", tmp_path / "a_file"):
        with pytest.raises(ValueError, match="work_dir"):
            awq_quantize_model(model, [inputs], AWQEngineConfig(AWQConfig(W3), then="gptq"),
                               work_dir=work_dir, progress=False)
        after = _state(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    awq_quantize_model(model, [inputs], AWQEngineConfig(AWQConfig(W3), then="gptq"),
                       progress=False)    # not marked: the model was never changed
