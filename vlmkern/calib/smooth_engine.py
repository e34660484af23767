"""SmoothQuant on a whole model: calibrate per-channel activation maxima, then
fold the smoothing factors into the weights so the full-precision function
is unchanged and the integer-activation quantizer sees flatter inputs.

For every decoder layer (Llama-style: RMSNorm -> q/k/v, RMSNorm -> gate/up):

    x = norm(h) * gamma          ->  x / s = norm(h) * (gamma / s)
    y = x W^T                    ->  y = (x / s) (W s)^T

with s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (vlmkern.quant.smoothquant),
max|X_j| over every calibration token and max|W_j| over every row of every
linear reading x. These are the two places the SmoothQuant paper smooths in
Llama-style blocks. ``include_down`` also smooths the MLP's down projection
through the up projection: down reads act(gate x) * (up x), which is linear
in up's output, so dividing up's rows by s divides down's input by s exactly.

The activation maxima come from the full-precision model, all layers in one
forward per sample (the smoothing of one layer changes no other layer's
maxima: each fold keeps the layer's function). Afterwards quantize as usual
(per-token RTN: ``IntActConfig`` through ``quantize_model`` or
``replace_linears``; or Q-VLM).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.smoothquant import (fold_scales_into_linear, fold_scales_into_norm,
                                 smooth_scales, weight_absmax)
from .arch import decoder_layers
from .engine import _pad_mask, _real, _StopForward, _to

# (producer of x, linears reading x): the producer is a norm or a linear.
NORM_GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
DOWN_GROUP = ("mlp.up_proj", ("mlp.down_proj",))


@dataclass
class SmoothReport:
    alpha: float
    groups: list[dict] = field(default_factory=list)   # per smoothed input
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"{'producer':<48} {'linears':>7} {'max|X| before':>13} {'after':>9} "
                 f"{'max|W| before':>13} {'after':>9}"]
        for g in self.groups:
            lines.append(f"{g['producer']:<48} {len(g['linears']):>7} {g['act_max']:13.3f} "
                         f"{g['act_max_after']:9.3f} {g['weight_max']:13.4f} "
                         f"{g['weight_max_after']:9.4f}")
        lines.append(f"SmoothQuant alpha={self.alpha}: {len(self.groups)} inputs smoothed in "
                     f"{self.seconds:.1f} s")
        return "\n".join(lines)


def _norm_ok(norm: nn.Module, name: str) -> None:
    cls = type(norm).__name__
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise TypeError(f"{name} ({cls}) has no per-channel weight to fold the scales into")
    if "Gemma" in cls:
        # Gemma's norms multiply by (1 + weight): dividing weight by s is not x / s
        raise TypeError(f"{name} ({cls}) scales by (1 + weight); SmoothQuant folding is "
                        f"not supported for it")


def smoothing_groups(model: nn.Module, include_down: bool = False):
    """[(producer name, producer module, {linear name: nn.Linear})] of every
    decoder layer, producers before the linears they feed."""
    path, layers = decoder_layers(model)
    spec = NORM_GROUPS + ((DOWN_GROUP,) if include_down else ())
    out = []
    for i, layer in enumerate(layers):
        for producer, names in spec:
            try:
                prod = layer.get_submodule(producer)
                linears = {n: layer.get_submodule(n) for n in names}
            except AttributeError:
                continue
            if not all(isinstance(m, nn.Linear) for m in linears.values()):
                continue
            full = f"{path}.{i}.{producer}"
            if isinstance(prod, nn.Linear):
                if prod.out_features != next(iter(linears.values())).in_features:
                    continue
            else:
                _norm_ok(prod, full)
            out.append((full, prod, {f"{path}.{i}.{n}": m for n, m in linears.items()}))
    if not out:
        raise ValueError(f"{type(model).__name__}: no norm -> linear pairs to smooth "
                         f"(expected {[p for p, _ in NORM_GROUPS]} in the decoder layers)")
    return out


def _stop_forward(module, args, output):
    raise _StopForward


@torch.no_grad()
def activation_maxima(model: nn.Module, samples, names, device=None,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """max over calibration tokens of |x_j| at the input of each named linear:
    {name: fp32 [in_features]}. One full forward per sample; padding (zeros of
    a sample's attention_mask) is left out."""
    maxima: dict[str, torch.Tensor] = {}
    sample = None      # the one running now, for its padding mask

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name}: calibration activations hold NaN/Inf")
            x = _real(x, _pad_mask(sample, x) if x.dim() == 3 else None)
            if x.numel() == 0:
                return
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
        return hook

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    # Nothing after the last decoder layer is needed; the lm_head alone costs
    # about a quarter of a small model's forward.
    last = decoder_layers(model)[1][-1]
    handles.append(last.register_forward_hook(_stop_forward))
    device = device or next(model.parameters()).device
    try:
        for sample in tqdm(list(samples), desc="smoothquant statistics", unit="sample",
                           disable=not progress):
            if not isinstance(sample, dict):
                raise TypeError("calibration samples must be dicts of model inputs")
            try:
                model(**_to(sample, device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in maxima]
    if missing:
        raise RuntimeError(f"the model's forward never reached {missing[:3]}")
    return maxima


@torch.no_grad()
def smooth_model(model: nn.Module, samples, alpha: float = 0.5, include_down: bool = False,
                 device=None, progress: bool = True) -> SmoothReport:
    """Smooth ``model`` in place (its full-precision function is unchanged).

    samples: list of dicts of model inputs. alpha: migration strength
    (0.5: SmoothQuant's default). Returns a SmoothReport."""
    start = time.perf_counter()
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("smooth_model needs at least one calibration sample")
    groups = smoothing_groups(model, include_down)
    readers = [next(iter(linears)) for _, _, linears in groups]
    maxima = activation_maxima(model, samples, readers, device, progress)
    report = SmoothReport(float(alpha))
    for (producer, prod, linears), reader in zip(groups, readers):
        act = maxima[reader]
        weights = [m.weight for m in linears.values()]
        w_max = weight_absmax(weights)
        s = smooth_scales(act, w_max, alpha)
        for m in linears.values():
            m.weight.copy_((m.weight.double() * s.double().to(m.weight.device))
                           .to(m.weight.dtype))
        if isinstance(prod, nn.Linear):
            w, b = fold_scales_into_linear(prod.weight, prod.bias, s)
            prod.weight.copy_(w)
            if b is not None:
                prod.bias.copy_(b)
        else:
            w, b = fold_scales_into_norm(prod.weight, getattr(prod, "bias", None), s)
            prod.weight.copy_(w)
            if b is not None:
                prod.bias.copy_(b)
        report.groups.append({"producer": producer, "linears": list(linears),
                              "act_max": float(act.max()),
                              "act_max_after": float((act / s).max()),
                              "weight_max": float(w_max.max()),
                              "weight_max_after": float(weight_absmax(weights).max())})
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["smooth_model", "activation_maxima", "smoothing_groups", "SmoothReport",
           "NORM_GROUPS", "DOWN_GROUP"]
