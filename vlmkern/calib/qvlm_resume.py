"""Resumable Q-VLM runs: the work folder keeps each finished block's choices
and the trained vision tower, so a crashed run picks up where it stopped.

Layout: ``manifest.json`` (fingerprint of model, data and settings, as the
layer-by-layer engine writes it), ``block_XXXX.json`` per searched block,
``vision.safetensors`` for the visual-encoder optimisation's packed layers
(its report in the metadata). Every file is written to a temporary name and
renamed, so a crash leaves either the old state or the new one. Statistics
are recomputed on resume (one forward pass, deterministic); the search, the
expensive part, is not.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from .engine import Settings, WorkDir, _fingerprint, read_packed, save_packed


def _write_json(target: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


class QVLMWorkDir:
    def __init__(self, path, model, samples, config, vision):
        text = f"qvlm {config!r} vision {vision!r}"
        self.path = WorkDir(path, _fingerprint(model, samples, Settings(text))).path

    # -- blocks ------------------------------------------------------------
    def _block_file(self, b: int) -> Path:
        return self.path / f"block_{b:04d}.json"

    def save_block(self, b: int, block: tuple[int, int], choices: dict, error: float,
                   groups) -> None:
        """choices: {(layer, group tuple or None): ActChoice}."""
        units = [[k, None if g is None else groups.index(g), c.percentile]
                 for (k, g), c in choices.items()]
        _write_json(self._block_file(b), {"block": list(block), "units": units, "error": error})

    def load_block(self, b: int, block: tuple[int, int], groups, choice_type):
        """(choices, error) of a finished block, or None."""
        file = self._block_file(b)
        if not file.exists():
            return None
        data = json.loads(file.read_text())
        if tuple(data["block"]) != tuple(block):
            raise ValueError(f"{file}: block {data['block']} was searched where the partition "
                             f"now has {list(block)}; delete the work folder")
        choices = {(k, None if g is None else groups[g]): choice_type(p)
                   for k, g, p in data["units"]}
        return choices, float(data["error"])

    # -- vision tower ------------------------------------------------------
    @property
    def _vision_file(self) -> Path:
        return self.path / "vision.safetensors"

    def save_vision(self, model, report) -> None:
        vision = {name: m for name, m in model.named_modules()
                  if (getattr(m, "quant_info", None) or {}).get("method") == "qvlm-vision"}
        save_packed(self._vision_file, {n: m.quantized_weight for n, m in vision.items()},
                    {"report": json.dumps(dataclasses.asdict(report))},
                    module_info={n: m.quant_info for n, m in vision.items()})

    def load_vision(self):
        """({name: (packed weight, quant_info)}, report dict) or None."""
        if not self._vision_file.exists():
            return None
        packed, records, meta, _ = read_packed(self._vision_file)
        weights = {name: (w, records[name]["info"]) for name, w in packed.items()}
        report = json.loads(meta["report"])
        for key in ("before", "after"):
            if report.get(key):
                report[key]["blocks"] = [tuple(b) for b in report[key]["blocks"]]
        return weights, report


def install_vision(model, saved) -> None:
    """Replace the vision linears by the saved packed layers."""
    from ..replace import replace_linears
    weights = {name: w for name, (w, _) in saved.items()}
    device = next(model.parameters()).device
    replace_linears(model, {n: w.to(device) for n, w in weights.items()}, skip=(),
                    progress=False)
    for name, (_, info) in saved.items():
        model.get_submodule(name).quant_info = info


__all__ = ["QVLMWorkDir", "install_vision"]
