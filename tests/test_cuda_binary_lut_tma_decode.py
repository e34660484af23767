"""The lookup-table binary layout on the decode path of the warp-specialized
Hopper kernel (csrc/weight_only_sm90_tma_kernel.cu, table decode, 16-token
tile; torch.ops.vlmkern.binary_lut_tma_decode, cuda.binary_lut_tma_decode).

The layout and the exact product come from test_cuda_binary_lut_kernel. The
kernel sums each output over each part of its row block's K range (a
stream-K split, see test_cuda_weight_only_tma_decode for the walk) in one
fp32 accumulator and adds the parts in fp32; a part holds at least one chunk,
so the error bound counts one addition per chunk.
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
from vlmkern.ops import cuda_weight_only as cw
from vlmkern.ops.cuda_int_act import sm90_available

OP = "binary_lut_tma_decode"


def _gpu_reason() -> str | None:
    why = kernel_op_reason(OP, "weight_only_sm90_tma_kernel.cu")
    if why is None and not sm90_available(torch.device("cuda")):
        why = "needs an sm_90 GPU and a build with 9.0a code"
    return why


_SKIP_GPU = _gpu_reason()
_SKIP_OP = kernel_op_reason(OP, "weight_only_sm90_tma_kernel.cu", need_gpu=False)
sm90 = pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")
has_op = pytest.mark.skipif(_SKIP_OP is not None, reason=_SKIP_OP or "")


def run(x, layout, bias, n, max_clusters=66):
    codes, tables, merge = layout
    counters = cw._counters(x.device, codes.shape[0])
    return torch.ops.vlmkern.binary_lut_tma_decode(x, codes, tables, merge, bias, counters, n,
                                                   max_clusters)


def test_registered_opt_in_for_decode():
    from vlmkern.ops.builtin import CUDA
    names = [k.name for k in CUDA.kernels]
    spec = CUDA.kernels[names.index("cuda.binary_lut_tma_decode")]
    assert spec.opt_in and spec.min_m == 1 and spec.max_m == 16 and spec.min_sm == (9, 0)
    assert names.index("cuda.binary_lut_tma_decode") < names.index("cuda.binary_lut")


@has_op
@pytest.mark.cpp_checks
def test_meta_shape_and_checks():
    codes, tables, merge = meta_layout(300, 264)
    counters = torch.zeros(8, dtype=torch.int32, device="meta")
    x = torch.empty(16, 264, dtype=torch.float16, device="meta")
    op = torch.ops.vlmkern.binary_lut_tma_decode
    y = op(x, codes, tables, merge, None, counters, 300, 4)
    assert y.shape == (16, 300) and y.dtype == torch.float16 and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="must be at most 16"):
        op(torch.empty(17, 264, dtype=torch.float16, device="meta"), codes, tables, merge, None,
           counters, 300, 4)
    with pytest.raises(RuntimeError, match="max_clusters must be in 1..32767"):
        op(x, codes, tables, merge, None, counters, 300, 0)
    with pytest.raises(RuntimeError, match="counters must be a 1-D int32"):
        op(x, codes, tables, merge, None, counters[:2], 300, 4)


@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("n", N_SIZES)
@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_exact_product(n, k, dtype):
    layout, w, k_x = make_case(n, k, dtype, seed=n + k)
    bias = torch.randn(n, generator=gen(7)).cuda()
    chunks = -(-k_x // 128)
    for m in (1, 3, 8, 16):
        x = activations(m, k, k_x, dtype, seed=m)
        for b in (None, bias):
            for clusters in (1, 3, 66):
                assert_close_to_exact(run(x, layout, b, n, clusters), x, w, b, ksplit=chunks)


@sm90
@pytest.mark.gpu
def test_gpu_split_row_blocks_and_counters_left_zero():
    n, k = 300, 2400          # 3 row blocks x 19 chunks
    layout, w, k_x = make_case(n, k, torch.float16, seed=5)
    bias = torch.randn(n, generator=gen(3)).cuda()
    for m in (1, 16):
        x = activations(m, k, k_x, torch.float16, seed=m)
        for clusters in (2, 5, 19, 38, 1000):
            assert_close_to_exact(run(x, layout, bias, n, clusters), x, w, bias, ksplit=19)
            assert not cw._counters(x.device, 3)[:3].any(), clusters


@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_deterministic_and_batch_invariant(dtype):
    n, k = 300, 520
    layout, w, k_x = make_case(n, k, dtype, seed=11)
    bias = torch.randn(n, generator=gen(9)).cuda()
    x = activations(16, k, k_x, dtype, seed=4)
    full = run(x, layout, bias, n)
    assert torch.equal(run(x, layout, bias, n), full)
    for m in (1, 2, 9):
        assert torch.equal(run(x[:m], layout, bias, n), full[:m]), m


@sm90
@pytest.mark.gpu
def test_gpu_real_size():
    for n, k in ((4608, 3584), (37888, 3584)):
        layout, w, k_x = make_case(n, k, torch.float16, seed=2, salient=0.05, scale=0.02)
        for m in (1, 16):
            x = activations(m, k, k_x, torch.float16, seed=m)
            assert_close_to_exact(run(x, layout, None, n), x, w, None, ksplit=28)


@sm90
@pytest.mark.gpu
def test_gpu_selected_when_enabled_and_traceable(monkeypatch):
    qw = make_binary(300, 520, 128, salient=0.2, seed=3, device="cuda")
    x = torch.randn(16, 520, generator=gen(5)).to("cuda", torch.float16)
    bias = torch.randn(300, generator=gen(6)).to("cuda", torch.float16)
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) == "cuda.binary_lut"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.binary_lut_tma_decode")
    assert ops.which_kernel(x, qw) == "cuda.binary_lut_tma_decode"
    assert ops.which_kernel(x[:1], qw) == "cuda.binary_lut_tma_decode"
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
def test_gpu_wrapper_errors():
    qw = make_binary(100, 264, 128, device="cuda")
    with pytest.raises(ValueError, match="M <= 16"):
        cuda_binary_lut.binary_lut_tma_decode(torch.zeros(17, 264, device="cuda").half(), qw)
    with pytest.raises(ValueError, match="block_size 64 unsupported"):
        cuda_binary_lut.binary_lut_tma_decode(torch.zeros(1, 264, device="cuda").half(),
                                              make_binary(100, 264, 64, device="cuda"))


if os.environ.get("VLMKERN_SANITIZE") == "1":   # a small run under compute-sanitizer memcheck
    @sm90
    @pytest.mark.gpu
    def test_binary_lut_tma_decode_sanitizer_smoke():
        for n, k in ((1, 8), (129, 201), (300, 520)):
            for dtype in (torch.float16, torch.bfloat16):
                layout, w, k_x = make_case(n, k, dtype, seed=n)
                for m, clusters in ((1, 1), (16, 5), (3, 200)):
                    x = activations(m, k, k_x, dtype, seed=m)
                    assert_close_to_exact(run(x, layout, None, n, clusters), x, w, None,
                                          ksplit=-(-k_x // 128))
