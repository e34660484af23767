"""Dense weight from the tensor-core layout (csrc/weight_only_dequant_kernel.cu,
vlmkern.ops.cuda_weight_only_dequant.dequantize_layout).

On any machine: the wrapper's errors when the extension or its op is missing.
On a GPU with the extension built: the kernel's output equals the torch
emulation of the exact decode (emulate_dequantize) bit for bit, and the
format's dequantize() when the scales are in the output dtype, on awkward and
real shapes (padding rows and columns, odd K, every slot width, act order);
torch.compile; bad inputs.
"""
import os

import pytest
import torch
from test_cuda_weight_only import _SKIP, make_weight, same_bits

import vlmkern.ext
from vlmkern.ops import cuda_weight_only as cw
from vlmkern.ops import cuda_weight_only_dequant as cwd


def _dequant_reason() -> str | None:
    if _SKIP is not None:
        return _SKIP
    if not hasattr(torch.ops.vlmkern, "weight_only_dequant"):
        return "vlmkern._C was built without csrc/weight_only_dequant_kernel.cu"
    return None


_SKIP_DQ = _dequant_reason()


def gpu(fn):
    """GPU test: marked `gpu`, skipped (with the reason) without a GPU or the op."""
    return pytest.mark.gpu(pytest.mark.skipif(_SKIP_DQ is not None, reason=str(_SKIP_DQ))(fn))


# -- any machine -----------------------------------------------------------------------
def test_wrapper_says_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(vlmkern.ext, "load_extension", lambda: (None, "no CUDA torch here"))
    mw = cw.to_mma_layout(make_weight(40, 72, 4, 32, False), torch.float16)
    with pytest.raises(RuntimeError, match="needs the CUDA extension: no CUDA torch here"):
        cwd.dequantize_layout(mw)


def test_wrapper_says_the_build_lacks_the_kernel(monkeypatch):
    if hasattr(torch.ops.vlmkern, "weight_only_dequant"):
        pytest.skip("this build has torch.ops.vlmkern.weight_only_dequant")
    monkeypatch.setattr(vlmkern.ext, "load_extension", lambda: (object(), "loaded"))
    mw = cw.to_mma_layout(make_weight(40, 72, 3, 64, True), torch.bfloat16)
    with pytest.raises(RuntimeError, match="built without csrc/weight_only_dequant_kernel.cu"):
        cwd.dequantize_layout(mw)


# -- GPU -------------------------------------------------------------------------------
def check_layout_dequant(qw, dtype, what):
    """Kernel vs the emulated exact decode, and vs dequantize() (stored column
    order) when the scales are already in dtype."""
    mw = cw.to_mma_layout(qw, dtype)
    got = cwd.dequantize_layout(mw)
    assert got.shape == (qw.out_features, qw.in_features) and got.dtype == dtype, what
    assert got.device == qw.qweight.device, what
    assert same_bits(got, cw.emulate_dequantize(mw)), f"differs from the emulation: {what}"
    if qw.scales.dtype == dtype:
        want = qw.dequantize(dtype)
        if qw.perm is not None:            # the layout keeps the stored (act-order) order
            want = want[:, qw.perm.long()]
        assert same_bits(got, want), f"differs from dequantize(): {what}"


# N: one row, rows in one block, one row past a block, three blocks; K: one
# column, one k16 step, less than a chunk, odd (2-byte stores), K % 8 == 0 past a
# chunk (16-byte stores) and with a ragged last group.
AWKWARD_N = (1, 100, 129, 300)
AWKWARD_K = (1, 8, 120, 131, 136, 264)


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_emulation_and_dequantize_on_awkward_shapes(bits, dtype):
    for n in AWKWARD_N:
        for k in AWKWARD_K:
            for group in (32, 64, 128, None):
                for sym in (False, True):
                    qw = make_weight(n, k, bits, group, sym, scale_dtype=dtype,
                                     seed=n * k + bits, device="cuda")
                    check_layout_dequant(qw, dtype, f"n={n} k={k} group={group} sym={sym}")


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_group16_fp32_and_other_dtype_scales_and_act_order(bits):
    # slot width 16 (slot_log2 0), scales rounded to the output dtype at load
    # time (emulation only), and act order (stored column order)
    cases = [(16, torch.float16, False), (16, torch.bfloat16, True), (64, torch.float32, False),
             (256, torch.float16, True), (32, torch.bfloat16, False)]
    for group, scale_dtype, perm in cases:
        for dtype in (torch.float16, torch.bfloat16):
            qw = make_weight(300, 520, bits, group, False, scale_dtype=scale_dtype, perm=perm,
                             seed=group + bits, device="cuda")
            check_layout_dequant(qw, dtype, f"group={group} scales={scale_dtype} perm={perm}")


@gpu
@pytest.mark.parametrize("n, k", [(4608, 3584), (256, 18944)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_real_sizes_and_determinism(n, k, bits):
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, bits, 128, False, scale_dtype=dtype, seed=bits, device="cuda")
        check_layout_dequant(qw, dtype, f"n={n} k={k}")
        mw = cw.to_mma_layout(qw, dtype)
        assert torch.equal(cwd.dequantize_layout(mw), cwd.dequantize_layout(mw))


@gpu
def test_wrapper_rejects_a_layout_off_the_gpu():
    mw = cw.to_mma_layout(make_weight(40, 72, 4, 32, False), torch.float16)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        cwd.dequantize_layout(mw)


@gpu
def test_traceable_by_torch_compile():
    qw = make_weight(96, 384, 3, 64, False, scale_dtype=torch.bfloat16, device="cuda")
    mw = cw.to_mma_layout(qw, torch.bfloat16)

    def f(scale):
        w = torch.ops.vlmkern.weight_only_dequant(mw.wq, mw.sz, 3, 96, 384, mw.slot_log2,
                                                  torch.bfloat16)
        return w * scale

    eager = f(2.0)
    assert torch.equal(torch.compile(f, fullgraph=True)(2.0), eager)
    meta = torch.ops.vlmkern.weight_only_dequant(mw.wq.to("meta"), mw.sz.to("meta"), 3, 96, 384,
                                                 mw.slot_log2, torch.float16)
    assert meta.shape == (96, 384) and meta.dtype == torch.float16 and meta.device.type == "meta"


@gpu
@pytest.mark.cpp_checks
def test_bad_inputs_give_clear_errors():
    qw = make_weight(200, 300, 4, 64, False, device="cuda")
    mw = cw.to_mma_layout(qw, torch.float16)     # 2 blocks, 3 chunks, 2 slots per chunk
    op = torch.ops.vlmkern.weight_only_dequant

    def call(wq=mw.wq, sz=mw.sz, bits=4, out_features=200, in_features=300,
             slot_log2=mw.slot_log2, dtype=torch.float16):
        return op(wq, sz, bits, out_features, in_features, slot_log2, dtype)

    assert same_bits(call(), cw.emulate_dequantize(mw))
    with pytest.raises((RuntimeError, NotImplementedError), match="CPU|CUDA tensor"):
        call(wq=mw.wq.cpu(), sz=mw.sz.cpu())
    with pytest.raises(RuntimeError, match="sz is on cpu"):
        call(sz=mw.sz.cpu())
    with pytest.raises(RuntimeError, match="wq and sz must be int32"):
        call(wq=mw.wq.long())
    with pytest.raises(RuntimeError, match="sz must have shape"):
        call(slot_log2=mw.slot_log2 + 1)
    with pytest.raises(RuntimeError, match="sz must have shape"):
        call(sz=mw.sz[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="bits must be 2, 3 or 4"):
        call(bits=5)
    with pytest.raises(RuntimeError, match="wq must have shape"):
        call(bits=3)
    with pytest.raises(RuntimeError, match="slot_log2 must be in 0..3"):
        call(slot_log2=4)
    with pytest.raises(RuntimeError, match="out_features=300 does not match"):
        call(out_features=300)
    with pytest.raises(RuntimeError, match="in_features=256 does not match"):
        call(in_features=256)
    with pytest.raises(RuntimeError, match="float16 or torch.bfloat16"):
        call(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="wq must be contiguous"):
        call(wq=mw.wq.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(RuntimeError, match="wq must be 4-D"):
        call(wq=mw.wq.flatten())


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @gpu
    def test_dequant_sanitizer_smoke():
        # ragged rows; K = 203 (2-byte stores) and 264 (16-byte stores)
        for bits in (2, 3, 4):
            for k in (203, 264):
                qw = make_weight(130, k, bits, 64, False, device="cuda")
                for dtype in (torch.float16, torch.bfloat16):
                    cwd.dequantize_layout(cw.to_mma_layout(qw, dtype))
        torch.cuda.synchronize()
