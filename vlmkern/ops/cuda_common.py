"""What every CUDA kernel wrapper needs: the checks before a call (extension
and op present, activations of the right shape, dtype and device), kernel
layouts cached beside the quantized weights they are made from, and the
device facts asked for on every call.

Each CUDA kernel re-lays a weight out on its first call (per device and
activation dtype or MMA mode) and reuses that copy afterwards. The copy is
held weakly by weight object, never in the weight's state or checkpoints,
and is rebuilt when one of the weight's tensors is replaced or changed in
place (``load_state_dict``).
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

L = TypeVar("L")


def tensors_version(qweight) -> tuple:
    """Storage address and in-place version of every tensor of ``qweight``
    (asked on every kernel call, hence the plain loop)."""
    out = []
    for name in qweight.TENSORS:
        t = getattr(qweight, name)
        if t is not None:
            out.append(t.data_ptr())
            out.append(t._version)
    return tuple(out)


class LayoutCache:
    """Layouts per weight object and key, made by ``make()`` on a miss."""

    def __init__(self) -> None:
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, qweight, key, make: Callable[[], L]) -> L:
        per_weight = self._layouts.setdefault(qweight, {})
        version = tensors_version(qweight)
        hit = per_weight.get(key)
        if hit is None or hit[0] != version:
            hit = (version, make())
            per_weight[key] = hit
        return hit[1]


_MULTIPROCESSORS: dict[int, int] = {}


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _MULTIPROCESSORS[idx]


_SMEM_OPTIN: dict[int, int] = {}


def smem_per_block(device: torch.device) -> int:
    """Shared memory a thread block may opt in to on a CUDA device, in bytes
    (asked once per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM_OPTIN:
        _SMEM_OPTIN[idx] = torch.cuda.get_device_properties(idx).shared_memory_per_block_optin
    return _SMEM_OPTIN[idx]


def require_op(kernel: str, op: str, source: str) -> None:
    """Raise RuntimeError unless vlmkern._C is loaded and registers
    ``torch.ops.vlmkern.<op>`` (built from ``source``)."""
    from ..ext import load_extension  # looked up per call: tests replace it

    module, reason = load_extension()
    if module is None:
        raise RuntimeError(f"{kernel} needs the CUDA extension: {reason}")
    if not hasattr(torch.ops.vlmkern, op):
        raise RuntimeError(f"{kernel}: the installed vlmkern._C was built without {source}; "
                           f"rebuild the package")


def check_activations(kernel: str, x: torch.Tensor, qweight, dtypes,
                      same_device: bool = True) -> None:
    """x must be [M, in_features] of one of ``dtypes`` (and, with
    ``same_device``, on the weight's CUDA device)."""
    if x.dim() != 2 or x.shape[1] != qweight.in_features:
        raise ValueError(f"x must be [M, {qweight.in_features}], got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{kernel}: x must be {', '.join(names[:-1])} or {names[-1]}, "
                        f"got {x.dtype}")
    if same_device and (not x.is_cuda or x.device != qweight.device):
        raise ValueError(f"{kernel}: x ({x.device}) and the weight ({qweight.device}) must be "
                         f"on the same CUDA device")
