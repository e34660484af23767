"""Resumable Q-VLM runs: the work folder keeps each finished block's choices
and the trained vision tower, so a crashed run picks up where it stopped.

Layout: ``manifest.json`` (fingerprint of model, data and settings, as the
layer-by-layer engine writes it), ``block_XXXX.json`` per searched block,
``vision.safetensors`` for the visual-encoder optimisation's packed layers
(its report in the metadata). Every file repeats the run's fingerprint (and
a block its index), so a file of another run or block is refused, and is
written to a temporary name and renamed, so a crash leaves either the old
state or the new one. Statistics are recomputed on resume (one forward
pass, deterministic); the search, the expensive part, is not.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .engine import Settings, WorkDir, _fingerprint, read_packed, save_packed


class QVLMWorkDir:
    def __init__(self, path, model, samples, config, vision):
        text = f"qvlm {config!r} vision {vision!r}"
        work = WorkDir(path, _fingerprint(model, samples, Settings(text)))
        self.path, self.fingerprint = work.path, work.fingerprint
        # What a saved file must match: the searched units and candidates,
        # and the vision linears the optimisation replaces.
        self._per_group = config.granularity == "quantizer"
        self._percentiles = {c.percentile for c in config.candidates()}
        self._vision = None
        if vision is not None:
            from .qvlm_vision import vision_linears
            self._vision = {n: tuple(model.get_submodule(n).weight.shape)
                            for n in vision_linears(model)}

    # -- blocks ------------------------------------------------------------
    def _block_file(self, b: int) -> Path:
        return self.path / f"block_{b:04d}.json"

    def save_block(self, b: int, block: tuple[int, int], choices: dict, error: float,
                   groups) -> None:
        """choices: {(layer, group tuple or None): ActChoice}."""
        units = [[k, None if g is None else groups.index(g), c.percentile]
                 for (k, g), c in choices.items()]
        WorkDir.write_json(self._block_file(b), {"fingerprint": self.fingerprint, "index": b,
                                                 "block": list(block), "units": units,
                                                 "error": error})

    def load_block(self, b: int, block: tuple[int, int], groups, choice_type):
        """(choices, error) of a finished block, or None."""
        file = self._block_file(b)
        if not file.exists():
            return None

        def damaged(why):
            return ValueError(f"{file}: {why}; delete {file.name} to search that block again")

        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise damaged(f"unreadable ({e})") from e
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint \
                or data.get("index") != b:
            raise damaged(f"not block {b} of this run (another model, calibration data or "
                          f"settings, or an older vlmkern)")
        if data.get("block") != list(block):
            raise ValueError(f"{file}: block {data.get('block')} was searched where the "
                             f"partition now has {list(block)}; delete the work folder")
        units = data.get("units")
        error = data.get("error")
        if not isinstance(units, list) or not all(isinstance(u, list) and len(u) == 3
                                                  for u in units) \
                or not _is_number(error):
            raise damaged("no valid 'units' and 'error' records")
        have = [(k, g) for k, g, _ in units]
        want = {(k, g) for k in range(block[0], block[1] + 1)
                for g in (range(len(groups)) if self._per_group else (None,))}
        if any(type(k) is not int or (g is not None and type(g) is not int) for k, g in have) \
                or len(have) != len(want) or set(have) != want:
            raise damaged(f"its units {have} are not those of block {list(block)}")
        if any((p is not None and not _is_number(p)) or p not in self._percentiles
               for _, _, p in units):
            raise damaged("it chooses activation quantizers that are not candidates of "
                          "this run")
        choices = {(k, None if g is None else groups[g]): choice_type(p) for k, g, p in units}
        return choices, float(error)

    # -- vision tower ------------------------------------------------------
    @property
    def _vision_file(self) -> Path:
        return self.path / "vision.safetensors"

    def save_vision(self, model, report) -> None:
        vision = {name: m for name, m in model.named_modules()
                  if (getattr(m, "quant_info", None) or {}).get("method") == "qvlm-vision"}
        save_packed(self._vision_file, {n: m.quantized_weight for n, m in vision.items()},
                    {"fingerprint": self.fingerprint,
                     "report": json.dumps(dataclasses.asdict(report))},
                    module_info={n: m.quant_info for n, m in vision.items()})

    def load_vision(self):
        """({name: (packed weight, quant_info)}, report dict) or None."""
        from .qvlm_vision import VisionOptReport

        file = self._vision_file
        if not file.exists():
            return None
        remedy = f"delete {file.name} to optimise the vision tower again"
        packed, records, meta, _ = read_packed(file, remedy)
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{file}: not written by this run (another model, calibration "
                             f"data or settings, or an older vlmkern); {remedy}")
        have = {n: tuple(w.shape) for n, w in packed.items()}
        if self._vision is not None and have != self._vision:
            raise ValueError(f"{file}: its linears are not this model's vision linears "
                             f"(missing {sorted(self._vision.keys() - have.keys())}, "
                             f"unexpected {sorted(have.keys() - self._vision.keys())}, "
                             f"or of another shape); {remedy}")
        try:
            weights = {name: (w, records[name]["info"]) for name, w in packed.items()}
            report = json.loads(meta["report"])
            fields = {f.name for f in dataclasses.fields(VisionOptReport)}
            if not isinstance(report, dict) or set(report) != fields:
                raise ValueError("its report is not a vision-optimisation report")
            for key in ("before", "after"):
                if report.get(key):
                    report[key]["blocks"] = [tuple(b) for b in report[key]["blocks"]]
        except (KeyError, TypeError, ValueError) as e:
            why = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
            raise ValueError(f"{file}: damaged ({why}); {remedy}") from e
        return weights, report


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
