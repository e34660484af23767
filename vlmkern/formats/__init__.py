"""Packed weight formats. Each module documents its layout next to its pack/unpack."""
from .base import FormatError, PackedWeight
from .binary import BinaryWeight
from .groupwise import QuantizedWeight
from .intact import IntActWeight

WEIGHT_TYPES = {cls.FORMAT: cls for cls in (QuantizedWeight, IntActWeight, BinaryWeight)}
FORMAT_VERSION = 1

__all__ = ["FormatError", "PackedWeight", "QuantizedWeight", "IntActWeight", "BinaryWeight",
           "WEIGHT_TYPES", "FORMAT_VERSION"]
