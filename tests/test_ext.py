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

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


@needs_gpu
def test_dequant_rejects_bad_shapes_and_supports_meta():
    _require_extension()
    from vlmkern.ext import dequant_groupwise

    _, _, qweight, qzeros, scales = make_case(5, 200, 3, 64, False, torch.float16)
    qweight, qzeros, scales = qweight.cuda(), qzeros.cuda(), scales.cuda()
    with pytest.raises(RuntimeError, match=r"qweight must have shape .* = \[5, 19\], got \[5, 18\]"):
        dequant_groupwise(qweight[:, :18].contiguous(), qzeros, scales, 3, 64, 200, torch.float16)
    with pytest.raises(RuntimeError, match="scales must have shape"):
        dequant_groupwise(qweight, qzeros, scales[:, :3].contiguous(), 3, 64, 200, torch.float16)
    with pytest.raises(RuntimeError, match="qzeros must have shape"):
        dequant_groupwise(qweight, qzeros[:, :0].contiguous(), scales, 3, 64, 200, torch.float16)
    with pytest.raises(RuntimeError, match="out_dtype"):
        dequant_groupwise(qweight, qzeros, scales, 3, 64, 200, torch.float32)
    with pytest.raises(RuntimeError, match="bits"):
        dequant_groupwise(qweight, qzeros, scales, 9, 64, 200, torch.float16)

    meta = dequant_groupwise(qweight.to("meta"), qzeros.to("meta"), scales.to("meta"), 3, 64, 200,
                             torch.bfloat16)
    assert meta.device.type == "meta" and meta.shape == (5, 200) and meta.dtype == torch.bfloat16
