"""Integer-activation decode on the weight-only pipeline
(csrc/weight_only_kernel.cu, integer decode; torch.ops.vlmkern.int_act_staged_mma,
the opt-in ``cuda.int_act_staged``).

CPU: the load-time layout read back the way the kernel reads it (fragment
positions and scale slots, written out here from csrc/weight_only.h), and the
kernel's arithmetic (exact int32 sums per slot, scaled into fp32) emulated on
that layout against the reference. GPU: the kernel itself.
"""
import os

import pytest
import torch
from test_cuda_int_act import act, check_close, gen, make_intact
from tiny_models import kernel_op_reason

import vlmkern.ops as ops
from vlmkern.ops import cuda_int_act as cia
from vlmkern.ops import cuda_int_act_staged as staged
from vlmkern.ops import reference

SHAPES = [(1, 64), (100, 200), (129, 520), (300, 1000), (64, 256)]
GROUPS = [None, 32, 64, 128, 256]


def cases(shapes):
    """(n, k, group) with every group no wider than its row (a wider one is one group per row)."""
    return [(n, k, g) for n, k in shapes for g in GROUPS if g is None or g <= k]


def read_back(sw: staged.StagedWeight):
    """(int8 codes [NB*128, C*256], fp32 scale of every code [NB*128, C*256])
    from the layout, by the kernel's addressing: lane 4g + t, register
    r = rh + 2 hh of step s holds row g + 8 rh, codes 32 s + 16 hh + 4t + 0..3;
    slot s of a unit holds, for row pair (g, g + 8), the scales of its codes."""
    nb, c = sw.wq.shape[0], sw.wq.shape[1]
    raw = sw.wq.contiguous().view(torch.int8).view(nb, c, 8, 8, 32, 4, 4)   # b c w s lane r byte
    codes = torch.zeros(nb * 128, c * 256, dtype=torch.int8)
    scales = torch.zeros(nb * 128, c * 256)
    sz = sw.sz.contiguous().view(torch.float32)                             # b c w S g rh
    width = 32 << sw.slot_log2
    for b in range(nb):
        for u in range(c):
            for w in range(8):
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    for r in range(4):
                        row = b * 128 + w * 16 + 8 * (r % 2) + g
                        for s in range(8):
                            col = u * 256 + 32 * s + 16 * (r // 2) + 4 * t
                            codes[row, col:col + 4] = raw[b, u, w, s, lane, r]
                for slot in range(8 >> sw.slot_log2):
                    cols = slice(u * 256 + slot * width, u * 256 + (slot + 1) * width)
                    for g in range(8):
                        for rh in range(2):
                            scales[b * 128 + w * 16 + 8 * rh + g, cols] = sz[b, u, w, slot, g, rh]
    return codes, scales


@pytest.mark.parametrize("n,k,group", cases(SHAPES))
def test_layout_reads_back_as_the_padded_weight(n, k, group):
    qw = make_intact(n, k, 8, 8, group, seed=n + k)
    sw = staged.to_staged_layout(qw)
    kw = cia.to_kernel_weight(qw, cia.MODE_I8)
    lay = kw.layout
    codes, scales = read_back(sw)
    assert sw.wq.dtype == torch.int32 and sw.wq.shape[2:] == (8, 1024)
    assert torch.equal(codes[:n, :lay.k_pad], kw.w)
    assert not codes[n:].any() and not codes[:, lay.k_pad:].any()
    # every real code's scale is its group's; padding rows scale by zero
    group_of = (torch.arange(lay.k_pad) // lay.group_pad).clamp(max=lay.groups - 1)
    assert torch.equal(scales[:n, :lay.k_pad], kw.w_scale_t[group_of].T)
    assert not scales[n:].any()


def emulate(x, qw):
    """The kernel's arithmetic on its own layout, in float64 where it uses fp32:
    per 256-code unit and scale slot, the exact integer sum times the row's
    scale, summed; then times the token scale."""
    sw = staged.to_staged_layout(qw)
    codes, scales = read_back(sw)
    q, sx = reference.quantize_activations(x, qw.a_bits, qw.act_scale)
    qp = torch.zeros(x.shape[0], codes.shape[1], dtype=torch.int64)
    qp[:, :sw.layout.k_pad] = cia.pad_columns(q, sw.layout).to(torch.int64)
    width = 32 << sw.slot_log2
    acc = torch.zeros(x.shape[0], codes.shape[0], dtype=torch.float64)
    for start in range(0, codes.shape[1], width):
        part = qp[:, start:start + width] @ codes[:, start:start + width].to(torch.int64).T
        acc += part.double() * scales[:, start].double()
    return (acc * sx.double()[:, None])[:, :qw.out_features]


@pytest.mark.parametrize("group", GROUPS)
def test_emulated_arithmetic_matches_the_reference(group):
    for wa in ((8, 8), (6, 6), (8, 4)):
        qw = make_intact(129, 520, *wa, group, seed=wa[1])
        x = torch.randn(5, 520, generator=gen(3))
        ref = reference.int_act_matmul(x, qw).double()
        torch.testing.assert_close(emulate(x, qw), ref, rtol=1e-6, atol=1e-9)


def test_unsupported_weights_are_refused():
    assert "not stored as int8" in staged.unsupported_reason(make_intact(8, 256, 4, 4, None))
    assert "not 32, 64, 128 or 256" in staged.unsupported_reason(make_intact(8, 512, 8, 8, 96))
    assert "not 32, 64, 128 or 256" in staged.unsupported_reason(make_intact(8, 1024, 8, 8, 512))
    assert staged.unsupported_reason(make_intact(8, 1000, 8, 8, None)) is None
    with pytest.raises(ValueError, match="cuda.int_act_staged"):
        staged.to_staged_layout(make_intact(8, 256, 4, 8, None))


def test_shared_memory_and_launch_size():
    assert staged.SMEM_BYTES == 3 * (32768 + 4096 + 32 * 272) == staged.smem_bytes(32, 0)
    assert staged.smem_bytes(1, 2) == staged.smem_bytes(8, 2) == 3 * (32768 + 1024 + 8 * 272)
    assert staged.smem_bytes(9, 3) == 3 * (32768 + 512 + 16 * 272)
    h100, a100 = 233472, 167936              # shared memory per SM
    for slot_log2 in range(4):               # a 32-token block fits once per SM on both
        assert staged.launch_ctas(10_000, 132, h100, slot_log2) == 132
        assert staged.launch_ctas(10_000, 108, a100, slot_log2) == 108
    assert staged.launch_ctas(36 * 14, 132, 2 * h100, 3) == 2 * 132   # room for two: two per SM
    assert staged.launch_ctas(50, 132, h100, 0) == 50                 # never more than the units
    assert staged.launch_ctas(50, 132, 1000, 0) == 50                 # at least one per SM


# -- GPU ------------------------------------------------------------------------------------
_SKIP = kernel_op_reason("int_act_staged_mma", "weight_only_kernel.cu")
gpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
M_SIZES = [1, 3, 8, 9, 16, 17, 32]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", cases(SHAPES + [(4608, 3584)]))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_reference(n, k, group, dtype):
    bias = torch.randn(n, generator=gen(4)).to("cuda", dtype)
    for wa in ((8, 8), (6, 6), (8, 4)):
        qw = make_intact(n, k, *wa, group, seed=n + wa[1], device="cuda")
        for m in M_SIZES:
            x = act(m, k, dtype, seed=m)
            for b in (None, bias):
                check_close(staged.int_act_staged(x, qw, b), x, qw, b)


@gpu
@pytest.mark.gpu
def test_gpu_static_scale_nan_token_and_fp32_bias():
    qw = make_intact(300, 520, 8, 8, 128, act_scale=0.02, seed=5, device="cuda")
    x = act(6, 520, torch.float16)
    bias = torch.randn(300, generator=gen(6)).cuda()          # fp32 bias
    check_close(staged.int_act_staged(x, qw, bias), x, qw, bias)
    x[2, 7] = float("nan")       # a NaN token gives a non-finite row, the others stay finite
    y = staged.int_act_staged(x, make_intact(300, 520, 8, 8, None, device="cuda"))
    assert y.shape == (6, 300)
    assert not bool(torch.isfinite(y[2]).any()) and bool(torch.isfinite(y[[0, 1, 3, 4, 5]]).all())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_deterministic_and_batch_invariant(dtype):
    qw = make_intact(300, 1000, 8, 8, None, seed=7, device="cuda")
    x = act(32, 1000, dtype, seed=8)
    full = staged.int_act_staged(x, qw)
    assert torch.equal(staged.int_act_staged(x, qw), full)
    for m in (1, 2, 8, 9, 16, 17, 31):
        assert torch.equal(staged.int_act_staged(x[:m], qw), full[:m]), m
    for i in (0, 13, 31):
        assert torch.equal(staged.int_act_staged(x[i:i + 1], qw), full[i:i + 1]), i


@gpu
@pytest.mark.gpu
def test_gpu_selected_when_enabled_and_traceable(monkeypatch):
    qw = make_intact(512, 1024, 8, 8, None, seed=9, device="cuda")
    x = act(20, 1024, torch.float16)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) != "cuda.int_act_staged"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.int_act_staged")
    assert ops.which_kernel(x, qw) == "cuda.int_act_staged"
    assert ops.which_kernel(act(33, 1024, torch.float16), qw) != "cuda.int_act_staged"
    assert ops.which_kernel(x.float(), qw) != "cuda.int_act_staged"      # fp32 stays elsewhere
    check_close(ops.linear(x, qw), x, qw, None)
    sw = staged.kernel_weight(qw)
    lay = sw.layout
    count = torch.zeros(64, dtype=torch.int32, device="cuda")

    def f(v):
        q, sx = torch.ops.vlmkern.int_act_quantize(v, 8, None, lay.group, lay.group_pad, lay.k_pad,
                                                   cia.MODE_I8)
        return torch.ops.vlmkern.int_act_staged_mma(q, sx, sw.wq, sw.sz, None, count, 512,
                                                    sw.slot_log2, 11, v.dtype)

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_inputs():
    qw = make_intact(100, 512, 8, 8, None, device="cuda")
    sw = staged.kernel_weight(qw)
    q = torch.zeros(3, 512, dtype=torch.int8, device="cuda")
    sx = torch.ones(3, device="cuda")
    count = torch.zeros(8, dtype=torch.int32, device="cuda")
    op = torch.ops.vlmkern.int_act_staged_mma

    def fails(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    fails("out_dtype must be float16 or bfloat16", q, sx, sw.wq, sw.sz, None, count, 100, 3, 1,
          torch.float32)
    fails("q must be a 2-D int8", q.float(), sx, sw.wq, sw.sz, None, count, 100, 3, 1, torch.half)
    fails("at most 32", torch.zeros(33, 512, dtype=torch.int8, device="cuda"), torch.ones(33, device="cuda"),
          sw.wq, sw.sz, None, count, 100, 3, 1, torch.half)
    fails("sx must have shape", q, sx[:2], sw.wq, sw.sz, None, count, 100, 3, 1, torch.half)
    fails("sz must have shape", q, sx, sw.wq, sw.sz, None, count, 100, 2, 1, torch.half)
    fails("num_ctas must be in 1..2", q, sx, sw.wq, sw.sz, None, count, 100, 3, 3, torch.half)
    fails("does not match", q, sx, sw.wq, sw.sz, None, count, 200, 3, 1, torch.half)


if os.environ.get("VLMKERN_SANITIZE") == "1":   # a small run under compute-sanitizer memcheck
    @gpu
    @pytest.mark.gpu
    def test_int_act_staged_sanitizer_smoke():
        for n, k in ((1, 64), (129, 520)):
            for group in (None, 32, 256):
                if group is not None and group > k:
                    continue
                qw = make_intact(n, k, 8, 8, group, seed=n, device="cuda")
                for m in (1, 9, 32):
                    x = act(m, k, torch.bfloat16, seed=m)
                    check_close(staged.int_act_staged(x, qw), x, qw, None)
