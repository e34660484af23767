"""Integer weights for integer-activation matmul (W8A8, W6A6, W4A4).

Format ``intact`` (version 1). Logical weight W is [N, K]; weights are
symmetric integers q in [-(2^(b-1)-1), 2^(b-1)-1] (the most negative code is
never used, so negation is exact and the range matches int8/int4 MMA inputs).

=========  ==============================  ==========================================
tensor     shape / dtype                    holds
=========  ==============================  ==========================================
qweight    w_bits 8 or 6: [N, K] int8       q[n, k]
           w_bits 4: [N, ceil(K/2)] int8    two's complement nibbles, k even in the
                                            low nibble of byte k//2, k odd in the high
scales     [N, G] float16/bfloat16/float32  s[n, i]; G = 1 (per output channel) or
                                            ceil(K / group_size)
=========  ==============================  ==========================================

W[n, k] = s[n, k // g] * q[n, k]. Activations are quantized symmetrically to
a_bits at run time, one scale per token (absmax / (2^(a-1)-1)), or with the
static per-tensor ``act_scale`` chosen at calibration; the matmul accumulates
exact integer dot products (int32) per weight group (kernels decline groups
whose sums could overflow int32: ``int32_overflow_reason``) and applies token scale
times channel scale in the epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

import torch

from .base import (
    FormatError,
    PackedWeight,
    check_finite,
    check_positive_int,
    check_tensor,
    is_int,
)
from .groupwise import SCALE_DTYPES, group_index, num_groups
from .packing import pack_int4_pairs, unpack_int4_pairs


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed ``bits``-bit quantizer."""
    return (1 << (bits - 1)) - 1


def int32_overflow_reason(a_bits: int, w_bits: int, columns: int, widen: int = 1) -> str | None:
    """Why an int32 sum over ``columns`` products of ``a_bits`` activation codes
    and ``w_bits`` weight codes (each weight code times ``widen``) could
    overflow, or None. Integer kernels keep one weight group's sum in int32."""
    if qmax(a_bits) * qmax(w_bits) * widen * columns < 2 ** 31:
        return None
    return (f"a group of {columns} columns could overflow the int32 accumulator "
            f"({w_bits}-bit weights, {a_bits}-bit activations)")


_FP32 = torch.finfo(torch.float32)


@dataclass(eq=False, repr=False)
class IntActWeight(PackedWeight):
    qweight: torch.Tensor
    scales: torch.Tensor
    w_bits: int
    a_bits: int
    group_size: int | None
    in_features: int
    act_scale: float | None = None

    FORMAT: ClassVar[str] = "intact"
    TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "scales")
    FLOATS: ClassVar[tuple[str, ...]] = ("scales",)
    META: ClassVar[tuple[str, ...]] = ("w_bits", "a_bits", "group_size", "in_features",
                                       "act_scale")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, w_bits: int, a_bits: int,
                   group_size: int | None, act_scale: float | None = None) -> "IntActWeight":
        """Store signed integer codes [N, K] and scales [N, G]."""
        k = codes.shape[1]
        packed = pack_int4_pairs(codes) if w_bits == 4 else codes.to(torch.int8).contiguous()
        obj = cls(packed, scales.contiguous(), int(w_bits), int(a_bits), group_size, int(k),
                  act_scale)
        obj.validate()
        return obj

    @property
    def bits(self) -> int:
        return self.w_bits

    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    def codes(self) -> torch.Tensor:
        """Signed integer codes, int8 [N, K]."""
        if self.w_bits == 4:
            return unpack_int4_pairs(self.qweight, self.in_features)
        return self.qweight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        gidx = group_index(self.in_features, self.group_size, self.qweight.device)
        return (self.codes().float() * self.scales.float()[:, gidx]).to(dtype)

    def check_meta(self) -> None:
        for name in ("w_bits", "a_bits"):
            if not is_int(getattr(self, name)) or getattr(self, name) not in (4, 6, 8):
                raise FormatError(f"{name} must be 4, 6 or 8 (an int), got "
                                  f"{getattr(self, name)!r}")
        check_positive_int("group_size", self.group_size, or_none=True)
        check_positive_int("in_features", self.in_features)
        # the kernels divide by it in fp32: below fp32's normal range it would
        # round to zero or a subnormal, above it to Inf
        if self.act_scale is not None and not (
                isinstance(self.act_scale, Real) and not isinstance(self.act_scale, bool)
                and _FP32.tiny <= self.act_scale <= _FP32.max):
            raise FormatError(f"act_scale must be a positive number in fp32's normal range "
                              f"[{_FP32.tiny:.3g}, {_FP32.max:.3g}], got {self.act_scale!r}")

    def validate(self) -> "IntActWeight":
        self.check_meta()
        k = self.in_features
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dim() != 2:
            raise FormatError("qweight must be a 2-D int8 tensor")
        n = self.qweight.shape[0]
        packed_k = (k + 1) // 2 if self.w_bits == 4 else k
        check_tensor("qweight", self.qweight, (n, packed_k), (torch.int8,))
        check_tensor("scales", self.scales, (n, self.num_groups), SCALE_DTYPES)
        check_finite("scales", self.scales)
        if self.qweight.numel():
            lim, codes = qmax(self.w_bits), self.codes()
            if int(codes.min()) < -lim or int(codes.max()) > lim:
                raise FormatError(f"qweight codes exceed the symmetric {self.w_bits}-bit range "
                                  f"[-{lim}, {lim}]")
        if self.scales.device != self.qweight.device:
            raise FormatError("qweight and scales live on different devices")
        return self
