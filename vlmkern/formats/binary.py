"""BiLLM-style binarized weights.

Format ``binary`` (version 1). Logical weight W is [N, K]; columns form blocks
of B = block_size (128) consecutive input features (the last block may be
shorter). Within a block a few *salient* columns are binarized twice
(residual binarization, two sign planes); every other weight is binarized
once, in one of two groups split by a magnitude break point.

=========  ==============================  ==========================================
tensor     shape / dtype                    holds
=========  ==============================  ==========================================
sign       [N, ceil(K/32)] int32            bit stream (formats.packing rule, 1 bit
                                            per weight): s = +1 if bit else -1
aux        [N, ceil(K/32)] int32            salient column: second residual sign a;
                                            other column: group bit (1 = outer group,
                                            |w| >= break point)
salient    [ceil(K/32)] int32               1 bit per column: column is salient
stats      [N, ceil(K/B), 8] float16/...    per row and block: (mu1, alpha1, mu2,
                                            alpha2) of the salient planes, then
                                            (mu, alpha) of the inner and outer group
=========  ==============================  ==========================================

Decoding weight (n, k) in block b = k // B:
  salient:  w = mu1 + alpha1*s + mu2 + alpha2*a
  otherwise, group t = aux bit: w = mu_t + alpha_t*s

Bits: the BiLLM paper counts 2 bits per salient and 1 per other weight
(``nominal_bits_per_weight``, ~1.08 with r = salient fraction). Storage here
is 2 bits per weight (sign + aux; the group bit is unavoidable for the split),
plus 8 fp16 statistics per 128 weights of a row (1 bit per weight), plus one
flag per column: ``bits_per_weight`` is ~3.0 for fp16 statistics.
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
)
from .groupwise import SCALE_DTYPES
from .packing import pack_bits, packed_words, unpack_bits

STATS_PER_BLOCK = 8
_SLICE_WEIGHTS = 1 << 24


def block_values(stats: torch.Tensor) -> torch.Tensor:
    """The 8 values a weight of each row and block can take, fp32 [N, blocks, 8],
    from the statistics [N, blocks, 8]: entry ``s + 2a`` (s the sign bit, a the
    aux bit) for an ordinary column, ``4 + s + 2a`` for a salient one. Each is
    the decoding rule above in fp32, its operations in the rule's order (the
    sign and aux factors are exactly +-1)."""
    st = stats.float()
    dev = st.device
    s = torch.tensor([-1.0, 1.0, -1.0, 1.0], device=dev)            # sign of entry e
    a = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=dev)            # aux of entry e
    outer = a > 0
    mu = torch.where(outer, st[..., 6:7], st[..., 4:5])
    alpha = torch.where(outer, st[..., 7:8], st[..., 5:6])
    ordinary = mu + alpha * s
    salient = st[..., 0:1] + st[..., 1:2] * s + st[..., 2:3] + st[..., 3:4] * a
    return torch.cat([ordinary, salient], dim=-1)


def decode_indices(stats: torch.Tensor, salient: torch.Tensor, block_size: int,
                   in_features: int, index_slices, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` from each weight's index s + 2a, given
    as (first row, int64 indices [rows, K]) slices: each weight's value is
    entry s + 2a (+ 4 in a salient column) of its row and block's 8 values."""
    n, k = stats.shape[0], in_features
    dev = stats.device
    values = block_values(stats).reshape(n, -1)                     # [N, blocks * 8]
    column = (8 * (torch.arange(k, device=dev) // block_size)
              + 4 * unpack_bits(salient, 1, k))                      # block, salient half
    out = torch.empty(n, k, dtype=dtype, device=dev)
    for r0, index in index_slices:
        r1 = r0 + index.shape[0]
        out[r0:r1] = values[r0:r1].gather(1, index.add_(column)).to(dtype)
    return out


@dataclass(eq=False, repr=False)
class BinaryWeight(PackedWeight):
    sign: torch.Tensor
    aux: torch.Tensor
    salient: torch.Tensor
    stats: torch.Tensor
    block_size: int
    in_features: int

    FORMAT: ClassVar[str] = "binary"
    TENSORS: ClassVar[tuple[str, ...]] = ("sign", "aux", "salient", "stats")
    FLOATS: ClassVar[tuple[str, ...]] = ("stats",)
    META: ClassVar[tuple[str, ...]] = ("block_size", "in_features")
    bits: ClassVar[int] = 1

    @classmethod
    def from_planes(cls, sign: torch.Tensor, aux: torch.Tensor, salient: torch.Tensor,
                    stats: torch.Tensor, block_size: int) -> "BinaryWeight":
        """Pack boolean planes sign/aux [N, K], salient [K] and stats [N, nblocks, 8]."""
        k = sign.shape[1]
        obj = cls(pack_bits(sign.to(torch.int64), 1), pack_bits(aux.to(torch.int64), 1),
                  pack_bits(salient.to(torch.int64), 1), stats.contiguous(), int(block_size),
                  int(k))
        obj.validate()
        return obj

    @property
    def num_blocks(self) -> int:
        return -(-self.in_features // self.block_size)

    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boolean sign [N, K], aux [N, K] and salient [K] planes."""
        k = self.in_features
        return (unpack_bits(self.sign, 1, k).bool(), unpack_bits(self.aux, 1, k).bool(),
                unpack_bits(self.salient, 1, k).bool())

    def salient_fraction(self) -> float:
        return float(self.planes()[2].float().mean())

    def nominal_bits_per_weight(self) -> float:
        """The paper's count: 2 bits per salient weight, 1 per other weight."""
        return 1.0 + self.salient_fraction()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K]: each weight picks its value from its row and
        block's 8 values (``block_values``), by its sign, aux and salient bits."""
        n, k = self.sign.shape[0], self.in_features
        step = max(1, _SLICE_WEIGHTS // k)       # rows at a time: bounds the int64 indices
        slices = ((r0, unpack_bits(self.aux[r0:r0 + step], 1, k).mul_(2).add_(
            unpack_bits(self.sign[r0:r0 + step], 1, k))) for r0 in range(0, n, step))
        return decode_indices(self.stats, self.salient, self.block_size, k, slices, dtype)

    def check_meta(self) -> None:
        check_positive_int("in_features", self.in_features)
        check_positive_int("block_size", self.block_size)

    def validate(self) -> "BinaryWeight":
        self.check_meta()
        k = self.in_features
        if not isinstance(self.sign, torch.Tensor) or self.sign.dim() != 2:
            raise FormatError("sign must be a 2-D int32 tensor")
        n, words = self.sign.shape[0], packed_words(k, 1)
        check_tensor("sign", self.sign, (n, words), (torch.int32,))
        check_tensor("aux", self.aux, (n, words), (torch.int32,))
        check_tensor("salient", self.salient, (words,), (torch.int32,))
        check_tensor("stats", self.stats, (n, self.num_blocks, STATS_PER_BLOCK), SCALE_DTYPES)
        check_finite("stats", self.stats)
        if len({t.device for t in self.tensors().values()}) > 1:
            raise FormatError("binary weight tensors live on different devices")
        return self
