"""Tensor-core weight-only kernel (csrc/weight_only_kernel.cu, cuda.weight_only_mma).

On any machine: the load-time layout decoded exactly as the kernel decodes it
(vlmkern.ops.cuda_weight_only.emulate_dequantize) reproduces the format's
dequantized weight bit for bit, the post-scale decode's operands
(post_scale_operands) are q - z exactly, and the stream-K work split covers
every unit once. On a GPU with the extension built: both decodes against the
dense fp64 product at real and awkward sizes, batch invariance, determinism
and errors.
"""
import dataclasses
import os

import pytest
import torch
from tiny_models import kernel_op_reason

import vlmkern
from vlmkern import QuantConfig
from vlmkern.formats import QuantizedWeight
from vlmkern.formats.groupwise import num_groups
from vlmkern.ops import cuda_weight_only as cw

_SKIP = kernel_op_reason("weight_only_mma", "weight_only_kernel.cu")


def gpu(fn):
    """GPU test: marked `gpu`, skipped (with the reason) without a GPU or extension."""
    return pytest.mark.gpu(pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))(fn))


# -- weights and inputs -------------------------------------------------------
def make_weight(n, k, bits, group, sym, scale_dtype=torch.float16, perm=False, seed=0,
                device="cpu"):
    g = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.002).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (n, groups), generator=g)
    p = torch.randperm(k, generator=g) if perm else None
    return QuantizedWeight.from_codes(codes, scales, zeros, bits, group, p).to(device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# -- layout: decoded as the kernel decodes it ----------------------------------------
# (N, K, group, sym): rows and columns off the 128 tiles, ragged last groups,
# every slot width (16..128 columns), groups wider than a chunk, one group per row.
LAYOUT_CASES = [(33, 200, 16, False), (33, 200, 32, True), (200, 72, 64, False),
                (200, 72, None, True), (130, 520, 128, False), (130, 520, 256, True),
                (1, 16, None, False), (129, 136, 64, True)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layout_decodes_to_dequantized_weight(bits, dtype):
    for n, k, group, sym in LAYOUT_CASES:
        qw = make_weight(n, k, bits, group, sym, scale_dtype=dtype, seed=n + k)
        got = cw.emulate_dequantize(cw.to_mma_layout(qw, dtype))
        want = qw.dequantize(torch.float32).to(dtype)
        assert same_bits(got, want), (n, k, group, sym)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_post_scale_operands_are_exactly_q_minus_z(bits, dtype):
    for n, k, group, sym in LAYOUT_CASES:
        qw = make_weight(n, k, bits, group, sym, scale_dtype=dtype, seed=n + k)
        got = cw.post_scale_operands(cw.to_mma_layout(qw, dtype)).double()
        want = qw.dequantize(torch.float64) / qw.scales.double().repeat_interleave(
            qw.group_size or k, dim=1)[:, :k]
        assert torch.equal(got, want.round()), (n, k, group, sym)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_post_scale_fields_fit_the_magic_mantissa(bits, dtype):
    # Shifts the kernel's post-scale decode uses: every field lands within the
    # mantissa, at an even position the slot constants cover (2^0 .. 2^8).
    # Distinct shifts per word: never more than the exact decode's (3 for a
    # 4-bit word, 7 for a 2-bit word), and fewer in fp16.
    mantissa = cw._MANTISSA[dtype]
    shifts = set()
    for kt in range(8):
        for r in range(4):
            shift = cw.post_scale_shift(bits, mantissa, kt, r)
            e = cw._low_pos(bits, kt, r) - shift
            assert e >= 0 and e % 2 == 0 and e <= 8 and e + bits <= mantissa, (kt, r, e)
            if shift:
                shifts.add((kt if bits == 4 else kt // 2, shift))
    exact = 3 * 8 if bits == 4 else 7 * 4
    assert len(shifts) <= exact
    if dtype == torch.float16:
        assert len(shifts) < exact


def test_layout_with_fp32_scales_rounds_the_scale_once_more():
    qw = make_weight(40, 136, 4, 32, False, scale_dtype=torch.float32)
    got = cw.emulate_dequantize(cw.to_mma_layout(qw, torch.float16)).float()
    want = qw.dequantize(torch.float32)
    # s is rounded to fp16 first: one extra rounding, at most ~1 ulp of fp16 apart
    assert torch.allclose(got, want, rtol=2 ** -9, atol=0)
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layout_sizes_are_bits_per_weight(bits):
    qw = make_weight(300, 400, bits, 64, False)
    mw = cw.to_mma_layout(qw, torch.float16)
    nb, c = 3, 4   # 300 rows -> 3 blocks of 128, 400 columns -> 4 chunks of 128
    assert mw.wq.shape == (nb, c, 8, 64 * bits) and mw.wq.dtype == torch.int32
    assert mw.wq.numel() * 32 == nb * 128 * c * 128 * bits          # exactly `bits` per weight
    assert mw.sz.shape == (nb, c, 8, 2, 8, 2)                          # g64: 2 slots per chunk
    assert mw.resident_bytes == mw.wq.numel() * 4 + mw.sz.numel() * 4


def test_relayout_in_slices_matches_one_piece(monkeypatch):
    qw = make_weight(300, 260, 3, 32, False)
    whole = cw.to_mma_layout(qw, torch.bfloat16)
    monkeypatch.setattr(cw, "_RELAYOUT_WEIGHTS", 1)   # one row block per step
    sliced = cw.to_mma_layout(qw, torch.bfloat16)
    assert torch.equal(whole.wq, sliced.wq) and torch.equal(whole.sz, sliced.sz)


def test_act_order_is_a_gather_of_x():
    qw = make_weight(33, 200, 4, 64, False, perm=True)
    x = torch.randn(5, 200, dtype=torch.float64)
    stored = cw.emulate_dequantize(cw.to_mma_layout(qw, torch.float16)).double()
    y = x.index_select(1, qw.perm.long()) @ stored.T          # what the wrapper does
    assert torch.allclose(y, x @ qw.dequantize(torch.float64).T, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("group", [48, 40, 100, 192])
def test_unsupported_groups_are_declined_with_a_reason(group):
    qw = make_weight(16, 400, 4, group, True)
    why = cw.unsupported_reason(qw)
    assert why is not None and str(group) in why
    with pytest.raises(ValueError, match="group size"):
        cw.to_mma_layout(qw, torch.float16)
    assert "group size" in cw._check(torch.empty(1, 400), qw)


def test_unsupported_bits_and_dtypes():
    qw8 = make_weight(16, 64, 8, 32, True)
    assert "8-bit" in cw.unsupported_reason(qw8)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        cw.to_mma_layout(make_weight(16, 64, 4, 32, True), torch.float32)


def test_layout_cache_is_reused_and_invalidated():
    qw = make_weight(40, 136, 4, 32, False)
    a = cw.kernel_weight(qw, torch.float16)
    assert cw.kernel_weight(qw, torch.float16) is a
    assert cw.kernel_weight(qw, torch.bfloat16) is not a
    qw.scales.mul_(2)                       # an in-place update (e.g. load_state_dict)
    b = cw.kernel_weight(qw, torch.float16)
    assert b is not a
    assert same_bits(cw.emulate_dequantize(b), qw.dequantize(torch.float32).half())
    assert "wq" not in qw.tensors() and not hasattr(qw, "_mma")   # never in the weight's state


@pytest.mark.parametrize("units, ctas, chunks", [
    (1, 1, 1), (12, 5, 4), (1024, 264, 32), (296 * 28, 264, 28), (28 * 148, 264, 148),
    (7, 7, 7), (9, 4, 1), (40, 39, 2), (36 * 28, 264, 28), (5 * 3, 14, 3), (64 * 7, 100, 7),
])
def test_stream_k_parts_cover_every_unit_once(units, ctas, chunks):
    parts = cw.stream_k_parts(units, ctas, chunks)
    assert len(parts) == units // chunks
    slots = set()
    for b, block in enumerate(parts):
        starts = [first for _, first, _ in block]
        assert starts[0] == b * chunks and starts == sorted(starts)
        ctas_of_block = [c for c, _, _ in block]
        assert ctas_of_block == list(range(ctas_of_block[0], ctas_of_block[-1] + 1))
        for cta, first, _ in block:   # each part is the owner's slice of this block
            lo, hi = cta * units // ctas, (cta + 1) * units // ctas
            assert lo <= first < hi and first == max(lo, b * chunks)
        if len(block) > 1:
            for _, _, slot in block:
                assert slot not in slots and 0 <= slot < 2 * ctas
                slots.add(slot)
            # the post-scale kernel reads every part after the first at slot 2c
            assert all(slot == 2 * cta for cta, _, slot in block[1:])
    covered = [u for b, block in enumerate(parts) for cta, first, _ in block
               for u in range(first, min((cta + 1) * units // ctas, (b + 1) * chunks))]
    assert covered == list(range(units))


def test_division_free_slots_hold_for_every_small_split():
    # exhaustive over small splits: the post-scale kernel's finish_rows
    # (FEW_DIVISIONS) takes slot 2c for every part after a row block's first,
    # which holds when each of those thread blocks starts inside the row block
    for chunks in range(1, 7):
        for blocks in range(1, 7):
            units = chunks * blocks
            for ctas in range(1, units + 1):
                for b, block in enumerate(cw.stream_k_parts(units, ctas, chunks)):
                    for cta, _, slot in block[1:]:
                        assert (cta * units // ctas) // chunks == b and slot == 2 * cta


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_padding_columns_decode_to_zero_at_any_scale(bits, sym):
    # Weights up to 62000 fit fp16, but code 0 in a padding column past K
    # decoded to -z * s: for symmetric weights -2^(b-1) * s, beyond fp16's
    # range, and its -Inf against the zero activations there is NaN.
    w = torch.rand(130, 100, generator=torch.Generator().manual_seed(bits)) * 62000
    w[:, 0] = 62000
    qw = vlmkern.quantize_rtn(w, QuantConfig(bits=bits, group_size=None, sym=sym))
    mw = cw.kernel_weight(qw, torch.float16)
    padded = dataclasses.replace(mw, out_features=mw.blocks * cw.BLOCK_ROWS,
                                 in_features=mw.chunks * cw.CHUNK)
    for decoded in (cw.emulate_dequantize(padded), cw.post_scale_operands(padded)):
        assert torch.isfinite(decoded).all()
        assert not decoded[:130, 100:].any()
    assert torch.equal(cw.emulate_dequantize(padded)[:130, :100], cw.emulate_dequantize(mw))
    # the canonical codes come back unchanged
    assert torch.equal(cw.packed_codes_from_layout(mw.wq, bits, 130, 100), qw.qweight)


def test_work_split_depends_on_shape_and_device_only():
    assert cw.num_ctas_for(1, 132) == 1
    assert cw.num_ctas_for(32 * 32, 132) == 264
    assert cw.num_ctas_for(100, 132) == 100


def test_registered_first_and_bounded_in_m(monkeypatch):
    from vlmkern.ops.builtin import CUDA
    assert CUDA.auto
    names = [k.name for k in CUDA.kernels]
    assert (names.index("cuda.weight_only_post_scale") + 1 == names.index("cuda.weight_only_mma")
            < names.index("cuda.dequant_cublas"))
    post, exact = (CUDA.kernels[names.index(n)]
                   for n in ("cuda.weight_only_post_scale", "cuda.weight_only_mma"))
    assert exact.max_m == 64 and exact.min_m == 1 and not exact.opt_in
    assert post.max_m == cw.POST_SCALE_WIDE_MAX_M and post.min_m == 1 and not post.opt_in
    # 32 tokens only with 128-column scale slots (group >= 128 or one per row);
    # 3-bit weights only above 8 tokens (slower than the exact decode below)
    for bits, group, m, ok in ((4, 64, 16, True), (4, 64, 17, False), (4, 128, 32, True),
                               (4, None, 32, True), (2, 64, 1, True), (3, 64, 8, False),
                               (3, 64, 9, True), (3, 128, 32, True)):
        why = post.check(torch.zeros(m, 256, dtype=torch.float16),
                         make_weight(64, 256, bits, group, False))
        assert (why is None) == ok, (bits, group, m, why)
    # 33..64 tokens: the opt-in 64-token tiles, 128-column scale slots only
    wide = CUDA.kernels[names.index("cuda.weight_only_post_scale_m64")]
    assert names.index("cuda.weight_only_post_scale_m64") + 3 == names.index("cuda.weight_only_post_scale")
    assert wide.opt_in and (wide.min_m, wide.max_m) == (33, 64) and wide.laid_out
    for bits, group, ok in ((4, 128, True), (3, None, True), (2, 256, True), (4, 64, False)):
        why = wide.check(torch.zeros(40, 256, dtype=torch.float16), make_weight(64, 256, bits, group, False))
        assert (why is None) == ok, (bits, group, why)
    cw.register(CUDA)                       # idempotent
    assert [k.name for k in CUDA.kernels] == names
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert "runs on ['cuda']" in post.rejects(torch.zeros(1, 256, dtype=torch.float16),
                                              make_weight(64, 256, 4, 64, False))


# -- GPU -------------------------------------------------------------------------------
def assert_matches_dense(y, x, w, bias):
    """Error vs the fp64 dense product <= 2x the error of torch run in x's
    precision (dequantized weight cast to x's dtype), or relative mean error < 1e-3
    (the rule of tests/test_triton_kernels.py) with no output off by more than 8x."""
    truth = x.double() @ w.double().T + (0 if bias is None else bias.double())
    wl = w.to(x.dtype)
    low = (x.float() @ wl.float().T + (0 if bias is None else bias.float())).to(x.dtype)
    assert y.dtype == x.dtype and y.shape == truth.shape
    assert torch.isfinite(y).all()
    err = (y.double() - truth).abs()
    err_ref = (low.double() - truth).abs().max().item()
    rel_mean = (err.mean() / truth.abs().mean()).item()
    # the mean alone would let a few grossly wrong outputs (a lost column) through
    worst = err.max().item()
    assert worst <= 2 * err_ref + 1e-6 or (rel_mean < 1e-3 and worst <= 8 * err_ref + 1e-6), (
        f"max err {worst:.3g} vs reference {err_ref:.3g}, rel mean {rel_mean:.3g}")


def act(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)


AWKWARD = [(33, 200), (200, 72), (130, 203), (257, 520)]


# decode, the largest M it takes for a weight
DECODES = [("exact", lambda qw: cw.MAX_M), ("post_scale", cw.post_scale_max_m)]


@gpu
@pytest.mark.parametrize("decode, max_m", DECODES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_awkward_shapes(bits, dtype, decode, max_m):
    for n, k in AWKWARD:
        for group in (32, 64, 128, None):
            for sym in (True, False):
                qw = make_weight(n, k, bits, group, sym, scale_dtype=dtype, seed=n * k + bits,
                                 device="cuda")
                w = qw.dequantize(torch.float32)
                bias = torch.randn(n, device="cuda")
                for m in (m for m in (1, 3, 16, 17, 32, 64) if m <= max_m(qw)):
                    x = act(m, k, dtype, seed=m)
                    for b in (None, bias):
                        y = cw.weight_only_mma(x, qw, b, decode)
                        try:
                            assert_matches_dense(y, x, w, b)
                        except AssertionError as e:
                            raise AssertionError(f"n={n} k={k} group={group} sym={sym} m={m} "
                                                 f"bias={b is not None}: {e}") from None


@gpu
@pytest.mark.parametrize("decode, max_m", DECODES)
@pytest.mark.parametrize("k, n", [(4096, 4096), (3584, 4608)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_real_sizes(k, n, bits, decode, max_m):
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, bits, 128, False, scale_dtype=dtype, seed=bits, device="cuda")
        w = qw.dequantize(torch.float32)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        for m in (m for m in (1, 16, 32, 64) if m <= max_m(qw)):
            x = act(m, k, dtype, seed=m)
            assert_matches_dense(cw.weight_only_mma(x, qw, bias, decode), x, w, bias)


@gpu
def test_kernel_group16_group256_fp32_scales_and_act_order():
    for group, perm, sd in ((16, False, torch.float16), (256, True, torch.float32),
                            (64, True, torch.bfloat16)):
        qw = make_weight(200, 1000, 4, group, False, scale_dtype=sd, perm=perm, device="cuda")
        w = qw.dequantize(torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            x = act(5, 1000, dtype)
            for decode, _ in DECODES:
                assert_matches_dense(cw.weight_only_mma(x, qw, None, decode), x, w, None)


@gpu
@pytest.mark.parametrize("decode, max_m", DECODES)
@pytest.mark.parametrize("k, n", [(3584, 4608), (18944, 256), (200, 33)])
def test_batch_invariance_and_determinism(k, n, decode, max_m):
    # (18944, 256): two row blocks over 148 chunks each, so every block is
    # summed from many parts by the fixed-order reduction.
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, 4, 128, False, scale_dtype=dtype, device="cuda")
        x = act(max_m(qw), k, dtype)
        full = cw.weight_only_mma(x, qw, None, decode)
        assert torch.equal(full, cw.weight_only_mma(x, qw, None, decode))  # run to run
        for m in (m for m in (1, 3, 9, 16, 17, 33) if m < max_m(qw)):
            part = cw.weight_only_mma(x[:m].clone(), qw, None, decode)
            assert torch.equal(part, full[:m]), f"rows of M={m} differ from the M={max_m(qw)} batch"


@gpu
def test_counters_are_left_zero():
    qw = make_weight(256, 18944, 4, 128, False, device="cuda")
    x = act(2, 18944, torch.float16)
    cw.weight_only_mma(x, qw, None)
    torch.cuda.synchronize()
    assert int(cw._counters(x.device, 2).abs().sum()) == 0


@gpu
def test_selected_by_linear_when_forced(monkeypatch):
    import vlmkern.ops as ops
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    qw = make_weight(64, 256, 4, 64, False, device="cuda")
    assert ops.which_kernel(act(1, 256, torch.float16), qw) == "cuda.weight_only_post_scale"
    assert ops.which_kernel(act(16, 256, torch.float16), qw) == "cuda.weight_only_post_scale"
    assert ops.which_kernel(act(17, 256, torch.float16), qw) == "cuda.weight_only_mma"
    w3 = make_weight(64, 256, 3, 64, False, device="cuda")
    assert ops.which_kernel(act(8, 256, torch.float16), w3) == "cuda.weight_only_mma"
    assert ops.which_kernel(act(9, 256, torch.float16), w3) == "cuda.weight_only_post_scale"
    assert ops.which_kernel(act(64, 256, torch.float16), qw) == "cuda.weight_only_mma"
    assert ops.which_kernel(act(65, 256, torch.float16), qw) == "cuda.dequant_cublas"
    x = act(7, 256, torch.bfloat16).reshape(7, 1, 256)
    assert_matches_dense(ops.linear(x, qw).reshape(7, 64), x.reshape(7, 256),
                         qw.dequantize(torch.float32), None)


@gpu
def test_traceable_by_torch_compile():
    qw = make_weight(96, 384, 3, 64, False, device="cuda")
    mw = cw.kernel_weight(qw, torch.bfloat16)
    counters = cw._counters(torch.device("cuda"), mw.blocks)

    def f(x):
        return torch.ops.vlmkern.weight_only_mma(x, mw.wq, mw.sz, None, counters, 3, 96,
                                                 mw.slot_log2, 3) * 2

    x = act(9, 384, torch.bfloat16)
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    assert torch.equal(compiled, eager)

    def g(x):
        return torch.ops.vlmkern.weight_only_mma(x, mw.wq, mw.sz, None, counters, 3, 96,
                                                 mw.slot_log2, 3, 1) * 2

    assert torch.equal(torch.compile(g, fullgraph=True)(x), g(x))
    meta = torch.ops.vlmkern.weight_only_mma(x.to("meta"), mw.wq.to("meta"), mw.sz.to("meta"),
                                             None, counters.to("meta"), 3, 96, mw.slot_log2, 3)
    assert meta.shape == (9, 96) and meta.dtype == torch.bfloat16


def check_layout_errors(call, m):
    """The argument checks both weight-only GEMM ops share (check_layout in the
    binding). ``call(**overrides)`` runs the op on a valid 64 x 256 W4 g64 case
    with m tokens, with some arguments replaced."""
    cases = [(dict(x=act(m, 256, torch.float32)), "float16 or bfloat16"),
             (dict(bits=5), "bits must be"), (dict(bits=3), "wq must have shape"),
             (dict(out_features=200), "out_features"), (dict(x=act(m, 512, torch.float16)), "chunks"),
             (dict(x=act(m, 250, torch.float16)), "multiple of 8"),
             (dict(x=act(m, 512, torch.float16)[:, ::2]), "contiguous"),
             (dict(bias=torch.zeros(63, device="cuda")), "bias must have shape")]
    for overrides, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**overrides)


@gpu
@pytest.mark.cpp_checks
def test_bad_inputs_give_clear_errors():
    qw = make_weight(64, 256, 4, 64, False, device="cuda")
    mw = cw.kernel_weight(qw, torch.float16)
    x = act(4, 256, torch.float16)
    counters = cw._counters(x.device, mw.blocks)
    op = torch.ops.vlmkern.weight_only_mma

    def call(**kw):
        a = dict(x=x, wq=mw.wq, sz=mw.sz, bias=None, counters=counters, bits=4,
                 out_features=64, slot_log2=mw.slot_log2, num_ctas=1, decode=0)
        a.update(kw)
        return op(a["x"], a["wq"], a["sz"], a["bias"], a["counters"], a["bits"],
                  a["out_features"], a["slot_log2"], a["num_ctas"], a["decode"])

    with pytest.raises(RuntimeError, match="at most 64"):
        call(x=act(65, 256, torch.float16))
    check_layout_errors(call, 4)
    with pytest.raises(RuntimeError, match="num_ctas"):
        call(num_ctas=mw.blocks * mw.chunks + 1)
    with pytest.raises(RuntimeError, match="decode must be"):
        call(decode=4)
    with pytest.raises(RuntimeError, match="decode 2 takes M <= 16 and slot_log2 = 3"):
        call(decode=2)     # groups of 64: two scale slots a chunk
    with pytest.raises(RuntimeError, match="decode 3 takes M <= 16 with slot_log2 = 3 .* and "
                                           "M <= 8 with slot_log2 = 2, got M = 9"):
        call(x=act(9, 256, torch.float16), decode=3)     # groups of 64
    with pytest.raises(RuntimeError, match="post-scale decode takes M <= 16"):
        call(x=act(17, 256, torch.float16), decode=1)
    with pytest.raises((RuntimeError, NotImplementedError), match="CPU|CUDA tensor"):
        call(x=x.cpu(), wq=mw.wq.cpu(), sz=mw.sz.cpu(), counters=counters.cpu())
    with pytest.raises(ValueError, match=r"x must be \[M, 256\]"):
        cw.weight_only_mma(act(4, 255, torch.float16), qw)
    with pytest.raises(ValueError, match="M <= 64"):
        cw.weight_only_mma(act(65, 256, torch.float16), qw)
    with pytest.raises(ValueError, match="M <= 16"):
        cw.weight_only_mma(act(17, 256, torch.float16), qw, decode="post_scale")
    wide = make_weight(64, 256, 4, 128, False, device="cuda")
    assert cw.weight_only_mma(act(32, 256, torch.float16), wide, decode="post_scale").shape == (32, 64)
    with pytest.raises(ValueError, match="M <= 32"):
        cw.weight_only_mma(act(33, 256, torch.float16), wide, decode="post_scale")
    with pytest.raises(ValueError, match="decode must be one of"):
        cw.weight_only_mma(x, qw, decode="fast")
    assert cw.weight_only_mma(act(0, 256, torch.float16), qw).shape == (0, 64)


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @gpu
    def test_sanitizer_smoke():
        for bits in (2, 3, 4):
            qw = make_weight(130, 203, bits, 64, False, device="cuda")
            for m in (1, 17, 64):
                cw.weight_only_mma(act(m, 203, torch.float16), qw, torch.randn(130, device="cuda"))
            for m in (1, 16):
                cw.weight_only_mma(act(m, 203, torch.bfloat16), qw, None, "post_scale")
            wide = make_weight(130, 203, bits, 128, False, device="cuda")
            cw.weight_only_mma(act(29, 203, torch.float16), wide, None, "post_scale")
        torch.cuda.synchronize()
