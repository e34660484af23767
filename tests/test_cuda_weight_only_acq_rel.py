"""The post-scale decode with the acq_rel publish of split row blocks
(csrc/weight_only_kernel.cu, decode 2; cuda.weight_only_post_scale_acq_rel).

It computes the same sums in the same order as the post-scale decode and
changes only how a row block's stream-K parts are published, so on a GPU it
must give the post-scale decode's results bit for bit, for any split. On any
machine: its registration and the cases it declines.
"""
import pytest
import torch
from test_cuda_weight_only import act, assert_matches_dense, gpu, make_weight

from vlmkern.ops import cuda_weight_only as cw

NAME = "cuda.weight_only_post_scale_acq_rel"


def test_registered_opt_in_next_to_the_post_scale_decode():
    from vlmkern.ops.builtin import CUDA
    names = [k.name for k in CUDA.kernels]
    spec = CUDA.kernels[names.index(NAME)]
    assert spec.opt_in and (spec.min_m, spec.max_m) == (1, 16) and spec.laid_out
    assert names.index(NAME) + 1 == names.index("cuda.weight_only_post_scale")
    # 128-column scale slots only; 3-bit weights below 9 tokens stay exact, as
    # with the post-scale decode
    for bits, group, m, ok in ((4, 128, 1, True), (2, None, 16, True), (4, 256, 5, True),
                               (4, 64, 1, False), (3, 128, 8, False), (3, 128, 9, True)):
        why = spec.check(torch.zeros(m, 256, dtype=torch.float16),
                         make_weight(64, 256, bits, group, False))
        assert (why is None) == ok, (bits, group, m, why)


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_same_bits_as_the_post_scale_decode_for_every_split(bits, dtype):
    # few to many thread blocks per row block (num_ctas), odd sizes, bias
    op = torch.ops.vlmkern.weight_only_mma
    for n, k in ((33, 200), (300, 2400), (257, 520)):
        qw = make_weight(n, k, bits, 128, False, scale_dtype=dtype, seed=n + bits, device="cuda")
        mw = cw.kernel_weight(qw, dtype)
        w = qw.dequantize(torch.float32)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        units = mw.blocks * mw.chunks
        counters = cw._counters(torch.device("cuda"), mw.blocks)
        for m in (1, 3, 8, 9, 16):
            x, _ = cw.kernel_inputs(act(m, k, dtype, seed=m), qw, None)
            for ctas in sorted({c for c in (1, 2, 3, 7, units // 2, units) if 1 <= c <= units}):
                args = (x, mw.wq, mw.sz, bias, counters, bits, n, mw.slot_log2, ctas)
                want = op(*args, 1)
                got = op(*args, 2)
                assert torch.equal(got, want), (n, k, m, ctas)
                assert not counters[:mw.blocks].any()
            assert_matches_dense(cw.weight_only_post_scale_acq_rel(x[:, :k], qw, bias),
                                 x[:, :k], w, bias)


@gpu
def test_real_size_and_selection(monkeypatch):
    from vlmkern import ops
    qw = make_weight(4608, 3584, 4, 128, False, device="cuda")
    x = act(1, 3584, torch.float16)
    assert torch.equal(cw.weight_only_post_scale_acq_rel(x, qw), cw.weight_only_post_scale(x, qw))
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.setenv("VLMKERN_ENABLE", NAME)
    assert ops.which_kernel(x, qw) == NAME
    assert ops.which_kernel(act(17, 3584, torch.float16), qw) != NAME
    monkeypatch.delenv("VLMKERN_ENABLE")
    assert ops.which_kernel(x, qw) == "cuda.weight_only_post_scale"


@gpu
def test_wrapper_errors():
    with pytest.raises(ValueError, match="scale slots of 128 columns"):
        cw.weight_only_post_scale_acq_rel(act(1, 256, torch.float16),
                                          make_weight(64, 256, 4, 64, False, device="cuda"))
    with pytest.raises(ValueError, match="M <= 16"):
        cw.weight_only_post_scale_acq_rel(act(17, 256, torch.float16),
                                          make_weight(64, 256, 4, 128, False, device="cuda"))
