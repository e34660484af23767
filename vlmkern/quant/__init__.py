"""Quantization methods: pure functions from float weights (and calibration
statistics) to packed weights."""
from ..config import BinaryConfig, IntActConfig, QuantConfig
from .awq import (AWQConfig, apply_awq, awq_quantize, awq_search_clip, awq_search_scales,
                  fold_scales_into_linear, fold_scales_into_norm)
from .billm import BiLLMConfig, billm_quantize
from .binarize import binarize, binarize_block, residual_binarize
from .gptq import GPTAQConfig, GPTQConfig, GPTQStats, gptaq_quantize, gptq_quantize
from .hessian import HessianAccumulator
from .rtn import fake_quantize, group_params, quantize_rtn, quantize_to_grid
from .smoothquant import activation_absmax, smooth_scales, smooth_weights, smoothquant_quantize
from .vlmq import VLMQConfig


def quantize_weight(weight, config):
    """Quantize ``weight`` [out, in] data-free with the method matching ``config``."""
    if isinstance(config, BinaryConfig):
        return binarize(weight, config)
    if isinstance(config, (QuantConfig, IntActConfig)):
        return quantize_rtn(weight, config)
    raise TypeError(f"expected QuantConfig, IntActConfig or BinaryConfig, got {type(config).__name__}")


__all__ = ["binarize", "binarize_block", "residual_binarize", "fake_quantize", "group_params",
           "quantize_rtn", "quantize_to_grid", "quantize_weight", "GPTQConfig", "GPTAQConfig",
           "GPTQStats", "gptq_quantize", "gptaq_quantize", "HessianAccumulator", "BiLLMConfig",
           "billm_quantize", "AWQConfig", "awq_quantize", "awq_search_scales", "awq_search_clip",
           "apply_awq", "fold_scales_into_norm", "fold_scales_into_linear", "activation_absmax",
           "smooth_scales", "smooth_weights", "smoothquant_quantize", "VLMQConfig"]
