"""AWQ on a whole model: activation-aware scales folded into the model, then
round to nearest (with AWQ's clip search) or GPTQ on the rescaled linears.

1. The decoder layers are walked on the full-precision stream (as AWQ does:
   every search sees the FP model's activations). For each scaling group --
   linears reading one input, and the op producing it -- s is searched with
   ``awq_search_scales`` on the group's captured inputs, scored by the output
   error of the block the linears feed (the attention block for q/k/v, the
   MLP for gate/up; o and down by their own outputs), the linears' input
   columns are multiplied by s and the producing op divided by s
   (``fold_scales_into_norm`` / ``fold_scales_into_linear``): the FP model
   computes the same function. Llama/Qwen2 layers have four groups:
   input_layernorm -> q/k/v, v -> o (only when v's outputs are o's inputs one
   to one, i.e. no grouped-query attention), post_attention_layernorm ->
   gate/up, up -> down.
2. then='rtn': per linear, a clip search on the rescaled weights and inputs
   (``awq_search_clip``), then ``apply_awq`` (round to nearest on the clipped
   group ranges) -- done while walking, RTN needs no quantized stream. q/k
   are not clipped, as in AWQ's code (their error passes through the
   softmax, which the per-linear output error does not see).
   then='gptq': the rescaled model goes through ``quantize_model`` with GPTQ
   (no clipping: GPTQ fits its grids to the weights it updates), which also
   gives it resumable work dirs.

A folded layer is checked to compute what it did before (relative error
1e-4); a norm that is not a plain affine scale (e.g. one computing
x * (1 + w)) fails that check instead of silently changing the model.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import config_names
from ..quant.awq import (AWQConfig, apply_awq, awq_search_clip, awq_search_scales,
                         fold_scales_into_linear, fold_scales_into_norm)
from ..quant.gptq import GPTQConfig
from ..replace import replace_linears
from .arch import decoder_layers
from .engine import (CalibReport, ModuleResult, Settings, WorkDir, _fingerprint, _layer_out,
                     _real, _StopForward, INTERRUPTED, check_not_quantized, decoder_inputs,
                     first_output, install_dequantized, map_tensors, quantize_model)

THEN = ("rtn", "gptq")


@dataclass(frozen=True)
class ScalingGroup:
    """Linears (names inside a decoder layer) sharing one input, ``prev``, the
    norm or linear producing that input, and ``block``, the module whose
    output error the scale search minimises ("" for the linears' own
    outputs)."""
    prev: str
    linears: tuple[str, ...]
    block: str = ""


LLAMA_SCALING = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn"),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class AWQEngineConfig:
    """awq: grid, scale-search and clip-search settings. then: 'rtn' (clip
    search, then round to nearest) or 'gptq'. gptq: GPTQ settings for
    then='gptq' (default GPTQConfig(awq.quant)); its grid must be awq.quant.
    clip_skip: linears (name suffixes) left unclipped."""

    awq: AWQConfig = field(default_factory=AWQConfig)
    then: str = "rtn"
    gptq: GPTQConfig | None = None
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj")
    method_name: ClassVar[str] = "awq"

    def __post_init__(self):
        if not isinstance(self.awq, AWQConfig):
            raise TypeError(f"AWQEngineConfig.awq must be an AWQConfig, "
                            f"got {type(self.awq).__name__}")
        if self.then not in THEN:
            raise ValueError(f"AWQEngineConfig.then must be one of {THEN}, got {self.then!r}")
        if self.gptq is not None:
            if not isinstance(self.gptq, GPTQConfig):
                raise TypeError(f"AWQEngineConfig.gptq must be a GPTQConfig, "
                                f"got {type(self.gptq).__name__}")
            if self.gptq.quant != self.awq.quant:
                raise ValueError("AWQEngineConfig.gptq.quant must be the grid the scales were "
                                 f"searched for (awq.quant = {self.awq.quant})")
        object.__setattr__(self, "clip_skip",
                           config_names("AWQEngineConfig", "clip_skip", self.clip_skip))

    def gptq_config(self) -> GPTQConfig:
        """The GPTQ settings of then='gptq'."""
        return self.gptq if self.gptq is not None else GPTQConfig(self.awq.quant)


def _calls(layer: nn.Module, name: str, inputs, kwargs_list) -> list:
    """The (args, kwargs) that submodule ``name`` receives in each calibration batch."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args, dict(kwargs)))
        raise _StopForward

    handle = layer.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for hidden, kwargs in zip(inputs, kwargs_list):
            try:
                _layer_out(layer, hidden, kwargs)
            except _StopForward:
                continue
            raise RuntimeError(f"the layer's forward never called {name}")
    finally:
        handle.remove()
    return calls


def _group_inputs(layer: nn.Module, name: str, inputs, kwargs_list,
                  masks=None) -> torch.Tensor:
    """Inputs of linear ``name`` over every calibration batch, as [T, K];
    masks: per batch, the real-token mask (padding left out) or None."""
    calls = _calls(layer, name, inputs, kwargs_list)
    xs = [_real(args[0].detach(), mask)
          for (args, _), mask in zip(calls, masks or [None] * len(calls))]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def _block_error(block: nn.Module, linears, calls, masks=None):
    """A callable for ``awq_search_scales``: given stand-ins for the
    linears' weights, the squared error of ``block``'s output over the real
    tokens of ``calls`` (from ``_calls``) against its output with the
    weights it holds now. The linears get their weights back after each call."""
    masks = masks or [None] * len(calls)
    with torch.no_grad():
        reference = [first_output(block(*args, **kwargs)) for args, kwargs in calls]
    kept = [lin.weight.detach().clone() for lin in linears]

    @torch.no_grad()
    def error(approx) -> float:
        try:
            for lin, a in zip(linears, approx):
                lin.weight.copy_(a.to(lin.weight.dtype))
            total = 0.0
            for (args, kwargs), ref, mask in zip(calls, reference, masks):
                out = first_output(block(*args, **kwargs))
                diff = _real(out, mask).double() - _real(ref, mask).double()
                total += float(diff.pow(2).sum())
            return total
        finally:
            for lin, w in zip(linears, kept):
                lin.weight.copy_(w)

    return error


def _find(layer: nn.Module, name: str):
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _foldable(prev, linears, k: int) -> bool:
    """prev produces the linears' input channel by channel: a norm with a [K]
    weight, or a linear with K outputs."""
    if prev is None or any(lin is None for lin in linears):
        return False
    if isinstance(prev, nn.Linear):
        return prev.out_features == k
    weight = getattr(prev, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (k,)


@torch.no_grad()
def _fold(prev: nn.Module, linears, scales: torch.Tensor) -> None:
    """Linears read x / s with weights W s: the same outputs."""
    for lin in linears:
        w = lin.weight
        w.data.copy_((w.double() * scales.double().to(w.device)).to(w.dtype))
    if isinstance(prev, nn.Linear):
        w, b = fold_scales_into_linear(prev.weight, prev.bias, scales)
    else:
        w, b = fold_scales_into_norm(prev.weight, getattr(prev, "bias", None), scales)
    prev.weight.data.copy_(w)
    if b is not None:
        prev.bias.data.copy_(b)


def _layer_outputs(layer, inputs, kwargs_list):
    return [_layer_out(layer, h, kw) for h, kw in zip(inputs, kwargs_list)]


def _fp32(obj):
    """obj with every floating tensor in it as fp32."""
    return map_tensors(obj, lambda t: t.float() if t.is_floating_point() else t)


def _search_group(layer, group: ScalingGroup, linears, inputs, kwargs_list, config, masks):
    """The scales of one scaling group and their ratio."""
    x = _group_inputs(layer, group.linears[0], inputs, kwargs_list, masks)
    error = None
    if group.block:
        block = _find(layer, group.block)
        if block is None:
            raise ValueError(f"scaling group of {group.prev}: the layer has no "
                             f"{group.block!r} block to score the scales on")
        calls = _calls(layer, group.block, inputs, kwargs_list)
        error = _block_error(block, linears, calls, masks)
    scales, ratio, _ = awq_search_scales([lin.weight for lin in linears], x, config.awq.quant,
                                         config.awq.n_grid, error)
    return scales, ratio


@torch.no_grad()
def awq_layer(layer: nn.Module, inputs, kwargs_list, config: AWQEngineConfig,
              groups=LLAMA_SCALING, masks=None) -> dict:
    """Search and fold the scales of one decoder layer, in place. inputs: its
    FP inputs, one [B, T, C] per batch. Returns {'ratios': {prev: r},
    'skipped': [prev of groups that cannot fold], 'fold_error': relative
    change of the layer's output on the first batch}.

    The fold is checked on an fp32 copy of the layer that takes the same
    scales: in fp32 folding changes the output by rounding only (about 1e-7),
    while a producing op that is not a plain per-channel scale changes it by
    far more; in bf16 the rounding of the folded weights alone is about 4e-3."""
    probe = copy.deepcopy(layer).float()
    sample, sample_kwargs = _fp32(inputs[0]), _fp32(kwargs_list[0])
    before = _layer_out(probe, sample, sample_kwargs)
    info = {"ratios": {}, "skipped": []}
    for group in groups:
        linears = [_find(layer, n) for n in group.linears]
        prev = _find(layer, group.prev)
        k = linears[0].in_features if linears[0] is not None else -1
        if not _foldable(prev, linears, k):
            info["skipped"].append(group.prev)
            continue
        scales, ratio = _search_group(layer, group, linears, inputs, kwargs_list, config, masks)
        _fold(prev, linears, scales)
        _fold(probe.get_submodule(group.prev), [probe.get_submodule(n) for n in group.linears],
              scales)
        info["ratios"][group.prev] = ratio
    after = _layer_out(probe, sample, sample_kwargs)
    err = float((after.double() - before.double()).norm()
                / before.double().norm().clamp(min=1e-30))
    info["fold_error"] = err
    if err > 1e-4:
        raise ValueError(f"folding the AWQ scales changed the layer's output by {err:.2e} "
                         f"(relative, in fp32): a producing op is not a plain per-channel scale")
    return info


def _name_ends_with(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether ``name`` ("self_attn.q_proj") ends with one of ``suffixes`` as
    whole name components ("q_proj" or "self_attn.q_proj", not "proj")."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


@torch.no_grad()
def rtn_layer(layer: nn.Module, inputs, kwargs_list, config: AWQEngineConfig, prefix: str,
              groups=LLAMA_SCALING, masks=None) -> tuple[dict, list[ModuleResult]]:
    """Clip search and round to nearest of every linear of the (folded) layer's
    scaling groups: ({name: QuantizedWeight}, results). rel_error is the
    relative output error on the calibration inputs the linear now reads."""
    quant = config.awq.quant
    weights, results = {}, []
    for group in groups:
        names = [n for n in group.linears if _find(layer, n) is not None]
        if not names:
            continue
        x = _group_inputs(layer, names[0], inputs, kwargs_list, masks)
        gram = x.double().T @ x.double()
        for name in names:
            start = time.perf_counter()
            lin = layer.get_submodule(name)
            clip = None
            if config.awq.clip_steps > 1 and not _name_ends_with(name, config.clip_skip):
                clip = awq_search_clip(lin.weight, x, quant, None, config.awq.clip_steps,
                                       config.awq.min_clip)
            packed = apply_awq(lin.weight.detach(), None, clip, quant)
            w = lin.weight.double()
            d = packed.dequantize(torch.float64).to(w.device) - w
            den = float(((w @ gram) * w).sum())
            err = float(((d @ gram) * d).sum()) / den if den > 0 else 0.0
            weights[name] = packed
            results.append(ModuleResult(f"{prefix}.{name}", "awq", packed.FORMAT, packed.bits,
                                        err, packed.nbytes, time.perf_counter() - start))
    return weights, results


def _walk(model: nn.Module, samples, device, progress: bool, desc: str):
    """Yield (index, name prefix, layer on the device, its FP inputs, kwargs
    list, its FP outputs, per-batch real-token masks or None) for every
    decoder layer; the caller may modify the
    layer. The next layer's inputs are those outputs, computed before the
    caller touched it (AWQ searches every layer on the FP model's
    activations)."""
    samples = list(samples)
    if not samples:
        raise ValueError("AWQ needs at least one calibration sample")
    layers_path, layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs, kwargs_list, masks = decoder_inputs(model, layers_path, layers, samples, device)
    for idx in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
        layer = layers[idx].to(device)
        with torch.no_grad():
            outputs = _layer_outputs(layer, inputs, kwargs_list)
        yield idx, f"{layers_path}.{idx}", layer, inputs, kwargs_list, outputs, masks
        layers[idx] = layer.to(home)
        inputs = outputs


def awq_transform(model: nn.Module, samples, config: AWQEngineConfig | None = None,
                  device=None, progress: bool = False, groups=LLAMA_SCALING) -> list[dict]:
    """Fold AWQ scales into every decoder layer of ``model``, in place; the FP
    model computes the same function afterwards. Returns each layer's
    ``awq_layer`` info."""
    config = config or AWQEngineConfig()
    return [awq_layer(layer, inputs, kwargs_list, config, groups, masks)
            for _, _, layer, inputs, kwargs_list, _, masks in
            _walk(model, samples, device, progress, "AWQ scales")]


def _kept_state(layer: nn.Module, weights: dict) -> dict:
    """The layer's tensors a resume needs besides the packed weights: folded
    norms and biases (everything but the quantized linears' weights)."""
    packed = {f"{name}.weight" for name in weights}
    return {k: v for k, v in layer.state_dict().items() if k not in packed}


def _awq_rtn(model, samples, config, device, progress, groups, work=None) -> CalibReport:
    report = CalibReport()
    all_weights = {}
    for idx, prefix, layer, inputs, kwargs_list, fp_out, masks in _walk(
            model, samples, device, progress, "AWQ + RTN"):
        expected = {n: tuple(layer.get_submodule(n).weight.shape) for group in groups
                    for n in group.linears if _find(layer, n) is not None}
        done = work.load(idx, expected) if work is not None else None
        if done is not None:
            weights, results, layer_err = done
            keys = layer.load_state_dict(work.load_state(idx), strict=False)
            if keys.unexpected_keys or set(keys.missing_keys) - {f"{n}.weight" for n in weights}:
                raise ValueError(f"{work.path}: layer {idx} was saved from another layout; "
                                 f"use another work_dir or delete it")
            install_dequantized(layer, weights)
            report.resumed_layers += 1
        else:
            awq_layer(layer, inputs, kwargs_list, config, groups, masks)
            weights, results = rtn_layer(layer, inputs, kwargs_list, config, prefix, groups,
                                         masks)
            install_dequantized(layer, weights)
            num = den = 0.0
            with torch.no_grad():
                for out, ref, mask in zip(_layer_outputs(layer, inputs, kwargs_list), fp_out,
                                          masks):
                    o, r = _real(out.float(), mask), _real(ref.float(), mask)
                    num += float((o - r).pow(2).sum())
                    den += float(r.pow(2).sum())
            layer_err = num / den if den > 0 else 0.0
            if work is not None:
                work.save(idx, weights, results, layer_err, _kept_state(layer, weights))
        report.modules.extend(results)
        report.layer_errors.append(layer_err)
        all_weights.update({f"{prefix}.{n}": w for n, w in weights.items()})
    home = next(model.parameters()).device
    replace_linears(model, {n: w.to(home) for n, w in all_weights.items()}, skip=(),
                    progress=False)
    return report


def awq_quantize_model(model: nn.Module, samples, config: AWQEngineConfig | None = None,
                       work_dir=None, device=None, progress: bool = True,
                       groups=LLAMA_SCALING):
    """AWQ on ``model`` (in place): scales folded, then RTN with clipping or
    GPTQ through ``quantize_model`` (see the module doc). Returns (model with
    QuantLinear modules, CalibReport); every quantized linear records method
    'awq'. work_dir: per-layer results (packed weights, and for AWQ + RTN the
    folded norms and biases); an interrupted run resumes there."""
    from ..plan import config_to_json

    config = config or AWQEngineConfig()
    if not isinstance(config, AWQEngineConfig):
        raise TypeError(f"config must be an AWQEngineConfig, got {type(config).__name__}")
    start = time.perf_counter()
    samples = list(samples)
    if not samples:
        raise ValueError("AWQ needs at least one calibration sample")
    check_not_quantized(model, *decoder_layers(model))
    work = None
    if work_dir is not None and config.then == "rtn":
        # "scored": how candidate scales are scored; work dirs of runs that
        # scored them on each linear's own output are not resumed
        text = json.dumps({"method": "awq-rtn", "config": config_to_json(config),
                           "scored": [g.block for g in groups]}, sort_keys=True)
        work = WorkDir(work_dir, _fingerprint(model, samples, Settings(text)))
    elif work_dir is not None:     # a bad folder is found before the model is rescaled
        WorkDir.check_folder(work_dir)
    try:
        if config.then == "rtn":
            report = _awq_rtn(model, samples, config, device, progress, groups, work)
        else:
            awq_transform(model, samples, config, device, progress, groups)
            model, report = quantize_model(model, samples, config.gptq_config(),
                                           work_dir=work_dir, device=device, progress=progress)
    except BaseException:
        # Layers are rescaled (and, with RTN, dequantized) in place as the run
        # goes: a second run on this model would quantize them twice.
        setattr(model, INTERRUPTED, True)
        raise
    info = {"method": "awq", "config": config_to_json(config)}
    for row in report.modules:
        row.method = "awq"
        model.get_submodule(row.name).quant_info = dict(info)
    report.seconds = time.perf_counter() - start
    return model, report


__all__ = ["AWQEngineConfig", "ScalingGroup", "LLAMA_SCALING", "awq_layer", "rtn_layer",
           "awq_transform", "awq_quantize_model"]
