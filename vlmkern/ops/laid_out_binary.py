"""Binary weights whose sign and aux bits are held only in the lookup-table
kernel's layout.

A ``BinaryWeight`` run by ``cuda.binary_lut`` lives twice on the GPU: its
bit planes and statistics (for checkpoints and the other kernels) and the
kernel's copy, made on the first call: 2-bit table indices in fragment
order, a per-row table of the 8 weight values in the activation dtype and
per-column selectors. With fp16 statistics that is about 3 + 3 bits per
weight.

A ``LaidOutBinaryWeight`` keeps the indices only in the kernel's order
(``codes``, see ``cuda_binary_lut``) plus the canonical salient flags and
statistics: the kernel's tables and selectors, small, are made from them
per activation dtype. About 2 + 1 (statistics) + 1 (tables) bits per
weight. The planes are rebuilt exactly with ``canonical()`` (for
checkpoints); ``dequantize()`` reads the layout directly.

The lookup-table kernels read it (``cuda.binary_lut`` for M <= 64 and, opt-in,
its staged and Hopper variants), and so does the opt-in prefill path
``cuda.binary_lut_dequant_cublas`` (a CUDA kernel writes the dense weight from
the layout, then cuBLAS); the plane kernels do not, so a prefill-sized call
without those falls back to ``dequantize()`` and a dense GEMM (the torch
reference), which is correct but slower.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats.base import FormatError, PackedWeight, check_finite, check_tensor
from ..formats.binary import STATS_PER_BLOCK, BinaryWeight, decode_indices
from ..formats.groupwise import SCALE_DTYPES
from ..formats.packing import pack_bits, packed_words, unpack_bits
from .cuda_binary_lut import BLOCK, lut_codes, lut_index, unsupported_reason
from .cuda_weight_only import row_block_slices


@dataclass(eq=False, repr=False)
class LaidOutBinaryWeight(PackedWeight):
    codes: torch.Tensor       # int32 [ceil(N/128), ceil(K/128), 8, 128]
    salient: torch.Tensor     # as in BinaryWeight
    stats: torch.Tensor       # as in BinaryWeight
    block_size: int
    in_features: int

    FORMAT: ClassVar[str] = "binary"      # the format it saves as and computes like
    LAID_OUT: ClassVar[bool] = True       # kernels declare whether they read this
    TENSORS: ClassVar[tuple[str, ...]] = ("codes", "salient", "stats")
    FLOATS: ClassVar[tuple[str, ...]] = ("stats",)
    META: ClassVar[tuple[str, ...]] = ("block_size", "in_features")
    bits: ClassVar[int] = 1

    @classmethod
    def from_binary(cls, qweight: BinaryWeight) -> "LaidOutBinaryWeight":
        """Lay out a binary weight's planes (raises ValueError for a block size
        the layout cannot hold)."""
        if not isinstance(qweight, BinaryWeight):
            raise TypeError(f"expected a BinaryWeight, got {type(qweight).__name__}")
        why = unsupported_reason(qweight)
        if why is not None:
            raise ValueError(f"the lookup-table layout cannot hold this weight: {why}")
        return cls(codes=lut_codes(qweight), salient=qweight.salient, stats=qweight.stats,
                   block_size=qweight.block_size, in_features=qweight.in_features)

    @property
    def out_features(self) -> int:
        return int(self.stats.shape[0])

    def _row_slices(self):
        """(first row, row count, codes of those row blocks), a slice of row
        blocks at a time: bounds the temporaries of ``lut_index``."""
        for b0, b1 in row_block_slices(*self.codes.shape[:2]):
            rows = min(self.out_features, b1 * BLOCK) - b0 * BLOCK
            yield b0 * BLOCK, rows, self.codes[b0:b1]

    def canonical(self) -> BinaryWeight:
        """The same weight with its sign and aux planes (rebuilt exactly; slow)."""
        n, k = self.shape
        words = packed_words(k, 1)
        sign = torch.empty(n, words, dtype=torch.int32, device=self.codes.device)
        aux = torch.empty_like(sign)
        for r0, rows, codes in self._row_slices():
            index = lut_index(codes, rows, k)
            sign[r0:r0 + rows] = pack_bits(index & 1, 1)
            aux[r0:r0 + rows] = pack_bits(index >> 1, 1)
        return BinaryWeight(sign=sign, aux=aux, salient=self.salient, stats=self.stats,
                            block_size=self.block_size, in_features=k)

    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.canonical().planes()

    def salient_fraction(self) -> float:
        return float(unpack_bits(self.salient, 1, self.in_features).float().mean())

    def nominal_bits_per_weight(self) -> float:
        return 1.0 + self.salient_fraction()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K], read from the layout: each weight's value from
        the same fp32 table ``BinaryWeight.dequantize`` computes, so the same
        bits."""
        if self.codes.is_cuda:
            warnings.warn("a binary weight held in the lookup-table layout is dequantized with "
                          "torch operations (as calls the table kernels decline, prefill sizes, "
                          "are run), which is slower than the plane kernels; "
                          "VLMKERN_ENABLE=cuda.binary_lut_dequant_cublas dequantizes it with a "
                          "CUDA kernel instead", stacklevel=2)
        k = self.in_features
        slices = ((r0, lut_index(codes, rows, k)) for r0, rows, codes in self._row_slices())
        return decode_indices(self.stats, self.salient, self.block_size, k, slices, dtype)

    def validate(self) -> "LaidOutBinaryWeight":
        k, b = self.in_features, self.block_size
        if not isinstance(k, int) or k < 1:
            raise FormatError(f"in_features must be a positive int, got {k!r}")
        if b != BLOCK:
            raise FormatError(f"the lookup-table layout takes block_size {BLOCK}, got {b!r}")
        if not isinstance(self.stats, torch.Tensor) or self.stats.dim() != 3:
            raise FormatError("stats must be a 3-D tensor")
        n = self.stats.shape[0]
        check_tensor("codes", self.codes, (-(-n // BLOCK), -(-k // BLOCK), 8, 128), (torch.int32,))
        check_tensor("salient", self.salient, (packed_words(k, 1),), (torch.int32,))
        check_tensor("stats", self.stats, (n, -(-k // b), STATS_PER_BLOCK), SCALE_DTYPES)
        check_finite("stats", self.stats)
        if len({t.device for t in self.tensors().values()}) > 1:
            raise FormatError("binary weight tensors live on different devices")
        return self
