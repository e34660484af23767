"""The protocol every quantized-weight object follows.

A quantized weight is a dataclass of packed tensors plus a few integers of
metadata. Methods produce it; kernels, modules and checkpoints consume it:
``tensors()`` and ``meta()`` are exactly what is saved, ``from_state`` is how
it is rebuilt (and validated) on load.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import torch

from ..config import is_int


class FormatError(ValueError):
    """A packed tensor set that breaks its format's invariants."""


def check_tensor(name: str, t, shape: tuple, dtypes) -> None:
    """Raise FormatError unless ``t`` is a tensor of ``shape`` with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise FormatError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FormatError(f"{name} has dtype {t.dtype}, expected one of: {names}")


def check_positive_int(name: str, value, or_none: bool = False) -> None:
    """Raise FormatError unless ``value`` is an int >= 1 (or None when ``or_none``)."""
    if value is None and or_none:
        return
    if not is_int(value) or value < 1:
        raise FormatError(f"{name} must be a positive int{' or None' if or_none else ''}, "
                          f"got {value!r}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise FormatError(f"{name} holds NaN or Inf values")


class PackedWeight:
    """Mixin for the quantized-weight dataclasses.

    Subclasses declare FORMAT, TENSORS (tensor fields, optional ones may be
    None), FLOATS (tensor fields that follow dtype moves) and META (int/bool
    fields saved as metadata), and implement ``validate`` and ``dequantize``.
    """

    FORMAT: ClassVar[str]
    TENSORS: ClassVar[tuple[str, ...]]
    FLOATS: ClassVar[tuple[str, ...]]
    META: ClassVar[tuple[str, ...]]

    # -- shape ------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return int(getattr(self, self.TENSORS[0]).shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), like nn.Linear.weight."""
        return (self.out_features, int(self.in_features))

    @property
    def device(self) -> torch.device:
        return getattr(self, self.TENSORS[0]).device

    # -- storage ----------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors that exist (optional ones that are None are left out)."""
        return {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    def meta(self) -> dict:
        return {k: getattr(self, k) for k in self.META}

    @property
    def nbytes(self) -> int:
        """Physical bytes of every stored tensor: codes, scales, zeros, bitmaps, flags."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        n, k = self.shape
        return 8.0 * self.nbytes / (n * k)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict):
        """Rebuild from saved tensors and metadata; validates every invariant."""
        unknown = set(tensors) - set(cls.TENSORS)
        if unknown:
            raise FormatError(f"{cls.FORMAT} weight got unexpected tensors {sorted(unknown)}")
        missing = set(cls.META) - set(meta)
        if missing:
            raise FormatError(f"{cls.FORMAT} weight metadata lacks {sorted(missing)}")
        kwargs = {k: tensors.get(k) for k in cls.TENSORS}
        kwargs.update({k: meta[k] for k in cls.META})
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Copy to ``device``; ``dtype`` (a float dtype) applies to scales/statistics only."""
        changes = {}
        for k, t in self.tensors().items():
            if k in self.FLOATS and dtype is not None:
                changes[k] = t.to(device=device, dtype=dtype)
            else:
                changes[k] = t.to(device=device)
        return dataclasses.replace(self, **changes)

    def cpu(self):
        return self.to("cpu")

    def __post_init__(self):
        # numpy scalars become Python numbers: the metadata is written as JSON
        # into checkpoints and as a Python literal into compiled graphs
        for name in self.META:
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                plain = int(value) if isinstance(value, numbers.Integral) else float(value)
                setattr(self, name, plain)
        # scalar fields only, no tensor reads: cheap enough for every
        # construction, so dataclasses.replace and hand-built weights are
        # checked too (ops.linear does not re-read a weight's tensors per call)
        self.check_meta()

    def check_meta(self) -> None:
        """Check the integer and float fields; ``validate`` checks the tensors too."""

    def validate(self):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        n, k = self.shape
        meta = ", ".join(f"{k}={v}" for k, v in self.meta().items() if k != "in_features")
        return (f"{type(self).__name__}({n}x{k}, {meta}, {self.nbytes} bytes, "
                f"{self.bits_per_weight:.3f} bits/weight, device={self.device})")
