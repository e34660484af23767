"""Q-VLM's visual-encoder optimisation (eqs. 8-10): quantize the vision
tower's linears and learn their quantization parameters so that the language
model downstream sees activations with weaker cross-layer dependency.

Every linear of the vision tower (not the projector) becomes a W/A integer
layer the integer-activation kernels execute: symmetric weights per output
channel and one static per-tensor activation scale (or dynamic per-token
scales). The learned parameters are the weight clipping factor of each output
channel (init 1: absmax) and the activation scale (init: the calibration
absmax), trained with the straight-through estimator on

    L = L_reg + lambda_1 L_ent + lambda_2 L_err                      (eq. 10)

* L_reg: the model's next-token cross-entropy on the calibration samples
  that carry images (pad and image-placeholder positions excluded).
* L_ent (eq. 8): sum over decoder layers k of w_k D(k, k+1), the dependency
  of layer k+1's quantized activations on layer k's (the soft-assignment
  conditional entropy of vlmkern.quant.entropy, at the input of the q/k/v
  projections, on a fixed random subset of elements per sample). w_k is the
  norm of the Jacobian of the last layer's quantization error with respect
  to layer k's input, measured once before training and normalised to sum 1.
* L_err (eq. 9): ||X_q^v - X_r^v||^2 / ||X_r^v||^2 + eta ||X_q^n - X_r^n||^2 /
  ||X_r^n||^2, at the projector's input (the vision tower's output) and at the
  last decoder layer's output, against the full-precision model.

While training, the decoder linears run as the Q-VLM search's starting point
(RTN integer weights, per-token integer activations) with straight-through
rounding, so gradients reach the vision tower through a quantized language
model. The language model itself is not changed here: Q-VLM's statistics,
partition and search run afterwards on the model with the quantized vision
tower in place, as the paper's order implies (the encoder is optimised so
that the search can use finer blocks).

Departures from the paper (and why): eq. 8 as printed carries the sign of a
negative conditional entropy; we minimise the dependency, as its text says.
The norms of eq. 9 are relative squared errors so that lambda_2 and eta are
scale-free; the paper gives neither the norms nor the lambdas. The paper's
rounding functions are not specified further; we learn clipping ranges (LSQ
style), which the integer kernels execute as stored scales.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import IntActConfig, dtype_from_name, is_int
from ..formats import IntActWeight
from ..formats.intact import qmax
from ..quant.entropy import partition_blocks, soft_dependency
from ..quant.rtn import _round_scale, fake_quantize
from ..replace import set_module
from .arch import arch_of, decoder_layers, find_path
from .engine import _pad_mask, _real, first_output


@dataclass(frozen=True)
class VisionOptConfig:
    """Settings of the visual-encoder optimisation.

    w_bits / a_bits: the vision linears' integer format (None: the
    language model's). activation: 'static' (learned per-tensor scale, the
    paper's stored clipping range) or 'token' (dynamic per-token scales;
    only the weight clips learn). epochs: passes over the calibration samples
    with images, one step per sample (10, as in the paper; 0 quantizes with
    the initial parameters and trains nothing). lr: Adam's
    step on the log-scale parameters. lambda_ent, lambda_err, eta: eqs. 8-10.
    entropy_elements: elements per sample and layer in L_ent. jacobian_samples:
    samples averaged for the layer weights w_k.
    """

    w_bits: int | None = None
    a_bits: int | None = None
    activation: str = "static"
    epochs: int = 10
    lr: float = 5e-3
    lambda_ent: float = 1.0
    lambda_err: float = 1.0
    eta: float = 1.0
    entropy_elements: int = 4096
    jacobian_samples: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v not in (4, 6, 8)):
                raise ValueError(f"VisionOptConfig.{name} must be 4, 6 or 8 (an int) or None, "
                                 f"got {v!r}")
        if self.activation not in ("static", "token"):
            raise ValueError(f"VisionOptConfig.activation must be 'static' or 'token', got "
                             f"{self.activation!r}")
        if not is_int(self.epochs) or self.epochs < 0:
            raise ValueError(f"VisionOptConfig.epochs must be an int >= 0, got {self.epochs!r}")
        for name in ("lr", "lambda_ent", "lambda_err", "eta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"VisionOptConfig.{name} must be a number, got {v!r}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"VisionOptConfig.{name} must be a finite number >= 0, "
                                 f"got {v!r}")
        # one element has no distribution: every entropy term would be zero
        if not is_int(self.entropy_elements) or self.entropy_elements < 2:
            raise ValueError(f"VisionOptConfig.entropy_elements must be an int >= 2, got "
                             f"{self.entropy_elements!r}")
        if not is_int(self.jacobian_samples) or self.jacobian_samples < 1:
            raise ValueError(f"VisionOptConfig.jacobian_samples must be a positive int, got "
                             f"{self.jacobian_samples!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"VisionOptConfig.seed must be an int >= 0, got {self.seed!r}")


@dataclass
class VisionOptReport:
    linears: int = 0
    nbytes: int = 0                      # packed vision linears
    fp_nbytes: int = 0                   # the same linears in fp16
    layer_weights: list[float] = field(default_factory=list)    # w_k of eq. 8
    history: list[dict] = field(default_factory=list)           # per epoch, mean losses
    before: dict = field(default_factory=dict)   # losses and partition at the initial params
    after: dict = field(default_factory=dict)    # ... and after training
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"vision tower: {self.linears} linears quantized, {self.nbytes:,} bytes "
                 f"(fp16 {self.fp_nbytes:,}); {self.seconds:.1f} s"]
        for tag, d in (("before", self.before), ("after", self.after)):
            if d:
                lines.append(f"  {tag:6}: L_reg {d['reg']:.4f}  L_ent {d['ent']:.4f}  "
                             f"vision err {d['vision_err']:.5f}  last-layer err "
                             f"{d['last_err']:.5f}  blocks {len(d['blocks'])}")
        return "\n".join(lines)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _lsq(x: torch.Tensor, scale: torch.Tensor, lim: int) -> torch.Tensor:
    """Fake quantization with straight-through rounding; gradients reach scale."""
    return _ste_round(x / scale).clamp(-lim, lim) * scale


class _LearnedQuantLinear(nn.Module):
    """A vision linear with trainable clipping: weight scale per output channel
    absmax * min(exp(theta), 1) / lim, activation scale exp(phi) (static) or
    per-token absmax / lim."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, act_absmax: float | None,
                 scale_dtype: str = "float16"):
        super().__init__()
        self.scale_dtype = dtype_from_name(scale_dtype)
        w = linear.weight.detach().float()
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.w_bits, self.a_bits = w_bits, a_bits
        self.w_lim, self.a_lim = qmax(w_bits), qmax(a_bits)
        self.register_buffer("w_absmax", w.abs().amax(dim=1).clamp_min(1e-12))
        self.w_log_clip = nn.Parameter(torch.zeros(w.shape[0], device=w.device))
        self.a_log_scale = None
        if act_absmax is not None:
            init = max(float(act_absmax), 1e-8) / self.a_lim
            self.a_log_scale = nn.Parameter(torch.tensor(math.log(init), device=w.device))

    def weight_scale(self) -> torch.Tensor:
        """Per output channel, rounded up to the stored dtype (the value the
        kernels use; the rounding is straight-through)."""
        s = self.w_absmax * self.w_log_clip.clamp(max=0).exp() / self.w_lim
        return s + (_round_scale(s.detach(), self.scale_dtype).float() - s).detach()

    def act_scale(self) -> float | None:
        return None if self.a_log_scale is None else float(self.a_log_scale.detach().exp())

    def forward(self, x):
        xf = x.float()
        if self.a_log_scale is None:
            s = (xf.detach().abs().amax(dim=-1, keepdim=True) / self.a_lim).clamp_min(1e-12)
        else:
            s = self.a_log_scale.exp()
        wq = _lsq(self.weight, self.weight_scale()[:, None], self.w_lim)
        return F.linear(_lsq(xf, s, self.a_lim), wq, self.bias).to(x.dtype)

    def export(self) -> IntActWeight:
        """The IntActWeight the kernels run: codes at the learned scales."""
        with torch.no_grad():
            scale = self.weight_scale()
            codes = torch.round(self.weight / scale[:, None]).clamp(-self.w_lim, self.w_lim)
            return IntActWeight.from_codes(codes.to(torch.int8).cpu(),
                                           scale[:, None].to(self.scale_dtype).cpu(),
                                           self.w_bits, self.a_bits, None, self.act_scale())


class _STELinear(nn.Module):
    """A decoder linear as the Q-VLM search starts: RTN integer weights,
    per-token integer activations with straight-through rounding. The weights
    are fake-quantized from the original linear at each call, so no second
    copy of the language model is held."""

    def __init__(self, linear: nn.Linear, config: IntActConfig):
        super().__init__()
        self.linear = [linear]             # a list: not registered as a submodule
        self.config = config
        self.lim = qmax(config.a_bits)

    def forward(self, x):
        lin = self.linear[0]
        with torch.no_grad():
            w = fake_quantize(lin.weight.detach(), self.config).to(x.dtype)
        s = (x.detach().abs().amax(dim=-1, keepdim=True) / self.lim).clamp_min(1e-12)
        xq = _lsq(x, s, self.lim)
        b = None if lin.bias is None else lin.bias.detach().to(x.dtype)
        return F.linear(xq, w, b)


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: dict):
    old = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_module(model, name, module)
        yield
    finally:
        for name, module in old.items():
            set_module(model, name, module)


def vision_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules of the vision tower, projector excluded."""
    spec = arch_of(model)
    vision = find_path(model, spec.vision)
    if vision is None:
        raise ValueError(f"{type(model).__name__} has no vision tower (looked for "
                         f"{spec.vision or 'none: a text-only architecture'}); the visual-"
                         f"encoder optimisation needs a VLM")
    projector = find_path(model, spec.projector)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and (n == vision or n.startswith(vision + "."))
             and not (projector and (n == projector or n.startswith(projector + ".")))]
    if not names:
        raise ValueError(f"{type(model).__name__}: no nn.Linear in the vision tower {vision}")
    return names


def _labels(model: nn.Module, sample: dict) -> torch.Tensor:
    labels = sample["input_ids"].clone()
    if "attention_mask" in sample:
        labels[sample["attention_mask"] == 0] = -100
    for key in ("image_token_id", "image_token_index"):
        tok = getattr(model.config, key, None)
        if isinstance(tok, int):
            labels[labels == tok] = -100
    return labels


class _Probe:
    """Forward hooks collecting what the losses read: the projector's input,
    every decoder layer's q/k/v input, and the last decoder layer's output."""

    def __init__(self, model, projector, layers, qkv_name):
        self.vision, self.qkv, self.last = None, [], None
        self.handles = [model.get_submodule(projector).register_forward_pre_hook(self._vision)]
        self.handles += [layer.get_submodule(qkv_name).register_forward_pre_hook(self._qkv)
                         for layer in layers]
        self.handles.append(layers[-1].register_forward_hook(self._last))

    def _vision(self, module, args):
        self.vision = args[0]

    def _qkv(self, module, args):
        self.qkv.append(args[0])

    def _last(self, module, args, out):
        self.last = first_output(out)

    def reset(self):
        self.vision, self.qkv, self.last = None, [], None

    def close(self):
        for h in self.handles:
            h.remove()


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    b = b.float()
    return (a.float() - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-30)


def _references(model, samples, names, probe, cfg, device, progress):
    """One full-precision pass: per sample the projector input and the last
    decoder layer's output; per vision linear its input absmax; per decoder
    layer the q/k/v-input absmax (the entropy grid's clip); per sample the
    element positions L_ent pairs across layers."""
    act_max = {n: 0.0 for n in names}

    def range_hook(name):
        def hook(module, args):
            act_max[name] = max(act_max[name], float(args[0].detach().abs().max()))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(range_hook(n)) for n in names]
    refs, clips, positions = [], None, []
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        with torch.no_grad():
            for s in tqdm(samples, desc="vision references", disable=not progress):
                probe.reset()
                model(**s)
                if probe.vision is None:
                    raise ValueError("a sample with pixel_values never ran the projector")
                if not all(bool(torch.isfinite(x).all()) for x in [probe.vision, *probe.qkv]):
                    raise ValueError("full-precision activations hold NaN/Inf")
                mask = _pad_mask(s, probe.last)       # padding stays out of every term
                refs.append((probe.vision.detach().clone(), probe.last.detach().clone(), mask))
                m = [float(_real(x, mask).abs().max()) for x in probe.qkv]
                clips = m if clips is None else [max(a, b) for a, b in zip(clips, m)]
                x0 = probe.qkv[0]
                if mask is None:
                    pick = torch.randperm(x0.numel(), generator=gen)
                else:
                    real = torch.nonzero(mask[..., None].expand(x0.shape).reshape(-1).cpu())
                    real = real.flatten()
                    pick = real[torch.randperm(real.numel(), generator=gen)]
                positions.append(pick[:cfg.entropy_elements].to(device))
    finally:
        for h in handles:
            h.remove()
    return refs, act_max, [c if c > 0 else 1.0 for c in clips], positions


class _Objective:
    """Eq. 10's terms for one sample, read by the probes of one forward pass
    of the model with its quantized stand-ins in place."""

    def __init__(self, model, probe, refs, positions, clips, a_bits, temperature):
        self.model, self.probe, self.refs = model, probe, refs
        self.positions, self.clips = positions, clips
        self.a_bits, self.temperature = a_bits, temperature

    def terms(self, i, sample, weights):
        """(L_reg, L_ent, vision error, last-layer error, [D(k, k+1)])."""
        probe, pos = self.probe, self.positions[i]
        probe.reset()
        out = self.model(**sample, labels=_labels(self.model, sample))
        deps = [soft_dependency(probe.qkv[k].reshape(-1)[pos], probe.qkv[k + 1].reshape(-1)[pos],
                                self.a_bits, self.clips[k], self.clips[k + 1], self.temperature)
                for k in range(len(probe.qkv) - 1)]
        ent = sum(w * d for w, d in zip(weights, deps)) if deps else out.loss * 0
        vision_ref, last_ref, mask = self.refs[i]
        return (out.loss, ent, _rel(probe.vision, vision_ref),
                _rel(_real(probe.last, mask), _real(last_ref, mask)), deps)

    def measure(self, samples, weights, h0, max_depth) -> dict:
        """Mean terms over ``samples``, the pair dependencies and their blocks."""
        tot = {"reg": 0.0, "ent": 0.0, "vision_err": 0.0, "last_err": 0.0}
        pair = None
        with torch.no_grad():
            for i, s in enumerate(samples):
                *values, deps = self.terms(i, s, weights)
                for key, v in zip(tot, values):
                    tot[key] += float(v) / len(samples)
                d = [float(x) / len(samples) for x in deps]
                pair = d if pair is None else [a + b for a, b in zip(pair, d)]
        pair = pair or []
        if h0 is None:
            h0 = sum(pair) / len(pair) if pair else 0.0
        return {**tot, "pair_dependency": pair, "blocks": partition_blocks(pair, h0, max_depth),
                "h0": h0}


def _stand_ins(model, names, layers_path, layers, sequence, act_max, cfg, bits, lm_cfg, device):
    """Learned vision linears and straight-through decoder linears, by name."""
    w_bits, a_bits = bits
    learned = {n: _LearnedQuantLinear(model.get_submodule(n), w_bits, a_bits,
                                      act_max[n] if cfg.activation == "static" else None)
               .to(device) for n in names}
    ste = {}
    for k, layer in enumerate(layers):
        for sub in (name for group in sequence for name in group):
            try:
                ste[f"{layers_path}.{k}.{sub}"] = _STELinear(layer.get_submodule(sub), lm_cfg)
            except AttributeError:
                continue
    return learned, ste


def optimize_vision(model: nn.Module, samples, lm_bits: tuple[int, int], lm_group: int | None,
                    config: VisionOptConfig | None = None, h0: float | None = None,
                    max_depth: int = 3, temperature: str = "delta", device=None,
                    progress: bool = True) -> VisionOptReport:
    """Quantize ``model``'s vision tower in place with learned clipping (eqs. 8-10).

    lm_bits: (w_bits, a_bits) of the decoder linears; lm_group their group size.
    h0 / max_depth / temperature: the partition rule used to report how the
    dependency profile's blocks change (h0 None: the mean pair dependency at
    the initial parameters). The whole model moves to ``device`` (training
    backpropagates through all of it) and back afterwards. Returns a
    VisionOptReport."""
    cfg = config or VisionOptConfig()
    if not isinstance(cfg, VisionOptConfig):
        raise TypeError(f"config must be a VisionOptConfig, got {type(cfg).__name__}")
    t0 = time.perf_counter()
    names = vision_linears(model)
    # text-only samples never reach the vision tower: nothing to learn from them
    samples = [s for s in samples if s.get("pixel_values") is not None]
    if not samples:
        raise ValueError("the visual-encoder optimisation needs calibration samples with "
                         "images (pixel_values); none was given")
    projector = find_path(model, arch_of(model).projector)
    if projector is None:
        raise ValueError(f"{type(model).__name__}: no projector found "
                         f"({arch_of(model).projector})")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.to(device)
    try:
        samples = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in s.items()}
                   for s in samples]
        report = _optimize(model, samples, names, projector, lm_bits, lm_group, cfg, h0,
                           max_depth, temperature, device, progress)
    finally:
        model.to(home)    # also after an error: the model stays where the caller had it
    report.seconds = time.perf_counter() - t0
    return report


def _optimize(model, samples, names, projector, lm_bits, lm_group, cfg, h0, max_depth,
              temperature, device, progress) -> VisionOptReport:
    from ..replace import replace_linears
    spec = arch_of(model)
    layers_path, layers = decoder_layers(model)
    qkv_name = spec.sequence[0][0]
    bits = (cfg.w_bits or lm_bits[0], cfg.a_bits or lm_bits[1])
    report = VisionOptReport(linears=len(names))

    # 1. full-precision references, activation ranges, entropy element positions
    probe = _Probe(model, projector, layers, qkv_name)
    try:
        refs, act_max, clips, positions = _references(model, samples, names, probe, cfg,
                                                      device, progress)
    finally:
        probe.close()

    # 2. the quantized stand-ins: learned vision linears, STE decoder linears
    learned, ste = _stand_ins(model, names, layers_path, layers, spec.sequence, act_max, cfg,
                              bits, IntActConfig(lm_bits[0], lm_bits[1], lm_group), device)
    params = [p for m in learned.values() for p in m.parameters()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    probe = None
    try:
        with _swapped(model, {**learned, **ste}):
            probe = _Probe(model, projector, layers, qkv_name)   # on the stand-ins
            objective = _Objective(model, probe, refs, positions, clips, bits[1], temperature)
            for p in params:
                p.requires_grad_(True)
            # 3. eq. 8's layer weights: |dE_n / dX_k| at the initial parameters
            report.layer_weights = _jacobian_weights(model, layers,
                                                     samples[:cfg.jacobian_samples], refs, probe)
            weights = report.layer_weights[:-1]
            report.before = objective.measure(samples, weights, h0, max_depth)
            # 4. training
            if cfg.epochs > 0 and params:
                report.history = _train(lambda i: objective.terms(i, samples[i], weights)[:4],
                                        params, len(samples), cfg, progress)
                report.after = objective.measure(samples, weights, report.before["h0"],
                                                 max_depth)
            plan = {n: m.export() for n, m in learned.items()}
    finally:
        if probe is not None:
            probe.close()
        for p in frozen:
            p.requires_grad_(True)
        for p in params:
            p.requires_grad_(False)

    # 5. the packed integer layers the kernels run
    report.fp_nbytes = sum(model.get_submodule(n).weight.numel() * 2 for n in names)
    replace_linears(model, plan, skip=(), progress=False)
    info = {"method": "qvlm-vision", "activation": cfg.activation, "epochs": cfg.epochs,
            "lambda_ent": cfg.lambda_ent, "lambda_err": cfg.lambda_err, "eta": cfg.eta}
    for n, w in plan.items():
        model.get_submodule(n).quant_info = {**info, "config": _config_json(w)}
        report.nbytes += w.nbytes
    return report


def _train(losses, params, n_samples: int, cfg: VisionOptConfig, progress: bool) -> list:
    """Adam on eq. 10, one step per sample, ``cfg.epochs`` shuffled passes.
    losses(i) -> (L_reg, L_ent, vision error, last-layer error) of sample i.
    Returns the per-epoch mean losses."""
    opt = torch.optim.Adam(params, lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    for epoch in range(cfg.epochs):
        sums = {"loss": 0.0, "reg": 0.0, "ent": 0.0, "err": 0.0}
        perm = torch.randperm(n_samples, generator=order).tolist()
        bar = tqdm(perm, desc=f"vision epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for i in bar:
            reg, ent, verr, lerr = losses(i)
            err = verr + cfg.eta * lerr
            loss = reg + cfg.lambda_ent * ent + cfg.lambda_err * err
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"vision optimisation: loss is {float(loss.detach())} "
                                         f"(epoch {epoch + 1}); lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for key, v in zip(sums, (loss, reg, ent, err)):
                sums[key] += float(v.detach()) / n_samples
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        history.append(sums)
    return history


def _config_json(w: IntActWeight) -> dict:
    from ..plan import config_to_json
    return config_to_json(IntActConfig(w.w_bits, w.a_bits, None, act_scale=w.act_scale))


def _jacobian_weights(model, layers, samples, refs, probe) -> list[float]:
    """Per decoder layer k, the mean norm of dE_n / dX_k, E_n the squared error
    of the last layer's output; normalised to sum 1."""
    grads = [0.0] * len(layers)
    for i, s in enumerate(samples):
        inputs = []

        def keep(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if h.requires_grad:
                h.retain_grad()
            inputs.append(h)

        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in layers]
        try:
            probe.reset()
            model(**s)
            _, last_ref, mask = refs[i]
            err = (_real(probe.last.float(), mask) - _real(last_ref.float(), mask)).pow(2).sum()
            if err.requires_grad:
                err.backward()
        finally:
            for h in handles:
                h.remove()
        for k, h in enumerate(inputs[:len(layers)]):
            if h.grad is not None:
                grads[k] += float(h.grad.norm()) / len(samples)
        model.zero_grad(set_to_none=True)
    total = sum(grads)
    if total == 0 or not math.isfinite(total):
        return [1.0 / len(layers)] * len(layers)
    return [g / total for g in grads]


__all__ = ["VisionOptConfig", "VisionOptReport", "optimize_vision", "vision_linears"]
