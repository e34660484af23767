"""BiLLM calibration: exact special cases, the GPTQ loss identity, and
ALGORITHMS.md check 9 (check 8's residual-binarization numbers are in
test_formats.py)."""
import pytest
import torch

import vlmkern
from vlmkern.config import BinaryConfig
from vlmkern.quant.billm import BiLLMConfig, billm_quantize
from vlmkern.quant.hessian import inverse_cholesky_upper


def same_weight(a, b):
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in a.TENSORS)


def student_t(shape, gen, df=3):
    z = torch.randn(*shape, generator=gen)
    chi2 = torch.randn(*shape, df, generator=gen).pow(2).sum(-1)
    return z / (chi2 / df).sqrt()


def hessian(x):
    """H = (2/T) X^T X for tokens x [T, K]."""
    return 2.0 / x.shape[0] * x.T @ x


def test_identity_hessian_equals_binarize():
    # H = I: U = I / sqrt(1 + damp) has no off-diagonal entry, so nothing is
    # compensated, every column weight is equal (normalised to exactly 1) and
    # magnitude saliency is binarize's default column energy.
    w = torch.randn(48, 300, generator=torch.Generator().manual_seed(0))   # short last block
    bw, stats = billm_quantize(w, torch.eye(300), BiLLMConfig(saliency="magnitude"))
    assert same_weight(bw, vlmkern.binarize(w))
    assert len(stats["salient_per_block"]) == 3 and stats["dead_columns"] == 0


@pytest.mark.parametrize("dead", [False, True])
def test_hessian_scale_invariance(dead):
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(32, 256, generator=gen), torch.randn(600, 256, generator=gen)
    x[:, 5] *= 10
    if dead:                      # channels that never fire must not set the search's weights
        x[:, [7, 200]] = 0
    h = hessian(x)
    # a power-of-two factor is exact through Cholesky, inverse and division
    base = billm_quantize(w, h)[0]
    for scale in (4.0, 4.0 ** -6):
        assert same_weight(base, billm_quantize(w, scale * h)[0])


def test_loss_equals_output_error_when_blocks_are_decorrelated():
    # Build U with diagonal diagonal-blocks (no intra-block coupling, so the
    # block-at-once update is exact GPTQ) but dense coupling across blocks;
    # then sum of the per-column losses = 1/2 tr(dW H dW^T) (check 3).
    gen = torch.Generator().manual_seed(2)
    k, b = 256, 128
    u = torch.triu(torch.randn(k, k, generator=gen, dtype=torch.float64)) * 0.05
    for s in range(0, k, b):
        u[s:s + b, s:s + b] = torch.diag(0.5 + torch.rand(b, generator=gen, dtype=torch.float64))
    h = torch.linalg.inv(u.T @ u)
    u_back, lam, _ = inverse_cholesky_upper(h, 0.0)
    assert lam == 0.0 and torch.allclose(u_back, u, atol=1e-9)
    w = torch.randn(40, k, generator=gen)
    bw, stats = billm_quantize(w, h, BiLLMConfig(damp=0.0))
    dw = (w - bw.dequantize()).double()
    proxy = 0.5 * float(torch.einsum("nk,kj,nj->", dw, h, dw))
    assert stats["loss"] == pytest.approx(proxy, rel=1e-4)


@pytest.fixture(scope="module")
def outlier_layer():
    """Student-t weights; 3 input channels per 128-column block with 20x scale."""
    gen = torch.Generator().manual_seed(9)
    n, k, t = 64, 512, 1024
    w = student_t((n, k), gen)
    x = torch.randn(t, k, generator=gen)
    outliers = torch.cat([torch.randperm(128, generator=gen)[:3] + 128 * i for i in range(4)])
    x[:, outliers] *= 20
    bw, stats = billm_quantize(w, hessian(x))
    return w, x, bw, stats


def out_err(w, q, x):
    return float(((q - w) @ x.T).pow(2).sum())


def test_output_error_vs_sign_binarization(outlier_layer):
    # check 9: full-layer output error <= 0.35x that of sign(w) * mean|w| per row
    w, x, bw, _ = outlier_layer
    sign = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)
    assert out_err(w, bw.dequantize(), x) <= 0.35 * out_err(w, sign, x)


def test_few_salient_columns_with_hessian_saliency(outlier_layer):
    # check 9: the Hessian-weighted search keeps k* to about the outlier channels
    w, x, bw, stats = outlier_layer
    assert all(2 <= k <= 6 for k in stats["salient_per_block"]), stats["salient_per_block"]
    _, _, sal = bw.planes()
    outliers = (x.abs().amax(0) > 20).nonzero().flatten()      # plain channels stay below
    assert bool(sal[outliers].all())                           # ~ 4.5 sigma of N(0, 1)
    assert stats["salient_per_block"] == [int(sal[i:i + 128].sum()) for i in range(0, 512, 128)]


def test_dead_columns_are_zeroed():
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(16, 160, generator=gen), torch.randn(300, 160, generator=gen)
    x[:, [3, 130]] = 0
    h = hessian(x)
    bw, stats = billm_quantize(w, h)
    assert stats["dead_columns"] == 2
    w2 = w.clone()
    w2[:, [3, 130]] = 1e3                    # a dead input's weights never matter
    assert same_weight(bw, billm_quantize(w2, h)[0])
    assert bool(torch.isfinite(bw.dequantize()).all())


def test_damping_retry_and_failure():
    h = torch.eye(64)
    h[0, 1] = h[1, 0] = 1.05                 # eigenvalue -0.05: fails with 1% damping, not 10%
    _, stats = billm_quantize(torch.randn(8, 64), h)
    assert stats["damp"] == pytest.approx(0.1)
    hopeless = torch.eye(64)
    hopeless[0, 1] = hopeless[1, 0] = 1e9    # eigenvalue about -1e9: no damping tried helps
    with pytest.raises(ValueError, match="Cholesky"):
        billm_quantize(torch.randn(8, 64), hopeless)
    with pytest.raises(ValueError, match="negative diagonal"):   # no sum of x x^T
        billm_quantize(torch.randn(8, 64), -torch.eye(64))


def test_bad_inputs():
    w, h = torch.randn(8, 64), torch.eye(64)
    bad_h = h.clone()
    bad_h[1, 2] = float("nan")
    bad_w = w.clone()
    bad_w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN"):
        billm_quantize(w, bad_h)
    with pytest.raises(ValueError, match="NaN"):
        billm_quantize(bad_w, h)
    with pytest.raises(ValueError, match="shape"):
        billm_quantize(w, torch.eye(63))
    with pytest.raises(ValueError, match="saliency"):
        BiLLMConfig(saliency="gradient")
    with pytest.raises(ValueError, match="damp"):
        BiLLMConfig(damp=-1.0)
    with pytest.raises(TypeError, match="BinaryConfig"):
        BiLLMConfig(binary={"block_size": 64})


def test_config_block_size_is_used():
    gen = torch.Generator().manual_seed(4)
    w, x = torch.randn(8, 100, generator=gen), torch.randn(200, 100, generator=gen)
    cfg = BiLLMConfig(binary=BinaryConfig(block_size=32, max_salient=4))
    bw, stats = billm_quantize(w, hessian(x), cfg)
    assert bw.block_size == 32 and bw.num_blocks == 4
    assert len(stats["salient_per_block"]) == 4 and max(stats["salient_per_block"]) <= 4


# ---------------------------------------------------------------------------
# An independent float64 reading of the spec, written plainly (row loops)
# ---------------------------------------------------------------------------

def _residual(y, mask, rounds):
    """R_o over each row's masked entries: mu = mean(Y - A), alpha =
    mean|Y - A - mu|, A += alpha * sign(Y - A - mu) + mu."""
    import numpy as np
    out = np.zeros_like(y)
    for r in range(y.shape[0]):
        v = y[r, mask[r]]
        if v.size == 0:
            continue
        a = np.zeros_like(v)
        for _ in range(rounds):
            mu = (v - a).mean()
            alpha = np.abs(v - a - mu).mean()
            a = a + alpha * np.where(v - a - mu >= 0, 1.0, -1.0) + mu
        out[r, mask[r]] = a
    return out


def _spec_billm(w, h, damp=0.01, block=128, max_salient=49):
    """W_hat and k* per block. The searches weigh column j's squared error by
    1/U_jj^2 (normalised), as vlmkern's billm documents."""
    import numpy as np
    w, h = w.copy(), h.copy()
    k = w.shape[1]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T          # upper, U^T U = H^-1
    out, ks = np.zeros_like(w), []
    quantiles = [round(0.10 + 0.01 * i, 2) for i in range(81)]
    for s in range(0, k, block):
        e = min(s + block, k)
        wb, d = w[:, s:e], np.diag(u)[s:e]
        order = np.argsort(-(wb ** 2 / d ** 2).sum(axis=0), kind="stable")
        cw = d ** -2 / (d ** -2).max()

        def err(a, wb=wb, cw=cw):
            return float((((wb - a) ** 2) * cw).sum())
        best = None
        for n_sal in range(1, min(max_salient, e - s) + 1):
            sal = np.zeros(e - s, bool)
            sal[order[:n_sal]] = True
            m = np.broadcast_to(sal, wb.shape)
            cand = err(_residual(wb, m, 2) + _residual(wb, ~m, 2))
            if best is None or cand < best[0]:
                best = (cand, n_sal, sal)
        _, n_sal, sal = best
        ks.append(n_sal)
        m = np.broadcast_to(sal, wb.shape)
        salient_part = _residual(wb, m, 2)
        rest = np.abs(wb[:, ~sal]).ravel()
        best_q = None
        for p in np.quantile(rest, quantiles, method="closest_observation"):
            inner, outer = ~m & (np.abs(wb) < p), ~m & (np.abs(wb) >= p)
            a = salient_part + _residual(wb, inner, 1) + _residual(wb, outer, 1)
            if best_q is None or err(a) < best_q[0]:
                best_q = (err(a), a)
        out[:, s:e] = best_q[1]
        w[:, e:] -= ((wb - best_q[1]) / d) @ u[s:e, e:]     # no update inside the block
    return out, ks


def test_billm_equals_an_independent_reading_of_the_spec():
    gen = torch.Generator().manual_seed(0)
    n, k, t = 24, 256, 600
    z, chi = torch.randn(n, k, generator=gen), torch.randn(n, k, 3, generator=gen).pow(2).sum(-1)
    w = z / (chi / 3).sqrt()                                  # heavy tails (Student t)
    x = torch.randn(t, k, generator=gen)
    x[:, [5, 70, 200]] *= 15                                  # outlier input channels
    x = x + 0.3 * x.roll(1, 1)
    h = (2.0 / t) * x.T @ x
    cfg = BiLLMConfig(binary=BinaryConfig(stats_dtype="float32"))
    bw, stats = billm_quantize(w, h.double(), cfg)
    ref, ks = _spec_billm(w.double().numpy(), h.double().numpy())
    assert stats["salient_per_block"] == ks
    assert float((bw.dequantize().double() - torch.from_numpy(ref)).abs().max()) < 1e-5
