"""Kernel layouts cached beside the quantized weights they are made from, and
the device facts the CUDA wrappers ask for on every call.

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
    """Identity and in-place version of every tensor of ``qweight``."""
    return tuple((t.data_ptr(), t._version) for t in qweight.tensors().values())


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
