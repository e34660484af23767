"""Adapters from a method config to what the layer engine calls per linear.

Every method is a pure function in vlmkern.quant; this module only says which
statistics each needs and how to call it with them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..config import BinaryConfig, IntActConfig, QuantConfig, config_to_dict
from ..quant import quantize_weight


@dataclass(frozen=True)
class LayerMethod:
    name: str
    config: object
    needs_fp_stream: bool = False

    def quantize(self, weight: torch.Tensor, stats):
        cfg = self.config
        if isinstance(cfg, (QuantConfig, IntActConfig, BinaryConfig)):
            return quantize_weight(weight, cfg)
        from ..quant.billm import BiLLMConfig, billm_quantize
        from ..quant.gptq import GPTAQConfig, GPTQConfig, gptaq_quantize, gptq_quantize
        from ..quant.vlmq import VLMQConfig, vlmq_quantize
        if isinstance(cfg, VLMQConfig):
            return vlmq_quantize(weight, stats, cfg)[0]
        if isinstance(cfg, GPTQConfig):
            return gptq_quantize(weight, stats.hessian, cfg)[0]
        if isinstance(cfg, GPTAQConfig):
            return gptaq_quantize(weight, stats.hessian, stats.delta, cfg.gptq, cfg.alpha)[0]
        if isinstance(cfg, BiLLMConfig):
            return billm_quantize(weight, stats.hessian, cfg)[0]
        raise TypeError(f"no layer method for {type(cfg).__name__}")

    @property
    def one_pass(self) -> bool:
        """Whether every linear of a layer takes its statistics from one pass
        over the full-precision layer (BiLLM), instead of GPTQ's sequential
        sub-groups that see the earlier ones already quantized."""
        from ..quant.billm import BiLLMConfig
        return isinstance(self.config, BiLLMConfig)

    @property
    def paired_stats(self) -> bool:
        """Whether the Hessian accumulators take (FP, quantized) input pairs
        (GPTAQ's D). VLMQ on GPTQ needs the FP stream only for its importance."""
        from ..quant.vlmq import VLMQConfig
        if isinstance(self.config, VLMQConfig):
            return self.config.uses_gptaq
        return self.needs_fp_stream

    def token_importance(self, layer, inputs, fp_inputs, kwargs_list, masks=None):
        """Per-token Hessian weights {linear name: [g per batch]} for one decoder
        layer (VLMQ), or None for uniform weights. ``layer``: the layer's
        full-precision copy. masks: per batch, real tokens or None."""
        from ..quant.vlmq import VLMQConfig, layer_importance
        if not isinstance(self.config, VLMQConfig):
            return None
        return layer_importance(layer, inputs, fp_inputs, kwargs_list, self.config, masks)

    def describe(self) -> str:
        return json.dumps({"method": self.name, "config": _to_jsonable(self.config)},
                          sort_keys=True)


def _to_jsonable(cfg):
    if isinstance(cfg, (QuantConfig, IntActConfig, BinaryConfig)):
        return config_to_dict(cfg)
    if hasattr(cfg, "__dataclass_fields__"):
        return {k: _to_jsonable(getattr(cfg, k)) for k in cfg.__dataclass_fields__}
    if isinstance(cfg, tuple):
        return list(cfg)
    return cfg


def layer_method(config) -> LayerMethod:
    """The LayerMethod for a method config (already a LayerMethod passes through)."""
    if isinstance(config, LayerMethod):
        return config
    if isinstance(config, (QuantConfig, IntActConfig)):
        return LayerMethod("rtn", config)
    if isinstance(config, BinaryConfig):
        return LayerMethod("binarize", config)
    from ..quant.billm import BiLLMConfig
    from ..quant.gptq import GPTAQConfig, GPTQConfig
    if isinstance(config, GPTQConfig):
        return LayerMethod("gptq", config)
    if isinstance(config, GPTAQConfig):
        return LayerMethod("gptaq", config, needs_fp_stream=True)
    if isinstance(config, BiLLMConfig):
        return LayerMethod("billm", config)
    from ..quant.awq import AWQConfig
    from ..quant.vlmq import VLMQConfig
    from .awq_engine import AWQEngineConfig
    if isinstance(config, VLMQConfig):
        # the block loss compares the FP and the partly quantized streams
        return LayerMethod("vlmq", config, needs_fp_stream=True)
    if isinstance(config, (AWQConfig, AWQEngineConfig)):
        raise TypeError("AWQ rescales norms and linears before quantizing: use "
                        "vlmkern.calib.awq_engine.awq_quantize_model")
    raise TypeError(f"unknown method config {type(config).__name__}; expected QuantConfig, "
                    f"IntActConfig, BinaryConfig, GPTQConfig, GPTAQConfig, BiLLMConfig or "
                    f"VLMQConfig")
