"""One plan format: per-module plans in the calibration engine, bytes from
shapes, the plan recorded in checkpoints and reloaded, and rejection of
foreign or corrupt plan entries."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import build_llama, build_llava  # noqa: E402
from tiny_models import logits as _logits, second_sample as _second  # noqa: E402

import vlmkern.calib.engine as engine  # noqa: E402
from vlmkern import (BiLLMConfig, BinaryConfig, BinaryLinear, GPTAQConfig,  # noqa: E402
                     GPTQConfig, IntActConfig, IntActLinear, QuantConfig, QuantLinear,
                     WeightOnlyLinear, load_quantized, replace_linears, save_quantized)
from vlmkern.calib import quantize_model  # noqa: E402
from vlmkern.calib.arch import decoder_layers  # noqa: E402
from vlmkern.io import CheckpointError, read_plan  # noqa: E402
from vlmkern.plan import (Plan, PlanEntry, PlanError, config_from_json,  # noqa: E402
                          config_nbytes, config_to_json)
from vlmkern.quant import billm_quantize, binarize, gptq_quantize, quantize_weight  # noqa: E402
from vlmkern.quant.awq import AWQConfig
from vlmkern.quant.vlmq import VLMQConfig
from vlmkern.calib.awq_engine import AWQEngineConfig

from test_io import rewrite  # noqa: E402

W4 = GPTQConfig(QuantConfig(4, 32))
W2 = GPTQConfig(QuantConfig(2, 32))
BILLM = BiLLMConfig(BinaryConfig(max_salient=8, quantiles=(0.3, 0.5, 0.7)))
A8 = IntActConfig(8, 8)
# W4 + binary + W2 + integer activations + full precision, per module.
MIXED = {"*.q_proj": W4, "*.k_proj": BILLM, "*.v_proj": W4, "*.o_proj": None,
         "*.gate_proj": W2, "*.up_proj": A8, "*.down_proj": BILLM}


pytestmark = pytest.mark.usefixtures("one_thread")


def _buffers(model):
    return {k: v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# Entries and JSON
# ---------------------------------------------------------------------------

def test_entries_describe_their_configs():
    e = PlanEntry.from_config(W4)
    assert (e.method, e.format, e.w_bits, e.a_bits, e.group_size, e.sym) == \
        ("gptq", "groupwise", 4, 16, 32, False)
    e = PlanEntry.from_config(BILLM)
    assert (e.method, e.format, e.w_bits, e.group_size) == ("billm", "binary", 1, 128)
    e = PlanEntry.from_config(IntActConfig(4, 4, group_size=32))
    assert (e.method, e.format, e.w_bits, e.a_bits, e.group_size) == ("rtn", "intact", 4, 4, 32)
    e = PlanEntry.from_config(GPTAQConfig(W2))
    assert (e.method, e.w_bits, e.group_size) == ("gptaq", 2, 32)


@pytest.mark.parametrize("cfg", [W4, BILLM, A8, GPTAQConfig(W2, 0.1), QuantConfig(3, None, True),
                                 BinaryConfig(block_size=64, stats_dtype="float32")])
def test_config_json_round_trip(cfg):
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg


def test_plan_json_round_trip_keeps_order_and_none():
    plan = Plan(dict(MIXED), info={"note": "x"})
    back = Plan.from_json(plan.to_json())
    assert back == plan and list(back.entries) == list(MIXED)
    assert back.entries["*.o_proj"] is None
    assert back.method_plan() == MIXED


@pytest.mark.parametrize("entry, match", [
    ({"method": "gptq", "format": "nf4", "w_bits": 4}, "unknown format"),
    ({"method": "gptq", "format": "groupwise", "w_bits": 5}, "w_bits"),
    ({"method": "rtn", "format": "intact", "w_bits": 8, "a_bits": 16}, "a_bits"),
    ({"method": "rtn", "format": "groupwise", "w_bits": 4, "group_size": 0}, "group_size"),
    ({"method": "gptq", "format": "groupwise", "w_bits": 4, "bogus": 1}, "unknown fields"),
    ({"format": "groupwise", "w_bits": 4}, "lacks"),
    ({"method": "gptq", "format": "groupwise", "w_bits": 4, "group_size": 32,
      "config": config_to_json(GPTQConfig(QuantConfig(3, 32)))}, "gives"),
    ({"method": "x", "format": "groupwise", "w_bits": 4,
      "config": {"type": "Popen", "module": "subprocess"}}, "unknown method config type"),
    ({"method": "x", "format": "groupwise", "w_bits": 4,
      "config": {"type": "QuantConfig", "bits": 4, "colour": 1}}, "no field"),
    ({"method": "x", "format": "groupwise", "w_bits": 4,
      "config": {"type": "QuantConfig", "bits": 5}}, "bits must be"),
])
def test_bad_entries_are_rejected(entry, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({"plan_version": 1, "modules": {"a": entry}})


def test_bad_plans_are_rejected():
    with pytest.raises(PlanError, match="plan_version"):
        Plan.from_dict({"plan_version": 99, "modules": {}})
    with pytest.raises(PlanError, match="modules"):
        Plan.from_dict({"plan_version": 1})
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{nope")
    with pytest.raises(PlanError, match=r"plan\['\*.q_proj'\]"):
        Plan({"*.q_proj": "gptq"})


@pytest.mark.parametrize("config", [
    {"type": "Anything", "module": "vlmkern.__main__"},
    {"type": "Plan", "module": "vlmkern.plan", "entries": {}},
    {"type": "Popen", "module": "vlmkern"},
], ids=["cli-module", "non-method-dataclass", "top-package"])
def test_config_types_come_from_a_fixed_table(config, monkeypatch):
    # Executing vlmkern.__main__ runs the CLI; a plan naming it must not import it.
    monkeypatch.delitem(sys.modules, "vlmkern.__main__", raising=False)
    monkeypatch.setattr(sys, "argv", ["vlmkern"])
    entry = {"method": "x", "format": "groupwise", "w_bits": 4, "config": config}
    with pytest.raises(PlanError, match=f"unknown method config type '{config['type']}'"):
        Plan.from_dict({"plan_version": 1, "modules": {"a": entry}})
    assert "vlmkern.__main__" not in sys.modules


@pytest.mark.parametrize("cfg", [
    VLMQConfig(), VLMQConfig(GPTQConfig(QuantConfig(3, 64)), norm="l2"), AWQConfig(),
    AWQEngineConfig(), AWQEngineConfig(AWQConfig(QuantConfig(4, 64)), then="gptq")],
    ids=["vlmq", "vlmq-gptq", "awq", "awq-engine", "awq-engine-gptq"])
def test_method_configs_outside_the_core_round_trip(cfg):
    d = json.loads(json.dumps(config_to_json(cfg)))
    assert d["module"] == type(cfg).__module__
    assert config_from_json(d) == cfg
    entry = PlanEntry.from_config(cfg)
    assert PlanEntry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry


def test_deeply_nested_plans_are_plan_errors():
    config = {"type": "QuantConfig", "bits": 4}
    for _ in range(10 * sys.getrecursionlimit()):
        config = {"type": "GPTQConfig", "quant": config}
    entry = {"method": "gptq", "format": "groupwise", "w_bits": 4, "config": config}
    with pytest.raises(PlanError, match="nested too deeply"):
        Plan.from_dict({"plan_version": 1, "modules": {"a": entry}})
    with pytest.raises(PlanError, match="nested too deeply"):
        config_from_json(config)
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("[" * 100_000 + "]" * 100_000)


# ---------------------------------------------------------------------------
# Bytes from shapes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(5, 70), (8, 129), (3, 33)])
def test_bytes_from_shapes_equal_packed_bytes(n, k):
    torch.manual_seed(n * k)
    w = torch.randn(n, k)
    x = torch.randn(200, k)
    h = 2 * x.T @ x / 200
    for cfg in (QuantConfig(4, 64), QuantConfig(3, 32, sym=True), QuantConfig(2, None),
                QuantConfig(8, 7, scale_dtype="float32"), IntActConfig(8, 8),
                IntActConfig(4, 4, group_size=32), IntActConfig(6, 6), BinaryConfig(),
                BinaryConfig(block_size=50, stats_dtype="float32")):
        assert quantize_weight(w, cfg).nbytes == config_nbytes(n, k, cfg), cfg
    for cfg in (W4, GPTQConfig(QuantConfig(3, 16), act_order=True),
                GPTQConfig(QuantConfig(3, 16), act_order=True, static_groups=True)):
        assert gptq_quantize(w, h, cfg)[0].nbytes == config_nbytes(n, k, cfg), cfg
    assert billm_quantize(w, h, BILLM)[0].nbytes == config_nbytes(n, k, BILLM)
    assert config_nbytes(n, k, None) == 2 * n * k


# ---------------------------------------------------------------------------
# Plans in the calibration engine
# ---------------------------------------------------------------------------

def test_engine_runs_a_mixed_plan_per_module():
    model, inputs = build_llava()
    samples = [inputs, _second(inputs)]
    plan = Plan(dict(MIXED))
    lm = decoder_layers(model)[0] + "."
    expected_bytes = plan.nbytes(model, [n for n, m in model.named_modules()
                                         if isinstance(m, torch.nn.Linear)
                                         and n.startswith(lm) and "o_proj" not in n])
    q, report = quantize_model(copy.deepcopy(model), samples, plan, progress=False)
    path, layers = decoder_layers(q)
    kinds = {"q_proj": WeightOnlyLinear, "k_proj": BinaryLinear, "v_proj": WeightOnlyLinear,
             "gate_proj": WeightOnlyLinear, "up_proj": IntActLinear, "down_proj": BinaryLinear}
    for i in range(len(layers)):
        for short, cls in kinds.items():
            sub = "self_attn" if short[0] in "qkv" else "mlp"
            assert type(q.get_submodule(f"{path}.{i}.{sub}.{short}")) is cls
        assert type(q.get_submodule(f"{path}.{i}.self_attn.o_proj")) is torch.nn.Linear
    assert report.kept == [f"{path}.{i}.self_attn.o_proj" for i in range(len(layers))]
    methods = {r.name.rsplit(".", 1)[1]: r.method for r in report.modules}
    assert methods == {"q_proj": "gptq", "k_proj": "billm", "v_proj": "gptq",
                       "gate_proj": "gptq", "up_proj": "rtn", "down_proj": "billm"}
    # the bytes a plan promises from shapes are the bytes it stores
    assert sum(expected_bytes.values()) == sum(r.nbytes for r in report.modules)
    assert Plan.from_model(q).method_plan() == {
        f"{path}.{i}.{n}": MIXED["*." + n.rsplit(".", 1)[1]]
        for i in range(len(layers)) for g in engine.arch_of(q).sequence for n in g
        if not n.endswith("o_proj")}


def test_uniform_plan_is_the_single_method_bitwise():
    model, inputs = build_llama()
    samples = [inputs, _second(inputs)]
    single, _ = quantize_model(copy.deepcopy(model), samples, W4, progress=False)
    planned, _ = quantize_model(copy.deepcopy(model), samples,
                                {"*.layers.0.*": W4, "*": W4}, progress=False)
    a, b = _buffers(single), _buffers(planned)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_sub_group_sees_the_same_statistics():
    # q/k/v share one input: q under GPTQ and k/v under BiLLM must equal the
    # uniform runs' q and k/v in the first layer (same inputs there).
    model, inputs = build_llama()
    samples = [inputs, _second(inputs)]
    gptq, _ = quantize_model(copy.deepcopy(model), samples, W4, progress=False)
    billm, _ = quantize_model(copy.deepcopy(model), samples, BILLM, progress=False)
    mixed, _ = quantize_model(copy.deepcopy(model), samples,
                              {"*.q_proj": W4, "*": BILLM}, progress=False)
    first = "model.layers.0.self_attn."
    for name, ref in (("q_proj", gptq), ("k_proj", billm), ("v_proj", billm)):
        a = ref.get_submodule(first + name).state_dict()
        b = mixed.get_submodule(first + name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_full_precision_stream_runs_only_when_a_module_needs_it(monkeypatch):
    model, inputs = build_llama()
    samples = [inputs, _second(inputs)]
    calls = {"n": 0}
    real = engine._layer_out

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(engine, "_layer_out", counting)
    quantize_model(copy.deepcopy(model), samples, W4, progress=False)
    uniform = calls["n"]
    calls["n"] = 0
    quantize_model(copy.deepcopy(model), samples, {"*.mlp.*": W2, "*": W4}, progress=False)
    assert calls["n"] == uniform
    calls["n"] = 0
    gptq, _ = quantize_model(copy.deepcopy(model), samples, W4, progress=False)
    plan = {"model.layers.1.*": GPTAQConfig(W4), "*": W4}
    mixed, report = quantize_model(copy.deepcopy(model), samples, plan, progress=False)
    assert calls["n"] > 2 * uniform
    # layer 0 is GPTQ in both; layer 1 used the FP stream (GPTAQ)
    for n, m in gptq.named_modules():
        if isinstance(m, QuantLinear) and ".layers.0." in n:
            assert torch.equal(m.qweight, mixed.get_submodule(n).qweight)
    assert {r.method for r in report.modules if ".layers.1." in r.name} == {"gptaq"}


def test_plan_resume_and_fingerprint(tmp_path):
    model, inputs = build_llama()
    plan = {"*.mlp.*": BILLM, "*": W4}
    first, _ = quantize_model(copy.deepcopy(model), [inputs], plan, work_dir=tmp_path,
                              progress=False)
    again, report = quantize_model(copy.deepcopy(model), [inputs], plan, work_dir=tmp_path,
                                   progress=False)
    assert report.resumed_layers == 2
    a, b = _buffers(first), _buffers(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different model, calibration data or method"):
        quantize_model(copy.deepcopy(model), [inputs], {"*.mlp.*": W4, "*": BILLM},
                       work_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different model, calibration data or method"):
        quantize_model(copy.deepcopy(model), [inputs], W4, work_dir=tmp_path, progress=False)


def test_a_layer_kept_in_full_precision_resumes(tmp_path):
    model, inputs = build_llama()
    plan = {"model.layers.0.*": None, "*": W4}
    quantize_model(copy.deepcopy(model), [inputs], plan, work_dir=tmp_path, progress=False)
    q, report = quantize_model(copy.deepcopy(model), [inputs], plan, work_dir=tmp_path,
                               progress=False)
    assert report.resumed_layers == 2 and len(report.kept) == 7
    assert type(q.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert isinstance(q.model.layers[1].mlp.up_proj, WeightOnlyLinear)


def test_engine_rejects_bad_plans():
    model, inputs = build_llama()
    with pytest.raises(ValueError, match=r"\['\*.mlp.fc1'\] match no decoder linear"):
        quantize_model(model, [inputs], {"*.mlp.fc1": W4, "*": W4}, progress=False)
    with pytest.raises(TypeError, match=r"plan\['\*'\]"):
        quantize_model(model, [inputs], {"*": "gptq"}, progress=False)
    with pytest.raises(TypeError, match="module-name patterns"):
        quantize_model(model, [inputs], {3: W4}, progress=False)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_ckpt(tmp_path_factory):
    model, inputs = build_llava()
    samples = [inputs, _second(inputs)]
    q, _ = quantize_model(model, samples, dict(MIXED), progress=False)
    path = save_quantized(q, tmp_path_factory.mktemp("mixed"))
    return q, inputs, path


def test_mixed_plan_saves_reloads_and_runs(mixed_ckpt):
    q, inputs, path = mixed_ckpt
    fresh, _ = build_llava(seed=1)
    load_quantized(fresh, path)
    assert torch.equal(_logits(fresh, inputs), _logits(q, inputs))
    assert Plan.from_model(fresh) == Plan.from_model(q) == read_plan(path)
    counts = {}
    for m in fresh.modules():
        if isinstance(m, QuantLinear):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    assert counts == {"WeightOnlyLinear": 6, "BinaryLinear": 4, "IntActLinear": 2}
    summary = read_plan(path).summary(fresh)
    assert "billm binary b128" in summary and "rtn W8A8 per-row" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU check of the Triton kernels "
                    "(interpreter); the GPU suite runs them natively")
def test_reloaded_mixed_plan_runs_on_the_triton_kernels(mixed_ckpt, monkeypatch):
    pytest.importorskip("triton")
    from vlmkern import ops
    from vlmkern.ops import builtin  # noqa: F401  (registers the backends)
    from vlmkern.ops.backends import BACKENDS
    _, inputs, path = mixed_ckpt
    fresh, _ = build_llava(seed=1)
    load_quantized(fresh, path)
    ref = _logits(fresh, inputs)                       # torch reference backend
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    monkeypatch.setattr(BACKENDS["triton"], "_status", None)
    kernels = {ops.which_kernel(torch.zeros(2, m.in_features), m.quantized_weight)
               for m in fresh.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"triton.weight_only_splitk", "triton.binary", "triton.int_act"}
    got = _logits(fresh, inputs)
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_replace_linears_applies_a_saved_plan(mixed_ckpt):
    _, inputs, path = mixed_ckpt
    plan = read_plan(path)
    fresh, _ = build_llava(seed=1)
    _, rep = replace_linears(fresh, plan, progress=False)
    assert len(rep.rows) == len(plan.entries)
    for name, entry in plan.entries.items():
        m = fresh.get_submodule(name)
        assert m.format == entry.format
        assert PlanEntry.from_module(m).w_bits == entry.w_bits
    # the bytes replace_linears stores are the ones the plan predicts from shapes
    assert rep.bytes_after == sum(plan.nbytes(fresh, list(plan.entries)).values())
    assert torch.isfinite(_logits(fresh, inputs)).all()


def _edit_plan(fn):
    def edit(config):
        fn(config["plan"])
    return edit


def _first(plan):
    return next(iter(plan["modules"]))


def _binary(plan):
    return next(k for k, v in plan["modules"].items() if v["format"] == "binary")


@pytest.mark.parametrize("edit, match", [
    (lambda p: p["modules"][_first(p)].update(w_bits=2, config=None),
     "plan entry .* says format"),
    (lambda p: p["modules"][_first(p)].update(sym=True, config=None), "plan entry .* says"),
    (lambda p: p["modules"].pop(_first(p)), "quantized but not in the plan"),
    (lambda p: p["modules"].update({"model.lm_head": p["modules"][_first(p)]}),
     "in the plan but not stored"),
    (lambda p: p["modules"].update({_first(p): None}), "keeps .* in full precision"),
    (lambda p: p["modules"][_binary(p)].update(format="nf1"), "unknown format"),
    (lambda p: p["modules"][_first(p)]["config"].update(type="AQLMConfig"),
     "unknown method config type"),
    (lambda p: p.update(plan_version=7), "plan_version"),
    (lambda p: p.update(modules=[]), "'modules' object"),
])
def test_corrupt_or_foreign_plan_entries_are_rejected(mixed_ckpt, tmp_path, edit, match):
    _, _, path = mixed_ckpt
    bad = tmp_path / "bad.safetensors"
    rewrite(path, bad, edit_config=_edit_plan(edit))
    with pytest.raises(CheckpointError, match=match):
        load_quantized(build_llava(seed=1)[0], bad)
    with pytest.raises(CheckpointError, match=match):
        read_plan(bad)


def test_checkpoint_without_a_plan_still_loads(mixed_ckpt, tmp_path):
    q, inputs, path = mixed_ckpt
    old = tmp_path / "old.safetensors"
    rewrite(path, old, edit_config=lambda c: c.pop("plan"))
    fresh, _ = build_llava(seed=1)
    load_quantized(fresh, old)
    assert torch.equal(_logits(fresh, inputs), _logits(q, inputs))
    implied = read_plan(old)
    assert {n: (e.format, e.w_bits) for n, e in implied.entries.items()} == \
        {n: (e.format, e.w_bits) for n, e in Plan.from_model(q).entries.items()}


def test_a_recorded_binary_weight_with_small_blocks_applies_again(tmp_path):
    # an external binary weight's entry has no method config: the data-free
    # config it falls back to must fit its block (default max_salient 49 > 16)
    model = torch.nn.Sequential(torch.nn.Linear(32, 8))
    w = binarize(model[0].weight.detach(), BinaryConfig(block_size=16, max_salient=4))
    model, _ = replace_linears(model, {"0": w}, progress=False)
    plan = read_plan(save_quantized(model, tmp_path))
    fresh, _ = replace_linears(torch.nn.Sequential(torch.nn.Linear(32, 8)), plan, progress=False)
    assert isinstance(fresh[0], BinaryLinear) and fresh[0].quantized_weight.block_size == 16
