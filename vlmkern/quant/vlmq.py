"""VLMQ: GPTQ/GPTAQ with token-importance-weighted Hessians for VLMs.

A VLM's calibration tokens are mostly image tokens, many of them redundant.
VLMQ weighs each token t of the attention linears' objective by an importance
g_t, so GPTQ/GPTAQ minimise ||(dW X - r) G||^2 with G = diag(g): the Hessian
becomes H~ = (2/T) X G^2 X^T and GPTAQ's cross term D~ = (2/T) dX G^2 X~^T
(``HessianAccumulator.add(x, token_weight=g)`` / ``add_pair``); the rounding
itself is GPTQ/GPTAQ unchanged. The MLP linears keep the plain H.

Importance (per decoder layer, before any of its linears is quantized): one
forward of the attention block Attn(X) = X + MHSA(norm(X)) on the
full-precision stream X and on the partly quantized stream X^ (earlier layers
quantized), the block loss L = ||Attn(X) - Attn(X^)||^2, and one backward
through the block only (memory of one block's activations). For each
linear z = W x of q/k/v/o, P = dL/dz on the X^ path and

    l1: g_t = mean_c |P_tc|            (the paper's eq. 4)
    l2: g_t = sqrt(mean_c P_tc^2)      (its l2 variant; constant factors do not
                                        matter: scaling g scales H~ and D~)

The block output is read at the input of the module named
``VLMQConfig.block_output`` (``post_attention_layernorm`` in Llama/Qwen2
layers: exactly X + MHSA(...)), where the forward stops.

Departure (the paper does not say): where the two streams are identical for
every sample -- the first decoder layer, whose inputs no quantized layer has
touched yet -- L and all its gradients vanish and G = 0 would erase H~; such a
layer (or a linear whose importance is zero for every token) is calibrated
with uniform weights, i.e. plain GPTQ/GPTAQ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import config_names
from .gptq import GPTAQConfig, GPTQConfig, gptaq_quantize, gptq_quantize
from .hessian import check_calibrated

NORMS = ("l1", "l2")
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj")


@dataclass(frozen=True)
class VLMQConfig:
    """base: GPTQConfig or GPTAQConfig run on the weighted statistics (the
    paper's default precursor is GPTAQ, act_order on). norm: 'l1' or 'l2'
    token reduction of the gradient. weighted: linears (names inside a decoder
    layer) whose Hessian is importance-weighted. block_output: the module whose
    input is the attention block's output Attn(X)."""

    base: GPTQConfig | GPTAQConfig = field(
        default_factory=lambda: GPTAQConfig(GPTQConfig(act_order=True)))
    norm: str = "l1"
    weighted: tuple[str, ...] = ATTENTION_LINEARS
    block_output: str = "post_attention_layernorm"

    def __post_init__(self):
        if not isinstance(self.base, (GPTQConfig, GPTAQConfig)):
            raise TypeError(f"VLMQConfig.base must be a GPTQConfig or GPTAQConfig, "
                            f"got {type(self.base).__name__}")
        if self.norm not in NORMS:
            raise ValueError(f"VLMQConfig.norm must be one of {NORMS}, got {self.norm!r}")
        weighted = config_names("VLMQConfig", "weighted", self.weighted)
        if not weighted or "" in weighted:
            raise ValueError(f"VLMQConfig.weighted must name at least one linear, got "
                             f"{self.weighted!r}")
        object.__setattr__(self, "weighted", weighted)
        if not isinstance(self.block_output, str) or not self.block_output:
            raise ValueError(f"VLMQConfig.block_output must name a module of the decoder layer, "
                             f"got {self.block_output!r}")

    @property
    def uses_gptaq(self) -> bool:
        return isinstance(self.base, GPTAQConfig)


def reduce_gradient(grad: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """Token importance g [...] (float32) from output gradients P [..., C_o]:
    l1 mean_c |P|, l2 sqrt(mean_c P^2)."""
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point() or grad.dim() < 1:
        raise TypeError("grad must be a floating tensor [..., out_features]")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not bool(torch.isfinite(grad).all()):
        raise ValueError("the block gradient holds NaN/Inf values")
    p = grad.float()
    if norm == "l1":
        return p.abs().mean(dim=-1)
    return p.pow(2).mean(dim=-1).sqrt()


class _BlockOutput(Exception):
    """Raised at the block output: the rest of the decoder layer is not needed."""


def _attention_block(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, block_output: str,
                     watch: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict]:
    """Attn(hidden) read at ``block_output``'s input, and the outputs of the
    ``watch`` linears (graph attached when grad is enabled)."""
    outs: dict[str, torch.Tensor] = {}
    got: dict[str, torch.Tensor] = {}

    def stop(module, args):
        got["out"] = args[0]
        raise _BlockOutput

    def keep(name):
        def hook(module, args, output):
            outs[name] = output
        return hook

    try:
        handles = [layer.get_submodule(block_output).register_forward_pre_hook(stop)]
        handles += [layer.get_submodule(n).register_forward_hook(keep(n)) for n in watch]
    except AttributeError as e:
        raise ValueError(f"VLMQ: the decoder layer {type(layer).__name__} has no module "
                         f"{e}; set VLMQConfig.block_output / weighted for this "
                         f"architecture") from None
    try:
        layer(hidden, **kwargs)
    except _BlockOutput:
        pass
    else:
        raise RuntimeError(f"VLMQ: the layer's forward never reached {block_output!r}")
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in watch if n not in outs]
    if missing:
        raise RuntimeError(f"VLMQ: {missing} were not called before {block_output!r}")
    return got["out"], outs


def token_importance(layer: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, kwargs: dict,
                     config: VLMQConfig, mask: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
    """{linear name: g [B, T] float32} for one calibration batch.

    layer: a decoder layer whose linears are still full precision. x_fp, x_q:
    its inputs [B, T, C] on the full-precision and on the partly quantized
    stream (same tokens); kwargs: the layer's other forward arguments; mask:
    [B, T] real tokens (padding's block error left out of the loss) or None.
    One forward on each stream and one backward through the attention block.
    """
    if tuple(x_fp.shape) != tuple(x_q.shape):
        raise ValueError(f"x_fp and x_q must hold the same tokens, got shapes "
                         f"{tuple(x_fp.shape)} and {tuple(x_q.shape)}")
    for name, x in (("x_fp", x_fp), ("x_q", x_q)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN/Inf values")
    with torch.no_grad():
        target, _ = _attention_block(layer, x_fp, kwargs, config.block_output)
    with torch.enable_grad():
        # A leaf that needs grad builds the graph even if the model's
        # parameters were frozen; only the block's own ops enter it.
        x = x_q.detach().requires_grad_(True)
        out, z = _attention_block(layer, x, kwargs, config.block_output, config.weighted)
        err = (out.float() - target.float()).pow(2)
        loss = (err if mask is None else err[mask]).sum()
        grads = torch.autograd.grad(loss, [z[n] for n in config.weighted], allow_unused=True)
    result = {}
    for name, g in zip(config.weighted, grads):
        if g is None:     # the output never reaches the block output: no importance
            g = torch.zeros_like(z[name])
        result[name] = reduce_gradient(g.detach(), config.norm)
    return result


def layer_importance(layer: nn.Module, inputs, fp_inputs, kwargs_list,
                     config: VLMQConfig, masks=None) -> dict[str, list[torch.Tensor]] | None:
    """Per-sample token weights {name: [g per batch]} for one decoder layer, or
    None when every batch's streams are identical (uniform weights: the
    block loss and all its gradients vanish). A linear whose importance is
    zero for every token of every batch is left out (uniform weights), since
    a zero H~ would erase it."""
    if fp_inputs is None or len(fp_inputs) != len(inputs) or len(kwargs_list) != len(inputs):
        raise ValueError("VLMQ needs the full-precision stream: one fp input and one kwargs "
                         "dict per calibration batch")
    if all(torch.equal(a, b) for a, b in zip(inputs, fp_inputs)):
        return None
    per_name: dict[str, list[torch.Tensor]] = {n: [] for n in config.weighted}
    for i, (x_q, x_fp, kwargs) in enumerate(zip(inputs, fp_inputs, kwargs_list)):
        mask = masks[i] if masks else None
        for name, g in token_importance(layer, x_fp, x_q, kwargs, config, mask).items():
            per_name[name].append(g)
    return {n: gs for n, gs in per_name.items() if any(bool((g > 0).any()) for g in gs)}


def vlmq_quantize(weight: torch.Tensor, stats, config: VLMQConfig):
    """The base method on (weighted or plain) statistics ``stats`` (a
    HessianAccumulator; GPTAQ needs one fed with ``add_pair``). Returns the
    packed weight, as GPTQ/GPTAQ, plus their stats."""
    if not isinstance(config, VLMQConfig):
        raise TypeError(f"config must be a VLMQConfig, got {type(config).__name__}")
    base = config.base
    if isinstance(base, GPTAQConfig):
        if stats.delta is None:
            check_calibrated(stats.hessian)     # no tokens at all: no delta either
            raise ValueError("VLMQ with a GPTAQ base needs paired statistics (add_pair)")
        return gptaq_quantize(weight, stats.hessian, stats.delta, base.gptq, base.alpha)
    return gptq_quantize(weight, stats.hessian, base)


__all__ = ["VLMQConfig", "NORMS", "ATTENTION_LINEARS", "reduce_gradient", "token_importance",
           "layer_importance", "vlmq_quantize"]
