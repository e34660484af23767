"""Calibration of whole models: architecture table and the layer-by-layer engine."""
from .arch import ArchSpec, UnknownArchitectureError, arch_of, register_arch
from .engine import CalibReport, ModuleResult, quantize_model
from .methods import LayerMethod, layer_method

__all__ = ["ArchSpec", "UnknownArchitectureError", "arch_of", "register_arch", "CalibReport",
           "ModuleResult", "quantize_model", "LayerMethod", "layer_method"]
