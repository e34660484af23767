"""GPTQ / GPTAQ and the Hessian accumulator: ALGORITHMS.md checks 1-7 on small
layers, an independent column-by-column reference, and bad-input errors."""
import math

import pytest
import torch

from vlmkern import QuantConfig, quantize_rtn
from vlmkern.quant.gptq import GPTQConfig, gptaq_compensation, gptaq_quantize, gptq_quantize
from vlmkern.quant.hessian import HessianAccumulator
from vlmkern.quant.rtn import group_params, quantize_to_grid

N, K, T = 64, 256, 1024


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The matrices here are tiny: intra-op threads only add synchronisation,
    and on a busy machine their spinning makes this file 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
GROUPS = [None, 128, 100, 32]          # 100 does not divide K = 256


def problem(seed=0, n=N, k=K, t=T, dtype=torch.float64):
    """W [n, k] and correlated inputs X [k, t] = (Z S A)^T: Z iid, S a decaying
    spectrum, A a random mixing (so H is far from diagonal), times per-channel
    scales (so diag H is spread out and act_order matters). H = (2/t) X X^T."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    spectrum = (torch.arange(k, dtype=torch.float64) + 1) ** -0.5
    chan = torch.exp(0.5 * torch.randn(k, generator=g, dtype=torch.float64))
    x = (((torch.randn(t, k, generator=g, dtype=torch.float64) * spectrum) @ a) * chan).T
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    return w.to(dtype), x.contiguous(), (2.0 / t) * x @ x.T


def cfg(bits=4, group=128, sym=False, **kw):
    return GPTQConfig(quant=QuantConfig(bits=bits, group_size=group, sym=sym), **kw)


def assert_same(a, b):
    """Bitwise equal packed weights: codes, scales, zeros and perm."""
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scales, b.scales)
    assert (a.qzeros is None) == (b.qzeros is None)
    if a.qzeros is not None:
        assert torch.equal(a.qzeros, b.qzeros)
    assert (a.perm is None) == (b.perm is None)
    if a.perm is not None:
        assert torch.equal(a.perm, b.perm)


def damped(h, lam=0.01):
    return h + lam * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


def reference(w, h, bits, group, delta=None, alpha=0.0, lam=0.01):
    """Column-by-column GPTQ(/GPTAQ) written from the OBS formulas with explicit
    inverses of the trailing Hessian blocks (no Cholesky, no blocks): rounding
    column i moves the later columns by -(w_i - q_i) [H_{>=i}^-1]_{i,>i} /
    [H_{>=i}^-1]_{ii}; GPTAQ adds alpha w_i D[i, >i] H_{>i,>i}^-1. Group
    parameters come from the current weights when a group starts."""
    w, hd = w.clone().double(), damped(h.double(), lam)
    n, k = w.shape
    g = k if group is None else group
    codes = torch.empty(n, k, dtype=torch.int64)
    for i in range(k):
        if i % g == 0:
            s, z = group_params(w[:, i:i + g], bits, False, torch.float16)
        col = w[:, i].clone()
        codes[:, i] = quantize_to_grid(col, s, z, bits)
        qv = (codes[:, i] - z).double() * s.double()
        if i + 1 < k:
            tail = torch.linalg.inv(hd[i:, i:])
            w[:, i + 1:] -= torch.outer(col - qv, tail[0, 1:] / tail[0, 0])
            if delta is not None:
                fit = delta[i, i + 1:].double() @ torch.linalg.inv(hd[i + 1:, i + 1:])
                w[:, i + 1:] += alpha * torch.outer(col, fit)
    return codes


# ---------------------------------------------------------------------------
# Check 1: H = I is RTN, bitwise
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group", GROUPS)
def test_identity_hessian_is_rtn(bits, group):
    w, _, _ = problem(dtype=torch.float32)
    qc = QuantConfig(bits=bits, group_size=group)
    rtn = quantize_rtn(w, qc)
    assert_same(gptq_quantize(w, torch.eye(K), GPTQConfig(quant=qc))[0], rtn)
    # Static groups with act_order: a diagonal H never propagates errors, so
    # any processing order rounds each column exactly as RTN does.
    h = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(1)) + 0.1)
    got, stats = gptq_quantize(w, h, GPTQConfig(quant=qc, act_order=True, static_groups=True))
    assert got.perm is None and stats.perm is not None
    assert_same(got, rtn)


def test_identity_hessian_is_rtn_sym_and_half_weights():
    w, _, _ = problem(dtype=torch.float16)
    for qc in (QuantConfig(bits=4, group_size=64, sym=True),
               QuantConfig(bits=3, group_size=None, scale_dtype="bfloat16")):
        assert_same(gptq_quantize(w, torch.eye(K), GPTQConfig(quant=qc))[0], quantize_rtn(w, qc))


# ---------------------------------------------------------------------------
# Check 2: huge damping is RTN up to one-level flips at ties
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group", [None, 32, 100])
def test_huge_damping_is_rtn(bits, group):
    w, _, h = problem(dtype=torch.float32)
    qc = QuantConfig(bits=bits, group_size=group)
    got = gptq_quantize(w, h.float(), GPTQConfig(quant=qc, damp=1e6))[0]
    ref = quantize_rtn(w, qc)
    diff = (got.codes() - ref.codes()).abs()
    assert int(diff.max()) <= 1
    assert int((diff > 0).sum()) <= 0.001 * diff.numel()
    torch.testing.assert_close(got.scales.float(), ref.scales.float(), rtol=2e-3, atol=0)


# ---------------------------------------------------------------------------
# Check 3: the losses add up to 1/2 tr(dW H_damped dW^T)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group,act_order,static",
                         [(None, False, False), (64, False, False), (100, True, False),
                          (32, True, True), (128, False, True)])
def test_loss_identity(bits, group, act_order, static):
    w, _, h = problem()
    c = cfg(bits, group, act_order=act_order, static_groups=static, compute_dtype="float64")
    got, stats = gptq_quantize(w, h, c)
    dw = got.dequantize(torch.float64) - w
    # The trace is invariant under a simultaneous permutation of dW's columns
    # and H, so the logical-order H serves for act_order too.
    expected = 0.5 * torch.trace(dw @ damped(h) @ dw.T)
    assert stats.column_loss.shape == (K,) and bool((stats.column_loss >= 0).all())
    assert stats.loss == pytest.approx(float(expected), rel=1e-6)
    assert stats.retries == 0 and stats.damp == 0.01
    assert stats.damp_abs == pytest.approx(0.01 * float(h.diagonal().mean()))


# ---------------------------------------------------------------------------
# Check 4: the scale of H does not matter
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_hessian_scale_invariance(act_order, dead):
    w, x, h = problem(dtype=torch.float32)
    if dead:                          # channels that never fire stay out of the damping
        x = x.clone()
        x[[3, 100]] = 0
        h = (2.0 / T) * x @ x.T
    c = cfg(3, 100, act_order=act_order)
    base = gptq_quantize(w, h.float(), c)[0]
    for scale in (4.0, 1 / 16, 4.0 ** -8):    # powers of 4: every operation scales exactly
        assert_same(gptq_quantize(w, h.float() * scale, c)[0], base)
    c64 = cfg(3, 100, act_order=act_order, compute_dtype="float64")
    base64 = gptq_quantize(w, h, c64)[0]
    assert_same(gptq_quantize(w, h * 3.7, c64)[0], base64)


# ---------------------------------------------------------------------------
# Check 5: GPTQ beats RTN on correlated inputs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group", [None, 128, 100])
def test_gptq_beats_rtn(bits, group):
    w, x, h = problem(dtype=torch.float32)
    x = x.float()
    qc = QuantConfig(bits=bits, group_size=group)
    err = lambda q: float(((q - w) @ x).norm())
    rtn = err(quantize_rtn(w, qc).dequantize())
    for act_order in (False, True):
        got = gptq_quantize(w, h.float(), GPTQConfig(quant=qc, act_order=act_order))[0]
        assert err(got.dequantize()) / rtn < 0.8


# ---------------------------------------------------------------------------
# Check 6: act_order is GPTQ on the permuted problem
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(4, 128), (3, 100), (2, None), (4, 32)])
def test_act_order_is_permuted_problem(bits, group):
    w, _, h = problem(dtype=torch.float32)
    h = h.float()
    got, stats = gptq_quantize(w, h, cfg(bits, group, act_order=True))
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert torch.equal(stats.perm, perm) and torch.equal(got.perm.long(), perm)
    plain = gptq_quantize(w[:, perm], h[perm][:, perm], cfg(bits, group))[0]
    assert torch.equal(got.qweight, plain.qweight) and torch.equal(got.scales, plain.scales)
    assert got.qzeros is not None and torch.equal(got.qzeros, plain.qzeros)
    # dequantize() un-permutes: logical column perm[j] is stored column j.
    logical = got.dequantize()
    assert torch.equal(logical[:, perm], plain.dequantize())
    inv = torch.argsort(perm)
    assert torch.equal(logical, plain.dequantize()[:, inv])


def test_static_groups_act_order_keeps_logical_groups():
    w, x, h = problem(dtype=torch.float32)
    got, stats = gptq_quantize(w, h.float(), cfg(4, 64, act_order=True, static_groups=True))
    assert got.perm is None and stats.perm is not None
    # The scales are those of RTN on the original W: fixed before any update.
    assert torch.equal(got.scales, quantize_rtn(w, QuantConfig(bits=4, group_size=64)).scales)
    err = lambda q: float(((q - w) @ x.float()).norm())
    assert err(got.dequantize()) < 0.8 * err(quantize_rtn(w, QuantConfig(4, 64)).dequantize())


# ---------------------------------------------------------------------------
# The blocked algorithm against the independent column-by-column reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(4, 40), (3, None), (2, 16)])
def test_blocked_matches_reference(bits, group):
    w, _, h = problem(n=16, k=96, t=512)
    want = reference(w, h, bits, group)
    for block in (1, 16, 128):     # group 40 spans block borders at block 16
        got = gptq_quantize(w, h, cfg(bits, group, block_size=block, compute_dtype="float64"))[0]
        assert torch.equal(got.codes(), want)


def noisy_pair(seed, n=N, k=K, t=T, eps=0.2, noise=0.05):
    """Full-precision inputs X and the partly quantized model's X~ = X + E,
    E = eps B X + iid noise: upstream rounding errors depend on the inputs."""
    w, x, _ = problem(seed, n, k, t)
    g = torch.Generator().manual_seed(seed + 100)
    b = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    xq = x + eps * b @ x + noise * x.std() * torch.randn(k, t, generator=g, dtype=torch.float64)
    return w, x, xq, (2.0 / t) * xq @ xq.T, (2.0 / t) * (x - xq) @ xq.T


@pytest.mark.parametrize("group", [40, None])
def test_gptaq_blocked_matches_reference(group):
    w, _, _, h, d = noisy_pair(0, n=16, k=96, t=512)
    want = reference(w, h, 3, group, delta=d, alpha=0.25)
    for block in (1, 16, 128):
        c = cfg(3, group, block_size=block, compute_dtype="float64")
        assert torch.equal(gptaq_quantize(w, h, d, c)[0].codes(), want)


# ---------------------------------------------------------------------------
# Check 7: GPTAQ
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("act_order", [False, True])
def test_gptaq_reduces_to_gptq(act_order):
    w, _, _, h, d = noisy_pair(1)
    w, h, d = w.float(), h.float(), d.float()
    c = cfg(3, 100, act_order=act_order)
    base = gptq_quantize(w, h, c)[0]
    assert_same(gptaq_quantize(w, h, d, c, alpha=0.0)[0], base)
    assert_same(gptaq_quantize(w, h, torch.zeros_like(d), c)[0], base)


def test_gptaq_compensation_matrix():
    _, _, _, h, d = noisy_pair(2, k=64, t=256)
    hd = damped(h)
    u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    p = gptaq_compensation(d, u, 0.25)
    assert torch.equal(p.diagonal(), torch.zeros(64, dtype=p.dtype))
    assert torch.equal(p, torch.triu(p, diagonal=1))
    # Row i: the least-squares fit of column i's mismatch by the later columns.
    for i in (0, 17, 62):
        fit = 0.25 * d[i, i + 1:] @ torch.linalg.inv(hd[i + 1:, i + 1:])
        torch.testing.assert_close(p[i, i + 1:], fit, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptaq_beats_gptq_on_asymmetric_inputs(bits):
    objective = lambda q, w, x, xq: float((q.dequantize(torch.float64) @ xq - w @ x).norm() ** 2)
    for seed, eps, noise in ((3, 0.2, 0.05), (4, 0.0, 0.3)):
        w, x, xq, h, d = noisy_pair(seed, eps=eps, noise=noise)
        c = cfg(bits, 128, compute_dtype="float64")
        gptq = objective(gptq_quantize(w, h, c)[0], w, x, xq)
        gptaq = objective(gptaq_quantize(w, h, d, c)[0], w, x, xq)
        # Pure iid noise makes D nearly diagonal, which the strict triangle
        # drops, so the gain there is small; correlated errors gain more.
        assert gptaq < (0.95 if eps else 1.0) * gptq


# ---------------------------------------------------------------------------
# Dead columns, damping retries, bad inputs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order):
    w, x, _ = problem(dtype=torch.float32)
    x = x.clone()
    x[[3, 100, 255]] = 0                      # channels that never fire
    h = (2.0 / T) * x @ x.T
    for fn in (lambda c: gptq_quantize(w, h.float(), c),
               lambda c: gptaq_quantize(w, h.float(), 0.01 * h.float(), c)):
        got, stats = fn(cfg(4, 32, act_order=act_order))
        deq = got.dequantize()
        assert bool(torch.isfinite(deq).all()) and bool(torch.isfinite(stats.column_loss).all())
        assert torch.equal(deq[:, [3, 100, 255]], torch.zeros(N, 3))


def test_damping_retry():
    h = torch.eye(K, dtype=torch.float64)
    h[5, 6] = h[6, 5] = 1.05            # one eigenvalue -0.05, the diagonal still positive
    w, _, _ = problem()
    got, stats = gptq_quantize(w, h, cfg(4, 128, compute_dtype="float64"))
    assert stats.retries == 1 and stats.damp == pytest.approx(0.1)
    assert bool(torch.isfinite(got.dequantize()).all())
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, h, cfg(4, 128, max_damp_retries=0))
    ones = torch.ones(K, 1, dtype=torch.float64) / math.sqrt(K)
    hopeless = torch.eye(K, dtype=torch.float64) - 200 * ones @ ones.T   # eigenvalue -199
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, hopeless, cfg())
    with pytest.raises(ValueError, match="negative diagonal"):    # no sum of x x^T
        gptq_quantize(w, -torch.eye(K), cfg())


def test_bad_inputs():
    w, _, h = problem(dtype=torch.float32)
    h = h.float()
    bad_h = h.clone()
    bad_h[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, bad_h, cfg())
    bad_w = w.clone()
    bad_w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(bad_w, h, cfg())
    with pytest.raises(ValueError, match="must be"):
        gptq_quantize(w, h[:-1, :-1], cfg())
    with pytest.raises(ValueError, match="must be"):
        gptq_quantize(w[0], h, cfg())
    with pytest.raises(ValueError, match="delta"):
        gptaq_quantize(w, h, h[:, :-1], cfg())
    with pytest.raises(ValueError, match="NaN"):
        gptaq_quantize(w, h, bad_h, cfg())
    with pytest.raises(TypeError):
        gptq_quantize(w, h, QuantConfig())
    with pytest.raises(ValueError):
        gptaq_quantize(w, h, h, cfg(), alpha=float("nan"))
    for kw in ({"block_size": 0}, {"damp": -1.0}, {"max_damp_retries": -1},
               {"compute_dtype": "float16"}):
        with pytest.raises(ValueError):
            cfg(**kw)


def test_inputs_not_modified():
    w, _, h = problem(dtype=torch.float32)
    h, d = h.float(), 0.1 * h.float()
    w0, h0, d0 = w.clone(), h.clone(), d.clone()
    gptaq_quantize(w, h, d, cfg(3, 32, act_order=True))
    assert torch.equal(w, w0) and torch.equal(h, h0) and torch.equal(d, d0)


# ---------------------------------------------------------------------------
# HessianAccumulator
# ---------------------------------------------------------------------------

def test_accumulator_batches_equal_one_shot():
    x = torch.randn(3, 50, 32, dtype=torch.float64)
    acc = HessianAccumulator(32, dtype=torch.float64)
    acc.add(x[:1])                    # [1, 50, 32]
    acc.add(x[1, :7])                 # [7, 32]
    acc.add(x[1, 7:].reshape(1, 43, 32))
    acc.add(x[2])
    acc.add(x[:0])                    # an empty batch changes nothing
    flat = x.reshape(-1, 32)
    assert acc.tokens == 150 and acc.delta is None
    torch.testing.assert_close(acc.hessian, (2.0 / 150) * flat.T @ flat, rtol=1e-12, atol=1e-14)


def test_accumulator_token_weights():
    x = torch.randn(4, 30, 48)
    g = torch.rand(4, 30) + 0.5
    plain, ones, weighted, doubled = (HessianAccumulator(48) for _ in range(4))
    for b in range(4):
        plain.add(x[b])
        ones.add(x[b], token_weight=torch.ones(30))
        weighted.add(x[b], token_weight=g[b])
        doubled.add(x[b], token_weight=2 * g[b])
    assert torch.equal(ones.hessian, plain.hessian)
    assert torch.equal(doubled.hessian, 4 * weighted.hessian)      # g c scales H by c^2
    flat, gw = x.reshape(-1, 48).double(), g.reshape(-1, 1).double()
    want = (2.0 / 120) * (flat * gw).T @ (flat * gw)
    torch.testing.assert_close(weighted.hessian.double(), want, rtol=1e-5, atol=1e-6)
    w = torch.randn(16, 48)
    c = cfg(3, 16)
    assert_same(gptq_quantize(w, doubled.hessian, c)[0], gptq_quantize(w, weighted.hessian, c)[0])


def test_accumulator_pairs():
    xf = torch.randn(2, 40, 24, dtype=torch.float64)
    xq = xf + 0.1 * torch.randn(2, 40, 24, dtype=torch.float64)
    g = torch.rand(2, 40, dtype=torch.float64)
    acc = HessianAccumulator(24, dtype=torch.float64)
    wacc = HessianAccumulator(24, dtype=torch.float64)
    for b in range(2):
        acc.add_pair(xf[b], xq[b])
        wacc.add_pair(xf[b:b + 1], xq[b:b + 1], token_weight=g[b:b + 1])
    X, Xq = xf.reshape(-1, 24).T, xq.reshape(-1, 24).T      # [K, T] columns
    torch.testing.assert_close(acc.hessian, (2.0 / 80) * Xq @ Xq.T)
    torch.testing.assert_close(acc.delta, (2.0 / 80) * (X - Xq) @ Xq.T)
    G2 = torch.diag(g.reshape(-1) ** 2)
    torch.testing.assert_close(wacc.hessian, (2.0 / 80) * Xq @ G2 @ Xq.T)
    torch.testing.assert_close(wacc.delta, (2.0 / 80) * (X - Xq) @ G2 @ Xq.T)


def test_accumulator_errors():
    acc = HessianAccumulator(8)
    assert acc.tokens == 0 and torch.equal(acc.hessian, torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        acc.add(torch.randn(4, 9))
    bad = torch.randn(4, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        acc.add(bad)
    with pytest.raises(ValueError, match="NaN"):
        acc.add_pair(torch.randn(4, 8), bad)
    with pytest.raises(ValueError, match="token_weight"):
        acc.add(torch.randn(4, 8), token_weight=torch.ones(5))
    with pytest.raises(ValueError, match="same shape"):
        acc.add_pair(torch.randn(4, 8), torch.randn(5, 8))
    assert acc.tokens == 0
    acc.add(torch.randn(4, 8))
    with pytest.raises(ValueError, match="add_pair"):
        acc.add_pair(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError):
        HessianAccumulator(0)


def test_gptaq_takes_a_gptaq_config():
    from vlmkern import GPTAQConfig
    w, _, _, h, d = noisy_pair(1)
    w, h, d = w.float(), h.float(), d.float()
    c = cfg(3, 100)
    want = gptaq_quantize(w, h, d, c, alpha=0.5)[0]
    assert_same(gptaq_quantize(w, h, d, GPTAQConfig(c, alpha=0.5))[0], want)
    with pytest.raises(ValueError, match="do not give both"):
        gptaq_quantize(w, h, d, GPTAQConfig(c), alpha=0.5)
