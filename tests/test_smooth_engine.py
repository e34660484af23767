"""SmoothQuant on whole models: the folded model computes the same function,
the smoothed activation maxima are what the formula says, and on inputs with
outlier channels SmoothQuant + per-token RTN beats per-token RTN."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import build_llama, build_llava, build_qwen2vl  # noqa: E402
from tiny_models import rel_error as _rel  # noqa: E402

from vlmkern import IntActConfig, replace_linears  # noqa: E402
from vlmkern.calib.arch import decoder_layers  # noqa: E402
from vlmkern.calib.smooth_engine import (activation_maxima, smooth_model,  # noqa: E402
                                         smoothing_groups)
from vlmkern.quant.smoothquant import smooth_scales, weight_absmax  # noqa: E402

BUILDERS = {"llama": build_llama, "llava": build_llava, "qwen2vl": build_qwen2vl}


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.double()


def _plant_outliers(model, channels=(3, 11, 40), factor=40.0):
    """Outlier input channels that leave the FP function unchanged: the norms
    scale some channels up, the linears reading them scale those columns down."""
    with torch.no_grad():
        for _, norm, linears in smoothing_groups(model):
            norm.weight[list(channels)] *= factor
            for lin in linears.values():
                lin.weight[:, list(channels)] /= factor
    return model


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("include_down", [False, True])
def test_smoothing_keeps_the_full_precision_function(kind, include_down):
    model, inputs = BUILDERS[kind]()
    ref = _logits(model, inputs)
    smoothed = copy.deepcopy(model)
    report = smooth_model(smoothed, [inputs], alpha=0.5, include_down=include_down,
                          progress=False)
    n_layers = len(decoder_layers(model)[1])
    assert len(report.groups) == n_layers * (3 if include_down else 2)
    assert _rel(_logits(smoothed, inputs), ref) < 1e-5
    # the weights really moved
    path, _ = decoder_layers(model)
    name = f"{path}.0.self_attn.q_proj.weight"
    assert not torch.allclose(dict(smoothed.named_parameters())[name],
                              dict(model.named_parameters())[name])


def test_smoothed_maxima_follow_the_formula():
    model, inputs = build_llava()
    _plant_outliers(model)
    groups = smoothing_groups(model)
    readers = [next(iter(linears)) for _, _, linears in groups]
    before = activation_maxima(model, [inputs], readers, progress=False)
    w_before = {r: weight_absmax([m.weight for m in linears.values()])
                for r, (_, _, linears) in zip(readers, groups)}
    smoothed = copy.deepcopy(model)
    smooth_model(smoothed, [inputs], alpha=0.5, progress=False)
    after = activation_maxima(smoothed, [inputs], readers, progress=False)
    for r, (_, _, linears) in zip(readers, groups):
        s = smooth_scales(before[r], w_before[r], 0.5)
        assert torch.allclose(after[r], before[r] / s, rtol=1e-4, atol=1e-6)
        # alpha = 0.5 balances activation and weight maxima channel by channel
        w_after = weight_absmax([smoothed.get_submodule(n).weight for n in linears])
        assert torch.allclose(after[r], w_after, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_smoothquant_beats_per_token_rtn_on_outlier_channels(bits):
    model, inputs = build_llama()
    _plant_outliers(model)
    ref = _logits(model, inputs)
    rtn, _ = replace_linears(copy.deepcopy(model), IntActConfig(bits, bits), progress=False)
    smoothed = copy.deepcopy(model)
    smooth_model(smoothed, [inputs], alpha=0.5, progress=False)
    sq, _ = replace_linears(smoothed, IntActConfig(bits, bits), progress=False)
    err_rtn, err_sq = _rel(_logits(rtn, inputs), ref), _rel(_logits(sq, inputs), ref)
    assert err_sq < 0.5 * err_rtn


def test_bad_inputs():
    model, inputs = build_llama()
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(model, [inputs], alpha=1.5)
    with pytest.raises(ValueError, match="at least one"):
        smooth_model(model, [])
    with pytest.raises(TypeError, match="dicts"):
        smooth_model(model, [inputs["input_ids"]], progress=False)
    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        nan_model.model.embed_tokens.weight[inputs["input_ids"][0, 0]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        smooth_model(nan_model, [inputs], progress=False)
