"""VLMQ (ALGORITHMS.md check 10): importance-weighted GPTQ/GPTAQ.

Pure-function checks on synthetic statistics (g = 1 is GPTQ/GPTAQ bitwise,
scaling g changes nothing, zero weight on image tokens is GPTQ on the text
tokens alone), the block-wise gradient against hand-derived and
finite-difference values on a real decoder layer, and end-to-end runs on tiny
LLaVA and Qwen2-VL models through ``quantize_model``."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from vlmkern import GPTAQConfig, GPTQConfig, QuantConfig, QuantLinear
from vlmkern.quant.gptq import gptaq_quantize, gptq_quantize
from vlmkern.quant.hessian import HessianAccumulator
from vlmkern.quant.vlmq import (VLMQConfig, layer_importance, reduce_gradient, token_importance,
                                vlmq_quantize)


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same(a, b):
    """Bitwise equal packed weights (codes, scales, zeros, perm)."""
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scales, b.scales)
    assert (a.qzeros is None) == (b.qzeros is None)
    if a.qzeros is not None:
        assert torch.equal(a.qzeros, b.qzeros)
    assert (a.perm is None) == (b.perm is None)
    if a.perm is not None:
        assert torch.equal(a.perm, b.perm)


def modal_tokens(seed=0, batches=3, tokens=40, k=96, dtype=torch.float32):
    """Correlated inputs [B, T, K] whose first 24 tokens per batch are 'image'
    tokens from a shifted, differently mixed distribution (a modality gap),
    their quantized-stream copies, and the image mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    mix_t = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    mix_i = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    chan = torch.exp(0.7 * torch.randn(k, generator=g, dtype=torch.float64))
    x = torch.randn(batches, tokens, k, generator=g, dtype=torch.float64) @ mix_t
    image = torch.zeros(batches, tokens, dtype=torch.bool)
    image[:, :24] = True
    x[image] = (torch.randn(int(image.sum()), k, generator=g, dtype=torch.float64) @ mix_i
                + 3.0 * torch.randn(k, generator=g, dtype=torch.float64))
    x = x * chan
    xq = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64) @ mix_t
    w = torch.randn(48, k, generator=g, dtype=torch.float64)
    return x.to(dtype), xq.to(dtype), image, w.to(dtype)


def stats(x_fp, x_q, weights=None, paired=False, dtype=torch.float32):
    acc = HessianAccumulator(x_q.shape[-1], dtype=dtype)
    for b in range(x_q.shape[0]):
        g = None if weights is None else weights[b]
        if paired:
            acc.add_pair(x_fp[b], x_q[b], token_weight=g)
        else:
            acc.add(x_q[b], token_weight=g)
    return acc


def gptq_cfg(act_order=False, group=64, compute="float32"):
    # K = 96 with group 64: a short last group
    return GPTQConfig(QuantConfig(3, group), act_order=act_order, compute_dtype=compute)


# ---------------------------------------------------------------------------
# Check 10 on the statistics
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("act_order", [False, True])
def test_unit_importance_is_gptq_and_gptaq_bitwise(act_order):
    x, xq, _, w = modal_tokens()
    ones = torch.ones(xq.shape[:-1])
    base = gptq_cfg(act_order)
    got = vlmq_quantize(w, stats(x, xq, ones), VLMQConfig(base))[0]
    assert_same(got, gptq_quantize(w, stats(x, xq).hessian, base)[0])
    plain = stats(x, xq, paired=True)
    got = vlmq_quantize(w, stats(x, xq, ones, paired=True), VLMQConfig(GPTAQConfig(base)))[0]
    assert_same(got, gptaq_quantize(w, plain.hessian, plain.delta, base)[0])


@pytest.mark.parametrize("paired", [False, True])
def test_scaling_importance_changes_nothing(paired):
    x, xq, _, w = modal_tokens(seed=1)
    g = torch.rand(xq.shape[:-1], generator=torch.Generator().manual_seed(5)) + 0.05
    base = gptq_cfg(act_order=True)
    cfg = VLMQConfig(GPTAQConfig(base) if paired else base)
    ref = vlmq_quantize(w, stats(x, xq, g, paired), cfg)[0]
    # g -> 2g scales H~ (and D~) by 4 exactly: bitwise in float32
    assert_same(vlmq_quantize(w, stats(x, xq, 2 * g, paired), cfg)[0], ref)
    # any other constant: identical codes when the arithmetic is fp64
    base64 = gptq_cfg(act_order=True, compute="float64")
    cfg64 = VLMQConfig(GPTAQConfig(base64) if paired else base64)
    x64, xq64, g64 = x.double(), xq.double(), g.double()
    ref64 = vlmq_quantize(w, stats(x64, xq64, g64, paired, torch.float64), cfg64)[0]
    assert_same(vlmq_quantize(w, stats(x64, xq64, 3.7 * g64, paired, torch.float64), cfg64)[0],
                ref64)
    # the weights do matter: an uneven g is not uniform GPTQ/GPTAQ
    uniform = vlmq_quantize(w, stats(x, xq, None, paired), cfg)[0]
    assert not torch.equal(uniform.qweight, ref.qweight)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_zero_weight_on_image_tokens_is_gptq_on_text_tokens(paired, act_order):
    x, xq, image, w = modal_tokens(seed=2, dtype=torch.float64)
    base = gptq_cfg(act_order, compute="float64")
    cfg = VLMQConfig(GPTAQConfig(base) if paired else base)
    text_only = stats(x[~image][None], xq[~image][None], None, paired, torch.float64)
    weighted = stats(x, xq, (~image).double(), paired, torch.float64)
    got = vlmq_quantize(w, weighted, cfg)[0]
    assert_same(got, vlmq_quantize(w, text_only, cfg)[0])
    # the image tokens would have changed the answer
    everything = stats(x, xq, None, paired, torch.float64)
    assert not torch.equal(vlmq_quantize(w, everything, cfg)[0].qweight, got.qweight)


def test_reduce_gradient_norms():
    p = torch.tensor([[[3.0, -4.0], [0.0, 0.0]], [[1.0, 1.0], [-2.0, 0.0]]])
    torch.testing.assert_close(reduce_gradient(p, "l1"), torch.tensor([[3.5, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(reduce_gradient(p, "l2"),
                               torch.tensor([[math.sqrt(12.5), 0.0], [1.0, math.sqrt(2.0)]]))
    with pytest.raises(ValueError, match="norm"):
        reduce_gradient(p, "l3")
    with pytest.raises(ValueError, match="NaN"):
        reduce_gradient(torch.tensor([[float("nan"), 1.0]]))


def test_config_errors():
    with pytest.raises(TypeError, match="GPTQConfig or GPTAQConfig"):
        VLMQConfig(QuantConfig(4, 64))
    with pytest.raises(ValueError, match="norm"):
        VLMQConfig(norm="linf")
    with pytest.raises(ValueError, match="weighted"):
        VLMQConfig(weighted=())
    x, xq, _, w = modal_tokens()
    with pytest.raises(ValueError, match="paired"):
        vlmq_quantize(w, stats(x, xq), VLMQConfig(GPTAQConfig()))


# ---------------------------------------------------------------------------
# The block-wise gradient on a real decoder layer
# ---------------------------------------------------------------------------

pytest.importorskip("transformers")

from tiny_models import build_llama, build_llava, build_qwen2vl  # noqa: E402
from tiny_models import logits as _logits, rel_error as _rel  # noqa: E402
from tiny_models import second_sample as _second_sample  # noqa: E402

from vlmkern.calib import quantize_model  # noqa: E402
from vlmkern.calib.arch import decoder_layers  # noqa: E402
from vlmkern.calib.engine import capture_inputs  # noqa: E402


def first_layer(dtype=torch.float32, **overrides):
    """(decoder layer 0, its captured input [B, T, C], kwargs) of a tiny Llama."""
    model, inputs = build_llama(**overrides)
    model = model.to(dtype)
    _, layers = decoder_layers(model)
    (x, kwargs), = capture_inputs(model, layers, [inputs], "cpu")
    return layers[0], x, kwargs


def attention_block(layer, x, kwargs):
    """Attn(X) = X + self_attn(input_layernorm(X)), written out by hand."""
    out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]
    return x + out


def test_o_proj_importance_is_the_block_output_error():
    layer, x, kwargs = first_layer()
    xq = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = attention_block(layer, xq, kwargs) - attention_block(layer, x, kwargs)
    # z_o enters Attn(X^) additively, so dL/dz_o = 2 (Attn(X^) - Attn(X)).
    for norm, want in (("l1", (2 * diff).abs().mean(-1)),
                       ("l2", (2 * diff).pow(2).mean(-1).sqrt())):
        g = token_importance(layer, x, xq, kwargs, VLMQConfig(norm=norm))
        assert set(g) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj"}
        torch.testing.assert_close(g["self_attn.o_proj"], want, rtol=1e-5, atol=1e-9)
        assert all(v.shape == x.shape[:-1] for v in g.values())


def test_k_proj_importance_matches_finite_differences():
    layer, x, kwargs = first_layer(torch.float64)
    xq = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64)
    g = token_importance(layer, x, xq, kwargs, VLMQConfig(norm="l1"))["self_attn.k_proj"]
    with torch.no_grad():
        target = attention_block(layer, x, kwargs)
    k_proj = layer.self_attn.k_proj
    b, t, eps = 1, 3, 1e-6

    def loss_with(delta):
        handle = k_proj.register_forward_hook(lambda m, a, out: out + delta)
        try:
            with torch.no_grad():
                return float((attention_block(layer, xq, kwargs) - target).pow(2).sum())
        finally:
            handle.remove()

    shape = (*x.shape[:-1], k_proj.out_features)
    grads = []
    for c in range(k_proj.out_features):
        e = torch.zeros(shape, dtype=torch.float64)
        e[b, t, c] = eps
        grads.append((loss_with(e) - loss_with(-e)) / (2 * eps))
    fd = sum(abs(v) for v in grads) / len(grads)
    assert fd > 0
    assert abs(float(g[b, t]) - fd) < 1e-6 * fd + 1e-12


def test_tokens_that_cannot_affect_the_block_output_have_zero_importance():
    layer, x, kwargs = first_layer(torch.float64)
    gen = torch.Generator().manual_seed(2)
    xq = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    g = token_importance(layer, x, xq, kwargs, VLMQConfig())
    # Causal attention: the first token's query meets a single key, so its
    # softmax is 1 whatever the query is (zero up to the rounding of the
    # fused softmax backward).
    q = g["self_attn.q_proj"]
    assert float(q[:, 0].max()) < 1e-9 * float(q[:, 1:].min())
    for name in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert bool((g[name] > 0).all())
    # Only the last token's input differs: every earlier output is exact, and
    # an earlier token's query and output projection reach only its own output.
    xq = x.clone()
    xq[:, -1] += 0.05 * torch.randn(xq[:, -1].shape, generator=gen, dtype=torch.float64)
    g = token_importance(layer, x, xq, kwargs, VLMQConfig())
    for name in ("self_attn.q_proj", "self_attn.o_proj"):
        assert float(g[name][:, :-1].max()) < 1e-9 * float(g[name][:, -1].min())
    # ... while every key and value still reaches the last query.
    assert bool((g["self_attn.v_proj"] > 0).all())


def test_identical_streams_give_uniform_weights():
    layer, x, kwargs = first_layer()
    cfg = VLMQConfig()
    assert layer_importance(layer, [x], [x.clone()], [kwargs], cfg) is None
    got = layer_importance(layer, [x, x], [x, x + 0.01], [kwargs, kwargs], cfg)
    assert set(got) == set(cfg.weighted)
    # a batch whose streams agree carries no error, hence no weight
    assert all(torch.equal(gs[0], torch.zeros_like(gs[0])) for gs in got.values())
    with pytest.raises(ValueError, match="full-precision stream"):
        layer_importance(layer, [x], None, [kwargs], cfg)
    with pytest.raises(ValueError, match="same tokens"):
        token_importance(layer, x, x[:, :3], kwargs, cfg)
    with pytest.raises(ValueError, match="block_output"):
        token_importance(layer, x, x + 0.01, kwargs, VLMQConfig(block_output="nope"))


# ---------------------------------------------------------------------------
# End to end through the engine
# ---------------------------------------------------------------------------

W3 = QuantConfig(3, 32)
BUILDERS = {"llava": build_llava, "qwen2vl": build_qwen2vl}


def _weights(model):
    return {n: m.quantized_weight for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_vlmq_end_to_end(kind):
    model, inputs = BUILDERS[kind]()
    samples = [inputs, _second_sample(inputs)]
    ref = _logits(model, inputs)
    gptq, _ = quantize_model(copy.deepcopy(model), samples, GPTQConfig(W3), progress=False)
    rtn, _ = quantize_model(copy.deepcopy(model), samples, W3, progress=False)
    runs = {"gptq-l1": VLMQConfig(GPTQConfig(W3)),
            "gptaq-l2": VLMQConfig(GPTAQConfig(GPTQConfig(W3)), norm="l2")}
    for name, cfg in runs.items():
        q, report = quantize_model(copy.deepcopy(model), samples, cfg, progress=False)
        assert {r.method for r in report.modules} == {"vlmq"}
        assert len(report.modules) == 14 and all(r.bits == 3 for r in report.modules)
        assert _rel(_logits(q, inputs), ref) < 0.8 * _rel(_logits(rtn, inputs), ref)
        got, base = _weights(q), _weights(gptq)
        assert got.keys() == base.keys()
        layers_path, _ = decoder_layers(q)
        differs = {n for n in got if not torch.equal(got[n].qweight, base[n].qweight)}
        if name == "gptq-l1":
            # Layer 0 sees identical streams: uniform weights, GPTQ bitwise.
            assert not any(n.startswith(f"{layers_path}.0.") for n in differs)
        # Layer 1's attention is importance-weighted.
        assert any(n.startswith(f"{layers_path}.1.self_attn") for n in differs)
        info = q.get_submodule(f"{layers_path}.1.self_attn.q_proj").quant_info
        assert info["method"] == "vlmq"


def test_unit_importance_through_the_engine_is_gptq(monkeypatch):
    import vlmkern.quant.vlmq as vlmq

    model, inputs = build_llava()
    samples = [inputs, _second_sample(inputs)]

    def ones(layer, inputs, fp_inputs, kwargs_list, config, masks=None):
        return {n: [torch.ones(x.shape[:-1]) for x in inputs] for n in config.weighted}

    monkeypatch.setattr(vlmq, "layer_importance", ones)
    for base, plain in ((GPTQConfig(W3), GPTQConfig(W3)),
                        (GPTAQConfig(GPTQConfig(W3)), GPTAQConfig(GPTQConfig(W3)))):
        want, _ = quantize_model(copy.deepcopy(model), samples, plain, progress=False)
        got, _ = quantize_model(copy.deepcopy(model), samples, VLMQConfig(base),
                                progress=False)
        assert torch.equal(_logits(got, inputs), _logits(want, inputs))


def test_importance_comes_from_the_full_precision_layer_in_a_mixed_plan(monkeypatch):
    # q/k/v and o_proj are two VLMQ runs of one layer (different grids): the
    # second must still weigh tokens with the full-precision layer, not with
    # the one whose q/k/v the first run quantized
    from vlmkern.quant import vlmq

    model, inputs = build_llama()
    original = [copy.deepcopy(layer) for layer in decoder_layers(model)[1]]
    real, unchanged = vlmq.layer_importance, []

    def spy(layer, *args, **kwargs):
        fp = original[len(unchanged) // 2]          # two VLMQ runs per layer
        unchanged.append(all(torch.equal(m.weight, fp.get_submodule(n).weight)
                             for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)))
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(vlmq, "layer_importance", spy)
    plan = {"*.o_proj": VLMQConfig(GPTQConfig(QuantConfig(4, 32))),
            "re:.*self_attn\\.(q|k|v)_proj": VLMQConfig(GPTQConfig(W3)),
            "*": GPTQConfig(W3)}
    quantize_model(model, [inputs], plan, progress=False)
    assert len(unchanged) == 2 * len(original) and all(unchanged), unchanged


def test_padding_stays_out_of_the_importance_loss():
    """A right-padded batch gives its real tokens the importance they get
    unpadded (pad queries attend to real keys, so counting their error would
    move the real tokens' k/v importance)."""
    from tiny_models import padded_llama

    from vlmkern.calib.engine import _pad_mask

    model, padded, separate = padded_llama()
    path, layers = decoder_layers(model)
    (h_pad, kw_pad), = capture_inputs(model, layers, [padded], "cpu")
    mask = _pad_mask(padded, h_pad)
    noisy = h_pad + 0.05 * torch.randn(h_pad.shape, generator=torch.Generator().manual_seed(0))
    cfg = VLMQConfig()
    masked = token_importance(layers[0], h_pad, noisy, kw_pad, cfg, mask)
    counted = token_importance(layers[0], h_pad, noisy, kw_pad, cfg)
    for i, sample in enumerate(separate):
        (h, kw), = capture_inputs(model, layers, [sample], "cpu")
        n = h.shape[1]
        alone = token_importance(layers[0], h, noisy[i:i + 1, :n], kw, cfg)
        for name in cfg.weighted:
            assert torch.allclose(masked[name][i, :n], alone[name][0], rtol=1e-4, atol=1e-7), name
    # the unmasked loss moves the short sequence's k/v importance
    k = "self_attn.k_proj"
    assert not torch.allclose(counted[k][1, :5], masked[k][1, :5], rtol=1e-3)


def test_vlmq_runs_act_order_by_default_as_its_paper_does():
    from vlmkern.calib.cli import method_config
    from vlmkern.cli import build_parser
    assert VLMQConfig().base.gptq.act_order is True

    def config(*args):
        return method_config(build_parser().parse_args(["quantize", "--model", "x", *args]))
    assert config("--method", "vlmq").base.gptq.act_order is True
    assert config("--method", "vlmq", "--no-act-order").base.gptq.act_order is False
    assert config("--method", "gptq").act_order is False
    assert config("--method", "gptq", "--act-order").act_order is True
