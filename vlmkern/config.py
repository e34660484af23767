"""Frozen configuration objects: what a quantized linear layer should become.

Each config names one packed format (see :mod:`vlmkern.formats`). Configs are
plain frozen dataclasses so they hash, compare and serialise to JSON
(``to_dict`` / ``config_from_dict``) for the checkpoint's quantization_config.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical string for a floating scale dtype ('float16', 'bfloat16', 'float32')."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    name = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32",
            "fp32": "float32"}.get(name, name)
    if name not in _SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {sorted(_SCALE_DTYPES)}, got {dtype!r}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    return _SCALE_DTYPES[dtype_name(name)]


def is_int(value) -> bool:
    """A real int: bool is an int subclass (JSON true/false load as bool), and
    a float like 4.0 compares equal to 4 but breaks the bit shifts and shapes
    it feeds."""
    return isinstance(value, int) and not isinstance(value, bool)


def config_float(owner: str, name: str, value) -> float:
    """``float(value)`` for a number field of a method config, raising with
    ``owner.name`` in the message for a non-number or a bool."""
    message = f"{owner}.{name} must be a number, got {value!r}"
    if isinstance(value, bool):         # True would read as 1.0
        raise TypeError(message)
    try:
        return float(value)
    except TypeError:
        raise TypeError(message) from None
    except ValueError:
        raise ValueError(message) from None


def config_names(owner: str, name: str, value) -> tuple[str, ...]:
    """A field naming modules, as a tuple: a lone string is one name (tuple()
    would split it into characters), and every name must be a string."""
    names = (value,) if isinstance(value, str) else value
    if isinstance(names, Iterable):
        names = tuple(names)
        if all(isinstance(n, str) for n in names):
            return names
    raise TypeError(f"{owner}.{name} must be a name or a sequence of names, got {value!r}")


def _check_bits(owner: str, name: str, value, allowed: tuple[int, ...]) -> None:
    if not is_int(value) or value not in allowed:
        choices = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
        raise ValueError(f"{owner}.{name} must be {choices} (an int), got {value!r}")


def check_bool(owner: str, name: str, value) -> None:
    # Any object is truthy or falsy, so sym="no" would silently mean True.
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be True or False, got {value!r}")


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and (not is_int(group_size) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None (one group per row), "
                         f"got {group_size!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Group-wise integer weights for weight-only matmul (W2/W3/W4/W8, fp activations).

    bits: 2, 3, 4 or 8. group_size: columns (input features) sharing one scale
    and zero; None means one group per row. When in_features is not a multiple
    of group_size the last group of each row is shorter. sym: symmetric
    (implicit zero 2**(bits-1), no zeros stored) or asymmetric (packed zeros).
    scale_dtype: dtype the scales are stored in.
    """

    bits: int = 4
    group_size: int | None = 128
    sym: bool = False
    scale_dtype: str = "float16"

    format: ClassVar[str] = "groupwise"

    def __post_init__(self):
        _check_bits("QuantConfig", "bits", self.bits, (2, 3, 4, 8))
        _check_group_size(self.group_size)
        check_bool("QuantConfig", "sym", self.sym)
        object.__setattr__(self, "scale_dtype", dtype_name(self.scale_dtype))

    @property
    def label(self) -> str:
        g = "per-row" if self.group_size is None else f"g{self.group_size}"
        return f"W{self.bits} {g} {'sym' if self.sym else 'asym'}"


@dataclass(frozen=True)
class IntActConfig:
    """Integer weights and integer activations (W8A8, W6A6, W4A4, ...).

    Weights: symmetric, per output channel (group_size None) or per group of
    input columns. Activations: symmetric, quantized per token at run time, or
    with one static per-tensor scale (act_scale) fixed at calibration.
    """

    w_bits: int = 8
    a_bits: int = 8
    group_size: int | None = None
    scale_dtype: str = "float16"
    act_scale: float | None = None

    format: ClassVar[str] = "intact"

    def __post_init__(self):
        for name in ("w_bits", "a_bits"):
            _check_bits("IntActConfig", name, getattr(self, name), (4, 6, 8))
        _check_group_size(self.group_size)
        object.__setattr__(self, "scale_dtype", dtype_name(self.scale_dtype))
        if self.act_scale is not None:
            try:
                s = float(self.act_scale)
            except (TypeError, ValueError):
                s = float("nan")
            fp32 = torch.finfo(torch.float32)    # the kernels divide by it in fp32
            if isinstance(self.act_scale, (bool, str)) or not fp32.tiny <= s <= fp32.max:
                raise ValueError(f"act_scale must be a positive number in fp32's normal range "
                                 f"[{fp32.tiny:.3g}, {fp32.max:.3g}], got {self.act_scale!r}")
            object.__setattr__(self, "act_scale", s)

    @property
    def bits(self) -> int:
        return self.w_bits

    @property
    def label(self) -> str:
        # the weight grouping and a static activation scale tell such layers apart
        g = "" if self.group_size is None else f" g{self.group_size}"
        act = "" if self.act_scale is None else f" static {self.act_scale:g}"
        return f"W{self.w_bits}A{self.a_bits}{g}{act}"


@dataclass(frozen=True)
class BinaryConfig:
    """BiLLM-style binarization: residual (2-plane) binarization of salient
    columns, two-group binarization of the rest, per 128-column block.

    max_salient: largest number of salient columns searched per block.
    quantiles: break-point candidates, as quantiles of |non-salient weights|.
    """

    block_size: int = 128
    max_salient: int = 49
    stats_dtype: str = "float16"
    quantiles: tuple[float, ...] = field(
        default_factory=lambda: tuple(round(0.10 + 0.01 * i, 2) for i in range(81)))

    format: ClassVar[str] = "binary"

    def __post_init__(self):
        if not is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not is_int(self.max_salient) or not 0 <= self.max_salient <= self.block_size:
            raise ValueError(f"max_salient must be an int in 0..block_size ({self.block_size}), "
                             f"got {self.max_salient!r}")
        object.__setattr__(self, "stats_dtype", dtype_name(self.stats_dtype))
        try:
            q = tuple(float(v) for v in self.quantiles)
        except (TypeError, ValueError):
            q = ()
        if isinstance(self.quantiles, str) or not q or any(not 0.0 < v < 1.0 for v in q):
            raise ValueError(f"quantiles must be a non-empty sequence of numbers in (0, 1), "
                             f"got {self.quantiles!r}")
        object.__setattr__(self, "quantiles", q)

    bits = 1

    @property
    def label(self) -> str:
        return "binary"


CONFIG_TYPES = {cls.format: cls for cls in (QuantConfig, IntActConfig, BinaryConfig)}
AnyConfig = QuantConfig | IntActConfig | BinaryConfig


def config_to_dict(config: AnyConfig) -> dict:
    d = asdict(config)
    if "quantiles" in d:
        d["quantiles"] = list(d["quantiles"])
    return {"format": config.format, **d}


def config_from_dict(d: dict) -> AnyConfig:
    d = dict(d)
    fmt = d.pop("format", None)
    if fmt not in CONFIG_TYPES:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {sorted(CONFIG_TYPES)}")
    try:
        return CONFIG_TYPES[fmt](**d)
    except TypeError as e:
        raise ValueError(f"bad {fmt} config {d}: {e}") from None
