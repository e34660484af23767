"""Quantized drop-in replacements for nn.Linear.

The packed tensors of the quantized weight are registered as buffers under
their format names (``qweight``, ``scales``, ...), so ``state_dict`` saves
them and ``.to(device)`` moves them. ``model.to(dtype)`` / ``.half()`` change
the bias but never the packed tensors or their scales: a scale rounded to a
different dtype would silently change the weights.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from .. import ops
from ..config import AnyConfig
from ..formats import WEIGHT_TYPES, BinaryWeight, PackedWeight, QuantizedWeight
from ..formats.base import FormatError
from ..formats.packing import packed_words
from ..ops.compiled import hold
from ..ops.cuda_weight_only import layout_codes
from ..ops.laid_out import LaidOutWeight
from ..ops.laid_out_binary import LaidOutBinaryWeight
from ..quant import quantize_weight

_VALIDATE_ON_LOAD = contextvars.ContextVar("vlmkern_validate_on_load", default=True)


@contextlib.contextmanager
def validated_elsewhere():
    """Within: ``load_state_dict`` of quantized layers skips the format checks
    (for a caller that has run them on the same tensors already)."""
    token = _VALIDATE_ON_LOAD.set(False)
    try:
        yield
    finally:
        _VALIDATE_ON_LOAD.reset(token)


class QuantLinear(nn.Module):
    """Base class: a linear layer computing ``ops.linear(x, weight, bias)``."""

    FORMAT: str = ""

    def __init__(self, qweight: PackedWeight, bias: torch.Tensor | None = None,
                 info: dict | None = None):
        super().__init__()
        if not isinstance(qweight, PackedWeight):
            raise TypeError(f"{type(self).__name__} takes a vlmkern quantized weight, got "
                            f"{type(qweight).__name__} (QuantLinear.from_linear quantizes an "
                            f"nn.Linear)")
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
            if not bias.is_floating_point():
                raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
            if not bool(torch.isfinite(bias).all()):
                raise ValueError("bias holds NaN or Inf values")
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

    def __setstate__(self, state):
        # copy.deepcopy and unpickling come here with the weight object copied
        # too: rebuild it now, so it is held for compiled calls (a copy never
        # held would be rebuilt and re-laid out on every compiled call)
        super().__setstate__(state)
        self.__dict__.pop("_packed", None)
        if "_meta" in self.__dict__:
            self.quantized_weight  # noqa: B018

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The format's invariants (code ranges, finite scales, shapes) are
        # checked before any buffer is overwritten: an invalid tensor set is
        # reported and not loaded. load_quantized checks them itself.
        if _VALIDATE_ON_LOAD.get():
            cls = self._weight_type()
            given = {n: state_dict[prefix + n] for n in cls.TENSORS if prefix + n in state_dict}
            # the layer's shape fixes each tensor's: name the one that differs
            # (the format's own check would measure the others against it)
            held = {n: b for n, b in self._buffers.items() if isinstance(b, torch.Tensor)}
            wrong = [f"{n} has shape {tuple(t.shape)} in the state dict, this layer's is "
                     f"{tuple(held[n].shape)}" for n, t in given.items()
                     if isinstance(t, torch.Tensor) and n in held and t.shape != held[n].shape]
            if wrong:
                name = prefix.rstrip('.') or type(self).__name__
                error_msgs.extend(f"{name}: {w}" for w in wrong)
                return
            if given:
                device = next((t.device for t in given.values() if isinstance(t, torch.Tensor)),
                              None)
                tensors = {n: given.get(n, self._buffers.get(n)) for n in cls.TENSORS}
                tensors = {n: t.to(device) if isinstance(t, torch.Tensor) else t
                           for n, t in tensors.items()}
                try:
                    cls(**tensors, **self._meta).validate()
                except (FormatError, TypeError, ValueError) as e:
                    error_msgs.append(f"{prefix.rstrip('.') or type(self).__name__}: {e}")
                    return
        lossy = self._lossy_casts(state_dict, prefix)
        if lossy:
            error_msgs.extend(f"{prefix.rstrip('.') or type(self).__name__}: {why}" for why in lossy)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # The buffers took the new values in place: a new weight object, so no
        # kernel reuses a layout cached for the old one (the caches also watch
        # version counters, but tensors made under inference_mode have none).
        self.__dict__.pop("_packed", None)
        self.quantized_weight  # noqa: B018

    def _lossy_casts(self, state_dict, prefix) -> list[str]:
        """Loading copies each tensor into the layer's buffer, in the buffer's
        dtype: bf16 scales loaded into fp16 ones would be rounded, or become
        Inf, without a word. A cast is let through only when it is exact."""
        why = []
        for name in self._weight_type().FLOATS:
            t, buf = state_dict.get(prefix + name), self._buffers.get(name)
            if (isinstance(t, torch.Tensor) and isinstance(buf, torch.Tensor)
                    and t.dtype != buf.dtype and t.shape == buf.shape
                    and not torch.equal(t.to(buf.dtype).to(t.dtype), t)):
                why.append(f"{name} is {t.dtype} in the state dict and {buf.dtype} in this layer, "
                           f"and its values change in that cast; build the layer with the state "
                           f"dict's scale dtype, or load a checkpoint file with load_quantized "
                           f"(it rebuilds the layers from the file)")
        return why

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


class _LayoutLinear(QuantLinear):
    """A layer that can hold part of its weight only in a CUDA kernel layout:
    the tensor ``HELD`` in place of the canonical tensors ``CANONICAL``.
    Checkpoints always hold the canonical tensors: ``state_dict`` converts
    back on save and ``load_state_dict`` converts on load."""
    HELD: str = ""
    CANONICAL: tuple[str, ...] = ()
    LAID_OUT_TYPE: type = type(None)

    @property
    def laid_out(self) -> bool:
        """Whether the weight is held in the kernel layout."""
        return self.HELD in self._buffers

    def _weight_type(self) -> type:
        return self.LAID_OUT_TYPE if self.laid_out else super()._weight_type()

    def _canonical_shape(self) -> tuple[int, int]:
        """Shape of each int32 tensor of CANONICAL."""
        raise NotImplementedError

    def _canonical_of_held(self) -> dict[str, torch.Tensor]:
        """The CANONICAL tensors of the laid-out weight."""
        raise NotImplementedError

    def _held_of_canonical(self, tensors: list[torch.Tensor],
                           others: dict[str, torch.Tensor]) -> torch.Tensor:
        """The HELD tensor made from the CANONICAL tensors (in that order) and
        the layer's other tensors, taken from ``others`` where given there."""
        raise NotImplementedError

    def saved_tensor_names(self) -> list[str]:
        names = set(super().saved_tensor_names())
        if self.HELD in names:
            names = (names - {self.HELD}) | set(self.CANONICAL)
        return sorted(names)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.laid_out:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        own = {}
        super()._save_to_state_dict(own, prefix, keep_vars)
        for key, value in own.items():
            if key == prefix + self.HELD:
                destination.update((prefix + name, t) for name, t in self._canonical_of_held().items())
            else:
                destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [prefix + name for name in self.CANONICAL]
        present = [key in state_dict for key in keys]
        if self.laid_out and all(present):
            given = [state_dict.get(key) for key in keys]
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
            expected = self._canonical_shape()
            bad = [f"{key}: expected an int32 tensor of shape {expected}, got "
                   f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                   for key, t in zip(keys, given)
                   if not isinstance(t, torch.Tensor) or t.dtype != torch.int32
                   or tuple(t.shape) != expected]
            if bad:
                error_msgs.extend(bad)
            else:
                device = self._buffers[self.HELD].device
                # the layout also holds values of the other tensors (the
                # padding's zero points): take those being loaded, not the old
                others = {name: state_dict[prefix + name].to(device=device, dtype=b.dtype)
                          for name, b in self._buffers.items()
                          if name != self.HELD and isinstance(b, torch.Tensor)
                          and isinstance(state_dict.get(prefix + name), torch.Tensor)
                          and state_dict[prefix + name].shape == b.shape}
                state_dict[prefix + self.HELD] = self._held_of_canonical(
                    [t.to(device) for t in given], others)
        elif self.laid_out:     # some canonical tensors absent: the layout cannot be made
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        held = prefix + self.HELD
        if self.laid_out and held in missing_keys[before:]:
            # the layer's state dict names the canonical tensors: so do its missing keys
            missing_keys.remove(held)
            missing_keys.extend(key for key, there in zip(keys, present) if not there)


class WeightOnlyLinear(_LayoutLinear):
    """Group-wise W2/W3/W4/W8 weights, float activations.

    ``to_kernel_layout()`` keeps the codes only in the CUDA kernel's layout
    (``vlmkern.ops.laid_out``): the layer then holds its codes once on the
    GPU instead of twice (plus the kernels' scale words, see there).
    ``state_dict`` still writes, and ``load_state_dict`` still reads, the
    canonical format.
    """
    FORMAT = "groupwise"
    HELD, CANONICAL, LAID_OUT_TYPE = "wq", ("qweight",), LaidOutWeight

    def to_kernel_layout(self) -> "WeightOnlyLinear":
        """Hold the codes in the CUDA kernel's layout only (on the layer's
        device; raises ValueError for weights the layout cannot hold)."""
        if not self.laid_out:
            self._hold_codes("wq", LaidOutWeight.from_quantized(self.quantized_weight).wq,
                             replaces=self.CANONICAL)
        return self

    def _canonical_shape(self) -> tuple[int, int]:
        return self.out_features, packed_words(self.in_features, self._meta["bits"])

    def _canonical_of_held(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.quantized_weight.packed_codes()}

    def _held_of_canonical(self, tensors: list[torch.Tensor],
                           others: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = {name: others.get(name, getattr(self, name)) for name in ("scales", "qzeros", "perm")}
        return layout_codes(QuantizedWeight(tensors[0], **parts, **self._meta))


class IntActLinear(QuantLinear):
    """Integer weights and per-token integer activations (W8A8/W6A6/W4A4)."""
    FORMAT = "intact"


class BinaryLinear(_LayoutLinear):
    """BiLLM-style binarized weights, float activations.

    ``to_kernel_layout()`` keeps the sign and aux bits only in the
    lookup-table kernel's layout (``vlmkern.ops.laid_out_binary``): the layer
    then holds about 4 bits per weight on the GPU instead of 6 (planes and
    the kernel's copy). ``state_dict`` still writes, and ``load_state_dict``
    still reads, the canonical planes.
    """
    FORMAT = "binary"
    HELD, CANONICAL, LAID_OUT_TYPE = "codes", ("sign", "aux"), LaidOutBinaryWeight

    def to_kernel_layout(self) -> "BinaryLinear":
        """Hold the sign and aux bits in the lookup-table kernel's layout only
        (on the layer's device; raises ValueError for block sizes other than 128)."""
        if not self.laid_out:
            self._hold_codes("codes", LaidOutBinaryWeight.from_binary(self.quantized_weight).codes,
                             replaces=self.CANONICAL)
        return self

    def _canonical_shape(self) -> tuple[int, int]:
        return self.out_features, packed_words(self.in_features, 1)

    def _canonical_of_held(self) -> dict[str, torch.Tensor]:
        canonical = self.quantized_weight.canonical()
        return {"sign": canonical.sign, "aux": canonical.aux}

    def _held_of_canonical(self, tensors: list[torch.Tensor],
                           others: dict[str, torch.Tensor]) -> torch.Tensor:
        binary = BinaryWeight(*tensors, others.get("salient", self.salient),
                              others.get("stats", self.stats), **self._meta)
        return LaidOutBinaryWeight.from_binary(binary).codes


MODULE_TYPES = {cls.FORMAT: cls for cls in (WeightOnlyLinear, IntActLinear, BinaryLinear)}
