"""Triton kernels vs the torch references.

Without a GPU the kernels run in Triton's interpreter on CPU tensors.
TRITON_INTERPRET must be set before triton decorates any kernel (hence the
first lines); it is put back afterwards so other test modules see the
environment they were collected with, and set again around each test here.
Shapes are small and awkward on purpose: N odd, K not a multiple of the K
tile nor of the group, M on both sides of the path switch.

Batch invariance is checked within each path: M <= 16 runs the split-K
kernel, M > 16 the tiled GEMM, and a row may differ in its last bits between
the two paths (different reduction trees), never within one.
"""
import os

import torch

_INTERPRET = not torch.cuda.is_available()
_SAVED_ENV = os.environ.get("TRITON_INTERPRET")
if _INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

try:
    triton = pytest.importorskip("triton")
    import vlmkern.ops as ops  # noqa: E402
    from vlmkern import QuantConfig, quantize_rtn
    from vlmkern.formats import BinaryWeight, IntActWeight, QuantizedWeight  # noqa: E402
    from vlmkern.formats.groupwise import num_groups  # noqa: E402
    from vlmkern.formats.intact import qmax  # noqa: E402
    from vlmkern.ops import reference  # noqa: E402
    from vlmkern.ops.backends import BACKENDS  # noqa: E402
    from vlmkern.triton_kernels import int_act, int_act_tma
    from vlmkern.triton_kernels.binary import binary_matmul  # noqa: E402
    from vlmkern.triton_kernels.int_act import int_act_matmul, quantize_activations  # noqa: E402
    from vlmkern.triton_kernels.int_act_tma import HAS_TENSOR_DESCRIPTORS, int_act_tma_matmul  # noqa: E402
    from vlmkern.triton_kernels.weight_only import weight_only_matmul  # noqa: E402
finally:
    if _INTERPRET:
        if _SAVED_ENV is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _SAVED_ENV


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Interpreter mode for each test, and a fresh probe of the triton backend
    (another module may have probed it without the interpreter); both are
    restored afterwards."""
    if _INTERPRET:
        from vlmkern.ops import builtin  # noqa: F401  (registers the backends)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(BACKENDS["triton"], "_status", None)
    yield


DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 33, 200          # odd N; K = 3*64 + 8 = 128 + 72: ragged for every tile and group
LOW = (torch.float16, torch.bfloat16)
ALL = (torch.float16, torch.bfloat16, torch.float32)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Where a GPU is visible every test here runs the compiled kernels: a GPU test
# there (selected by -m gpu), an interpreter test elsewhere.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []


# -- weights and inputs ---------------------------------------------------------------
def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_groupwise(n, k, bits, group, sym, perm=False, scale_dtype=torch.float16, seed=0):
    g = gen(seed)
    groups = num_groups(k, group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.002).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (n, groups), generator=g)
    p = torch.randperm(k, generator=g) if perm else None
    return QuantizedWeight.from_codes(codes, scales, zeros, bits, group, p).to(DEV)


def make_intact(n, k, w_bits, a_bits, group, act_scale=None, seed=0):
    g = gen(seed)
    lim = qmax(w_bits)
    codes = torch.randint(-lim, lim + 1, (n, k), generator=g)
    scales = (torch.rand(n, num_groups(k, group), generator=g) * 0.01 + 0.001).half()
    return IntActWeight.from_codes(codes, scales, w_bits, a_bits, group, act_scale).to(DEV)


def make_binary(n, k, block, salient=0.1, seed=0):
    g = gen(seed)
    nb = -(-k // block)
    return BinaryWeight.from_planes(torch.rand(n, k, generator=g) < 0.5,
                                    torch.rand(n, k, generator=g) < 0.5,
                                    torch.rand(k, generator=g) < salient,
                                    (torch.randn(n, nb, 8, generator=g) * 0.05).half(),
                                    block).to(DEV)


def act(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=gen(seed)).to(DEV, dtype)


def bias_for(n, seed=2):
    return torch.randn(n, generator=gen(seed)).to(DEV)


# -- tolerance (DESIGN.md) --------------------------------------------------------------
def assert_matches_dense(y, x, w, bias):
    """Kernel error vs an fp64 dense product is <= 2x the error of torch run in
    x's precision (dequantized weight cast to x's dtype), or its relative mean
    error is < 1e-3 with no output off by more than 8x."""
    truth = x.double() @ w.double().T + (0 if bias is None else bias.double())
    # fp32 too: torch's own fp32 product, not the correctly rounded truth, which
    # no K-long fp32 sum reaches (an H100 kernel was 10x off it, 1e-7 relative)
    wl = w.to(x.dtype)
    low = (x.float() @ wl.float().T + (0 if bias is None else bias.float())).to(x.dtype)
    assert y.dtype == x.dtype and y.shape == truth.shape
    err = (y.double() - truth).abs()
    err_ref = (low.double() - truth).abs().max().item()
    rel_mean = (err.mean() / truth.abs().mean()).item()
    # the mean alone would let a few grossly wrong outputs (a lost column) through
    worst = err.max().item()
    assert worst <= 2 * err_ref + 1e-6 or (rel_mean < 1e-3 and worst <= 8 * err_ref + 1e-6), (
        f"max err {worst:.3g} vs reference {err_ref:.3g}, rel mean {rel_mean:.3g}")


# -- weight-only ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("sym", [True, False])
def test_weight_only_grid(bits, group, sym):
    qw = make_groupwise(N, K, bits, group, sym, seed=bits * 7 + (group or 0))
    w, b = qw.dequantize(), bias_for(N)
    for m, dtype in ((1, torch.float16), (17, torch.bfloat16), (3, torch.float32)):
        x = act(m, K, dtype)
        assert_matches_dense(weight_only_matmul(x, qw, b), x, w, b)


def check_one_token(kernel, qw, seed):
    """A one-token kernel against the dense product: every dtype, with and
    without bias, whole K and K split in 3."""
    w, b = qw.dequantize(), bias_for(N)
    for dtype in ALL:
        x = act(1, K, dtype, seed=seed)
        for split in (None, 3):
            y = kernel(x, qw, b if split else None, split_k=split)
            assert_matches_dense(y, x, w, b if split else None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128, None])
@pytest.mark.parametrize("sym", [True, False])
def test_one_token_kernel(bits, group, sym):
    # odd N, K ending inside a unit (K = 200 is 12.5 words of 2-bit codes,
    # 6.25 three-word units of 3-bit codes), split K, act order, bias, every dtype
    from vlmkern.triton_kernels.weight_only import gemv
    if group == 16 and bits in (2, 3):
        group = 32                                    # a unit holds 16 or 32 codes
    qw = make_groupwise(N, K, bits, group, sym, perm=bits == 4, seed=bits + (group or 0))
    check_one_token(gemv, qw, seed=bits)


def test_one_token_kernel_declines_what_it_cannot_run(monkeypatch):
    from vlmkern.triton_kernels.weight_only import gemv
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    x = act(1, K, torch.float16)
    for qw, why in ((make_groupwise(N, K, 3, 48, False), "32-code units"),
                    (make_groupwise(N, K, 4, 12, False), "8-code units")):
        assert ops.which_kernel(x, qw) == "triton.weight_only_splitk"
        with pytest.raises(ValueError, match=why):
            gemv(x, qw)
    with pytest.raises(ValueError, match="one token"):
        gemv(act(2, K, torch.float16), make_groupwise(N, K, 4, 32, False))


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("bits,group,sym", [(3, 32, False), (4, None, True), (2, 64, False)])
def test_weight_only_linear_every_m(monkeypatch, dtype, bits, group, sym):
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    qw = make_groupwise(N, K, bits, group, sym, seed=3)
    w, b = qw.dequantize(), bias_for(N)
    for m in (1, 2, 3, 16, 17, 64, 65):
        x = act(m, K, dtype, seed=m)
        want = ("triton.weight_only_gemv" if m == 1 else
                "triton.weight_only_splitk" if m <= 16 else "triton.weight_only_gemm" if m <= 64
                else "triton.dequant_matmul")
        assert ops.which_kernel(x, qw) == want
        y = ops.linear(x, qw, b)
        assert_matches_dense(y, x, w, b)
        ref = reference.weight_only_matmul(x, qw, b)
        assert (y.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()


@pytest.mark.parametrize("dtype", ALL)
def test_dequantize_equals_the_format_bit_for_bit(dtype):
    # every bit width, aligned, whole-tile, unaligned (48) and one-per-row
    # groups, fp16/bf16/fp32 scales, act order: the values of dequantize(),
    # in stored column order
    from vlmkern.triton_kernels.weight_only import dequant_matmul, dequantize
    for bits, group, sym, perm, sd in ((2, 32, False, False, torch.float16),
                                       (3, 64, False, True, torch.bfloat16),
                                       (4, 128, True, False, torch.float32),
                                       (8, None, False, False, torch.float16),
                                       (4, 48, False, False, torch.float16),
                                       (3, 256, False, False, torch.float16)):
        qw = make_groupwise(N, K + 64, bits, group, sym, perm=perm, scale_dtype=sd, seed=bits)
        want = qw.dequantize(dtype)
        if perm:
            want = want[:, qw.perm.long()]
        got = dequantize(qw, dtype)
        assert got.dtype == dtype and torch.equal(got, want), (bits, group, sym, perm, sd)
        x, b = act(70, K + 64, dtype), bias_for(N)
        assert_matches_dense(dequant_matmul(x, qw, b), x, qw.dequantize(), b)


def test_weight_only_leading_dims_and_no_bias(monkeypatch):
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    qw = make_groupwise(N, K, 4, 64, False, seed=4)
    x = act(6, K, torch.float16).reshape(2, 3, K)
    y = ops.linear(x, qw)
    assert y.shape == (2, 3, N)
    assert_matches_dense(y.reshape(6, N), x.reshape(6, K), qw.dequantize(), None)


@pytest.mark.parametrize("bits", [3, 4])
def test_weight_only_act_order(bits):
    qw = make_groupwise(N, K, bits, 32, False, perm=True, seed=5)
    w, b = qw.dequantize(), bias_for(N)
    for m in (2, 17):
        x = act(m, K, torch.float16)
        assert_matches_dense(weight_only_matmul(x, qw, b), x, w, b)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_weight_only_scale_dtypes_and_unaligned_group(scale_dtype):
    # group 48 is not a divisor of any K tile: the per-element scale path.
    qw = make_groupwise(N, K, 3, 48, False, scale_dtype=scale_dtype, seed=6)
    w = qw.dequantize()
    for m in (1, 17):
        x = act(m, K, torch.float16)
        assert_matches_dense(weight_only_matmul(x, qw), x, w, None)


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_only_padding_columns_near_the_fp16_limit(bits):
    # Symmetric per-row weights up to 62000 fit fp16, but the code 0 a padding
    # column past K reads as decodes to -2^(b-1) * s, beyond fp16's range: left
    # unmasked, its -Inf met the zero activations there and made NaN rows.
    w = torch.rand(4, 100, generator=torch.Generator().manual_seed(bits)) * 62000
    w[:, 0] = 62000
    qw = quantize_rtn(w.to(DEV), QuantConfig(bits=bits, group_size=None, sym=True))
    assert float(qw.dequantize().abs().max()) < 65504 < float(qw.scales.float().max()) * 2 ** (bits - 1)
    for m in (2, 17):                       # the split-K kernel and the tiled GEMM
        x = (torch.rand(m, 100, generator=torch.Generator().manual_seed(m)) * 1e-3).half().to(DEV)
        y = weight_only_matmul(x, qw)
        assert torch.isfinite(y).all()
        assert_matches_dense(y, x, qw.dequantize(), None)


@pytest.mark.parametrize("split", [1, 2, 4])
def test_weight_only_split_k_and_tiles(split):
    qw = make_groupwise(N, K, 3, 64, False, seed=7)
    w, b = qw.dequantize(), bias_for(N)
    x = act(5, K, torch.float32)
    cfg = dict(BLOCK_N=16, BLOCK_K=32)
    y = weight_only_matmul(x, qw, b, config=cfg, split_k=split)
    assert_matches_dense(y, x, w, b)
    torch.testing.assert_close(y, reference.weight_only_matmul(x, qw, b), rtol=1e-5, atol=1e-5)


def test_weight_only_batch_invariant_and_deterministic():
    qw = make_groupwise(N, K, 3, 32, False, seed=8)
    x = act(65, K, torch.float16)
    small = [weight_only_matmul(x[:m], qw) for m in (1, 3, 16)]
    assert all(torch.equal(s[0], small[0][0]) for s in small)
    assert torch.equal(small[2][:3], small[1])
    big = [weight_only_matmul(x[:m], qw) for m in (17, 65)]
    assert torch.equal(big[0][0], big[1][0]) and torch.equal(big[0], big[1][:17])
    assert torch.equal(weight_only_matmul(x[:16], qw), small[2])
    assert torch.equal(weight_only_matmul(x, qw), big[1])


def test_cpu_auto_selection_stays_on_torch(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    qw = make_groupwise(N, K, 4, 64, True).cpu()
    assert ops.which_kernel(torch.zeros(1, K), qw) == "torch.weight_only"


def test_registration_is_idempotent_and_declares_capabilities():
    from vlmkern.ops.backends import Backend
    from vlmkern.triton_kernels import register_kernels
    b = Backend("t", probe=lambda: None)
    register_kernels(b)
    register_kernels(b)
    specs = {s.name: s for s in b.kernels}
    assert len(specs) == len(b.kernels) == 9
    assert specs["triton.weight_only_gemv"].max_m == 1
    assert specs["triton.weight_only_splitk"].max_m == 16
    assert specs["triton.weight_only_gemm"].min_m == 17
    assert specs["triton.weight_only_gemm"].max_m + 1 == specs["triton.dequant_matmul"].min_m
    assert specs["triton.int_act"].bits == frozenset({4, 6, 8})
    tma = specs["triton.int_act_tma"]
    assert tma.opt_in and tma.bits == frozenset({6, 8}) and tma.min_sm == (9, 0)
    assert {s.op for s in b.kernels} == {"weight_only", "int_act", "binary"}


def test_every_kernel_takes_a_strided_bias():
    """The kernels read the bias with stride 1: a strided view (every second
    element of a longer vector) must give the contiguous copy's bits."""
    from vlmkern.triton_kernels import kernel_specs
    weights = {"weight_only": make_groupwise(N, K, 4, 64, False, seed=4),
               "int_act": make_intact(N, K_TMA, 8, 8, None, seed=4),
               "binary": make_binary(N, K, 64, seed=4)}
    strided = torch.randn(2 * N, generator=gen(5)).to(DEV, torch.float16)[::2]
    for spec in kernel_specs():
        if spec.name == "triton.int_act_tma" and not HAS_TENSOR_DESCRIPTORS:
            continue
        qw = weights[spec.op]
        x = act(spec.min_m, qw.in_features, torch.float16, seed=6)   # a size the kernel takes
        assert torch.equal(spec.fn(x, qw, strided), spec.fn(x, qw, strided.contiguous())), spec.name


_NO_GPU_AT_IMPORT = """
import torch
def touched(*a, **k):
    raise RuntimeError("touched CUDA at import")
for name in ("is_available", "device_count", "get_device_capability", "get_device_properties",
             "init", "current_device"):
    setattr(torch.cuda, name, touched)
import vlmkern.triton_kernels as tk
from vlmkern.triton_kernels import binary, int_act, int_act_tma, weight_only  # noqa: F401
assert len(tk.kernel_specs()) == 9
print("ok")
"""


def test_import_queries_no_gpu():
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _NO_GPU_AT_IMPORT], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_config_table_and_fallback():
    from vlmkern.triton_kernels import _common as cm
    keys = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}
    for fam in ("weight_only", "int_act", "int_act_grouped", "int_act_tma", "binary", "unknown"):
        for m in (1, 16, 17, 128, 129, 4096):
            cfg = cm.get_config(fam, m)
            assert keys <= set(cfg) and cfg["BLOCK_K"] % 32 == 0
            # One config per bucket: what makes rows batch-invariant within it.
            assert cfg == cm.get_config(fam, {"small": 1, "mid": 17, "large": 129}[cm.m_bucket(m)])
    assert cm.get_config("weight_only", 1, {"BLOCK_K": 32})["BLOCK_K"] == 32


# -- integer activations ----------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf/inf in the interpreter
def test_quantize_activations_bitwise():
    x = act(6, K, torch.float32) * 3
    x[1, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5, 0.0])  # ties to even
    x[2] = 0.0                                                            # scale 1
    x[3, 0] = float("nan")                                                # NaN scale
    x[4, 9] = float("-inf")                                               # Inf scale
    for bits in (4, 6, 8):
        for scale in (None, 1.0, 0.037):
            for dtype in ALL:
                xd = x.to(dtype)
                q, s = quantize_activations(xd, bits, scale)
                q0, s0 = reference.quantize_activations(xd, bits, scale)
                assert torch.equal(q, q0), (bits, scale, dtype)
                assert torch.equal(s.isnan(), s0.isnan())
                assert torch.equal(s.nan_to_num(), s0.nan_to_num())


def _int_act_check(y, x, qw, b):
    """Integer sums are exact in both; only the fp32 (kernel) vs fp64
    (reference) epilogue order differs, then one rounding to x's dtype."""
    ref = reference.int_act_matmul(x, qw, b)
    qx, sx = reference.quantize_activations(x, qw.a_bits, qw.act_scale)
    mag = (qx.abs().double() * sx.double()[:, None]) @ qw.dequantize(torch.float64).abs().T
    if b is not None:
        mag = mag + b.double().abs()
    eps = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[x.dtype]
    tol = 1e-5 * mag + eps * ref.double().abs() + 1e-30
    assert y.dtype == x.dtype
    assert bool(((y.double() - ref.double()).abs() <= tol).all())


@pytest.mark.parametrize("wa", [(8, 8), (6, 6), (4, 4)])
@pytest.mark.parametrize("group", [None, 32, 64])
def test_int_act(wa, group):
    qw = make_intact(N, K, *wa, group, seed=wa[0] + (group or 0))
    b = bias_for(N)
    for m, dtype in ((1, torch.float32), (3, torch.bfloat16), (17, torch.float16),
                     (65, torch.float32)):
        x = act(m, K, dtype, seed=m)
        _int_act_check(int_act_matmul(x, qw, b), x, qw, b)


@pytest.mark.parametrize("dtype", ALL)
def test_int_act_linear_static_scale_and_w4a8(monkeypatch, dtype):
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    for wa, group, scale in (((8, 8), None, 0.02), ((4, 8), 32, None), ((6, 6), 128, 0.05)):
        qw = make_intact(N, K, *wa, group, act_scale=scale, seed=11)
        for m in (2, 17):
            x = act(m, K, dtype, seed=m)
            assert ops.which_kernel(x, qw) == "triton.int_act"
            _int_act_check(ops.linear(x, qw), x, qw, None)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_int_act_nan_token_and_unsupported_group(monkeypatch):
    qw = make_intact(N, K, 8, 8, None, seed=12)
    x = act(3, K, torch.float32)
    x[1, 7] = float("nan")
    y = int_act_matmul(x, qw)
    assert not bool(torch.isfinite(y[1]).any()) and bool(torch.isfinite(y[[0, 2]]).all())
    ref = reference.int_act_matmul(x[[0, 2]], qw)
    torch.testing.assert_close(y[[0, 2]], ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    odd = make_intact(N, K, 8, 8, 40, seed=13)
    assert "multiple of 32" in ops.which_kernel(x[[0]], odd)


def test_int_act_declines_groups_whose_sums_could_overflow_int32(monkeypatch):
    # 127 * 127 * 133152 >= 2^31 > 127 * 127 * 133120 (both multiples of 16 and 32)
    big, fits = 133_152, 133_120
    codes = torch.full((1, big), 127, dtype=torch.int8, device=DEV)
    wide = IntActWeight.from_codes(codes, torch.ones(1, 1, device=DEV), 8, 8, None)
    assert "overflow the int32 accumulator" in int_act.unsupported_reason(wide)
    assert "overflow the int32 accumulator" in int_act_tma.tma_reason(wide)
    with pytest.raises(ValueError, match="overflow"):
        int_act_matmul(torch.ones(1, big, device=DEV), wide)
    grouped = IntActWeight.from_codes(codes, torch.ones(1, 131, device=DEV), 8, 8, 1024)
    narrow = IntActWeight.from_codes(codes[:, :fits], torch.ones(1, 1, device=DEV), 8, 8, None)
    assert int_act.unsupported_reason(grouped) is None and int_act.unsupported_reason(narrow) is None
    no_descriptors = f"Triton {triton.__version__} has no triton.tools.tensor_descriptor"
    assert int_act_tma.tma_reason(narrow) in (None, no_descriptors)
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    assert "triton.int_act: a group of 133152 columns could overflow" in \
        ops.which_kernel(torch.ones(1, big, device=DEV), wide)


def test_int_act_batch_invariant():
    qw = make_intact(N, K, 8, 8, 64, seed=14)
    x = act(65, K, torch.float16)
    assert torch.equal(int_act_matmul(x[:1], qw)[0], int_act_matmul(x[:16], qw)[0])
    assert torch.equal(int_act_matmul(x[:17], qw)[0], int_act_matmul(x, qw)[0])


# -- integer activations: the persistent TMA kernel ---------------------------------------
K_TMA = 208   # a multiple of 16 (TMA row alignment), ragged for 32- and 128-column K tiles
# small tiles: several tiles per program in the interpreter's 4-program grid
SMALL_TILES = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32)
needs_descriptors = pytest.mark.skipif(
    not HAS_TENSOR_DESCRIPTORS,
    reason="this Triton has no host-side TMA descriptors (triton.tools.tensor_descriptor)")


@pytest.mark.parametrize("wa", [(8, 8), (6, 6)])
@pytest.mark.parametrize("dtype", ALL)
@needs_descriptors
def test_int_act_tma_gives_the_pointer_kernels_bits(wa, dtype):
    """Exact integer sums and the same epilogue order: the bits of
    triton.int_act, and within its tolerance of the reference."""
    qw = make_intact(N, K_TMA, *wa, None, seed=wa[0])
    b = bias_for(N)
    for m, cfg in ((1, None), (37, SMALL_TILES), (130, None), (130, SMALL_TILES)):
        x = act(m, K_TMA, dtype, seed=m)
        for bias in (None, b):
            y = int_act_tma_matmul(x, qw, bias, config=cfg)
            assert torch.equal(y, int_act_matmul(x, qw, bias)), (m, cfg)
        _int_act_check(y, x, qw, b)


@needs_descriptors
def test_int_act_tma_takes_the_smallest_k():
    """K = 16 (one TMA row of 16 bytes): the K tile stays at 32, the GPU's
    smallest int8 dot, with the columns past K zero-filled."""
    qw = make_intact(N, 16, 8, 8, None, seed=3)
    for m in (1, 130):
        x = act(m, 16, torch.float16, seed=m)
        assert torch.equal(int_act_tma_matmul(x, qw, bias_for(N)),
                           int_act_matmul(x, qw, bias_for(N)))


@needs_descriptors
def test_int_act_tma_reads_a_weight_view_at_any_address():
    """A valid weight whose codes start one byte into a larger buffer (TMA
    needs 16-byte aligned addresses): copied, not refused or misread."""
    import dataclasses
    qw = make_intact(N, K_TMA, 8, 8, None, seed=21)
    blob = torch.zeros(qw.qweight.numel() + 1, dtype=torch.int8, device=DEV)
    codes = blob[1:].view(N, K_TMA)
    codes.copy_(qw.qweight)
    shifted = dataclasses.replace(qw, qweight=codes).validate()
    x = act(130, K_TMA, torch.float16)
    assert torch.equal(int_act_tma_matmul(x, shifted), int_act_matmul(x, qw))
    # one row of a wider buffer: its row stride (K + 8 bytes) is no multiple of 16
    wide = torch.zeros(1, K_TMA + 8, dtype=torch.int8, device=DEV)
    wide[:, :K_TMA] = qw.qweight[:1]
    row = dataclasses.replace(qw, qweight=wide[:, :K_TMA], scales=qw.scales[:1]).validate()
    assert torch.equal(int_act_tma_matmul(x, row), int_act_matmul(x, row))


@needs_descriptors
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_int_act_tma_static_scale_nan_token_and_empty():
    qw = make_intact(N, K_TMA, 8, 8, None, act_scale=0.02, seed=15)
    x = act(40, K_TMA, torch.float16)
    x[5, 3] = float("nan")
    y = int_act_tma_matmul(x, qw, config=SMALL_TILES)
    assert not bool(torch.isfinite(y[5]).any())
    keep = [i for i in range(40) if i != 5]
    assert torch.equal(y[keep], int_act_matmul(x[keep], qw))
    assert int_act_tma_matmul(x[:0], qw).shape == (0, N)


def test_int_act_tma_declines_what_it_cannot_read(monkeypatch):
    x = act(130, K_TMA, torch.float16)
    cases = ((make_intact(N, K_TMA, 4, 4, None), "two per byte"),
             (make_intact(N, K_TMA, 8, 8, 64), "one scale per weight row"),
             (make_intact(N, K, 8, 8, None), "multiple of 16"))
    for qw, why in cases:
        with pytest.raises(ValueError, match=why):
            int_act_tma_matmul(act(130, qw.in_features, torch.float16), qw)
    # a Triton without host-side TMA descriptors: refused with the reason, not a compile error
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    monkeypatch.setenv("VLMKERN_ENABLE", "triton.int_act_tma")
    monkeypatch.setattr("vlmkern.triton_kernels.int_act_tma.HAS_TENSOR_DESCRIPTORS", False)
    qw = make_intact(N, K_TMA, 8, 8, None)
    assert ops.which_kernel(x, qw) == "triton.int_act"
    with pytest.raises(ValueError, match="no triton.tools.tensor_descriptor"):
        int_act_tma_matmul(x, qw)


@needs_descriptors
def test_int_act_tma_is_opt_in_and_for_prefill_only(monkeypatch):
    x = act(130, K_TMA, torch.float16)
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    qw = make_intact(N, K_TMA, 8, 8, None)
    assert ops.which_kernel(x, qw) == "triton.int_act"
    monkeypatch.setenv("VLMKERN_ENABLE", "triton.int_act_tma")
    assert ops.which_kernel(x, qw) == "triton.int_act_tma"
    assert ops.which_kernel(x[:128], qw) == "triton.int_act"
    assert ops.which_kernel(x, make_intact(N, K_TMA, 8, 8, 64)) == "triton.int_act"


# -- binary ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [128, 64, 48])
@pytest.mark.parametrize("dtype", ALL)
def test_binary(monkeypatch, block, dtype):
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    qw = make_binary(N, K, block, seed=block)
    w, b = qw.dequantize(), bias_for(N)
    for m in (1, 17):
        x = act(m, K, dtype, seed=m)
        gemv = m == 1 and block % 32 == 0
        assert ops.which_kernel(x, qw) == ("triton.binary_gemv" if gemv else "triton.binary")
        assert_matches_dense(ops.linear(x, qw, b), x, w, b)


@pytest.mark.parametrize("block", [128, 64, 32])
def test_binary_one_token_kernel(block):
    # salient-heavy and salient-free weights, K ending inside a word, split K,
    # bias, every dtype, fp32 statistics
    from vlmkern.triton_kernels.binary import gemv
    for salient, stats in ((0.3, torch.float16), (0.0, torch.float32)):
        qw = make_binary(N, K, block, salient=salient, seed=block)
        if stats != torch.float16:
            qw = BinaryWeight(qw.sign, qw.aux, qw.salient, qw.stats.to(stats), qw.block_size,
                              qw.in_features)
        check_one_token(gemv, qw, seed=block)
    with pytest.raises(ValueError, match="whole number of 32-bit words"):
        gemv(act(1, K, torch.float16), make_binary(N, K, 48))


@pytest.mark.parametrize("dtype", ALL)
def test_binary_dequantize_equals_the_format_bit_for_bit(monkeypatch, dtype):
    # blocks inside a K tile, whole blocks per tile and unaligned blocks
    from vlmkern.triton_kernels.binary import dequantize
    for block in (128, 64, 48):
        qw = make_binary(N, K + 64, block, salient=0.3, seed=block + 1)
        got = dequantize(qw, dtype)
        assert got.dtype == dtype and torch.equal(got, qw.dequantize(dtype)), block
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    x, b = act(65, K + 64, dtype), bias_for(N)
    assert ops.which_kernel(x, qw) == "triton.binary_dequant_matmul"
    assert ops.which_kernel(x[:64], qw) == "triton.binary"
    assert_matches_dense(ops.linear(x, qw, b), x, qw.dequantize(), b)


def test_binary_batch_invariant():
    qw = make_binary(N, K, 128, salient=0.3, seed=15)
    x = act(65, K, torch.bfloat16)
    assert torch.equal(binary_matmul(x[:1], qw)[0], binary_matmul(x[:16], qw)[0])
    assert torch.equal(binary_matmul(x[:17], qw)[0], binary_matmul(x, qw)[0])


# -- every public op -------------------------------------------------------------------------
def public_ops():
    """(name, op, weight) for every op a caller may run directly."""
    from vlmkern.triton_kernels import binary, weight_only

    gw, bw = make_groupwise(N, K, 4, 64, False), make_binary(N, K, 128)
    return [("weight_only_matmul", weight_only_matmul, gw),
            ("weight_only.gemv", weight_only.gemv, gw),
            ("int_act_matmul", int_act_matmul, make_intact(N, K, 8, 8, None)),
            ("int_act_tma_matmul", int_act_tma_matmul, make_intact(N, K_TMA, 8, 8, None)),
            ("binary_matmul", binary_matmul, bw),
            ("binary.gemv", binary.gemv, bw),
            ("weight_only.dequant_matmul", weight_only.dequant_matmul, gw),
            ("binary.dequant_matmul", binary.dequant_matmul, bw)]


@pytest.mark.parametrize("case", range(8))
def test_public_ops_refuse_an_x_or_bias_of_another_width(case):
    """A wider x would read scales and statistics past the weight's groups."""
    _, op, qw = public_ops()[case]
    k, n = qw.in_features, qw.out_features
    for x in (act(1, k + 8, torch.float16), act(1, k - 8, torch.float16),
              act(1, k, torch.float16).unsqueeze(0)):
        with pytest.raises(ValueError, match=rf"x must be \[M, {k}\]"):
            op(x, qw)
    with pytest.raises(ValueError, match=rf"bias must be \[{n}\]"):
        op(act(1, k, torch.float16), qw, bias_for(n + 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without a GPU")
def test_kernels_imported_before_the_interpreter_was_asked_for_are_refused():
    """Triton fixes interpreter or compiler when it decorates a kernel: the
    backend reports kernels decorated without TRITON_INTERPRET instead of
    selecting them and failing at launch."""
    import subprocess
    import sys

    script = """
import os, torch
os.environ.pop("TRITON_INTERPRET", None)
import vlmkern.triton_kernels.int_act   # the backend imports the other kernels itself
os.environ["TRITON_INTERPRET"] = "1"
os.environ["VLMKERN_BACKEND"] = "triton"
import vlmkern.ops as ops
from vlmkern.formats import IntActWeight
qw = IntActWeight.from_codes(torch.randint(-127, 128, (8, 64)), torch.rand(8, 1).half(), 8, 8, None)
try:
    ops.linear(torch.randn(2, 64, dtype=torch.float16), qw)
except RuntimeError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "imported before TRITON_INTERPRET=1 was set" in proc.stdout, proc.stdout


def test_public_ops_launch_on_the_device_of_x(monkeypatch):
    """Triton launches on the current device, not the tensors': every public
    op (each refuses a bad x above, so each goes through kernel_entry) runs
    with x's GPU made current, and a CPU tensor changes nothing."""
    from vlmkern.triton_kernels._common import kernel_entry

    entered = []

    class Guard:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class OnSecondGPU(torch.Tensor):
        is_cuda = property(lambda self: True)
        device = property(lambda self: torch.device("cuda", 1))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    op = kernel_entry(lambda x, qw, bias=None: (x.shape, list(entered)))
    qw = make_groupwise(N, K, 4, 64, False)
    assert op(torch.zeros(2, K).as_subclass(OnSecondGPU), qw)[1] == [torch.device("cuda", 1)]
    entered.clear()
    assert op(torch.zeros(2, K), qw) == ((2, K), [])


# -- real sizes on a GPU ------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_weight_only_4096(monkeypatch, bits, m):
    from vlmkern.triton_kernels.weight_only import dequant_matmul, gemv
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    qw = make_groupwise(4096, 4096, bits, 128, False, seed=bits)
    w, b = qw.dequantize(), bias_for(4096)
    direct = {"triton.weight_only_gemv": gemv, "triton.weight_only_splitk": weight_only_matmul,
              "triton.weight_only_gemm": weight_only_matmul, "triton.dequant_matmul": dequant_matmul}
    for dtype in LOW:
        x = act(m, 4096, dtype)
        y = ops.linear(x, qw, b)
        kernel = ops.which_kernel(x, qw)
        assert kernel == ("triton.weight_only_gemv" if m == 1 else
                          "triton.weight_only_splitk" if m <= 16 else "triton.dequant_matmul")
        assert_matches_dense(y, x, w, b)
        assert torch.equal(y, direct[kernel](x, qw, b))
        if m == 1:    # the MMA path stays callable for one token, and correct
            assert_matches_dense(weight_only_matmul(x, qw, b), x, w, b)
        if m >= 65:   # the fused GEMM too
            assert_matches_dense(weight_only_matmul(x, qw, b, path="gemm"), x, w, b)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa,group", [((8, 8), None), ((6, 6), 128), ((4, 4), 128)])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_int_act_4096(wa, group, m):
    qw = make_intact(4096, 4096, *wa, group, seed=wa[0])
    x = act(m, 4096, torch.float16)
    _int_act_check(int_act_matmul(x, qw), x, qw, None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa", [(8, 8), (6, 6)])
@pytest.mark.parametrize("m", [129, 1000, 4096])
def test_gpu_int_act_tma_4096(wa, m):
    qw = make_intact(4608, 3584, *wa, None, seed=wa[0])
    x = act(m, 3584, torch.bfloat16)
    b = bias_for(4608)
    assert torch.equal(int_act_tma_matmul(x, qw, b), int_act_matmul(x, qw, b))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_binary_4096(m):
    from vlmkern.triton_kernels.binary import dequant_matmul, gemv
    qw = make_binary(4096, 4096, 128)
    x = act(m, 4096, torch.float16)
    assert_matches_dense(binary_matmul(x, qw), x, qw.dequantize(), None)
    assert_matches_dense(dequant_matmul(x, qw), x, qw.dequantize(), None)
    if m == 1:
        assert_matches_dense(gemv(x, qw), x, qw.dequantize(), None)
