"""Q-VLM: block-wise search of executable activation quantizers, blocks chosen
by the entropy proxy of cross-layer dependency.

1. Full-precision pass (all calibration samples): per decoder layer, the
   nearest-rank percentiles of |x| at the input of each linear sub-group
   (q/k/v, o, gate/up, down), and a fixed random subset of elements of the
   attention-norm output (the q/k/v input), paired across layers.
2. Entropy proxy (vlmkern.quant.entropy): per layer the soft-quantized entropy
   (eq. 5) and D(k, k+1), the conditional entropy of layer k+1's quantized
   activations given layer k's (eq. 4); blocks of at most ``max_depth``
   layers grown while their average dependency exceeds h0 (eqs. 6-7).
3. Block search (the ``search_samples`` subset): each linear carries RTN
   integer weights and an activation quantizer the integer kernels execute:
   dynamic per-token scales, or one static per-tensor scale from the p-th
   percentile of the full-precision |x| (IntActWeight.act_scale; values above
   it clip). One choice per decoder layer, shared by its four quantizers
   (each with its own percentile value). Within a block, layers are visited
   in order and each takes the candidate minimising the relative squared error
   of the *block output* (against the full-precision model's output of the
   same layer), later layers of the block keeping their current choice: one
   sweep of coordinate descent over the joint search of eq. 3. The quantized
   stream then feeds the next block.
4. The plan: every decoder linear becomes an IntActWeight (with act_scale for
   static choices) and the model's linears are replaced by IntActLinear.
With ``work_dir`` each searched block (and the trained vision tower) is saved
as it finishes; a rerun recomputes the statistics and skips what is saved
(vlmkern.calib.qvlm_resume).

Departures from the paper (and why):
* Quantizers are symmetric (the intact format has no zero point) and only the
  inputs of linear layers are quantized (what the integer kernels execute;
  attention's QK^T and PV stay floating point). Static per-tensor scales are
  the paper's stored clipping ranges; the per-token candidate is ours, so the
  search can fall back to the dynamic quantizer where clipping hurts.
* A "layer" is a decoder layer, its activation for the entropy statistics is
  the attention-norm output, and its four input quantizers share one choice;
  the joint search within a block is one coordinate-descent sweep, not an
  exhaustive search over all combinations.
* D(k_r, k_s) sums the pairs k_r .. k_s - 1; h0 (not given in the paper)
  defaults to the mean pair dependency, as the official code's gate compares
  its proxy with the mean of the proxies collected so far.
* ``objective='token'`` (not the default) replaces eq. 3's squared error by a
  per-token relative one: in small LLMs a few attention-sink tokens can hold
  almost all of the residual stream's squared norm, and eq. 3 then scores
  those tokens only.
* Weights are round-to-nearest; nothing in the language model is trained
  (the paper updates its quantization parameters for 10 epochs). The vision
  tower stays full precision unless ``vision`` asks for the visual-encoder
  optimisation (eqs. 8-10, vlmkern.calib.qvlm_vision), which quantizes it
  with learned clipping before the statistics pass.
The official code differs from the paper more: NF4 weights, asymmetric
per-input-channel activation ranges (not executable as an integer GEMM), a
running min/max gate instead of blocks, range shrink factors 1.0 .. 0.4
scored by mean |x_q - x|^0.5. We follow the paper, not that code.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import IntActConfig, check_bool, config_float, is_int
from ..ops.reference import fake_quant_activations
from ..quant.entropy import (
    layer_dependency,
    partition_blocks,
    quantized_entropy,
    temperature_of,
)
from ..quant.rtn import quantize_rtn
from ..replace import replace_linears, set_module
from .arch import arch_of, decoder_layers
from .engine import _layer_out, _real, decoder_inputs

DEFAULT_PERCENTILES = (1.0, 0.995, 0.99, 0.985, 0.98)


@dataclass(frozen=True)
class QVLMConfig:
    """Q-VLM settings.

    w_bits / a_bits / group_size: the IntActConfig of every decoder linear
    (RTN symmetric weights, per output channel when group_size is None).
    percentiles: static clipping candidates, fractions of |x| kept unclipped.
    token_candidate: also offer dynamic per-token scales (absmax, no clipping).
    h0: block threshold of eq. 7 (None: the mean consecutive dependency).
    temperature: eq. 5's softness, 'delta' (paper) or 'delta2' (scale-free).
    entropy_elements: paired elements per layer for the entropy statistics.
    search_samples: calibration samples used by the block search (None: all),
    taken evenly spaced from the list.
    granularity: 'layer' (one choice per decoder layer, shared by its input
    quantizers) or 'quantizer' (one choice per linear input: q/k/v, o,
    gate/up, down; four times the search cost).
    objective: the block-output error minimised: 'mse' (eq. 3: squared error
    over all tokens relative to the output's squared norm) or 'token' (ours:
    the mean over tokens of each token's relative squared error, so a few
    tokens with huge hidden states -- attention sinks -- do not decide alone).
    """

    w_bits: int = 8
    a_bits: int = 8
    group_size: int | None = None
    max_depth: int = 3
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    token_candidate: bool = True
    h0: float | None = None
    temperature: str = "delta"
    entropy_elements: int = 65536
    search_samples: int | None = None
    granularity: str = "layer"
    objective: str = "mse"
    seed: int = 0
    scale_dtype: str = "float16"

    def __post_init__(self):
        self.int_config()   # validates bits, group size, scale dtype
        if isinstance(self.percentiles, str) or not isinstance(self.percentiles, Iterable):
            raise TypeError(f"QVLMConfig.percentiles must be a sequence of numbers, got "
                            f"{self.percentiles!r}")
        ps = tuple(config_float("QVLMConfig", f"percentiles[{i}]", p)
                   for i, p in enumerate(self.percentiles))
        if any(not 0.0 < p <= 1.0 for p in ps) or len(set(ps)) != len(ps):
            raise ValueError(f"QVLMConfig.percentiles must be distinct numbers in (0, 1], got "
                             f"{self.percentiles!r}")
        object.__setattr__(self, "percentiles", ps)
        check_bool("QVLMConfig", "token_candidate", self.token_candidate)
        if not ps and not self.token_candidate:
            raise ValueError("no activation quantizer to search: give percentiles or keep "
                             "token_candidate")
        if not is_int(self.max_depth) or self.max_depth < 1:
            raise ValueError(f"QVLMConfig.max_depth must be a positive int, got "
                             f"{self.max_depth!r}")
        if self.h0 is not None and not math.isfinite(config_float("QVLMConfig", "h0", self.h0)):
            raise ValueError(f"QVLMConfig.h0 must be finite, got {self.h0!r}")
        if self.granularity not in ("layer", "quantizer"):
            raise ValueError(f"QVLMConfig.granularity must be 'layer' or 'quantizer', got "
                             f"{self.granularity!r}")
        if self.objective not in ("mse", "token"):
            raise ValueError(f"QVLMConfig.objective must be 'mse' or 'token', got "
                             f"{self.objective!r}")
        if self.temperature not in ("delta", "delta2"):
            raise ValueError(f"QVLMConfig.temperature must be 'delta' or 'delta2', got "
                             f"{self.temperature!r}")
        if not is_int(self.entropy_elements) or self.entropy_elements < 2:
            raise ValueError(f"QVLMConfig.entropy_elements must be an int >= 2, got "
                             f"{self.entropy_elements!r}")
        if self.search_samples is not None and (not is_int(self.search_samples)
                                                or self.search_samples < 1):
            raise ValueError(f"QVLMConfig.search_samples must be a positive int or None, got "
                             f"{self.search_samples!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"QVLMConfig.seed must be an int >= 0, got {self.seed!r}")

    def int_config(self, act_scale: float | None = None) -> IntActConfig:
        return IntActConfig(self.w_bits, self.a_bits, self.group_size, self.scale_dtype,
                            act_scale)

    def candidates(self) -> list["ActChoice"]:
        out = [ActChoice(None)] if self.token_candidate else []
        return out + [ActChoice(p) for p in self.percentiles]

    @property
    def label(self) -> str:
        return f"qvlm W{self.w_bits}A{self.a_bits}"


@dataclass(frozen=True)
class ActChoice:
    """One activation quantizer: percentile None = dynamic per-token scales."""

    percentile: float | None

    @property
    def label(self) -> str:
        return "token" if self.percentile is None else f"static p={self.percentile:g}"


@dataclass
class QVLMReport:
    layer_entropy: list[float] = field(default_factory=list)      # eq. 5, nats
    pair_dependency: list[float] = field(default_factory=list)    # D(k, k+1), nats
    h0: float = 0.0
    blocks: list[tuple[int, int]] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)               # per decoder layer
    block_errors: list[float] = field(default_factory=list)        # searched block outputs
    layer_errors: list[float] = field(default_factory=list)        # final stream vs FP
    modules: list[dict] = field(default_factory=list)
    search_tokens: int = 0
    seconds: dict = field(default_factory=dict)
    vision: object | None = None          # VisionOptReport when the encoder was optimised

    def __str__(self) -> str:
        lines = [f"{'layer':>5} {'entropy':>8} {'D(k,k+1)':>9} {'block':>6} {'rel err':>9}  "
                 f"activation quantizer"]
        block_of = {k: b for b, (r, s) in enumerate(self.blocks) for k in range(r, s + 1)}
        for k, h in enumerate(self.layer_entropy):
            d = f"{self.pair_dependency[k]:9.4f}" if k < len(self.pair_dependency) else " " * 9
            err = self.layer_errors[k] if k < len(self.layer_errors) else float("nan")
            choice = self.choices[k] if k < len(self.choices) else ""
            lines.append(f"{k:>5} {h:8.4f} {d} {block_of.get(k, -1):>6} {err:9.3g}  {choice}")
        lines.append(f"h0 = {self.h0:.4f}; {len(self.blocks)} blocks: {self.blocks}")
        total = sum(m["nbytes"] for m in self.modules)
        secs = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        lines.append(f"{len(self.modules)} linears, {total:,} bytes; search on "
                     f"{self.search_tokens} tokens; {secs}")
        if self.vision is not None:
            lines.append(str(self.vision))
        return "\n".join(lines)


def search_fake_quant(x: torch.Tensor, bits: int, scale: float | None = None) -> torch.Tensor:
    """``fake_quant_activations`` with torch's fused fake-quantize kernels, for
    the search: it runs hundreds of layer forwards, and there the separate
    divide / round / clamp / multiply passes of the exact version cost more
    than the matmuls. Same codes but for ties at half steps (the fused kernel
    multiplies by 1/s), values within fp32 rounding."""
    lim = (1 << (bits - 1)) - 1
    x2 = x.reshape(-1, x.shape[-1]).float()
    if scale is None:
        s = torch.linalg.vector_norm(x2, float("inf"), dim=-1).div_(lim)
        s.masked_fill_(s == 0, 1.0)
        zero = torch.zeros(s.shape, dtype=torch.int32, device=s.device)
        y = torch.fake_quantize_per_channel_affine(x2, s, zero, 0, -lim, lim)
    else:
        y = torch.fake_quantize_per_tensor_affine(x2, float(scale), 0, -lim, lim)
    return y.reshape(x.shape).to(x.dtype)


class _FakeQuantLinear(nn.Module):
    """A linear with dequantized integer weights and a switchable activation
    quantizer (``scale`` None: per token), computed in fp32 as the integer
    kernels compute it (exact codes, fp32 or wider epilogue): only the output
    takes the activation dtype, so the search scores what the model will run."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, a_bits: int):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.a_bits = a_bits
        self.scale: float | None = None

    def forward(self, x):
        xq = search_fake_quant(x.float(), self.a_bits, self.scale)
        b = None if self.bias is None else self.bias.float()
        return F.linear(xq, self.weight.float(), b).to(x.dtype)


def _groups(layer: nn.Module, sequence) -> list[tuple[str, ...]]:
    """Sub-groups of linears sharing one input, restricted to those present."""
    out = []
    for group in sequence:
        present = tuple(n for n in group if _is_linear(layer, n))
        if present:
            out.append(present)
    return out


def _is_linear(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def percentile_values(values: torch.Tensor, percentiles) -> dict[float, float]:
    """Nearest-rank percentiles of a 1-D tensor: for each p the smallest value
    with at least a fraction p of the elements at or below it (p = 1: the max).

    Only the elements at or above the lowest requested rank are sorted (2% of
    them for p >= 0.98), which matters for inputs of millions of elements."""
    n = values.numel()
    if values.dim() != 1 or n == 0:
        raise ValueError("values must be a non-empty 1-D tensor")
    ranks = {float(p): max(1, math.ceil(float(p) * n - 1e-9)) for p in percentiles}
    threshold = values.kthvalue(min(ranks.values())).values
    top = values[values >= threshold].sort().values
    below = n - top.numel()       # elements smaller than the threshold
    return {p: float(top[r - 1 - below]) for p, r in ranks.items()}


def _pick(n: int, m: int | None) -> list[int]:
    if m is None or m >= n:
        return list(range(n))
    if m == 1:
        return [0]
    return sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})


def block_error(outs, refs, objective: str = "mse", masks=None) -> float:
    """Error of quantized block outputs ``outs`` against ``refs`` (lists of
    [..., hidden] tensors, one per sample). 'mse': sum of squared errors over
    sum of squared references (eq. 3, normalised). 'token': mean over tokens
    of ||out_t - ref_t||^2 / ||ref_t||^2 (tokens with a zero reference skipped).
    masks: per sample, the real-token mask [B, T] (padding left out) or None."""
    if masks is not None:
        outs = [_real(o, m) for o, m in zip(outs, masks)]
        refs = [_real(r, m) for r, m in zip(refs, masks)]
    if objective == "mse":
        num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, refs))
        den = sum(float(r.double().pow(2).sum()) for r in refs)
        return num / den if den > 0 else 0.0
    if objective != "token":
        raise ValueError(f"objective must be 'mse' or 'token', got {objective!r}")
    total, count = 0.0, 0
    for o, r in zip(outs, refs):
        r2 = r.double().reshape(-1, r.shape[-1])
        e = (o.double().reshape(-1, r.shape[-1]) - r2).pow(2).sum(dim=1)
        n = r2.pow(2).sum(dim=1)
        live = n > 0
        total += float((e[live] / n[live]).sum())
        count += int(live.sum())
    return total / count if count else 0.0


def _fp_pass(layers, groups, inputs, kwargs_list, search_idx, cfg, device, progress,
             masks):
    """Percentiles of |x| per layer and group, entropy samples, FP outputs of
    the search subset."""
    home = next(layers[0].parameters()).device
    quantiles, samples, fp_outs = [], [], []
    positions = None
    hidden = list(inputs)
    for idx in tqdm(range(len(layers)), desc="qvlm statistics", unit="layer",
                    disable=not progress):
        layer = layers[idx].to(device)
        seen = {g: [] for g in groups}

        def hook_for(g):
            def hook(module, args):
                x = _real(args[0].detach(), mask)       # the batch running now
                seen[g].append(x.reshape(-1, x.shape[-1]))
            return hook

        handles = [layer.get_submodule(g[0]).register_forward_pre_hook(hook_for(g))
                   for g in groups]
        try:
            with torch.no_grad():
                for i, (kw, mask) in enumerate(zip(kwargs_list, masks)):
                    hidden[i] = _layer_out(layer, hidden[i], kw)
        finally:
            for h in handles:
                h.remove()
        layers[idx] = layer.to(home)
        fp_outs.append([hidden[i] for i in search_idx])
        per_group = {}
        for g in groups:
            x = torch.cat(seen[g]).float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"layer {idx} {g[0]}: full-precision activations hold NaN/Inf")
            if g == groups[0]:
                flat = x.reshape(-1)
                if positions is None:
                    gen = torch.Generator().manual_seed(cfg.seed)
                    n = min(cfg.entropy_elements, flat.numel())
                    positions = torch.randperm(flat.numel(), generator=gen)[:n].to(flat.device)
                samples.append(flat[positions].cpu())
            per_group[g] = percentile_values(x.abs().reshape(-1), (1.0,) + cfg.percentiles)
            del x
        quantiles.append(per_group)
    return quantiles, samples, fp_outs


def _quant_layer(layer, groups, quantiles_k, cfg, device):
    """A deep copy of ``layer`` with fake-quant linears, and a setter for its choice."""
    qlayer = copy.deepcopy(layer).to(device)
    fakes = {}
    for g in groups:
        for name in g:
            lin = qlayer.get_submodule(name)
            w = quantize_rtn(lin.weight.detach(), cfg.int_config()).dequantize(torch.float32)
            fake = _FakeQuantLinear(w.to(device), lin.bias, cfg.a_bits)
            set_module(qlayer, name, fake)
            fakes[name] = (fake, g)

    def choose(choice: ActChoice, group: tuple | None = None):
        for fake, g in fakes.values():
            if group is None or g == group:
                fake.scale = _static_scale(quantiles_k[g], choice, cfg.a_bits)

    return qlayer, choose


def _static_scale(quantiles: dict, choice: ActChoice, a_bits: int) -> float | None:
    if choice.percentile is None:
        return None
    clip = quantiles[choice.percentile]
    # an input that is zero almost everywhere: any positive scale quantizes it exactly
    return clip / ((1 << (a_bits - 1)) - 1) if clip > 0 else 1.0


def _run(qlayers, start, end, hidden, kwargs_list):
    with torch.no_grad():
        for k in range(start, end + 1):
            hidden = [_layer_out(qlayers[k], h, kw) for h, kw in zip(hidden, kwargs_list)]
    return hidden


def _search_block(qlayers, setters, units, end, q_inputs, kwargs_list, fp_target,
                  candidates, objective, masks=None):
    """One coordinate-descent sweep over the block's units (k, group), in
    order: each takes the candidate with the smallest block-output error, the
    others keeping their current choice. group None stands for every input
    quantizer of layer k. Returns ({unit: choice}, block error)."""
    choices = {u: candidates[0] for u in units}
    for (k, g), c in choices.items():
        setters[k](c, g)
    start = units[0][0]
    layer_in, in_layer, best_err = q_inputs, start, None
    for k, g in units:
        while in_layer < k:          # inputs of layer k under the choices made so far
            layer_in = _run(qlayers, in_layer, in_layer, layer_in, kwargs_list)
            in_layer += 1
        best = None
        for cand in candidates:
            setters[k](cand, g)
            err = block_error(_run(qlayers, k, end, layer_in, kwargs_list), fp_target,
                              objective, masks)
            if best is None or err < best[1]:
                best = (cand, err)
        choices[(k, g)], best_err = best
        setters[k](best[0], g)
    return choices, best_err


def _layer_label(choices: dict, k: int, groups) -> str:
    labels = [choices[(k, g)].label for g in groups]
    if len(set(labels)) == 1:
        return labels[0]
    return "; ".join(f"{g[0].rsplit('.', 1)[-1]}: {lab}" for g, lab in zip(groups, labels))


def qvlm_quantize(model: nn.Module, samples, config: QVLMConfig | None = None, device=None,
                  progress: bool = True, vision=None, work_dir=None):
    """Q-VLM on the language model's decoder layers of ``model``.

    samples: list of dicts of model inputs (one batch each). vision: a
    VisionOptConfig to quantize and optimise the vision tower first (eqs.
    8-10), or None to leave it in full precision. work_dir: folder keeping
    finished blocks and the trained vision tower; a rerun with the same model,
    data and settings resumes there and ends in the same model. Returns
    (model with IntActLinear modules, QVLMReport)."""
    from .qvlm_resume import QVLMWorkDir, install_vision
    from .qvlm_vision import VisionOptConfig, VisionOptReport, optimize_vision
    cfg = config or QVLMConfig()
    if not isinstance(cfg, QVLMConfig):
        raise TypeError(f"config must be a QVLMConfig, got {type(cfg).__name__}")
    if vision is not None and not isinstance(vision, VisionOptConfig):
        raise TypeError(f"vision must be a VisionOptConfig or None, got {type(vision).__name__}")
    t0 = time.perf_counter()
    arch = arch_of(model)
    layers_path, layers = decoder_layers(model)
    samples = list(samples)
    if not samples:
        raise ValueError("qvlm_quantize needs at least one calibration sample")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    groups = _groups(layers[0], arch.sequence)
    if not groups:
        raise ValueError(f"{type(model).__name__}: no linears of {arch.sequence} in the "
                         f"decoder layers")

    work = QVLMWorkDir(work_dir, model, samples, cfg, vision) if work_dir is not None else None
    vision_report = None
    if vision is not None:
        saved = work.load_vision() if work is not None else None
        if saved is not None:
            install_vision(model, saved[0])
            vision_report = VisionOptReport(**saved[1])
        else:
            vision_report = optimize_vision(model, samples, (cfg.w_bits, cfg.a_bits),
                                            cfg.group_size, vision, h0=cfg.h0,
                                            max_depth=cfg.max_depth, temperature=cfg.temperature,
                                            device=device, progress=progress)
            if work is not None:
                work.save_vision(model, vision_report)
    inputs, kwargs_list, masks = decoder_inputs(model, layers_path, layers, samples, device)
    search_idx = _pick(len(inputs), cfg.search_samples)
    search_masks = [masks[i] for i in search_idx]
    report = QVLMReport(search_tokens=sum(inputs[i].shape[:-1].numel() if masks[i] is None
                                          else int(masks[i].sum()) for i in search_idx),
                        vision=vision_report)

    t = time.perf_counter()
    quantiles, ent_samples, fp_outs = _fp_pass(layers, groups, inputs, kwargs_list,
                                               search_idx, cfg, device, progress, masks)
    report.seconds["statistics"] = time.perf_counter() - t

    t = time.perf_counter()
    clips = [q[groups[0]][1.0] for q in quantiles]
    report.layer_entropy = [
        quantized_entropy(x, cfg.a_bits, c or None,
                          temperature_of(x, cfg.a_bits, c or None, cfg.temperature))
        for x, c in zip(ent_samples, clips)]
    report.pair_dependency = [
        layer_dependency(ent_samples[k], ent_samples[k + 1], cfg.a_bits, clips[k] or None,
                         clips[k + 1] or None, cfg.temperature)
        for k in range(len(layers) - 1)]
    deps = report.pair_dependency
    report.h0 = float(cfg.h0) if cfg.h0 is not None else (sum(deps) / len(deps) if deps else 0.0)
    report.blocks = partition_blocks(deps, report.h0, cfg.max_depth)
    report.seconds["entropy"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates = cfg.candidates()
    q_in = [inputs[i] for i in search_idx]
    search_kwargs = [kwargs_list[i] for i in search_idx]
    choices: dict[tuple, ActChoice] = {}     # (layer, group) -> choice
    bar = tqdm(report.blocks, desc=f"qvlm search ({cfg.label})", unit="block",
               disable=not progress)
    for b, (start, end) in enumerate(bar):
        qlayers, setters = {}, {}
        for k in range(start, end + 1):
            qlayers[k], setters[k] = _quant_layer(layers[k], groups, quantiles[k], cfg, device)
        units = [(k, g) for k in range(start, end + 1)
                 for g in (groups if cfg.granularity == "quantizer" else (None,))]
        saved = work.load_block(b, (start, end), groups, ActChoice) if work is not None else None
        if saved is not None:
            block_choices, err = saved
            for (k, g), c in block_choices.items():
                setters[k](c, g)
        else:
            block_choices, err = _search_block(qlayers, setters, units, end, q_in,
                                               search_kwargs, fp_outs[end], candidates,
                                               cfg.objective, search_masks)
            if work is not None:
                work.save_block(b, (start, end), block_choices, err, groups)
        for (k, g), c in block_choices.items():
            choices.update({(k, gg): c for gg in ((g,) if g is not None else groups)})
        report.block_errors.append(err)
        for k in range(start, end + 1):
            q_in = _run(qlayers, k, k, q_in, search_kwargs)
            report.layer_errors.append(block_error(q_in, fp_outs[k], cfg.objective,
                                                   search_masks))
        bar.set_postfix(block_err=f"{err:.3g}")
        del qlayers, setters
    report.choices = [_layer_label(choices, k, groups) for k in range(len(layers))]
    report.seconds["search"] = time.perf_counter() - t

    from ..plan import config_to_json
    settings = {"granularity": cfg.granularity, "objective": cfg.objective,
                "max_depth": cfg.max_depth,
                "percentiles": list(cfg.percentiles), "token_candidate": cfg.token_candidate,
                "h0": report.h0, "temperature": cfg.temperature,
                "search_samples": cfg.search_samples}
    block_of = {k: [r, s] for r, s in report.blocks for k in range(r, s + 1)}
    plan, infos = {}, {}
    for k, layer in enumerate(layers):
        for g in groups:
            choice = choices[(k, g)]
            scale = _static_scale(quantiles[k][g], choice, cfg.a_bits)
            for name in g:
                w = quantize_rtn(layer.get_submodule(name).weight.detach(),
                                 cfg.int_config(scale))
                full = f"{layers_path}.{k}.{name}"
                plan[full] = w
                # config: the executable IntActConfig (static scale included), so
                # the checkpoint's plan rebuilds this exact layer
                infos[full] = {"method": "qvlm", "config": config_to_json(cfg.int_config(scale)),
                               "qvlm": {"activation": choice.label, "block": block_of[k],
                                        **settings}}
                report.modules.append({"name": full, "activation": choice.label,
                                       "act_scale": w.act_scale, "nbytes": w.nbytes})
    replace_linears(model, plan, skip=(), progress=False)
    for name, info in infos.items():
        model.get_submodule(name).quant_info = info
    model.vlmkern_plan_info = {"qvlm": {
        "blocks": [list(b) for b in report.blocks], "choices": report.choices,
        "layer_entropy": report.layer_entropy, "pair_dependency": report.pair_dependency,
        **settings}}
    if vision_report is not None:
        model.vlmkern_plan_info["qvlm"]["vision"] = {
            **{k: getattr(vision, k) for k in ("activation", "epochs", "lr", "lambda_ent",
                                               "lambda_err", "eta")},
            "layer_weights": vision_report.layer_weights, "history": vision_report.history,
            "before": vision_report.before, "after": vision_report.after}
    report.seconds["total"] = time.perf_counter() - t0
    return model, report


__all__ = ["QVLMConfig", "QVLMReport", "ActChoice", "qvlm_quantize", "fake_quant_activations",
           "percentile_values", "block_error", "DEFAULT_PERCENTILES"]
