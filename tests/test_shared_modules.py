"""One nn.Linear registered under two names (the same object at two places of
the module tree) is one layer: quantized once and installed under both names,
saved and loaded as such; names the plan gives different settings are refused."""
import copy

import pytest
import torch
from torch import nn

import vlmkern
from vlmkern import (
    QuantConfig,
    QuantLinear,
    load_quantized,
    replace_linears,
    save_quantized,
)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64)
        self.b = self.a                     # the same layer under a second name
        self.c = nn.Linear(64, 32)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_every_name_of_a_shared_linear_gets_the_quantized_layer():
    model, report = replace_linears(Twice(), QuantConfig(4, 32), progress=False)
    assert isinstance(model.a, QuantLinear) and model.b is model.a
    assert [row.module for row in report.rows] == ["a", "c"]     # one layer, counted once
    x = torch.randn(3, 64)
    w = model.a.quantized_weight.dequantize()
    ref = torch.nn.functional.linear
    expected = model.c(ref(ref(x, w, model.a.bias), w, model.a.bias))
    torch.testing.assert_close(model(x), expected)


def test_a_weight_given_for_the_second_name():
    w = vlmkern.quantize_rtn(torch.randn(64, 64), QuantConfig(4, 32))
    model, _ = replace_linears(Twice(), {"b": w}, progress=False)
    assert model.a is model.b and torch.equal(model.a.quantized_weight.qweight, w.qweight)


@pytest.mark.parametrize("plan, skip", [
    ({"a": QuantConfig(4, 32), "b": QuantConfig(8, 32)}, ()),
    ({"a": QuantConfig(4, 32), "b": None}, ()),
    ({"*": QuantConfig(4, 32)}, ("b",)),
])
def test_names_of_one_linear_with_different_settings_are_refused(plan, skip):
    model = Twice()
    with pytest.raises(ValueError, match="a and b are one nn.Linear under two names"):
        replace_linears(model, plan, skip=skip, progress=False)
    assert isinstance(model.a, nn.Linear) and model.b is model.a          # nothing changed


def test_equal_settings_and_full_precision_agree():
    model, _ = replace_linears(Twice(), {"a": QuantConfig(4, 32), "b": QuantConfig(4, 32)},
                               progress=False)
    assert isinstance(model.b, QuantLinear) and model.b is model.a
    model, report = replace_linears(Twice(), {"a": None, "c": QuantConfig(4, 32)}, skip=("b",),
                                    progress=False)
    assert isinstance(model.a, nn.Linear) and model.b is model.a and report.kept == ["a"]


def test_save_and_load_keep_one_layer_under_both_names(tmp_path):
    model, _ = replace_linears(Twice(), QuantConfig(4, 32), progress=False)
    x = torch.randn(3, 64)
    save_quantized(model, tmp_path)
    fresh = load_quantized(Twice(), tmp_path)
    assert isinstance(fresh.a, QuantLinear) and fresh.b is fresh.a
    assert torch.equal(fresh(x), model(x))
    plan = vlmkern.io.read_plan(tmp_path)           # the plan names the layer once, by "a"
    again, _ = replace_linears(Twice(), plan, progress=False)
    assert again.b is again.a and isinstance(again.a, QuantLinear)
    copied = copy.deepcopy(fresh)
    assert copied.b is copied.a


class Apart(Twice):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(64, 64)          # a layer of its own


def test_a_refused_file_leaves_every_name_of_a_shared_linear_as_it_was(tmp_path):
    model, _ = replace_linears(Twice(), QuantConfig(4, 32), progress=False)
    model.extra = nn.Parameter(torch.zeros(5))
    save_quantized(model, tmp_path)
    target = Twice()
    target.extra = nn.Parameter(torch.zeros(6))     # refused after the layers went in
    x = torch.randn(3, 64)
    expected = target(x)
    with pytest.raises(vlmkern.io.CheckpointError, match="extra has shape"):
        load_quantized(target, tmp_path)
    assert type(target.a) is nn.Linear and target.b is target.a
    assert torch.equal(target(x), expected)


def test_a_file_with_the_second_name_as_its_own_layer_is_refused_by_name(tmp_path):
    model, _ = replace_linears(Apart(), QuantConfig(4, 32), progress=False)
    save_quantized(model, tmp_path)
    target = Twice()
    with pytest.raises(vlmkern.io.CheckpointError, match="'b' is one module with 'a' in this model"):
        load_quantized(target, tmp_path)
    assert type(target.a) is nn.Linear and target.b is target.a
