"""Layer-by-layer calibration of a HuggingFace model.

1. The inputs of the first decoder layer are captured through the model's own
   forward (a pre-hook stops it there), so a VLM's merged image tokens,
   attention masks and multimodal position ids are exactly what the model uses.
2. Each decoder layer in turn is moved to the compute device and calibrated in
   its sequential sub-groups (q/k/v -> o -> gate/up -> down): hooks accumulate
   Hessian statistics of each linear's inputs, with earlier sub-groups already
   quantized; GPTAQ also runs a full-precision copy of the layer on the
   full-precision stream. The layer's quantized outputs feed the next layer.
   Padding (zeros of a sample's 2-D attention_mask) never enters the
   statistics or the reported layer errors.
3. Each finished layer is written to ``work_dir`` at once (atomically) and
   its linears become QuantLinear modules; a rerun with the same model, data
   and method loads finished layers instead of recalibrating them, which
   gives bit-identical results. An error or interruption leaves the layer in
   flight as it was, so the caller's model never holds a half-calibrated layer.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from ..formats import WEIGHT_TYPES, IntActWeight
from ..io import atomic_save, atomic_write, checksum_mismatch, tensor_checksum
from ..nn import QuantLinear
from ..ops.reference import fake_quant_activations
from ..quant.hessian import HessianAccumulator
from ..replace import replace_linears
from .arch import arch_of, decoder_layers
from .methods import LayerMethod, layer_method
from .replay_check import check_replay, samples_to_check


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first decoder layer is needed."""


@dataclass
class ModuleResult:
    name: str
    method: str
    format: str
    bits: int
    # tr(dW H dW^T) / tr(W H W^T): relative output error on calibration inputs
    # from the weight's rounding alone (activation rounding: see layer_errors)
    rel_error: float
    nbytes: int
    seconds: float


@dataclass
class CalibReport:
    modules: list[ModuleResult] = field(default_factory=list)
    # relative layer-output MSE, the layer as deployed (activation rounding included)
    layer_errors: list[float] = field(default_factory=list)
    resumed_layers: int = 0
    seconds: float = 0.0
    kept: list[str] = field(default_factory=list)    # decoder linears a plan keeps in FP

    def __str__(self) -> str:
        lines = [f"{'module':<52} {'method':<8} {'bits':>4} {'weight err':>10} {'bytes':>10}"]
        for r in self.modules:
            lines.append(f"{r.name:<52} {r.method:<8} {r.bits:>4} {r.rel_error:>10.3g} "
                         f"{r.nbytes:>10,}")
        errs = ", ".join(f"{e:.3g}" for e in self.layer_errors)
        lines.append(f"layer output errors: {errs}")
        if self.kept:
            lines.append(f"{len(self.kept)} decoder linears kept in full precision by the plan")
        lines.append(f"{len(self.modules)} linears, {sum(r.nbytes for r in self.modules):,} "
                     f"bytes, {self.seconds:.1f} s ({self.resumed_layers} layers resumed)")
        return "\n".join(lines)


def map_tensors(obj, fn):
    """obj with fn applied to every tensor in it (also inside tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(obj, device):
    return map_tensors(obj, lambda t: t.to(device))


def capture_inputs(model: nn.Module, layers: nn.ModuleList, samples, device) -> list[tuple]:
    """(hidden_states, kwargs) reaching the first decoder layer, one per sample."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("use_cache", None)
        captured.append((hidden.detach(), {k: _detach(v) for k, v in kwargs.items()}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for sample in samples:
                if not isinstance(sample, dict):
                    raise TypeError("calibration samples must be dicts of model inputs "
                                    f"(input_ids, attention_mask, pixel_values, ...), got "
                                    f"{type(sample).__name__}")
                try:
                    model(**_to(sample, device), use_cache=False)
                except _StopForward:
                    continue
                raise RuntimeError("the model's forward never reached its first decoder layer")
    finally:
        handle.remove()
    return captured


def _detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(t) for t in v)
    return v


def first_output(out) -> torch.Tensor:
    """A module's main output (transformers layers return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer_out(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return first_output(layer(hidden, **kwargs))


def _fingerprint(model: nn.Module, samples, method: LayerMethod) -> str:
    """Identifies (model, data, method) so a work dir is never resumed for another run.

    Every byte of every parameter and sample tensor counts, with its name,
    shape and dtype: a change anywhere in a weight, or the same bytes in
    another shape, is another run."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        _hash_tensor(h, name, p)
    h.update(f"{len(samples)} samples".encode())
    for i, sample in enumerate(samples):
        for k in sorted(sample):
            _hash_value(h, f"sample {i} {k}", sample[k])
    h.update(method.describe().encode())
    return h.hexdigest()


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(json.dumps([name, list(t.shape), str(t.dtype)]).encode())
    # One tensor at a time on the CPU; the uint8 view also covers dtypes
    # numpy lacks (bfloat16).
    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _hash_value(h, name: str, v) -> None:
    """A sample entry: tensors, (nested) lists and tuples of them, plain values."""
    if isinstance(v, torch.Tensor):
        _hash_tensor(h, name, v)
    elif isinstance(v, (list, tuple)):
        h.update(f"{name}: {type(v).__name__} of {len(v)}".encode())
        for i, x in enumerate(v):
            _hash_value(h, f"{name}[{i}]", x)
    elif v is None or isinstance(v, (bool, int, float, str)):
        h.update(f"{name} = {v!r}".encode())
    else:
        # an object's repr may carry its address, which would differ on every run
        h.update(f"{name}: {type(v).__name__}".encode())


def save_packed(file: Path, weights: dict, metadata: dict, extra_tensors: dict | None = None,
                module_info: dict | None = None) -> None:
    """Packed weights {module name: PackedWeight} (and extra tensors) into one
    safetensors file, atomically; ``module_info`` adds a JSON-able record per
    module. ``read_packed`` reads it back. Each module's record lists its
    tensors and the file records every tensor's checksum, so damage inside
    the data, or a tensor gone, is found on reading."""
    tensors = {k: t.detach().cpu().contiguous() for k, t in (extra_tensors or {}).items()}
    modules = {}
    for name, w in weights.items():
        parts = w.tensors()
        modules[name] = {"format": w.FORMAT, "meta": w.meta(), "tensors": sorted(parts),
                         **({"info": module_info[name]} if module_info else {})}
        for t_name, t in parts.items():
            tensors[f"{name}.{t_name}"] = t.detach().cpu().contiguous()
    checksums = {k: tensor_checksum(t) for k, t in tensors.items()}
    atomic_save(tensors, file, {**metadata, "modules": json.dumps(modules),
                                "checksums": json.dumps(checksums)})


def read_packed(file: Path, remedy: str = "") -> tuple[dict, dict, dict, dict]:
    """(weights {name: PackedWeight}, module records, metadata, all tensors)
    of a file written by ``save_packed``. A damaged or foreign file (or no
    file at all) is a ValueError naming it, then ``remedy``."""
    try:
        if Path(file).is_file():
            open(file, "rb").close()   # safetensors reports a file it may not read as missing
    except PermissionError as e:
        raise ValueError(f"{file}: cannot be read ({e}); give this user read access to it") from e
    except OSError:
        pass                           # reported below, with the remedy
    try:
        if not Path(file).is_file():
            raise ValueError("not a file")
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "checksums" not in meta:
            raise ValueError("no 'checksums' record in its metadata")
        why = checksum_mismatch(json.loads(meta["checksums"]), tensors)
        if why is not None:
            raise ValueError(why)
        if "modules" not in meta:
            raise ValueError("no 'modules' record in its metadata")
        records = json.loads(meta["modules"])
        if not isinstance(records, dict):
            raise TypeError("its 'modules' record is not a JSON object")
        weights = {}
        for name, entry in records.items():
            cls = WEIGHT_TYPES.get(entry["format"])
            if cls is None:
                raise ValueError(f"{name}: unknown weight format {entry['format']!r}")
            parts = {t: tensors[f"{name}.{t}"] for t in cls.TENSORS if f"{name}.{t}" in tensors}
            if sorted(parts) != entry["tensors"]:
                raise ValueError(f"{name}: holds the tensors {sorted(parts)}, its record lists "
                                 f"{entry['tensors']}")
            weights[name] = cls.from_state(parts, entry["meta"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = str(e) if type(e) in (ValueError, TypeError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{file}: damaged or not a vlmkern work-dir file ({why})"
                         + (f"; {remedy}" if remedy else "")) from e
    return weights, records, meta, tensors


class Settings:
    """Stands for a method in ``_fingerprint`` where only a description of
    the run's settings identifies it (whole-model methods)."""

    def __init__(self, text: str):
        self.text = text

    def describe(self) -> str:
        return self.text


class WorkDir:
    """Per-layer results on disk: ``manifest.json`` plus ``layer_XXXX.safetensors``.

    The manifest holds the run's fingerprint, and every result file repeats
    it with the file's own index: a file of another run or of another layer
    (copied, renamed, or left behind when the manifest was deleted) is
    refused, never resumed."""

    VERSION = 3       # 3: result files carry checksums and their modules' tensor lists
    # result files of the engines sharing this layout (Q-VLM keeps blocks and its vision tower)
    RESULTS = ("layer_*.safetensors", "block_*.json", "vision.safetensors")

    def __init__(self, path, fingerprint: str):
        self.path = self.check_folder(path)
        self.fingerprint = fingerprint
        manifest = self.path / "manifest.json"
        if manifest.exists():
            self._check_manifest(manifest)
            return
        found = sorted(f.name for pattern in self.RESULTS for f in self.path.glob(pattern))
        if found:
            raise ValueError(f"{self.path} holds results ({', '.join(found[:3])}) but no "
                             f"manifest.json, so nothing tells which run they belong to; "
                             f"delete the work dir or use another one")
        self.write_json(manifest, {"format": "vlmkern work dir", "version": self.VERSION,
                                   "fingerprint": fingerprint})

    @staticmethod
    def check_folder(path) -> Path:
        """``path`` as a folder that exists (made if needed) and can be written;
        ValueError (TypeError for a non-path) before any work is done."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"work_dir must be a folder path, got {type(path).__name__}")
        if os.fspath(path) == "":
            # "" is neither "no work dir" nor, silently, the current folder
            raise ValueError("work_dir is an empty path: give a folder, or None for no work dir")
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"work_dir {folder} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Fail now rather than when the first calibrated layer cannot be saved.
            fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"work_dir {folder}: cannot write there ({e})") from e
        return folder

    def _check_manifest(self, manifest: Path) -> None:
        remedy = f"delete the work dir {self.path} to start over"
        try:
            saved = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{manifest}: unreadable ({e}); {remedy}") from e
        if not isinstance(saved, dict) or "fingerprint" not in saved:
            raise ValueError(f"{manifest} is not a vlmkern work-dir manifest; {remedy}")
        if saved.get("format") != "vlmkern work dir" or saved.get("version") != self.VERSION:
            raise ValueError(f"{self.path} was written by another version of vlmkern; {remedy}")
        if saved["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.path} holds results of a different model, calibration "
                             f"data or method; use another work_dir or delete it")

    @staticmethod
    def write_json(target: Path, data) -> None:
        """``data`` as JSON, written atomically like the result files."""
        atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(data),
                                                              encoding="utf-8"))

    def file(self, idx: int) -> Path:
        return self.path / f"layer_{idx:04d}.safetensors"

    def save(self, idx: int, weights: dict, results: list[ModuleResult], layer_error: float,
             state: dict | None = None):
        """state: other tensors the finished layer needs back (folded norms, biases)."""
        save_packed(self.file(idx), weights,
                    {"fingerprint": self.fingerprint, "layer": str(idx),
                     "results": json.dumps([r.__dict__ for r in results]),
                     "layer_error": repr(layer_error)},
                    {f"state/{k}": t for k, t in (state or {}).items()})

    def load(self, idx: int, expected: dict | None = None):
        """(weights, results, layer_error) of a finished layer, or None
        (``load_state`` returns the extra state saved with it). expected:
        {linear name: (out_features, in_features)} of the linears the layer
        quantizes; the file must hold exactly those."""
        file = self.file(idx)
        if not file.exists():
            return None
        weights, meta, _ = self._read(idx)
        try:
            results = [ModuleResult(**r) for r in json.loads(meta["results"])]
            layer_error = float(meta["layer_error"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._damaged(idx, f"bad results record ({type(e).__name__}: {e})") from e
        if expected is not None:
            have = {n: tuple(w.shape) for n, w in weights.items()}
            want = {n: tuple(shape) for n, shape in expected.items()}
            if have != want:
                problems = [f"{what} {names}" for what, names in (
                    ("missing", sorted(want.keys() - have.keys())),
                    ("unexpected", sorted(have.keys() - want.keys())),
                    ("wrong shape", sorted(n for n in want.keys() & have.keys()
                                           if want[n] != have[n]))) if names]
                raise self._damaged(idx, f"its linears do not match layer {idx}: "
                                         f"{', '.join(problems)}")
        return weights, results, layer_error

    def load_state(self, idx: int) -> dict:
        """The extra state saved with a finished layer ({} when none)."""
        tensors = self._read(idx)[2]
        return {k[len("state/"):]: t for k, t in tensors.items() if k.startswith("state/")}

    def _read(self, idx: int) -> tuple[dict, dict, dict]:
        """(weights, metadata, tensors) of layer idx's file, which must be this run's."""
        file = self.file(idx)
        weights, _, meta, tensors = read_packed(
            file, f"delete {file.name} to recalibrate that layer")
        if meta.get("fingerprint") != self.fingerprint:
            raise self._damaged(idx, "it was not written by this run (another model, "
                                     "calibration data or method, or an older vlmkern)")
        if meta.get("layer") != str(idx):
            raise self._damaged(idx, f"it holds layer {meta.get('layer')}, not layer {idx}")
        return weights, meta, tensors

    def _damaged(self, idx: int, why: str) -> ValueError:
        file = self.file(idx)
        return ValueError(f"{file}: {why}; delete {file.name} to recalibrate that layer")


def _relative_error(weight: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    w = weight.double()
    d = deq.double() - w
    h = hessian.double()
    den = float((w @ h * w).sum())
    return float((d @ h * d).sum()) / den if den > 0 else 0.0


def _pad_mask(sample, hidden: torch.Tensor) -> torch.Tensor | None:
    """[B, T] bool, True at real tokens, when the sample's attention_mask pads
    and lines up with the decoder's hidden states [B, T, H]; else None."""
    mask = sample.get("attention_mask") if isinstance(sample, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        if not bool(mask.bool().all()):
            # (a model that expands image tokens after its processor): the
            # padding cannot be placed, so it enters the statistics
            warnings.warn(f"attention_mask {tuple(mask.shape)} does not line up with the "
                          f"decoder's hidden states {tuple(hidden.shape[:2])}: its padding "
                          f"tokens enter the calibration statistics; calibrate without "
                          f"padding (one sample per batch) to keep them out", stacklevel=3)
        return None
    mask = mask.to(hidden.device).bool()
    return None if bool(mask.all()) else mask


def _real(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real-token rows of x [B, T, ...] ([N, ...]), or x when nothing pads."""
    return x if mask is None else x[mask]


@torch.no_grad()
def install_dequantized(layer: nn.Module, weights: dict) -> None:
    """Packed weights {linear name: PackedWeight}, dequantized, into the layer's
    linears: what later layers see of a finished one."""
    for name, packed in weights.items():
        lin = layer.get_submodule(name)
        lin.weight.data.copy_(packed.dequantize(lin.weight.dtype).to(lin.weight.device))


def quantize_inputs_like(layer: nn.Module, weights: dict) -> list:
    """Forward pre-hooks on the linears whose packed weight quantizes its
    activations (integer-activation formats): their inputs are rounded per
    token as the deployed layer's are, so a layer output computed with the
    dequantized weights carries the activation error too. Returns the hook
    handles; remove them when done."""
    def hook_for(packed: IntActWeight):
        def round_inputs(module, args):
            return (fake_quant_activations(args[0], packed.a_bits, packed.act_scale), *args[1:])
        return round_inputs

    return [layer.get_submodule(name).register_forward_pre_hook(hook_for(packed))
            for name, packed in weights.items() if isinstance(packed, IntActWeight)]


def decoder_inputs(model: nn.Module, layers_path: str, layers: nn.ModuleList, samples,
                   device) -> tuple[list, list, list]:
    """(hidden states, kwargs, real-token masks or None), one per sample, at
    the first decoder layer. Everything but the decoder layers visits
    ``device`` for the capture and returns to where it was."""
    home = next(model.parameters()).device
    _move_except(model, layers_path, device)
    try:
        captured = capture_inputs(model, layers, samples, device)
        for i in samples_to_check(samples):
            check_replay(model, layers, _to(samples[i], device), device)
    finally:
        _move_except(model, layers_path, home)
    inputs = [h for h, _ in captured]
    return inputs, [k for _, k in captured], [_pad_mask(s, h) for s, h in zip(samples, inputs)]


def _calibrate_layer(layer, fp_layer, sequence, method, inputs, fp_inputs, kwargs_list,
                     prefix, masks=None) -> tuple[dict, list[ModuleResult]]:
    """Calibrate one decoder layer's linears in ``sequence`` order. masks: per
    batch, the real-token mask (padding never enters the statistics) or None."""
    weights, results = {}, []
    if method.one_pass:     # all statistics from the layer as it was, in one forward pass
        sequence = [tuple(n for group in sequence for n in group)]
    # Per-token Hessian weights (VLMQ), from the full-precision layer (an
    # earlier method run of a mixed plan may have quantized some of ``layer``).
    importance = method.token_importance(fp_layer, inputs, fp_inputs, kwargs_list, masks)
    for group in sequence:
        linears = {n: layer.get_submodule(n) for n in group if _has(layer, n)}
        if not linears:
            continue
        accs = {n: HessianAccumulator(lin.in_features, device=lin.weight.device)
                for n, lin in linears.items()}
        seen: dict[str, torch.Tensor] = {}
        fp_seen: dict[str, torch.Tensor] = {}

        def hook_for(name, store):
            def hook(module, args):
                store[name] = args[0].detach()
                if len(store) == len(linears):
                    # Every input of this sub-group is in hand: the rest of the
                    # layer's forward would be wasted work.
                    raise _StopForward
            return hook

        def run(module, hidden, kwargs, store):
            store.clear()
            try:
                _layer_out(module, hidden, kwargs)
            except _StopForward:
                return
            missing = sorted(set(linears) - set(store))
            if missing:
                raise RuntimeError(f"{prefix}: the layer's forward never called {missing}")

        handles = [lin.register_forward_pre_hook(hook_for(n, seen)) for n, lin in linears.items()]
        if method.paired_stats:
            handles += [fp_layer.get_submodule(n).register_forward_pre_hook(hook_for(n, fp_seen))
                        for n in linears]
        try:
            with torch.no_grad():
                for i, (hidden, kwargs) in enumerate(zip(inputs, kwargs_list)):
                    mask = masks[i] if masks else None
                    run(layer, hidden, kwargs, seen)
                    if method.paired_stats:
                        run(fp_layer, fp_inputs[i], kwargs, fp_seen)
                    for n, acc in accs.items():
                        g = _token_weight(importance, n, i)
                        if g is not None and mask is not None:
                            g = g.reshape(mask.shape)[mask]
                        if method.paired_stats:
                            acc.add_pair(_real(fp_seen[n], mask), _real(seen[n], mask), g)
                        else:
                            acc.add(_real(seen[n], mask), g)
        finally:
            for h in handles:
                h.remove()
        for n, lin in linears.items():
            start = time.perf_counter()
            try:
                packed = method.quantize(lin.weight.detach(), accs[n])
            except ValueError as e:
                raise ValueError(f"{prefix}.{n}: {e}") from e
            deq = packed.dequantize(lin.weight.dtype)
            err = _relative_error(lin.weight.detach(), deq, accs[n].hessian)
            lin.weight.data.copy_(deq)     # later sub-groups see this layer quantized
            weights[n] = packed
            results.append(ModuleResult(f"{prefix}.{n}", method.name, packed.FORMAT, packed.bits,
                                        err, packed.nbytes, time.perf_counter() - start))
    return weights, results


def _token_weight(importance, name: str, i: int):
    """Batch i's token weights for linear ``name``, or None (uniform)."""
    if not importance or name not in importance:
        return None
    return importance[name][i]


def _has(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


# Set on a model whose calibration stopped part way, leaving it changed in place.
INTERRUPTED = "vlmkern_calibration_interrupted"


def check_not_quantized(model: nn.Module, layers_path: str, layers: nn.ModuleList) -> None:
    """Raise if a decoder layer already holds quantized linears, or an
    interrupted calibration left the model changed: calibrating it again
    would quietly compound the error."""
    if getattr(model, INTERRUPTED, False):
        raise ValueError("an earlier calibration of this model was interrupted and left it "
                         "partly changed in place: reload the full-precision model")
    quantized = [n for n, m in layers.named_modules() if isinstance(m, QuantLinear)]
    if quantized:
        raise ValueError(f"{layers_path}.{quantized[0]} is already quantized, possibly by an "
                         f"interrupted run (the layers it finished stay quantized): reload the "
                         f"full-precision model")


def quantize_model(model: nn.Module, samples, method, work_dir=None, device=None,
                   progress: bool = True):
    """Calibrate the language model's decoder linears of ``model`` layer by layer.

    samples: list of dicts of model inputs (one batch each, e.g. input_ids,
      attention_mask, pixel_values). method: a QuantConfig / IntActConfig /
      BinaryConfig (data-free), GPTQConfig, GPTAQConfig or BiLLMConfig; or a
      per-module plan: a ``vlmkern.plan.Plan`` or a dict of module-name
      patterns (exact / glob / ``re:``, matched as in ``replace_linears``) to
      such configs or None (keep full precision). Decoder linears no pattern
      reaches stay in full precision too (listed in the report's ``kept``).
    work_dir: folder for per-layer results; an interrupted run resumes there
      (rerun on a freshly loaded model: an interrupted one keeps the layers it
      finished quantized, and a model with quantized decoder linears is refused).
    device: compute device (default: where the model is); only the layer being
      calibrated is moved there.
    Returns (model with QuantLinear modules, CalibReport).
    """
    start = time.perf_counter()
    arch = arch_of(model)
    layers_path, layers = decoder_layers(model)
    check_not_quantized(model, layers_path, layers)
    names = [f"{layers_path}.{i}.{n}" for i, layer in enumerate(layers)
             for group in arch.sequence for n in group if _has(layer, n)]
    methods, kept, method = _resolve_methods(method, names)
    if isinstance(samples, dict):
        raise TypeError("samples must be a list of dicts of model inputs, one per batch; got "
                        "one dict (wrap it in a list)")
    samples = list(samples)
    if not samples:
        raise ValueError("quantize_model needs at least one calibration sample")
    for i, sample in enumerate(samples):
        ids = sample.get("input_ids") if isinstance(sample, dict) else None
        if isinstance(ids, torch.Tensor) and ids.numel() == 0:
            raise ValueError(f"calibration sample {i} has no tokens (input_ids {tuple(ids.shape)})")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    work = WorkDir(work_dir, _fingerprint(model, samples, method)) if work_dir is not None \
        else None

    inputs, kwargs_list, masks = decoder_inputs(model, layers_path, layers, samples, device)
    fp_inputs = list(inputs) if method.needs_fp_stream else None

    report = CalibReport(kept=kept)
    bar = tqdm(range(len(layers)), desc=f"calibrating ({method.name})", unit="layer",
               disable=not progress)
    for idx in bar:
        layer = layers[idx]
        prefix = f"{layers_path}.{idx}"
        # The layer as it was, where it was: what an error or interruption puts back.
        backup = {k: t.detach().clone() for k, t in layer.state_dict().items()}
        try:
            layer.to(device)
            expected = {n: tuple(layer.get_submodule(n).weight.shape)
                        for group in arch.sequence for n in group if f"{prefix}.{n}" in methods}
            done = work.load(idx, expected) if work else None
            fp_layer = copy.deepcopy(layer)
            if done is not None:
                weights, results, layer_err = done
                install_dequantized(layer, weights)
                report.resumed_layers += 1
            else:
                weights, results = {}, []
                for groups, run_method in _method_runs(arch.sequence, methods, prefix):
                    w, r = _calibrate_layer(layer, fp_layer, groups, run_method, inputs,
                                            fp_inputs, kwargs_list, prefix, masks)
                    weights.update(w)
                    results.extend(r)
                layer_err = None
            hooks = quantize_inputs_like(layer, weights)
            try:
                with torch.no_grad():
                    num = den = 0.0
                    new_inputs = []
                    for i, (hidden, kwargs) in enumerate(zip(inputs, kwargs_list)):
                        out = _layer_out(layer, hidden, kwargs)
                        ref = _layer_out(fp_layer, hidden, kwargs)
                        o, r = _real(out.float(), masks[i]), _real(ref.float(), masks[i])
                        num += float((o - r).pow(2).sum())
                        den += float(r.pow(2).sum())
                        new_inputs.append(out)
                        if fp_inputs is not None:
                            fp_inputs[i] = _layer_out(fp_layer, fp_inputs[i], kwargs)
                    inputs = new_inputs
            finally:
                for h in hooks:
                    h.remove()
            if layer_err is None:
                layer_err = num / den if den > 0 else 0.0
                if work:
                    work.save(idx, weights, results, layer_err)
        except BaseException:
            layer.to(home)
            layer.load_state_dict(backup)
            raise
        del fp_layer, backup
        layer.to(home)
        report.modules.extend(results)
        report.layer_errors.append(layer_err)
        # Installed at once: if a later layer is interrupted, this one is visibly
        # quantized (so a rerun on the same model is refused), not dequantized
        # weights in an nn.Linear that would be quantized a second time.
        if weights:
            replace_linears(model, {f"{prefix}.{n}": w.to(home) for n, w in weights.items()},
                            skip=(), progress=False)
            for n in weights:
                model.get_submodule(f"{prefix}.{n}").quant_info = \
                    _quant_info(methods[f"{prefix}.{n}"])
        bar.set_postfix(layer_err=f"{layer_err:.3g}")

    report.seconds = time.perf_counter() - start
    return model, report


@dataclass(frozen=True)
class _PlanSummary:
    """Stands where one LayerMethod would for a per-module plan: the progress
    bar's name, whether the full-precision stream must run, the fingerprint."""
    text: str
    needs_fp_stream: bool
    name: str = "plan"

    def describe(self) -> str:
        return self.text


def _resolve_methods(method, names: list[str]):
    """({decoder linear: LayerMethod}, linears kept in full precision, summary).

    One method config applies to every name (the summary is its LayerMethod,
    so fingerprints of single-method runs are unchanged); a plan is resolved
    per name like ``replace_linears`` resolves it."""
    from collections.abc import Mapping

    from ..plan import Plan, resolve_names
    if isinstance(method, Plan):
        method = method.method_plan()
    if not isinstance(method, Mapping):
        single = layer_method(method)
        return {n: single for n in names}, [], single
    bad = [k for k in method if not isinstance(k, str)]
    if bad:
        raise TypeError(f"plan keys must be module-name patterns (str), got {bad[0]!r}")
    hits, kept, unused = resolve_names(method, names)
    if unused:
        raise ValueError(f"plan patterns {unused} match no decoder linear of this model "
                         f"(decoder linears are named like {names[0]!r})")
    methods = {}
    for name, key in hits.items():
        if method[key] is None:
            kept.append(name)
            continue
        try:
            methods[name] = layer_method(method[key])
        except TypeError as e:
            raise TypeError(f"plan[{key!r}]: {e}") from None
    text = json.dumps({"plan": {n: m.describe() for n, m in sorted(methods.items())},
                       "kept": sorted(kept)}, sort_keys=True)
    summary = _PlanSummary(text, any(m.needs_fp_stream for m in methods.values()))
    return methods, sorted(kept, key=names.index), summary


def _method_runs(sequence, methods: dict, prefix: str):
    """A layer's sub-groups as runs of (sub-groups, LayerMethod), in order.

    A layer under one method is a single run over the whole sequence, exactly
    what a single-method calibration does. A sub-group whose linears use
    different methods is split: they all read the same input, so calibrating
    them one after another sees the same statistics. Linears without a
    method (kept in full precision) are left out."""
    runs: list[tuple[list, LayerMethod]] = []
    for group in sequence:
        parts: list[tuple[LayerMethod, list[str]]] = []
        for n in group:
            m = methods.get(f"{prefix}.{n}")
            if m is None:
                continue
            same = next((p for p in parts if p[0] == m), None)
            if same is None:
                parts.append((m, [n]))
            else:
                same[1].append(n)
        for m, part in parts:
            if runs and runs[-1][1] == m:
                runs[-1][0].append(tuple(part))
            else:
                runs.append(([tuple(part)], m))
    return [(tuple(groups), m) for groups, m in runs]


def _quant_info(method: LayerMethod) -> dict:
    """What a calibrated QuantLinear records about its method (saved in checkpoints)."""
    from ..plan import config_to_json
    try:
        config = config_to_json(method.config)
    except TypeError:
        config = method.describe()
    return {"method": method.name, "config": config}


def _move_except(model: nn.Module, skip_path: str, device) -> None:
    """Move every parameter and buffer outside ``skip_path`` to ``device``."""
    for name, module in model.named_modules():
        if name == skip_path or name.startswith(skip_path + "."):
            continue
        module._apply(lambda t: t.to(device), recurse=False)
