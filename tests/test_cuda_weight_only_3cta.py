"""The post-scale decode built for three thread blocks per SM
(csrc/weight_only_kernel.cu, decode 3; cuda.weight_only_post_scale_3cta).

The same kernel code as the post-scale decode with its registers budgeted for
three blocks per SM (and 5 pipeline stages instead of 6 at 9-16 tokens),
launched with three per SM. For a given number of thread blocks it computes
the same sums in the same order, so on a GPU it must give the post-scale
decode's results bit for bit at that count. On any machine: its registration,
the cases it declines and the shared memory it needs.
"""
import types

import pytest
import torch
from test_cuda_weight_only import act, assert_matches_dense, gpu, make_weight

from vlmkern.ops import cuda_weight_only as cw

NAME = "cuda.weight_only_post_scale_3cta"
H100_SMEM_PER_SM = 233472    # 228 KB
SMALLER_SMEM_PER_SM = 167936    # 164 KB, as on an A100


def _spec():
    from vlmkern.ops.builtin import CUDA
    names = [k.name for k in CUDA.kernels]
    return names, CUDA.kernels[names.index(NAME)]


def test_registered_opt_in_before_the_other_post_scale_kernels():
    names, spec = _spec()
    assert spec.opt_in and (spec.min_m, spec.max_m) == (1, 16) and spec.laid_out
    assert spec.min_sm == (9, 0)        # the 80-register build spills on sm_80
    assert names.index(NAME) + 1 == names.index("cuda.weight_only_post_scale_acq_rel")
    # 16 tokens with 128-column scale slots, 8 with 64-column ones, no other
    # slots; unlike the default post-scale decode it takes 3-bit weights at
    # every M (what it is timed for)
    for bits, group, m, ok in ((4, 128, 16, True), (4, 64, 8, True), (4, 64, 9, False),
                               (3, 128, 1, True), (2, None, 16, True), (4, 256, 12, True),
                               (4, 32, 1, False), (2, 16, 1, False)):
        why = spec.check(torch.zeros(m, 256, dtype=torch.float16),
                         make_weight(64, 256, bits, group, False))
        assert (why is None) == ok, (bits, group, m, why)


def test_declined_where_three_blocks_do_not_fit(monkeypatch):
    # per block: 6 stages (5 for 16 tokens) of codes, scale slots and the
    # token tile, 1 KB reserved and the static is_last in a 128-byte unit
    assert cw.smem_3cta(4, 3, 1) == 3 * (6 * (8192 + 512 + 2176) + 1024 + 128) == 199296
    assert cw.smem_3cta(4, 3, 16) == 3 * (5 * (8192 + 512 + 4352) + 1024 + 128) == 199296
    assert cw.smem_3cta(4, 2, 8) == 208512
    assert max(cw.smem_3cta(b, s, m) for b in (2, 3, 4) for s in (2, 3) for m in (8, 16)) \
        <= H100_SMEM_PER_SM
    assert cw.smem_3cta(3, 3, 8) == 162432 <= SMALLER_SMEM_PER_SM < cw.smem_3cta(3, 3, 16) == 168576
    _, spec = _spec()
    for have, bits, m, ok in ((H100_SMEM_PER_SM, 4, 16, True), (SMALLER_SMEM_PER_SM, 4, 1, False),
                              (SMALLER_SMEM_PER_SM, 2, 16, True), (SMALLER_SMEM_PER_SM, 3, 8, True),
                              (SMALLER_SMEM_PER_SM, 3, 9, False)):
        monkeypatch.setattr(cw, "smem_per_multiprocessor", lambda device, have=have: have)
        x = types.SimpleNamespace(shape=(m, 256), is_cuda=True, device=torch.device("cuda", 0))
        why = spec.check(x, make_weight(64, 256, bits, 128, False))
        assert (why is None) == ok, (have, bits, m, why)
        if not ok:
            assert f"need {cw.smem_3cta(bits, 3, m)} bytes of shared memory per SM, the GPU " \
                   f"has 167936" in why


def test_launches_three_blocks_per_sm():
    assert cw.num_ctas_for(10_000, 132, 3) == 396
    assert cw.num_ctas_for(300, 132, 3) == 300
    assert cw.num_ctas_for(10_000, 132) == 264   # the other decodes: two per SM


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [64, 128])
def test_same_bits_as_the_post_scale_decode_for_every_split(bits, dtype, group):
    # few to many thread blocks per row block (num_ctas), odd sizes, bias
    op = torch.ops.vlmkern.weight_only_mma
    for n, k in ((33, 200), (300, 2400), (257, 520)):
        qw = make_weight(n, k, bits, group, False, scale_dtype=dtype, seed=n + bits, device="cuda")
        mw = cw.kernel_weight(qw, dtype)
        w = qw.dequantize(torch.float32)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        units = mw.blocks * mw.chunks
        counters = cw._counters(torch.device("cuda"), mw.blocks)
        for m in (1, 3, 8, 9, 16)[:5 if cw.post_scale_3cta_max_m(qw) == 16 else 3]:
            x, _ = cw.kernel_inputs(act(m, k, dtype, seed=m), qw, None)
            for ctas in sorted({c for c in (1, 2, 3, 7, units // 2, units) if 1 <= c <= units}):
                args = (x, mw.wq, mw.sz, bias, counters, bits, n, mw.slot_log2, ctas)
                want = op(*args, 1)
                got = op(*args, 3)
                assert torch.equal(got, want), (n, k, m, ctas)
                assert not counters[:mw.blocks].any()
            assert_matches_dense(cw.weight_only_post_scale_3cta(x[:, :k], qw, bias),
                                 x[:, :k], w, bias)


@gpu
def test_real_size_and_selection(monkeypatch):
    from vlmkern import ops
    qw = make_weight(37888, 3584, 4, 128, False, device="cuda")
    w = qw.dequantize(torch.float32)
    for m in (1, 16):
        x = act(m, 3584, torch.float16)
        assert_matches_dense(cw.weight_only_post_scale_3cta(x, qw), x, w, None)
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.setenv("VLMKERN_ENABLE", NAME)
    x = act(1, 3584, torch.float16)
    fits = _spec()[1].check(x, qw) is None     # Hopper: three blocks' shared memory fits
    assert (ops.which_kernel(x, qw) == NAME) == fits
    assert ops.which_kernel(act(17, 3584, torch.float16), qw) != NAME
    monkeypatch.delenv("VLMKERN_ENABLE")
    assert ops.which_kernel(x, qw) == "cuda.weight_only_post_scale"


@gpu
def test_wrapper_errors():
    with pytest.raises(ValueError, match="scale slots of 64 or 128 columns"):
        cw.weight_only_post_scale_3cta(act(1, 256, torch.float16),
                                       make_weight(64, 256, 4, 32, False, device="cuda"))
    with pytest.raises(ValueError, match="M <= 16"):
        cw.weight_only_post_scale_3cta(act(17, 256, torch.float16),
                                       make_weight(64, 256, 4, 128, False, device="cuda"))
    with pytest.raises(ValueError, match="M <= 8"):
        cw.weight_only_post_scale_3cta(act(9, 256, torch.float16),
                                       make_weight(64, 256, 4, 64, False, device="cuda"))
