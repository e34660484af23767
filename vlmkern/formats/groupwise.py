"""Group-wise integer weights (W2/W3/W4/W8) for weight-only matmul.

Format ``groupwise`` (version 1). Logical weight W is [N, K] (out, in).

=========  ==============================  ==========================================
tensor     shape / dtype                    holds
=========  ==============================  ==========================================
qweight    [N, ceil(K*b/32)] int32          codes q[n, j] in [0, 2^b-1] of stored
                                            column j, one little-endian bit stream
                                            per row (see formats.packing; 3-bit codes
                                            straddle words, no bits wasted)
scales     [N, G] float16/bfloat16/float32  s[n, i] of group i, G = ceil(K / g)
qzeros     [N, ceil(G*b/32)] int32          asymmetric only: zero points z[n, i] in
                                            [0, 2^b-1], same bit-stream rule along G.
                                            Symmetric: absent, z = 2^(b-1)
perm       [K] int32                        optional (act-order): stored column j
                                            holds logical input feature perm[j]
=========  ==============================  ==========================================

Stored column j belongs to group j // g (g = group_size, or K when None); when
K % g != 0 the last group is shorter, which is the same as zero-padding K up to
a multiple of g without storing the padding. Dequantized value:
``W[n, perm[j]] = s[n, j // g] * (q[n, j] - z[n, j // g])`` (perm = identity if
absent), computed in fp32. An act-order model (GPTQ with non-monotone g_idx)
is stored with its columns sorted by group, so groups are contiguous and a
kernel never gathers weights: it reads ``x[..., perm]`` once instead.
"""
from __future__ import annotations

from dataclasses import dataclass
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
from .packing import pack_bits, packed_words, unpack_bits

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def num_groups(in_features: int, group_size: int | None) -> int:
    g = in_features if group_size is None else group_size
    return -(-in_features // g)


def group_index(in_features: int, group_size: int | None, device=None) -> torch.Tensor:
    """Group of every stored column: int64 [K]."""
    g = in_features if group_size is None else group_size
    return torch.arange(in_features, device=device) // g


def zero_points(qzeros: torch.Tensor | None, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points int64 [N, G] from packed ``qzeros`` (None: symmetric, 2^(b-1))."""
    if qzeros is None:
        return torch.full(tuple(scales.shape), 1 << (bits - 1), dtype=torch.int64,
                          device=scales.device)
    return unpack_bits(qzeros, bits, scales.shape[1])


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     perm: torch.Tensor | None, group_size: int | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """``s * (q - z)`` in fp32 for codes [N, K] (stored order), then columns
    put back in logical order; [N, K] in ``dtype``."""
    n, k = codes.shape
    g = k if group_size is None or group_size >= k else group_size
    if k % g == 0:   # whole groups: broadcast each group's zero and scale, nothing gathered
        w = codes.reshape(n, k // g, g).float()
        w = w.sub_(zeros.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1)).reshape(n, k)
    else:
        gidx = group_index(k, group_size, codes.device)
        w = (codes - zeros[:, gidx]).float() * scales.float()[:, gidx]
    if perm is not None:
        w = torch.empty_like(w).index_copy_(1, perm.long(), w)
    return w.to(dtype)


class GroupwiseViews:
    """What a group-wise weight offers beyond its tensors, for any class with
    ``scales``, ``qzeros``, ``perm``, ``bits``, ``group_size``,
    ``in_features`` and a ``codes()`` method."""

    @property
    def sym(self) -> bool:
        return self.qzeros is None

    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    def zeros(self) -> torch.Tensor:
        """Zero points, int64 [N, G] (the implicit 2^(b-1) when symmetric)."""
        return zero_points(self.qzeros, self.scales, self.bits)

    def check_group_tensors(self, n: int) -> None:
        """Raise FormatError unless scales, zeros and permutation fit n rows
        and every tensor lives on one device."""
        k, g = self.in_features, self.num_groups
        check_tensor("scales", self.scales, (n, g), SCALE_DTYPES)
        check_finite("scales", self.scales)
        if self.qzeros is not None:
            check_tensor("qzeros", self.qzeros, (n, packed_words(g, self.bits)), (torch.int32,))
        if self.perm is not None:
            check_tensor("perm", self.perm, (k,), (torch.int32,))
            seen = torch.zeros(k, dtype=torch.bool, device=self.perm.device)
            p = self.perm.long()
            if (int(p.min()) < 0 or int(p.max()) >= k
                    or bool(seen.index_fill_(0, p, True).logical_not().any())):
                raise FormatError("perm must be a permutation of range(in_features)")
        devices = {t.device for t in self.tensors().values()}
        if len(devices) > 1:
            raise FormatError(f"tensors live on different devices: {sorted(map(str, devices))}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this object stands for, [N, K] in logical column order."""
        return dequantize_codes(self.codes(), self.scales, self.zeros(), self.perm,
                                self.group_size, dtype)


@dataclass(eq=False, repr=False)
class QuantizedWeight(GroupwiseViews, PackedWeight):
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    perm: torch.Tensor | None
    bits: int
    group_size: int | None
    in_features: int

    FORMAT: ClassVar[str] = "groupwise"
    TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "scales", "qzeros", "perm")
    FLOATS: ClassVar[tuple[str, ...]] = ("scales",)
    META: ClassVar[tuple[str, ...]] = ("bits", "group_size", "in_features")

    # -- construction -------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, group_size: int | None, perm: torch.Tensor | None = None
                   ) -> "QuantizedWeight":
        """Pack integer codes [N, K] (stored column order), scales [N, G] and
        zero points [N, G] (None for symmetric) into the canonical format."""
        n, k = codes.shape
        obj = cls(qweight=pack_bits(codes, bits), scales=scales.contiguous(),
                  qzeros=None if zeros is None else pack_bits(zeros, bits),
                  perm=None if perm is None else perm.to(torch.int32).contiguous(),
                  bits=int(bits), group_size=group_size, in_features=int(k))
        obj.validate()
        return obj

    def codes(self) -> torch.Tensor:
        """Integer codes, int64 [N, K], in stored column order."""
        return unpack_bits(self.qweight, self.bits, self.in_features)

    # -- invariants ----------------------------------------------------------------
    def check_meta(self) -> None:
        if not is_int(self.bits) or self.bits not in (2, 3, 4, 8):
            raise FormatError(f"bits must be 2, 3, 4 or 8 (an int), got {self.bits!r}")
        check_positive_int("group_size", self.group_size, or_none=True)
        check_positive_int("in_features", self.in_features)

    def validate(self) -> "QuantizedWeight":
        self.check_meta()
        k = self.in_features
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dim() != 2:
            raise FormatError("qweight must be a 2-D int32 tensor")
        n = self.qweight.shape[0]
        check_tensor("qweight", self.qweight, (n, packed_words(k, self.bits)), (torch.int32,))
        self.check_group_tensors(n)
        return self
