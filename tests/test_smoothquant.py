"""SmoothQuant for integer-activation formats: the scale formula and its edge
cases, exact folding, and the integer-path error it removes."""
import pytest
import torch
import torch.nn.functional as F

import vlmkern
from vlmkern.config import IntActConfig
from vlmkern.ops.reference import int_act_matmul
from vlmkern.quant.smoothquant import (activation_absmax, fold_scales_into_linear,
                                       fold_scales_into_norm, smooth_scales, smooth_weights,
                                       smoothquant_quantize, weight_absmax)


def test_scale_formula_and_alpha_limits():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=gen) * 30 + 0.1
    w = torch.rand(50, generator=gen) + 0.01
    s = smooth_scales(a, w, 0.5)
    assert torch.allclose(s, (a.double().sqrt() / w.double().sqrt()).float(), rtol=1e-6)
    # alpha = 0: activations scaled by the weight maxima only, whatever they are
    assert torch.allclose(smooth_scales(a, w, 0.0), 1 / w, rtol=1e-6)
    assert torch.equal(smooth_scales(a, w, 0.0), smooth_scales(a * 7 + 1, w, 0.0))
    assert torch.allclose(smooth_scales(a, w, 1.0), a, rtol=1e-6)
    # the balance the formula is for: after smoothing both maxima are equal at 0.5
    assert torch.allclose(a / s, w * s, rtol=1e-5)


def test_zero_channels_give_unit_scales():
    a = torch.tensor([0.0, 2.0, 3.0, 0.0, 4.0])
    w = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0])
    for alpha in (0.0, 0.5, 1.0):
        s = smooth_scales(a, w, alpha)
        assert bool(torch.isfinite(s).all())
        assert s[[0, 1, 3]].tolist() == [1.0, 1.0, 1.0]
    x = torch.randn(8, 5)
    x[:, 0] = 0
    ws = [torch.randn(4, 5), torch.randn(3, 5)]
    ws[0][:, 1] = 0
    ws[1][:, 1] = 0
    smoothed, s = smooth_weights(ws, activation_absmax(x))
    assert bool(torch.isfinite(s).all()) and s[0] == 1 and s[1] == 1
    assert all(bool(torch.isfinite(v).all()) for v in smoothed)
    g, b = fold_scales_into_norm(torch.ones(5), torch.zeros(5), s)
    assert bool(torch.isfinite(g).all() & torch.isfinite(b).all())


def test_weight_absmax_spans_all_linears():
    w1 = torch.tensor([[1.0, -5.0], [0.5, 2.0]])
    w2 = torch.tensor([[-3.0, 1.0]])
    assert weight_absmax([w1, w2]).tolist() == [3.0, 5.0]


def test_folding_preserves_the_dense_function():
    gen = torch.Generator().manual_seed(1)
    k = 48
    x = torch.randn(12, k, generator=gen, dtype=torch.float64)
    x[:, [3, 17]] *= 40
    gamma = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(k, generator=gen, dtype=torch.float64)
    ws = [torch.randn(n, k, generator=gen, dtype=torch.float64) for n in (16, 8)]
    h = F.layer_norm(x, (k,), gamma, beta)
    smoothed, s = smooth_weights(ws, activation_absmax(h))
    assert all(v.dtype == torch.float64 for v in smoothed)
    g2, b2 = fold_scales_into_norm(gamma, beta, s)
    h2 = F.layer_norm(x, (k,), g2, b2)
    for w, v in zip(ws, smoothed):
        assert torch.allclose(h2 @ v.T, h @ w.T, rtol=1e-12, atol=1e-12)
    # the same through a previous linear
    w_prev = torch.randn(k, 20, generator=gen, dtype=torch.float64)
    wp2, bp2 = fold_scales_into_linear(w_prev, beta, s)
    x20 = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    assert torch.allclose(F.linear(x20, wp2, bp2) @ smoothed[0].T,
                          F.linear(x20, w_prev, beta) @ ws[0].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits", [8, 4])
def test_smoothing_lowers_the_integer_path_error(bits):
    gen = torch.Generator().manual_seed(bits)
    k, t = 512, 256
    ws = [torch.randn(128, k, generator=gen) * 0.05 for _ in range(2)]
    out = torch.randperm(k, generator=gen)[:6]
    x, x_test = torch.randn(t, k, generator=gen), torch.randn(t, k, generator=gen)
    x[:, out] *= 50
    x_test[:, out] *= 50
    config = IntActConfig(w_bits=bits, a_bits=bits)
    qws, s = smoothquant_quantize(ws, activation_absmax(x), config)
    assert all(isinstance(q, vlmkern.IntActWeight) for q in qws)
    e_smooth = sum(float((int_act_matmul(x_test / s, q) - x_test @ w.T).pow(2).sum())
                   for w, q in zip(ws, qws))
    e_plain = sum(float((int_act_matmul(x_test, vlmkern.quantize_rtn(w, config))
                         - x_test @ w.T).pow(2).sum()) for w in ws)
    assert e_smooth < (0.2 if bits == 8 else 0.8) * e_plain, (e_smooth, e_plain)


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(torch.ones(3), torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="\\[K\\]"):
        smooth_scales(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        smooth_scales(torch.tensor([1.0, float("nan")]), torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        smooth_scales(torch.tensor([1.0, -1.0]), torch.ones(2))
    with pytest.raises(ValueError, match="in_features"):
        weight_absmax([torch.ones(2, 3), torch.ones(2, 4)])
    with pytest.raises(TypeError, match="IntActConfig"):
        smoothquant_quantize([torch.ones(2, 3)], torch.ones(3), vlmkern.QuantConfig())
    with pytest.raises(ValueError, match="NaN"):
        activation_absmax(torch.tensor([[1.0, float("inf")]]))
