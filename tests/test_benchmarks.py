"""Smoke runs of the benchmark scripts that can run without a GPU, so they
keep working between the GPU runs that use them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import decode_model  # noqa: E402


def test_decode_model_runs_on_cpu(tmp_path, capsys):
    rc = decode_model.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128",
                            "--heads", "4", "--kv-heads", "2", "--layers", "2", "--vocab", "128",
                            "--prompt", "8", "--steps", "2", "--reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "decode_model_cpu.md").read_text().splitlines()
    rows = [r for r in table if r.startswith("| ") and not r.startswith("| weights")]
    assert [r.split(" | ")[0] for r in rows] == ["| dense float32", "| W4 g128",
                                                 "| W4 g128 kernel layout", "| W2 g128", "| W8A8",
                                                 "| LUQ-style: binary even layers + W4 odd"]
    assert not any("error" in r for r in rows), rows
    for r in rows:
        prefill, decode, _, graph_decode = (float(v) for v in r.split(" | ")[3:7])
        assert prefill > 0 and decode >= 0 and graph_decode > 0
