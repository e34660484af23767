"""Binary weights held only in the lookup-table kernel's layout
(vlmkern.ops.laid_out_binary, vlmkern.to_kernel_layout).

On any machine: the layout's codes turn back into the canonical planes bit
for bit; a laid-out weight gives the table kernels the same codes, tables
and selectors and the torch reference the same weight; a laid-out layer
computes, saves and loads exactly like the canonical one; the plane kernels
decline it. On a GPU: the layer runs the table kernel on its own codes and
matches the canonical layer, holding fewer bytes.
"""
import copy
import dataclasses
import gc
import warnings

import pytest
import torch
from test_cuda_weight_only import gpu
from torch import nn

import vlmkern
from vlmkern.config import BinaryConfig, QuantConfig
from vlmkern.formats import BinaryWeight, FormatError
from vlmkern.ops import cuda_binary_lut as lut
from vlmkern.ops import cuda_weight_only
from vlmkern.ops.backends import KernelSpec
from vlmkern.ops.laid_out_binary import LaidOutBinaryWeight

# (N, K): rows and columns off the 128 tiles, a short last block
SHAPES = [(1, 8), (96, 256), (130, 129), (257, 300), (64, 520)]


def _binary(n, k, seed=0, block_size=128, stats_dtype=torch.float16) -> BinaryWeight:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n)
    return vlmkern.quantize_weight(linear.weight.detach(),
                                   BinaryConfig(block_size=block_size)).to(dtype=stats_dtype)


@pytest.mark.parametrize("n,k", SHAPES)
def test_codes_turn_back_into_the_canonical_planes(n, k):
    bw = _binary(n, k, seed=n + k)
    laid = LaidOutBinaryWeight.from_binary(bw).validate()
    assert laid.codes.shape == (-(-n // 128), -(-k // 128), 8, 128)
    back = laid.canonical()
    assert torch.equal(back.sign, bw.sign) and torch.equal(back.aux, bw.aux)
    assert back.salient is bw.salient and back.stats is bw.stats
    assert laid.salient_fraction() == bw.salient_fraction()


def test_relayout_in_row_block_slices_matches_one_pass(monkeypatch):
    bw = _binary(700, 300, seed=3)
    whole = LaidOutBinaryWeight.from_binary(bw)
    want = bw.dequantize(torch.float16)
    monkeypatch.setattr(cuda_weight_only, "_RELAYOUT_WEIGHTS", 1)   # one row block per step
    assert torch.equal(lut.lut_codes(bw), whole.codes)
    assert torch.equal(whole.canonical().sign, bw.sign)
    assert torch.equal(whole.dequantize(torch.float16), want)


@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_laid_out_weight_gives_the_kernels_and_the_reference_the_same_weight(n, k, stats_dtype):
    bw = _binary(n, k, seed=n * k, stats_dtype=stats_dtype)
    laid = LaidOutBinaryWeight.from_binary(bw)
    for dtype in (torch.float16, torch.bfloat16):
        a, b = lut.to_lut_layout(bw, dtype), lut.to_lut_layout(laid, dtype)
        assert b.codes is laid.codes          # the layer's own codes, no copy
        assert torch.equal(a.codes, b.codes) and torch.equal(a.tables, b.tables)
        assert torch.equal(a.merge, b.merge)
        assert torch.equal(lut.emulate_dequantize(b), bw.dequantize(dtype))
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(laid.dequantize(dtype), bw.dequantize(dtype)), dtype


def test_laid_out_codes_at_an_address_off_16_bytes_are_copied():
    laid = LaidOutBinaryWeight.from_binary(_binary(128, 256))
    store = torch.zeros(laid.codes.numel() + 1, dtype=laid.codes.dtype)
    view = store[1:].view(laid.codes.shape)
    view.copy_(laid.codes)
    codes = lut.to_lut_layout(dataclasses.replace(laid, codes=view), torch.float16).codes
    assert view.data_ptr() % 16 and codes.data_ptr() % 16 == 0
    assert torch.equal(codes, laid.codes)


def test_laid_out_weight_bytes_drop_the_planes():
    bw = _binary(512, 1024)
    laid = LaidOutBinaryWeight.from_binary(bw)
    planes = bw.sign.numel() * 4 + bw.aux.numel() * 4
    lw = lut.to_lut_layout(bw, torch.float16)
    kernel_copy = 4 * (lw.codes.numel() + lw.tables.numel() + lw.merge.numel())
    tables = 4 * (lw.tables.numel() + lw.merge.numel())
    # canonical layer on a GPU: planes + stats + the kernel's copy; laid out: codes + stats + tables
    assert laid.nbytes == bw.nbytes - planes + laid.codes.numel() * 4
    assert laid.nbytes + tables <= 0.7 * (bw.nbytes + kernel_copy)


def test_weights_the_layout_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="block_size 64"):
        LaidOutBinaryWeight.from_binary(_binary(16, 256, block_size=64))
    with pytest.raises(TypeError, match="BinaryWeight"):
        LaidOutBinaryWeight.from_binary(object())
    laid = LaidOutBinaryWeight.from_binary(_binary(16, 256))
    bad = copy.copy(laid)
    bad.codes = laid.codes[:, :1]
    with pytest.raises(FormatError, match="codes has shape"):
        bad.validate()
    bad = copy.copy(laid)
    bad.block_size = 64
    with pytest.raises(FormatError, match="block_size 128"):
        bad.validate()


def test_plane_kernels_decline_a_laid_out_weight():
    laid = LaidOutBinaryWeight.from_binary(_binary(8, 256))
    x = torch.randn(2, 256)
    assert "CUDA kernel layout" in KernelSpec("k", "binary", fn=None).rejects(x, laid)
    assert vlmkern.ops.which_kernel(x, laid) == "torch.binary"
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the CPU reference does not warn
        y = vlmkern.ops.linear(x, laid)
    assert torch.equal(y, vlmkern.ops.linear(x, laid.canonical()))


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(136, 300), nn.ReLU(), nn.Linear(300, 129, bias=False),
                      nn.Linear(129, 7))
    plan = {"0": BinaryConfig(), "2": BinaryConfig(block_size=64), "3": QuantConfig(4, 32)}
    return vlmkern.replace_linears(m, plan, progress=False)[0]


def test_laid_out_layers_compute_save_and_load_like_canonical_ones(tmp_path):
    model, x = _model(), torch.randn(5, 136)
    y, state = model(x), model.state_dict()
    assert vlmkern.to_kernel_layout(model, progress=False) == ["3"]        # binary: asked for
    assert vlmkern.to_kernel_layout(model, progress=False, binary=True) == ["0"]  # block 64 stays
    assert vlmkern.to_kernel_layout(model, progress=False, binary=True) == []
    assert model[0].laid_out and not model[2].laid_out
    assert "sign" not in model[0]._buffers and "aux" not in model[0]._buffers
    assert torch.equal(model(x), y)
    laid_state = model.state_dict()
    assert list(laid_state) == list(state)
    assert all(torch.equal(laid_state[k], state[k]) for k in state)

    model.load_state_dict(state)                   # canonical planes into a laid-out layer
    assert model[0].laid_out and torch.equal(model(x), y)
    assert torch.equal(copy.deepcopy(model)(x), y)

    vlmkern.save_quantized(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(136, 300), nn.ReLU(), nn.Linear(300, 129, bias=False),
                          nn.Linear(129, 7))
    vlmkern.load_quantized(fresh, tmp_path)
    assert not fresh[0].laid_out and torch.equal(fresh(x), y)


def test_loading_a_wrong_plane_into_a_laid_out_layer_fails_clearly():
    model = _model()
    state = model.state_dict()
    vlmkern.to_kernel_layout(model, progress=False, binary=True)
    state["0.aux"] = state["0.aux"][:, :-1]
    with pytest.raises(RuntimeError, match=r"0\.aux: expected an int32 tensor of shape"):
        model.load_state_dict(state)


def test_non_finite_statistics_are_refused_in_the_layout_too():
    model = _model()
    state = model.state_dict()
    vlmkern.to_kernel_layout(model, progress=False, binary=True)
    state["0.stats"] = state["0.stats"].clone()
    state["0.stats"][0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="stats holds NaN or Inf"):
        model.load_state_dict(state)
    laid = LaidOutBinaryWeight.from_binary(_binary(128, 256))
    with pytest.raises(FormatError, match="stats holds NaN or Inf"):
        dataclasses.replace(laid, stats=torch.full_like(laid.stats, float("inf"))).validate()


def test_a_laid_out_layer_keeps_its_weight_object_and_follows_dtype_rules():
    model = _model()
    vlmkern.to_kernel_layout(model, progress=False, binary=True)
    layer = model[0]
    assert layer.quantized_weight is layer.quantized_weight
    stats_dtype = layer.stats.dtype
    layer.to(torch.bfloat16)                      # moves the bias, never the packed tensors
    assert layer.codes.dtype == torch.int32 and layer.stats.dtype == stats_dtype
    assert isinstance(layer.quantized_weight, LaidOutBinaryWeight)
    assert layer.saved_tensor_names() == ["aux", "salient", "sign", "stats"]


def test_from_linear_takes_a_laid_out_weight_and_compiles():
    torch.manual_seed(0)
    linear = nn.Linear(200, 96)
    bw = vlmkern.quantize_weight(linear.weight.detach(), BinaryConfig())
    layer = vlmkern.QuantLinear.from_linear(linear, LaidOutBinaryWeight.from_binary(bw))
    assert isinstance(layer, vlmkern.BinaryLinear) and layer.laid_out
    x = torch.randn(3, 200)
    y = layer(x)
    assert torch.equal(y, vlmkern.QuantLinear.from_linear(linear, bw)(x))
    assert sorted(layer.state_dict()) == ["aux", "bias", "salient", "sign", "stats"]
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), y)


# -- on a GPU -----------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_laid_out_layer_on_gpu_matches_the_canonical_layer(dtype):
    bw = _binary(300, 520, stats_dtype=dtype)
    bias = torch.randn(300)
    canonical = vlmkern.BinaryLinear(bw, bias).cuda()
    laid = vlmkern.BinaryLinear(bw, bias).to_kernel_layout().cuda()
    for m in (1, 16, 64, 100):
        x = torch.randn(m, 520, device="cuda", dtype=dtype)
        kernel = vlmkern.ops.which_kernel(x, laid.quantized_weight)
        assert kernel == ("cuda.binary_lut" if m <= 64 else "torch.binary")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # prefill dequantizes with torch operations
            got = laid(x)
        if m <= 64:                                # the same kernel on the same layout
            assert torch.equal(got, canonical(x)), m
        else:                                      # dense GEMM on the same weight
            want = x @ bw.dequantize(dtype).cuda().T + bias.cuda().to(dtype)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@gpu
def test_laid_out_layer_on_gpu_holds_fewer_bytes():
    bw = _binary(1024, 2048)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    sizes = {}
    for name, layer in (("canonical", vlmkern.BinaryLinear(bw)),
                        ("laid_out", vlmkern.BinaryLinear(bw).to_kernel_layout())):
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        layer = layer.cuda()
        layer(x)
        torch.cuda.synchronize()
        sizes[name] = torch.cuda.memory_allocated() - before
        del layer
    weights = 1024 * 2048
    assert sizes["canonical"] >= weights * 5 // 8         # planes, stats, codes, tables
    assert sizes["laid_out"] <= weights * 4.5 / 8          # codes, stats, tables


def test_missing_tensors_of_a_laid_out_layer_are_named_as_saved():
    from torch import nn

    import vlmkern
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64))
    vlmkern.replace_linears(model, {"0": vlmkern.QuantConfig(4, 128),
                                    "1": vlmkern.BinaryConfig()}, skip=(), progress=False)
    vlmkern.to_kernel_layout(model, progress=False, binary=True)
    sd = model.state_dict()
    assert "0.qweight" in sd and "1.aux" in sd and "0.wq" not in sd
    partial = {k: v for k, v in sd.items() if k not in ("0.qweight", "1.aux")}
    result = model.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == ["0.qweight", "1.aux"]
    assert torch.equal(model.state_dict()["0.qweight"], sd["0.qweight"])   # kept as it was
    with pytest.raises(RuntimeError, match='Missing key.*"0.qweight"'):
        model.load_state_dict(partial)
