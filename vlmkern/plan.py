"""One plan format: what every linear layer of a model becomes.

A plan maps module names or patterns (exact, glob, or ``re:`` regex, matched as
in :mod:`vlmkern.replace`: an exact name wins, otherwise the first matching
pattern in plan order) to a :class:`PlanEntry` -- method, packed format,
weight bits, activation bits, group size and the method's frozen config -- or
to None (keep full precision). The same plan

* drives calibration: ``quantize_model(model, samples, plan)`` (or
  ``plan.method_plan()``) runs each entry's method on its linears;
* is applied data-free by ``replace_linears(model, plan)`` (each entry's
  target grid, rounded to nearest);
* is recorded in a checkpoint's ``quantization_config["plan"]`` by
  ``save_quantized`` and checked against the stored modules by
  ``load_quantized``; ``Plan.from_model`` reads it back from a model.

JSON form (``Plan.to_dict``)::

    {"plan_version": 1,
     "modules": {"model.layers.3.*": {"method": "billm", "format": "binary",
                                      "w_bits": 1, "a_bits": 16, "group_size": 128,
                                      "config": {"type": "BiLLMConfig", ...}},
                 "*.o_proj": null, ...},
     "info": {...}}          # free-form notes (e.g. LUQ's layer entropies)

``w_bits`` of a binary entry is 1 (its nominal width; its physical bits per
weight are larger, see ``config_nbytes``); ``a_bits`` 16 means floating-point
activations; ``group_size`` of a binary entry is its column block size.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Mapping

from torch import nn

from .config import (BinaryConfig, IntActConfig, QuantConfig, config_from_dict, dtype_from_name,
                     is_int)
from .formats.binary import STATS_PER_BLOCK
from .formats.packing import packed_words
from .replace import name_matches

PLAN_VERSION = 1
FLOAT_ACTIVATIONS = 16
_FORMAT_BITS = {"groupwise": (2, 3, 4, 8), "intact": (4, 6, 8), "binary": (1,)}


class PlanError(ValueError):
    """A plan entry that is malformed, inconsistent or of an unknown kind."""


# ---------------------------------------------------------------------------
# Method configs <-> JSON
# ---------------------------------------------------------------------------

def _core_types() -> dict[str, type]:
    from .quant.billm import BiLLMConfig
    from .quant.gptq import GPTAQConfig, GPTQConfig
    return {c.__name__: c for c in (QuantConfig, IntActConfig, BinaryConfig, GPTQConfig,
                                    GPTAQConfig, BiLLMConfig)}


def _known_types() -> dict[str, type]:
    """Every method config a plan may name: the core ones and the configs defined
    next to their methods. A fixed table, so that a plan read from a file can
    only build these classes and never makes vlmkern import a module it names."""
    from .calib.awq_engine import AWQEngineConfig
    from .quant.awq import AWQConfig
    from .quant.vlmq import VLMQConfig
    return {**_core_types(),
            **{c.__name__: c for c in (VLMQConfig, AWQConfig, AWQEngineConfig)}}


def _lookup_type(name: str) -> type:
    """A method config class by name (a config's recorded "module" is not used)."""
    known = _known_types()
    if name in known:
        return known[name]
    raise PlanError(f"unknown method config type {name!r}; known: {sorted(known)}")


def config_to_json(config) -> dict:
    """A method config (nested frozen dataclasses) as a JSON-ready dict tagged
    with its type (and, outside the core configs, the module defining it, which
    older vlmkern versions need to find it)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a method config dataclass, got {type(config).__name__}")
    out = {"type": type(config).__name__}
    if out["type"] not in _core_types():
        out["module"] = type(config).__module__
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            v = config_to_json(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_from_json(d) -> object:
    """Inverse of ``config_to_json``; PlanError for unknown types or bad fields."""
    try:
        return _config_from_json(d)
    except RecursionError:
        raise PlanError("a method config is nested too deeply") from None


def _config_from_json(d) -> object:
    if not isinstance(d, dict) or not isinstance(d.get("type"), str):
        raise PlanError(f"a method config must be a dict with a 'type', got {d!r}")
    cls = _lookup_type(d["type"])
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k in ("type", "module"):
            continue
        if k not in names:
            raise PlanError(f"{d['type']} has no field {k!r}")
        if isinstance(v, dict) and "type" in v:
            v = _config_from_json(v)
        elif isinstance(v, list):
            v = tuple(v)            # configs are frozen: sequences are tuples
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PlanError(f"bad {d['type']}: {e}") from None


# ---------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------

def _target_grid(config):
    """The data-free config whose packed format a method config produces."""
    from .quant.billm import BiLLMConfig
    from .quant.gptq import GPTAQConfig, GPTQConfig
    if isinstance(config, (QuantConfig, IntActConfig, BinaryConfig)):
        return config
    if isinstance(config, GPTQConfig):
        return config.quant
    if isinstance(config, GPTAQConfig):
        return config.gptq.quant
    if isinstance(config, BiLLMConfig):
        return config.binary
    # A method built on another (VLMQ runs GPTQ/GPTAQ) fills its inner method's grid.
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            inner = getattr(config, f.name)
            if dataclasses.is_dataclass(inner) and not isinstance(inner, type):
                try:
                    return _target_grid(inner)
                except PlanError:
                    continue
    raise PlanError(f"no packed format is known for {type(config).__name__}")


def _method_name(config) -> str:
    from .calib.methods import layer_method
    try:
        return layer_method(config).name
    except TypeError:
        return getattr(config, "method_name", type(config).__name__.lower())


@dataclass(frozen=True)
class PlanEntry:
    """What one linear (or every linear a pattern matches) becomes."""

    method: str
    format: str
    w_bits: int
    a_bits: int = FLOAT_ACTIVATIONS
    group_size: int | None = None
    config: object | None = None      # the method config; None when only the format is known
    sym: bool | None = None           # groupwise only: symmetric grid (no stored zeros)

    def __post_init__(self):
        if self.format not in _FORMAT_BITS:
            raise PlanError(f"unknown format {self.format!r}; known: {sorted(_FORMAT_BITS)}")
        if not isinstance(self.method, str) or not self.method:
            raise PlanError(f"method must be a non-empty string, got {self.method!r}")
        if self.w_bits not in _FORMAT_BITS[self.format] or isinstance(self.w_bits, bool):
            raise PlanError(f"{self.format} weights have {_FORMAT_BITS[self.format]} bits, "
                            f"got w_bits={self.w_bits!r}")
        allowed_a = (4, 6, 8) if self.format == "intact" else (FLOAT_ACTIVATIONS,)
        if self.a_bits not in allowed_a or isinstance(self.a_bits, bool):
            raise PlanError(f"{self.format} layers take a_bits in {allowed_a}, "
                            f"got {self.a_bits!r}")
        g = self.group_size
        if g is not None and (not is_int(g) or g < 1):
            raise PlanError(f"group_size must be a positive int or None, got {g!r}")
        if self.sym is not None and (self.format != "groupwise" or not isinstance(self.sym, bool)):
            raise PlanError(f"sym is a bool of groupwise entries only, got {self.sym!r} for "
                            f"{self.format}")
        if self.config is not None:
            expected = PlanEntry.from_config(self.config, _check=False)
            if self.sym is None:
                object.__setattr__(self, "sym", expected.sym)
            mine = (self.format, self.w_bits, self.a_bits, self.group_size, self.sym)
            theirs = (expected.format, expected.w_bits, expected.a_bits, expected.group_size,
                      expected.sym)
            if mine != theirs:
                raise PlanError(f"entry says {self._describe(mine)} but its "
                                f"{type(self.config).__name__} gives {self._describe(theirs)}")

    @staticmethod
    def _describe(t) -> str:
        return f"format={t[0]} w_bits={t[1]} a_bits={t[2]} group_size={t[3]} sym={t[4]}"

    @classmethod
    def from_config(cls, config, _check: bool = True) -> "PlanEntry":
        """The entry for a method config (QuantConfig ... BiLLMConfig)."""
        grid = _target_grid(config)
        fields = dict(method=_method_name(config), format=grid.format,
                      config=config if _check else None)
        if isinstance(grid, QuantConfig):
            fields.update(w_bits=grid.bits, group_size=grid.group_size, sym=grid.sym)
        elif isinstance(grid, IntActConfig):
            fields.update(w_bits=grid.w_bits, a_bits=grid.a_bits, group_size=grid.group_size)
        else:
            fields.update(w_bits=1, group_size=grid.block_size)
        return cls(**fields)

    @classmethod
    def from_module(cls, module) -> "PlanEntry":
        """The entry of a QuantLinear, from its stored format and its ``quant_info``."""
        info = getattr(module, "quant_info", {}) or {}
        meta, fmt = module._meta, module.format
        config = None
        raw = info.get("config")
        try:
            if isinstance(raw, dict) and "type" in raw:
                config = config_from_json(raw)
            elif isinstance(raw, dict) and "format" in raw:     # replace_linears' record
                config = config_from_dict(raw)
        except (PlanError, ValueError):
            config = None           # written by a method this version does not know
        w_bits, a_bits, group_size = format_fields(fmt, meta)
        sym = module.quantized_weight.sym if fmt == "groupwise" else None
        entry = cls(str(info.get("method", "external")), fmt, w_bits, a_bits, group_size,
                    sym=sym)
        if config is not None:
            try:
                entry = dataclasses.replace(entry, config=config)
            except PlanError:
                pass                # info disagrees with the stored format: the format wins
        return entry

    @property
    def label(self) -> str:
        g = "per-row" if self.group_size is None else f"g{self.group_size}"
        if self.format == "binary":
            return f"{self.method} binary b{self.group_size}"
        a = "" if self.a_bits == FLOAT_ACTIVATIONS else f"A{self.a_bits}"
        return f"{self.method} W{self.w_bits}{a} {g}"

    def data_free_config(self):
        """The QuantConfig / IntActConfig / BinaryConfig replace_linears applies."""
        if self.config is not None:
            return _target_grid(self.config)
        if self.format == "groupwise" and self.sym is not None:
            return QuantConfig(self.w_bits, self.group_size, self.sym)
        if self.format == "intact":
            return IntActConfig(self.w_bits, self.a_bits, self.group_size)
        if self.format == "binary":   # the default salient budget, as far as the block holds it
            default = BinaryConfig().max_salient
            return BinaryConfig(block_size=self.group_size,
                                max_salient=min(default, self.group_size))
        raise PlanError(f"entry {self.label} has no method config: cannot apply it")

    def to_dict(self) -> dict:
        d = {"method": self.method, "format": self.format, "w_bits": self.w_bits,
             "a_bits": self.a_bits, "group_size": self.group_size}
        if self.sym is not None:
            d["sym"] = self.sym
        if self.config is not None:
            d["config"] = config_to_json(self.config)
        return d

    @classmethod
    def from_dict(cls, d) -> "PlanEntry":
        if not isinstance(d, dict):
            raise PlanError(f"a plan entry must be a dict or null, got {type(d).__name__}")
        unknown = set(d) - {"method", "format", "w_bits", "a_bits", "group_size", "sym",
                            "config"}
        if unknown:
            raise PlanError(f"plan entry has unknown fields {sorted(unknown)}")
        missing = {"method", "format", "w_bits"} - set(d)
        if missing:
            raise PlanError(f"plan entry lacks {sorted(missing)}")
        config = config_from_json(d["config"]) if d.get("config") is not None else None
        return cls(d["method"], d["format"], d["w_bits"], d.get("a_bits", FLOAT_ACTIVATIONS),
                   d.get("group_size"), config, d.get("sym"))


def format_fields(fmt: str, meta: dict) -> tuple[int, int, int | None]:
    """(w_bits, a_bits, group_size) of a stored weight from its format and metadata."""
    if fmt == "groupwise":
        return meta["bits"], FLOAT_ACTIVATIONS, meta["group_size"]
    if fmt == "intact":
        return meta["w_bits"], meta["a_bits"], meta["group_size"]
    if fmt == "binary":
        return 1, FLOAT_ACTIVATIONS, meta["block_size"]
    raise PlanError(f"unknown format {fmt!r}; known: {sorted(_FORMAT_BITS)}")


def _as_entry(value):
    if value is None or isinstance(value, PlanEntry):
        return value
    return PlanEntry.from_config(value)


# ---------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------

def resolve_names(patterns, names):
    """Match module ``names`` against plan ``patterns`` (exact wins, then the first
    matching pattern in order). Returns ({name: pattern}, unmatched names,
    patterns that matched nothing)."""
    patterns = list(patterns)
    hits, unmatched = {}, []
    for name in names:
        if name in patterns:
            hits[name] = name
            continue
        hit = next((p for p in patterns if name_matches(name, p)), None)
        if hit is None:
            unmatched.append(name)
        else:
            hits[name] = hit
    used = set(hits.values())
    return hits, unmatched, [p for p in patterns if p not in used]


@dataclass
class Plan:
    """An ordered mapping of module names/patterns to PlanEntry or None (keep FP)."""

    entries: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.entries, Mapping):
            raise TypeError(f"Plan entries must be a mapping, got {type(self.entries).__name__}")
        checked = {}
        for key, value in self.entries.items():
            if not isinstance(key, str) or not key:
                raise PlanError(f"plan keys must be module names or patterns, got {key!r}")
            try:
                checked[key] = _as_entry(value)
            except (PlanError, TypeError) as e:
                raise PlanError(f"plan[{key!r}]: {e}") from None
        self.entries = checked

    # -- construction -------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> "Plan":
        """The plan a quantized model was built with: one exact entry per QuantLinear."""
        from .nn import QuantLinear
        return cls({n: PlanEntry.from_module(m) for n, m in model.named_modules()
                    if isinstance(m, QuantLinear)})

    # -- views ----------------------------------------------------------------
    def method_plan(self) -> dict:
        """{pattern: method config or None} for ``quantize_model``."""
        out = {}
        for key, entry in self.entries.items():
            if entry is not None and entry.config is None:
                raise PlanError(f"plan[{key!r}] ({entry.label}) records no method config, "
                                f"so it cannot be recalibrated")
            out[key] = None if entry is None else entry.config
        return out

    def replace_plan(self) -> dict:
        """{pattern: QuantConfig / IntActConfig / BinaryConfig or None} for
        ``replace_linears`` (each entry's grid, rounded to nearest)."""
        return {k: None if e is None else e.data_free_config() for k, e in self.entries.items()}

    def resolve(self, names) -> dict:
        """{name: PlanEntry or None} for every name a key reaches."""
        hits, _, _ = resolve_names(self.entries, names)
        return {n: self.entries[p] for n, p in hits.items()}

    # -- JSON ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"plan_version": PLAN_VERSION,
                "modules": {k: None if e is None else e.to_dict() for k, e in self.entries.items()},
                "info": self.info}

    @classmethod
    def from_dict(cls, d) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(d).__name__}")
        version = d.get("plan_version")
        if not is_int(version) or version > PLAN_VERSION:
            raise PlanError(f"plan_version {version!r} is not one this vlmkern reads "
                            f"(1..{PLAN_VERSION})")
        modules = d.get("modules")
        if not isinstance(modules, dict):
            raise PlanError("a plan needs a 'modules' object")
        entries = {}
        for key, value in modules.items():
            try:
                entries[key] = None if value is None else PlanEntry.from_dict(value)
            except PlanError as e:
                raise PlanError(f"plan entry {key!r}: {e}") from None
        info = d.get("info", {})
        if not isinstance(info, dict):
            raise PlanError("plan 'info' must be an object")
        return cls(entries, info)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(d)

    # -- sizes ----------------------------------------------------------------
    def nbytes(self, model: nn.Module, names=None) -> dict[str, int]:
        """Physical bytes per linear from shapes alone (nothing is quantized):
        packed codes, scales, zeros, bitmaps and statistics; 2 bytes per weight
        for linears the plan keeps in full precision. ``names``: the linears to
        count (default: every nn.Linear/QuantLinear a key reaches)."""
        from .nn import QuantLinear
        linears = {n: m for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, QuantLinear))}
        chosen = self.resolve(linears if names is None else names)
        out = {}
        for name in (chosen if names is None else names):
            m = linears[name]
            entry = chosen.get(name)
            out[name] = config_nbytes(m.out_features, m.in_features,
                                      None if entry is None else entry.data_free_config())
        return out

    def summary(self, model: nn.Module | None = None) -> str:
        """Per-entry labels, and with a model: linears, weights and physical bytes."""
        lines = []
        if model is None:
            for key, entry in self.entries.items():
                lines.append(f"{key:<48} {'keep fp' if entry is None else entry.label}")
            return "\n".join(lines)
        from .nn import QuantLinear
        linears = {n: m for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, QuantLinear))}
        chosen = self.resolve(linears)
        sizes = self.nbytes(model, list(chosen))
        rows: dict[str, list[int]] = {}
        for name, entry in chosen.items():
            label = "keep fp" if entry is None else entry.label
            m = linears[name]
            row = rows.setdefault(label, [0, 0, 0])
            row[0] += 1
            row[1] += m.out_features * m.in_features
            row[2] += sizes[name]
        lines.append(f"{'setting':<28} {'linears':>8} {'weights':>13} {'bytes':>13} "
                     f"{'bits/weight':>11}")
        for label, (count, weights, nbytes) in rows.items():
            lines.append(f"{label:<28} {count:>8} {weights:>13,} {nbytes:>13,} "
                         f"{8 * nbytes / weights:>11.3f}")
        weights = sum(r[1] for r in rows.values())
        total = sum(r[2] for r in rows.values())
        if weights:
            lines.append(f"{'total':<28} {len(chosen):>8} {weights:>13,} {total:>13,} "
                         f"{8 * total / weights:>11.3f}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Bytes from shapes
# ---------------------------------------------------------------------------

def config_nbytes(out_features: int, in_features: int, config) -> int:
    """Physical bytes of an [out, in] linear quantized with ``config`` (any
    method config, or None = full precision stored as fp16), computed from the
    packed formats' layouts without quantizing. Equals ``PackedWeight.nbytes``
    of the result; a GPTQ/GPTAQ config with act_order and no static groups is
    counted with its column permutation (4 bytes per column), which a weight
    whose processing order happens to be the identity does not store."""
    n, k = int(out_features), int(in_features)
    if config is None:
        return 2 * n * k
    gptq = _gptq_settings(config)
    grid = _target_grid(config)
    if isinstance(grid, QuantConfig):
        g = -(-k // (k if grid.group_size is None else grid.group_size))
        size = 4 * n * packed_words(k, grid.bits) + n * g * _dtype_bytes(grid.scale_dtype)
        if not grid.sym:
            size += 4 * n * packed_words(g, grid.bits)
        if gptq is not None and gptq.act_order and not gptq.static_groups:
            size += 4 * k
        return size
    if isinstance(grid, IntActConfig):
        g = 1 if grid.group_size is None else -(-k // grid.group_size)
        codes = n * (-(-k // 2) if grid.w_bits == 4 else k)
        return codes + n * g * _dtype_bytes(grid.scale_dtype)
    if isinstance(grid, BinaryConfig):
        words = packed_words(k, 1)
        blocks = -(-k // grid.block_size)
        return 4 * (2 * n * words + words) + n * blocks * STATS_PER_BLOCK * _dtype_bytes(grid.stats_dtype)
    raise PlanError(f"no size rule for {type(grid).__name__}")


def _gptq_settings(config):
    """The GPTQConfig a method config runs (GPTQ itself, or inside GPTAQ/VLMQ), or None."""
    from .quant.gptq import GPTQConfig
    if isinstance(config, GPTQConfig):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            found = _gptq_settings(getattr(config, f.name))
            if found is not None:
                return found
    return None


def _dtype_bytes(name: str) -> int:
    return dtype_from_name(name).itemsize
