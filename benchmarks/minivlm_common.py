"""What the mini-VLM result scripts (minivlm_eval / _vlmq / _qvlm / _luq)
share: variant selection, the model with its evaluation set and run metadata,
and the stored results a rerun merges into."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

MODEL = "mini VLM (DINOv2-small + SmolLM2-135M-Instruct, trained projector)"


def selected(arg: str, known) -> list[str]:
    """The comma-separated variant names of ``arg``; unknown ones exit."""
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(known)}")
    return names


def model_and_evalset(progress: bool = True, **meta):
    """(model, processor, evalset, meta): the cached mini VLM, its held-out
    evaluation set, and the run's metadata (``meta`` first, then torch,
    threads, machine, the evaluation set's build time and sizes)."""
    from vlmkern.eval.harness import EvalSet
    from vlmkern.minivlm.model import build_minivlm

    model, processor = build_minivlm(progress=progress)
    t = time.perf_counter()
    evalset = EvalSet.build(model, processor)
    meta = {"model": MODEL, **meta, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "evalset_seconds": round(time.perf_counter() - t, 1), **evalset.sizes}
    return model, processor, evalset, meta


def load_previous(path: Path) -> dict:
    """{variant name: result} of an earlier run's JSON, or {}."""
    if path.is_file():
        return {r["name"]: r for r in json.loads(path.read_text()).get("results", [])}
    return {}
