"""vlmkern.ops: the reference matmuls against dense computations, the integer
activation path against its fake-quant formulation, input checks, and the
backend selector."""
import math
import os
import subprocess
import sys

import pytest
import torch

import vlmkern
from vlmkern import (BinaryConfig, IntActConfig, IntActWeight, QuantConfig, QuantizedWeight,
                     ops)
from vlmkern.ops import BackendError, reference

N, K = 48, 200          # K is not a multiple of any group size used below


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    monkeypatch.delenv("VLMKERN_CHECK_FINITE", raising=False)


def _weight(seed, n=N, k=K):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def _perm_weight():
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (N, K), generator=gen)
    scales = (torch.rand(N, 4, generator=gen) * 0.02 + 0.005).half()
    zeros = torch.randint(0, 16, (N, 4), generator=gen)
    return QuantizedWeight.from_codes(codes, scales, zeros, 4, 64, torch.randperm(K, generator=gen))


WEIGHT_MAKERS = {
    "w4g32": lambda: vlmkern.quantize_rtn(_weight(1), QuantConfig(bits=4, group_size=32)),
    "w3g64sym": lambda: vlmkern.quantize_rtn(_weight(2), QuantConfig(bits=3, group_size=64,
                                                                     sym=True)),
    "w2row": lambda: vlmkern.quantize_rtn(_weight(3), QuantConfig(bits=2, group_size=None)),
    "w8g128bf16": lambda: vlmkern.quantize_rtn(_weight(4), QuantConfig(
        bits=8, group_size=128, sym=True, scale_dtype="bfloat16")),
    "w4g64perm": _perm_weight,
    "binary": lambda: vlmkern.binarize(_weight(5), BinaryConfig(max_salient=4)),
}
INTACT_MAKERS = {
    "w8a8": lambda: vlmkern.quantize_rtn(_weight(6), IntActConfig(w_bits=8, a_bits=8)),
    "w6a6g64": lambda: vlmkern.quantize_rtn(_weight(7), IntActConfig(w_bits=6, a_bits=6,
                                                                     group_size=64)),
    "w4a4": lambda: vlmkern.quantize_rtn(_weight(8), IntActConfig(w_bits=4, a_bits=4)),
    "w4a8static": lambda: vlmkern.quantize_rtn(_weight(9), IntActConfig(
        w_bits=4, a_bits=8, group_size=64, act_scale=0.02)),
}
ALL_MAKERS = {**WEIGHT_MAKERS, **INTACT_MAKERS}


@pytest.fixture(scope="module")
def weights():
    return {name: make() for name, make in ALL_MAKERS.items()}


def _x(lead, dtype, seed=0):
    x = torch.randn(*lead, K, generator=torch.Generator().manual_seed(seed))
    x[..., 0] *= 20                                   # an outlier feature
    return x.to(dtype)


def _bias(dtype, seed=1):
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(dtype)


# Unit roundoff of the output dtype: rounding an exact result to it changes it
# by at most this fraction (round to nearest, half an ulp).
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}
# Smallest subnormal spacing of fp16 (bf16 shares fp32's exponent range).
ABS_FLOOR = {torch.float16: 2.0 ** -24, torch.bfloat16: 0.0, torch.float32: 0.0,
             torch.float64: 0.0}


def assert_close_to_exact(y, exact, magnitude, dtype, k=K):
    """|y - exact| <= u_out |exact| + 2 K 2^-24 (|x| @ |W|^T + |b|) + fp16 subnormal spacing.

    The second term is the standard error bound for a length-K dot product in
    fp32 (gamma_K ~ K u_32); the first is the one rounding to the output dtype.
    """
    assert y.dtype == dtype
    bound = (UNIT_ROUNDOFF[dtype] * exact.abs() + 2 * k * 2.0 ** -24 * magnitude
             + ABS_FLOOR[dtype])
    err = (y.double() - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


LEADS = [(1,), (3,), (17,), (2, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("with_bias", (False, True), ids=("", "bias"))
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", sorted(WEIGHT_MAKERS))
def test_weight_only_linear_matches_dense(weights, fmt, lead, with_bias, dtype):
    qw = weights[fmt]
    x = _x(lead, dtype)
    bias = _bias(dtype) if with_bias else None
    y = ops.linear(x, qw, bias)
    assert y.shape == (*lead, N) and y.dtype == dtype
    w = qw.dequantize(torch.float64)
    xd = x.double()
    exact = xd @ w.T + (bias.double() if with_bias else 0)
    magnitude = xd.abs() @ w.abs().T + (bias.double().abs() if with_bias else 0)
    assert_close_to_exact(y, exact, magnitude, dtype)


def _fake_quant_acts(x: torch.Tensor, bits: int, act_scale):
    """Independent symmetric per-token (or static) activation fake-quant, fp64 result."""
    lim = 2 ** (bits - 1) - 1
    xf = x.reshape(-1, x.shape[-1]).float()
    rows = []
    for row in xf:
        if act_scale is not None:
            s = torch.tensor(act_scale, dtype=torch.float32)
        else:
            s = row.abs().max() / lim                  # fp32, like the stored scale
            if float(s) == 0:
                s = torch.tensor(1.0)
        q = torch.clamp(torch.round(row / s), -lim, lim)
        rows.append(q.double() * float(s))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("with_bias", (False, True), ids=("", "bias"))
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", sorted(INTACT_MAKERS))
def test_int_act_linear_matches_fake_quant(weights, fmt, lead, with_bias, dtype):
    qw = weights[fmt]
    x = _x(lead, dtype)
    bias = _bias(dtype) if with_bias else None
    y = ops.linear(x, qw, bias)
    assert y.shape == (*lead, N)
    xq = _fake_quant_acts(x, qw.a_bits, qw.act_scale)
    w = qw.dequantize(torch.float64)
    exact = xq @ w.T + (bias.double() if with_bias else 0)
    magnitude = xq.abs() @ w.abs().T + (bias.double().abs() if with_bias else 0)
    # The integer path is exact up to fp64 rounding; only the output rounding remains.
    bound = UNIT_ROUNDOFF[dtype] * exact.abs() + 1e-12 * magnitude + ABS_FLOOR[dtype]
    assert bool(((y.double() - exact).abs() <= bound).all())


def _pow2_intact(w_bits, group, act_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    lim = 2 ** (w_bits - 1) - 1
    groups = 1 if group is None else -(-K // group)
    codes = torch.randint(-lim, lim + 1, (N, K), generator=gen).to(torch.int8)
    exps = torch.randint(-12, -3, (N, groups), generator=gen).double()
    scales = torch.pow(2.0, exps).half()               # exact in fp16
    return IntActWeight.from_codes(codes, scales, w_bits, 8, group, act_scale)


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("group", (None, 64), ids=("row", "g64"))
@pytest.mark.parametrize("w_bits", (4, 6, 8))
def test_int_act_bitwise_equals_fake_quant_with_pow2_scales(w_bits, group, x_dtype):
    qw = _pow2_intact(w_bits, group, act_scale=2.0 ** -5, seed=w_bits)
    x = _x((17,), x_dtype, seed=w_bits) * 0.5
    bias = _bias(x_dtype)
    for b in (None, bias):
        y_int = reference.int_act_matmul(x, qw, b)
        y_fake = reference.fake_quant_int_act(x, qw, b)
        assert torch.equal(y_int, y_fake)
        assert torch.equal(ops.linear(x, qw, b), y_int)
    assert y_int.abs().max() > 0


@pytest.mark.parametrize("fmt", sorted(INTACT_MAKERS))
def test_int_act_equals_fake_quant_in_fp64(weights, fmt):
    qw = weights[fmt]
    x = _x((17,), torch.float64, seed=3)
    y_int = reference.int_act_matmul(x, qw)
    y_fake = reference.fake_quant_int_act(x, qw)
    qx, sx = reference.quantize_activations(x, qw.a_bits, qw.act_scale)
    magnitude = (qx.double() * sx.double()[:, None]).abs() @ qw.dequantize(torch.float64).abs().T
    assert bool(((y_int - y_fake).abs() <= 1e-12 * magnitude).all())


def test_int_act_reference_is_exact_past_the_int32_range():
    # 127 * 127 * 140000 > 2^31: the reference sums exactly, the integer kernels decline
    k = 140_000
    qw = IntActWeight.from_codes(torch.full((1, k), 127, dtype=torch.int8),
                                 torch.full((1, 1), 0.5), 8, 8, None)
    x = torch.ones(1, k, dtype=torch.float64)
    y = reference.int_act_matmul(x, qw)
    assert abs(float(y) / (127 * k * 0.5) - 1) < 1e-6      # token scale 1/127 in fp32
    assert float(y) == float(reference.fake_quant_int_act(x, qw))
    from vlmkern.ops import cuda_int_act
    assert "overflow the int32 accumulator" in cuda_int_act.overflow_reason(qw)


def test_int_dot_is_exact():
    gen = torch.Generator().manual_seed(0)
    qx = torch.randint(-127, 128, (3, 70), generator=gen).to(torch.int8)
    qw = torch.randint(-127, 128, (2, 70), generator=gen).to(torch.int8)
    acc = reference.int_dot(qx, qw, 32)
    assert acc.shape == (3, 2, 3) and acc.dtype == torch.int64
    for m in range(3):
        for n in range(2):
            for g, (lo, hi) in enumerate(((0, 32), (32, 64), (64, 70))):
                exact = sum(int(qx[m, j]) * int(qw[n, j]) for j in range(lo, hi))
                assert int(acc[m, n, g]) == exact


@pytest.mark.parametrize("bits", (4, 6, 8))
def test_quantize_activations_within_half_step(bits):
    lim = 2 ** (bits - 1) - 1
    x = torch.randn(17, K, generator=torch.Generator().manual_seed(bits))
    x = x * torch.logspace(-3, 2, 17)[:, None]
    x[4] = 0.0
    q, s = reference.quantize_activations(x, bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (17,)
    assert int(q.abs().max()) <= lim
    assert float(s[4]) == 1.0 and bool((q[4] == 0).all())
    expected_s = x.abs().amax(1) / lim
    assert torch.equal(s[torch.arange(17) != 4], expected_s[torch.arange(17) != 4])
    err = (q.double() * s.double()[:, None] - x.double()).abs()
    # half a step; fp32 x/s is off by at most lim * 2^-24 steps
    assert bool((err <= s.double()[:, None] * (0.5 + 1e-5)).all())
    # every token's largest value lands on the extreme code
    assert bool((q[torch.arange(17) != 4].abs().amax(1) == lim).all())


def test_quantize_activations_static_scale_clamps():
    x = torch.tensor([[0.0, 0.1, -0.1, 10.0, -10.0]])
    q, s = reference.quantize_activations(x, 8, scale=0.01)
    assert q.tolist() == [[0, 10, -10, 127, -127]]
    assert s.tolist() == [pytest.approx(0.01)]


@pytest.mark.parametrize("act_scale", (None, 0.05), ids=("per_token", "static"))
@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf))
def test_int_path_non_finite_token_gives_non_finite_row(act_scale, bad):
    qw = vlmkern.quantize_rtn(_weight(6), IntActConfig(act_scale=act_scale))
    x = _x((5,), torch.float32, seed=2)
    x_bad = x.clone()
    x_bad[2, 17] = bad
    y = reference.int_act_matmul(x_bad, qw)
    assert not bool(torch.isfinite(y[2]).any())
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.equal(y[keep], reference.int_act_matmul(x[keep], qw))


@pytest.mark.parametrize("fmt", sorted(ALL_MAKERS))
@pytest.mark.parametrize("bad", (math.nan, math.inf))
def test_linear_rejects_non_finite_x_on_cpu(weights, fmt, bad):
    x = _x((3,), torch.float32)
    x[1, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.linear(x, weights[fmt])


@pytest.mark.parametrize("fmt", sorted(ALL_MAKERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_batch_invariance(weights, fmt, dtype):
    qw = weights[fmt]
    x = _x((17,), dtype, seed=5)
    bias = _bias(dtype)
    full = ops.linear(x, qw, bias)
    for rows in ((0, 1), (5, 6), (0, 4), (3, 11)):
        part = ops.linear(x[rows[0]:rows[1]], qw, bias)
        assert torch.equal(part, full[rows[0]:rows[1]]), rows


def test_empty_batch(weights):
    y = ops.linear(torch.zeros(0, K), weights["w4g32"])
    assert y.shape == (0, N)
    y = ops.linear(torch.zeros(2, 0, K), weights["binary"])
    assert y.shape == (2, 0, N)


def test_a_weight_with_no_output_features():
    # the formats allow N = 0 (from_codes); the unpacking would not
    qw = QuantizedWeight.from_codes(torch.zeros(0, K, dtype=torch.long),
                                    torch.zeros(0, -(-K // 32)).half(), None, 4, 32)
    iw = IntActWeight.from_codes(torch.zeros(0, K, dtype=torch.long), torch.zeros(0, 1).half(),
                                 8, 8, None)
    for w in (qw, iw):
        y = ops.linear(torch.randn(3, K), w, torch.zeros(0))
        assert y.shape == (3, 0)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(ALL_MAKERS))
def test_bad_inputs(weights, fmt):
    qw = weights[fmt]
    x = _x((3,), torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(x[:, :-1], qw)
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(torch.tensor(1.0), qw)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, qw, torch.zeros(N + 1))
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, qw, torch.zeros(1, N))
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, qw, [0.0] * N)
    for int_dtype in (torch.int32, torch.int8, torch.int64):
        with pytest.raises(TypeError, match="float"):
            ops.linear(x.to(int_dtype), qw)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.linear(x.tolist(), qw)


def test_qweight_must_be_quantized(weights):
    x = _x((3,), torch.float32)
    with pytest.raises(TypeError, match="quantized weight"):
        ops.linear(x, torch.randn(N, K))
    with pytest.raises(TypeError, match="quantized weight"):
        ops.linear(x, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch(weights):
    qw = weights["w4g32"]
    with pytest.raises(ValueError, match="cuda"):
        ops.linear(_x((3,), torch.float16).cuda(), qw)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(_x((3,), torch.float16), qw, torch.zeros(N, device="cuda"))


# ---------------------------------------------------------------------------
# Backend selector
# ---------------------------------------------------------------------------

def test_available_backends_lists_all_with_reasons():
    info = vlmkern.available_backends()
    assert set(info) == {"cuda", "triton", "torch"}
    for name, entry in info.items():
        assert set(entry) >= {"available", "reason", "kernels"}
        assert isinstance(entry["available"], bool)
        assert isinstance(entry["reason"], str) and entry["reason"]
    torch_b = info["torch"]
    assert torch_b["available"] is True
    assert {"torch.weight_only", "torch.int_act", "torch.binary"} <= set(torch_b["kernels"])
    assert torch_b["opt_in"] == []
    assert set(info["cuda"]["opt_in"]) == {"cuda.int_act_wgmma",
                                           "cuda.weight_only_wgmma",
                                           "cuda.dequant_layout_cublas", "cuda.binary_lut_staged",
                                           "cuda.binary_dequant_cublas", "cuda.binary_lut_dequant_cublas",
                                           "cuda.int_act_staged",
                                           "cuda.weight_only_post_scale_m64", "cuda.int_act_tma",
                                           "cuda.weight_only_tma", "cuda.binary_lut_tma",
                                           "cuda.weight_only_tma_decode",
                                           "cuda.binary_lut_tma_decode",
                                           "cuda.weight_only_post_scale_acq_rel",
                                           "cuda.weight_only_post_scale_3cta"}
    assert set(info["cuda"]["opt_in"]) <= set(info["cuda"]["kernels"])
    if not torch.cuda.is_available():
        assert info["cuda"]["available"] is False
        assert "cuda" in info["cuda"]["reason"].lower()
        if os.environ.get("TRITON_INTERPRET") != "1":
            assert info["triton"]["available"] is False
            assert info["triton"]["reason"] != "available"


@pytest.mark.parametrize("value", ("torch", "TORCH", " torch ", "auto", ""))
def test_forced_torch_backend_runs(weights, monkeypatch, value):
    qw = weights["w4g32"]
    x = _x((3,), torch.float32)
    expected = ops.linear(x, qw)
    monkeypatch.setenv("VLMKERN_BACKEND", value)
    assert torch.equal(ops.linear(x, qw), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_forced_cuda_backend_raises(weights, monkeypatch):
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    x = _x((3,), torch.float16)
    with pytest.raises(BackendError, match="cuda"):
        ops.linear(x, weights["w4g32"])
    assert "cuda" in ops.which_kernel(x, weights["w4g32"])


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="checks the CPU-only behaviour")
def test_forced_triton_backend_raises_without_gpu(weights, monkeypatch):
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    with pytest.raises(BackendError, match="triton"):
        ops.linear(_x((3,), torch.float16), weights["w4g32"])


@pytest.mark.parametrize("value", ("cudaa", "tensorrt", "1"))
def test_unknown_backend_raises(weights, monkeypatch, value):
    monkeypatch.setenv("VLMKERN_BACKEND", value)
    with pytest.raises(BackendError, match="VLMKERN_BACKEND"):
        ops.linear(_x((3,), torch.float32), weights["w4g32"])


def test_unknown_enabled_kernel_raises(weights, monkeypatch):
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.int_act_wgma")
    with pytest.raises(BackendError, match=r"unknown kernels \['cuda.int_act_wgma'\].*"
                                           r"cuda.int_act_wgmma"):
        ops.linear(_x((3,), torch.float32), weights["w4g32"])
    monkeypatch.setenv("VLMKERN_ENABLE", " cuda.int_act_wgmma ,")
    ops.linear(_x((3,), torch.float32), weights["w4g32"])     # known: runs (on torch here)


def test_kernel_names_of_a_backend_not_yet_probed_are_known(tmp_path):
    # Triton registers its kernels when its backend is first probed: a fresh
    # process naming one in VLMKERN_ENABLE / VLMKERN_DISABLE before any call
    # probed it must not be told the name is unknown.
    script = (
        "import torch, vlmkern\n"
        "w = vlmkern.quantize_weight(torch.randn(32, 64), vlmkern.IntActConfig(8, 8))\n"
        "y = vlmkern.ops.linear(torch.randn(3, 64), w)\n"
        "print('ran', tuple(y.shape))\n")
    for env in ({"VLMKERN_ENABLE": "triton.int_act_tma", "TRITON_INTERPRET": "1",
                 "VLMKERN_BACKEND": "triton"},
                {"VLMKERN_DISABLE": "triton.int_act", "TRITON_INTERPRET": "1"}):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=300, check=False)
        assert proc.returncode == 0 and "ran (3, 32)" in proc.stdout, (env, proc.stderr[-2000:])
    # where Triton cannot run, names under its prefix cannot be checked and
    # pass (one environment serves every machine); other unknown names do not
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    for name, ok in (("triton.int_act", True), ("triton.int_act_tma", True),
                     ("tritn.int_act", False)):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**env, "VLMKERN_DISABLE": name}, timeout=300, check=False)
        if ok:
            assert proc.returncode == 0 and "ran (3, 32)" in proc.stdout, proc.stderr[-2000:]
        else:
            assert proc.returncode != 0 and f"unknown kernels ['{name}']" in proc.stderr


def test_disabled_kernels_are_never_selected(weights, monkeypatch):
    x = _x((3,), torch.float32)
    monkeypatch.setenv("VLMKERN_DISABLE", "torch.binary")
    assert ops.which_kernel(x, weights["w4g32"]) == "torch.weight_only"
    with pytest.raises(BackendError, match="torch.binary: turned off by VLMKERN_DISABLE"):
        ops.linear(x, weights["binary"])
    monkeypatch.setenv("VLMKERN_DISABLE", "torch.binry")
    with pytest.raises(BackendError, match=r"VLMKERN_DISABLE names unknown kernels "
                                           r"\['torch.binry'\]"):
        ops.linear(x, weights["w4g32"])


def test_backend_error_is_a_runtime_error():
    assert issubclass(BackendError, RuntimeError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="names the CPU kernels")
@pytest.mark.parametrize("fmt,kernel", [("w4g32", "torch.weight_only"),
                                        ("w4g64perm", "torch.weight_only"),
                                        ("binary", "torch.binary"), ("w8a8", "torch.int_act")])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_which_kernel_on_cpu(weights, fmt, kernel, dtype):
    assert ops.which_kernel(_x((3,), dtype), weights[fmt]) == kernel


@pytest.mark.parametrize("fmt", ["w4g32", "binary", "w8a8"])
def test_which_kernel_for_an_empty_batch_says_nothing_runs(weights, fmt):
    x = _x((3,), torch.float32)[:0]
    assert ops.linear(x, weights[fmt]).shape == (0, weights[fmt].out_features)
    assert ops.which_kernel(x, weights[fmt]).startswith("none: nothing to compute")


def test_quantized_layers_trace_whole_under_torch_compile(monkeypatch):
    # The dispatch (validation, selection, the layer's cached weight) must not
    # break a torch.compile graph. The finite check is a data-dependent branch
    # that only CPU tensors take by default (on a GPU it is opt-in), so it is
    # switched off here as it is on a GPU.
    from vlmkern import ops
    from vlmkern.nn import QuantLinear
    monkeypatch.setattr(ops, "_check_finite_enabled", lambda x: False)
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        QuantLinear.from_linear(torch.nn.Linear(128, 96), QuantConfig(4, 32)),
        QuantLinear.from_linear(torch.nn.Linear(96, 64), IntActConfig(8, 8)),
        QuantLinear.from_linear(torch.nn.Linear(64, 32), BinaryConfig(block_size=32, max_salient=4)),
        QuantLinear.from_linear(torch.nn.Linear(32, 16), QuantConfig(3, 16)).to_kernel_layout())
    compiled = torch.compile(layers, fullgraph=True)
    for m in (3, 5):
        x = torch.randn(m, 128)
        torch.testing.assert_close(compiled(x), layers(x), rtol=1e-5, atol=1e-5)


def test_layout_cache_rebuilds_after_an_in_place_change_and_forgets_dead_weights():
    import gc

    from vlmkern.ops.cuda_common import LayoutCache
    cache, made = LayoutCache(), []
    qw = vlmkern.quantize_weight(torch.randn(8, 64), QuantConfig(4, 32))

    def make():
        made.append(1)
        return len(made)
    assert cache.get(qw, "fp16", make) == 1 and cache.get(qw, "fp16", make) == 1
    assert cache.get(qw, "bf16", make) == 2                 # another key, another layout
    qw.scales.mul_(2)                                       # load_state_dict-style update
    assert cache.get(qw, "fp16", make) == 3
    del qw
    gc.collect()
    assert len(cache._layouts) == 0


def test_layout_cache_takes_inference_mode_weights_and_forgets_on_request():
    from vlmkern.ops.cuda_common import LayoutCache
    cache, made = LayoutCache(), []

    def make():
        made.append(1)
        return len(made)
    with torch.inference_mode():     # e.g. a model loaded or moved under inference mode
        qw = vlmkern.quantize_weight(torch.randn(8, 64), QuantConfig(4, 32))
    assert qw.qweight.is_inference()
    assert cache.get(qw, "fp16", make) == 1 and cache.get(qw, "fp16", make) == 1
    other = vlmkern.quantize_weight(torch.randn(8, 64), QuantConfig(4, 32))
    assert cache.get(other, "fp16", make) == 2
    other.scales.data.mul_(2)        # not recorded by the version counter ...
    assert cache.get(other, "fp16", make) == 2
    vlmkern.ops.forget_layouts()     # ... so the user drops the layouts
    assert cache.get(other, "fp16", make) == 3 and cache.get(qw, "fp16", make) == 4


def test_a_choice_is_remembered_per_weight_call_shape_environment_and_registry(monkeypatch):
    import gc
    import weakref

    from vlmkern.ops import backends, builtin  # noqa: F401  (builtin registers the backends)
    walks = []
    real = backends._select
    monkeypatch.setattr(backends, "_select", lambda *a: walks.append(1) or real(*a))
    monkeypatch.setattr(backends, "_CHOSEN", weakref.WeakKeyDictionary())
    qw = vlmkern.quantize_weight(torch.randn(8, 64), QuantConfig(4, 32))
    x = torch.randn(3, 64)

    def pick(x=x, w=qw):
        return backends.select("weight_only", x, w).name
    assert pick() == pick() == "torch.weight_only" and len(walks) == 1
    pick(torch.randn(4, 64))                                  # another M
    pick(x.double())                                          # another dtype
    assert len(walks) == 3
    monkeypatch.setenv("VLMKERN_DISABLE", "torch.weight_only")  # the environment counts
    with pytest.raises(BackendError, match="turned off"):
        pick()
    with pytest.raises(BackendError, match="turned off"):     # errors are not remembered
        pick()
    assert len(walks) == 5
    monkeypatch.delenv("VLMKERN_DISABLE")
    assert pick() == "torch.weight_only" and len(walks) == 5  # the first choice again
    torch_backend = backends.BACKENDS["torch"]
    monkeypatch.setattr(torch_backend, "_status", None)       # a backend reset: walk again
    pick()
    assert len(walks) == 6
    first = backends.KernelSpec("torch.first", "weight_only", lambda x, w, b: None)
    monkeypatch.setattr(torch_backend, "kernels", list(torch_backend.kernels))
    torch_backend.register(first, first=True)                 # a kernel registered ahead
    assert pick() == "torch.first" and len(walks) == 7
    other = vlmkern.quantize_weight(torch.randn(8, 64), QuantConfig(4, 32))
    pick(w=other)
    assert len(walks) == 8 and len(backends._CHOSEN) == 2
    del other
    gc.collect()
    assert len(backends._CHOSEN) == 1                         # a dead weight is forgotten


def test_a_gpu_call_that_falls_back_to_the_reference_warns_once(monkeypatch):
    import dataclasses
    import warnings

    from vlmkern.ops import backends, builtin  # noqa: F401  (builtin registers the backends)
    torch_backend = backends.BACKENDS["torch"]
    # "meta" stands in for a GPU the other backends cannot serve here
    monkeypatch.setattr(torch_backend, "kernels", [
        dataclasses.replace(k, devices=k.devices | {"meta"}) for k in torch_backend.kernels])
    monkeypatch.setattr(backends, "_WARNED_FALLBACK", set())
    qw = vlmkern.quantize_weight(torch.randn(8, 64), QuantConfig(4, 32))
    with pytest.warns(RuntimeWarning, match=r"runs on the torch reference") as caught:
        backends._select("weight_only", torch.empty(3, 64, device="meta"), qw)
    # every faster backend's reason (a backend that cannot run here, or each of its kernels)
    lines = str(caught[0].message).split("\n  ")[1:]
    assert any(x.startswith("cuda") for x in lines) and any(x.startswith("triton") for x in lines)
    assert not any("opt-in only" in x for x in lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends._select("weight_only", torch.empty(5, 64, device="meta"), qw)   # said once
        backends._select("weight_only", torch.randn(3, 64), qw)       # the CPU's own backend
        monkeypatch.setattr(backends, "_WARNED_FALLBACK", set())
        monkeypatch.setenv("VLMKERN_BACKEND", "torch")                 # asked for
        backends._select("weight_only", torch.empty(3, 64, device="meta"), qw)


@pytest.mark.parametrize("value", [None, "", "cuda.weight_only_tma", "é,ü ünïcode"])
def test_getenv_reads_what_os_environ_holds(monkeypatch, value):
    from vlmkern.ops.backends import getenv
    name = "VLMKERN_TEST_GETENV"
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert getenv(name) == os.environ.get(name) == value
    monkeypatch.setenv(name, "changed")                      # read again on every call
    assert getenv(name) == "changed"
    monkeypatch.delenv(name)
    assert getenv(name) is None
    # an os.environ without CPython's backing dict: the public lookup
    monkeypatch.setattr(os, "environ", {name: "plain"})
    assert getenv(name) == "plain" and getenv(name + "_UNSET") is None


def test_check_finite_takes_one_or_zero(weights, monkeypatch):
    x = _x((3,), torch.float32)
    for value in ("1", "0", ""):
        monkeypatch.setenv("VLMKERN_CHECK_FINITE", value)
        ops.linear(x, weights["w4g32"])
    monkeypatch.setenv("VLMKERN_CHECK_FINITE", "yes")
    with pytest.raises(BackendError, match="VLMKERN_CHECK_FINITE must be 1"):
        ops.linear(x, weights["w4g32"])
