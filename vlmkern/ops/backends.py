"""Backends, the kernels they declare, and the one selector that picks them.

A backend (cuda, triton, torch) registers kernels; each kernel declares what
it supports (op, bits, group sizes, activation dtypes, devices, M range,
minimum SM). ``select`` walks cuda -> triton -> torch and takes the first
kernel that fits, so torch (the reference) is the fallback. Availability is
probed lazily on first use, never at import. ``VLMKERN_BACKEND`` forces one
backend; if it cannot run a call the call fails instead of silently
falling back.

A kernel registered with ``opt_in=True`` is skipped unless its name is listed
in ``VLMKERN_ENABLE`` (comma-separated): new kernels wait there until their
GPU tests have passed on a GPU.

The choice is remembered per weight object, M, activation dtype and device,
under the three environment variables and the registry as they were: a
decode step repeats the same calls, and walking the kernel lists again would
cost several microseconds per layer and token. A choice depends on a
weight's format fields, never on its values.
"""
from __future__ import annotations

import functools
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

OPS = ("weight_only", "int_act", "binary")
OP_OF_FORMAT = {"groupwise": "weight_only", "intact": "int_act", "binary": "binary"}
ANY = None


class BackendError(RuntimeError):
    """No backend can run the requested call (or a forced one cannot)."""


@dataclass(frozen=True)
class KernelSpec:
    """What one kernel can run. ``None`` in a field means 'any'."""

    name: str
    op: str
    fn: Callable  # fn(x2d [M, K], qweight, bias) -> [M, N]
    bits: frozenset | None = ANY
    group_sizes: frozenset | None = ANY     # None inside the set = one group per row
    dtypes: frozenset | None = ANY
    devices: frozenset = frozenset({"cpu", "cuda"})
    min_m: int = 1
    max_m: int | None = None
    min_sm: tuple[int, int] | None = None
    sym: frozenset = frozenset({True, False})
    act_order: bool = True
    check: Callable | None = None           # extra predicate(x2d, qweight) -> reason or None
    opt_in: bool = False                    # used only when named in VLMKERN_ENABLE
    laid_out: bool = False                  # also runs weights held in the CUDA kernel layout

    def rejects(self, x: torch.Tensor, qweight) -> str | None:
        """Why this kernel cannot run (x, qweight), or None if it can."""
        if self.opt_in and self.name not in enabled_kernels():
            return f"{self.name}: opt-in only (set VLMKERN_ENABLE={self.name})"
        if self.name in disabled_kernels():
            return f"{self.name}: turned off by VLMKERN_DISABLE"
        if getattr(qweight, "LAID_OUT", False) and not self.laid_out:
            return f"{self.name}: reads the canonical codes; this weight is in the CUDA kernel layout"
        if self.devices is not ANY and x.device.type not in self.devices:
            return f"{self.name}: runs on {sorted(self.devices)}, not {x.device.type}"
        if self.dtypes is not ANY and x.dtype not in self.dtypes:
            return f"{self.name}: activation dtype {x.dtype} unsupported"
        if self.bits is not ANY and qweight.bits not in self.bits:
            return f"{self.name}: {qweight.bits}-bit weights unsupported"
        gs = getattr(qweight, "group_size", None)
        if self.group_sizes is not ANY and gs not in self.group_sizes:
            return f"{self.name}: group size {gs} unsupported"
        if hasattr(qweight, "sym") and qweight.sym not in self.sym:
            return f"{self.name}: {'symmetric' if qweight.sym else 'asymmetric'} weights unsupported"
        if not self.act_order and getattr(qweight, "perm", None) is not None:
            return f"{self.name}: act-order permutation unsupported"
        m = x.shape[0]
        if m < self.min_m or (self.max_m is not None and m > self.max_m):
            return f"{self.name}: M={m} outside [{self.min_m}, {self.max_m or 'inf'}]"
        if self.min_sm is not None and x.is_cuda and device_sm(x.device) < self.min_sm:
            return f"{self.name}: needs sm_{self.min_sm[0]}{self.min_sm[1]}+"
        return self.check(x, qweight) if self.check is not None else None


_SM_CACHE: dict[int, tuple[int, int]] = {}


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read from os.environ's own dict. The public
    lookup raises and catches a KeyError inside for an unset name, and every
    call reads three or four of them: 0.7 us each against 0.14 here."""
    env = os.environ
    data = getattr(env, "_data", None)
    if type(data) is not dict:
        return env.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = env.encodekey(name)
    value = data.get(key)
    return None if value is None else env.decodevalue(value)


_ENV_KEYS: dict[str, object] = {}


def enabled_kernels() -> frozenset[str]:
    """Opt-in kernels named in VLMKERN_ENABLE."""
    return _parse_names(getenv("VLMKERN_ENABLE") or "")


def disabled_kernels() -> frozenset[str]:
    """Kernels named in VLMKERN_DISABLE: never selected, default ones included."""
    return _parse_names(getenv("VLMKERN_DISABLE") or "")


@functools.lru_cache(maxsize=16)
def _parse_names(names: str) -> frozenset[str]:
    # read on every dispatch (once per opt-in kernel considered): parse each value once
    return frozenset(n.strip() for n in names.split(",") if n.strip())


def device_sm(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_capability(idx)
    return _SM_CACHE[idx]


# Bumped whenever what select() walks changes: a kernel registered, a backend
# registered, probed or reset. The cached choices of earlier generations are
# not used again.
_generation = 0


def _bump() -> None:
    global _generation
    _generation += 1


@dataclass
class Backend:
    name: str
    probe: Callable[[], str | None]   # None when usable, else the reason it is not
    auto: bool = True                 # False: used only when forced by VLMKERN_BACKEND
    kernels: list[KernelSpec] = field(default_factory=list)
    _status: tuple[bool, str] | None = None

    def __setattr__(self, name, value) -> None:
        # also when a test replaces _status or kernels: cached choices end
        object.__setattr__(self, name, value)
        _bump()

    def register(self, spec: KernelSpec, first: bool = False) -> KernelSpec:
        """Add ``spec`` after the backend's kernels, or (``first``) before them."""
        if spec.op not in OPS:
            raise ValueError(f"unknown op {spec.op!r}; ops are {OPS}")
        self.kernels.insert(0 if first else len(self.kernels), spec)
        _bump()
        return spec

    def status(self) -> tuple[bool, str]:
        """(available, reason); probed once."""
        if self._status is None:
            try:
                reason = self.probe()
            except Exception as e:  # a broken optional dependency must not break vlmkern
                reason = f"probe failed: {type(e).__name__}: {e}"
            if reason is None and not self.kernels:
                reason = "no kernels are registered for this backend yet"
            self._status = (reason is None, reason or "available")
        return self._status

    def find(self, op: str, x: torch.Tensor, qweight) -> tuple[KernelSpec | None, list[str]]:
        reasons = []
        for spec in self.kernels:
            if spec.op != op:
                continue
            why = spec.rejects(x, qweight)
            if why is None:
                return spec, reasons
            reasons.append(why)
        if not reasons:
            reasons.append(f"no {op} kernel")
        return None, reasons


BACKENDS: dict[str, Backend] = {}
ORDER = ("cuda", "triton", "torch")


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    _bump()
    return backend


def forced_backend() -> str | None:
    name = (getenv("VLMKERN_BACKEND") or "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in ORDER:
        raise BackendError(f"VLMKERN_BACKEND={name!r} is not one of {ORDER} (or 'auto')")
    return name


# weight object -> {(op, M, dtype, device, environment, generation): kernel}
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHOSEN_PER_WEIGHT = 256   # distinct calls remembered per weight (prefill lengths vary)


def select(op: str, x: torch.Tensor, qweight) -> KernelSpec:
    """The kernel that will run ``op`` on (x [M, K], qweight); raises BackendError."""
    key = (op, x.shape[0], x.dtype, x.device, getenv("VLMKERN_BACKEND"),
           getenv("VLMKERN_ENABLE"), getenv("VLMKERN_DISABLE"), _generation)
    try:
        chosen = _CHOSEN.get(qweight)
    except TypeError:                        # a weight that cannot be weakly referenced
        return _select(op, x, qweight)
    if chosen is None:
        chosen = _CHOSEN.setdefault(qweight, {})
    spec = chosen.get(key)
    if spec is None:
        spec = _select(op, x, qweight)
        if len(chosen) >= _CHOSEN_PER_WEIGHT:
            chosen.clear()
        # filed under the generation the walk ended in: a first call probes backends
        chosen[key[:-1] + (_generation,)] = spec
    return spec


def _select(op: str, x: torch.Tensor, qweight) -> KernelSpec:
    forced = forced_backend()
    _check_kernel_names(enabled_kernels(), disabled_kernels())
    names = (forced,) if forced else ORDER
    reasons = []
    for name in names:
        backend = BACKENDS.get(name)
        if backend is None:
            reasons.append(f"{name}: not registered")
            continue
        if not forced and not backend.auto:
            reasons.append(f"{name}: opt-in only (set VLMKERN_BACKEND={name})")
            continue
        if not forced and x.device.type == "cpu" and name != "torch":
            # On the CPU, Triton runs in its interpreter: exact but far slower than
            # the torch reference, so it is for tests and only runs when forced.
            reasons.append(f"{name}: CPU tensors run on torch unless VLMKERN_BACKEND={name}")
            continue
        ok, why = backend.status()
        if not ok:
            reasons.append(f"{name}: {why}")
            continue
        spec, why_not = backend.find(op, x, qweight)
        if spec is not None:
            if name == "torch" and not forced and x.device.type != "cpu":
                _warn_reference_fallback(op, x, reasons)
            return spec
        reasons.extend(why_not)
    head = f"VLMKERN_BACKEND={forced} cannot run" if forced else "no backend can run"
    raise BackendError(f"{head} {op} for x {tuple(x.shape)} {x.dtype} on {x.device} with "
                       f"{qweight!r}:\n  " + "\n  ".join(reasons))


_WARNED_FALLBACK: set = set()


def _warn_reference_fallback(op: str, x: torch.Tensor, reasons: list[str]) -> None:
    """Say once per op, dtype and device type that a GPU call runs on the torch
    reference, which dequantizes the whole weight on every call."""
    key = (op, x.dtype, x.device.type)
    if key in _WARNED_FALLBACK:
        return
    _WARNED_FALLBACK.add(key)
    shown = [r for r in reasons if "opt-in only" not in r]   # those never run unasked
    warnings.warn(f"vlmkern: {op} for x {tuple(x.shape)} {x.dtype} on {x.device} runs on the "
                  f"torch reference, which dequantizes the weight on every call (slow; later "
                  f"such calls are not reported). The faster backends declined:\n  "
                  + "\n  ".join(shown), RuntimeWarning, stacklevel=5)


def _check_kernel_names(enabled: frozenset[str], disabled: frozenset[str]) -> None:
    """Raises BackendError for a name in VLMKERN_ENABLE / VLMKERN_DISABLE that
    is no kernel's."""
    def kernels():
        return [k for b in BACKENDS.values() for k in b.kernels]

    named = enabled | disabled
    if not named or named <= {k.name for k in kernels()}:
        return
    # A backend registers its kernels when first probed (Triton's need triton
    # imported): probe every backend before calling a name unknown.
    for backend in BACKENDS.values():
        backend.status()
    known = {k.name for k in kernels()}
    # A backend that cannot run here never registers its kernels: names under
    # its prefix cannot be checked, and cannot run either, so they pass (one
    # environment serves machines with and without that backend).
    unknowable = tuple(f"{b.name}." for b in BACKENDS.values()
                       if not b.status()[0] and not b.kernels)
    enabled = {n for n in enabled if not n.startswith(unknowable)} if unknowable else enabled
    disabled = {n for n in disabled if not n.startswith(unknowable)} if unknowable else disabled
    if enabled - known:
        opt_in = sorted(k.name for k in kernels() if k.opt_in)
        raise BackendError(f"VLMKERN_ENABLE names unknown kernels {sorted(enabled - known)}; "
                           f"the opt-in kernels are {opt_in}")
    if disabled - known:
        raise BackendError(f"VLMKERN_DISABLE names unknown kernels {sorted(disabled - known)}; "
                           f"the kernels are {sorted(known)}")


def explain(op: str, x: torch.Tensor, qweight) -> str:
    """Name of the kernel ``select`` would pick, or the reasons none fits."""
    try:
        return select(op, x, qweight).name
    except BackendError as e:
        return str(e)


def available_backends() -> dict[str, dict]:
    """Every backend: whether it is usable here, why not, and its kernels."""
    from . import builtin  # noqa: F401  (registers the backends on first use)

    out = {}
    for name in ORDER:
        b = BACKENDS[name]
        ok, why = b.status()
        out[name] = {"available": ok, "reason": why, "auto": b.auto,
                     "kernels": [k.name for k in b.kernels],
                     "opt_in": [k.name for k in b.kernels if k.opt_in]}
    return out
