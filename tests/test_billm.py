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
