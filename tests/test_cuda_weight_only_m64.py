"""The post-scale decode at 33..64 tokens (64-token tiles, 128-column scale
slots; the opt-in ``cuda.weight_only_post_scale_m64``). GPU only: the same
kernel as the default post-scale decode, so its outputs must match the fp64
product like the other decodes' and, token for token, the 32-token tiles'."""
import os

import pytest
import torch
from test_cuda_weight_only import AWKWARD, act, assert_matches_dense, gpu, make_weight

import vlmkern.ops as ops
from vlmkern.ops import cuda_weight_only as cw


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_m64_awkward_shapes(bits, dtype):
    for n, k in AWKWARD + [(4608, 3584)]:
        for group in (128, 256, None):
            for sym in (True, False):
                qw = make_weight(n, k, bits, group, sym, scale_dtype=dtype, seed=n + k + bits,
                                 device="cuda")
                w = qw.dequantize(torch.float32)
                bias = torch.randn(n, device="cuda")
                for m in (33, 40, 63, 64):
                    x = act(m, k, dtype, seed=m)
                    for b in (None, bias):
                        assert_matches_dense(cw.weight_only_post_scale_m64(x, qw, b), x, w, b)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_m64_tokens_match_the_narrower_tiles(dtype):
    """Each token's sums do not depend on the tile width: 64 tokens give, row
    for row, what 1..32 tokens give on the default kernel."""
    qw = make_weight(300, 1000, 4, 128, False, scale_dtype=dtype, seed=3, device="cuda")
    x = act(64, 1000, dtype, seed=4)
    full = cw.weight_only_post_scale_m64(x, qw)
    assert torch.equal(cw.weight_only_post_scale_m64(x, qw), full)       # run to run
    for lo, hi in ((0, 32), (32, 64), (5, 9)):
        assert torch.equal(cw.weight_only_post_scale(x[lo:hi], qw), full[lo:hi]), (lo, hi)
    assert torch.equal(cw.weight_only_post_scale_m64(x[:40], qw), full[:40])


@gpu
@pytest.mark.gpu
def test_m64_selected_when_enabled(monkeypatch):
    qw = make_weight(256, 512, 4, 128, False, device="cuda")
    x = act(48, 512, torch.float16)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) == "cuda.weight_only_mma"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.weight_only_post_scale_m64")
    assert ops.which_kernel(x, qw) == "cuda.weight_only_post_scale_m64"
    assert ops.which_kernel(x[:32], qw) == "cuda.weight_only_post_scale"
    assert ops.which_kernel(x, make_weight(256, 512, 4, 64, False, device="cuda")) == "cuda.weight_only_mma"
    assert torch.equal(ops.linear(x, qw), cw.weight_only_post_scale_m64(x, qw))
    with pytest.raises(ValueError, match="128 columns"):
        cw.weight_only_post_scale_m64(x, make_weight(256, 512, 4, 64, False, device="cuda"))
    with pytest.raises(ValueError, match="M <= 64"):
        cw.weight_only_post_scale_m64(act(65, 512, torch.float16), qw)


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @gpu
    def test_post_scale_m64_sanitizer_smoke():
        for bits in (2, 3, 4):
            qw = make_weight(130, 203, bits, None, False, seed=bits, device="cuda")
            w = qw.dequantize(torch.float32)
            for m in (33, 64):
                x = act(m, 203, torch.bfloat16, seed=m)
                assert_matches_dense(cw.weight_only_post_scale_m64(x, qw), x, w, None)
