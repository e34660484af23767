"""QuantLinear layers and ops.linear given bad biases or bad packed tensors:
clear errors, and nothing invalid loaded."""
import re

import pytest
import torch
from torch import nn

from vlmkern import BinaryConfig, IntActConfig, QuantConfig, QuantLinear, ops
from vlmkern.nn.modules import validated_elsewhere

CONFIGS = {"w4": QuantConfig(4, 32), "w8a8": IntActConfig(8, 8), "binary": BinaryConfig()}


def _layer(kind: str, bias: bool = True) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(torch.nn.Linear(256, 16, bias=bias), CONFIGS[kind])


def test_quant_linear_takes_only_quantized_weights():
    with pytest.raises(TypeError, match="takes a vlmkern quantized weight, got Tensor"):
        QuantLinear(torch.randn(16, 64))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_non_finite_or_non_float_bias_is_refused(kind):
    linear = torch.nn.Linear(256, 16)
    with torch.no_grad():
        linear.bias[3] = float("nan")
    with pytest.raises(ValueError, match="bias holds NaN or Inf"):
        QuantLinear.from_linear(linear, CONFIGS[kind])
    layer = _layer(kind, bias=False)
    x = torch.randn(2, 256)
    for bias, error, match in ((torch.full((16,), float("inf")), ValueError, "bias holds NaN"),
                               (torch.ones(16, dtype=torch.int32), TypeError, "int32"),
                               (torch.ones(16, dtype=torch.bool), TypeError, "bool"),
                               (torch.ones(16, dtype=torch.complex64), TypeError, "complex64")):
        with pytest.raises(error, match=match):
            ops.linear(x, layer.quantized_weight, bias)
    ops.linear(x, layer.quantized_weight, torch.ones(16, dtype=torch.float64))   # a float bias runs


@pytest.mark.parametrize("kind, name, bad", [
    ("w4", "scales", lambda t: t.index_fill_(0, torch.tensor([0]), float("nan"))),
    ("w8a8", "qweight", lambda t: t.index_fill_(0, torch.tensor([0]), -128)),
    ("binary", "stats", lambda t: t.index_fill_(0, torch.tensor([1]), float("inf"))),
])
def test_load_state_dict_refuses_tensors_the_format_rejects(kind, name, bad):
    layer = _layer(kind)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = {k: v.clone() for k, v in before.items()}
    bad(state[name])
    with pytest.raises(RuntimeError, match="Error.*loading state_dict"):
        layer.load_state_dict(state)
    for k, v in layer.state_dict().items():             # nothing of the bad set was loaded
        assert torch.equal(v, before[k]), k
    good = _layer(kind)
    with torch.no_grad():
        good.bias.add_(1)
    layer.load_state_dict(good.state_dict())            # a valid set loads
    assert torch.equal(layer.bias, good.bias)
    with validated_elsewhere():                         # a caller that checked already
        layer.load_state_dict(state)
    assert not torch.equal(getattr(layer, name), before[name])


def test_load_state_dict_into_a_laid_out_layer_checks_the_format():
    layer = _layer("w4").to_kernel_layout()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["scales"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="scales holds NaN or Inf"):
        layer.load_state_dict(state)
    assert torch.isfinite(layer.scales).all()


def test_load_state_dict_refuses_a_scale_cast_that_changes_values():
    # bf16 scales copied into fp16 buffers would be rounded (large ones become Inf)
    linear = torch.nn.Linear(256, 16)
    fp16 = QuantLinear.from_linear(linear, QuantConfig(4, 32))
    bf16 = QuantLinear.from_linear(linear, QuantConfig(4, 32, scale_dtype="bfloat16"))
    state = bf16.state_dict()
    state["scales"] = state["scales"] * 1e30            # far past fp16's range
    before = fp16.scales.clone()
    with pytest.raises(RuntimeError, match="scales is torch.bfloat16 in the state dict and "
                                           "torch.float16 in this layer"):
        fp16.load_state_dict(state)
    assert torch.equal(fp16.scales, before)             # nothing loaded
    wide = QuantLinear.from_linear(linear, QuantConfig(4, 32, scale_dtype="float32"))
    wide.load_state_dict(fp16.state_dict())             # fp16 -> fp32 is exact: loads
    assert torch.equal(wide.scales, fp16.scales.float())


@pytest.mark.parametrize("name, shape", [("qweight", (3, 8)), ("qweight", (64, 8)),
                                         ("scales", (5, 2))])
def test_load_state_dict_names_the_tensor_of_the_wrong_shape(name, shape):
    lin = nn.Linear(64, 128)
    q = QuantLinear.from_linear(lin, QuantConfig(4, 32))
    sd = q.state_dict()
    sd[name] = torch.zeros(shape, dtype=sd[name].dtype)
    want = (f"{name} has shape {shape} in the state dict, this layer's is "
            f"{tuple(q.state_dict()[name].shape)}")
    with pytest.raises(RuntimeError, match=re.escape(want)):
        q.load_state_dict(sd)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_load_state_dict_under_inference_mode_drops_cached_kernel_layouts(kind):
    # inference tensors have no version counter, and loading writes into the
    # same storage: only a new weight object makes the layout caches miss
    from vlmkern.ops import cuda_weight_only as cw
    with torch.inference_mode():
        layer = _layer(kind)
        torch.manual_seed(1)
        other = QuantLinear.from_linear(torch.nn.Linear(256, 16), CONFIGS[kind])
        old = layer.quantized_weight
        cached = cw.kernel_weight(old, torch.float16) if kind == "w4" else None
        layer.load_state_dict(other.state_dict())
        assert layer.quantized_weight is not old
        assert torch.equal(layer.quantized_weight.dequantize(), other.quantized_weight.dequantize())
        if kind == "w4":
            now = cw.kernel_weight(layer.quantized_weight, torch.float16)
            assert now is not cached
            assert torch.equal(now.wq, cw.to_mma_layout(other.quantized_weight, torch.float16).wq)


def test_replace_linears_says_when_linears_are_already_quantized():
    from vlmkern import replace_linears
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    replace_linears(model, {"0": QuantConfig(4, 32)}, progress=False)
    _, report = replace_linears(model, QuantConfig(4, 32), progress=False)
    assert len(report.rows) == 1 and "1 linears were already quantized" in str(report)
    with pytest.raises(ValueError, match="its 2 linears are already quantized"):
        replace_linears(model, QuantConfig(4, 32), progress=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_layer_holds_its_weight_for_compiled_calls(how):
    import copy
    import io

    from vlmkern.ops import compiled
    q = QuantLinear.from_linear(nn.Linear(64, 32), QuantConfig(4, 32))
    if how == "deepcopy":
        c = copy.deepcopy(q)
    else:
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        c = torch.load(buf, weights_only=False)
    qw = c.quantized_weight
    tensors = [t for t in qw.tensors().values() if t is not None]
    # the compiled op finds the copy's own weight object, without a rebuild
    assert compiled._weight(tensors, type(qw).__name__, compiled.describe(qw), warn=False,
                            check=False) is qw


def test_report_labels_tell_settings_apart():
    assert QuantConfig(3, None).label == "W3 per-row asym"
    assert QuantConfig(4, 64, sym=True).label == "W4 g64 sym"
    labels = {IntActConfig(8, 8).label, IntActConfig(8, 8, group_size=32).label,
              IntActConfig(8, 8, act_scale=0.05).label}
    assert labels == {"W8A8", "W8A8 g32", "W8A8 static 0.05"}
