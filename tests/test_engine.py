"""The layer-by-layer calibration engine on tiny transformers models:
architectures, captured inputs, GPTQ beating RTN end to end, resume after an
interruption (bit-identical), work-dir safety and checkpoint round trips."""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from tiny_models import (build_gemma3_text, build_llama, build_llava,  # noqa: E402
                         build_llava_tiled, build_qwen2vl, build_qwen3vl, build_text,
                         crash_on_call)
from tiny_models import logits as _logits, rel_error as _rel  # noqa: E402
from tiny_models import second_sample as _second_sample, state_of as _state  # noqa: E402

import vlmkern  # noqa: E402
from vlmkern import GPTAQConfig, GPTQConfig, QuantConfig, QuantLinear  # noqa: E402
from vlmkern.calib import UnknownArchitectureError, arch_of, quantize_model  # noqa: E402
from vlmkern.calib.arch import decoder_layers  # noqa: E402
from vlmkern.calib.engine import capture_inputs  # noqa: E402
from vlmkern.calib.methods import LayerMethod  # noqa: E402

BUILDERS = {"llama": build_llama, "llava": build_llava, "qwen2vl": build_qwen2vl,
            **{kind: functools.partial(build_text, kind) for kind in ("qwen3", "mistral")},
            **{kind: functools.partial(build_llava_tiled, kind)
               for kind in ("llava_next", "llava_onevision")}}
W3 = QuantConfig(3, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_gptq_beats_rtn_and_replaces_only_the_language_model(kind):
    model, inputs = BUILDERS[kind]()
    samples = [inputs, _second_sample(inputs)]
    ref = _logits(model, inputs)
    rtn, rtn_report = quantize_model(copy.deepcopy(model), samples, W3, progress=False)
    gptq, report = quantize_model(copy.deepcopy(model), samples, GPTQConfig(W3),
                                  progress=False)
    assert _rel(_logits(gptq, inputs), ref) < 0.8 * _rel(_logits(rtn, inputs), ref)
    assert sum(report.layer_errors) < sum(rtn_report.layer_errors)

    layers_path, layers = decoder_layers(gptq)
    quantized = {n for n, m in gptq.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 7 * len(layers) == len(report.modules)
    assert all(n.startswith(layers_path + ".") for n in quantized)
    # Vision tower, projector and lm_head stay full precision.
    assert isinstance(gptq.lm_head, nn.Linear)
    dense_rest = [n for n, m in gptq.named_modules() if isinstance(m, nn.Linear)]
    assert all(not n.startswith(layers_path) for n in dense_rest)
    for row in report.modules:
        assert row.method == "gptq" and row.bits == 3 and 0 <= row.rel_error < 0.1
        assert row.nbytes == gptq.get_submodule(row.name).quantized_weight.nbytes


def test_gptaq_uses_the_full_precision_stream():
    model, inputs = build_llama()
    samples = [inputs, _second_sample(inputs)]
    ref = _logits(model, inputs)
    gptq, _ = quantize_model(copy.deepcopy(model), samples, GPTQConfig(W3), progress=False)
    gptaq, report = quantize_model(copy.deepcopy(model), samples,
                                   GPTAQConfig(GPTQConfig(W3), alpha=0.25), progress=False)
    zero, _ = quantize_model(copy.deepcopy(model), samples, GPTAQConfig(GPTQConfig(W3), 0.0),
                             progress=False)
    assert report.modules[0].method == "gptaq"
    # alpha = 0 is GPTQ bitwise, through the whole engine.
    assert torch.equal(_logits(zero, inputs), _logits(gptq, inputs))
    assert not torch.equal(_logits(gptaq, inputs), _logits(gptq, inputs))
    assert _rel(_logits(gptaq, inputs), ref) < 1.5 * _rel(_logits(gptq, inputs), ref)


def test_gptaq_statistics_pair_the_full_precision_and_quantized_streams(monkeypatch):
    # layer 0's o_proj: H from its input in the model whose q/k/v are already
    # quantized (X~), D = (2/T) (X - X~) X~^T with X its input in the FP model
    from vlmkern.quant.hessian import HessianAccumulator

    model, inputs = build_llama()
    samples = [inputs, _second_sample(inputs)]
    fp_layer = copy.deepcopy(decoder_layers(model)[1][0])
    captured = capture_inputs(model, decoder_layers(model)[1], samples, "cpu")
    seen, real = [], LayerMethod.quantize

    def spy(self, weight, stats):
        seen.append((stats.hessian.clone(), stats.delta.clone()))
        return real(self, weight, stats)

    monkeypatch.setattr(LayerMethod, "quantize", spy)
    q, _ = quantize_model(model, samples, GPTAQConfig(GPTQConfig(W3)), progress=False)
    h_engine, d_engine = seen[3]                      # q, k, v, then o_proj

    quantized = copy.deepcopy(fp_layer)
    for name in ("q_proj", "k_proj", "v_proj"):
        attn = decoder_layers(q)[1][0].self_attn
        getattr(quantized.self_attn, name).weight.data.copy_(
            getattr(attn, name).quantized_weight.dequantize(torch.float32))
    ref = HessianAccumulator(fp_layer.self_attn.o_proj.in_features)
    for hidden, kwargs in captured:
        ins = {}
        for layer, key in ((fp_layer, "x"), (quantized, "xq")):
            hook = layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, key=key, ins=ins: ins.__setitem__(key, a[0].detach()))
            with torch.no_grad():
                layer(hidden, **kwargs)
            hook.remove()
        ref.add_pair(ins["x"], ins["xq"])
    assert not torch.equal(ins["x"], ins["xq"])       # the streams differ here
    torch.testing.assert_close(h_engine, ref.hessian, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d_engine, ref.delta, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["llava", "llava_next", "llava_onevision"])
def test_capture_sees_image_tokens(kind):
    model, inputs = BUILDERS[kind]()
    _, layers = decoder_layers(model)
    a = capture_inputs(model, layers, [inputs], "cpu")[0][0]
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
    b = capture_inputs(model, layers, [other], "cpu")[0][0]
    image = inputs["input_ids"] == model.config.image_token_id
    assert not torch.equal(a[image], b[image])     # image positions carry the new image
    assert torch.equal(a[~image], b[~image])       # text positions do not


def test_interrupted_run_resumes_bit_identical(tmp_path, monkeypatch):
    model, inputs = build_qwen2vl()
    samples = [inputs, _second_sample(inputs)]
    method = GPTQConfig(W3)
    clean, clean_report = quantize_model(copy.deepcopy(model), samples, method,
                                         work_dir=tmp_path / "clean", progress=False)

    real = LayerMethod.quantize
    # the ninth call is layer 1's second linear
    monkeypatch.setattr(LayerMethod, "quantize",
                        crash_on_call(real, 9, KeyboardInterrupt("simulated crash")))
    with pytest.raises(KeyboardInterrupt):
        quantize_model(copy.deepcopy(model), samples, method, work_dir=tmp_path / "run",
                       progress=False)
    monkeypatch.setattr(LayerMethod, "quantize", real)
    assert (tmp_path / "run" / "layer_0000.safetensors").exists()
    assert not (tmp_path / "run" / "layer_0001.safetensors").exists()

    resumed, report = quantize_model(copy.deepcopy(model), samples, method,
                                     work_dir=tmp_path / "run", progress=False)
    assert report.resumed_layers == 1
    a, b = _state(clean), _state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(clean, inputs), _logits(resumed, inputs))
    assert [r.rel_error for r in report.modules] == [r.rel_error for r in clean_report.modules]


def test_work_dir_refuses_another_run(tmp_path):
    model, inputs = build_llama()
    quantize_model(copy.deepcopy(model), [inputs], W3, work_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different model, calibration data or method"):
        quantize_model(copy.deepcopy(model), [inputs], QuantConfig(4, 32), work_dir=tmp_path,
                       progress=False)


def test_calibrated_model_saves_and_reloads(tmp_path):
    model, inputs = build_llava()
    fresh = copy.deepcopy(model)
    q, _ = quantize_model(model, [inputs], GPTQConfig(W3), progress=False)
    vlmkern.save_quantized(q, tmp_path)
    vlmkern.load_quantized(fresh, tmp_path)
    assert torch.equal(_logits(fresh, inputs), _logits(q, inputs))
    info = fresh.get_submodule(decoder_layers(fresh)[0] + ".0.mlp.down_proj").quant_info
    assert info["method"] == "gptq"


@pytest.mark.parametrize("kind,why", [
    ("qwen3vl", r"input of decoder layer 1 is not layer 0's output \(8 token positions"),
    ("gemma3", (r"decoder layer 2 receives other keyword arguments than layer 0 "
                r"\(attention_mask, position_embeddings\)"))])
def test_a_model_that_replay_cannot_reproduce_is_refused(monkeypatch, kind, why):
    # described as if it were Llama-like: the engine itself finds out it is not
    from vlmkern.calib import ReplayMismatchError, arch
    model, inputs = {"qwen3vl": build_qwen3vl, "gemma3": build_gemma3_text}[kind]()
    monkeypatch.setitem(arch.ARCHS, type(model).__name__, arch.ArchSpec(
        kind, ("model.language_model.layers", "model.layers")))
    before = _state(model)
    # a text-only sample first: the check does not stop at the first sample
    text = {"input_ids": inputs["input_ids"][:, -5:]}
    with pytest.raises(ReplayMismatchError, match=why):
        quantize_model(model, [text, inputs], W3, progress=False)
    _, layers = decoder_layers(model)
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_architecture_says_how_to_describe_it():
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnknownArchitectureError, match="register_arch"):
        quantize_model(Mystery(), [{"x": torch.zeros(1, 4)}], W3, progress=False)
    assert arch_of(build_llama()[0]).name == "llama"


def test_bad_inputs():
    model, inputs = build_llama()
    with pytest.raises(ValueError, match="at least one"):
        quantize_model(model, [], W3, progress=False)
    with pytest.raises(TypeError, match="dicts of model inputs"):
        quantize_model(model, [inputs["input_ids"]], W3, progress=False)
    with pytest.raises(TypeError, match="unknown method config"):
        quantize_model(model, [inputs], "gptq", progress=False)
    with pytest.raises(TypeError, match="got one dict"):
        quantize_model(model, inputs, W3, progress=False)
    empty = {**inputs, "input_ids": inputs["input_ids"][:, :0]}
    with pytest.raises(ValueError, match="sample 1 has no tokens"):
        quantize_model(model, [inputs, empty], W3, progress=False)


@pytest.mark.parametrize("method", [GPTQConfig(QuantConfig(4, 32)),
                                    GPTAQConfig(GPTQConfig(QuantConfig(4, 32)))],
                         ids=("gptq", "gptaq"))
def test_fully_masked_samples_raise_instead_of_zeroing_the_weights(method):
    """An all-zero attention_mask leaves every Hessian empty: the first layer
    reports it rather than quantizing every weight to 0."""
    model, inputs = build_llama()
    masked = {**inputs, "attention_mask": torch.zeros_like(inputs["input_ids"])}
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: the Hessian is all "
                                         r"zero: no calibration tokens reached this layer"):
        quantize_model(model, [masked], method, progress=False)


def test_billm_through_the_engine():
    from vlmkern import BiLLMConfig, BinaryConfig, BinaryLinear
    model, inputs = build_llama()
    samples = [inputs, _second_sample(inputs)]
    cfg = BinaryConfig(max_salient=8)
    _, plain_report = quantize_model(copy.deepcopy(model), samples, cfg, progress=False)
    billm, report = quantize_model(copy.deepcopy(model), samples, BiLLMConfig(binary=cfg),
                                   progress=False)
    assert all(isinstance(billm.get_submodule(r.name), BinaryLinear) for r in report.modules)
    assert {r.method for r in report.modules} == {"billm"}
    # A random-weight model with iid tokens has no salient structure for the
    # Hessian to find, so BiLLM is only required to stay in data-free
    # binarization's range here; its advantage is checked on weights with
    # outlier channels (test_billm.py) and on the real model's perplexity table.
    assert sum(report.layer_errors) < 1.25 * sum(plain_report.layer_errors)


def test_billm_takes_every_linears_statistics_from_the_full_precision_layer(monkeypatch):
    # BiLLM's spec: the Hessians of a layer's linears from one pass over the
    # layer as it was (GPTQ instead sees earlier sub-groups quantized)
    import vlmkern.quant.billm as billm_module
    from vlmkern import BiLLMConfig
    from vlmkern.quant.hessian import HessianAccumulator
    model, inputs = build_llama()
    layer0 = decoder_layers(model)[1][0]
    names = ["self_attn.o_proj", "mlp.down_proj"]
    accs = {n: HessianAccumulator(layer0.get_submodule(n).in_features) for n in names}
    hooks = [layer0.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: accs[n].add(a[0].detach())) for n in names]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    seen = []
    real = billm_module.billm_quantize

    def spy(weight, hessian, config):
        seen.append((weight.clone(), hessian.clone()))
        return real(weight, hessian, config)
    monkeypatch.setattr(billm_module, "billm_quantize", spy)
    quantize_model(copy.deepcopy(model), [inputs], BiLLMConfig(), progress=False)
    for n in names:
        weight = layer0.get_submodule(n).weight
        got = [h for w, h in seen if torch.equal(w, weight)]
        assert len(got) == 1, n
        torch.testing.assert_close(got[0], accs[n].hessian, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [GPTQConfig(QuantConfig(4, 32)),
                                    GPTAQConfig(GPTQConfig(QuantConfig(4, 32)))])
def test_padding_never_enters_the_statistics(monkeypatch, method):
    """A right-padded batch feeds the Hessians exactly its real tokens: as many
    rows as the unpadded samples, with the same values."""
    from vlmkern.quant.hessian import HessianAccumulator

    from tiny_models import padded_llama

    model, padded, separate = padded_llama()

    def record(into):
        def add(self, x, token_weight=None):
            into.append((self, x.detach().reshape(-1, x.shape[-1]).clone()))
            return real_add(self, x, token_weight)

        def add_pair(self, x_fp, x_q, token_weight=None):
            into.append((self, x_q.detach().reshape(-1, x_q.shape[-1]).clone()))
            return real_pair(self, x_fp, x_q, token_weight)
        return add, add_pair

    def first_accumulator(entries):     # every batch's rows into layer 0's q_proj
        first = entries[0][0]
        return torch.cat([x for acc, x in entries if acc is first])

    real_add, real_pair = HessianAccumulator.add, HessianAccumulator.add_pair
    rows = {}
    for tag, samples in (("padded", [padded]), ("separate", separate),
                         ("unmasked", [{"input_ids": padded["input_ids"]}])):
        rows[tag] = []
        add, add_pair = record(rows[tag])
        monkeypatch.setattr(HessianAccumulator, "add", add)
        monkeypatch.setattr(HessianAccumulator, "add_pair", add_pair)
        quantize_model(copy.deepcopy(model), samples, method, progress=False)
    first_p, first_s = first_accumulator(rows["padded"]), first_accumulator(rows["separate"])
    assert first_p.shape[0] == 14 and first_s.shape[0] == 14
    assert torch.allclose(first_p, first_s, atol=1e-5, rtol=1e-5)
    # the check can fail: without the mask the pads would count
    assert first_accumulator(rows["unmasked"]).shape[0] == 18


def test_an_interruption_leaves_the_layer_in_flight_as_it_was(monkeypatch):
    """The caller's model after an interruption: finished layers quantized,
    the layer in flight back in full precision, never half calibrated."""
    model, inputs = build_llama()
    before = _state(model)
    real = LayerMethod.quantize
    # the ninth call is layer 1's second linear
    monkeypatch.setattr(LayerMethod, "quantize",
                        crash_on_call(real, 9, KeyboardInterrupt("simulated crash")))
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, [inputs], GPTQConfig(W3), progress=False)
    after = _state(model)
    layer1 = [k for k in before if k.startswith("model.layers.1.")]
    assert layer1 and all(torch.equal(after[k], before[k]) for k in layer1)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear


def test_an_already_quantized_model_is_refused(tmp_path, monkeypatch):
    model, inputs = build_llama()
    q, _ = quantize_model(copy.deepcopy(model), [inputs], W3, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, [inputs], W3, progress=False)

    real = LayerMethod.quantize
    monkeypatch.setattr(LayerMethod, "quantize",
                        crash_on_call(real, 9, KeyboardInterrupt("simulated crash")))
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, [inputs], W3, work_dir=tmp_path, progress=False)
    monkeypatch.setattr(LayerMethod, "quantize", real)
    # rerunning on the interrupted object would quantize layer 0 twice
    for work_dir in (None, tmp_path):
        with pytest.raises(ValueError, match="already quantized, possibly by an interrupted "
                                             "run.*reload the full-precision model"):
            quantize_model(model, [inputs], W3, work_dir=work_dir, progress=False)


def test_layer_errors_count_activation_rounding():
    # integer-activation layers round their inputs per token when deployed: the
    # reported layer errors (and the quantized stream) must include that
    from vlmkern import IntActConfig
    model, inputs = build_llama()
    samples = [inputs, _second_sample(inputs)]
    ref = _logits(model, inputs)
    errs, logit_errs = {}, {}
    for a_bits in (8, 4):
        q, report = quantize_model(copy.deepcopy(model), samples, IntActConfig(8, a_bits),
                                   progress=False)
        errs[a_bits] = report.layer_errors
        logit_errs[a_bits] = _rel(_logits(q, inputs), ref)
    assert logit_errs[4] > 4 * logit_errs[8]          # what the deployed layers do
    assert all(e4 > 4 * e8 for e4, e8 in zip(errs[4], errs[8])), errs


def test_padding_that_cannot_be_placed_is_named_not_silently_counted():
    from vlmkern.calib.engine import _pad_mask
    hidden = torch.zeros(2, 9, 4)                    # 9 positions: tokens expanded after the mask
    padded = {"attention_mask": torch.tensor([[1] * 7, [0, 0] + [1] * 5])}
    with pytest.warns(UserWarning, match="padding tokens enter the calibration statistics"):
        assert _pad_mask(padded, hidden) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no padding: nothing to say
        assert _pad_mask({"attention_mask": torch.ones(2, 7)}, hidden) is None
    mask = _pad_mask({"attention_mask": torch.tensor([[1] * 9, [0] + [1] * 8])}, hidden)
    assert mask is not None and int(mask.sum()) == 17
