"""Bad inputs to the quantizers, configs and packed formats: each gets a clear
ValueError/TypeError (FormatError for stored weights), never a crash, a huge
allocation or a silently wrong weight; the valid neighbours keep working."""
import dataclasses

import pytest
import torch

import vlmkern
from vlmkern import (
    BinaryConfig,
    BinaryWeight,
    FormatError,
    IntActConfig,
    IntActWeight,
    QuantConfig,
    QuantizedWeight,
)
from vlmkern.formats.gptq_layout import from_gptq, to_gptq
from vlmkern.quant.awq import (
    AWQConfig,
    apply_awq,
    awq_quantize,
    awq_search_clip,
    awq_search_scales,
)
from vlmkern.quant.billm import billm_quantize
from vlmkern.quant.gptq import GPTAQConfig, GPTQConfig, gptaq_quantize, gptq_quantize
from vlmkern.quant.hessian import HessianAccumulator
from vlmkern.quant.vlmq import VLMQConfig, vlmq_quantize

NO_TOKENS = "Hessian is all zero: no calibration tokens"


def weights(n=16, k=64, seed=0, scale=0.02):
    """Weights of a realistic magnitude (std 0.02, as in trained LLM linears)."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def label(config) -> str:
    text = config.label
    if isinstance(config, IntActConfig):
        text += f" g{config.group_size}"
    return text.replace(" ", "_")


def same_packed(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------------------
# An all-zero Hessian (no calibration token reached the layer)
# ---------------------------------------------------------------------------

def test_hessian_of_no_tokens_raises_in_gptq():
    acc = HessianAccumulator(64)
    acc.add(torch.randn(0, 64))               # every token masked out
    assert acc.tokens == 0
    with pytest.raises(ValueError, match=NO_TOKENS):
        gptq_quantize(weights(), acc.hessian, GPTQConfig(QuantConfig(4, 32)))
    with pytest.raises(ValueError, match=NO_TOKENS):
        gptq_quantize(weights(), torch.zeros(64, 64), GPTQConfig(QuantConfig(4, 32),
                                                                 act_order=True))


def test_hessian_of_no_tokens_raises_in_gptaq_and_vlmq():
    acc = HessianAccumulator(64)
    acc.add_pair(torch.randn(0, 64), torch.randn(0, 64))
    assert acc.delta is None                  # it never learnt it was paired
    with pytest.raises(ValueError, match=NO_TOKENS):
        gptaq_quantize(weights(), acc.hessian, acc.delta, GPTQConfig(QuantConfig(4, 32)))
    with pytest.raises(ValueError, match=NO_TOKENS):
        gptaq_quantize(weights(), torch.zeros(64, 64), torch.zeros(64, 64))
    with pytest.raises(ValueError, match=NO_TOKENS):
        vlmq_quantize(weights(), acc, VLMQConfig(base=GPTAQConfig()))
    with pytest.raises(ValueError, match=NO_TOKENS):
        vlmq_quantize(weights(), HessianAccumulator(64), VLMQConfig(base=GPTQConfig()))


def test_hessian_of_no_tokens_raises_in_billm():
    with pytest.raises(ValueError, match=NO_TOKENS):
        billm_quantize(weights(), torch.zeros(64, 64))


def test_some_dead_channels_still_get_weight_zero():
    h = torch.eye(64)
    h[[3, 40], [3, 40]] = 0
    w = weights()
    deq = gptq_quantize(w, h, GPTQConfig(QuantConfig(4, 32)))[0].dequantize()
    assert torch.equal(deq[:, [3, 40]], torch.zeros(16, 2))
    assert bool((deq[:, 0] != 0).any())
    _, stats = billm_quantize(w, h)
    assert stats["dead_columns"] == 2


# ---------------------------------------------------------------------------
# Scales too small for float16
# ---------------------------------------------------------------------------

SMALL_ROW_CONFIGS = [QuantConfig(4, 64), QuantConfig(4, 32, sym=True), QuantConfig(8, None),
                     QuantConfig(2, 16), QuantConfig(3, 64), IntActConfig(8, 8),
                     IntActConfig(4, 4, group_size=32)]


@pytest.mark.parametrize("config", SMALL_ROW_CONFIGS, ids=label)
def test_tiny_weights_raise_instead_of_dequantizing_to_zero(config):
    w = weights()
    w[0] *= 1e-6                              # |w| ~ 2e-8: its scale is an fp16 subnormal
    with pytest.raises(ValueError, match="too small for torch.float16 scales.*float32"):
        vlmkern.quantize_weight(w, config)
    for dtype in ("float32", "bfloat16"):     # scales with fp32's exponent range hold it
        qw = vlmkern.quantize_weight(w, dataclasses.replace(config, scale_dtype=dtype))
        err = (qw.dequantize()[0] - w[0]).abs().max() / w[0].abs().max()
        assert float(err) < 0.7


def test_tiny_weights_raise_in_gptq_and_awq():
    w = weights()
    w[0] *= 1e-6
    with pytest.raises(ValueError, match="too small"):
        gptq_quantize(w, torch.eye(64), GPTQConfig(QuantConfig(4, 32)))
    with pytest.raises(ValueError, match="too small"):
        awq_quantize([w], torch.randn(32, 64), AWQConfig(QuantConfig(4, 32), n_grid=2))


@pytest.mark.parametrize("sym", (False, True), ids=("asym", "sym"))
def test_small_scale_limit_is_two_to_the_minus_20(sym):
    """A W8 scale of exactly 2^-20 (an fp16 subnormal of 16 steps: rounding up
    stretches it by at most 1/16) is stored; anything below raises."""
    limit = torch.tensor(255 * 2.0 ** -21)    # 2 * limit / 255 = 2^-20 exactly
    w = torch.zeros(2, 32)
    w[:, 0] = limit
    if not sym:
        w[:, 1] = -limit                      # asym: (max - min) / 255 = 2^-20
    cfg = QuantConfig(8, 32, sym=sym)
    qw = vlmkern.quantize_rtn(w, cfg)
    assert torch.equal(qw.scales, torch.full((2, 1), 2.0 ** -20, dtype=torch.float16))
    w[1] = torch.nextafter(w[1], torch.zeros_like(w[1]))
    with pytest.raises(ValueError, match="too small"):
        vlmkern.quantize_rtn(w, cfg)


@pytest.mark.parametrize("config", [QuantConfig(8, 8), QuantConfig(8, 8, sym=True),
                                    IntActConfig(8, 8, group_size=8)], ids=label)
def test_small_subnormal_scales_of_trained_weights_still_quantize(config):
    """Vision-tower weights give W8 scales near 2^-18 with small groups: fp16
    subnormals, stretched by at most 2^-6 when rounded up. They quantize, each
    weight within half a (stretched) step."""
    w = weights(8, 64, seed=3, scale=2e-3)
    w[0] *= 0.1                               # |w| ~ 2e-4: scales ~ 2^-18
    qw = vlmkern.quantize_weight(w, config)
    step = qw.scales.float().repeat_interleave(8, dim=1)
    assert float(qw.scales[0].float().min()) < 2.0 ** -16
    assert bool(((qw.dequantize() - w).abs() <= 0.5 * step * (1 + 2.0 ** -6)).all())


def test_all_zero_groups_are_unaffected():
    w = weights()
    w[0] = 0
    w[1, :32] = 0
    qw = vlmkern.quantize_rtn(w, QuantConfig(4, 32))
    assert torch.equal(qw.dequantize()[0], torch.zeros(64))
    assert torch.equal(qw.dequantize()[1, :32], torch.zeros(32))
    assert torch.equal(vlmkern.binarize(w).dequantize()[0], torch.zeros(64))


@pytest.mark.parametrize("config", [QuantConfig(8, 32), QuantConfig(8, 32, sym=True),
                                    QuantConfig(2, 32), IntActConfig(8, 8),
                                    IntActConfig(8, 8, group_size=32), BinaryConfig()],
                         ids=label)
def test_realistic_weights_never_hit_the_small_scale_error(config):
    vlmkern.quantize_weight(weights(512, 1024, seed=1), config)


def test_tiny_binary_statistics_raise():
    w = weights()
    w[0] *= 1e-6
    with pytest.raises(ValueError, match="too small.*stats_dtype='float32'"):
        vlmkern.binarize(w)
    with pytest.raises(ValueError, match="too small.*stats_dtype='float32'"):
        billm_quantize(w, torch.eye(64))
    for dtype in ("float32", "bfloat16"):
        bw = vlmkern.binarize(w, BinaryConfig(stats_dtype=dtype))
        assert bool((bw.dequantize()[0] != 0).all())


def test_huge_binary_statistics_suggest_float32():
    w = weights() * 1e8                        # finite weights, statistics past 65504
    with pytest.raises(ValueError, match="too large.*stats_dtype='float32'"):
        vlmkern.binarize(w)
    with pytest.raises(ValueError, match="too large.*stats_dtype='float32'"):
        billm_quantize(w, torch.eye(64))
    bw = vlmkern.binarize(w, BinaryConfig(stats_dtype="float32"))
    assert bool(torch.isfinite(bw.dequantize()).all())


# ---------------------------------------------------------------------------
# Weights without values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", [QuantConfig(4, 32), IntActConfig(), BinaryConfig()],
                         ids=label)
def test_meta_weights_are_refused(config):
    with pytest.raises(ValueError, match="meta device"):
        vlmkern.quantize_weight(torch.empty(16, 64, device="meta"), config)


# ---------------------------------------------------------------------------
# Config field types
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make,exc,match", [
    (lambda: QuantConfig(sym="no"), TypeError, "sym"),
    (lambda: QuantConfig(sym=None), TypeError, "sym"),
    (lambda: QuantConfig(sym=1), TypeError, "sym"),
    (lambda: QuantConfig(bits=4.0), ValueError, "bits"),
    (lambda: QuantConfig(bits=True), ValueError, "bits"),
    (lambda: QuantConfig(group_size=True), ValueError, "group_size"),
    (lambda: IntActConfig(w_bits=8.0), ValueError, "w_bits"),
    (lambda: IntActConfig(a_bits=8.0), ValueError, "a_bits"),
    (lambda: IntActConfig(act_scale="x"), ValueError, "act_scale"),
    (lambda: IntActConfig(act_scale=True), ValueError, "act_scale"),
    (lambda: BinaryConfig(block_size=True), ValueError, "^block_size must"),
    (lambda: BinaryConfig(max_salient=True), ValueError, "max_salient"),
    (lambda: BinaryConfig(quantiles="abc"), ValueError, "quantiles"),
    (lambda: BinaryConfig(quantiles=None), ValueError, "quantiles"),
    (lambda: GPTQConfig(act_order="no"), TypeError, "act_order"),
    (lambda: GPTQConfig(static_groups=1), TypeError, "static_groups"),
    (lambda: GPTQConfig(max_damp_retries=True), ValueError, "max_damp_retries"),
], ids=["sym_str", "sym_none", "sym_int", "bits_float", "bits_bool", "group_bool",
        "w_bits_float", "a_bits_float", "act_scale_str", "act_scale_bool", "block_bool",
        "salient_bool", "quantiles_str", "quantiles_none", "act_order_str", "static_int",
        "retries_bool"])
def test_config_field_types(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_valid_configs_still_build():
    assert QuantConfig(4, 32, sym=True).sym is True
    assert IntActConfig(8, 8, act_scale=1).act_scale == 1.0
    assert BinaryConfig(block_size=64, max_salient=0, quantiles=[0.5]).quantiles == (0.5,)
    assert GPTQConfig(act_order=True, static_groups=True).act_order


# ---------------------------------------------------------------------------
# Stored metadata types
# ---------------------------------------------------------------------------

def test_groupwise_metadata_types():
    qw = vlmkern.quantize_rtn(weights(), QuantConfig(4, 32))
    for change, match in [({"bits": 4.0}, "bits"), ({"bits": True}, "bits"),
                          ({"group_size": True}, "group_size"),
                          ({"group_size": 32.0}, "group_size"),
                          ({"in_features": True}, "in_features")]:
        with pytest.raises(FormatError, match=match):
            QuantizedWeight.from_state(qw.tensors(), {**qw.meta(), **change})
    assert same_packed(QuantizedWeight.from_state(qw.tensors(), qw.meta()), qw)


def test_intact_metadata_types():
    qw = vlmkern.quantize_rtn(weights(), IntActConfig(8, 8, group_size=32))
    for change, match in [({"w_bits": 8.0}, "w_bits"), ({"a_bits": 8.0}, "a_bits"),
                          ({"group_size": 0}, "group_size"),
                          ({"group_size": 32.0}, "group_size"),
                          ({"act_scale": "x"}, "act_scale")]:
        with pytest.raises(FormatError, match=match):
            IntActWeight.from_state(qw.tensors(), {**qw.meta(), **change})


def test_binary_metadata_types():
    bw = vlmkern.binarize(weights())
    for change, match in [({"block_size": True}, "block_size"),
                          ({"block_size": 128.0}, "block_size"),
                          ({"in_features": 64.0}, "in_features")]:
        with pytest.raises(FormatError, match=match):
            BinaryWeight.from_state(bw.tensors(), {**bw.meta(), **change})


# ---------------------------------------------------------------------------
# A group at least as wide as the row
# ---------------------------------------------------------------------------

HUGE_GROUP = 2 ** 40                           # padding rows to it would need terabytes


@pytest.mark.parametrize("config", [QuantConfig(4, HUGE_GROUP), QuantConfig(3, HUGE_GROUP, True),
                                    IntActConfig(8, 8, group_size=HUGE_GROUP)],
                         ids=label)
def test_group_wider_than_the_row_is_one_group(config):
    w = weights()
    qw = vlmkern.quantize_weight(w, config)
    row = vlmkern.quantize_weight(w, dataclasses.replace(config, group_size=None))
    assert qw.group_size == HUGE_GROUP and qw.scales.shape == (16, 1)
    assert torch.equal(qw.dequantize(), row.dequantize())
    assert torch.equal(qw.scales, row.scales) and torch.equal(qw.codes(), row.codes())


def test_group_wider_than_the_row_in_gptq_and_awq():
    w, x = weights(), torch.randn(64, 64)
    row = QuantConfig(4, None)
    huge = QuantConfig(4, HUGE_GROUP)
    h = torch.eye(64) + 0.1
    assert torch.equal(gptq_quantize(w, h, GPTQConfig(huge))[0].dequantize(),
                       gptq_quantize(w, h, GPTQConfig(row))[0].dequantize())
    assert torch.equal(awq_quantize([w], x, AWQConfig(huge, n_grid=3, clip_steps=3))[0][0]
                       .dequantize(),
                       awq_quantize([w], x, AWQConfig(row, n_grid=3, clip_steps=3))[0][0]
                       .dequantize())


def test_group_128_on_64_columns_keeps_its_stored_form():
    w = weights()
    qw = vlmkern.quantize_rtn(w, QuantConfig(4, 128))
    row = vlmkern.quantize_rtn(w, QuantConfig(4, None))
    assert qw.group_size == 128 and qw.meta()["group_size"] == 128
    assert torch.equal(qw.qweight, row.qweight) and torch.equal(qw.scales, row.scales)
    assert torch.equal(qw.qzeros, row.qzeros)


# ---------------------------------------------------------------------------
# Wrong config or weight types
# ---------------------------------------------------------------------------

def test_wrong_config_types_name_the_expected_one():
    w, x = weights(), torch.randn(32, 64)
    with pytest.raises(TypeError, match="BiLLMConfig"):
        billm_quantize(w, torch.eye(64), BinaryConfig())
    with pytest.raises(TypeError, match="AWQConfig"):
        awq_quantize([w], x, QuantConfig())
    for fn in (lambda c: awq_search_scales([w], x, c), lambda c: awq_search_clip(w, x, c),
               lambda c: apply_awq(w, None, None, c)):
        with pytest.raises(TypeError, match="QuantConfig"):
            fn(AWQConfig())
    with pytest.raises(TypeError, match="BinaryConfig"):
        vlmkern.binarize(w, QuantConfig())
    with pytest.raises(TypeError, match="QuantizedWeight"):
        to_gptq(vlmkern.quantize_rtn(w, IntActConfig()))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        to_gptq(vlmkern.binarize(w))


# ---------------------------------------------------------------------------
# GPTQ checkpoint import arguments
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint():
    return to_gptq(vlmkern.quantize_rtn(weights(64, 128), QuantConfig(4, 32)))


GROUP = "group_size .*must be a positive int"


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"group_size": 0}, FormatError, GROUP),
    ({"group_size": -2}, FormatError, GROUP),
    ({"group_size": 32.0}, FormatError, GROUP),
    ({"group_size": True}, FormatError, GROUP),
    ({"group_size": "32"}, FormatError, GROUP),
    ({"bits": 4.0}, FormatError, "bits must be"),
    ({"bits": True}, FormatError, "bits must be"),
    ({"sym": "no"}, TypeError, "sym"),
], ids=["g0", "g-2", "g_float", "g_bool", "g_str", "bits_float", "bits_bool", "sym_str"])
def test_from_gptq_arguments(checkpoint, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        from_gptq(**checkpoint, **{"bits": 4, "group_size": 32, **kwargs})


def test_from_gptq_valid_arguments(checkpoint):
    qw = from_gptq(**checkpoint, bits=4, group_size=32, sym=False)
    assert qw.group_size == 32 and qw.bits == 4
    whole = to_gptq(vlmkern.quantize_rtn(weights(64, 128), QuantConfig(4, None)))
    assert from_gptq(**whole, bits=4, group_size=-1).group_size is None


def test_hessians_with_negative_diagonals_or_no_values_are_refused():
    w = torch.randn(8, 16)
    h = torch.eye(16) * 100
    h[0, 0] = -1.0                       # no sum of x x^T: damping would hide it
    with pytest.raises(ValueError, match="1 negative diagonal entries"):
        gptq_quantize(w, h, GPTQConfig())
    with pytest.raises(ValueError, match="negative diagonal"):
        billm_quantize(w, h)
    with pytest.raises(ValueError, match="hessian is on the meta device"):
        gptq_quantize(w, torch.empty(16, 16, device="meta"), GPTQConfig())


def test_gptaq_alpha_must_be_a_number():
    w, h, d = torch.randn(8, 16), torch.eye(16), torch.zeros(16, 16)
    for bad in (True, "x", float("nan"), -1.0):     # None: the default, 0.25
        with pytest.raises((TypeError, ValueError), match="alpha"):
            gptaq_quantize(w, h, d, GPTQConfig(), bad)


def test_binarize_saliency_must_be_a_finite_tensor():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="saliency holds NaN"):
        vlmkern.binarize(w, saliency=torch.full((16,), float("nan")))
    with pytest.raises(TypeError, match="saliency must be a torch.Tensor, got list"):
        vlmkern.binarize(w, saliency=[1.0] * 16)


def test_smoothing_that_overflows_an_fp16_weight_says_so():
    from vlmkern.quant.smoothquant import smoothquant_quantize
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="times the smoothing scales overflows torch.float16"):
        smoothquant_quantize([w.half()], torch.full((16,), 1e12),
                             IntActConfig(8, 8, scale_dtype="float32"), 0.5)
    smoothquant_quantize([w], torch.full((16,), 1e12), IntActConfig(8, 8, scale_dtype="float32"),
                         0.5)                                      # fp32 weights: no overflow
