"""vlmkern: low-bit inference for vision-language models.

Public names: QuantConfig, IntActConfig, BinaryConfig, quantize_rtn, binarize,
replace_linears, save_quantized, load_quantized, available_backends, ops.
Importing vlmkern never touches CUDA, compiles anything or needs a GPU.
"""
from . import ops
from .config import BinaryConfig, IntActConfig, QuantConfig
from .formats import BinaryWeight, FormatError, IntActWeight, QuantizedWeight
from .io import load_quantized, save_quantized
from .nn import BinaryLinear, IntActLinear, QuantLinear, WeightOnlyLinear
from .ops import available_backends
from .quant import (GPTAQConfig, GPTQConfig, HessianAccumulator, binarize, gptaq_quantize,
                    gptq_quantize, quantize_rtn, quantize_weight)
from .replace import DEFAULT_SKIP, replace_linears

__version__ = "0.1.0"

__all__ = ["QuantConfig", "IntActConfig", "BinaryConfig", "QuantizedWeight", "IntActWeight",
           "BinaryWeight", "FormatError", "quantize_rtn", "quantize_weight", "binarize",
           "replace_linears", "DEFAULT_SKIP", "save_quantized", "load_quantized",
           "available_backends", "ops", "QuantLinear", "WeightOnlyLinear", "IntActLinear",
           "BinaryLinear", "GPTQConfig", "GPTAQConfig", "gptq_quantize", "gptaq_quantize",
           "HessianAccumulator", "__version__"]
