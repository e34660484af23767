"""Swap nn.Linear modules for quantized ones according to a plan.

A plan maps module-name patterns to what each matching linear becomes:

    plan = {
        "model.layers.0.mlp.down_proj": QuantConfig(bits=8),      # exact name
        "*.mlp.*": QuantConfig(bits=3, group_size=64),            # glob (fnmatch)
        "re:.*self_attn\\.(q|k|v)_proj": IntActConfig(8, 8),     # regex (full match)
        "*.o_proj": None,                                         # keep full precision
    }

Resolution for each nn.Linear: an exact name wins; otherwise a module that
matches the skip list is left alone; otherwise the first matching pattern in
plan order applies. Values are configs, already-quantized weights (from a
calibration method), or None. A bare config instead of a dict means {"*": config}.
A ``vlmkern.plan.Plan`` (e.g. read from a checkpoint) applies each entry's
target grid data-free (round to nearest).
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from typing import Mapping

from torch import nn
from tqdm.auto import tqdm

from .config import BinaryConfig, IntActConfig, QuantConfig, config_to_dict
from .formats import PackedWeight
from .nn import BinaryLinear, QuantLinear, WeightOnlyLinear

# Language-model head, vision towers and multimodal projectors stay in full precision.
DEFAULT_SKIP = ("lm_head", "*.lm_head", "*vision_tower*", "*vision_model*", "*visual.*",
                "*multi_modal_projector*", "*mm_projector*")

_CONFIGS = (QuantConfig, IntActConfig, BinaryConfig)


def name_matches(name: str, pattern: str) -> bool:
    """Exact, glob (fnmatch, case-sensitive) or ``re:``-prefixed regex full match."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


@dataclass
class ReplaceRow:
    module: str
    format: str
    label: str
    bytes_before: int
    bytes_after: int


@dataclass
class ReplaceReport:
    rows: list[ReplaceRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)       # linears the skip list kept
    # linears a quantized layer cannot stand in for, matched by a pattern but
    # left in full precision: nn.MultiheadAttention's out_proj (its parent
    # reads .weight itself), nn.Linear subclasses with their own forward or tensors
    unreplaceable: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)          # linears a plan entry set to None
    unmatched: list[str] = field(default_factory=list)     # linears no pattern reached
    unused_patterns: list[str] = field(default_factory=list)
    # plan patterns that matched only linears the skip list kept
    skip_shadowed: list[str] = field(default_factory=list)
    already_quantized: int = 0                             # QuantLinear layers found, untouched

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'module':<48} {'format':<10} {'setting':<16} {'bytes before':>13} "
                 f"{'bytes after':>12}"]
        for r in self.rows:
            lines.append(f"{r.module:<48} {r.format:<10} {r.label:<16} {r.bytes_before:>13,} "
                         f"{r.bytes_after:>12,}")
        done = "no linears quantized"
        if self.rows:
            done = (f"{len(self.rows)} linears quantized: {self.bytes_before:,} -> "
                    f"{self.bytes_after:,} bytes "
                    f"({self.bytes_before / self.bytes_after:.2f}x smaller than the weights "
                    f"as the model held them, in its dtype)")
        lines.append(f"{done}; {len(self.skipped)} skipped, {len(self.kept)} kept, "
                     f"{len(self.unmatched)} not in plan")
        if self.already_quantized:
            lines.append(f"{self.already_quantized} linears were already quantized and were "
                         f"left as they are")
        if self.unreplaceable:
            lines.append(f"left in full precision because a quantized layer cannot stand in "
                         f"for them (an nn.MultiheadAttention's out_proj, read by its parent, "
                         f"or an nn.Linear subclass with its own forward or tensors): "
                         f"{self.unreplaceable}")
        if self.skip_shadowed:
            lines.append(f"plan patterns that matched only skipped linears (the skip list wins "
                         f"over patterns; name a module exactly to quantize it): "
                         f"{self.skip_shadowed}")
        if self.unused_patterns:
            lines.append(f"plan patterns that matched nothing: {self.unused_patterns}")
        return "\n".join(lines)


def _normalise_plan(plan) -> dict:
    from .plan import Plan
    if isinstance(plan, Plan):
        plan = plan.replace_plan()      # each entry's grid, applied data-free
    if isinstance(plan, PackedWeight):
        raise TypeError("a single quantized weight cannot be a plan: map it to a module name")
    if isinstance(plan, _CONFIGS):
        return {"*": plan}
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a dict of pattern -> config/weight/None or a config, "
                        f"got {type(plan).__name__}")
    for key, value in plan.items():
        if not isinstance(key, str):
            raise TypeError(f"plan keys must be module-name patterns (str), got {key!r}")
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise ValueError(f"bad regex in plan key {key!r}: {e}") from None
        if value is not None and not isinstance(value, _CONFIGS + (PackedWeight,)):
            raise TypeError(f"plan[{key!r}] must be a QuantConfig, IntActConfig, BinaryConfig, "
                            f"a quantized weight or None, got {type(value).__name__}")
    return dict(plan)


def _skip_patterns(skip) -> tuple[str, ...]:
    if skip is None:    # "no skip list" or "the default one"? Either reading surprises someone
        raise TypeError("skip=None is ambiguous: leave skip out for the default (lm_head, "
                        "vision tower, projector: DEFAULT_SKIP) or pass () to skip nothing")
    # a lone string is one pattern, not a sequence of one-character patterns
    patterns = (skip,) if isinstance(skip, str) else tuple(skip)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"skip must be a module-name pattern or a sequence of them, got {bad[0]!r}")
    return patterns


def shared_names(model: nn.Module) -> dict[str, list[str]]:
    """Modules registered under several names (one object at two places of
    the tree): first name -> the other names. ``named_modules`` lists such a
    module once, under its first name."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return {found[0]: found[1:] for found in names.values() if len(found) > 1}


def _same_setting(a, b) -> bool:
    full_precision = ("skip", "keep")
    if a[0] in full_precision or b[0] in full_precision:
        return a[0] in full_precision and b[0] in full_precision
    return a[1] is b[1] or (not isinstance(a[1], PackedWeight) and a[1] == b[1])


def resolve_plan(model: nn.Module, plan, skip=DEFAULT_SKIP):
    """Decide, without changing the model, what every nn.Linear becomes.

    Returns (targets: {name: config | weight}, report with skipped/kept/unmatched/unused).
    """
    return _resolve(model, plan, skip)[:2]


def _resolve(model: nn.Module, plan, skip):
    """resolve_plan's (targets, report), and the model's ``shared_names``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = _normalise_plan(plan)
    skip = _skip_patterns(skip)
    modules = dict(model.named_modules())
    quantized = sum(isinstance(m, QuantLinear) for m in modules.values())
    if not any(isinstance(m, nn.Linear) for m in modules.values()):
        if quantized:
            raise ValueError(f"{type(model).__name__} has no nn.Linear modules to quantize: "
                             f"its {quantized} linears are already quantized")
        raise ValueError(f"{type(model).__name__} has no nn.Linear modules to quantize "
                         f"(layers such as transformers' Conv1D are not supported)")
    report = ReplaceReport(already_quantized=quantized)
    used, shadowed = set(), set()
    every_name = dict(model.named_modules(remove_duplicate=False))
    for key, value in plan.items():
        if (key in every_name and not isinstance(every_name[key], nn.Linear)
                and not key.startswith("re:")):
            raise TypeError(f"plan names {key!r}, which is a {type(every_name[key]).__name__}, "
                            f"not an nn.Linear")
        if isinstance(value, PackedWeight) and key not in every_name:
            raise KeyError(f"plan gives a quantized weight for {key!r}, but the model has no "
                           f"module of that name")
        if isinstance(value, PackedWeight) and isinstance(every_name[key], nn.Linear):
            expected = (every_name[key].out_features, every_name[key].in_features)
            if value.shape != expected:
                raise ValueError(f"{key}: quantized weight has shape {value.shape}, the linear "
                                 f"layer is {expected}")

    def decide(name):
        """(kind, entry, plan key) of one name: quantize / keep / skip / none."""
        if name in plan:
            hit = name
        elif any(name_matches(name, s) for s in skip):
            shadowed.update(p for p in plan if name_matches(name, p))
            return "skip", None, None
        else:
            hit = next((p for p in plan if name_matches(name, p)), None)
            if hit is None:
                return "none", None, None
        return ("keep" if plan[hit] is None else "quantize"), plan[hit], hit

    aliases = shared_names(model)
    # nn.MultiheadAttention calls F.multi_head_attention_forward with
    # out_proj.weight: a quantized layer there has no weight to give it
    owned = {f"{p}.out_proj" if p else "out_proj" for p, m in modules.items()
             if isinstance(m, nn.MultiheadAttention)}
    targets = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        # a linear under several names is one layer: the names that the plan
        # or the skip list speak of must agree
        said = [(n, decide(n)) for n in [name, *aliases.get(name, ())]]
        said = [(n, d) for n, d in said if d[0] != "none"] or said[:1]
        for other, d in said[1:]:
            if not _same_setting(said[0][1], d):
                raise ValueError(f"{said[0][0]} and {other} are one nn.Linear under two names, "
                                 f"but the plan gives them different settings ({said[0][1][0]} "
                                 f"{said[0][1][1]!r} and {d[0]} {d[1]!r}); give both the same")
        used.update(d[2] for _, d in said if d[2] is not None)
        kind, entry, hit = said[0][1]
        why = _irreplaceable(module, [name, *aliases.get(name, ())], owned)
        if kind == "quantize" and why:
            if any(key in plan for key in [name, *aliases.get(name, ())]):
                raise ValueError(f"plan names {hit!r}, {why}: it cannot become a quantized "
                                 f"layer")
            report.unreplaceable.append(name)
        elif kind == "quantize":
            targets[name] = entry
        else:
            {"none": report.unmatched, "skip": report.skipped, "keep": report.kept}[kind].append(name)
    report.skip_shadowed = [p for p in plan if p not in used and p in shadowed]
    report.unused_patterns = [p for p in plan if p not in used and p not in shadowed]
    return targets, report, aliases


def _irreplaceable(module: nn.Linear, names: list[str], owned: set[str]) -> str | None:
    """Why a quantized layer cannot stand in for this linear, or None."""
    if any(n in owned for n in names):
        return "the output projection of an nn.MultiheadAttention, which reads its weight itself"
    kind = type(module).__name__
    if type(module).forward is not nn.Linear.forward:
        return f"an nn.Linear subclass ({kind}) with its own forward"
    extra = [n for n, _ in module.named_parameters() if n not in ("weight", "bias")]
    extra += [n for n, _ in module.named_buffers()]
    if extra:
        return f"an nn.Linear subclass ({kind}) that also holds {extra}"
    return None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(model: nn.Module, plan, skip=DEFAULT_SKIP, progress: bool = True):
    """Replace the model's nn.Linear modules per ``plan``, in place.

    skip: name patterns left in full precision unless named exactly in the
    plan (default: lm_head, vision tower, projector; pass () to skip nothing).
    Returns (model, ReplaceReport) with per-module format, setting and bytes.
    """
    targets, report, aliases = _resolve(model, plan, skip)
    for name, entry in tqdm(targets.items(), desc="quantizing linears", unit="layer",
                            disable=not progress or len(targets) < 8):
        linear = model.get_submodule(name)
        before = linear.weight.numel() * linear.weight.element_size()
        if isinstance(entry, PackedWeight):
            info = {"method": "external"}
        else:
            info = {"method": "rtn" if not isinstance(entry, BinaryConfig) else "binarize",
                    "config": config_to_dict(entry)}
        try:
            qlinear = QuantLinear.from_linear(linear, entry, info)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
        for place in [name, *aliases.get(name, ())]:     # one layer, every name it has
            set_module(model, place, qlinear)
        qweight = qlinear.quantized_weight
        label = entry.label if not isinstance(entry, PackedWeight) else repr(qweight.meta())
        report.rows.append(ReplaceRow(name, qweight.FORMAT, label, before, qweight.nbytes))
    return model, report


def to_kernel_layout(model: nn.Module, progress: bool = True, binary: bool = False) -> list[str]:
    """Hold the codes of every weight-only layer the CUDA tensor-core kernels
    can run (2/3/4 bits, group 16/32/64/multiple of 128 or per row) only in
    the kernels' layout, so the GPU holds each layer's codes once instead
    of twice (canonical stream + layout; the kernels' scale words, 32/g bits
    per weight at group size g <= 128, are still made beside the canonical
    scales). With ``binary``, likewise the sign and aux bits of every binary
    layer of block size 128, in the lookup-table kernel's layout (about 4
    bits per weight on the GPU instead of 6; prefill-sized calls of such a layer then want
    ``VLMKERN_ENABLE=cuda.binary_lut_dequant_cublas``, or run slower on a
    copy dequantized with torch operations). Best done before the model
    moves to the GPU.
    Checkpoints still save and load the canonical format. Returns the names
    of the layers converted; the others are left as they are.
    """
    from .ops import cuda_binary_lut, cuda_weight_only

    def fits(m) -> bool:
        if isinstance(m, WeightOnlyLinear):
            return cuda_weight_only.unsupported_reason(m.quantized_weight) is None
        return binary and isinstance(m, BinaryLinear) and \
            cuda_binary_lut.unsupported_reason(m.quantized_weight) is None

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, (WeightOnlyLinear, BinaryLinear)) and not m.laid_out and fits(m)]
    from .ext import load_extension
    extension, why = load_extension()
    if todo and extension is None:
        warnings.warn(f"to_kernel_layout: only the CUDA extension's kernels read the layout, and "
                      f"{why}; only the torch reference runs such a layer then, decoding it on "
                      f"every call (correct, slow), and VLMKERN_BACKEND=triton refuses it",
                      stacklevel=2)
    for _, module in tqdm(todo, desc="kernel layout", disable=not progress or not todo):
        module.to_kernel_layout()
    return [name for name, _ in todo]
