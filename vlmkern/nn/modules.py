"""Quantized drop-in replacements for nn.Linear.

The packed tensors of the quantized weight are registered as buffers under
their format names (``qweight``, ``scales``, ...), so ``state_dict`` saves
them and ``.to(device)`` moves them. ``model.to(dtype)`` / ``.half()`` change
the bias but never the packed tensors or their scales: a scale rounded to a
different dtype would silently change the weights.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import AnyConfig
from ..formats import WEIGHT_TYPES, BinaryWeight, PackedWeight, QuantizedWeight
from ..formats.packing import packed_words
from ..ops.compiled import hold
from ..ops.cuda_weight_only import layout_codes
from ..ops.laid_out import LaidOutWeight
from ..ops.laid_out_binary import LaidOutBinaryWeight
from ..quant import quantize_weight


class QuantLinear(nn.Module):
    """Base class: a linear layer computing ``ops.linear(x, weight, bias)``."""

    FORMAT: str = ""

    def __init__(self, qweight: PackedWeight, bias: torch.Tensor | None = None,
                 info: dict | None = None):
        super().__init__()
        if self.FORMAT and qweight.FORMAT != self.FORMAT:
            raise TypeError(f"{type(self).__name__} takes {self.FORMAT} weights, got {qweight.FORMAT}")
        self.format = qweight.FORMAT
        self.out_features, self.in_features = qweight.shape
        self._meta = qweight.meta()
        for name in type(qweight).TENSORS:
            self.register_buffer(name, getattr(qweight, name))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.quant_info = dict(info or {})
        self.quantized_weight  # noqa: B018  (built once here, outside any traced forward)

    @property
    def quantized_weight(self) -> PackedWeight:
        """The layer's weight over its buffers. The same object while the
        buffers are the same tensors: the CUDA kernels cache their re-laid
        copy of a weight per object, so a new object per call would re-lay
        the weight out on every forward."""
        cls = self._weight_type()
        cached = self.__dict__.get("_packed")
        if type(cached) is not cls or any(getattr(cached, n) is not self._buffers.get(n)
                                          for n in cls.TENSORS):
            cached = cls(**{n: self._buffers.get(n) for n in cls.TENSORS}, **self._meta)
            self.__dict__["_packed"] = cached
            if not torch.compiler.is_compiling():
                hold(cached)   # so the op torch.compile calls finds this object again
        return cached

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.__dict__.get("_buffers", ()) and "_meta" in self.__dict__:
            # a replaced packed tensor: rebuild the weight now, not inside a traced forward
            self.quantized_weight  # noqa: B018

    def _weight_type(self) -> type:
        return WEIGHT_TYPES[self.format]

    def _hold_codes(self, name: str, codes: torch.Tensor, replaces: tuple[str, ...]) -> None:
        """Swap the packed tensors ``replaces`` for ``codes`` in a kernel
        layout (first among the buffers, where the format's first tensor was)."""
        buffers = {name: codes}
        buffers.update((k, v) for k, v in self._buffers.items() if k not in replaces)
        self._buffers = buffers
        self.quantized_weight  # noqa: B018  (rebuilt now, outside any traced forward)

    def saved_tensor_names(self) -> list[str]:
        """Names of the packed tensors ``state_dict`` writes (the format's)."""
        return sorted(self.quantized_weight.tensors())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config_or_weight: AnyConfig | PackedWeight,
                    info: dict | None = None) -> "QuantLinear":
        """Quantize ``linear`` (data-free, round to nearest) or wrap a given weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if isinstance(config_or_weight, PackedWeight):
            qweight = config_or_weight
            expected = (linear.out_features, linear.in_features)
            if qweight.shape != expected:
                raise ValueError(f"quantized weight has shape {qweight.shape}, the linear layer "
                                 f"is {expected}")
            qweight = qweight.to(linear.weight.device)
        else:
            qweight = quantize_weight(linear.weight.detach(), config_or_weight)
        module_cls = MODULE_TYPES[qweight.FORMAT] if cls is QuantLinear else cls
        return module_cls(qweight, linear.bias, info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.quantized_weight, self.bias)

    def _apply(self, fn, recurse=True):
        buffers, self._buffers = self._buffers, {}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers = buffers
        for name, buf in buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        # a moved weight is rebuilt here (outside any traced forward), which
        # also lets the old tensors go now rather than at the next call
        self.quantized_weight  # noqa: B018
        return self

    @property
    def nbytes(self) -> int:
        return self.quantized_weight.nbytes

    def extra_repr(self) -> str:
        meta = ", ".join(f"{k}={v}" for k, v in self._meta.items() if k != "in_features")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}, {meta}")


class WeightOnlyLinear(QuantLinear):
    """Group-wise W2/W3/W4/W8 weights, float activations.

    ``to_kernel_layout()`` keeps the codes only in the CUDA kernel's layout
    (``vlmkern.ops.laid_out``): the layer then holds its packed bytes once
    on the GPU instead of twice. ``state_dict`` still writes, and
    ``load_state_dict`` still reads, the canonical format.
    """
    FORMAT = "groupwise"

    @property
    def laid_out(self) -> bool:
        """Whether the codes are held only in the CUDA kernel layout."""
        return "wq" in self._buffers

    def _weight_type(self) -> type:
        return LaidOutWeight if self.laid_out else super()._weight_type()

    def to_kernel_layout(self) -> "WeightOnlyLinear":
        """Hold the codes in the CUDA kernel's layout only (on the layer's
        device; raises ValueError for weights the layout cannot hold)."""
        if not self.laid_out:
            self._hold_codes("wq", LaidOutWeight.from_quantized(self.quantized_weight).wq,
                             replaces=("qweight",))
        return self

    def saved_tensor_names(self) -> list[str]:
        names = super().saved_tensor_names()
        return sorted("qweight" if n == "wq" else n for n in names)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.laid_out:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        own = {}
        super()._save_to_state_dict(own, prefix, keep_vars)
        for key, value in own.items():   # checkpoints hold the canonical bit stream
            if key == prefix + "wq":
                key, value = prefix + "qweight", self.quantized_weight.packed_codes()
            destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "qweight"
        if self.laid_out and key in state_dict:
            codes = state_dict[key]
            expected = (self.out_features, packed_words(self.in_features, self._meta["bits"]))
            state_dict = {k: v for k, v in state_dict.items() if k != key}
            if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int32 \
                    or tuple(codes.shape) != expected:
                error_msgs.append(f"{key}: expected an int32 tensor of shape {expected}, got "
                                  f"{getattr(codes, 'dtype', type(codes).__name__)} "
                                  f"{tuple(getattr(codes, 'shape', ()))}")
            else:
                canonical = QuantizedWeight(codes, self.scales, self.qzeros, self.perm,
                                            **self._meta)
                state_dict[prefix + "wq"] = layout_codes(canonical)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class IntActLinear(QuantLinear):
    """Integer weights and per-token integer activations (W8A8/W6A6/W4A4)."""
    FORMAT = "intact"


class BinaryLinear(QuantLinear):
    """BiLLM-style binarized weights, float activations.

    ``to_kernel_layout()`` keeps the sign and aux bits only in the
    lookup-table kernel's layout (``vlmkern.ops.laid_out_binary``): the layer
    then holds about 4 bits per weight on the GPU instead of 6 (planes and
    the kernel's copy). ``state_dict`` still writes, and ``load_state_dict``
    still reads, the canonical planes.
    """
    FORMAT = "binary"

    @property
    def laid_out(self) -> bool:
        """Whether the sign and aux bits are held only in the kernel layout."""
        return "codes" in self._buffers

    def _weight_type(self) -> type:
        return LaidOutBinaryWeight if self.laid_out else super()._weight_type()

    def to_kernel_layout(self) -> "BinaryLinear":
        """Hold the sign and aux bits in the lookup-table kernel's layout only
        (on the layer's device; raises ValueError for block sizes other than 128)."""
        if not self.laid_out:
            self._hold_codes("codes", LaidOutBinaryWeight.from_binary(self.quantized_weight).codes,
                             replaces=("sign", "aux"))
        return self

    def saved_tensor_names(self) -> list[str]:
        names = set(super().saved_tensor_names())
        if "codes" in names:
            names = (names - {"codes"}) | {"sign", "aux"}
        return sorted(names)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.laid_out:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        own = {}
        super()._save_to_state_dict(own, prefix, keep_vars)
        for key, value in own.items():   # checkpoints hold the canonical planes
            if key == prefix + "codes":
                canonical = self.quantized_weight.canonical()
                destination[prefix + "sign"] = canonical.sign
                destination[prefix + "aux"] = canonical.aux
            else:
                destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = (prefix + "sign", prefix + "aux")
        if self.laid_out and any(key in state_dict for key in keys):
            planes = [state_dict.get(key) for key in keys]
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
            expected = (self.out_features, packed_words(self.in_features, 1))
            bad = [key for key, t in zip(keys, planes)
                   if not isinstance(t, torch.Tensor) or t.dtype != torch.int32
                   or tuple(t.shape) != expected]
            if bad:
                error_msgs.extend(f"{key}: expected an int32 tensor of shape {expected}"
                                  for key in bad)
            else:
                canonical = BinaryWeight(planes[0].to(self.codes.device),
                                         planes[1].to(self.codes.device), self.salient,
                                         self.stats, **self._meta)
                state_dict[prefix + "codes"] = LaidOutBinaryWeight.from_binary(canonical).codes
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


MODULE_TYPES = {cls.FORMAT: cls for cls in (WeightOnlyLinear, IntActLinear, BinaryLinear)}
