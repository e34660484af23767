"""Round-to-nearest quantizers: the grid every other method rounds onto.

``group_params`` / ``quantize_to_grid`` are the shared building blocks (GPTQ
and friends call them per group on updated weights); ``quantize_rtn`` applies
them to a whole matrix and packs the result.
"""
from __future__ import annotations

import torch

from ..config import IntActConfig, QuantConfig, dtype_from_name
from ..formats import IntActWeight, QuantizedWeight
from ..formats.groupwise import group_index, num_groups
from ..formats.intact import qmax


def check_weight(weight: torch.Tensor) -> None:
    """Raise a clear error unless ``weight`` is a finite float [out, in] matrix."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty 2-D [out_features, in_features] tensor, "
                         f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.is_meta:
        raise ValueError("weight is on the meta device (a shape without values); load the "
                         "real weights before quantizing")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"weight holds {bad} NaN/Inf values; refusing to quantize")


def check_shared_input(weights) -> int:
    """Raise unless ``weights`` is a non-empty sequence of finite [N_i, K] matrices
    with one K (linears reading the same input); returns K."""
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights must be a sequence of [N_i, K] tensors (one per linear)")
    if not weights:
        raise ValueError("weights must hold at least one linear weight")
    for w in weights:
        check_weight(w)
    k = weights[0].shape[1]
    if any(w.shape[1] != k for w in weights):
        raise ValueError(f"linears sharing one input must have the same in_features, got "
                         f"{[tuple(w.shape) for w in weights]}")
    return k


# Smallest scale each narrow storage dtype stores within 1/16 of its value.
# fp16 scales below 2^-14 are subnormals, multiples of 2^-24: rounding one up
# stretches the grid by up to 2^-24 / s, and the worst-case rounding error of
# its weights (half a step) grows by that fraction. From 2^-20 down the
# stretch passes 1/16, and a scale below 2^-24 becomes 2^-24, collapsing the
# group's codes onto the zero point. (Trained ViT and LLM weights stay above
# it: their smallest W8 scales, with groups of 8, are near 2^-18.)
# bfloat16's subnormals are multiples of 2^-133: the same 1/16 is at 2^-129.
# float32 is the dtype scales are computed in: storing them loses nothing.
MIN_PRECISE_SCALE = {torch.float16: 2.0 ** -20, torch.bfloat16: 2.0 ** -129}


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their storage dtype so quantization uses what will be stored.

    Rounds up, never down: a scale rounded down shrinks the grid below the
    group's [min, max], and the extremes then clip by more than half a step.
    Raises ValueError for a nonzero scale too small (see MIN_PRECISE_SCALE)
    or too large to be stored in ``scale_dtype``.
    """
    low_limit = MIN_PRECISE_SCALE.get(scale_dtype)
    if low_limit is not None and bool(((scale > 0) & (scale < low_limit)).any()):
        smallest = float(scale[scale > 0].min())
        raise ValueError(f"weights too small for {scale_dtype} scales (a group's scale is "
                         f"{smallest:.3g}, below {low_limit:.3g} where {scale_dtype} keeps "
                         f"too few significant bits); use scale_dtype='float32'")
    stored = scale.to(scale_dtype)
    low = stored.float() < scale
    if bool(low.any()):
        stored = torch.where(low, torch.nextafter(stored, torch.full_like(stored, float("inf"))),
                             stored)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"weights too large for {scale_dtype} scales; use scale_dtype='float32'")
    return stored.float()


def group_params(w: torch.Tensor, bits: int, sym: bool,
                 scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` [R, C] (one group per row).

    Asymmetric: s = (max - min) / (2^b - 1) with min <= 0 <= max forced,
    z = round(-min / s). Symmetric: s = 2 max|w| / (2^b - 1), z = 2^(b-1).
    An all-zero group gets s = 1 (no inf/NaN). Returns fp32 scale [R] (already
    rounded to scale_dtype) and int64 zero [R].
    """
    w = w.float()
    levels = (1 << bits) - 1
    if sym:
        scale = 2 * w.abs().amax(dim=1) / levels
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scale = _round_scale(scale, scale_dtype)
        zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.int64)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / levels
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scale = _round_scale(scale, scale_dtype)
        zero = torch.round(-lo / scale).clamp(0, levels).to(torch.int64)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """Codes q = clamp(round(w / s) + z, 0, 2^b - 1); w [R, C], scale/zero broadcastable."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp(0, (1 << bits) - 1).to(torch.int64)


def _grouped(weight: torch.Tensor, group_size: int | None):
    """View [N, K] as [N * G, g] rows (zero-padding the short last group)."""
    n, k = weight.shape
    # A group at least K wide is the whole row: padding it would not move the
    # range (forced to contain 0), only allocate group_size columns per row.
    g = k if group_size is None or group_size >= k else group_size
    groups = num_groups(k, group_size)
    pad = groups * g - k
    w = torch.nn.functional.pad(weight.float(), (0, pad)) if pad else weight.float()
    return w.reshape(n * groups, g), groups, g, pad


def quantize_rtn(weight: torch.Tensor, config: QuantConfig | IntActConfig):
    """Round-to-nearest quantization of ``weight`` [out_features, in_features].

    QuantConfig -> QuantizedWeight (group-wise, weight-only kernels);
    IntActConfig -> IntActWeight (symmetric, integer-activation kernels).
    """
    check_weight(weight)
    if isinstance(config, QuantConfig):
        return _rtn_groupwise(weight, config)
    if isinstance(config, IntActConfig):
        return _rtn_intact(weight, config)
    raise TypeError(f"quantize_rtn takes a QuantConfig or IntActConfig, got "
                    f"{type(config).__name__} (binary weights come from vlmkern.binarize)")


def _rtn_groupwise(weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    n, k = weight.shape
    scale_dtype = dtype_from_name(config.scale_dtype)
    rows, groups, g, pad = _grouped(weight, config.group_size)
    # Padding columns are zeros; they never move min/max past the forced 0.
    scale, zero = group_params(rows, config.bits, config.sym, scale_dtype)
    codes = quantize_to_grid(rows, scale[:, None], zero[:, None], config.bits)
    codes = codes.reshape(n, groups * g)[:, :k]
    zeros = None if config.sym else zero.reshape(n, groups)
    return QuantizedWeight.from_codes(codes, scale.reshape(n, groups).to(scale_dtype), zeros,
                                      config.bits, config.group_size)


def _rtn_intact(weight: torch.Tensor, config: IntActConfig) -> IntActWeight:
    n, k = weight.shape
    scale_dtype = dtype_from_name(config.scale_dtype)
    rows, groups, g, pad = _grouped(weight, config.group_size)
    lim = qmax(config.w_bits)
    scale = rows.abs().amax(dim=1) / lim
    scale = _round_scale(torch.where(scale == 0, torch.ones_like(scale), scale), scale_dtype)
    codes = torch.round(rows / scale[:, None]).clamp(-lim, lim).to(torch.int8)
    codes = codes.reshape(n, groups * g)[:, :k]
    return IntActWeight.from_codes(codes, scale.reshape(n, groups).to(scale_dtype),
                                   config.w_bits, config.a_bits, config.group_size,
                                   config.act_scale)


def fake_quantize(weight: torch.Tensor, config: QuantConfig | IntActConfig) -> torch.Tensor:
    """``quantize_rtn(weight, config).dequantize()`` in the weight's dtype."""
    return quantize_rtn(weight, config).dequantize(weight.dtype)


__all__ = ["check_weight", "group_params", "quantize_to_grid", "quantize_rtn", "fake_quantize",
           "group_index"]
