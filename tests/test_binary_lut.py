"""Binary weights as a lookup-table GEMM (vlmkern.ops.cuda_binary_lut).

On any machine: the layout decoded with the kernel's operations (shift,
mask, multiply-add, byte permutes; ``emulate_dequantize``) reproduces the
format's dequantized weight bit for bit, on awkward shapes, every stats dtype
and a weight binarized from a real matrix; the kernel is registered opt-in.
On a GPU with the extension built: the layer's output against the fp64
product of the dequantized weight, through ``ops.linear``.
"""
import pytest
import torch
from test_cuda_binary import make_binary
from test_cuda_binary_lut_kernel import assert_close_to_exact, gpu

import vlmkern
from vlmkern import BinaryConfig
from vlmkern.formats.binary import block_values
from vlmkern.ops import cuda_binary_lut as lut
from vlmkern.ops.backends import BACKENDS
from vlmkern.ops.cuda_common import multiprocessors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


SHAPES = [(1, 8), (100, 131), (129, 264), (300, 520), (64, 128), (16, 1000)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_layout_decodes_to_the_dequantized_weight(n, k, dtype, stats_dtype):
    bw = make_binary(n, k, 128, salient=0.15, seed=n + k, stats_dtype=stats_dtype)
    lw = lut.to_lut_layout(bw, dtype)
    nb, c = -(-n // 128), -(-k // 128)
    assert lw.codes.shape == (nb, c, 8, 128) and lw.tables.shape == (nb, c, 8, 8, 2, 4)
    assert lw.merge.shape == (c, 32, 8)
    assert same_bits(lut.emulate_dequantize(lw), bw.dequantize(dtype))


@pytest.mark.parametrize("salient", [0.0, 1.0])
def test_all_or_no_salient_columns(salient):
    bw = make_binary(40, 200, 128, salient=salient, seed=3)
    lw = lut.to_lut_layout(bw, torch.float16)
    assert same_bits(lut.emulate_dequantize(lw), bw.dequantize(torch.float16))
    if salient == 0.0:
        assert bool((lw.merge == 0x32103210).all())


def test_a_binarized_matrix_decodes_exactly():
    torch.manual_seed(0)
    bw = vlmkern.binarize(torch.randn(96, 384) * 0.02, BinaryConfig(block_size=128))
    lw = lut.to_lut_layout(bw, torch.bfloat16)
    assert same_bits(lut.emulate_dequantize(lw), bw.dequantize(torch.bfloat16))


def test_block_values_are_the_dequantized_values():
    bw = make_binary(8, 256, 128, salient=0.3, seed=1, stats_dtype=torch.float32)
    sign, aux, sal = bw.planes()
    values = block_values(bw.stats)                                   # [N, blocks, 8]
    index = sign.long() + 2 * aux.long() + 4 * sal.long()
    blk = torch.arange(256) // 128
    picked = values[torch.arange(8).unsqueeze(1), blk, index]
    assert torch.equal(picked, bw.dequantize(torch.float32))


def test_unsupported_weights_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="block_size 64 unsupported"):
        lut.to_lut_layout(make_binary(8, 128, 64), torch.float16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        lut.to_lut_layout(make_binary(8, 128, 128), torch.float32)


def test_registered_ahead_of_the_plane_gemms():
    from vlmkern.ops import builtin  # noqa: F401  (registers the backends)
    names = [k.name for k in BACKENDS["cuda"].kernels if k.op == "binary"]
    assert names[:4] == ["cuda.binary_lut_tma_decode", "cuda.binary_lut_tma", "cuda.binary_lut_staged",
                         "cuda.binary_lut"]
    assert "cuda.binary" in names
    by_name = {k.name: k for k in BACKENDS["cuda"].kernels}
    spec, staged = by_name["cuda.binary_lut"], by_name["cuda.binary_lut_staged"]
    assert not spec.opt_in and spec.max_m == lut.MAX_M
    assert staged.opt_in and (staged.min_m, staged.max_m) == (1, lut.MAX_M)
    assert staged.dtypes == spec.dtypes and staged.min_sm == spec.min_sm == (8, 0)
    assert "block_size 64 unsupported" in staged.check(torch.zeros(1, 128), make_binary(4, 128, 64))
    assert staged.check(torch.zeros(1, 128), make_binary(4, 128, 128)) is None
    # the Hopper kernel takes batches from 17 tokens up, prefill included
    tma = by_name["cuda.binary_lut_tma"]
    assert tma.opt_in and (tma.min_m, tma.max_m) == (lut.TMA_MIN_M, None) == (17, None)
    assert tma.dtypes == spec.dtypes and tma.min_sm == (9, 0)
    assert "block_size 64 unsupported" in tma.check(torch.zeros(65, 128), make_binary(4, 128, 64))
    assert tma.check(torch.zeros(65, 128), make_binary(4, 128, 128)) is None   # CPU x: no probe


def test_ksplit_fills_the_waves():
    def use(rows, parts, sms=132):
        blocks, slots = rows * parts, 2 * sms
        return blocks / (-(-blocks // slots) * slots)
    # Qwen2-VL-7B on an H100: gate/up (296 row blocks, 28 chunks), qkv (36, 28), down (28, 148)
    for rows, chunks in ((296, 28), (36, 28), (28, 148)):
        parts = lut.choose_ksplit(rows, chunks, 132)
        assert use(rows, parts) >= lut.MIN_WAVE_USE and chunks // parts >= 2
        assert all(use(rows, p) < lut.MIN_WAVE_USE for p in range(1, parts))
    assert lut.choose_ksplit(296, 28, 132) == 5         # one part would use 56% of the slots
    assert lut.choose_ksplit(1, 3, 132) == 1            # never below 2 chunks a part
    assert lut.choose_ksplit(264, 28, 132) == 1


# -- on a GPU --------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(300, 520), (3584, 3584), (129, 264), (100, 131)])
def test_layer_matches_the_fp64_product(monkeypatch, dtype, n, k):
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.binary_lut")
    bw = make_binary(n, k, 128, salient=0.1, seed=5, device="cuda")
    bias = torch.randn(n, device="cuda")
    w = bw.dequantize(dtype).double()
    ksplit = lut.choose_ksplit(-(-n // 128), -(-k // 128), multiprocessors(bw.device))
    for m in (1, 3, 16, 17, 64):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        assert vlmkern.ops.which_kernel(x, bw) == "cuda.binary_lut"
        y = vlmkern.ops.linear(x, bw, bias)
        assert_close_to_exact(y, x, w, bias, ksplit)
        assert torch.equal(vlmkern.ops.linear(x[:1], bw, bias), y[:1])   # batch invariance
