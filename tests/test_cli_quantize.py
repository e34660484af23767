"""``vlmkern quantize`` end to end on a tiny local HuggingFace folder."""
from __future__ import annotations

import random
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import TEXT, build_llama  # noqa: E402

import vlmkern  # noqa: E402
from vlmkern.cli import main  # noqa: E402


@pytest.fixture()
def hf_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(TEXT["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path)
    model, _ = build_llama()
    model.save_pretrained(tmp_path)
    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 100)}" for _ in range(2000)))
    return tmp_path, text


@pytest.mark.parametrize("method, extra", [("gptq", ["--act-order"]), ("rtn", []),
                                           ("gptaq", ["--sym"]),
                                           ("rtn", ["--act-bits", "8", "--bits", "8"])])
def test_quantize_command_writes_a_loadable_checkpoint(hf_folder, tmp_path, capsys, method, extra):
    folder, text = hf_folder
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(folder), "--method", method, "--bits", "3",
                 "--group-size", "32", "--calib-text", str(text), "--samples", "4",
                 "--seq-len", "32", "--device", "cpu", "--out", str(out), *extra])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer output errors" in printed and "saved" in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    vlmkern.load_quantized(model, out)
    q = model.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(q, vlmkern.QuantLinear)
    assert q.quant_info["method"] == method
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_quantize_command_rejects_a_missing_model(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "nope"), "--method", "rtn"]) == 2
    assert "never downloads" in capsys.readouterr().err


def test_quantize_command_rejects_a_folder_that_is_no_model(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path), "--method", "rtn"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--group-size", "abc"], "--group-size: expected a positive integer or 'row'"),
    (["--group-size", "0"], "--group-size: expected a positive integer or 'row'"),
    (["--samples", "0"], "--samples: expected a positive integer, got 0"),
    (["--seq-len", "-3"], "--seq-len: expected a positive integer"),
    (["--damp", "-1"], "--damp: expected a finite number >= 0"),
    (["--alpha", "nan"], "--alpha: expected a finite number >= 0"),
    (["--calib-alpha", "1.5"], r"--calib-alpha: expected a number in \[0, 1\]"),
    (["--budget-bits", "inf"], "--budget-bits: expected a finite number"),
    (["--budget-bits", "nan"], "--budget-bits: expected a finite number"),
    (["--budget-bits", "0"], "--budget-bits: expected a finite number > 0"),
    (["--budget-bytes", "-5"], "--budget-bytes: expected a positive integer"),
    (["--n-low", "-1"], "--n-low: expected an integer >= 0"),
    (["--threshold", "inf"], "--threshold: expected a finite number"),
])
def test_quantize_command_rejects_bad_numbers_as_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", "smollm2", "--method", "rtn", *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_quantize_command_reports_bad_files_and_devices_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLMKERN_TRACEBACK", raising=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(["--calib-text", str(tmp_path / "missing.txt")], "--calib-text .*: no such file"),
             (["--out", str(a_file)], "--out .* is a file; name a folder"),
             (["--work-dir", str(a_file)], "--work-dir .* is a file; it names a folder"),
             (["--device", "bogus"], "--device 'bogus'"),
             (["--bits", "2", "--act-bits", "8"], "w_bits must be 4, 6 or 8")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "torch sees no CUDA GPU"))
    for args, message in cases:
        # checked before the model loads: a model folder that does not exist is never reached
        assert main(["quantize", "--model", "smollm2", "--method", "rtn", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("vlmkern quantize: error: ") and re.search(message, err), err
        assert "Traceback" not in err
    monkeypatch.setenv("VLMKERN_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["quantize", "--model", "smollm2", "--method", "rtn",
              "--calib-text", str(tmp_path / "missing.txt")])


def test_where_the_checkpoint_cannot_go_is_said_before_any_work(tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.delenv("VLMKERN_TRACEBACK", raising=False)
    foreign = tmp_path / "other_model"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"not ours")
    locked = tmp_path / "locked"
    locked.mkdir()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked)
                        else real_access(p, mode))
    cases = [(["--out", str(foreign)], "exists and is not a vlmkern checkpoint"),
             (["--out", str(locked / "ckpt")], "cannot be written here"),
             (["--method", "qvlm", "--act-bits", "8", "--bits", "4"], "--bits and --sym do not"),
             (["--method", "gptq", "--budget-bits", "3"], "--budget-bits: options of --method luq"),
             (["--calib-text", str(latin1)], r"not UTF-8 text \(byte 0xe9 at offset 3\)")]
    for args, message in cases:
        # a model folder that does not exist is never reached
        assert main(["quantize", "--model", str(tmp_path / "no_model"), *args]) == 2, args
        err = capsys.readouterr().err
        assert re.search(message, err), err


def test_a_safetensors_file_vlmkern_wrote_may_be_written_again(tmp_path):
    from vlmkern.calib.cli import check_checkpoint_target
    model = build_llama()[0]
    vlmkern.replace_linears(model, vlmkern.QuantConfig(4, 32), progress=False)
    path = vlmkern.save_quantized(model, tmp_path / "ckpt.safetensors")
    check_checkpoint_target("--out", path)              # ours: replaced in place
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="never overwritten"):
        check_checkpoint_target("--out", other)


def test_quantize_command_never_loads_pickled_weights(hf_folder, capsys, monkeypatch):
    folder, text = hf_folder
    pickled = folder / "pickled"
    model = build_llama()[0]
    model.save_pretrained(pickled)
    for f in pickled.glob("*.safetensors"):     # the same weights as a pickle only
        f.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (pickled / name).write_bytes((folder / name).read_bytes())
    monkeypatch.delenv("VLMKERN_TRACEBACK", raising=False)
    assert main(["quantize", "--model", str(pickled), "--method", "rtn",
                 "--calib-text", str(text)]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_quantize_command_refuses_the_current_folder_as_work_dir(capsys, monkeypatch):
    monkeypatch.delenv("VLMKERN_TRACEBACK", raising=False)
    for value in ("", "."):
        assert main(["quantize", "--model", "smollm2", "--method", "rtn",
                     "--work-dir", value]) == 2
        assert "name a folder of its own" in capsys.readouterr().err


def test_act_bits_alone_quantizes_weights_to_the_same_bits(hf_folder, tmp_path, capsys):
    folder, text = hf_folder
    out = tmp_path / "w6a6"
    assert main(["quantize", "--model", str(folder), "--method", "rtn", "--act-bits", "6",
                 "--calib-text", str(text), "--samples", "2", "--seq-len", "16",
                 "--device", "cpu", "--out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    vlmkern.load_quantized(model, out)
    qw = model.get_submodule("model.layers.0.self_attn.q_proj").quantized_weight
    assert (qw.w_bits, qw.a_bits) == (6, 6)
    capsys.readouterr()
    assert main(["quantize", "--model", str(folder), "--method", "rtn", "--bits", "6"]) == 2
    assert "add --act-bits 6" in capsys.readouterr().err


def test_out_may_not_replace_the_model_it_quantizes(hf_folder, capsys):
    folder, text = hf_folder
    before = (folder / "model.safetensors").read_bytes()
    code = main(["quantize", "--model", str(folder), "--method", "rtn", "--calib-text", str(text),
                 "--samples", "2", "--seq-len", "16", "--device", "cpu", "--out", str(folder)])
    assert code == 2 and "names the --model folder" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == before


def test_a_vlmkern_checkpoint_is_no_model_to_quantize(hf_folder, tmp_path, capsys):
    folder, text = hf_folder
    args = ["--calib-text", str(text), "--samples", "2", "--seq-len", "16", "--device", "cpu"]
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(folder), "--method", "rtn", *args,
                 "--out", str(out)]) == 0
    for f in folder.iterdir():       # the quantized checkpoint beside the model's config
        if f.suffix == ".json":
            (out / f.name).write_bytes(f.read_bytes())
    capsys.readouterr()
    assert main(["quantize", "--model", str(out), "--method", "rtn", *args]) == 2
    assert "is a vlmkern checkpoint" in capsys.readouterr().err
    (out / "model.safetensors").unlink()            # weights missing altogether
    from safetensors.torch import save_file
    save_file({"model.norm.weight": torch.ones(TEXT["hidden_size"])},
              str(out / "model.safetensors"))
    assert main(["quantize", "--model", str(out), "--method", "rtn", *args]) == 2
    assert re.search("lack .* tensors the model needs", capsys.readouterr().err)


def test_calib_text_naming_a_folder_says_so(tmp_path, capsys):
    code = main(["quantize", "--model", "smollm2", "--method", "rtn", "--calib-text",
                 str(tmp_path)])
    assert code == 2 and "is a folder; name a text file" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("meta", "meta tensors hold no values"),
                                             ("mps", "no MPS device")])
def test_devices_that_cannot_compute_here_are_refused_first(device, message, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    assert main(["quantize", "--model", "smollm2", "--method", "rtn", "--device", device]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "billm", "--bits", "2"], "do not apply"),
    (["--method", "binarize", "--group-size", "32"], "do not apply"),
    (["--method", "rtn", "--act-order"], "GPTQ options")])
def test_options_a_method_would_ignore_are_refused(args, message, capsys):
    assert main(["quantize", "--model", "smollm2", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("work_dir", [False, True])
def test_ctrl_c_says_what_was_kept(tmp_path, capsys, monkeypatch, work_dir):
    import vlmkern.calib.cli as calib_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv("VLMKERN_TRACEBACK", raising=False)
    monkeypatch.setattr(calib_cli, "run", interrupted)
    extra = ["--work-dir", str(tmp_path / "wd")] if work_dir else []
    assert main(["quantize", "--model", "smollm2", *extra]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert ("rerun the same command" in err) == work_dir
