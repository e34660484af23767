"""LUQ: occupancy entropy on activations with known cluster structure, the
rank-stability choice of K (Kendall tau + Kneedle), n = 0 equal to uniform
GPTQ-4, the lowest-entropy layers binarized, the budget and threshold
searches, the paper's nominal bits, and a saved LUQ plan that reloads and
runs (ALGORITHMS.md check 11)."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import build_llama, build_llava  # noqa: E402

import vlmkern.calib.luq as luq  # noqa: E402
from vlmkern import (BiLLMConfig, BinaryConfig, BinaryLinear, GPTQConfig,  # noqa: E402
                     QuantConfig, WeightOnlyLinear, load_quantized, save_quantized)
from vlmkern.calib import quantize_model  # noqa: E402
from vlmkern.calib.luq import (BudgetError, LUQConfig, choose_k, entropy_order,  # noqa: E402
                               kendall_tau_distance, kmeans, kneedle, layer_entropies,
                               luq_quantize, min_n_within_budget, nominal_bits)
from vlmkern.io import read_plan  # noqa: E402

# Small searches so each calibration takes a fraction of a second.
CFG = LUQConfig(high=GPTQConfig(QuantConfig(4, 64)),
                low=BiLLMConfig(BinaryConfig(max_salient=8, quantiles=(0.3, 0.5, 0.7))),
                k=4, max_tokens=256)
LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    model, inputs = build_llama(num_hidden_layers=LAYERS)
    other = dict(inputs, input_ids=(inputs["input_ids"] + 11) % 97 + 3)
    return model, [inputs, other]


def _state(model):
    return dict(model.state_dict())


def _binarized_layers(model):
    return sorted({int(n.split(".")[2]) for n, m in model.named_modules()
                   if isinstance(m, BinaryLinear)})


def _entropy(p):
    return -sum(x * math.log(x) for x in p)


# ---------------------------------------------------------------------------
# Entropy, K-means, Kendall tau, Kneedle
# ---------------------------------------------------------------------------

def _blobs(shares, gen, n=2000, d=16):
    centers = torch.randn(len(shares), d, generator=gen) * 100
    return torch.cat([centers[i] + torch.randn(round(s * n), d, generator=gen)
                      for i, s in enumerate(shares)])


def test_entropy_of_layers_with_known_cluster_structure():
    # Four far-apart tight clusters per "layer", occupied unevenly: K-means at
    # K = 4 recovers them, so H is the entropy of the shares themselves.
    gen = torch.Generator().manual_seed(0)
    shares = [[0.25] * 4, [0.97, 0.01, 0.01, 0.01], [0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]
    acts = [_blobs(p, gen) for p in shares]
    h = layer_entropies(acts, 4)
    for got, p in zip(h, shares):
        assert got == pytest.approx(_entropy(p), abs=1e-9)
    assert entropy_order(h) == [1, 2, 3, 0]


def test_kmeans_is_deterministic_and_rejects_bad_input():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    a, _ = kmeans(x, 7, seed=3)
    b, _ = kmeans(x, 7, seed=3)
    assert torch.equal(a, b) and set(a.tolist()) == set(range(7))
    assert kmeans(x[:5], 50)[1].shape[0] == 5          # K capped at the number of tokens
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kmeans(bad, 3)
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.zeros(0, 4), 3)


def test_kendall_tau_distance():
    assert kendall_tau_distance([0, 1, 2, 3], [0, 1, 2, 3]) == 0.0
    assert kendall_tau_distance([0, 1, 2, 3], [3, 2, 1, 0]) == 1.0
    assert kendall_tau_distance([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="same items"):
        kendall_tau_distance([0, 1, 2], [0, 1, 3])


def test_kneedle_on_a_hand_checked_curve():
    # y = 1/x on 1..10: D = 1 - y_n - x_n is 0, .444, .519, .5, .444, .370, ...;
    # its maximum at x = 3 drops below .519 - 1/9 at x = 6: the knee is x = 3.
    x = list(range(1, 11))
    assert kneedle(x, [1 / v for v in x]) == 2
    assert kneedle(x, [5.0] * 10) is None                      # flat: no knee
    assert kneedle(x, [1 - (v / 10) ** 2 for v in x]) is None  # concave: no knee
    with pytest.raises(ValueError, match="increasing x"):
        kneedle([1, 1, 2], [3, 2, 1])


def test_choose_k_takes_the_knee_of_the_rank_stability_curve(monkeypatch):
    # Prescribed rankings of 5 layers at K = 2..12: 6, 1, 1, 0, 0 of the 10
    # pairs change order between successive K. Scaled, D = 1 - y - x is
    # 0, .583, .333, .25, 0: the maximum at K = 6 is followed by a drop below
    # .583 - .25 (at K = 10), so the knee is K = 6.
    orders = {2: [0, 1, 2, 3, 4], 4: [3, 2, 1, 0, 4], 6: [3, 2, 0, 1, 4],
              8: [3, 0, 2, 1, 4], 10: [3, 0, 2, 1, 4], 12: [3, 0, 2, 1, 4]}

    def fake(acts, k, iters, seed):
        h = [0.0] * 5
        for rank, layer in enumerate(orders[k]):
            h[layer] = float(rank)
        return h

    monkeypatch.setattr(luq, "layer_entropies", fake)
    sel = choose_k([None] * 5, grid=tuple(orders))
    assert sel.distances == pytest.approx([0.6, 0.1, 0.1, 0.0, 0.0])
    assert sel.knee_found and sel.k == 6
    assert entropy_order(sel.entropies[6]) == orders[6]


def test_nominal_bits_reproduce_the_paper():
    assert nominal_bits(16, 32) == pytest.approx(2.54, abs=1e-12)     # LLaVA-1.5, 16 of 32
    assert round(nominal_bits(12, 28), 2) == 2.75                     # Qwen2.5-VL, 12 of 28
    assert nominal_bits(0, 28) == 4.0 and nominal_bits(28, 28) == pytest.approx(1.08)


# ---------------------------------------------------------------------------
# The method end to end on a tiny model
# ---------------------------------------------------------------------------

def test_n_zero_is_uniform_gptq4_bitwise():
    model, samples = _model()
    ref, _ = quantize_model(copy.deepcopy(model), samples, CFG.high, progress=False)
    got, report = luq_quantize(copy.deepcopy(model), samples, CFG, n_low=0, progress=False)
    a, b = _state(ref), _state(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report.n_low == 0 and _binarized_layers(got) == []


def test_lowest_entropy_layers_are_binarized():
    model, samples = _model()
    q, report = luq_quantize(model, samples, CFG, n_low=2, progress=False)
    assert sorted(report.order) == list(range(LAYERS))
    assert [report.entropies[i] for i in report.order] == sorted(report.entropies)
    assert _binarized_layers(q) == sorted(report.order[:2])
    for i in report.order[2:]:
        assert isinstance(q.model.layers[i].mlp.down_proj, WeightOnlyLinear)
    stored = sum(m.quantized_weight.nbytes for m in q.modules() if hasattr(m, "quantized_weight"))
    assert stored == report.nbytes
    assert "billm" in str(report) and "nominal" in str(report)


def test_a_high_method_below_the_low_ones_bytes_still_takes_a_given_n():
    # GPTQ-2 stores fewer bytes than BiLLM: only the budget search needs the
    # low method to be the smaller one; the report's nominal bits use 2 bits
    model, samples = _model()
    cfg = dataclasses.replace(CFG, high=GPTQConfig(QuantConfig(2, 64)))
    entropies = [0.1, 0.2, 0.3, 0.4]
    q, report = luq_quantize(copy.deepcopy(model), samples, cfg, n_low=1, entropies=entropies,
                             progress=False)
    assert _binarized_layers(q) == [0]
    assert report.nominal_bits == pytest.approx(nominal_bits(1, LAYERS, high_bits=2))
    with pytest.raises(ValueError, match="stores more bytes"):
        luq_quantize(copy.deepcopy(model), samples, cfg, budget_bits=2.5, entropies=entropies,
                     progress=False)


def test_budget_search_hits_a_reachable_budget_exactly():
    model, samples = _model()
    entropies = [0.3, 0.1, 0.4, 0.2]           # order 1, 3, 0, 2
    high = luq.layer_bytes(model, CFG.high)
    low = luq.layer_bytes(model, CFG.low)
    sizes = [sum(low[i] if i in [1, 3, 0, 2][:n] else high[i] for i in range(LAYERS))
             for n in range(LAYERS + 1)]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    q, report = luq_quantize(copy.deepcopy(model), samples, CFG, budget_bytes=sizes[3],
                             entropies=entropies, progress=False)
    stored = sum(m.quantized_weight.nbytes for m in q.modules() if hasattr(m, "quantized_weight"))
    assert report.n_low == 3 and stored == report.nbytes == sizes[3]
    assert _binarized_layers(q) == [0, 1, 3]
    # between two reachable sizes: the most 4-bit layers that still fit
    assert min_n_within_budget(lambda n: sizes[n], LAYERS, sizes[2] - 1)[0] == 3
    assert min_n_within_budget(lambda n: sizes[n], LAYERS, sizes[0] + 10)[0] == 0
    # average physical bits per weight are converted to the same bytes
    n_weights = report.n_weights
    _, by_bits = luq_quantize(copy.deepcopy(model), samples, CFG, entropies=entropies,
                              budget_bits=8 * sizes[1] / n_weights, progress=False)
    assert by_bits.n_low == 1 and by_bits.nbytes == sizes[1]
    with pytest.raises(BudgetError, match="unreachable: even with all 4 layers binarized"):
        luq_quantize(copy.deepcopy(model), samples, CFG, budget_bytes=sizes[-1] - 1,
                     entropies=entropies, progress=False)


def test_budget_search_is_a_binary_search():
    sizes = [1000 - 10 * n for n in range(31)]
    for n in range(31):
        got, probes = min_n_within_budget(lambda m: sizes[m], 30, sizes[n])
        assert got == n and len(probes) <= 2 + math.ceil(math.log2(30))


def test_threshold_search_finds_the_largest_n_that_meets_it():
    model, samples = _model()
    entropies = [0.3, 0.1, 0.4, 0.2]

    def score(q):           # a stand-in for held-out accuracy: worse with every binary layer
        return -len(_binarized_layers(q))

    q, report = luq_quantize(model, samples, CFG, threshold=-2, score=score,
                             entropies=entropies, progress=False)
    assert report.n_low == 2 and _binarized_layers(q) == [1, 3]
    assert report.probes[2] == -2 and all(report.probes[n] == -n for n in report.probes)
    assert not any(isinstance(m, BinaryLinear) for m in model.modules())   # probes used copies
    _, kl = luq_quantize(copy.deepcopy(model), samples, CFG, threshold=3.5, entropies=entropies,
                         score=lambda q: float(len(_binarized_layers(q))),
                         higher_is_better=False, progress=False)
    assert kl.n_low == 3
    with pytest.raises(BudgetError, match="threshold is unreachable"):
        luq_quantize(copy.deepcopy(model), samples, CFG, threshold=1, score=score,
                     entropies=entropies, progress=False)


def test_saved_luq_plan_reloads_and_runs(tmp_path):
    model, inputs = build_llava()
    samples = [inputs, dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))]
    fresh = copy.deepcopy(model)
    q, report = luq_quantize(model, samples, CFG, n_low=1, progress=False)
    path = save_quantized(q, tmp_path)
    load_quantized(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, q(**inputs).logits)
    plan = read_plan(path)
    assert plan.info["method"] == "luq" and plan.info["n_low"] == 1
    assert plan.info["order"] == report.order
    assert plan.info["entropy"] == pytest.approx(report.entropies)
    methods = {n.split(".layers.")[1].split(".")[0]: e.method for n, e in plan.entries.items()}
    assert methods == {str(report.order[0]): "billm", str(report.order[1]): "gptq"}


def test_activations_cover_image_tokens_and_skip_padding():
    model, inputs = build_llava()
    n_tokens = inputs["input_ids"].numel()
    acts = luq.collect_layer_outputs(model, [inputs], max_tokens=10_000)
    assert len(acts) == 2 and acts[0].shape == (n_tokens, 64)
    padded = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    padded["attention_mask"][:, -2:] = 0
    assert luq.collect_layer_outputs(model, [padded])[0].shape[0] == n_tokens - 4
    a = luq.collect_layer_outputs(model, [inputs], max_tokens=9, seed=5)
    b = luq.collect_layer_outputs(model, [inputs], max_tokens=9, seed=5)
    assert a[1].shape[0] == 9 and torch.equal(a[1], b[1])


def test_bad_arguments():
    model, samples = _model()
    with pytest.raises(ValueError, match="exactly one"):
        luq_quantize(model, samples, CFG, n_low=1, budget_bytes=10)
    with pytest.raises(ValueError, match="score"):
        luq_quantize(model, samples, CFG, threshold=0.5)
    with pytest.raises(ValueError, match="4 finite numbers"):
        luq_quantize(model, samples, CFG, n_low=1, entropies=[0.1, float("nan"), 0, 0])
    with pytest.raises(ValueError, match="n_low must be in"):
        luq_quantize(model, samples, CFG, n_low=9, entropies=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="k_grid"):
        LUQConfig(k_grid=(8, 4, 16))
    with pytest.raises(ValueError, match="k must be"):
        LUQConfig(k=1)


# ---------------------------------------------------------------------------
# vlmkern quantize --method luq
# ---------------------------------------------------------------------------

from test_cli_quantize import hf_folder  # noqa: E402,F401


def test_quantize_command_runs_luq_to_a_budget_and_saves_the_plan(hf_folder, tmp_path, capsys):
    from vlmkern.cli import main
    folder, text = hf_folder
    base = ["quantize", "--model", str(folder), "--method", "luq", "--group-size", "32",
            "--calib-text", str(text), "--samples", "2", "--seq-len", "32", "--device", "cpu",
            "--luq-k", "4"]
    # 2 equal layers: a budget halfway between all-4-bit and all-binary binarizes one
    model, _ = build_llama()
    high = sum(luq.layer_bytes(model, GPTQConfig(QuantConfig(4, 32))))
    low = sum(luq.layer_bytes(model, BiLLMConfig()))
    budget = str((high + low) // 2)
    code = main(base + ["--budget-bytes", budget, "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "entropy" in printed and "1 of 2 layers binarized (budget" in printed
    plan = read_plan(tmp_path / "out")
    assert plan.info["method"] == "luq" and plan.info["n_low"] == 1
    assert sorted(e.method for e in plan.entries.values()).count("billm") == 7
    for extra, message in ((["--n-low", "1", "--budget-bits", "3"], "exactly one of"),
                           (["--budget-bits", "1.0"], "unreachable"),
                           (["--threshold", "0.5"], "needs --model minivlm")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
