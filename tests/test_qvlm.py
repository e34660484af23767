"""Q-VLM: the entropy proxy and dependency on hand-checkable inputs, the block
partition rule, executable activation quantizers (16-bit fake quant is the
identity, the integer kernel equals fake quant), the block search, and end to
end runs on tiny LLaVA and Qwen2-VL models."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from vlmkern.formats import IntActWeight
from vlmkern.ops.reference import fake_quant_int_act, int_act_matmul
from vlmkern.quant.entropy import (conditional_entropy, joint_distribution, layer_dependency,
                                   level_distribution, partition_blocks, quantized_entropy,
                                   soft_assignment, span_dependency, symmetric_levels)

LOG2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# Entropy proxy (eq. 5) and dependency (eqs. 4, 6)
# ---------------------------------------------------------------------------

def test_levels_and_soft_assignment_by_hand():
    levels, delta = symmetric_levels(2, 1.0)
    assert levels.tolist() == [-1.0, 0.0, 1.0] and delta == 1.0
    levels4, delta4 = symmetric_levels(4, 3.5)
    assert delta4 == 0.5 and levels4.numel() == 15 and levels4[-1] == 3.5
    p = soft_assignment(torch.tensor([0.0, 0.5]), levels, temperature=1.0)
    e = math.exp
    row0 = torch.tensor([e(-1), 1.0, e(-1)], dtype=torch.float64) / (1 + 2 * e(-1))
    row1 = torch.tensor([e(-2.25), e(-0.25), e(-0.25)], dtype=torch.float64)
    assert torch.allclose(p[0], row0, atol=1e-15)
    assert torch.allclose(p[1], row1 / row1.sum(), atol=1e-15)
    # far outside the grid: all mass on the nearest level, no 0/0
    far = soft_assignment(torch.tensor([1e4]), levels, temperature=1e-3)
    assert far[0].tolist() == [0.0, 0.0, 1.0]


def test_entropy_with_the_papers_temperature():
    # T = Delta = 100: neighbours get exp(-100) of the weight -> hard rounding
    x = torch.tensor([-100.0, 100.0, -100.0, 100.0])
    assert quantized_entropy(x, bits=2) == pytest.approx(LOG2, abs=1e-12)
    assert quantized_entropy(torch.full((6,), 100.0), bits=2) == pytest.approx(0.0, abs=1e-12)
    # exactly between two levels: half to each
    assert quantized_entropy(torch.full((5,), 50.0), bits=2, clip=100.0) == \
        pytest.approx(LOG2, abs=1e-12)
    # T = Delta = 0.01 on a grid of step 0.01: the assignment is soft, by hand
    x = torch.tensor([0.0])
    p = level_distribution(x, bits=2, clip=0.01)
    w = torch.tensor([math.exp(-0.01), 1.0, math.exp(-0.01)], dtype=torch.float64)
    assert torch.allclose(p, w / w.sum(), atol=1e-15)
    assert quantized_entropy(x, 2, clip=0.01) == pytest.approx(
        float(-(p * p.log()).sum()), rel=1e-12)
    # an all-zero tensor sits on level 0
    assert quantized_entropy(torch.zeros(7), bits=4) == 0.0


def test_conditional_entropy_by_hand():
    assert conditional_entropy(torch.full((2, 2), 0.25)) == pytest.approx(LOG2, abs=1e-12)
    assert conditional_entropy(torch.eye(2) / 2) == pytest.approx(0.0, abs=1e-12)
    # H(A,B) = 1.5 log 2, H(A) = log 2
    j = torch.tensor([[0.5, 0.0], [0.25, 0.25]])
    assert conditional_entropy(j) == pytest.approx(0.5 * LOG2, abs=1e-12)
    with pytest.raises(ValueError, match="probability"):
        conditional_entropy(torch.tensor([[0.5, 0.6], [0.0, 0.0]]))


def test_layer_dependency_deterministic_independent_and_soft():
    a = torch.tensor([-100.0, -100.0, 100.0, 100.0])
    b = torch.tensor([-100.0, 100.0, -100.0, 100.0])
    assert layer_dependency(a, a, bits=2) == pytest.approx(0.0, abs=1e-12)
    assert layer_dependency(a, -a, bits=2) == pytest.approx(0.0, abs=1e-12)   # a function of a
    assert layer_dependency(a, b, bits=2) == pytest.approx(LOG2, abs=1e-12)   # independent
    # one soft pair: P(a, b) = p_a p_b^T, so H(B|A) = H(p_b), computed by hand
    j = joint_distribution(torch.tensor([0.0]), torch.tensor([0.5]), 2, clip_a=1.0, clip_b=1.0)
    pb = torch.tensor([math.exp(-2.25), math.exp(-0.25), math.exp(-0.25)], dtype=torch.float64)
    pb = pb / pb.sum()
    assert float(j.sum()) == pytest.approx(1.0, abs=1e-15)
    assert layer_dependency(torch.tensor([0.0]), torch.tensor([0.5]), 2, 1.0, 1.0) == \
        pytest.approx(float(-(pb * pb.log()).sum()), abs=1e-12)
    # the scale-free temperature depends on x / Delta only
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(300, generator=gen, dtype=torch.float64) for _ in range(2))
    d1 = layer_dependency(x, 0.5 * x + y, 4, temperature="delta2")
    d2 = layer_dependency(1024 * x, 1024 * (0.5 * x + y), 4, temperature="delta2")
    assert d1 == pytest.approx(d2, rel=1e-12)
    # ... while the paper's T = Delta does not: it is sharper on the larger scale
    assert layer_dependency(1024 * x, 1024 * (0.5 * x + y), 4) < layer_dependency(
        x, 0.5 * x + y, 4)


def test_entropy_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        quantized_entropy(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="pair"):
        layer_dependency(torch.ones(3), torch.ones(4), 4)
    with pytest.raises(ValueError, match="bits"):
        quantized_entropy(torch.ones(3), 9)
    with pytest.raises(ValueError, match="empty"):
        quantized_entropy(torch.ones(0), 4)
    with pytest.raises(ValueError, match="temperature"):
        layer_dependency(torch.ones(3), torch.ones(3), 4, temperature="kelvin")


# ---------------------------------------------------------------------------
# Block partition (eq. 7)
# ---------------------------------------------------------------------------

PROFILE = [0.5, 3.0, 0.1, 0.1, 2.5, 0.4, 9.0, 9.0, 9.0]      # D(k, k+1), 10 layers


def test_span_dependency_sums_consecutive_pairs():
    assert span_dependency(PROFILE, 1, 3) == pytest.approx(3.1)
    assert span_dependency(PROFILE, 4, 4) == 0.0
    with pytest.raises(ValueError):
        span_dependency(PROFILE, 3, 10)


def test_partition_known_answers_and_depth_cap():
    assert partition_blocks(PROFILE, h0=1.0, max_depth=3) == [(0, 0), (1, 3), (4, 6), (7, 9)]
    assert partition_blocks(PROFILE, h0=1.0, max_depth=5) == [(0, 0), (1, 5), (6, 9)]
    assert partition_blocks(PROFILE, h0=1.0, max_depth=1) == [(k, k) for k in range(10)]
    # default h0: the mean pair dependency (33.6 / 9)
    assert partition_blocks(PROFILE, max_depth=3) == \
        [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 8), (9, 9)]
    # blocks grow while the condition holds: a weak first pair closes the block
    # even though the longer span's average would pass
    assert partition_blocks([0.5, 5.0], h0=1.0, max_depth=3) == [(0, 0), (1, 2)]
    for depth in (1, 2, 3, 4):
        blocks = partition_blocks(PROFILE, 0.0, depth)
        assert blocks[0][0] == 0 and blocks[-1][1] == 9
        assert all(b[0] == a[1] + 1 for a, b in zip(blocks, blocks[1:]))
        assert all(e - s + 1 <= depth for s, e in blocks)
    assert partition_blocks([], max_depth=3) == [(0, 0)]
    with pytest.raises(ValueError):
        partition_blocks(PROFILE, 1.0, max_depth=0)
    with pytest.raises(ValueError):
        partition_blocks([1.0, float("inf")], 1.0)


# ---------------------------------------------------------------------------
# Executable activation quantizers (ALGORITHMS check 12)
# ---------------------------------------------------------------------------

def _outlier_acts(gen, m=37, k=70):
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    x[:, 5] *= 30
    x[3] *= 50
    return x


def test_fake_quant_at_16_bits_is_identity():
    from vlmkern.calib.qvlm import fake_quant_activations

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 70, generator=gen) * 3
    for scale in (None, float(x.abs().max()) / 32767):
        y = fake_quant_activations(x, 16, scale)
        assert y.dtype == x.dtype
        assert float((y - x).norm() / x.norm()) < 1e-4
    # ... and 4 bits is not
    assert float((fake_quant_activations(x, 4) - x).norm() / x.norm()) > 1e-2
    # with a 4500:1 dynamic range, every element is still within half a step
    x = _outlier_acts(gen).float()
    token_step = x.abs().amax(dim=1, keepdim=True) / 32767
    assert bool(((fake_quant_activations(x, 16) - x).abs() <= token_step * 0.5001).all())
    step = float(x.abs().max()) / 32767
    assert float((fake_quant_activations(x, 16, step) - x).abs().max()) <= step * 0.5001


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a GPU")])])
def test_fake_quant_matches_the_reference_activation_quantizer(device):
    # on CUDA, a division by a Python number is a multiplication by its
    # reciprocal: both must divide by a tensor to give the same scales
    from vlmkern.calib.qvlm import fake_quant_activations
    from vlmkern.ops.reference import quantize_activations

    x = _outlier_acts(torch.Generator().manual_seed(1)).to(device)
    for bits in (4, 6, 8):
        for scale in (None, 0.37):
            q, s = quantize_activations(x, bits, scale)
            assert torch.equal(fake_quant_activations(x, bits, scale),
                               q.double() * s.double()[:, None])


def test_search_fake_quant_agrees_with_the_exact_one():
    from vlmkern.calib.qvlm import fake_quant_activations, search_fake_quant

    x = _outlier_acts(torch.Generator().manual_seed(2)).float()
    for bits in (4, 8):
        for scale in (None, 0.37, float(x.abs().max()) / 7):
            exact = fake_quant_activations(x, bits, scale)
            fast = search_fake_quant(x, bits, scale)
            assert torch.allclose(fast, exact, rtol=1e-6, atol=1e-6)


def test_percentiles_are_nearest_rank():
    from vlmkern.calib.qvlm import percentile_values

    gen = torch.Generator().manual_seed(3)
    # ties around every rank: values drawn from few levels
    for values in (torch.randint(0, 7, (1001,), generator=gen).float(),
                   torch.rand(4000, generator=gen), torch.tensor([2.0])):
        ps = (1.0, 0.995, 0.99, 0.985, 0.98, 0.5, 0.001)
        got = percentile_values(values, ps)
        ref = values.sort().values
        n = values.numel()
        for p in ps:
            assert got[p] == float(ref[max(1, math.ceil(p * n - 1e-9)) - 1])
    assert percentile_values(torch.arange(1.0, 201.0), (0.98, 1.0)) == {0.98: 196.0, 1.0: 200.0}


@pytest.mark.parametrize("bits, group", [(4, None), (6, 32), (8, 16)])
def test_integer_kernel_equals_fake_quant_exactly(bits, group):
    from vlmkern.calib.qvlm import fake_quant_activations
    import vlmkern

    gen = torch.Generator().manual_seed(bits)
    n, k = 9, 70
    lim = (1 << (bits - 1)) - 1
    codes = torch.randint(-lim, lim + 1, (n, k), generator=gen)
    groups = 1 if group is None else -(-k // group)
    # power-of-two scales: every product and partial sum is exact in fp64
    scales = (2.0 ** -torch.randint(2, 6, (n, groups), generator=gen)).half()
    w = IntActWeight.from_codes(codes, scales, bits, bits, group, act_scale=2.0 ** -3)
    x = _outlier_acts(gen, k=k) * 0.05
    fake = fake_quant_activations(x, bits, w.act_scale) @ w.dequantize(torch.float64).T
    assert torch.equal(int_act_matmul(x, w), fake)
    assert torch.equal(vlmkern.ops.linear(x, w), fake)
    # per-token scales are not powers of two: equal to fp64 rounding
    w_tok = IntActWeight.from_codes(codes, scales, bits, bits, group)
    fake_tok = fake_quant_activations(x, bits) @ w_tok.dequantize(torch.float64).T
    assert torch.allclose(int_act_matmul(x, w_tok), fake_tok, rtol=1e-13, atol=1e-13)
    assert torch.equal(fake_quant_int_act(x, w_tok), fake_tok)


# ---------------------------------------------------------------------------
# The driver on tiny VLMs
# ---------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from tiny_models import build_llava, build_qwen2vl  # noqa: E402
from tiny_models import second_sample as _second_sample, logits as _logits  # noqa: E402

from vlmkern.calib.qvlm import QVLMConfig, qvlm_quantize  # noqa: E402

BUILDERS = {"llava": build_llava, "qwen2vl": build_qwen2vl}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_end_to_end_on_tiny_vlms(kind):
    from torch import nn

    from vlmkern import IntActLinear

    model, inputs = BUILDERS[kind]()
    samples = [inputs, _second_sample(inputs)]
    ref = _logits(model, inputs)
    errs = {}
    for bits in (8, 4):
        cfg = QVLMConfig(bits, bits, max_depth=2, h0=0.0)
        q, report = qvlm_quantize(copy.deepcopy(model), samples, cfg, progress=False)
        out = _logits(q, inputs)
        assert torch.isfinite(out).all()
        errs[bits] = float((out - ref).norm() / ref.norm())
        quantized = {n: m for n, m in q.named_modules() if isinstance(m, IntActLinear)}
        assert len(quantized) == 14 == len(report.modules)
        for name, m in quantized.items():
            w = m.quantized_weight
            assert (w.w_bits, w.a_bits) == (bits, bits)
            assert m.quant_info["method"] == "qvlm"
            layer = int(name.split(".layers.")[1].split(".")[0])
            static = report.choices[layer].startswith("static")
            assert (w.act_scale is not None) == static
        assert isinstance(q.lm_head, nn.Linear)
        assert not any(isinstance(m, IntActLinear) for n, m in q.named_modules()
                       if "vision" in n or "visual" in n or "projector" in n)
        # h0 = 0 and every dependency positive: one block of max_depth layers
        assert report.blocks == [(0, 1)]
        assert len(report.layer_entropy) == 2 and len(report.pair_dependency) == 1
        assert report.pair_dependency[0] > 0 and report.layer_entropy[0] > 0
        assert "blocks" in str(report)
    assert errs[8] < 0.05 and errs[8] < errs[4]


def test_search_takes_the_best_candidate_for_a_one_layer_block():
    model, inputs = build_llava()
    samples = [inputs]
    base = dict(w_bits=4, a_bits=4, max_depth=1)
    full = qvlm_quantize(copy.deepcopy(model), samples, QVLMConfig(**base),
                         progress=False)[1]
    singles = {"token": QVLMConfig(**base, percentiles=())}
    for p in QVLMConfig().percentiles:
        singles[f"static p={p:g}"] = QVLMConfig(**base, percentiles=(p,), token_candidate=False)
    errors = {label: qvlm_quantize(copy.deepcopy(model), samples, cfg,
                                   progress=False)[1].block_errors[0]
              for label, cfg in singles.items()}
    best = min(errors, key=errors.get)
    assert full.choices[0] == best
    assert full.block_errors[0] == pytest.approx(errors[best], rel=1e-12)
    assert len(set(round(e, 12) for e in errors.values())) > 1    # the choice mattered


# How closely the reported search error matches the installed layers'
# error: in fp32 only the summation order differs; a bf16 model rounds the
# block output to bf16 either way, and an fp32 sum that differs in its last
# bits can round to the neighbouring bf16 value.
REPORT_REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("granularity, objective, dtype, bits", [
    ("layer", "mse", torch.float32, 4), ("quantizer", "mse", torch.float32, 4),
    ("layer", "token", torch.float32, 4), ("layer", "mse", torch.bfloat16, 8)])
def test_report_matches_the_model_built(granularity, objective, dtype, bits):
    """The block error the search reports is the error of the quantized
    layers actually installed (run through the integer-activation op), also
    in a bf16 model, where the search must compute as the kernels do."""
    from vlmkern.calib.arch import decoder_layers
    from vlmkern.calib.engine import _layer_out, capture_inputs

    model, inputs = build_qwen2vl()
    model.to(dtype)
    inputs = dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))
    from vlmkern.calib.qvlm import block_error

    cfg = QVLMConfig(bits, bits, max_depth=1, granularity=granularity, objective=objective)
    q, report = qvlm_quantize(copy.deepcopy(model), [inputs], cfg, progress=False)
    (h, kw), = capture_inputs(q, decoder_layers(q)[1], [inputs], "cpu")
    with torch.no_grad():
        out = _layer_out(decoder_layers(q)[1][0], h, kw).double()
        ref = _layer_out(decoder_layers(model)[1][0], h, kw).double()
    err = block_error([out], [ref], objective)
    assert err == pytest.approx(report.block_errors[0], rel=REPORT_REL[dtype])
    for name, m in q.named_modules():
        if hasattr(m, "quant_info") and m.quant_info.get("method") == "qvlm":
            static = m.quant_info["qvlm"]["activation"].startswith("static")
            assert (m.quantized_weight.act_scale is not None) == static
    # per-quantizer search: at least as good as keeping every quantizer per token
    token = qvlm_quantize(copy.deepcopy(model), [inputs],
                          QVLMConfig(bits, bits, max_depth=1, percentiles=(), objective=objective),
                          progress=False)[1]
    assert report.block_errors[0] <= token.block_errors[0] * (1 + 1e-12)


def test_block_error_objectives_by_hand():
    from vlmkern.calib.qvlm import block_error

    ref = [torch.tensor([[100.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    out = [torch.tensor([[101.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    # squared errors 1 + 1 + 0 over squared norms 10000 + 1 + 4
    assert block_error(out, ref, "mse") == pytest.approx(2 / 10005, rel=1e-12)
    # per token: 1e-4, 1, 0 -> mean
    assert block_error(out, ref, "token") == pytest.approx((1e-4 + 1 + 0) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="objective"):
        block_error(out, ref, "l1")


def test_token_only_search_is_per_token_rtn():
    from vlmkern import IntActConfig, replace_linears

    model, inputs = build_qwen2vl()
    q, report = qvlm_quantize(copy.deepcopy(model), [inputs],
                              QVLMConfig(6, 6, percentiles=()), progress=False)
    rtn, _ = replace_linears(copy.deepcopy(model), IntActConfig(6, 6), progress=False)
    assert report.choices == ["token", "token"]
    assert torch.equal(_logits(q, inputs), _logits(rtn, inputs))


def test_reported_layer_entropy_uses_the_configured_temperature():
    # T = Delta^2 is below T = Delta for these small activations (Delta < 1):
    # a sharper soft assignment, so a lower entropy in every layer
    model, inputs = build_qwen2vl()
    reports = {t: qvlm_quantize(copy.deepcopy(model), [inputs],
                                QVLMConfig(6, 6, percentiles=(), temperature=t),
                                progress=False)[1] for t in ("delta", "delta2")}
    assert len(reports["delta"].layer_entropy) == 2
    assert all(a < b for a, b in zip(reports["delta2"].layer_entropy,
                                     reports["delta"].layer_entropy))


def test_quantized_model_runs_the_integer_kernel_as_fake_quant():
    """Check 12 at model level: every IntActLinear's output (vlmkern.ops.linear)
    equals fake-quant activations times dequantized weights."""
    from vlmkern import IntActLinear
    from vlmkern.calib.qvlm import fake_quant_activations

    model, inputs = build_llava()
    q, report = qvlm_quantize(copy.deepcopy(model), [inputs],
                              QVLMConfig(4, 4, group_size=32, percentiles=(0.99, 0.98),
                                         token_candidate=False), progress=False)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, (a[0], out)))
             for n, m in q.named_modules() if isinstance(m, IntActLinear)]
    _logits(q, inputs)
    for h in hooks:
        h.remove()
    assert len(seen) == 14
    for name, (x, out) in seen.items():
        w = q.get_submodule(name).quantized_weight
        assert w.act_scale is not None
        bias = q.get_submodule(name).bias
        fake = torch.nn.functional.linear(fake_quant_activations(x.double(), 4, w.act_scale),
                                          w.dequantize(torch.float64),
                                          None if bias is None else bias.double())
        assert torch.allclose(out.double(), fake, rtol=1e-6, atol=1e-7), name


def test_checkpoint_round_trip_keeps_static_scales(tmp_path):
    import vlmkern

    model, inputs = build_llava()
    q, _ = qvlm_quantize(copy.deepcopy(model), [inputs],
                         QVLMConfig(8, 8, token_candidate=False), progress=False)
    vlmkern.save_quantized(q, tmp_path / "ckpt")
    fresh, _ = build_llava()
    vlmkern.load_quantized(fresh, tmp_path / "ckpt")
    name = "model.language_model.layers.1.mlp.down_proj"
    assert fresh.get_submodule(name).quantized_weight.act_scale == \
        q.get_submodule(name).quantized_weight.act_scale
    assert torch.equal(_logits(fresh, inputs), _logits(q, inputs))
    # the checkpoint's plan names the method and the exact executable config
    from vlmkern.io import read_plan
    plan = read_plan(tmp_path / "ckpt")
    entry = plan.entries[name]
    assert entry.method == "qvlm" and (entry.format, entry.w_bits, entry.a_bits) == \
        ("intact", 8, 8)
    assert entry.config.act_scale == q.get_submodule(name).quantized_weight.act_scale
    assert len(plan.info["qvlm"]["choices"]) == 2


def test_config_and_input_errors():
    with pytest.raises(ValueError):
        QVLMConfig(5, 8)
    with pytest.raises(ValueError, match="percentiles"):
        QVLMConfig(percentiles=(1.0, 1.2))
    with pytest.raises(ValueError, match="no activation quantizer"):
        QVLMConfig(percentiles=(), token_candidate=False)
    with pytest.raises(ValueError, match="max_depth"):
        QVLMConfig(max_depth=0)
    with pytest.raises(ValueError, match="granularity"):
        QVLMConfig(granularity="token")
    with pytest.raises(ValueError, match="objective"):
        QVLMConfig(objective="kl")
    model, inputs = build_llava()
    with pytest.raises(ValueError, match="at least one"):
        qvlm_quantize(model, [], QVLMConfig())
    with pytest.raises(TypeError, match="QVLMConfig"):
        qvlm_quantize(model, [inputs], {"w_bits": 8})
    bad = dict(inputs)
    bad["pixel_values"] = inputs["pixel_values"].clone()
    bad["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        qvlm_quantize(copy.deepcopy(model), [bad], QVLMConfig(), progress=False)


# ---------------------------------------------------------------------------
# vlmkern quantize --method qvlm / --smooth
# ---------------------------------------------------------------------------

@pytest.fixture()
def llama_folder(tmp_path):
    import random

    from tiny_models import TEXT, build_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(TEXT["vocab_size"])},
                                     unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path)
    build_llama()[0].save_pretrained(tmp_path)
    rng = random.Random(1)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 100)}" for _ in range(600)))
    return tmp_path, text


@pytest.mark.parametrize("method, extra", [
    ("qvlm", ["--qvlm-max-depth", "2", "--qvlm-percentiles", "1,0.99", "--smooth", "0.5"]),
    ("qvlm", ["--qvlm-w-bits", "8", "--qvlm-no-token", "--qvlm-granularity", "quantizer",
              "--qvlm-objective", "token"]),
    ("rtn", ["--bits", "8", "--smooth", "0.5"])])
def test_cli_quantize_qvlm_and_smooth(llama_folder, tmp_path, capsys, method, extra):
    import vlmkern
    from vlmkern.cli import main

    folder, text = llama_folder
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(folder), "--method", method, "--act-bits", "4",
                 "--group-size", "row", "--calib-text", str(text), "--samples", "3",
                 "--seq-len", "32", "--device", "cpu", "--out", str(out), *extra])
    assert code == 0
    printed = capsys.readouterr().out
    assert "saved" in printed
    assert ("SmoothQuant alpha=0.5" in printed) == ("--smooth" in extra)
    if method == "qvlm":
        assert "blocks" in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    vlmkern.load_quantized(model, out)
    q = model.get_submodule("model.layers.1.mlp.down_proj")
    w = q.quantized_weight
    assert q.quant_info["method"] == method
    assert w.a_bits == 4 and w.w_bits == (8 if "--qvlm-w-bits" in extra or method == "rtn"
                                          else 4)
    if "--qvlm-no-token" in extra:
        assert w.act_scale is not None
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_cli_takes_zero_vision_epochs_as_its_help_says():
    from vlmkern.calib.cli import qvlm_vision_config
    from vlmkern.cli import build_parser

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "qvlm",
                                      "--act-bits", "8", "--qvlm-vision",
                                      "--qvlm-vision-epochs", "0"])
    assert qvlm_vision_config(args).epochs == 0


@pytest.mark.parametrize("args, message", [
    (["--method", "qvlm"], "needs --act-bits"),
    (["--method", "gptq", "--smooth", "0.5"], "integer-activation"),
    (["--method", "qvlm", "--act-bits", "8", "--qvlm-percentiles", "1,2"], "percentiles"),
    (["--method", "gptq", "--qvlm-vision"], "option of --method qvlm"),
    (["--method", "qvlm", "--act-bits", "8", "--qvlm-vision", "--qvlm-vision-epochs", "-1"],
     "epochs"),
    (["--method", "qvlm", "--act-bits", "8", "--qvlm-vision"], "no vision tower")])
def test_cli_rejects_bad_qvlm_options(llama_folder, args, message, capsys):
    from vlmkern.cli import main

    folder, text = llama_folder
    try:                                            # the command's error, or argparse's
        code = main(["quantize", "--model", str(folder), "--calib-text", str(text),
                     "--samples", "2", "--seq-len", "16", "--device", "cpu", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_padding_never_enters_the_qvlm_statistics_or_search():
    from tiny_models import padded_llama

    model, padded, separate = padded_llama()
    cfg = QVLMConfig(8, 6, max_depth=1, token_candidate=False)

    def scales(samples):
        q, report = qvlm_quantize(copy.deepcopy(model), samples, cfg, progress=False)
        return report, {n: m.quantized_weight.act_scale for n, m in q.named_modules()
                        if hasattr(m, "quant_info") and m.quant_info.get("method") == "qvlm"}

    rep_p, with_pads = scales([padded])
    rep_s, without = scales(separate)
    assert rep_p.search_tokens == rep_s.search_tokens == 14
    assert rep_p.choices == rep_s.choices
    for n in without:
        assert with_pads[n] == pytest.approx(without[n], rel=1e-5), n
    _, unmasked = scales([{"input_ids": padded["input_ids"]}])
    assert any(unmasked[n] != pytest.approx(without[n], rel=1e-3) for n in without)
