"""nn.Module layers backed by vlmkern's quantized ops."""
from .modules import MODULE_TYPES, BinaryLinear, IntActLinear, QuantLinear, WeightOnlyLinear

__all__ = ["QuantLinear", "WeightOnlyLinear", "IntActLinear", "BinaryLinear", "MODULE_TYPES"]
