"""replace_linears on real transformers architectures (Llama, Qwen2, LLaVA,
Qwen2-VL) built from tiny configs with random weights, plan resolution rules,
and the behaviour of the quantized modules themselves.

Every quantized model is compared with an independent dense reference: a deep
copy of the float model whose replaced linears compute the same math with
plain torch (dequantized weight; for integer-activation layers, per-token
symmetric activation fake-quantization written out below from the format
definition).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import vlmkern  # noqa: E402
from vlmkern import (BinaryConfig, BinaryLinear, IntActConfig, IntActLinear,  # noqa: E402
                     QuantConfig, QuantLinear, WeightOnlyLinear, quantize_rtn, replace_linears)

from tiny_models import BUILDERS  # noqa: E402


@functools.lru_cache(maxsize=None)
def _dense(kind):
    return BUILDERS[kind]()


def dense_model(kind):
    """A private copy of the cached dense model and its inputs."""
    model, inputs = _dense(kind)
    return copy.deepcopy(model), inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def set_module(root, name, module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---------------------------------------------------------------------------
# Independent dense reference
# ---------------------------------------------------------------------------

class FakeQuantIntActLinear(nn.Module):
    """Dense fake-quant of an integer-activation layer: every token (row of the
    flattened input) is quantized symmetrically, s = max|x| / (2^(a-1) - 1)
    (s = 1 for an all-zero token), q = clamp(round(x / s)); then
    y = (s q) @ W^T + b in float64 with W the dequantized weight."""

    def __init__(self, weight, bias, a_bits, act_scale):
        super().__init__()
        self.weight = weight.double()
        self.bias = None if bias is None else bias.detach().double()
        self.lim = 2 ** (a_bits - 1) - 1
        self.act_scale = act_scale

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.act_scale is None:
            s = x2.abs().amax(dim=1, keepdim=True) / self.lim
            s = torch.where(s == 0, torch.ones_like(s), s)
        else:
            s = torch.full((x2.shape[0], 1), float(self.act_scale))
        q = torch.clamp(torch.round(x2 / s), -self.lim, self.lim)
        y = (q.double() * s.double()) @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def dense_reference(dense, qmodel, act_quant=True):
    """Deep copy of ``dense`` where every linear quantized in ``qmodel`` uses the
    dequantized weight (and, for intact layers with act_quant, fake-quantized
    activations)."""
    ref = copy.deepcopy(dense)
    for name, module in qmodel.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        lin = ref.get_submodule(name)
        assert type(lin) is nn.Linear, name
        w = module.quantized_weight.dequantize(torch.float32)
        assert w.shape == lin.weight.shape
        if module.format == "intact" and act_quant:
            qw = module.quantized_weight
            set_module(ref, name, FakeQuantIntActLinear(w, lin.bias, qw.a_bits, qw.act_scale))
        else:
            with torch.no_grad():
                lin.weight.copy_(w)
    return ref


def assert_rel_close(actual, expected, rtol, what=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


def rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# A short saliency/break-point search keeps model-level binarization cheap; the
# packed format and the kernels are the same as for the default search.
BINARY = BinaryConfig(max_salient=8, quantiles=(0.2, 0.4, 0.6, 0.8))
CONFIGS = {
    "W4g32asym": QuantConfig(bits=4, group_size=32, sym=False),
    "W3g64sym": QuantConfig(bits=3, group_size=64, sym=True),
    "W2row": QuantConfig(bits=2, group_size=None),
    "W8A8": IntActConfig(w_bits=8, a_bits=8),
    "W4A4": IntActConfig(w_bits=4, a_bits=4),
    "binary": BINARY,
}
# Single layers are cheap: they use the default binarization search.
LAYER_CONFIGS = {**CONFIGS, "binary": BinaryConfig()}
MODULE_CLS = {"groupwise": WeightOnlyLinear, "intact": IntActLinear, "binary": BinaryLinear}

# Default skip list, written out independently per architecture.
SKIPPED_BY_DEFAULT = {
    "llama": lambda n: n == "lm_head",
    "qwen2": lambda n: n == "lm_head",
    "llava": lambda n: n == "lm_head" or n.startswith(("model.vision_tower.",
                                                       "model.multi_modal_projector.")),
    "qwen2vl": lambda n: n == "lm_head" or n.startswith("model.visual."),
}


# ---------------------------------------------------------------------------
# 1. Quantized models compute what their dense references compute
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_id", list(CONFIGS))
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_quantized_model_matches_dense_reference(kind, cfg_id):
    config = CONFIGS[cfg_id]
    dense, inputs = dense_model(kind)
    qmodel = copy.deepcopy(dense)
    names = linear_names(dense)
    _, report = replace_linears(qmodel, config, progress=False)

    expected_q = [n for n in names if not SKIPPED_BY_DEFAULT[kind](n)]
    assert [r.module for r in report.rows] == expected_q
    assert sorted(report.skipped) == sorted(set(names) - set(expected_q))
    assert report.unmatched == [] and report.kept == [] and report.unused_patterns == []
    for n in names:
        m = qmodel.get_submodule(n)
        if n in expected_q:
            assert type(m) is MODULE_CLS[config.format], n
            assert m.format == config.format
        else:
            assert type(m) is nn.Linear, n

    got = logits(qmodel, inputs)
    ref = logits(dense_reference(dense, qmodel), inputs)
    assert_rel_close(got, ref, 1e-5, f"{kind} {cfg_id}")

    # Not vacuous: quantization changed the model's output.
    assert rel_diff(got, logits(dense, inputs)) > 1e-3
    if config.format == "intact":
        # ... and activation quantization is part of what was matched.
        no_act = logits(dense_reference(dense, qmodel, act_quant=False), inputs)
        assert rel_diff(got, no_act) > 1e-4


@pytest.mark.parametrize("kind", ["llava", "qwen2vl"])
def test_skip_nothing_quantizes_vision_tower_projector_and_head(kind):
    dense, inputs = dense_model(kind)
    qmodel = copy.deepcopy(dense)
    names = linear_names(dense)
    _, report = replace_linears(qmodel, QuantConfig(bits=4, group_size=32), skip=(),
                                progress=False)
    assert [r.module for r in report.rows] == names
    assert report.skipped == []
    projector = [n for n in names if "multi_modal_projector" in n or ".visual.merger." in n]
    assert len(projector) == 2
    for n in projector + ["lm_head"]:
        assert isinstance(qmodel.get_submodule(n), WeightOnlyLinear), n
    # Pixel values now flow through quantized vision layers.
    assert_rel_close(logits(qmodel, inputs), logits(dense_reference(dense, qmodel), inputs),
                     1e-5, kind)


def test_explicit_skip_list_replaces_default():
    dense, _ = dense_model("llava")
    _, report = replace_linears(dense, QuantConfig(4, 32), skip=("*.mlp.*",), progress=False)
    assert report.skipped and all(".mlp." in n for n in report.skipped)
    quantized = {r.module for r in report.rows}
    assert "lm_head" in quantized and "model.multi_modal_projector.linear_1" in quantized
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj" in quantized


def test_a_single_skip_string_is_one_pattern():
    dense, _ = dense_model("llama")
    _, report = replace_linears(dense, QuantConfig(4, 32), skip="lm_head", progress=False)
    assert report.skipped == ["lm_head"]
    assert "lm_head" not in {r.module for r in report.rows} and report.rows
    with pytest.raises(TypeError, match="skip must be"):
        replace_linears(dense_model("llama")[0], QuantConfig(4, 32), skip=("lm_head", 3))


def test_replace_linears_refuses_what_it_cannot_quantize():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        replace_linears({"lm_head": None}, QuantConfig(4, 32))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        vlmkern.to_kernel_layout([])
    no_linears = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 1), torch.nn.ReLU())
    with pytest.raises(ValueError, match="no nn.Linear modules"):
        replace_linears(no_linears, QuantConfig(4, 32))


class _PooledHead(nn.Module):
    """A vision-tower pooling head: nn.MultiheadAttention hands its out_proj's
    weight to F.multi_head_attention_forward itself."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


def test_multihead_attention_output_projection_stays_full_precision():
    torch.manual_seed(0)
    model, x = _PooledHead(), torch.randn(2, 5, 32)
    ref = model(x)
    q, report = replace_linears(model, QuantConfig(8, 32), skip=(), progress=False)
    assert [r.module for r in report.rows] == ["fc"] and report.unreplaceable == ["attn.out_proj"]
    assert "nn.MultiheadAttention's out_proj" in str(report) and "['attn.out_proj']" in str(report)
    assert not isinstance(q.attn.out_proj, QuantLinear) and isinstance(q.fc, QuantLinear)
    torch.testing.assert_close(q(x), ref, atol=0.02, rtol=0)     # runs: W8 error only
    with pytest.raises(ValueError, match="'attn.out_proj', the output projection of an "
                                         "nn.MultiheadAttention"):
        replace_linears(_PooledHead(), {"attn.out_proj": QuantConfig(8, 32)}, skip=(),
                        progress=False)


def test_multihead_attention_output_projection_under_another_name_stays_full_precision():
    def build():
        model, head = nn.Module(), _PooledHead()
        model.proj = head.attn.out_proj     # registered first under this name
        model.head = head
        model.forward = head.forward
        return model

    torch.manual_seed(0)
    model, x = build(), torch.randn(2, 5, 32)
    assert next(n for n, m in model.named_modules() if m is model.proj) == "proj"
    ref = model(x)
    q, report = replace_linears(model, QuantConfig(8, 32), skip=(), progress=False)
    assert report.unreplaceable == ["proj"] and not isinstance(q.head.attn.out_proj, QuantLinear)
    assert q.proj is q.head.attn.out_proj and isinstance(q.head.fc, QuantLinear)
    torch.testing.assert_close(q(x), ref, atol=0.02, rtol=0)
    for key in ("proj", "head.attn.out_proj"):
        model = build()
        with pytest.raises(ValueError, match="output projection of an nn.MultiheadAttention"):
            replace_linears(model, {key: QuantConfig(8, 32)}, skip=(), progress=False)


class _GainLinear(nn.Linear):
    """A subclass with a forward and a parameter of its own."""

    def __init__(self, *args):
        super().__init__(*args)
        self.gain = nn.Parameter(torch.full((self.out_features,), 0.5))

    def forward(self, x):
        return super().forward(x) * self.gain


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _PlainSubclass(nn.Linear):
    """Like torch's NonDynamicallyQuantizableLinear: nothing of its own."""


@pytest.mark.parametrize("cls,why", [(_GainLinear, "its own forward"),
                                     (_ScaledLinear, "its own forward")])
def test_linear_subclasses_with_their_own_behaviour_stay_full_precision(cls, why):
    torch.manual_seed(0)
    model, x = nn.Sequential(cls(32, 16), nn.Linear(16, 8)), torch.randn(3, 32)
    ref = model(x)
    q, report = replace_linears(model, QuantConfig(8, 32), skip=(), progress=False)
    assert report.unreplaceable == ["0"] and [r.module for r in report.rows] == ["1"]
    assert type(q[0]) is cls and "nn.Linear subclass" in str(report)
    torch.testing.assert_close(q(x), ref, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match=f"plan names '0', an nn.Linear subclass .* {why}"):
        replace_linears(nn.Sequential(cls(32, 16)), {"0": QuantConfig(8, 32)}, skip=(),
                        progress=False)


def test_a_linear_subclass_with_extra_tensors_only_stays_full_precision():
    layer = _PlainSubclass(32, 16)
    layer.register_buffer("mask", torch.ones(16))
    _, report = replace_linears(nn.Sequential(layer), QuantConfig(8, 32), skip=(), progress=False)
    assert report.unreplaceable == ["0"] and "['mask']" not in str(report)
    with pytest.raises(ValueError, match=r"also holds \['mask'\]"):
        replace_linears(nn.Sequential(layer), {"0": QuantConfig(8, 32)}, skip=(), progress=False)


def test_a_linear_subclass_with_nothing_of_its_own_is_quantized():
    _, report = replace_linears(nn.Sequential(_PlainSubclass(32, 16)), QuantConfig(8, 32),
                                skip=(), progress=False)
    assert [r.module for r in report.rows] == ["0"] and report.unreplaceable == []


def test_report_with_nothing_quantized_says_so():
    model, _ = dense_model("llama")
    _, report = replace_linears(model, {"nothing.here": QuantConfig(4, 32)}, progress=False)
    assert report.rows == [] and "no linears quantized" in str(report) and "nan" not in str(report)


# ---------------------------------------------------------------------------
# 2. Plan semantics
# ---------------------------------------------------------------------------

def _bits(model, name):
    m = model.get_submodule(name)
    return m.quantized_weight.bits if isinstance(m, QuantLinear) else None


L0 = "model.layers.0"


def test_exact_name_beats_skip_but_patterns_do_not():
    model, _ = dense_model("llama")
    _, report = replace_linears(model, {"lm_head": QuantConfig(8, 32), "*": QuantConfig(4, 32)},
                                progress=False)
    assert _bits(model, "lm_head") == 8 and "lm_head" not in report.skipped
    model, _ = dense_model("llama")
    _, report = replace_linears(model, {"*lm_head*": QuantConfig(8, 32)}, progress=False)
    assert report.skipped == ["lm_head"] and report.rows == []
    # the pattern did match: the skip list won, and the report says so
    assert report.unused_patterns == [] and report.skip_shadowed == ["*lm_head*"]
    assert "matched only skipped linears" in str(report)


def test_skip_none_is_refused_as_ambiguous():
    with pytest.raises(TypeError, match="skip=None is ambiguous"):
        replace_linears(dense_model("llama")[0], QuantConfig(4, 32), skip=None, progress=False)


def test_exact_name_beats_earlier_pattern():
    model, _ = dense_model("llama")
    replace_linears(model, {"*": QuantConfig(4, 32), f"{L0}.mlp.down_proj": QuantConfig(2, 32)},
                    progress=False)
    assert _bits(model, f"{L0}.mlp.down_proj") == 2
    assert _bits(model, "model.layers.1.mlp.down_proj") == 4


def test_glob_patterns_and_unmatched():
    model, _ = dense_model("llama")
    _, report = replace_linears(model, {"*.mlp.*": QuantConfig(3, 64, sym=True)}, progress=False)
    names = linear_names(dense_model("llama")[0])
    mlp = [n for n in names if ".mlp." in n]
    assert [r.module for r in report.rows] == mlp and len(mlp) == 6
    assert report.unmatched == [n for n in names if ".self_attn." in n]
    for n in report.unmatched:
        assert type(model.get_submodule(n)) is nn.Linear
    # Globs are case-sensitive and match the whole name.
    model, _ = dense_model("llama")
    _, report = replace_linears(model, {"*.MLP.*": QuantConfig(4, 32), "mlp": QuantConfig(4, 32),
                                        "model.layers.?.mlp.up_proj": QuantConfig(8, 32)},
                                progress=False)
    assert [r.module for r in report.rows] == [f"model.layers.{i}.mlp.up_proj" for i in (0, 1)]
    assert report.unused_patterns == ["*.MLP.*", "mlp"]


def test_regex_patterns_are_full_matches():
    model, _ = dense_model("llama")
    plan = {r"re:.*self_attn\.(q|k)_proj": IntActConfig(8, 8),
            "re:self_attn": QuantConfig(4, 32),          # would match with re.search
            "re:.*down_pro": QuantConfig(4, 32)}         # prefix only: no full match
    _, report = replace_linears(model, plan, progress=False)
    assert sorted(r.module for r in report.rows) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qk")
    assert all(r.format == "intact" for r in report.rows)
    assert report.unused_patterns == ["re:self_attn", "re:.*down_pro"]


def test_bad_regex_is_a_value_error():
    model, _ = dense_model("llama")
    with pytest.raises(ValueError, match="regex"):
        replace_linears(model, {"re:(unclosed": QuantConfig()}, progress=False)


def test_first_matching_pattern_in_plan_order_wins():
    a, b = QuantConfig(4, 32), QuantConfig(8, 32)
    model, _ = dense_model("llama")
    _, report = replace_linears(model, {"*.mlp.*": a, "*.down_proj": b}, progress=False)
    assert _bits(model, f"{L0}.mlp.down_proj") == 4
    assert report.unused_patterns == ["*.down_proj"]      # shadowed by the earlier pattern
    model, _ = dense_model("llama")
    _, report = replace_linears(model, {"*.down_proj": b, "*.mlp.*": a}, progress=False)
    assert _bits(model, f"{L0}.mlp.down_proj") == 8 and _bits(model, f"{L0}.mlp.up_proj") == 4
    assert report.unused_patterns == []


def test_none_keeps_full_precision():
    model, _ = dense_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters() if "o_proj" in n}
    _, report = replace_linears(model, {"*.o_proj": None, f"{L0}.mlp.up_proj": None,
                                        "*": QuantConfig(4, 32)}, progress=False)
    kept = [f"{L0}.self_attn.o_proj", f"{L0}.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    assert report.kept == kept
    assert not set(kept) & {r.module for r in report.rows}
    for n in kept:
        assert type(model.get_submodule(n)) is nn.Linear
    for n, p in before.items():
        assert torch.equal(model.get_parameter(n), p)


def test_bare_config_means_every_linear_but_the_skipped():
    model_a, inputs = dense_model("llama")
    model_b = copy.deepcopy(model_a)
    _, ra = replace_linears(model_a, QuantConfig(4, 32), progress=False)
    _, rb = replace_linears(model_b, {"*": QuantConfig(4, 32)}, progress=False)
    assert [r.module for r in ra.rows] == [r.module for r in rb.rows]
    assert len(ra.rows) == 14 and ra.skipped == ["lm_head"]
    assert torch.equal(logits(model_a, inputs), logits(model_b, inputs))


def test_plan_naming_a_non_linear_module_raises_type_error():
    for name in (f"{L0}.mlp", "model.norm", "model.embed_tokens"):
        model, _ = dense_model("llama")
        with pytest.raises(TypeError, match=name.replace(".", r"\.")):
            replace_linears(model, {name: QuantConfig(4, 32), "*": QuantConfig(4, 32)},
                            progress=False)
        assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_bad_plan_values_raise_type_error():
    model, _ = dense_model("llama")
    with pytest.raises(TypeError):
        replace_linears(model, {"*": 4}, progress=False)
    with pytest.raises(TypeError):
        replace_linears(model, ["*"], progress=False)
    with pytest.raises(TypeError):
        replace_linears(model, quantize_rtn(torch.randn(8, 64), QuantConfig(4, 32)),
                        progress=False)
    with pytest.raises(KeyError, match="no_such_module"):
        replace_linears(model, {"no_such_module": quantize_rtn(torch.randn(8, 64),
                                                               QuantConfig(4, 32))},
                        progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantized_weight_of_wrong_shape_names_the_module():
    model, _ = dense_model("llama")
    name = "model.layers.1.mlp.down_proj"                 # 64 x 128
    wrong = quantize_rtn(torch.randn(64, 64), QuantConfig(4, 32))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as e:
        replace_linears(model, {name: wrong, "*": QuantConfig(4, 32)}, progress=False)
    assert "(64, 64)" in str(e.value) and "(64, 128)" in str(e.value)
    # Rejected while planning: nothing was replaced.
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_prequantized_weight_is_used_as_is():
    model, inputs = dense_model("qwen2")
    name = f"{L0}.mlp.down_proj"                          # 96 x 160
    gen = torch.Generator().manual_seed(5)
    other = torch.randn(96, 160, generator=gen) * 0.05    # not this layer's weight
    qw = quantize_rtn(other, QuantConfig(bits=8, group_size=16, sym=True))
    _, report = replace_linears(model, {name: qw, "*": QuantConfig(4, 32)}, progress=False)
    mod = model.get_submodule(name)
    assert isinstance(mod, WeightOnlyLinear) and mod.quant_info == {"method": "external"}
    assert mod._meta == qw.meta()
    got = mod.quantized_weight.tensors()
    assert got.keys() == qw.tensors().keys() == {"qweight", "scales"}
    for k, t in qw.tensors().items():
        assert torch.equal(got[k], t) and got[k].dtype == t.dtype
    row = next(r for r in report.rows if r.module == name)
    assert row.format == "groupwise" and row.bytes_after == qw.nbytes
    x = torch.randn(3, 160, generator=gen)
    assert torch.allclose(mod(x), F.linear(x, qw.dequantize(), mod.bias), rtol=1e-5, atol=1e-6)
    # A module quantized from a config reports its config's label and method.
    up = next(r for r in report.rows if r.module == f"{L0}.mlp.up_proj")
    assert up.label == "W4 g32 asym"
    assert model.get_submodule(f"{L0}.mlp.up_proj").quant_info["method"] == "rtn"


def test_report_bytes_add_up():
    model, _ = dense_model("qwen2")
    dense_bytes = {n: m.weight.numel() * m.weight.element_size()
                   for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan = {"*.q_proj": QuantConfig(4, 32), "*.k_proj": QuantConfig(3, 64, sym=True),
            "*.v_proj": IntActConfig(8, 8), "*.o_proj": IntActConfig(4, 4, group_size=32),
            "*.gate_proj": BINARY, "*": QuantConfig(2, None)}
    _, report = replace_linears(model, plan, progress=False)
    assert len(report.rows) == 14
    for row in report.rows:
        mod = model.get_submodule(row.module)
        assert row.bytes_before == dense_bytes[row.module]
        assert row.bytes_after == mod.quantized_weight.nbytes == mod.nbytes
        assert row.bytes_after == sum(b.numel() * b.element_size() for b in mod.buffers())
        assert row.bytes_after < row.bytes_before
    assert report.bytes_before == sum(r.bytes_before for r in report.rows)
    assert report.bytes_after == sum(r.bytes_after for r in report.rows)
    text = str(report)
    assert "14 linears quantized" in text and f"{report.bytes_after:,}" in text


# ---------------------------------------------------------------------------
# 3. Module behaviour
# ---------------------------------------------------------------------------

MIXED = {"*.q_proj": QuantConfig(4, 32), "*.k_proj": QuantConfig(3, 64, sym=True),
         "*.v_proj": IntActConfig(8, 8), "*.gate_proj": BINARY,
         "*.up_proj": IntActConfig(4, 4, group_size=32), "*": QuantConfig(2, None)}


def _quant_buffers(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b, t in m.named_buffers()}


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_dtype_casts_touch_bias_but_not_packed_buffers(cast):
    model, inputs = dense_model("qwen2")
    replace_linears(model, MIXED, progress=False)
    ref = logits(model, inputs)
    before = _quant_buffers(model)
    assert any(k.endswith(".scales") and t.dtype == torch.float16 for k, t in before.items())
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model = model.half() if cast == "half" else model.to(torch.bfloat16)
    after = _quant_buffers(model)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    q = model.get_submodule(f"{L0}.self_attn.q_proj")
    assert q.bias.dtype == dtype and q.bias.requires_grad is False
    assert model.get_submodule("model.embed_tokens").weight.dtype == dtype
    out = logits(model, inputs)
    assert out.dtype == dtype
    # Low-precision activations drift a little, not a lot.
    assert rel_diff(out.float(), ref) < 0.1
    model.float()
    for k, t in _quant_buffers(model).items():
        assert torch.equal(t, before[k]) and t.dtype == before[k].dtype


@pytest.mark.parametrize("cfg_id", list(LAYER_CONFIGS))
def test_quantized_weight_is_one_object_while_its_buffers_are_the_same(cfg_id):
    # The CUDA kernels cache their re-laid copy of a weight per weight object;
    # a fresh object per forward would re-lay every weight out on every call.
    from vlmkern.ops import cuda_weight_only as cw
    layer = QuantLinear.from_linear(nn.Linear(256, 96), LAYER_CONFIGS[cfg_id])
    w = layer.quantized_weight
    assert layer.quantized_weight is w
    layer.half()
    layer.to(torch.bfloat16)                  # packed buffers untouched: same object
    assert layer.quantized_weight is w
    if isinstance(w, vlmkern.QuantizedWeight):
        assert cw.kernel_weight(layer.quantized_weight, torch.float16) is cw.kernel_weight(
            w, torch.float16)
    twin = copy.deepcopy(layer)               # a copy gets its own object over its own buffers
    tw = twin.quantized_weight
    assert tw is not w and all(getattr(tw, n) is twin._buffers[n] for n in type(tw).TENSORS
                               if twin._buffers.get(n) is not None)
    name = type(w).TENSORS[0]
    setattr(layer, name, getattr(layer, name).clone())   # a replaced buffer: a new object
    assert layer.quantized_weight is not w
    assert getattr(layer.quantized_weight, name) is getattr(layer, name)
    x = torch.randn(3, 256)
    assert torch.equal(layer(x), vlmkern.ops.linear(x, layer.quantized_weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg_id", list(LAYER_CONFIGS))
def test_activation_dtypes(cfg_id, dtype):
    gen = torch.Generator().manual_seed(7)
    linear = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(40, generator=gen))
    q = QuantLinear.from_linear(linear, LAYER_CONFIGS[cfg_id])
    x = torch.randn(2, 5, 96, generator=gen).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (2, 5, 40)
    w = q.quantized_weight.dequantize()
    if q.format == "intact":
        ref_mod = FakeQuantIntActLinear(w, linear.bias, q.quantized_weight.a_bits, None)
        expected = ref_mod(x.float())
    else:
        expected = F.linear(x.float(), w, linear.bias)
    # Exact math in fp32, then one rounding to the activation dtype.
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_rel_close(y.float(), expected, rtol, f"{cfg_id} {dtype}")


@pytest.mark.parametrize("cfg_id", list(LAYER_CONFIGS))
def test_from_linear_with_bias(cfg_id):
    config = LAYER_CONFIGS[cfg_id]
    torch.manual_seed(3)
    linear = nn.Linear(64, 24)
    q = QuantLinear.from_linear(linear, config)
    assert type(q) is MODULE_CLS[config.format]
    assert (q.in_features, q.out_features) == (64, 24)
    assert torch.equal(q.bias, linear.bias) and not q.bias.requires_grad
    assert q.bias.data_ptr() != linear.bias.data_ptr()          # a copy, not shared
    with torch.no_grad():
        linear.bias.add_(1.0)
    assert not torch.equal(q.bias, linear.bias)
    assert not hasattr(q, "weight") or not isinstance(getattr(q, "weight"), nn.Parameter)
    assert list(q.parameters()) == [q.bias]
    q_nobias = QuantLinear.from_linear(nn.Linear(64, 24, bias=False), config)
    assert q_nobias.bias is None and "bias" not in q_nobias.state_dict()
    # A subclass refuses another format's weights.
    other = IntActConfig(8, 8) if config.format != "intact" else QuantConfig(4, 32)
    with pytest.raises(TypeError):
        MODULE_CLS[config.format].from_linear(linear, other)
    with pytest.raises(TypeError):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), config)


# state_dict keys of each quantized module (bias only when the layer has one):
#   WeightOnlyLinear  qweight int32 [N, ceil(K*b/32)], scales [N, G] (scale dtype),
#                     qzeros int32 [N, ceil(G*b/32)] (asymmetric only),
#                     perm int32 [K] (act-order weights only)
#   IntActLinear      qweight int8 [N, K] (W8/W6) or [N, ceil(K/2)] (W4), scales [N, G]
#   BinaryLinear      sign int32 [N, ceil(K/32)], aux int32 [N, ceil(K/32)],
#                     salient int32 [ceil(K/32)], stats [N, ceil(K/block), 8]
# with G = ceil(K / group_size) (1 when group_size is None).
STATE_KEYS = {
    "W4g32asym": {"qweight": ((24, 12), torch.int32), "scales": ((24, 3), torch.float16),
                  "qzeros": ((24, 1), torch.int32)},
    "W3g64sym": {"qweight": ((24, 9), torch.int32), "scales": ((24, 2), torch.float16)},
    "W2row": {"qweight": ((24, 6), torch.int32), "scales": ((24, 1), torch.float16),
              "qzeros": ((24, 1), torch.int32)},
    "W8A8": {"qweight": ((24, 96), torch.int8), "scales": ((24, 1), torch.float16)},
    "W4A4": {"qweight": ((24, 48), torch.int8), "scales": ((24, 1), torch.float16)},
    "binary": {"sign": ((24, 3), torch.int32), "aux": ((24, 3), torch.int32),
               "salient": ((3,), torch.int32), "stats": ((24, 1, 8), torch.float16)},
}


@pytest.mark.parametrize("cfg_id", list(LAYER_CONFIGS))
def test_state_dict_keys(cfg_id):
    torch.manual_seed(4)
    q = QuantLinear.from_linear(nn.Linear(96, 24), LAYER_CONFIGS[cfg_id])
    sd = q.state_dict()
    expected = {**STATE_KEYS[cfg_id], "bias": ((24,), torch.float32)}
    assert set(sd) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert tuple(sd[k].shape) == shape and sd[k].dtype == dtype, k


def test_model_state_dict_uses_module_prefixes():
    model, _ = dense_model("llama")
    replace_linears(model, {"*.q_proj": QuantConfig(4, 32), "*.v_proj": IntActConfig(8, 8),
                            "*.gate_proj": BINARY}, progress=False)
    keys = set(model.state_dict())
    assert {f"{L0}.self_attn.q_proj.{k}" for k in ("qweight", "scales", "qzeros")} <= keys
    assert {f"{L0}.self_attn.v_proj.{k}" for k in ("qweight", "scales")} <= keys
    assert {f"{L0}.mlp.gate_proj.{k}" for k in ("sign", "aux", "salient", "stats")} <= keys
    assert f"{L0}.self_attn.q_proj.weight" not in keys
    assert f"{L0}.self_attn.k_proj.weight" in keys and "lm_head.weight" in keys


def test_public_names():
    for name in ("replace_linears", "DEFAULT_SKIP", "save_quantized", "load_quantized"):
        assert hasattr(vlmkern, name)
