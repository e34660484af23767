"""Calibration of whole models: architecture table, the layer-by-layer engine
and the whole-model VLM methods (Q-VLM with its visual-encoder optimisation,
LUQ)."""
from .arch import ArchSpec, UnknownArchitectureError, arch_of, register_arch
from .engine import CalibReport, ModuleResult, quantize_model
from .luq import LUQConfig, luq_quantize
from .methods import LayerMethod, layer_method
from .qvlm import QVLMConfig, qvlm_quantize
from .qvlm_vision import VisionOptConfig
from .replay_check import ReplayMismatchError

__all__ = ["ArchSpec", "UnknownArchitectureError", "arch_of", "register_arch", "CalibReport",
           "ModuleResult", "quantize_model", "LayerMethod", "layer_method", "LUQConfig", "luq_quantize",
           "QVLMConfig", "qvlm_quantize", "VisionOptConfig", "ReplayMismatchError"]
