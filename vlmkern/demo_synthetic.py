"""``vlmkern demo --synthetic``: quantize a small transformers model at
several settings and show physical bytes and output error against full
precision.

The model is a 4-layer Llama built in-process from a config with seeded
random weights, so this demo needs neither a download nor the mini VLM's
asset wheels; it shows every weight format and the save/load round trip.
"""
from __future__ import annotations

import copy
import tempfile
import time

import torch
import torch.nn.functional as F

from . import ops
from .config import BinaryConfig, IntActConfig, QuantConfig
from .io import load_quantized, save_quantized
from .nn import QuantLinear
from .replace import replace_linears

SETTINGS = [
    ("W8 g128 asym", QuantConfig(8, 128)),
    ("W4 g128 asym", QuantConfig(4, 128)),
    ("W4 g32 sym", QuantConfig(4, 32, sym=True)),
    ("W3 g64 asym", QuantConfig(3, 64)),
    ("W2 g64 asym", QuantConfig(2, 64)),
    ("W8A8 per-channel", IntActConfig(8, 8)),
    ("W6A6 per-channel", IntActConfig(6, 6)),
    ("W4A4 g128", IntActConfig(4, 4, group_size=128)),
    ("binary (BiLLM-style)", BinaryConfig()),
]


def build_model(seed: int):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("the demo needs transformers: pip install 'vlmkern[hf]'") from None
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                         max_position_embeddings=256)
    return config, LlamaForCausalLM(config).eval()


def compare(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float]:
    """Relative logit error, top-1 agreement and mean KL(FP || quantized)."""
    rel = float((out - ref).norm() / ref.norm())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    kl = float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True,
                        reduction="none").sum(-1).mean())
    return rel, agree, kl


def run_synthetic(seed: int = 0) -> int:
    config, model = build_model(seed)
    torch.manual_seed(seed + 1)
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        ref = model(ids).logits
    n_params = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "lm_head")
    fp16_bytes = 2 * n_params
    print(f"model: Llama, {config.num_hidden_layers} layers, hidden {config.hidden_size}; "
          f"{n_params:,} weights in decoder linears ({fp16_bytes:,} bytes as fp16); "
          f"lm_head stays full precision")
    header = (f"{'setting':<22} {'bytes':>10} {'vs fp16':>8} {'bits/w':>7} {'logit err':>10} "
              f"{'top-1':>6} {'KL':>8} {'time s':>7}")
    print(header)
    print("-" * len(header))
    print(f"{'fp16 (reference)':<22} {fp16_bytes:>10,} {1.0:>7.2f}x {16.0:>7.2f} {0.0:>10.4f} "
          f"{1.0:>6.3f} {0.0:>8.5f} {'':>7}")
    keep = None
    for label, cfg in SETTINGS:
        start = time.perf_counter()
        qmodel, report = replace_linears(copy.deepcopy(model), cfg, progress=False)
        with torch.no_grad():
            out = qmodel(ids).logits
        secs = time.perf_counter() - start
        rel, agree, kl = compare(ref, out)
        nbytes = report.bytes_after
        print(f"{label:<22} {nbytes:>10,} {fp16_bytes / nbytes:>7.2f}x "
              f"{8 * nbytes / n_params:>7.2f} {rel:>10.4f} {agree:>6.3f} {kl:>8.5f} {secs:>7.2f}")
        if label == "W4 g128 asym":
            keep = (qmodel, out)
    qmodel, out = keep
    first = next(m for m in qmodel.modules() if isinstance(m, QuantLinear))
    x = torch.randn(1, first.in_features)
    print(f"\nkernel chosen for a W4 layer at M=1 on {x.device}: "
          f"{ops.which_kernel(x, first.quantized_weight)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_quantized(qmodel, tmp)
        _, fresh = build_model(seed + 99)
        load_quantized(fresh, tmp)
        with torch.no_grad():
            same = torch.equal(fresh(ids).logits, out)
        print(f"W4 g128 checkpoint, saved to a temporary folder: {path.stat().st_size:,} "
              f"bytes on disk (with the fp32 embeddings and lm_head); reloaded into a fresh "
              f"model: "
              f"{'identical logits' if same else 'LOGITS DIFFER'}")
    return 0 if same else 1
