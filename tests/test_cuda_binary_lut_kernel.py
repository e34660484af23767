"""The lookup-table binary GEMM (csrc/binary_lut_kernel.cu, torch.ops.vlmkern.binary_lut_mma).

The layout the kernel consumes is built here from scratch, straight from its
specification (csrc/binary.h), independently of the load-time code in
vlmkern.ops.cuda_binary_lut:

* ``random_weight`` draws the logical weight: a 2-bit index i = s + 2a per
  weight, 4 ordinary and 4 salient 16-bit table values per row and
  128-column block, and a salient flag per column;
* ``pack_layout`` lays it out as codes / tables / merge;
* ``lut_weight`` decodes the layout with the kernel's operations (shift, mask,
  multiply-add and PTX ``prmt`` emulated on int64), bit for bit;
* ``direct_weight`` is the definition: W[n, k] = (salient table if column k is
  salient else ordinary table)[row n, block k // 128][i].

CPU tests pin the specification (decode == definition on awkward shapes). GPU
tests run the kernel against the fp64 product of the decoded weight.
"""
import os

import pytest
import torch
from tiny_models import kernel_op_reason

BLOCK = 128
MAX_M = 64


_SKIP_GPU = kernel_op_reason("binary_lut_mma", "binary_lut_kernel.cu")
_SKIP_OP = kernel_op_reason("binary_lut_mma", "binary_lut_kernel.cu", need_gpu=False)
gpu = pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")
has_op = pytest.mark.skipif(_SKIP_OP is not None, reason=_SKIP_OP or "")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def bits16(values: torch.Tensor) -> torch.Tensor:
    """16-bit float values -> their bit patterns as int64 in 0..0xFFFF."""
    return values.view(torch.int16).to(torch.int64) & 0xFFFF


def from_bits16(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = bits & 0xFFFF
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(dtype)


# -- the logical weight and its layout ------------------------------------------------------
def random_weight(n, k, dtype, seed=0, salient=0.2, scale=None):
    """(index [n, k] in 0..3, values [n, C, 8] of dtype, salient [k] bool).

    values[..., 0:4] is the ordinary table, values[..., 4:8] the salient one.
    scale=None draws arbitrary finite bit patterns (both signs, subnormals,
    huge values: the decode only moves bytes); otherwise N(0, scale^2)."""
    g = gen(seed)
    c = cdiv(k, BLOCK)
    index = torch.randint(0, 4, (n, k), generator=g)
    if scale is None:
        values = from_bits16(torch.randint(0, 1 << 16, (n, c, 8), generator=g), dtype)
        values = torch.where(torch.isfinite(values), values, torch.zeros((), dtype=dtype))
    else:
        values = (torch.randn(n, c, 8, generator=g) * scale).to(dtype)
    sal = torch.rand(k, generator=g) < salient
    return index, values, sal


def direct_weight(index, values, sal):
    """The definition: W[n, k] = values[n, k // 128, index[n, k] + 4 * salient[k]]."""
    n, k = index.shape
    blk = torch.arange(k) // BLOCK
    entry = index + 4 * sal.to(torch.int64)
    return values[torch.arange(n).unsqueeze(1), blk, entry]


def pack_layout(index, values, sal):
    """codes int32 [NB, C, 8, 128], tables int32 [NB, C, 8, 8, 2, 4], merge int32 [C, 32, 8]."""
    n, k = index.shape
    nb, c = cdiv(n, BLOCK), cdiv(k, BLOCK)
    # Padding rows and columns get index 0 (their codes are 0).
    idx = torch.zeros(nb * BLOCK, c * BLOCK, dtype=torch.int64)
    idx[:n, :k] = index
    # row = b*128 + w*16 + rh*8 + g; column = c*128 + kt*16 + ch*8 + t*2 + h
    idx = idx.view(nb, 8, 2, 8, c, 8, 2, 4, 2)                      # b w rh g c kt ch t h
    words = torch.zeros(nb, c, 8, 32, 4, dtype=torch.int64)          # b c w lane v
    for kt in range(8):
        for r in range(4):
            rh, ch = r % 2, r // 2
            j = 4 * (kt % 2) + r
            for h in range(2):
                field = idx[:, :, rh, :, :, kt, ch, :, h]            # b w g c t
                field = field.permute(0, 3, 1, 2, 4).reshape(nb, c, 8, 32)   # lane = 4g + t
                words[..., kt // 2] |= field << (2 * (j % 4) + 16 * (j // 4) + 8 * h)
    codes = as_int32(words.reshape(nb, c, 8, 128))

    # Rows past N: zero tables.
    vb = torch.zeros(nb * BLOCK, c, 8, dtype=torch.int64)
    vb[:n] = bits16(values)
    vb = vb.view(nb, 8, 2, 8, c, 8).permute(0, 4, 1, 3, 2, 5)        # b c w g rh e
    tables = as_int32(vb[..., 0::2] | (vb[..., 1::2] << 16)).contiguous()

    # Padding columns are ordinary: selector 0x3210.
    flags = torch.zeros(c * BLOCK, dtype=torch.int64)
    flags[:k] = sal.to(torch.int64)
    flags = flags.view(c, 8, 2, 4, 2)                                # c kt ch t h
    sel = 0x3210 + 0x0044 * flags[..., 0] + 0x4400 * flags[..., 1]  # c kt ch t
    word = sel[:, :, 0] | (sel[:, :, 1] << 16)                       # c kt t
    merge = word.permute(0, 2, 1).unsqueeze(1).expand(c, 8, 4, 8).reshape(c, 32, 8)
    return codes, tables, as_int32(merge).contiguous()


# -- the kernel's decode in torch ----------------------------------------------------------
def prmt(a, b, sel):
    """PTX prmt.b32, default mode, on uint32 values held in int64: byte i of
    the result is byte (nibble_i(sel) & 7) of the 8 bytes {b:a} (a = bytes
    0..3), or that byte's sign replicated when bit 3 of the nibble is set.
    Only sel[15:0] is read."""
    out = torch.zeros_like(a)
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        pos = nib & 7
        byte = torch.where(pos < 4, (a >> (8 * (pos & 3))) & 0xFF, (b >> (8 * (pos & 3))) & 0xFF)
        byte = torch.where((nib & 8) != 0, torch.where((byte & 0x80) != 0, 0xFF, 0), byte)
        out = out | (byte << (8 * i))
    return out


def lut_weight(codes, tables, merge, n, k, dtype):
    """The [n, k] weight of dtype the kernel's A fragments hold, decoded from
    the layout as the specification says, bit for bit."""
    nb, c = codes.shape[0], codes.shape[1]
    words = codes.cpu().to(torch.int64).reshape(nb, c, 8, 32, 4) & 0xFFFFFFFF   # b c w lane v
    tab = tables.cpu().to(torch.int64) & 0xFFFFFFFF                            # b c w g rh 4
    mrg = merge.cpu().to(torch.int64) & 0xFFFFFFFF                             # c lane kt
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    b_idx = torch.arange(nb).view(nb, 1, 1, 1)
    c_idx = torch.arange(c).view(1, c, 1, 1)
    w_idx = torch.arange(8).view(1, 1, 8, 1)
    out = torch.zeros(nb * BLOCK, c * BLOCK, dtype=torch.int64)
    for kt in range(8):
        for r in range(4):
            j = 4 * (kt % 2) + r
            rh, ch = r % 2, r // 2
            code = (words[..., kt // 2] >> (2 * (j % 4) + 16 * (j // 4))) & 0x0303
            sel = code * 0x22 + 0x1010
            row_tab = tab[:, :, :, g, rh, :]                                   # b c w lane 4
            v_ord = prmt(row_tab[..., 0], row_tab[..., 1], sel)
            v_sal = prmt(row_tab[..., 2], row_tab[..., 3], sel)
            pick = (mrg[:, :, kt] >> (16 * ch)) & 0xFFFF                       # c lane
            reg = prmt(v_ord, v_sal, pick.unsqueeze(0).unsqueeze(2))           # b c w lane
            rows = b_idx * BLOCK + w_idx * 16 + g + 8 * rh
            cols = c_idx * BLOCK + 16 * kt + 2 * t + 8 * ch
            rows, cols = torch.broadcast_tensors(rows, cols)
            out[rows, cols] = reg & 0xFFFF
            out[rows, cols + 1] = reg >> 16
    return from_bits16(out[:n, :k], dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16),
                                                                     b.view(torch.int16))


# -- CPU: the specification ----------------------------------------------------------------
def test_prmt_emulation():
    # the example of cub::PRMT, and sign replication
    a, b = torch.tensor([0x03020100]), torch.tensor([0x07060504])
    assert prmt(a, b, torch.tensor([0x7531])).item() == 0x07050301
    assert prmt(a, b, torch.tensor([0xFFFF7531])).item() == 0x07050301     # only sel[15:0]
    assert prmt(torch.tensor([0x00008000]), torch.tensor([0]), torch.tensor([0x0998])).item() == 0x00FFFF00


def test_pair_selector_picks_the_two_bytes_of_each_entry():
    for i0 in range(4):
        for i1 in range(4):
            sel = (i0 | (i1 << 8)) * 0x22 + 0x1010
            assert [(sel >> (4 * q)) & 0xF for q in range(4)] == [2 * i0, 2 * i0 + 1, 2 * i1, 2 * i1 + 1]
            assert sel < 0x10000 and not any((sel >> (4 * q)) & 8 for q in range(4))


SPEC_SHAPES = [(1, 8), (1, 128), (100, 136), (129, 264), (300, 520), (17, 201), (128, 256)]


@pytest.mark.parametrize("n,k", SPEC_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_equals_definition(n, k, dtype):
    for salient in (0.0, 0.3, 1.0):
        index, values, sal = random_weight(n, k, dtype, seed=n * 1000 + k, salient=salient)
        codes, tables, merge = pack_layout(index, values, sal)
        nb, c = cdiv(n, BLOCK), cdiv(k, BLOCK)
        assert codes.shape == (nb, c, 8, 128) and codes.dtype == torch.int32
        assert tables.shape == (nb, c, 8, 8, 2, 4) and tables.dtype == torch.int32
        assert merge.shape == (c, 32, 8) and merge.dtype == torch.int32
        assert same_bits(lut_weight(codes, tables, merge, n, k, dtype), direct_weight(index, values, sal))


def test_padding_follows_the_specification():
    n, k = 100, 136
    index, values, sal = random_weight(n, k, torch.float16, seed=5, salient=0.5)
    index[:] = 3                       # every real weight has a nonzero code
    codes, tables, merge = pack_layout(index, values, sal)
    full = lut_weight(codes, tables, merge, 128, 256, torch.float16)
    assert bool((full[n:].view(torch.int16) == 0).all())            # rows past N: zero tables
    # columns past K decode to ordinary entry 0 (code 0, selector 0x3210)
    assert same_bits(full[:n, k:], values[:, 1, 0:1].expand(n, 256 - k))
    assert bool((merge[1, :, 1:] == 0x32103210).all())                # columns 144.. of chunk 1


def test_layout_agrees_with_the_load_time_module():
    """The package's own layout (made from a BinaryWeight) equals the one
    built here from the specification."""
    from test_cuda_binary import make_binary

    from vlmkern.formats.binary import block_values
    from vlmkern.ops import cuda_binary_lut as lut
    for n, k, dtype in ((100, 136, torch.float16), (129, 264, torch.bfloat16)):
        bw = make_binary(n, k, 128, salient=0.2, seed=n)
        sign, aux, sal = bw.planes()
        index = sign.to(torch.int64) + 2 * aux.to(torch.int64)
        codes, tables, merge = pack_layout(index, block_values(bw.stats).to(dtype), sal)
        lw = lut.to_lut_layout(bw, dtype)
        assert torch.equal(lw.codes, codes) and torch.equal(lw.tables, tables)
        assert torch.equal(lw.merge, merge)


# -- the op's shape function (Meta), wherever the extension is built ------------------------
def meta_layout(n, k):
    nb, c = cdiv(n, BLOCK), cdiv(k, BLOCK)
    m = dict(device="meta", dtype=torch.int32)
    return (torch.empty(nb, c, 8, 128, **m), torch.empty(nb, c, 8, 8, 2, 4, **m),
            torch.empty(c, 32, 8, **m))


@has_op
@pytest.mark.cpp_checks
def test_meta_shape_and_checks():
    codes, tables, merge = meta_layout(300, 264)
    x = torch.empty(5, 264, dtype=torch.bfloat16, device="meta")
    y = torch.ops.vlmkern.binary_lut_mma(x, codes, tables, merge, None, 300, 2)
    assert y.shape == (5, 300) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="ksplit must be in 1..3"):
        torch.ops.vlmkern.binary_lut_mma(x, codes, tables, merge, None, 300, 4)
    with pytest.raises(RuntimeError, match="out_features=256 does not match"):
        torch.ops.vlmkern.binary_lut_mma(x, codes, tables, merge, None, 256, 1)


# -- GPU: the kernel -------------------------------------------------------------------------
def make_case(n, k, dtype, seed=0, salient=0.2, scale=0.05):
    """(layout on the GPU, decoded weight [n, k] on the GPU, K_x)."""
    index, values, sal = random_weight(n, k, dtype, seed=seed, salient=salient, scale=scale)
    codes, tables, merge = pack_layout(index, values, sal)
    w = direct_weight(index, values, sal)   # == lut_weight of the layout (the CPU tests), faster
    return (codes.cuda(), tables.cuda(), merge.cuda()), w.cuda(), cdiv(k, 8) * 8


def activations(m, k, k_x, dtype, seed=1):
    x = torch.zeros(m, k_x, dtype=dtype)
    x[:, :k] = torch.randn(m, k, generator=gen(seed)).to(dtype)
    return x.cuda()


def run(x, layout, bias, n, ksplit):
    codes, tables, merge = layout
    return torch.ops.vlmkern.binary_lut_mma(x, codes, tables, merge, bias, n, ksplit)


def assert_close_to_exact(y, x, w, bias, ksplit):
    """y against the fp64 product with an honest bound. The fp16/bf16 products
    are exact in fp32; the MMAs sum them into fp32 (rounding or truncating,
    <= 2^-23 relative per addition), the K parts are added in fp32, the bias
    once more; so |y32 - exact| <= (K_x + ksplit + 16) * 2^-23 * S with
    S = sum_k |x_k w_k| + |bias|. The final rounding to 16 bits adds u * |y32|
    (u = 2^-11 fp16, 2^-8 bf16) plus half the smallest fp16 subnormal."""
    k = w.shape[1]
    xd, wd = x[:, :k].double(), w.double()
    exact = xd @ wd.T
    s = xd.abs() @ wd.abs().T
    if bias is not None:
        exact = exact + bias.double()
        s = s + bias.double().abs()
    acc_bound = (x.shape[1] + ksplit + 16) * 2.0 ** -23 * s
    u = 2.0 ** -11 if x.dtype == torch.float16 else 2.0 ** -8
    bound = u * (exact.abs() + acc_bound) + acc_bound + 2.0 ** -25
    assert y.dtype == x.dtype and y.shape == exact.shape
    err = (y.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the bound ({worst:.3g}x)"


N_SIZES = [1, 100, 129, 300]
K_SIZES = [128, 136, 264, 520, 201]     # 201: K_x = 208, columns 201..207 are zero padding
M_SIZES = [1, 3, 8, 16, 17, 64]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", N_SIZES)
@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_exact_product(n, k, dtype):
    layout, w, k_x = make_case(n, k, dtype, seed=n + k)
    c = cdiv(k, BLOCK)
    bias = torch.randn(n, generator=gen(7)).cuda()
    for m in M_SIZES:
        x = activations(m, k, k_x, dtype, seed=m)
        for ksplit in sorted({1, 2, c} & set(range(1, c + 1))):
            for b in (None, bias):
                y = run(x, layout, b, n, ksplit)
                assert_close_to_exact(y, x, w, b, ksplit)


@gpu
@pytest.mark.gpu
def test_gpu_bias_dtypes_and_salient_extremes():
    n, k = 129, 264
    for salient in (0.0, 1.0):
        layout, w, k_x = make_case(n, k, torch.float16, seed=3, salient=salient)
        x = activations(5, k, k_x, torch.float16)
        for bias_dtype in (torch.float16, torch.bfloat16, torch.float32):
            bias = torch.randn(n, generator=gen(8)).to(bias_dtype).cuda()
            for ksplit in (1, 3):      # the bias added by the GEMM, or by the part-sum kernel
                assert_close_to_exact(run(x, layout, bias, n, ksplit), x, w, bias.float(), ksplit)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_deterministic_and_batch_invariant(dtype):
    n, k = 300, 520
    layout, w, k_x = make_case(n, k, dtype, seed=11)
    bias = torch.randn(n, generator=gen(9)).cuda()
    x = activations(MAX_M, k, k_x, dtype, seed=4)
    for ksplit in (1, 2, 5):
        full = run(x, layout, bias, n, ksplit)
        assert torch.equal(run(x, layout, bias, n, ksplit), full)          # run to run
        for m in (1, 2, 3, 8, 9, 16, 17, 32, 33, 63):
            assert torch.equal(run(x[:m], layout, bias, n, ksplit), full[:m]), (ksplit, m)
        for i in (0, 5, 31, 63):                 # a row alone equals the row in the batch
            assert torch.equal(run(x[i:i + 1], layout, bias, n, ksplit), full[i:i + 1]), (ksplit, i)


@gpu
@pytest.mark.gpu
def test_gpu_real_size():
    n, k = 4608, 3584
    layout, w, k_x = make_case(n, k, torch.float16, seed=2, salient=0.05, scale=0.02)
    for m, ksplit in ((1, 1), (1, 4), (16, 7), (64, 28)):
        x = activations(m, k, k_x, torch.float16, seed=m)
        assert_close_to_exact(run(x, layout, None, n, ksplit), x, w, None, ksplit)


@gpu
@pytest.mark.gpu
def test_gpu_empty_batch_and_compile():
    n, k = 100, 136
    layout, w, k_x = make_case(n, k, torch.bfloat16)
    assert run(activations(0, k, k_x, torch.bfloat16), layout, None, n, 1).shape == (0, n)

    def f(x):
        return run(x, layout, None, n, 2)

    x = activations(3, k, k_x, torch.bfloat16)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_inputs():
    n, k = 100, 264
    layout, _, k_x = make_case(n, k, torch.float16)
    codes, tables, merge = layout
    x = activations(3, k, k_x, torch.float16)
    op = torch.ops.vlmkern.binary_lut_mma

    def fails(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    fails("float16 or bfloat16", x.float(), codes, tables, merge, None, n, 1)
    fails("codes must be int32", x, codes.long(), tables, merge, None, n, 1)
    fails("tables must have shape", x, codes, tables[:, :, :, :4].contiguous(), merge, None, n, 1)
    fails("merge must have shape", x, codes, tables, merge[:, :16].contiguous(), None, n, 1)
    strided = torch.zeros(*codes.shape[:-1], 256, dtype=torch.int32, device="cuda")[..., ::2]
    fails("codes must be contiguous", x, strided, tables, merge, None, n, 1)
    fails("out_features=129 does not match", x, codes, tables, merge, None, 129, 1)
    fails("chunks of 128", x[:, :128].contiguous(), codes, tables, merge, None, n, 1)
    fails("multiple of 8", torch.zeros(3, 260, dtype=torch.half, device="cuda"), codes, tables, merge,
          None, n, 1)
    fails("at most 64", activations(65, k, k_x, torch.float16), codes, tables, merge, None, n, 1)
    fails("ksplit must be in 1..3", x, codes, tables, merge, None, n, 0)
    fails("ksplit must be in 1..3", x, codes, tables, merge, None, n, 4)
    fails("codes is on cpu", x, codes.cpu(), tables, merge, None, n, 1)
    fails("x must be contiguous", torch.zeros(k_x, 3, dtype=torch.half, device="cuda").t(), codes,
          tables, merge, None, n, 1)
    flat = torch.zeros(3 * k_x + 2, dtype=torch.half, device="cuda")
    fails("16-byte aligned", flat[2:].view(3, k_x), codes, tables, merge, None, n, 1)
    fails("bias must have shape", x, codes, tables, merge, torch.zeros(n + 1, device="cuda"), n, 1)
    fails("bias must be float16, bfloat16 or float32", x, codes, tables, merge,
          torch.zeros(n, dtype=torch.int32, device="cuda"), n, 1)


if os.environ.get("VLMKERN_SANITIZE") == "1":   # a small run under compute-sanitizer memcheck
    @gpu
    @pytest.mark.gpu
    def test_binary_lut_sanitizer_smoke():
        # ragged rows, columns and tokens; every token-tile width; with and without the K split
        for n, k in ((1, 8), (129, 201), (300, 520)):
            for dtype in (torch.float16, torch.bfloat16):
                layout, _, k_x = make_case(n, k, dtype, seed=n)
                bias = torch.randn(n, generator=gen(2)).cuda()
                for m in (1, 9, 17, 33, 64):
                    x = activations(m, k, k_x, dtype, seed=m)
                    for ksplit in sorted({1, cdiv(k, BLOCK)}):
                        run(x, layout, bias, n, ksplit)
        torch.cuda.synchronize()
