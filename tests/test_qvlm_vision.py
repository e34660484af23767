"""Q-VLM's visual-encoder optimisation (eqs. 8-10): the differentiable
dependency equals the statistics' one, zero epochs is RTN of the vision
tower, training lowers eq. 10 on its data, the installed integer layers
compute what was trained, checkpoints reload, and bad input is refused."""
from __future__ import annotations

import copy

import pytest
import torch

from tiny_models import build_llama, build_llava, build_qwen2vl, crash_on_call
from tiny_models import state_of as _state  # noqa: E402
from vlmkern.calib.qvlm import QVLMConfig, qvlm_quantize
from vlmkern.calib.qvlm_vision import VisionOptConfig, optimize_vision, vision_linears
from vlmkern.config import IntActConfig
from vlmkern.nn import IntActLinear
from vlmkern.quant.entropy import layer_dependency, soft_dependency
from vlmkern.quant.rtn import quantize_rtn


pytestmark = pytest.mark.usefixtures("one_thread")


BUILDERS = {"llava": build_llava, "qwen2vl": build_qwen2vl}


@pytest.mark.parametrize("temperature", ["delta", "delta2"])
def test_soft_dependency_matches_the_statistic_and_has_gradients(temperature):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3000, generator=gen, dtype=torch.float64)
    b = (0.7 * a + 0.5 * torch.randn(3000, generator=gen, dtype=torch.float64)).requires_grad_()
    d = soft_dependency(a, b, 4, 3.0, 2.5, temperature)
    assert float(d.detach()) == pytest.approx(layer_dependency(a, b.detach(), 4, 3.0, 2.5, temperature),
                                     rel=1e-9)
    d.backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pair"):
        soft_dependency(a, b[:10], 4, 3.0, 2.5)


def _vision_input(model, inputs):
    """What the projector receives (the vision tower's output)."""
    from vlmkern.calib.arch import arch_of, find_path
    seen = []
    proj = model.get_submodule(find_path(model, arch_of(model).projector))
    h = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen[0].double()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_zero_epochs_is_rtn_of_the_vision_tower(arch):
    model, inputs = BUILDERS[arch]()
    names = vision_linears(model)
    projector_names = {n for n, m in model.named_modules() if "projector" in n or "merger" in n}
    assert names and not set(names) & projector_names
    absmax = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: absmax.__setitem__(n, float(args[0].abs().max()))) for n in names]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    q, report = qvlm_quantize(copy.deepcopy(model), [inputs], QVLMConfig(8, 6), progress=False,
                              vision=VisionOptConfig(epochs=0))
    assert report.vision.linears == len(names) and not report.vision.after
    for n in names:
        m = q.get_submodule(n)
        assert isinstance(m, IntActLinear) and m.quant_info["method"] == "qvlm-vision"
        w = m.quantized_weight
        rtn = quantize_rtn(weights[n], IntActConfig(8, 6))
        assert torch.equal(w.codes(), rtn.codes()) and torch.equal(w.scales, rtn.scales)
        assert w.act_scale == pytest.approx(absmax[n] / 31, rel=1e-6)
    # the projector stays full precision
    for n in projector_names:
        assert not isinstance(q.get_submodule(n), IntActLinear)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_training_lowers_eq10_and_the_kernels_run_what_was_trained(arch):
    model, inputs = BUILDERS[arch]()
    cfg = VisionOptConfig(w_bits=4, a_bits=4, epochs=12, lr=2e-2, lambda_err=10.0)
    q = copy.deepcopy(model)
    report = optimize_vision(q, [inputs], (8, 8), None, cfg, progress=False)

    def total(d):
        return d["reg"] + cfg.lambda_ent * d["ent"] + cfg.lambda_err * (
            d["vision_err"] + cfg.eta * d["last_err"])

    assert total(report.after) < total(report.before)
    assert len(report.history) == 12
    assert sum(report.layer_weights) == pytest.approx(1.0)
    # parameters moved: some clipping differs from plain RTN
    changed = 0
    for n in vision_linears(model):
        w = q.get_submodule(n).quantized_weight
        rtn = quantize_rtn(model.get_submodule(n).weight.detach(), IntActConfig(4, 4))
        changed += int(not torch.equal(w.scales, rtn.scales))
    assert changed > 0
    # the integer layers installed reproduce the trained fake-quant error
    ref = _vision_input(model, inputs)
    err = float((_vision_input(q, inputs) - ref).pow(2).sum() / ref.pow(2).sum())
    assert err == pytest.approx(report.after["vision_err"], rel=1e-5)


def test_token_activations_learn_weight_clips_only():
    model, inputs = build_llava()
    report = optimize_vision(copy.deepcopy(model), [inputs], (8, 8), None,
                             VisionOptConfig(activation="token", epochs=1), progress=False)
    assert report.after and report.nbytes < report.fp_nbytes
    q = copy.deepcopy(model)
    optimize_vision(q, [inputs], (8, 8), None, VisionOptConfig(activation="token", epochs=0),
                    progress=False)
    for n in vision_linears(model):
        assert q.get_submodule(n).quantized_weight.act_scale is None


def test_checkpoint_with_a_quantized_vision_tower_reloads(tmp_path):
    import vlmkern

    model, inputs = build_llava()
    q, _ = qvlm_quantize(copy.deepcopy(model), [inputs], QVLMConfig(8, 8), progress=False,
                         vision=VisionOptConfig(epochs=1))
    vlmkern.save_quantized(q, tmp_path / "ckpt")
    fresh, _ = build_llava(seed=1)
    vlmkern.load_quantized(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, q(**inputs).logits)
    name = vision_linears(model)[0]
    assert fresh.get_submodule(name).quantized_weight.act_scale == \
        q.get_submodule(name).quantized_weight.act_scale
    assert "vision" in fresh.vlmkern_plan_info["qvlm"]


def test_bad_input():
    model, inputs = build_llava()
    with pytest.raises(ValueError, match="images"):
        optimize_vision(copy.deepcopy(model), [{"input_ids": inputs["input_ids"]}], (8, 8),
                        None, progress=False)
    text, text_inputs = build_llama()
    with pytest.raises(ValueError, match="no vision tower"):
        optimize_vision(text, [text_inputs], (8, 8), None, progress=False)
    with pytest.raises(TypeError, match="VisionOptConfig"):
        qvlm_quantize(copy.deepcopy(model), [inputs], QVLMConfig(), vision={"epochs": 1})
    bad = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    bad["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        optimize_vision(copy.deepcopy(model), [bad], (8, 8), None, progress=False)
    for kwargs, message in [({"w_bits": 3}, "w_bits"), ({"activation": "channel"}, "activation"),
                            ({"epochs": -1}, "epochs"), ({"lr": float("nan")}, "lr"),
                            ({"entropy_elements": 0}, "entropy_elements")]:
        with pytest.raises(ValueError, match=message):
            VisionOptConfig(**kwargs)


# ---------------------------------------------------------------------------
# Resuming a crashed run (work_dir)
# ---------------------------------------------------------------------------

def test_a_crashed_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    import vlmkern.calib.qvlm as qvlm_mod
    import vlmkern.calib.qvlm_vision as vision_mod

    model, inputs = build_llava()
    cfg = QVLMConfig(8, 6, max_depth=1)
    vision = VisionOptConfig(epochs=2)
    whole, report = qvlm_quantize(copy.deepcopy(model), [inputs], cfg, progress=False,
                                  vision=vision)
    expected = _state(whole)

    # crash in the second block's search: the vision tower and block 0 are saved
    real_search = qvlm_mod._search_block
    monkeypatch.setattr(qvlm_mod, "_search_block",
                        crash_on_call(real_search, 2, RuntimeError("simulated crash")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        qvlm_quantize(copy.deepcopy(model), [inputs], cfg, progress=False, vision=vision,
                      work_dir=tmp_path)
    assert (tmp_path / "vision.safetensors").exists() and (tmp_path / "block_0000.json").exists()
    assert not (tmp_path / "block_0001.json").exists()

    # the rerun trains nothing and searches only the second block
    calls = []
    monkeypatch.setattr(qvlm_mod, "_search_block", lambda *a, **k: (calls.append(1),
                                                                    real_search(*a, **k))[1])

    def no_training(*args, **kwargs):
        raise AssertionError("the vision tower was trained again")

    monkeypatch.setattr(vision_mod, "optimize_vision", no_training)
    resumed, resumed_report = qvlm_quantize(copy.deepcopy(model), [inputs], cfg,
                                            progress=False, vision=vision, work_dir=tmp_path)
    assert len(calls) == len(report.blocks) - 1
    state = _state(resumed)
    assert state.keys() == expected.keys()
    for k in expected:
        assert torch.equal(state[k], expected[k]), k
    assert resumed_report.choices == report.choices
    assert resumed_report.block_errors == report.block_errors
    assert resumed_report.vision.after == report.vision.after
    for name in vision_linears(model):
        assert resumed.get_submodule(name).quant_info == whole.get_submodule(name).quant_info


def test_a_work_dir_of_another_run_is_refused(tmp_path):
    model, inputs = build_llava()
    qvlm_quantize(copy.deepcopy(model), [inputs], QVLMConfig(8, 8, max_depth=1),
                  progress=False, work_dir=tmp_path)
    with pytest.raises(ValueError, match="different model"):
        qvlm_quantize(copy.deepcopy(model), [inputs], QVLMConfig(8, 6, max_depth=1),
                      progress=False, work_dir=tmp_path)


def test_padding_stays_out_of_every_term():
    """Right padding with a zero or a large pad embedding gives the same
    losses; without the attention mask the large pads would show."""
    model, inputs = build_llava()
    ids = inputs["input_ids"].clone()
    ids[1, -3:] = 0
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    padded = dict(inputs, input_ids=ids, attention_mask=mask)

    def before(scale, sample):
        m = copy.deepcopy(model)
        with torch.no_grad():      # HF zeroes the padding row
            emb = m.get_input_embeddings().weight
            emb[0] = scale * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
        rep = optimize_vision(m, [sample], (8, 8), None, VisionOptConfig(epochs=0),
                              progress=False)
        return rep.before

    normal, huge = before(0.0, padded), before(50.0, padded)
    for key in ("reg", "ent", "vision_err", "last_err"):
        assert huge[key] == pytest.approx(normal[key], rel=1e-5), key
    unmasked = {k: v for k, v in padded.items() if k != "attention_mask"}
    assert before(50.0, unmasked)["last_err"] != pytest.approx(before(0.0, unmasked)["last_err"],
                                                               rel=1e-3)
