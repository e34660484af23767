"""SmoothQuant: move activation outliers into the weights before integer-
activation quantization (W8A8, W6A6, W4A4).

Per-token activation quantization spends one scale on a whole token, so a few
input channels that are 10-100x larger than the rest crush every other
channel onto a handful of levels. For the linears reading one input x (q/k/v,
gate/up) the identity x W^T = (x / s)(W s)^T holds for any s > 0; choosing

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|W_j| over every row of every linear sharing the input) balances the two
ranges: after smoothing max|X_j / s_j| = max|X_j|^(1-alpha) max|W_j|^(1-alpha)
and max|W_j s_j| = max|X_j|^alpha max|W_j|^alpha, equal at alpha = 0.5. 1/s
is folded into the norm or linear that produces x (the helpers of
:mod:`vlmkern.quant.awq`), so the run-time kernel is unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import IntActConfig
from ..formats import IntActWeight
from .awq import fold_scales_into_linear, fold_scales_into_norm
from .rtn import check_shared_input, quantize_rtn


def activation_absmax(x: torch.Tensor) -> torch.Tensor:
    """max_t |x_tj| per input channel: x [T, K] (tokens flattened) -> fp32 [K]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty [tokens, in_features] tensor")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("calibration inputs x hold NaN/Inf values")
    return x.detach().abs().amax(dim=0).float()


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |W[:, j]| over the rows of every linear sharing the input -> fp32 [K]."""
    check_shared_input(weights)
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                  alpha: float = 0.5) -> torch.Tensor:
    """s_j = act_absmax_j^alpha / weight_absmax_j^(1 - alpha), fp32 [K].

    A channel whose activation or weight maximum is 0 gets s_j = 1: it
    carries nothing, and 0 or inf would poison the folded norm weights.
    alpha = 0 gives 1 / max|W_j| (weights normalised, activations scaled by
    the weight maxima only); alpha = 1 gives max|X_j|.
    """
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise ValueError(f"act_absmax and weight_absmax must both be [K], got "
                         f"{tuple(act_absmax.shape)} and {tuple(weight_absmax.shape)}")
    xa, wa = act_absmax.double(), weight_absmax.double()
    if not bool(torch.isfinite(xa).all() & torch.isfinite(wa).all()):
        raise ValueError("act_absmax / weight_absmax hold NaN/Inf values")
    if bool((xa < 0).any() | (wa < 0).any()):
        raise ValueError("act_absmax / weight_absmax must be non-negative")
    live = (xa > 0) & (wa > 0)
    s = xa.where(live, 1.0).pow(a) / wa.where(live, 1.0).pow(1.0 - a)
    s = torch.where(live, s, torch.ones_like(s)).float()
    if not bool(torch.isfinite(s).all() & (s > 0).all()):
        raise ValueError("smoothing scales under/overflow fp32; check the calibration ranges")
    return s


def smooth_weights(weights: Sequence[torch.Tensor], act_absmax: torch.Tensor,
                   alpha: float = 0.5) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Smooth the linears ``weights`` (each [N_i, K]) that share one input.

    act_absmax: [K] per-channel max |x| over calibration tokens. Returns
    (list of W_i s in each weight's dtype, s fp32 [K]); the op producing x must
    then be divided by s (fold_scales_into_norm / fold_scales_into_linear).
    """
    s = smooth_scales(act_absmax, weight_absmax(weights), alpha)
    smoothed = []
    for i, w in enumerate(weights):
        ws = (w.double() * s.double().to(w.device)).to(w.dtype)
        if not bool(torch.isfinite(ws).all()):
            raise ValueError(f"weight {i} times the smoothing scales overflows {w.dtype} (scales "
                             f"up to {float(s.max()):.3g}): pass the weights in float32, or a "
                             f"smaller alpha")
        smoothed.append(ws)
    return smoothed, s


def smoothquant_quantize(weights: Sequence[torch.Tensor], act_absmax: torch.Tensor,
                         config: IntActConfig | None = None, alpha: float = 0.5
                         ) -> tuple[list[IntActWeight], torch.Tensor]:
    """Smooth, then RTN-quantize each W_i s for integer-activation kernels.

    Returns (list of IntActWeight standing for W_i s, s fp32 [K]). The layer
    computes int_act_matmul(x / s, ...), x / s coming from the folded op.
    """
    config = config or IntActConfig()
    if not isinstance(config, IntActConfig):
        raise TypeError(f"SmoothQuant targets integer-activation formats (IntActConfig), got "
                        f"{type(config).__name__}")
    smoothed, s = smooth_weights(weights, act_absmax, alpha)
    return [quantize_rtn(w, config) for w in smoothed], s


__all__ = ["activation_absmax", "weight_absmax", "smooth_scales", "smooth_weights",
           "smoothquant_quantize", "fold_scales_into_norm", "fold_scales_into_linear"]
