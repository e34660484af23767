"""The lookup-table binary layout on the warp-specialized Hopper kernel
(csrc/weight_only_sm90_tma_kernel.cu, table decode; torch.ops.vlmkern.binary_lut_tma).

The layout and the exact product come from test_cuda_binary_lut_kernel, which
builds them from the specification in csrc/binary.h. The kernel sums each
output over each K slice in one fp32 accumulator and adds the slices in fp32,
so the error bound counts one part per slice.
"""
import os

import pytest
import torch
from test_cuda_binary import make_binary
from test_cuda_binary_lut_kernel import (
    K_SIZES,
    N_SIZES,
    activations,
    assert_close_to_exact,
    gen,
    make_case,
    meta_layout,
)
from tiny_models import kernel_op_reason

import vlmkern.ops as ops
from vlmkern.ops import cuda_binary_lut
from vlmkern.ops.cuda_int_act import sm90_available


def _gpu_reason() -> str | None:
    why = kernel_op_reason("binary_lut_tma", "weight_only_sm90_tma_kernel.cu")
    if why is None and not sm90_available(torch.device("cuda")):
        why = "needs an sm_90 GPU and a build with 9.0a code"
    return why


_SKIP_GPU = _gpu_reason()
_SKIP_OP = kernel_op_reason("binary_lut_tma", "weight_only_sm90_tma_kernel.cu", need_gpu=False)
sm90 = pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")
has_op = pytest.mark.skipif(_SKIP_OP is not None, reason=_SKIP_OP or "")

M_SIZES = [1, 17, 64, 65, 128, 129, 300]


def run(x, layout, bias, n, ksplit=1):
    codes, tables, merge = layout
    return torch.ops.vlmkern.binary_lut_tma(x, codes, tables, merge, bias, n, ksplit)


@has_op
@pytest.mark.cpp_checks
def test_meta_shape_and_checks():
    codes, tables, merge = meta_layout(300, 264)
    x = torch.empty(500, 264, dtype=torch.float16, device="meta")   # no 64-token limit
    y = torch.ops.vlmkern.binary_lut_tma(x, codes, tables, merge, None, 300)
    assert y.shape == (500, 300) and y.dtype == torch.float16 and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="binary_lut_tma: out_features=256 does not match"):
        torch.ops.vlmkern.binary_lut_tma(x, codes, tables, merge, None, 256)
    for ksplit in (0, 4):   # 264 columns: 3 chunks
        with pytest.raises(RuntimeError, match="binary_lut_tma: ksplit must be in 1..3"):
            torch.ops.vlmkern.binary_lut_tma(x, codes, tables, merge, None, 300, ksplit)


@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("n", N_SIZES)
@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_exact_product(n, k, dtype):
    # odd row-block counts leave a copy-only block in the last cluster
    layout, w, k_x = make_case(n, k, dtype, seed=n + k)
    bias = torch.randn(n, generator=gen(7)).cuda()
    for m in M_SIZES:
        x = activations(m, k, k_x, dtype, seed=m)
        for b in (None, bias):
            assert_close_to_exact(run(x, layout, b, n), x, w, b, ksplit=1)


@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("m", [5, 64, 200])
def test_gpu_every_slice_count(m):
    # K slices of every length from one chunk up (19 chunks), added by the
    # second kernel with the bias
    n, k = 300, 2400
    layout, w, k_x = make_case(n, k, torch.float16, seed=m)
    bias = torch.randn(n, generator=gen(3)).cuda()
    x = activations(m, k, k_x, torch.float16, seed=m)
    for ksplit in (1, 2, 3, 5, 19):
        assert_close_to_exact(run(x, layout, bias, n, ksplit), x, w, bias, ksplit=ksplit)


@sm90
@pytest.mark.gpu
def test_gpu_bias_dtypes_and_salient_extremes():
    n, k = 129, 264
    for salient in (0.0, 1.0):
        layout, w, k_x = make_case(n, k, torch.bfloat16, seed=3, salient=salient)
        x = activations(200, k, k_x, torch.bfloat16)
        for bias_dtype in (torch.float16, torch.bfloat16, torch.float32):
            bias = torch.randn(n, generator=gen(8)).to(bias_dtype).cuda()
            assert_close_to_exact(run(x, layout, bias, n), x, w, bias.float(), ksplit=1)


@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_deterministic_and_batch_invariant(dtype):
    # a token's sums depend only on its place in its token tile, the tile
    # width (64 tokens up to M = 64, else 128) and the slice count
    n, k = 300, 520
    layout, w, k_x = make_case(n, k, dtype, seed=11)
    bias = torch.randn(n, generator=gen(9)).cuda()
    for ksplit in (1, 2):
        x = activations(300, k, k_x, dtype, seed=4)
        full = run(x, layout, bias, n, ksplit)
        assert torch.equal(run(x, layout, bias, n, ksplit), full)     # run to run
        for m in (65, 128, 129, 200):
            assert torch.equal(run(x[:m], layout, bias, n, ksplit), full[:m]), m
        assert torch.equal(run(x[128:].clone(), layout, bias, n, ksplit), full[128:])
        full = run(x[:64], layout, bias, n, ksplit)
        for m in (1, 17, 33):
            assert torch.equal(run(x[:m], layout, bias, n, ksplit), full[:m]), m


@sm90
@pytest.mark.gpu
def test_gpu_real_size():
    n, k = 4608, 3584
    layout, w, k_x = make_case(n, k, torch.float16, seed=2, salient=0.05, scale=0.02)
    for m in (65, 1000):
        x = activations(m, k, k_x, torch.float16, seed=m)
        assert_close_to_exact(run(x, layout, None, n), x, w, None, ksplit=1)


@sm90
@pytest.mark.gpu
def test_gpu_selected_when_enabled_and_traceable(monkeypatch):
    qw = make_binary(300, 520, 128, salient=0.2, seed=3, device="cuda")
    x = torch.randn(200, 520, generator=gen(5)).to("cuda", torch.float16)
    bias = torch.randn(300, generator=gen(6)).to("cuda", torch.float16)
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) != "cuda.binary_lut_tma"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.binary_lut_tma")
    assert ops.which_kernel(x, qw) == "cuda.binary_lut_tma"
    assert ops.which_kernel(x[:17], qw) == "cuda.binary_lut_tma"
    assert ops.which_kernel(x[:16], qw) == "cuda.binary_lut"
    w = qw.dequantize(torch.float32)
    want = (x.double() @ w.double().T + bias.double()).float()
    torch.testing.assert_close(ops.linear(x, qw, bias).float(), want, rtol=2e-3, atol=2e-3)
    assert ops.linear(x[:0], qw).shape == (0, 300)

    lw = cuda_binary_lut.kernel_weight(qw, torch.float16)
    layout = (lw.codes, lw.tables, lw.merge)

    def f(v):
        return run(v, layout, bias, 300)

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


@sm90
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_inputs():
    n, k = 100, 264
    layout, _, k_x = make_case(n, k, torch.float16)
    codes, tables, merge = layout
    x = activations(70, k, k_x, torch.float16)
    op = torch.ops.vlmkern.binary_lut_tma

    def fails(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    fails("float16 or bfloat16", x.float(), codes, tables, merge, None, n)
    fails("tables must have shape", x, codes, tables[:, :, :, :4].contiguous(), merge, None, n)
    flat = torch.zeros(70 * k_x + 2, dtype=torch.half, device="cuda")
    fails("16-byte aligned", flat[2:].view(70, k_x), codes, tables, merge, None, n)
    fails("ksplit must be in 1..3", x, codes, tables, merge, None, n, 0)
    with pytest.raises(ValueError, match="block_size 64 unsupported"):
        cuda_binary_lut.binary_lut_tma(x[:, :k].contiguous(), make_binary(n, k, 64, device="cuda"))


if os.environ.get("VLMKERN_SANITIZE") == "1":   # a small run under compute-sanitizer memcheck
    @sm90
    @pytest.mark.gpu
    def test_binary_lut_tma_sanitizer_smoke():
        for n, k in ((1, 8), (129, 201), (300, 520)):
            for dtype in (torch.float16, torch.bfloat16):
                layout, w, k_x = make_case(n, k, dtype, seed=n)
                for m, ksplit in ((1, 2 if k > 128 else 1), (129, 1)):
                    x = activations(m, k, k_x, dtype, seed=m)
                    assert_close_to_exact(run(x, layout, None, n, ksplit), x, w, None, ksplit=ksplit)
