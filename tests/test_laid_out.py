"""Weights held only in the CUDA kernel layout (vlmkern.ops.laid_out,
vlmkern.to_kernel_layout).

On any machine: the layout's codes turn back into the canonical stream bit
for bit; a laid-out weight gives the kernels the same layout and the torch
reference the same weight; a laid-out layer computes, saves and loads
exactly like the canonical one; kernels that read the canonical stream
decline it. On a GPU: the layer runs the tensor-core kernel on its own codes
(no second copy) and matches the canonical layer.
"""
import copy
import dataclasses
import gc
import warnings

import pytest
import torch
from test_cuda_weight_only import gpu, make_weight, same_bits
from tiny_models import kernel_op_reason
from torch import nn

import vlmkern
from vlmkern.config import QuantConfig
from vlmkern.formats import FormatError
from vlmkern.formats.groupwise import dequantize_codes
from vlmkern.ops import cuda_weight_only as cw
from vlmkern.ops.backends import KernelSpec
from vlmkern.ops.laid_out import LaidOutWeight

# (N, K, group, sym, perm): rows/columns off the 128 tiles, ragged last groups
CASES = [(1, 8, None, False, False), (100, 131, 32, False, True), (129, 264, 64, True, False),
         (300, 136, 128, False, False), (257, 520, 256, True, True), (64, 200, 16, False, False)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group,sym,perm", CASES)
def test_layout_codes_turn_back_into_the_canonical_stream(bits, n, k, group, sym, perm):
    qw = make_weight(n, k, bits, group, sym, perm=perm, seed=n + k + bits)
    wq = cw.layout_codes(qw)
    assert wq.shape == (-(-n // 128), -(-k // 128), 8, 64 * bits)
    assert torch.equal(cw.packed_codes_from_layout(wq, bits, n, k), qw.qweight)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layout_fields_are_the_kernels_fields(bits):
    # any words (bit 31 set in about half): the broadcast-shift reader takes
    # the fields the kernel's shifts and masks take (its emulation)
    gen = torch.Generator().manual_seed(bits)
    wq = torch.randint(-(1 << 31), 1 << 31, (2, 3, 8, 64 * bits), generator=gen,
                       dtype=torch.int64).to(torch.int32)
    regs = cw._fragment_magic_codes(cw._lane_words(wq, bits), bits, 0)     # b c w lane kt r
    want = torch.stack([regs & 0xFFFF, regs >> 16], dim=-1)
    assert torch.equal(cw._lane_codes_of_words(wq, bits).long(), want)


def test_relayout_in_row_block_slices_matches_one_pass(monkeypatch):
    qw = make_weight(700, 300, 3, 64, False, seed=3)
    whole = cw.layout_codes(qw)
    monkeypatch.setattr(cw, "_RELAYOUT_WEIGHTS", 1)   # one row block per step
    assert torch.equal(cw.layout_codes(qw), whole)
    assert torch.equal(cw.packed_codes_from_layout(whole, 3, 700, 300), qw.qweight)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group,sym,perm", CASES)
def test_dequantized_from_the_layout_as_from_the_canonical_codes(monkeypatch, bits, n, k, group,
                                                                  sym, perm):
    qw = make_weight(n, k, bits, group, sym, perm=perm, seed=2 * n + k + bits)
    laid = LaidOutWeight.from_quantized(qw)
    monkeypatch.setattr(cw, "_RELAYOUT_WEIGHTS", 1)          # one row block per slice
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(laid.dequantize(dtype), qw.dequantize(dtype)), dtype
    stored = dequantize_codes(qw.codes(), qw.scales, qw.zeros(), None, qw.group_size,
                              torch.float16)
    assert torch.equal(laid.dequantize_stored(torch.float16), stored)


def test_prefill_fallback_for_a_laid_out_weight_runs_without_the_extension():
    # what cuda.dequant_cublas does with a laid-out weight: torch operations only
    from vlmkern.ops import builtin, reference
    qw = make_weight(300, 520, 3, 128, False, perm=True, seed=5)
    x, bias = torch.randn(100, 520, dtype=torch.float16), torch.randn(300, dtype=torch.float16)
    with pytest.warns(UserWarning, match="dequantized with torch operations"):
        y = builtin._cuda_dequant_matmul(x, LaidOutWeight.from_quantized(qw), bias)
    stored = dequantize_codes(qw.codes(), qw.scales, qw.zeros(), None, 128, torch.float16)
    assert torch.equal(y, reference.stored_order_linear(x, stored, qw.perm, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_laid_out_weight_gives_the_kernels_the_same_layout(bits, dtype):
    qw = make_weight(200, 264, bits, 64, False, scale_dtype=dtype, perm=True)
    laid = LaidOutWeight.from_quantized(qw).validate()
    a, b = cw.to_mma_layout(qw, dtype), cw.to_mma_layout(laid, dtype)
    assert torch.equal(a.wq, b.wq) and torch.equal(a.sz, b.sz)
    assert (b.slot_log2, b.out_features, b.in_features) == (a.slot_log2, 200, 264)
    stored_order = qw.dequantize(dtype)[:, qw.perm.long()]
    assert same_bits(cw.emulate_dequantize(b), stored_order)
    assert torch.equal(laid.dequantize(), qw.dequantize())
    assert (laid.shape, laid.sym, laid.num_groups) == (qw.shape, qw.sym, qw.num_groups)
    assert torch.equal(laid.zeros(), qw.zeros())


def test_laid_out_codes_at_an_address_off_16_bytes_are_copied():
    # (a view into a larger buffer: the kernels' 16-byte loads need an aligned start)
    laid = LaidOutWeight.from_quantized(make_weight(128, 256, 4, 128, False))
    assert cw.to_mma_layout(laid, torch.float16).wq is laid.wq         # aligned: no copy
    store = torch.zeros(laid.wq.numel() + 1, dtype=torch.int32)
    view = store[1:].view(laid.wq.shape)
    view.copy_(laid.wq)
    shifted = dataclasses.replace(laid, wq=view)
    wq = cw.to_mma_layout(shifted, torch.float16).wq
    assert view.data_ptr() % 16 and wq.data_ptr() % 16 == 0 and torch.equal(wq, laid.wq)


def test_laid_out_weight_bytes_are_the_codes_once():
    qw = make_weight(256, 512, 4, 128, False)       # on the tiles: no padding
    laid = LaidOutWeight.from_quantized(qw)
    assert laid.nbytes == qw.nbytes
    odd = make_weight(130, 136, 4, 128, False)      # padded to 256 x 256
    assert LaidOutWeight.from_quantized(odd).wq.numel() * 4 == 256 * 256 // 2


def test_weights_the_layout_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="2, 3 or 4"):
        LaidOutWeight.from_quantized(make_weight(8, 64, 8, 32, False))
    with pytest.raises(ValueError, match="group size 48"):
        LaidOutWeight.from_quantized(make_weight(8, 96, 4, 48, False))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        LaidOutWeight.from_quantized(torch.zeros(3))
    laid = LaidOutWeight.from_quantized(make_weight(8, 64, 4, 32, False))
    laid.wq = laid.wq[:, :, :4]
    with pytest.raises(FormatError, match="wq has shape"):
        laid.validate()
    bad_perm = LaidOutWeight.from_quantized(make_weight(8, 64, 4, 32, False, perm=True))
    bad_perm.perm = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(FormatError, match="permutation"):
        bad_perm.validate()


def test_kernels_reading_the_canonical_stream_decline_a_laid_out_weight():
    laid = LaidOutWeight.from_quantized(make_weight(8, 64, 4, 32, False))
    x = torch.randn(2, 64)
    canonical_only = KernelSpec("k", "weight_only", fn=None)
    assert "CUDA kernel layout" in canonical_only.rejects(x, laid)
    assert KernelSpec("k", "weight_only", fn=None, laid_out=True).rejects(x, laid) is None
    assert vlmkern.ops.which_kernel(x, laid) == "torch.weight_only"


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(136, 300), nn.ReLU(), nn.Linear(300, 129, bias=False),
                      nn.Linear(129, 7))
    plan = {"0": QuantConfig(bits=3, group_size=32), "2": QuantConfig(bits=4, group_size=None),
            "3": QuantConfig(bits=8)}
    return vlmkern.replace_linears(m, plan, progress=False)[0]


def test_laid_out_layers_compute_save_and_load_like_canonical_ones(tmp_path):
    model, x = _model(), torch.randn(5, 136)
    y, state = model(x), model.state_dict()
    assert vlmkern.to_kernel_layout(model, progress=False) == ["0", "2"]   # 8-bit stays
    assert vlmkern.to_kernel_layout(model, progress=False) == []            # idempotent
    assert model[0].laid_out and not model[3].laid_out and "qweight" not in model[0]._buffers
    assert torch.equal(model(x), y)
    laid_state = model.state_dict()
    assert list(laid_state) == list(state)
    assert all(torch.equal(laid_state[k], state[k]) for k in state)

    model.load_state_dict(state)                  # canonical codes into a laid-out layer
    assert model[0].laid_out and torch.equal(model(x), y)
    assert torch.equal(copy.deepcopy(model)(x), y)

    vlmkern.save_quantized(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(136, 300), nn.ReLU(), nn.Linear(300, 129, bias=False),
                          nn.Linear(129, 7))
    vlmkern.load_quantized(fresh, tmp_path)
    assert not fresh[0].laid_out and torch.equal(fresh(x), y)


def test_loading_into_a_laid_out_layer_lays_out_the_loaded_zero_points():
    # the layout's padding columns (K = 136 and 300 are off the 128-column
    # chunk) hold each row's last zero point: the loaded one, not the old
    source, target = _model(), _model()
    for layer in (source[0], source[2]):
        layer.qzeros.copy_(torch.randint_like(layer.qzeros, 0, 1 << 30))
    vlmkern.to_kernel_layout(target, progress=False)
    target.load_state_dict(source.state_dict())
    for name in ("0", "2"):
        expected = cw.layout_codes(source.get_submodule(name).quantized_weight)
        assert torch.equal(target.get_submodule(name).wq, expected)


def test_loading_a_wrong_code_tensor_into_a_laid_out_layer_fails_clearly():
    model = _model()
    state = model.state_dict()
    vlmkern.to_kernel_layout(model, progress=False)
    state["0.qweight"] = state["0.qweight"][:, :-1]
    with pytest.raises(RuntimeError, match=r"0\.qweight: expected an int32 tensor of shape"):
        model.load_state_dict(state)


def test_a_laid_out_layer_keeps_its_weight_object_and_follows_dtype_rules():
    model = _model()
    vlmkern.to_kernel_layout(model, progress=False)
    layer = model[0]
    assert layer.quantized_weight is layer.quantized_weight
    scale_dtype = layer.scales.dtype
    layer.to(torch.bfloat16)                     # moves the bias, never the packed tensors
    assert layer.wq.dtype == torch.int32 and layer.scales.dtype == scale_dtype
    assert layer.bias.dtype == torch.bfloat16
    assert isinstance(layer.quantized_weight, LaidOutWeight)
    assert layer.saved_tensor_names() == ["qweight", "qzeros", "scales"]


def test_from_linear_takes_a_laid_out_weight():
    torch.manual_seed(0)
    linear = nn.Linear(200, 96)
    qw = vlmkern.quantize_weight(linear.weight.detach(), QuantConfig(4, 64))
    layer = vlmkern.QuantLinear.from_linear(linear, LaidOutWeight.from_quantized(qw))
    assert isinstance(layer, vlmkern.WeightOnlyLinear) and layer.laid_out
    x = torch.randn(3, 200)
    assert torch.equal(layer(x), vlmkern.QuantLinear.from_linear(linear, qw)(x))
    assert sorted(layer.state_dict()) == ["bias", "qweight", "qzeros", "scales"]


# -- on a GPU -----------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("prefill", ["cuda.dequant_cublas", "cuda.dequant_layout_cublas"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_laid_out_layer_on_gpu_matches_the_canonical_layer(monkeypatch, prefill, bits, dtype):
    why = kernel_op_reason("weight_only_dequant", "weight_only_dequant_kernel.cu")
    if "layout" in prefill and why:
        pytest.skip(why)
    monkeypatch.setenv("VLMKERN_ENABLE", prefill if "layout" in prefill else "")
    qw = make_weight(300, 520, bits, 128, False, scale_dtype=dtype, perm=True)
    bias = torch.randn(300)
    canonical = vlmkern.WeightOnlyLinear(qw, bias).cuda()
    laid = vlmkern.WeightOnlyLinear(qw, bias).to_kernel_layout().cuda()
    for m in (1, 16, 64, 100):
        x = torch.randn(m, 520, device="cuda", dtype=dtype)
        kernel = vlmkern.ops.which_kernel(x, laid.quantized_weight)
        small = "cuda.weight_only_post_scale" if 8 < m <= 16 or (m <= 8 and bits != 3) else \
            "cuda.weight_only_mma"
        assert kernel == (small if m <= 64 else prefill)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # cuda.dequant_cublas decodes the layout in torch
            assert same_bits(laid(x), canonical(x)), m


@gpu
def test_laid_out_layer_on_gpu_holds_its_codes_once():
    qw = make_weight(1024, 2048, 4, 128, False)
    torch.cuda.synchronize()
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    sizes = {}
    for name, layer in (("canonical", vlmkern.WeightOnlyLinear(qw)),
                        ("laid_out", vlmkern.WeightOnlyLinear(qw).to_kernel_layout())):
        gc.collect()         # earlier tests' CUDA tensors must not be freed mid-measurement
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        layer = layer.cuda()
        layer(x)
        torch.cuda.synchronize()
        sizes[name] = torch.cuda.memory_allocated() - before
        del layer
    codes = 1024 * 2048 // 2
    assert sizes["canonical"] >= 2 * codes          # stream + the kernel's layout
    assert sizes["laid_out"] < 1.25 * codes         # the layout (+ scale words) only



def test_to_kernel_layout_warns_where_no_kernel_reads_the_layout(monkeypatch):
    from vlmkern import ext
    model = nn.Sequential(nn.Linear(256, 128))
    vlmkern.replace_linears(model, vlmkern.QuantConfig(4, 128), skip=(), progress=False)
    monkeypatch.setattr(ext, "load_extension", lambda: (None, "vlmkern._C was not built"))
    with pytest.warns(UserWarning, match="only the CUDA extension's kernels read the layout"):
        vlmkern.to_kernel_layout(model, progress=False)
