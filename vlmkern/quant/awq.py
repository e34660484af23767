"""AWQ-style activation-aware scaling for group-wise weight-only quantization.

Linears that read the same input x (q/k/v after one norm, gate/up) share one
per-input-channel scale s [K]: the layer computes (x / s) Q(W s)^T, and 1/s is
folded into the op that produces x (a norm's weight, or the rows of the
previous linear), so the scaling costs nothing at run time. Scaling column j
up by s_j > 1 makes its rounding error relatively smaller, which pays off on
the channels whose inputs are large.

Search (per scaling group, calibration tokens X [T, K]):
  s = xbar^r with xbar = mean_t |x_tj|, r in {0, 1/n, ..., (n-1)/n}, normalised
  so that sqrt(max(s) min(s)) = 1 (as AWQ's code; the product of the extremes
  is 1, the rounding grid is centred in log-scale), minimising the output MSE
  of the block the linears feed with Q(W_i s)/s in place of W_i (a callable
  the caller gives: the model engine runs the attention or MLP block), or
  by default the linears' own sum_i ||X W_i^T - (X/s) Q(W_i s)^T||^2 =
  sum_i tr(D_i G D_i^T) with D_i = W_i - Q(W_i s)/s and G = X^T X.
Then a clip search per linear: each (row, quantization group) range
[min, max] of W s is shrunk by a ratio in [min_ratio, 1], one coordinate-
descent sweep over the groups of a row using the exact row output error
(cross-group correlations included), so the error never exceeds clip = 1.

The default losses and the clip search are fp64 (the Gram matrix is K x K;
the error differences between candidates are small compared with the
error); a block error runs the block in the model's dtype and sums in fp64.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import QuantConfig, config_float, dtype_from_name, is_int
from ..formats import QuantizedWeight
from ..formats.groupwise import num_groups
from .rtn import check_shared_input, check_weight, group_params, quantize_to_grid

_XBAR_FLOOR = 1e-4      # channels with mean|x| below this fraction of the largest


@dataclass(frozen=True)
class AWQConfig:
    """quant: the group-wise format. n_grid: exponents r = i / n_grid, i < n_grid.
    clip_steps / min_clip: clip ratios linspace(1, min_clip, clip_steps);
    clip_steps = 1 turns the clip search off."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    n_grid: int = 20
    clip_steps: int = 20
    min_clip: float = 0.5

    def __post_init__(self):
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"AWQConfig.quant must be a QuantConfig, "
                            f"got {type(self.quant).__name__}")
        for name in ("n_grid", "clip_steps"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"AWQConfig.{name} must be a positive int, got {v!r}")
        if not 0.0 < config_float("AWQConfig", "min_clip", self.min_clip) <= 1.0:
            raise ValueError(f"AWQConfig.min_clip must be in (0, 1], got {self.min_clip!r}")


def _check_quant(config) -> None:
    if not isinstance(config, QuantConfig):
        hint = " (pass the AWQConfig's .quant)" if isinstance(config, AWQConfig) else ""
        raise TypeError(f"config must be a QuantConfig{hint}, got {type(config).__name__}")


def _check_inputs(weights: Sequence[torch.Tensor], x: torch.Tensor) -> int:
    k = check_shared_input(weights)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k or x.shape[0] == 0:
        raise ValueError(f"x must be calibration inputs [T, {k}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("calibration inputs x hold NaN/Inf values")
    return k


def _check_scales(scales: torch.Tensor, k: int) -> None:
    if tuple(scales.shape) != (k,):
        raise ValueError(f"scales must have shape ({k},), got {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ValueError("scales must be finite and positive")


def _group_rows(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[N, K] -> [N, G, g] fp64, zero-padding the short last group (zeros never
    move a range that is forced to contain 0)."""
    n, k = w.shape
    # a group at least K wide is the whole row: no group_size-wide padding
    g = k if group_size is None or group_size >= k else group_size
    groups = num_groups(k, group_size)
    w = torch.nn.functional.pad(w, (0, groups * g - k))
    return w.reshape(n, groups, g)


def _quantize(w: torch.Tensor, config: QuantConfig, clip: torch.Tensor | None = None):
    """RTN of ``w`` [N, K] on the group grid, each group's range [min, max]
    (symmetric: [-max|w|, max|w|]) shrunk by ``clip`` [N, G] first.

    Returns (codes [N, K] int64, scale [N, G] fp32, zero [N, G] int64,
    dequantized [N, K] fp64). clip None (or all ones) is exactly quantize_rtn.
    """
    n, k = w.shape
    grouped = _group_rows(w.float(), config.group_size)
    groups, g = grouped.shape[1], grouped.shape[2]
    rows = grouped.reshape(n * groups, g)
    ranged = rows
    if clip is not None:
        c = clip.reshape(-1, 1).to(rows)
        if config.sym:
            hi = rows.abs().amax(dim=1, keepdim=True) * c
            lo = -hi
        else:
            lo = rows.amin(dim=1, keepdim=True).clamp(max=0) * c
            hi = rows.amax(dim=1, keepdim=True).clamp(min=0) * c
        # group_params reads the range from the values: hand it the clipped ones
        ranged = torch.minimum(torch.maximum(rows, lo), hi)
    scale, zero = group_params(ranged, config.bits, config.sym, dtype_from_name(config.scale_dtype))
    codes = quantize_to_grid(rows, scale[:, None], zero[:, None], config.bits)
    deq = ((codes - zero[:, None]).double() * scale.double()[:, None])
    deq = deq.reshape(n, groups * g)[:, :k]
    return (codes.reshape(n, groups * g)[:, :k], scale.reshape(n, groups),
            zero.reshape(n, groups), deq)


def _gram(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return xd.T @ xd


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """||X W^T - X A^T||^2 for x [T, K], weight and approx [N, K] (fp64)."""
    return float(((weight.double() - approx.double()) @ x.double().T).pow(2).sum())


def candidate_scales(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """s = xbar^ratio [K] (fp32), xbar = mean_t |x_tj| floored at 1e-4 max(xbar)
    so dead channels get a finite scale, normalised to sqrt(max s * min s) = 1."""
    xbar = x.double().abs().mean(dim=0)
    top = float(xbar.max())
    if top == 0:
        return torch.ones(x.shape[1], device=x.device)
    s = xbar.clamp(min=_XBAR_FLOOR * top).pow(float(ratio))
    s = s / (s.max() * s.min()).sqrt()
    return s.float()


def awq_search_scales(weights: Sequence[torch.Tensor], x: torch.Tensor,
                      config: QuantConfig, n_grid: int = 20,
                      block_error: Callable[[list[torch.Tensor]], float] | None = None
                      ) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Scale search for linears ``weights`` (each [N_i, K]) reading inputs ``x`` [T, K].

    Returns (scales [K] fp32, best ratio r, loss per r [n_grid] fp64). The loss
    of a candidate s is ``block_error([Q(W_i s) / s for each i])`` (fp64
    weights standing for the W_i: the output error of the block the linears
    belong to, e.g. the attention block for q/k/v), or without it the linears'
    own output error sum_i ||X W_i^T - (X/s) Q(W_i s)^T||^2. r = 0 gives s = 1,
    plain RTN, so the chosen scales never do worse than RTN by that loss.
    """
    _check_quant(config)
    _check_inputs(weights, x)
    if block_error is not None and not callable(block_error):
        raise TypeError(f"block_error must be callable, got {type(block_error).__name__}")
    gram = _gram(x) if block_error is None else None
    losses, best = [], None
    for i in range(n_grid):
        r = i / n_grid
        s = candidate_scales(x, r)
        approx = [_quantize(w.float() * s, config)[3] / s.double() for w in weights]
        if block_error is None:
            loss = 0.0
            for w, a in zip(weights, approx):
                d = w.double() - a
                loss += float(((d @ gram) * d).sum())
        else:
            loss = float(block_error(approx))
            if not math.isfinite(loss):
                raise ValueError(f"block_error returned {loss} for ratio {r}")
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, r, s)
    return best[2], best[1], torch.tensor(losses, dtype=torch.float64)


def awq_search_clip(weight: torch.Tensor, x: torch.Tensor, config: QuantConfig,
                    scales: torch.Tensor | None = None, steps: int = 20,
                    min_ratio: float = 0.5) -> torch.Tensor:
    """Clip ratio [N, G] (fp32) of every row and quantization group of ``weight`` [N, K].

    Works on W s with inputs X / s (scales None: s = 1). One sweep over the
    groups; at group j each row takes the ratio in linspace(1, min_ratio,
    steps) minimising its exact output error sum_t (x_t . (w - q))^2 given the
    groups already set, so no row's error exceeds its clip = 1 error.
    """
    _check_quant(config)
    _check_inputs([weight], x)
    n, k = weight.shape
    s = torch.ones(k, device=weight.device) if scales is None else scales.float()
    _check_scales(s, k)
    ws = weight.float() * s
    sd = s.double()
    gram = _gram(x).to(weight.device) / (sd[:, None] * sd[None, :])   # Gram of X / s
    ratios = torch.linspace(1.0, float(min_ratio), steps, dtype=torch.float64)
    groups = num_groups(k, config.group_size)
    g = k if config.group_size is None else config.group_size
    clip = torch.ones(n, groups, dtype=torch.float32, device=weight.device)
    wd = ws.double()
    delta = wd - _quantize(ws, config)[3]                   # all groups at ratio 1
    c_rows = ratios.float().to(weight.device).repeat_interleave(n)[:, None]
    for j in range(groups):
        cols = slice(j * g, min((j + 1) * g, k))
        g_jj = gram[cols, cols]
        # rows' coupling of group j to every other column: delta_rest G[rest, j]
        b = delta @ gram[:, cols] - delta[:, cols] @ g_jj
        # one group per row of the slice, every ratio at once: [steps * N, width]
        part = ws[:, cols].repeat(steps, 1)
        cand = (part.double() - _quantize(part, config, c_rows)[3]).reshape(steps, n, -1)
        err = 2 * (cand * b).sum(-1) + ((cand @ g_jj) * cand).sum(-1)    # [steps, N]
        pick = torch.argmin(err, dim=0)          # first minimum: ties keep the larger ratio
        clip[:, j] = ratios[pick].float()
        delta[:, cols] = cand[pick, torch.arange(n)]
    return clip


def apply_awq(weight: torch.Tensor, scales: torch.Tensor | None, clip: torch.Tensor | None,
              config: QuantConfig) -> QuantizedWeight:
    """Quantize W s (``weight`` [N, K], ``scales`` [K] or None) with group ranges
    shrunk by ``clip`` [N, G] (None: no clipping). The result stands for W s:
    its input must be x / s, folded into the previous op with
    :func:`fold_scales_into_norm` or :func:`fold_scales_into_linear`."""
    _check_quant(config)
    check_weight(weight)
    n, k = weight.shape
    ws = weight.float()
    if scales is not None:
        _check_scales(scales, k)
        ws = ws * scales.float().to(ws.device)
    if clip is not None and tuple(clip.shape) != (n, num_groups(k, config.group_size)):
        raise ValueError(f"clip must have shape ({n}, {num_groups(k, config.group_size)}), "
                         f"got {tuple(clip.shape)}")
    codes, scale, zero, _ = _quantize(ws, config, clip)
    return QuantizedWeight.from_codes(codes, scale.to(dtype_from_name(config.scale_dtype)),
                                      None if config.sym else zero, config.bits,
                                      config.group_size)


def awq_quantize(weights: Sequence[torch.Tensor], x: torch.Tensor,
                 config: AWQConfig | None = None):
    """Scale search, clip search and quantization of linears sharing input ``x`` [T, K].

    Returns (list of QuantizedWeight standing for W_i s, scales [K], info) with
    info = {"ratio": r, "losses": loss per r, "clip": list of [N_i, G] ratios}.
    The caller folds 1/s into the op producing x.
    """
    config = AWQConfig() if config is None else config
    if not isinstance(config, AWQConfig):
        hint = " (wrap it: AWQConfig(quant=...))" if isinstance(config, QuantConfig) else ""
        raise TypeError(f"config must be an AWQConfig{hint}, got {type(config).__name__}")
    scales, ratio, losses = awq_search_scales(weights, x, config.quant, config.n_grid)
    clips = [awq_search_clip(w, x, config.quant, scales, config.clip_steps, config.min_clip)
             if config.clip_steps > 1 else None for w in weights]
    qws = [apply_awq(w, scales, c, config.quant) for w, c in zip(weights, clips)]
    return qws, scales, {"ratio": ratio, "losses": losses, "clip": clips}


def fold_scales_into_norm(norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
                          scales: torch.Tensor):
    """RMSNorm/LayerNorm affine (gamma [K], beta [K] or None) producing x / s:
    gamma / s, beta / s, in the parameters' dtypes."""
    _check_scales(scales, norm_weight.shape[0])
    s = scales.double().to(norm_weight.device)
    w = (norm_weight.double() / s).to(norm_weight.dtype)
    b = None if norm_bias is None else (norm_bias.double() / s).to(norm_bias.dtype)
    return w, b


def fold_scales_into_linear(weight: torch.Tensor, bias: torch.Tensor | None,
                            scales: torch.Tensor):
    """Previous linear (weight [K, K_prev], bias [K] or None) producing x / s:
    output row j and bias j divided by s_j, in the parameters' dtypes."""
    _check_scales(scales, weight.shape[0])
    s = scales.double().to(weight.device)
    w = (weight.double() / s[:, None]).to(weight.dtype)
    b = None if bias is None else (bias.double() / s).to(bias.dtype)
    return w, b


__all__ = ["AWQConfig", "awq_search_scales", "awq_search_clip", "apply_awq", "awq_quantize",
           "fold_scales_into_norm", "fold_scales_into_linear", "candidate_scales",
           "output_error"]
