"""Hopper weight-only kernel (csrc/weight_only_sm90_kernel.cu, cuda.weight_only_wgmma).

On any machine: its registration (opt-in, M >= 17, sm_90), the split-K
rule, and the token tile's shared-memory placement read back through the
wgmma descriptor's K-major 128-byte-swizzle layout. On an sm_90 GPU
with a build holding 9.0a code: against the dense fp64 product at awkward and
real sizes, tile-aligned batch invariance, determinism, selection,
torch.compile and errors.
"""
import os

import pytest
import torch
from test_cuda_weight_only import _SKIP, act, assert_matches_dense, check_layout_errors, make_weight

from vlmkern.ops import cuda_weight_only_sm90 as wg


def _sm90_reason() -> str | None:
    if _SKIP is not None:
        return _SKIP
    if not hasattr(torch.ops.vlmkern, "weight_only_wgmma"):
        return "vlmkern._C was built without csrc/weight_only_sm90_kernel.cu"
    if not wg.sm90_available(torch.device("cuda")):
        return "needs an sm_90 GPU and a build with 9.0a code"
    return None


_SKIP90 = _sm90_reason()


def sm90(fn):
    """GPU test on sm_90a: marked `gpu`, skipped (with the reason) elsewhere."""
    return pytest.mark.gpu(pytest.mark.skipif(_SKIP90 is not None, reason=str(_SKIP90))(fn))


def test_registered_opt_in_for_large_m(monkeypatch):
    from vlmkern.ops.builtin import CUDA
    name = "cuda.weight_only_wgmma"
    spec = next(k for k in CUDA.kernels if k.name == name)
    assert spec.opt_in and spec.min_m == wg.MIN_M == 17 and spec.max_m is None
    assert spec.min_sm == (9, 0) and spec.bits == frozenset({2, 3, 4})
    names = [k.name for k in CUDA.kernels]
    wg.register(CUDA)                                   # idempotent
    assert [k.name for k in CUDA.kernels] == names
    assert names.index("cuda.weight_only_wgmma") < names.index("cuda.dequant_cublas")
    x = torch.zeros(17, 256, dtype=torch.float16)
    qw = make_weight(64, 256, 4, 64, False)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert "opt-in only" in spec.rejects(x, qw)
    monkeypatch.setenv("VLMKERN_ENABLE", name)
    assert "runs on ['cuda']" in spec.rejects(x, qw)


def test_split_k_fills_the_sms_with_slices_of_at_least_512_columns():
    assert wg.splits_for(64, 37888, 28, 132) == 1        # 296 blocks of 128 rows
    assert wg.splits_for(17, 16896, 28, 132) == 1        # 132 blocks: exactly full
    assert wg.splits_for(64, 4608, 28, 132) == 4         # qkv: 36 blocks -> 144
    assert wg.splits_for(384, 4608, 28, 132) == 2        # 3 tiles of 128 tokens: 108 -> 216
    assert wg.splits_for(385, 4608, 28, 132) == 1        # 4 tiles: 144
    assert wg.splits_for(256, 3584, 148, 132) == 3       # down: 56 blocks -> 168
    assert wg.splits_for(64, 4608, 12, 132) == 3         # capped: 4 chunks a slice
    assert wg.splits_for(64, 96, 2, 132) == 1            # too short to split


# -- the token tile's shared-memory layout, as the kernel's copies place it and
# -- as the wgmma descriptors read it (no GPU) ----------------------------------------
HALF_BYTES = 128 * 128   # one 64-column half of the 128-token tile


def place_token_tile(x: torch.Tensor, m0: int, c: int) -> torch.Tensor:
    """The stage bytes ChunkStream::load writes for chunk c of tokens m0.. (its
    index math, thread by thread), as int16 halves."""
    m, ldx = x.shape
    stage = torch.full((2 * HALF_BYTES // 2,), -1, dtype=torch.int16)
    xi = x.view(torch.int16)
    for tid in range(256):
        row0, piece = tid >> 4, tid & 15
        x_dst = (piece >> 3) * HALF_BYTES + row0 * 128 + (((piece & 7) ^ (row0 & 7)) << 4)
        col = c * 128 + piece * 8
        for r in range(8):
            row = row0 + 16 * r
            ok = col < ldx and m0 + row < m
            dst = (x_dst + r * 16 * 128) // 2
            stage[dst:dst + 8] = xi[m0 + row, col:col + 8] if ok else 0
    return stage


def descriptor_read(stage: torch.Tensor, kt: int, tokens: int = 128) -> torch.Tensor:
    """B (`tokens` tokens x 16 columns) of k16 step kt as wgmma reads it through
    the kernel's descriptor: start (kt // 4) * (half tile) + 32 * (kt % 4), rows
    of 128 bytes, groups of 8 rows 1024 bytes apart, 128-byte swizzle (address
    bits 4-6 XOR bits 7-9)."""
    start = (kt // 4) * tokens * 128 + 32 * (kt % 4)
    n = torch.arange(tokens).unsqueeze(1)
    k = torch.arange(16).unsqueeze(0)
    addr = start + (n // 8) * 1024 + (n % 8) * 128 + 2 * k
    addr = addr ^ (((addr >> 7) & 7) << 4)
    return stage[addr // 2]


def token_step(x: torch.Tensor, m0: int, c: int, kt: int, tokens: int = 128) -> torch.Tensor:
    """Tokens m0..m0+tokens-1 x columns of k16 step kt of chunk c, as int16
    halves, zeros past M and K: what the descriptors of that step must read."""
    m, k = x.shape
    want = torch.zeros(tokens, 16, dtype=torch.int16)
    cols = torch.arange(c * 128 + 16 * kt, c * 128 + 16 * kt + 16)
    rows = torch.arange(m0, min(m0 + tokens, m))
    keep = cols < k
    want[:len(rows)][:, keep] = x.view(torch.int16)[rows][:, cols[keep]]
    return want


TOKEN_TILE_CASES = [(300, 128, 520, 4), (70, 0, 200, 1), (128, 0, 256, 0)]   # m, m0, k, c


@pytest.mark.parametrize("m, m0, k, c", TOKEN_TILE_CASES)
def test_token_tile_is_read_back_as_the_activations(m, m0, k, c):
    x = torch.randn(m, k).half()
    stage = place_token_tile(x, m0, c)
    for kt in range(8):
        assert torch.equal(descriptor_read(stage, kt), token_step(x, m0, c, kt)), f"k16 step {kt}"


# -- sm_90a ----------------------------------------------------------------------------
AWKWARD = [(33, 200), (200, 72), (130, 203), (257, 520)]


@sm90
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_awkward_shapes(bits, dtype):
    for n, k in AWKWARD:
        for group in (16, 32, 64, 128, None):
            for sym in (True, False):
                qw = make_weight(n, k, bits, group, sym, scale_dtype=dtype, seed=n * k + bits,
                                 device="cuda")
                w = qw.dequantize(torch.float32)
                bias = torch.randn(n, device="cuda")
                for m in (1, 17, 33, 64, 65, 127, 128, 129, 300):
                    x = act(m, k, dtype, seed=m)
                    for b in (None, bias):
                        y = wg.weight_only_wgmma(x, qw, b)
                        try:
                            assert_matches_dense(y, x, w, b)
                        except AssertionError as e:
                            raise AssertionError(f"n={n} k={k} group={group} sym={sym} m={m} "
                                                 f"bias={b is not None}: {e}") from None


@sm90
@pytest.mark.parametrize("k, n", [(4096, 4096), (3584, 4608)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_real_sizes(k, n, bits):
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, bits, 128, False, scale_dtype=dtype, seed=bits, device="cuda")
        w = qw.dequantize(torch.float32)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        for m in (17, 64, 65, 256, 1000):
            x = act(m, k, dtype, seed=m)
            assert_matches_dense(wg.weight_only_wgmma(x, qw, bias), x, w, bias)


@sm90
def test_fp32_scales_group256_and_act_order():
    for group, perm, sd in ((256, True, torch.float32), (64, True, torch.bfloat16)):
        qw = make_weight(200, 1000, 4, group, False, scale_dtype=sd, perm=perm, device="cuda")
        w = qw.dequantize(torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            x = act(70, 1000, dtype)
            assert_matches_dense(wg.weight_only_wgmma(x, qw, None), x, w, None)


@sm90
@pytest.mark.parametrize("k, n", [(3584, 4608), (200, 33)])
def test_tile_aligned_batch_invariance_and_determinism(k, n):
    # A token's result depends only on its place in its token tile (64 tokens
    # for M <= 64, else 128) and the K slices, so batches cut at tile
    # boundaries with the same tile width and slices give the same bits.
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, 4, 128, False, scale_dtype=dtype, device="cuda")
        x = act(300, k, dtype)
        full = wg.weight_only_wgmma(x, qw, None, 1)
        assert torch.equal(full, wg.weight_only_wgmma(x, qw, None, 1))  # run to run
        for lo, hi in ((0, 128), (128, 256), (128, 300), (0, 65)):
            part = wg.weight_only_wgmma(x[lo:hi].clone(), qw, None, 1)
            assert torch.equal(part, full[lo:hi]), f"tokens {lo}:{hi} differ from the M=300 batch"
        small = wg.weight_only_wgmma(x[:64].clone(), qw, None, 1)
        assert torch.equal(small, wg.weight_only_wgmma(x[:64].clone(), qw, None, 1))
        for m in (17, 40):
            part = wg.weight_only_wgmma(x[:m].clone(), qw, None, 1)
            assert torch.equal(part, small[:m]), f"tokens :{m} differ from the M=64 batch"


@sm90
def test_selected_by_linear_when_enabled(monkeypatch):
    from vlmkern import ops
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = 128 * sms                             # one row block per SM
    qw = make_weight(n, 256, 4, 64, False, device="cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(act(65, 256, torch.float16), qw) == "cuda.dequant_cublas"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.weight_only_wgmma")
    assert ops.which_kernel(act(16, 256, torch.float16), qw) == "cuda.weight_only_post_scale"
    assert ops.which_kernel(act(17, 256, torch.float16), qw) == "cuda.weight_only_wgmma"
    assert ops.which_kernel(act(65, 256, torch.float16), qw) == "cuda.weight_only_wgmma"
    x = act(300, 256, torch.bfloat16).reshape(3, 100, 256)
    assert_matches_dense(ops.linear(x, qw).reshape(300, n), x.reshape(300, 256),
                         qw.dequantize(torch.float32), None)


@sm90
def test_split_k_slices_sum_to_the_product():
    qw = make_weight(257, 2000, 4, 128, False, device="cuda")       # 16 chunks
    w = qw.dequantize(torch.float32)
    bias = torch.randn(257, device="cuda")
    for m in (17, 130):
        x = act(m, 2000, torch.float16, seed=m)
        one = wg.weight_only_wgmma(x, qw, bias, 1)
        for splits in (2, 3, 16):
            y = wg.weight_only_wgmma(x, qw, bias, splits)
            assert_matches_dense(y, x, w, bias)
            assert torch.equal(y, wg.weight_only_wgmma(x, qw, bias, splits))
            assert (y.float() - one.float()).abs().max() <= 1e-2 * one.float().abs().max()
    with pytest.raises(RuntimeError, match="splits must be in 1..16"):
        wg.weight_only_wgmma(act(17, 2000, torch.float16), qw, None, 17)


@sm90
def test_traceable_by_torch_compile():
    from vlmkern.ops import cuda_weight_only as cw
    qw = make_weight(96, 384, 3, 64, False, device="cuda")
    mw = cw.kernel_weight(qw, torch.bfloat16)

    def f(x):
        return torch.ops.vlmkern.weight_only_wgmma(x, mw.wq, mw.sz, None, 3, 96, mw.slot_log2) * 2

    def g(x):
        return torch.ops.vlmkern.weight_only_wgmma(x, mw.wq, mw.sz, None, 3, 96, mw.slot_log2,
                                                   2) * 2   # two K slices

    x = act(90, 384, torch.bfloat16)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
    assert torch.equal(torch.compile(g, fullgraph=True)(x), g(x))
    meta = torch.ops.vlmkern.weight_only_wgmma(x.to("meta"), mw.wq.to("meta"), mw.sz.to("meta"),
                                               None, 3, 96, mw.slot_log2)
    assert meta.shape == (90, 96) and meta.dtype == torch.bfloat16


def check_hopper_op_errors(op, wrapper):
    """Clear errors from a Hopper weight-only op (x, wq, sz, bias, bits,
    out_features, slot_log2, ...) and its Python wrapper(x, qweight)."""
    from vlmkern.ops import cuda_weight_only as cw
    qw = make_weight(64, 256, 4, 64, False, device="cuda")
    mw = cw.kernel_weight(qw, torch.float16)
    x = act(100, 256, torch.float16)

    def call(**kw):
        a = {"x": x, "wq": mw.wq, "sz": mw.sz, "bias": None, "bits": 4, "out_features": 64,
             "slot_log2": mw.slot_log2}
        a.update(kw)
        return op(a["x"], a["wq"], a["sz"], a["bias"], a["bits"], a["out_features"], a["slot_log2"])

    check_layout_errors(call, 100)
    with pytest.raises((RuntimeError, NotImplementedError), match="CPU|CUDA tensor"):
        call(x=x.cpu(), wq=mw.wq.cpu(), sz=mw.sz.cpu())
    with pytest.raises(ValueError, match=r"x must be \[M, 256\]"):
        wrapper(act(100, 255, torch.float16), qw)
    with pytest.raises(ValueError, match="8-bit weights unsupported"):
        wrapper(x, make_weight(64, 256, 8, 64, False, device="cuda"))
    assert wrapper(act(0, 256, torch.float16), qw).shape == (0, 64)
    assert call(x=act(0, 256, torch.float16)).shape == (0, 64)


@sm90
@pytest.mark.cpp_checks
def test_bad_inputs_give_clear_errors():
    check_hopper_op_errors(torch.ops.vlmkern.weight_only_wgmma, wg.weight_only_wgmma)


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @sm90
    def test_sanitizer_smoke():
        for bits in (2, 3, 4):
            qw = make_weight(130, 203, bits, 64, False, device="cuda")
            for m in (1, 40, 129):
                for dtype in (torch.float16, torch.bfloat16):
                    for splits in (1, 2):
                        wg.weight_only_wgmma(act(m, 203, dtype), qw,
                                             torch.randn(130, device="cuda"), splits)
        torch.cuda.synchronize()
