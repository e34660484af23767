"""The optional CUDA extension vlmkern._C: loader behaviour everywhere, and the
dequantization kernel against a bit-level reference of the packed format on GPU."""
import os
import subprocess
import sys

import pytest
import torch

# ---------------------------------------------------------------------------
# Bit-level reference of the canonical group-wise format, written from the
# format definition alone (no shifts across words): every code is the sum of
# its bits, and stream bit t is bit t % 32 of word t // 32.
# ---------------------------------------------------------------------------


def ref_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [R, C] -> int32 [R, ceil(C*bits/32)]."""
    rows, count = codes.shape
    stream = ((codes.to(torch.int64).unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(rows, -1)
    words = -(-count * bits // 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - count * bits))
    w = (stream.reshape(rows, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def ref_unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [R, W] -> int64 codes [R, count]."""
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    stream = ((words.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(rows, -1)
    code_bits = stream[:, : count * bits].reshape(rows, count, bits)
    return (code_bits << torch.arange(bits)).sum(-1)


def ref_dequant(qweight, qzeros, scales, bits, group_size, in_features, out_dtype):
    k = in_features
    groups = -(-k // group_size)
    q = ref_unpack(qweight.cpu(), bits, k)
    if qzeros is None:
        z = torch.full((q.shape[0], groups), 2 ** (bits - 1), dtype=torch.int64)
    else:
        z = ref_unpack(qzeros.cpu(), bits, groups)
    g = torch.arange(k) // group_size
    return (scales.cpu().float()[:, g] * (q - z[:, g]).float()).to(out_dtype)


def make_case(n, k, bits, group_size, sym, scale_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 2**bits, (n, groups), generator=gen)
    return codes, zeros, ref_pack(codes, bits), None if sym else ref_pack(zeros, bits), scales


def test_reference_roundtrip():
    for bits in (1, 2, 3, 4, 5, 8):
        codes = torch.randint(0, 2**bits, (3, 37))
        packed = ref_pack(codes, bits)
        assert packed.shape == (3, -(-37 * bits // 32)) and packed.dtype == torch.int32
        assert torch.equal(ref_unpack(packed, bits, 37), codes)
    # Stream order: 3-bit code 10 occupies bits 30..32, straddling words 0 and 1.
    codes = torch.zeros(1, 11, dtype=torch.int64)
    codes[0, 10] = 0b111
    assert ref_pack(codes, 3).tolist() == [[-(2**31) + 2**30, 1]]


# ---------------------------------------------------------------------------
# Loader: must never raise, on any torch
# ---------------------------------------------------------------------------


def test_import_does_not_load_extension():
    # A fresh interpreter, so modules imported by other tests do not count.
    code = ("import sys, vlmkern, vlmkern.ext; "
            "assert 'vlmkern._C' not in sys.modules; assert vlmkern.ext._cached is None")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_extension_returns_module_or_reason_and_caches():
    from vlmkern.ext import load_extension

    first = load_extension()
    module, reason = first
    assert isinstance(reason, str) and reason
    assert load_extension() is first
    if module is not None:
        assert hasattr(torch.ops.vlmkern, "dequant_groupwise")


def test_a_source_checkout_that_shadows_the_install_is_named(tmp_path):
    from vlmkern.ext import source_checkout_hint

    (tmp_path / "vlmkern").mkdir()
    (tmp_path / "vlmkern" / "__init__.py").write_text("")
    assert source_checkout_hint(str(tmp_path / "vlmkern" / "__init__.py")) == ""
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "csrc").mkdir()
    hint = source_checkout_hint(str(tmp_path / "vlmkern" / "__init__.py"))
    assert str(tmp_path.resolve()) in hint and "pip install --no-build-isolation -e ." in hint
    # an editable install of that checkout is served by it: nothing shadows anything
    assert source_checkout_hint(str(tmp_path / "vlmkern" / "__init__.py"), str(tmp_path)) == ""
    other = source_checkout_hint(str(tmp_path / "vlmkern" / "__init__.py"), "/elsewhere")
    assert other == hint


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_cpu_torch_reports_unavailable():
    from vlmkern.ext import dequant_groupwise, load_extension

    module, reason = load_extension()
    assert module is None
    assert "CPU-only torch" in reason
    _, _, qweight, _, scales = make_case(2, 64, 4, 32, True, torch.float16)
    with pytest.raises(RuntimeError, match="CPU-only torch"):
        dequant_groupwise(qweight, None, scales, 4, 32, 64, torch.float16)


# ---------------------------------------------------------------------------
# Kernel vs reference on GPU
# ---------------------------------------------------------------------------

def needs_gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA GPU")(fn))


def _require_extension():
    from vlmkern.ext import load_extension

    module, reason = load_extension()
    if module is None:
        if os.environ.get("VLMKERN_SKIP_CUDA") == "1":
            pytest.skip(reason)
        pytest.fail(f"CUDA GPU present but the extension is unavailable: {reason}")


# (N, K): odd N, K not a multiple of the group size, of 8 (scalar-store path),
# K smaller than a group, and a plain aligned shape.
SHAPES = [(7, 200), (5, 203), (1, 72), (33, 256)]


@needs_gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])  # None: one group of K
def test_dequant_matches_reference(bits, group_size):
    _require_extension()
    from vlmkern.ext import dequant_groupwise

    for n, k in SHAPES:
        g = k if group_size is None else group_size
        for sym in (True, False):
            for scale_dtype in (torch.float16, torch.bfloat16, torch.float32):
                _, _, qweight, qzeros, scales = make_case(n, k, bits, g, sym, scale_dtype,
                                                          seed=n * k + bits)
                for out_dtype in (torch.float16, torch.bfloat16):
                    args = (qweight, qzeros, scales, bits, g, k, out_dtype)
                    want = ref_dequant(*args)
                    got = dequant_groupwise(qweight.cuda(), None if sym else qzeros.cuda(),
                                            scales.cuda(), bits, g, k, out_dtype)
                    assert got.shape == (n, k) and got.dtype == out_dtype and got.is_cuda
                    # One fp32 product and one rounding on both sides: bit-exact.
                    assert torch.equal(got.cpu(), want), (n, k, bits, g, sym, scale_dtype,
                                                          out_dtype)


def test_dequant_rejects_bad_arguments_before_the_op():
    """Checked in Python, so the errors need neither a GPU nor the extension."""
    from vlmkern.ext import dequant_groupwise

    _, _, qweight, qzeros, scales = make_case(5, 200, 3, 64, False, torch.float16)
    with pytest.raises(ValueError, match=r"qweight must have shape \[5, 19\], got \[5, 18\]"):
        dequant_groupwise(qweight[:, :18].contiguous(), qzeros, scales, 3, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="scales must have shape"):
        dequant_groupwise(qweight, qzeros, scales[:, :3].contiguous(), 3, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        dequant_groupwise(qweight, qzeros[:, :0].contiguous(), scales, 3, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="qzeros must be int32"):
        dequant_groupwise(qweight, qzeros.long(), scales, 3, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="scales must be contiguous"):
        dequant_groupwise(qweight, qzeros, scales.t().contiguous().t(), 3, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="qzeros is on meta"):
        dequant_groupwise(qweight, qzeros.to("meta"), scales, 3, 64, 200, torch.float16)
    with pytest.raises(TypeError, match="out_dtype"):
        dequant_groupwise(qweight, qzeros, scales, 3, 64, 200, torch.float32)
    with pytest.raises(TypeError, match="scales must be float16"):
        dequant_groupwise(qweight, qzeros, scales.double(), 3, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="2-D int32"):
        dequant_groupwise(qweight.float(), qzeros, scales, 3, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="bits"):
        dequant_groupwise(qweight, qzeros, scales, 9, 64, 200, torch.float16)
    with pytest.raises(ValueError, match="group_size"):
        dequant_groupwise(qweight, qzeros, scales, 3, 0, 200, torch.float16)


@needs_gpu
@pytest.mark.cpp_checks
def test_dequant_op_checks_its_arguments_in_cpp():
    _require_extension()
    _, _, qweight, qzeros, scales = make_case(5, 200, 3, 64, False, torch.float16)
    qweight, qzeros, scales = qweight.cuda(), qzeros.cuda(), scales.cuda()
    op = torch.ops.vlmkern.dequant_groupwise
    with pytest.raises(RuntimeError, match=r"qweight must have shape .* = \[5, 19\], got \[5, 18\]"):
        op(qweight[:, :18].contiguous(), qzeros, scales, 3, 64, 200, torch.float16, False)
    with pytest.raises(RuntimeError, match="scales must have shape"):
        op(qweight, qzeros, scales[:, :3].contiguous(), 3, 64, 200, torch.float16, True)
    with pytest.raises(RuntimeError, match="qzeros must have shape"):
        op(qweight, qzeros[:, :0].contiguous(), scales, 3, 64, 200, torch.float16, False)
    with pytest.raises(RuntimeError, match="out_dtype"):
        op(qweight, qzeros, scales, 3, 64, 200, torch.float32, False)
    with pytest.raises(RuntimeError, match="bits"):
        op(qweight, qzeros, scales, 9, 64, 200, torch.float16, False)


@needs_gpu
def test_dequant_meta_shape():
    _require_extension()
    from vlmkern.ext import dequant_groupwise

    _, _, qweight, qzeros, scales = make_case(5, 200, 3, 64, False, torch.float16)
    meta = dequant_groupwise(qweight.to("meta"), qzeros.to("meta"), scales.to("meta"), 3, 64, 200,
                             torch.bfloat16)
    assert meta.device.type == "meta" and meta.shape == (5, 200) and meta.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# Fast dequantize kernel (fast=True) and its opt-in KernelSpec
# ---------------------------------------------------------------------------


def test_ext_passes_fast_through(monkeypatch):
    import types

    from vlmkern import ext

    calls = []
    monkeypatch.setattr(ext, "load_extension", lambda: (types.ModuleType("_C"), "stub"))
    monkeypatch.setattr(torch.ops, "vlmkern", types.SimpleNamespace(
        dequant_groupwise=lambda *args: calls.append(args)), raising=False)
    _, _, qweight, _, scales = make_case(2, 64, 4, 32, True, torch.float16)
    ext.dequant_groupwise(qweight, None, scales, 4, 32, 64, torch.float16)
    ext.dequant_groupwise(qweight, None, scales, 4, 32, 64, torch.float16, fast=True)
    assert [c[-1] for c in calls] == [False, True]
    assert calls[0][3:7] == (4, 32, 64, torch.float16)


def test_prefill_dequantize_runs_the_fast_kernel(monkeypatch):
    """cuda.dequant_cublas asks for the fast dequantize kernel (which falls back
    to the general one where it does not apply): there is no separate spec."""
    import vlmkern.ext
    from vlmkern.formats.groupwise import QuantizedWeight
    from vlmkern.ops.builtin import CUDA, _cuda_dequant_matmul

    assert "cuda.dequant_fast_cublas" not in [k.name for k in CUDA.kernels]
    seen = {}

    def fake(qweight, qzeros, scales, bits, group_size, in_features, out_dtype, fast=False):
        seen["fast"] = fast
        return torch.zeros(qweight.shape[0], in_features, dtype=out_dtype)

    monkeypatch.setattr(vlmkern.ext, "dequant_groupwise", fake)
    codes, zeros, _, _, scales = make_case(8, 64, 4, 32, False, torch.float16)
    qw = QuantizedWeight.from_codes(codes, scales, zeros, 4, 32)
    y = _cuda_dequant_matmul(torch.ones(3, 64, dtype=torch.float16), qw, None)
    assert seen == {"fast": True} and y.shape == (3, 8)


def test_prefill_dequantize_takes_strided_weight_tensors(monkeypatch):
    """The format lets a weight's tensors be strided (the torch and Triton
    paths take them); the dequantize op's checks want dense rows."""
    import dataclasses

    import vlmkern.ext
    from vlmkern.formats.groupwise import QuantizedWeight
    from vlmkern.ops.builtin import _cuda_dequant_matmul

    def checked(qweight, qzeros, scales, bits, group_size, in_features, out_dtype, fast=False):
        vlmkern.ext._check_dequant_args(qweight, qzeros, scales, bits, group_size, in_features,
                                        out_dtype)
        return QuantizedWeight(qweight, scales, qzeros, None, bits, group_size,
                               in_features).dequantize(out_dtype)

    monkeypatch.setattr(vlmkern.ext, "dequant_groupwise", checked)
    codes, zeros, _, _, scales = make_case(8, 64, 4, 32, False, torch.float16)
    qw = QuantizedWeight.from_codes(codes, scales, zeros, 4, 32)
    strided = dataclasses.replace(qw, **{name: getattr(qw, name).t().contiguous().t()
                                         for name in ("qweight", "scales", "qzeros")}).validate()
    assert not strided.scales.is_contiguous()
    x = torch.randn(3, 64, dtype=torch.float16)
    assert torch.equal(_cuda_dequant_matmul(x, strided, None), _cuda_dequant_matmul(x, qw, None))


# (N, K): K a multiple of 256, K not a multiple of 256 (idle lanes in each
# row's last unit), units of one warp spanning rows, K below one group, and K
# not a multiple of 8 (general kernel only).
FAST_SHAPES = [(5, 512), (7, 200), (9, 1032), (1, 72), (5, 203)]


@needs_gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None, 48])  # None: one group; 48: general
def test_fast_dequant_matches_general_and_reference(bits, group_size):
    _require_extension()
    from vlmkern.ext import dequant_groupwise

    for n, k in FAST_SHAPES:
        g = k if group_size is None else group_size
        for sym in (True, False):
            for scale_dtype in (torch.float16, torch.bfloat16, torch.float32):
                _, _, qweight, qzeros, scales = make_case(n, k, bits, g, sym, scale_dtype,
                                                          seed=n * k + bits + 1)
                dev = (qweight.cuda(), None if sym else qzeros.cuda(), scales.cuda())
                for out_dtype in (torch.float16, torch.bfloat16):
                    want = ref_dequant(qweight, qzeros, scales, bits, g, k, out_dtype)
                    fast = dequant_groupwise(*dev, bits, g, k, out_dtype, fast=True)
                    plain = dequant_groupwise(*dev, bits, g, k, out_dtype)
                    case = (n, k, bits, g, sym, scale_dtype, out_dtype)
                    assert fast.shape == (n, k) and fast.dtype == out_dtype, case
                    assert torch.equal(fast, plain), case
                    assert torch.equal(fast.cpu(), want), case


@needs_gpu
def test_fast_dequant_real_size_and_edges():
    """Qwen2-VL-7B fused qkv (3584 -> 4608) at W4/W3/W2/W8 g128; extreme
    scales (fp16 overflow to inf, subnormal results, negative); an 8-bit
    qweight that is only 4-byte aligned, which the fast path must hand to the
    general kernel."""
    _require_extension()
    from vlmkern.ext import dequant_groupwise
    from vlmkern.formats.groupwise import QuantizedWeight

    # packed and dequantized by the package itself: the bit-level reference
    # above takes seconds per matrix of this size
    n, k, g = 4608, 3584, 128
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 3, 2, 8):
        for sym, scale_dtype, out_dtype in ((False, torch.float16, torch.float16),
                                            (True, torch.bfloat16, torch.bfloat16),
                                            (False, torch.float16, torch.bfloat16)):
            codes = torch.randint(0, 2**bits, (n, k), generator=gen)
            zeros = None if sym else torch.randint(0, 2**bits, (n, k // g), generator=gen)
            scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
            qw = QuantizedWeight.from_codes(codes, scales, zeros, bits, g)
            want = qw.dequantize(out_dtype)
            dev = (qw.qweight.cuda(), None if sym else qw.qzeros.cuda(), scales.cuda())
            fast = dequant_groupwise(*dev, bits, g, k, out_dtype, fast=True)
            assert torch.equal(fast, dequant_groupwise(*dev, bits, g, k, out_dtype))
            assert torch.equal(fast.cpu(), want), (bits, sym, scale_dtype, out_dtype)

    values = {torch.float16: [65504.0, 300.0, 6e-8, 1e-5, -2.5, 0.0],
              torch.bfloat16: [3e38, 1e-38, 9e-41, -7.0, 1.0],
              torch.float32: [3e38, 1e-44, -1e-3, 12345.678]}
    for bits in (2, 3, 4, 8):
        for scale_dtype, vals in values.items():
            rows, cols, group = 6, 256, 32
            _, _, qweight, qzeros, _ = make_case(rows, cols, bits, group, False, scale_dtype)
            idx = torch.arange(rows * cols // group).reshape(rows, -1) % len(vals)
            scales = torch.tensor(vals, dtype=torch.float64)[idx].to(scale_dtype)
            for out_dtype in (torch.float16, torch.bfloat16):
                want = ref_dequant(qweight, qzeros, scales, bits, group, cols, out_dtype)
                got = dequant_groupwise(qweight.cuda(), qzeros.cuda(), scales.cuda(), bits, group,
                                        cols, out_dtype, fast=True)
                assert torch.equal(got.cpu(), want), (bits, scale_dtype, out_dtype)

    _, _, qweight, qzeros, scales = make_case(3, 64, 8, 32, False, torch.float16)
    flat = torch.zeros(qweight.numel() + 1, dtype=torch.int32, device="cuda")
    shifted = flat[1:].view(qweight.shape)
    shifted.copy_(qweight)
    assert shifted.data_ptr() % 8 == 4
    got = dequant_groupwise(shifted, qzeros.cuda(), scales.cuda(), 8, 32, 64, torch.float16,
                            fast=True)
    assert torch.equal(got.cpu(), ref_dequant(qweight, qzeros, scales, 8, 32, 64, torch.float16))


@needs_gpu
def test_fast_kernel_runs_prefill_with_the_general_kernels_bits(monkeypatch):
    _require_extension()
    import vlmkern
    from vlmkern import ops
    from vlmkern.ext import dequant_groupwise
    from vlmkern.ops import reference

    torch.manual_seed(0)
    qw = vlmkern.quantize_weight(torch.randn(256, 512) * 0.02,
                                 vlmkern.QuantConfig(4, 128)).to("cuda")
    x = torch.randn(80, 512, dtype=torch.float16, device="cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) == "cuda.dequant_cublas"
    assert "dequant" not in ops.which_kernel(x[:16], qw)   # M <= 64 keeps its own kernels
    general = dequant_groupwise(qw.qweight, qw.qzeros, qw.scales, 4, 128, 512, torch.float16)
    assert torch.equal(ops.linear(x, qw), reference.stored_order_linear(x, general, qw.perm, None))
