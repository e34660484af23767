"""The lookup-table binary layout on the weight-only pipeline
(csrc/weight_only_kernel.cu, table decode; torch.ops.vlmkern.binary_lut_staged_mma).

The layout and the exact product come from test_cuda_binary_lut_kernel, which
builds them from the specification in csrc/binary.h. The op's K split is the
weight-only kernel's stream-K over ``num_ctas`` thread blocks, so the error
bound counts up to one fp32 partial sum per chunk.
"""
import os

import pytest
import torch
from test_cuda_binary import make_binary
from test_cuda_binary_lut_kernel import (
    BLOCK,
    K_SIZES,
    N_SIZES,
    activations,
    assert_close_to_exact,
    cdiv,
    gen,
    make_case,
    meta_layout,
)
from tiny_models import kernel_op_reason

import vlmkern.ops as ops
from vlmkern.ops import cuda_binary_lut

_SKIP_GPU = kernel_op_reason("binary_lut_staged_mma", "weight_only_kernel.cu")
_SKIP_OP = kernel_op_reason("binary_lut_staged_mma", "weight_only_kernel.cu", need_gpu=False)
gpu = pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")
has_op = pytest.mark.skipif(_SKIP_OP is not None, reason=_SKIP_OP or "")

M_SIZES = [1, 3, 8, 9, 16, 17, 32, 33, 64]


def counters():
    return torch.zeros(4096, dtype=torch.int32, device="cuda")


def run(x, layout, bias, n, num_ctas, count=None):
    codes, tables, merge = layout
    return torch.ops.vlmkern.binary_lut_staged_mma(x, codes, tables, merge, bias,
                                                   counters() if count is None else count, n,
                                                   num_ctas)


def ctas_to_try(nb, c):
    """One block, a split that cuts row blocks into uneven parts, one per unit."""
    units = nb * c
    return sorted({1, max(1, units * 2 // 3), units})


@has_op
@pytest.mark.cpp_checks
def test_meta_shape_and_checks():
    codes, tables, merge = meta_layout(300, 264)
    x = torch.empty(5, 264, dtype=torch.float16, device="meta")
    count = torch.empty(8, dtype=torch.int32, device="meta")
    op = torch.ops.vlmkern.binary_lut_staged_mma
    y = op(x, codes, tables, merge, None, count, 300, 9)
    assert y.shape == (5, 300) and y.dtype == torch.float16 and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="num_ctas must be in 1..9"):
        op(x, codes, tables, merge, None, count, 300, 10)
    with pytest.raises(RuntimeError, match="counters must be a 1-D int32 tensor of at least 3"):
        op(x, codes, tables, merge, None, count[:2], 300, 1)
    with pytest.raises(RuntimeError, match="binary_lut_staged_mma: out_features=256 does not match"):
        op(x, codes, tables, merge, None, count, 256, 1)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", N_SIZES)
@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_exact_product(n, k, dtype):
    layout, w, k_x = make_case(n, k, dtype, seed=n + k)
    nb, c = cdiv(n, BLOCK), cdiv(k, BLOCK)
    bias = torch.randn(n, generator=gen(7)).cuda()
    for m in M_SIZES:
        x = activations(m, k, k_x, dtype, seed=m)
        for ctas in ctas_to_try(nb, c):
            for b in (None, bias):
                assert_close_to_exact(run(x, layout, b, n, ctas), x, w, b, ksplit=c)


@gpu
@pytest.mark.gpu
def test_gpu_bias_dtypes_and_salient_extremes():
    n, k = 129, 264
    for salient in (0.0, 1.0):
        layout, w, k_x = make_case(n, k, torch.bfloat16, seed=3, salient=salient)
        x = activations(20, k, k_x, torch.bfloat16)
        for bias_dtype in (torch.float16, torch.bfloat16, torch.float32):
            bias = torch.randn(n, generator=gen(8)).to(bias_dtype).cuda()
            for ctas in (1, 4):
                assert_close_to_exact(run(x, layout, bias, n, ctas), x, w, bias.float(), ksplit=3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_deterministic_and_batch_invariant(dtype):
    n, k = 300, 520
    layout, w, k_x = make_case(n, k, dtype, seed=11)
    bias = torch.randn(n, generator=gen(9)).cuda()
    x = activations(64, k, k_x, dtype, seed=4)
    count = counters()
    for ctas in (1, 7, 15):
        full = run(x, layout, bias, n, ctas, count)
        assert torch.equal(run(x, layout, bias, n, ctas, count), full)     # run to run
        for m in (1, 2, 8, 9, 16, 17, 32, 33, 63):
            assert torch.equal(run(x[:m], layout, bias, n, ctas, count), full[:m]), (ctas, m)
        for i in (0, 5, 31, 63):                 # a row alone equals the row in the batch
            assert torch.equal(run(x[i:i + 1], layout, bias, n, ctas, count), full[i:i + 1])
    assert not bool(count.any())                 # the kernel leaves its counters at zero


@gpu
@pytest.mark.gpu
def test_gpu_real_size():
    n, k = 4608, 3584
    layout, w, k_x = make_case(n, k, torch.float16, seed=2, salient=0.05, scale=0.02)
    for m, ctas in ((1, 264), (16, 264), (33, 100), (64, 1008)):
        x = activations(m, k, k_x, torch.float16, seed=m)
        assert_close_to_exact(run(x, layout, None, n, ctas), x, w, None, ksplit=28)


@gpu
@pytest.mark.gpu
def test_gpu_selected_when_enabled_and_traceable(monkeypatch):
    qw = make_binary(300, 520, 128, salient=0.2, seed=3, device="cuda")
    x = torch.randn(40, 520, generator=gen(5)).to("cuda", torch.float16)
    bias = torch.randn(300, generator=gen(6)).to("cuda", torch.float16)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) == "cuda.binary_lut"
    plain = ops.linear(x, qw, bias)
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.binary_lut_staged")
    for m in (1, 9, 40):
        assert ops.which_kernel(x[:m], qw) == "cuda.binary_lut_staged"
    staged = ops.linear(x, qw, bias)
    # the same weights and products, summed in another order: close, not equal
    torch.testing.assert_close(staged, plain, rtol=2e-3, atol=2e-3)
    assert ops.linear(x[:0], qw).shape == (0, 300)

    lw = cuda_binary_lut.kernel_weight(qw, torch.float16)
    layout, count = (lw.codes, lw.tables, lw.merge), counters()

    def f(v):
        return run(v, layout, bias, 300, 11, count)

    assert torch.equal(torch.compile(f, fullgraph=True)(x[:9]), f(x[:9]))


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_inputs():
    n, k = 100, 264
    layout, _, k_x = make_case(n, k, torch.float16)
    codes, tables, merge = layout
    x = activations(3, k, k_x, torch.float16)
    op = torch.ops.vlmkern.binary_lut_staged_mma
    count = counters()

    def fails(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    fails("float16 or bfloat16", x.float(), codes, tables, merge, None, count, n, 1)
    fails("tables must have shape", x, codes, tables[:, :, :, :4].contiguous(), merge, None, count,
          n, 1)
    fails("at most 64", activations(65, k, k_x, torch.float16), codes, tables, merge, None, count,
          n, 1)
    fails("num_ctas must be in 1..3", x, codes, tables, merge, None, count, n, 4)
    fails("counters must be a 1-D int32", x, codes, tables, merge, None, count.long(), n, 1)
    fails("counters is on cpu", x, codes, tables, merge, None, count.cpu(), n, 1)
    flat = torch.zeros(3 * k_x + 2, dtype=torch.half, device="cuda")
    fails("16-byte aligned", flat[2:].view(3, k_x), codes, tables, merge, None, count, n, 1)


if os.environ.get("VLMKERN_SANITIZE") == "1":   # a small run under compute-sanitizer memcheck
    @gpu
    @pytest.mark.gpu
    def test_binary_lut_staged_sanitizer_smoke():
        # ragged rows, columns and tokens; every token-tile width; whole and split row blocks
        for n, k in ((1, 8), (129, 201), (300, 520)):
            for dtype in (torch.float16, torch.bfloat16):
                layout, w, k_x = make_case(n, k, dtype, seed=n)
                nb, c = cdiv(n, BLOCK), cdiv(k, BLOCK)
                for m in (1, 9, 17, 64):
                    x = activations(m, k, k_x, dtype, seed=m)
                    for ctas in ctas_to_try(nb, c):
                        assert_close_to_exact(run(x, layout, None, n, ctas), x, w, None, ksplit=c)
