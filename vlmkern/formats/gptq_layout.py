"""Import/export of the GPTQ checkpoint layout used on model hubs.

A GPTQ linear stores, for W [N, K] with b-bit codes and G groups:

=========  =======================  ================================================
tensor     shape / dtype            holds
=========  =======================  ================================================
qweight    [K*b/32, N] int32        codes packed along K (same little-endian bit
                                    stream as vlmkern, transposed: column n of
                                    qweight is row n of vlmkern's qweight)
qzeros     [G, N*b/32] int32        zero points packed along N. ``gptq`` (v1)
                                    stores z - 1, ``gptq_v2`` stores z
scales     [G, N] float16           per-group scales
g_idx      [K] int32                group of every logical input column
=========  =======================  ================================================

Dequantization: W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]).
Symmetric checkpoints still store zeros (all 2^(b-1)). An act-order
checkpoint has a non-monotone g_idx; on import its columns are sorted by
group into vlmkern's ``perm`` so kernels never gather weights.
The v1 convention cannot express z = 0 (it would be stored as -1 and read
back as 2^b): export refuses it with an explanation; use ``gptq_v2``.
"""
from __future__ import annotations

import torch

from .base import FormatError, check_positive_int, is_int
from .groupwise import GroupwiseViews, QuantizedWeight, group_index, num_groups
from .packing import pack_bits, unpack_bits

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                         f"got {checkpoint_format!r}")


def to_gptq(weight: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """GPTQ tensors (qweight, qzeros, scales, g_idx) for a group-wise weight."""
    _check_format(checkpoint_format)
    if not isinstance(weight, GroupwiseViews):
        raise TypeError(f"to_gptq takes a group-wise QuantizedWeight (the GPTQ layout holds "
                        f"W2/W3/W4/W8 codes with zero points), got {type(weight).__name__}")
    n, k = weight.shape
    b = weight.bits
    if (k * b) % 32 or (n * b) % 32:
        raise FormatError(f"the GPTQ layout packs whole int32 words: in_features*bits ({k}*{b}) "
                          f"and out_features*bits ({n}*{b}) must be multiples of 32")
    codes = weight.codes()
    zeros = weight.zeros()
    gidx = group_index(k, weight.group_size, codes.device)
    if weight.perm is not None:                   # back to logical column order
        p = weight.perm.long()
        codes = torch.empty_like(codes).index_copy_(1, p, codes)
        gidx = torch.empty_like(gidx).index_copy_(0, p, gidx)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise FormatError("a zero point of 0 cannot be stored in the GPTQ v1 layout "
                              "(it stores z - 1); export with checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    return {
        "qweight": pack_bits(codes, b).t().contiguous(),
        "qzeros": pack_bits(zeros.t(), b).contiguous(),
        "scales": weight.scales.t().contiguous(),
        "g_idx": gidx.to(torch.int32),
    }


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor | None, bits: int, group_size: int | None,
              sym: bool | None = None, checkpoint_format: str = "gptq") -> QuantizedWeight:
    """Build a QuantizedWeight from GPTQ tensors.

    group_size: the checkpoint's group size (-1 or None: one group per row).
    sym: None infers it (all zero points 2^(b-1)); True insists on it.
    """
    _check_format(checkpoint_format)
    if not is_int(bits) or bits not in (2, 3, 4, 8):
        raise FormatError(f"GPTQ bits must be 2, 3, 4 or 8 (an int), got {bits!r}")
    if group_size is None or (is_int(group_size) and group_size == -1):
        group_size = None
    else:
        check_positive_int("GPTQ group_size (-1 or None: one group per row)", group_size)
    if sym is not None and not isinstance(sym, bool):
        raise TypeError(f"sym must be True, False or None (infer), got {sym!r}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
            raise FormatError(f"GPTQ {name} must be a 2-D int32 tensor")
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2:
        raise FormatError("GPTQ scales must be a 2-D tensor")
    n = qweight.shape[1]
    k = qweight.shape[0] * 32 // bits
    g = num_groups(k, group_size)
    if tuple(scales.shape) != (g, n):
        raise FormatError(f"GPTQ scales have shape {tuple(scales.shape)}, expected {(g, n)} "
                          f"for in_features={k}, group_size={group_size}")
    if tuple(qzeros.shape) != (g, n * bits // 32) or (n * bits) % 32:
        raise FormatError(f"GPTQ qzeros have shape {tuple(qzeros.shape)}, expected "
                          f"{(g, n * bits / 32)}")
    codes = unpack_bits(qweight.t().contiguous(), bits, k)              # [N, K] logical
    zeros = unpack_bits(qzeros, bits, n).t()                            # [N, G]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
        if bool((zeros >= (1 << bits)).any()):
            raise FormatError(f"GPTQ v1 zero point overflows to 2^{bits} (stored as -1): "
                              "this checkpoint is not representable; was it gptq_v2?")
    perm = _perm_from_g_idx(g_idx, k, group_size)
    if perm is not None:
        codes = codes[:, perm]
    if sym is None:
        sym = bool((zeros == (1 << (bits - 1))).all())
    elif sym and not bool((zeros == (1 << (bits - 1))).all()):
        raise FormatError(f"checkpoint declared symmetric but its zero points are not all "
                          f"2^{bits - 1}")
    return QuantizedWeight.from_codes(codes, scales.t().contiguous(), None if sym else zeros,
                                      bits, group_size, perm)


def _perm_from_g_idx(g_idx, k: int, group_size: int | None) -> torch.Tensor | None:
    """None for the trivial g_idx (j // g); else the stable sort of g_idx."""
    if g_idx is None:
        return None
    if not isinstance(g_idx, torch.Tensor) or tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
        raise FormatError(f"GPTQ g_idx must be an integer tensor of shape ({k},)")
    g_idx = g_idx.long()
    expected = group_index(k, group_size, g_idx.device)
    if torch.equal(g_idx, expected):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        raise FormatError("GPTQ g_idx does not assign group_size columns to each group; "
                          "it is not a valid grouping for this group size")
    return perm
