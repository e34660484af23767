"""What every CUDA kernel wrapper needs: the checks before a call (extension
and op present, activations of the right shape, dtype and device), kernel
layouts cached beside the quantized weights they are made from, and the
device facts asked for on every call.

Each CUDA kernel re-lays a weight out on its first call (per device and
activation dtype or MMA mode) and reuses that copy afterwards. The copy is
held weakly by weight object, never in the weight's state or checkpoints,
and is rebuilt when one of the weight's tensors is replaced or changed in
place (``load_state_dict``). In-place writes that autograd's version counter
does not see (through ``.data``, a NumPy or DLPack view, or to a tensor made
under ``torch.inference_mode``, which has no counter) are not noticed:
``forget_layouts()`` drops every cached layout after such a write.

Such long-lived tensors (layouts, the stream-K counters) are made by
``outside_graph_pools``: a first call may come inside torch.compile's
CUDA-graph trees (mode="reduce-overhead"), whose warm-up runs send every
allocation of the calling thread into the graphs' private memory pool and
later treat any block of that pool they do not track as free memory.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import weakref
from typing import Callable, TypeVar

import torch

L = TypeVar("L")


def tensors_version(qweight) -> tuple:
    """Storage address and in-place version of every tensor of ``qweight``
    (asked on every kernel call, hence the plain loop). A tensor made under
    ``torch.inference_mode`` has no version (reading it raises): its address
    alone counts."""
    out = []
    for name in qweight.TENSORS:
        t = getattr(qweight, name)
        if t is not None:
            out.append(t.data_ptr())
            try:
                out.append(t._version)
            except RuntimeError:   # an inference tensor: no version counter
                out.append(-1)
    return tuple(out)


_CACHES: weakref.WeakSet = weakref.WeakSet()


def forget_layouts() -> None:
    """Drop every cached kernel layout, so each weight's next call re-lays it
    out: needed after writing to a weight in a way its version counter does
    not record (see the module docstring). Waits for every GPU first, so no
    running kernel still reads a layout when its memory is freed. A captured
    CUDA graph holds the layouts' addresses, not the layouts: capture again
    after calling this."""
    if torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)
    for cache in list(_CACHES):
        cache.clear()


class LayoutCache:
    """Layouts per weight object and key, made by ``make()`` on a miss."""

    def __init__(self) -> None:
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        _CACHES.add(self)

    def clear(self) -> None:
        self._layouts.clear()

    def get(self, qweight, key, make: Callable[[], L]) -> L:
        per_weight = self._layouts.setdefault(qweight, {})
        version = tensors_version(qweight)
        hit = per_weight.get(key)
        if hit is None or hit[0] != version:
            hit = (version, outside_graph_pools(make, qweight.device))
            per_weight[key] = hit
        return hit[1]


_WORKER: concurrent.futures.ThreadPoolExecutor | None = None
_WORKER_NAME = "vlmkern-outside-graph-pools"


def outside_graph_pools(make: Callable[[], L], device: torch.device) -> L:
    """``make()``, with the CUDA tensors it allocates taken from the ordinary
    caching-allocator pools even where the calling thread allocates into a
    CUDA-graph pool. A pool is entered per thread, so the work runs on a
    worker thread: ordered after the caller's stream, waited for, and its
    tensors marked as used by the caller's stream (so freeing one later waits
    for the caller's kernels). During a capture nothing may wait, so there
    ``make()`` runs in place and its tensors belong to the captured graph."""
    global _WORKER
    if (device.type != "cuda" or threading.current_thread().name.startswith(_WORKER_NAME)
            or torch.cuda.is_current_stream_capturing()):
        return make()      # (on the worker already: a layout made from another one)
    caller = torch.cuda.current_stream(device)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def work():   # under the caller's autograd modes, which are per thread
        with torch.cuda.device(device), torch.inference_mode(inference), \
                torch.set_grad_enabled(grad):
            stream = torch.cuda.current_stream(device)
            stream.wait_stream(caller)
            made = make()
            stream.synchronize()
        return made

    if _WORKER is None:
        _WORKER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=_WORKER_NAME)
    made = _WORKER.submit(work).result()
    for t in _tensors_in(made):
        if t.is_cuda:
            t.record_stream(caller)
    return made


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    return []


_DEVICE_PROPERTIES: dict[tuple[int, str], int] = {}


def _device_property(device: torch.device, name: str) -> int:
    """A field of ``torch.cuda.get_device_properties`` (asked once per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if (idx, name) not in _DEVICE_PROPERTIES:
        _DEVICE_PROPERTIES[idx, name] = getattr(torch.cuda.get_device_properties(idx), name)
    return _DEVICE_PROPERTIES[idx, name]


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _device_property(device, "multi_processor_count")


def smem_per_block(device: torch.device) -> int:
    """Shared memory a thread block may opt in to on a CUDA device, in bytes."""
    return _device_property(device, "shared_memory_per_block_optin")


# Shared memory the driver keeps per thread block on top of what it asks for
# (sm_80 and later): counts against the SM's shared memory.
SMEM_RESERVED = 1024


def smem_per_multiprocessor(device: torch.device) -> int:
    """Shared memory of one SM of a CUDA device, in bytes."""
    return _device_property(device, "shared_memory_per_multiprocessor")


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


def dense_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the launchers that take a row stride read it: unit column
    stride and rows that do not overlap. Broadcast rows (``expand``) and
    sliding windows (``unfold``) are valid activations that break the second,
    so they are copied; any other x is passed through."""
    if x.stride(1) == 1 and (x.shape[0] <= 1 or x.stride(0) >= x.shape[1]):
        return x
    # (not .contiguous(): it keeps a one-column x's stride, which a size-1
    # dimension makes irrelevant to torch but not to the launchers' checks)
    return x.clone(memory_format=torch.contiguous_format)


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy where it does not start on the 16-byte boundary
    the kernels' vector loads need (a view into a larger buffer)."""
    return t.clone() if t.data_ptr() % 16 else t
