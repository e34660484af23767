"""Group-wise weights whose codes are held only in the CUDA kernel's layout.

A ``QuantizedWeight`` used by the tensor-core kernels lives twice on the GPU:
its canonical bit stream (``qweight``, for checkpoints and the other
kernels) and the kernels' fragment-order copy, made on the first call. The
copy is the same size as the stream, so a layer costs twice its packed bytes.

A ``LaidOutWeight`` keeps the codes only in the kernel's order (``wq``, see
``cuda_weight_only``) plus the canonical scales, zeros and permutation,
which are small: a layer costs its packed bytes once (plus the padding of
its last row block and column chunk). The kernels read ``wq`` directly;
their scale and zero words are still built on first use per activation
dtype, beside the canonical ones (32/g more bits per weight at group size
g <= 128, 0.25 above; not counted in ``nbytes``);
a checkpoint rebuilds the canonical stream exactly (``canonical()``), and
the torch reference and the prefill fallback without the layout dequantize
kernel decode the layout with torch operations (``dequantize_stored``), which
is correct but slower than a kernel.

A weight is laid out once, e.g. on the CPU before the model moves to the
GPU, so the GPU never holds both copies (``vlmkern.to_kernel_layout``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats.base import FormatError, PackedWeight, check_tensor
from ..formats.groupwise import GroupwiseViews, QuantizedWeight, dequantize_codes
from .cuda_weight_only import (
    BLOCK_ROWS,
    CHUNK,
    codes_from_layout,
    layout_codes,
    packed_codes_from_layout,
    row_block_slices,
    unsupported_reason,
)


@dataclass(eq=False, repr=False)
class LaidOutWeight(GroupwiseViews, PackedWeight):
    wq: torch.Tensor                # int32 [ceil(N/128), ceil(K/128), 8, 64*bits]
    scales: torch.Tensor            # as in QuantizedWeight
    qzeros: torch.Tensor | None
    perm: torch.Tensor | None
    bits: int
    group_size: int | None
    in_features: int

    FORMAT: ClassVar[str] = "groupwise"   # the format it saves as and computes like
    LAID_OUT: ClassVar[bool] = True       # kernels declare whether they read this
    TENSORS: ClassVar[tuple[str, ...]] = ("wq", "scales", "qzeros", "perm")
    FLOATS: ClassVar[tuple[str, ...]] = ("scales",)
    META: ClassVar[tuple[str, ...]] = ("bits", "group_size", "in_features")

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight) -> "LaidOutWeight":
        """Lay out a canonical weight's codes (raises ValueError if the kernel
        layout cannot hold it: see ``cuda_weight_only.unsupported_reason``)."""
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"expected a group-wise QuantizedWeight, got {type(qweight).__name__}")
        why = unsupported_reason(qweight)
        if why is not None:
            raise ValueError(f"the CUDA kernel layout cannot hold this weight: {why}")
        return cls(wq=layout_codes(qweight), scales=qweight.scales, qzeros=qweight.qzeros,
                   perm=qweight.perm, bits=qweight.bits, group_size=qweight.group_size,
                   in_features=qweight.in_features)

    @property
    def out_features(self) -> int:
        return int(self.scales.shape[0])

    def packed_codes(self) -> torch.Tensor:
        """The canonical bit stream ``qweight`` (rebuilt exactly; slow)."""
        return packed_codes_from_layout(self.wq, self.bits, self.out_features, self.in_features)

    def canonical(self) -> QuantizedWeight:
        """The same weight in the canonical format (rebuilt exactly; slow)."""
        return QuantizedWeight(qweight=self.packed_codes(), scales=self.scales, qzeros=self.qzeros,
                               perm=self.perm, bits=self.bits, group_size=self.group_size,
                               in_features=self.in_features)

    def codes(self) -> torch.Tensor:
        """Integer codes, int64 [N, K], in stored column order."""
        return codes_from_layout(self.wq, self.bits, self.out_features, self.in_features)

    def dequantize_stored(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [N, K] in ``dtype``, columns in stored (act-order) order:
        ``dequantize`` without the permutation, decoded from the layout a slice
        of row blocks at a time (bounded temporaries; no canonical stream)."""
        n, k = self.out_features, self.in_features
        out = torch.empty(n, k, dtype=dtype, device=self.wq.device)
        zeros = self.zeros()
        for b0, b1 in row_block_slices(*self.wq.shape[:2]):
            r0, r1 = b0 * BLOCK_ROWS, min(n, b1 * BLOCK_ROWS)
            codes = codes_from_layout(self.wq[b0:b1], self.bits, r1 - r0, k, dtype=torch.uint8)
            out[r0:r1] = dequantize_codes(codes, self.scales[r0:r1], zeros[r0:r1], None,
                                          self.group_size, dtype)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this object stands for, [N, K] in logical column order."""
        w = self.dequantize_stored(dtype)
        return w if self.perm is None else torch.empty_like(w).index_copy_(1, self.perm.long(), w)

    def validate(self) -> "LaidOutWeight":
        why = unsupported_reason(self)
        if why is not None:
            raise FormatError(f"the CUDA kernel layout cannot hold this weight: {why}")
        if not isinstance(self.scales, torch.Tensor) or self.scales.dim() != 2:
            raise FormatError("scales must be a 2-D tensor")
        n, k = self.out_features, self.in_features
        check_tensor("wq", self.wq, (-(-n // BLOCK_ROWS), -(-k // CHUNK), 8, 64 * self.bits),
                     (torch.int32,))
        self.check_group_tensors(n)
        return self
