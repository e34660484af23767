"""AWQ-style scaling: exact reductions to RTN, the error it buys on outlier
channels, clip search monotonicity, and exact folding."""
import pytest
import torch
import torch.nn.functional as F

import vlmkern
from vlmkern.config import QuantConfig
from vlmkern.quant.awq import (AWQConfig, apply_awq, awq_quantize, awq_search_clip,
                               awq_search_scales, candidate_scales, fold_scales_into_linear,
                               fold_scales_into_norm, output_error)


def same_weight(a, b):
    return all(torch.equal(getattr(a, t), getattr(b, t)) if getattr(a, t) is not None
               else getattr(b, t) is None for t in a.TENSORS)


def outlier_problem(seed, k=512, t=384, n=96, linears=3, n_out=8, scale=15.0):
    """Linears sharing one input whose few channels are ``scale`` x larger;
    calibration tokens and held-out tokens from the same distribution."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=gen) for _ in range(linears)]
    out = torch.randperm(k, generator=gen)[:n_out]
    xs = []
    for _ in range(2):
        x = torch.randn(t, k, generator=gen)
        x[:, out] *= scale
        xs.append(x)
    return ws, xs[0], xs[1]


@pytest.mark.parametrize("config", [QuantConfig(4, 128), QuantConfig(3, 64, sym=True),
                                    QuantConfig(2, None), QuantConfig(4, 48)])
def test_ratio_zero_is_plain_rtn(config):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(20, 200, generator=gen), torch.randn(50, 200, generator=gen)
    s = candidate_scales(x, 0.0)
    assert torch.equal(s, torch.ones(200))
    rtn = vlmkern.quantize_rtn(w, config)
    assert same_weight(apply_awq(w, s, None, config), rtn)
    groups = rtn.scales.shape[1]
    assert same_weight(apply_awq(w, None, torch.ones(20, groups), config), rtn)
    _, _, losses = awq_search_scales([w], x, config)
    assert float(losses[0]) == pytest.approx(output_error(w, rtn.dequantize(), x), rel=1e-9)


def test_block_error_scores_the_candidates():
    """The search hands block_error Q(W_i s)/s for every linear; scored by the
    linears' outputs it reproduces the default loss, and another score (the
    error of the sum of the outputs) can pick another ratio."""
    ws, x, _ = outlier_problem(3, k=128, t=96, n=16, linears=2)
    config = QuantConfig(3, 32)
    s0, r0, default = awq_search_scales(ws, x, config)
    seen = []

    def own_outputs(approx):
        seen.append(len(approx))
        return sum(output_error(w, a, x) for w, a in zip(ws, approx))

    s1, r1, scored = awq_search_scales(ws, x, config, block_error=own_outputs)
    assert seen == [2] * 20 and r1 == r0 and torch.equal(s1, s0)
    assert torch.allclose(scored, default, rtol=1e-9)

    def summed(approx):
        return output_error(sum(ws), sum(approx), x)

    _, _, losses = awq_search_scales(ws, x, config, block_error=summed)
    assert not torch.allclose(losses, default, rtol=1e-3)
    for i in (0, 7, 19):
        s = candidate_scales(x, i / 20)
        approx = [apply_awq(w, s, None, config).dequantize(torch.float64) / s.double()
                  for w in ws]
        assert float(losses[i]) == pytest.approx(summed(approx), rel=1e-9)


def test_scales_normalised_and_invariant_to_input_scale():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 100, generator=gen) * torch.rand(100, generator=gen) * 5
    x[:, 7] = 0                                   # dead channel: floored, finite
    for r in (0.25, 0.5, 0.95):
        s = candidate_scales(x, r)
        assert bool(torch.isfinite(s).all() & (s > 0).all())
        assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0, rel=1e-5)
        assert torch.allclose(candidate_scales(8 * x, r), s, rtol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_with_outlier_channels(bits):
    ws, x, x_test = outlier_problem(seed=bits)
    config = QuantConfig(bits, 128)
    qws, s, info = awq_quantize(ws, x, AWQConfig(quant=config))
    assert 0 < info["ratio"] < 1
    e_awq = sum(output_error(w, q.dequantize() / s, x_test) for w, q in zip(ws, qws))
    e_rtn = sum(output_error(w, vlmkern.quantize_rtn(w, config).dequantize(), x_test)
                for w in ws)
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)


def test_clip_search_never_increases_the_error():
    ws, x, _ = outlier_problem(seed=5, linears=1, n=48)
    w = ws[0]
    for config in (QuantConfig(3, 128), QuantConfig(4, 64, sym=True), QuantConfig(2, None)):
        s, _, _ = awq_search_scales([w], x, config)
        clip = awq_search_clip(w, x, config, s, steps=10)
        assert bool(((clip >= 0.5) & (clip <= 1.0)).all()) and bool((clip < 1).any())

        def row_errors(c):
            d = w.double() - apply_awq(w, s, c, config).dequantize(torch.float64) / s.double()
            return (d @ x.double().T).pow(2).sum(1)
        base, clipped = row_errors(None), row_errors(clip)
        assert bool((clipped <= base * (1 + 1e-9)).all())      # every row, not just the sum
        assert float(clipped.sum()) < float(base.sum())


def rms_norm(x, gamma, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma


def test_fold_into_norm_preserves_the_dense_function():
    gen = torch.Generator().manual_seed(6)
    k = 64
    x = torch.randn(10, k, generator=gen, dtype=torch.float64)
    w = torch.randn(32, k, generator=gen, dtype=torch.float64)
    gamma, beta = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5, \
        torch.randn(k, generator=gen, dtype=torch.float64)
    s = candidate_scales(x * 10 ** torch.rand(k, generator=gen, dtype=torch.float64), 0.5)
    ws = w * s.double()
    g2, _ = fold_scales_into_norm(gamma, None, s)
    assert torch.allclose(rms_norm(x, g2) @ ws.T, rms_norm(x, gamma) @ w.T, rtol=1e-12,
                          atol=1e-12)
    g2, b2 = fold_scales_into_norm(gamma, beta, s)
    ref = F.layer_norm(x, (k,), gamma, beta) @ w.T
    assert torch.allclose(F.layer_norm(x, (k,), g2, b2) @ ws.T, ref, rtol=1e-12, atol=1e-12)
    assert g2.dtype == torch.float64 and fold_scales_into_norm(gamma.half(), None, s)[0].dtype \
        == torch.float16


def test_fold_into_previous_linear_preserves_the_dense_function():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, 24, generator=gen, dtype=torch.float64)
    w_prev = torch.randn(64, 24, generator=gen, dtype=torch.float64)
    b_prev = torch.randn(64, generator=gen, dtype=torch.float64)
    w = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    s = 0.1 + torch.rand(64, generator=gen) * 4
    wp2, bp2 = fold_scales_into_linear(w_prev, b_prev, s)
    got = F.linear(F.linear(x, wp2, bp2), w * s.double())
    assert torch.allclose(got, F.linear(F.linear(x, w_prev, b_prev), w), rtol=1e-12, atol=1e-12)
    assert fold_scales_into_linear(w_prev, None, s)[1] is None


def test_bad_inputs():
    w, x = torch.randn(8, 32), torch.randn(16, 32)
    cfg = QuantConfig(4, 16)
    with pytest.raises(ValueError, match="in_features"):
        awq_search_scales([w, torch.randn(8, 31)], x, cfg)
    with pytest.raises(ValueError, match="x must be"):
        awq_search_scales([w], torch.randn(16, 31), cfg)
    with pytest.raises(TypeError, match="sequence"):
        awq_search_scales(w, x, cfg)
    with pytest.raises(TypeError, match="block_error must be callable"):
        awq_search_scales([w], x, cfg, block_error=1.0)
    with pytest.raises(ValueError, match="block_error returned nan"):
        awq_search_scales([w], x, cfg, block_error=lambda approx: float("nan"))
    with pytest.raises(ValueError, match="positive"):
        apply_awq(w, torch.zeros(32), None, cfg)
    with pytest.raises(ValueError, match="clip"):
        apply_awq(w, None, torch.ones(8, 3), cfg)
    with pytest.raises(ValueError, match="positive"):
        fold_scales_into_norm(torch.ones(32), None, -torch.ones(32))
    with pytest.raises(ValueError, match="min_clip"):
        AWQConfig(min_clip=0.0)
    with pytest.raises(TypeError, match="QuantConfig"):
        AWQConfig(quant=vlmkern.IntActConfig())
