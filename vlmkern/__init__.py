"""vlmkern: low-bit inference for vision-language models.

Public names: QuantConfig, IntActConfig, BinaryConfig, quantize_rtn, binarize,
replace_linears, to_kernel_layout, save_quantized, load_quantized, available_backends, ops.
Importing vlmkern never touches CUDA, compiles anything or needs a GPU.
"""
from . import ops
from .config import BinaryConfig, IntActConfig, QuantConfig
from .formats import BinaryWeight, FormatError, IntActWeight, QuantizedWeight
from .io import load_quantized, save_quantized
from .nn import BinaryLinear, IntActLinear, QuantLinear, WeightOnlyLinear
from .ops import available_backends
from .quant import (AWQConfig, BiLLMConfig, GPTAQConfig, GPTQConfig, HessianAccumulator,
                    awq_quantize, billm_quantize, binarize, gptaq_quantize, gptq_quantize,
                    quantize_rtn, quantize_weight, smoothquant_quantize)
from .replace import DEFAULT_SKIP, replace_linears, to_kernel_layout
from .calib import quantize_model

__version__ = "0.1.0"

__all__ = ["QuantConfig", "IntActConfig", "BinaryConfig", "QuantizedWeight", "IntActWeight",
           "BinaryWeight", "FormatError", "quantize_rtn", "quantize_weight", "binarize",
           "replace_linears", "to_kernel_layout", "DEFAULT_SKIP", "save_quantized", "load_quantized",
           "available_backends", "ops", "QuantLinear", "WeightOnlyLinear", "IntActLinear",
           "BinaryLinear", "GPTQConfig", "GPTAQConfig", "gptq_quantize", "gptaq_quantize",
           "HessianAccumulator", "BiLLMConfig", "billm_quantize", "AWQConfig", "awq_quantize",
           "smoothquant_quantize", "quantize_model", "__version__"]
