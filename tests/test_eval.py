"""Evaluation harness: metrics on hand-checkable inputs, and one small
end-to-end check on the mini VLM (skipped without its assets)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from vlmkern.cli import main
from vlmkern.eval.cli import parse_method
from vlmkern.eval.metrics import kl_and_top1, parse_digit, perplexity_from_logits, vqa_accuracy


def test_kl_of_identical_logits_is_zero_and_top1_is_one():
    x = torch.randn(3, 5, 11)
    kl, top1 = kl_and_top1(x, x.clone())
    assert kl == 0.0 and top1 == 1.0


def test_kl_is_invariant_to_a_constant_shift():
    x = torch.randn(4, 7)
    kl, top1 = kl_and_top1(x, x + 3.0)
    assert kl < 1e-12 and top1 == 1.0


def test_two_class_kl_by_hand():
    # p = (0.5, 0.5) from equal logits; q = softmax(0, ln 3) = (1/4, 3/4)
    # float64 inputs: the metric computes in float64, so 1e-12 is attainable
    ref = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl, _ = kl_and_top1(ref, q)
    assert kl == pytest.approx(expected, abs=1e-12)
    # KL is not symmetric: q || p
    kl_rev, _ = kl_and_top1(q, ref)
    assert kl_rev == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5),
                                   abs=1e-12)


def test_top1_and_mask():
    ref = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [9.0, 0.0]]])
    _, top1 = kl_and_top1(ref, q)
    assert top1 == pytest.approx(2 / 3)
    _, top1 = kl_and_top1(ref, q, mask=torch.tensor([[True, False, True]]))
    assert top1 == 1.0
    kl_masked, _ = kl_and_top1(ref, q, mask=torch.tensor([[False, False, True]]))
    kl_single, _ = kl_and_top1(ref[0, 2:], q[0, 2:])
    assert kl_masked == pytest.approx(kl_single, abs=1e-15)
    with pytest.raises(ValueError):
        kl_and_top1(ref, q, mask=torch.tensor([True, False]))
    with pytest.raises(ValueError):
        kl_and_top1(ref, q, mask=torch.zeros(1, 3, dtype=torch.bool))


def test_perplexity_of_uniform_is_vocab_size():
    vocab = 37
    logits = torch.zeros(2, 5, vocab)
    targets = torch.randint(0, vocab, (2, 5))
    assert perplexity_from_logits(logits, targets) == pytest.approx(vocab, rel=1e-12)


def test_perplexity_by_hand_and_mask():
    # target probabilities 1/2 and 1/4 -> exp(mean(ln 2, ln 4)) = sqrt(8)
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.75, 0.25]]], dtype=torch.float64))
    targets = torch.tensor([[0, 1]])
    assert perplexity_from_logits(logits, targets) == pytest.approx(math.sqrt(8.0), rel=1e-12)
    assert perplexity_from_logits(logits, targets, torch.tensor([[False, True]])) == \
        pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("text,digit", [
    ("It is 7.", 7), ("7", 7), ("It is seven.", 7), ("SEVEN", 7), ("zero", 0), ("x9y", 9),
    ("none of them", None), ("someone wrote it", None), ("", None), ("It is a digit.", None),
    ("The number 2 is 2.", 2), ("1. 1. 1.", 1), ("Seven, seven.", 7),
    ("The number 9 is the only one", 9),      # beside a number, words are prose
    # a number of several digits, or numbers that disagree, name no one digit
    ("It is 10.", None), ("It is 11.", None), ("11111111", None), ("3 or 8", None),
    ("The number 6 is 8.", None), ("It is 07.", None), ("It is 2.222", None),
    ("seven or eight", None),
])
def test_parse_digit(text, digit):
    assert parse_digit(text) == digit


def test_agreement_counts_only_answers_naming_the_same_digit():
    from vlmkern.eval.metrics import agreement
    assert agreement(["It is 7.", "no idea", "It is 11.", "three"], [7, None, 1, 3]) == 0.5
    with pytest.raises(ValueError):
        agreement(["It is 7."], [7, 1])


def test_vqa_accuracy():
    assert vqa_accuracy(["It is 7.", "nine", "no idea", "It is 2."], [7, 9, 1, 3]) == 0.5
    with pytest.raises(ValueError):
        vqa_accuracy(["1"], [1, 2])
    with pytest.raises(ValueError):
        vqa_accuracy([], [])


def test_parse_method():
    from vlmkern.config import BinaryConfig, IntActConfig, QuantConfig

    assert parse_method("fp") is None
    assert parse_method("rtn-w4g64") == QuantConfig(4, 64, sym=False)
    assert parse_method("rtn-w3g128s") == QuantConfig(3, 128, sym=True)
    assert parse_method("W8A8") == IntActConfig(8, 8)
    assert parse_method("binary") == BinaryConfig()
    for bad in ("rtn-w5g64", "int4", "rtn-w4"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_markdown_table_and_report(tmp_path):
    from vlmkern.eval.report import write_report

    rows = [{"name": "fp", "bits_per_weight": 16.0, "weight_bytes": 10, "vqa_accuracy": 0.9,
             "kl": 0.0, "top1": 1.0, "perplexity": 12.3, "eval_seconds": 1.0,
             "weight_bytes_note": "counted as fp16"}]
    written = write_report(rows, tmp_path, {"note": "x"})
    assert (tmp_path / "results.json").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "| fp | 16.00 | 10 | 0.900 |" in md
    assert "Decoder linear bytes: counted as fp16." in md   # what the bytes column counts
    assert ("plot" in written) != ("plot_skipped" in written)


# ---------------------------------------------------------------------------
# End to end on the mini VLM
# ---------------------------------------------------------------------------

def _assets():
    try:
        from vlmkern.minivlm.assets import assets_available
        return assets_available()
    except ImportError:
        return False


def test_more_digits_than_held_out_is_an_error():
    from vlmkern.eval import EvalSet, heldout_digits
    n = len(heldout_digits()[2])
    for kwargs in ({"n_vqa": n + 1}, {"n_kl": n + 1}):   # refused before the model is used
        with pytest.raises(ValueError, match=f"holds out {n} digits"):
            EvalSet.build(None, None, **kwargs)


@pytest.mark.skipif(not _assets(), reason="mini VLM assets not installed")
def test_rtn_w8_matches_fp_on_heldout_digits():
    from vlmkern import QuantConfig, replace_linears
    from vlmkern.eval import EvalSet, evaluate, heldout_digits
    from vlmkern.minivlm import build_minivlm

    model, processor = build_minivlm(progress=False)
    evalset = EvalSet.build(model, processor, n_vqa=6, n_kl=3, n_ppl=1, ppl_seq_len=128)
    assert set(evalset.vqa_indices) <= {int(i) for i in heldout_digits()[2]}
    fp = evaluate(model, evalset, "fp")
    assert fp["kl"] == 0.0 and fp["top1"] == 1.0
    assert fp["bits_per_weight"] == 16.0 and fp["quantized_linears"] == 0

    q = copy.deepcopy(model)
    replace_linears(q, QuantConfig(bits=8, group_size=64), progress=False)
    res = evaluate(q, evalset, "rtn-w8g64", fp_reference=fp)
    assert res["agree_fp"] == 1.0, (fp["answers"], res["answers"])
    assert res["kl"] < 0.05 and res["top1"] >= 0.9
    assert res["kl_answer"] < 0.05 and res["top1_answer"] >= 0.9
    assert 8.0 < res["bits_per_weight"] < 9.0
    assert res["quantized_linears"] > 0 and res["dense_linears"] == 0
    assert res["ppl_ratio"] == pytest.approx(1.0, abs=0.05)


def test_dequantized_forward_matches_ops_and_restores():
    from vlmkern import BinaryConfig, IntActConfig, QuantConfig, replace_linears
    from vlmkern.eval.harness import dequantized_forward

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 16))
    plan = {"0": QuantConfig(4, 64), "2": BinaryConfig(), "4": IntActConfig(8, 8)}
    replace_linears(net, plan, skip=(), progress=False)
    x = torch.randn(5, 128)
    exact = net(x)
    with dequantized_forward(net) as n:
        fast = net(x)
        assert n == 2  # the W8A8 layer keeps its real op
    assert torch.allclose(fast, exact, rtol=1e-4, atol=1e-5)
    assert all("forward" not in vars(m) for m in net)
    assert torch.equal(net(x), exact)


@pytest.mark.parametrize("flags, message", [
    (["--methods", ""], "names no variant"), (["--methods", " , ,"], "names no variant"),
    (["--methods", "fp,rtn-w4g64,FP"], r"lists \['FP', 'fp'\] more than once"),
    (["--methods", "rtn-w5g64"], "bits must be 2, 3, 4 or 8"), (["--ppl-seq-len", "1"], "at least 2"),
    (["--out", "__file__"], "--out .* is a file"),
    (["--cache-dir", "__file__"], "--cache-dir .* is a file")])
def test_eval_command_refuses_bad_options_before_any_work(flags, message, capsys, monkeypatch,
                                                           tmp_path):
    import re

    import vlmkern.minivlm.model as minivlm
    monkeypatch.setattr(minivlm, "build_minivlm", lambda *a, **k: pytest.fail("built the model"))
    monkeypatch.delenv("VLMKERN_TRACEBACK", raising=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    flags = [str(a_file) if f == "__file__" else f for f in flags]
    assert main(["eval", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("methods", ["rtn-w4g64,fp", "fp,rtn-w4g64", "rtn-w4g64"])
def test_eval_command_scores_every_variant_against_fp(methods, monkeypatch, tmp_path):
    # wherever --methods lists fp (or leaves it out), every variant gets its
    # agreement with the FP answers
    import vlmkern.minivlm.model as minivlm
    from vlmkern import replace
    from vlmkern.eval import cli, harness

    class Sizes:
        sizes: dict = {}  # noqa: RUF012

    seen = []

    def fake_evaluate(model, evalset, name, fp_reference=None, extra=None, exact_ops=False):
        seen.append((name, fp_reference is not None))
        res = {"name": name, "vqa_accuracy": 0.5, "kl": 0.0, "top1": 1.0, "perplexity": 1.0,
               "bits_per_weight": 16.0, "eval_seconds": 0.0, "answers": ["It is 1."]}
        if fp_reference is not None:
            res["agree_fp"] = 1.0
        return res

    monkeypatch.setattr(minivlm, "build_minivlm", lambda *a, **k: (torch.nn.Linear(2, 2), None))
    monkeypatch.setattr(harness.EvalSet, "build", classmethod(lambda cls, *a, **k: Sizes()))
    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    monkeypatch.setattr(replace, "replace_linears", lambda m, cfg, progress=False: (m, None))
    args = cli.build_parser().parse_args(["--methods", methods, "--out", str(tmp_path)])
    cli.run_eval(args)
    assert seen[0] == ("fp", False) and ("rtn-w4g64", True) in seen
    assert len(seen) == 2
