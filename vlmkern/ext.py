"""Lazy access to the compiled CUDA extension ``vlmkern._C``.

The extension is optional: it is only built for a CUDA build of torch with a
CUDA toolkit present (see setup.py). Nothing here imports it until
:func:`load_extension` is first called, so ``import vlmkern`` never depends on it.
Importing ``vlmkern._C`` registers the ops under ``torch.ops.vlmkern``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

_cached: tuple[ModuleType | None, str] | None = None


def _import_extension() -> tuple[ModuleType | None, str]:
    if getattr(torch.version, "hip", None):
        return None, f"vlmkern._C was not built: this install has a ROCm torch ({torch.__version__})"
    if torch.version.cuda is None:
        # setup.py skips the build for such a torch, and a library built against
        # a CUDA torch cannot load into this one anyway.
        return None, f"vlmkern._C was not built: this install has a CPU-only torch ({torch.__version__})"
    try:
        module = importlib.import_module("vlmkern._C")
    except ModuleNotFoundError as exc:
        return None, f"vlmkern._C could not be imported: {exc}{source_checkout_hint()}"
    except (ImportError, OSError) as exc:
        return None, f"vlmkern._C could not be imported: {exc}"
    return module, f"vlmkern._C loaded from {getattr(module, '__file__', '?')}"


def source_checkout_hint(package_file: str | None = None,
                         installed_from: str | None = None) -> str:
    """Words to add when vlmkern._C or vlmkern.triton_kernels is missing
    because this vlmkern was imported from a source checkout (the current
    directory comes first on sys.path) rather than from the installed package;
    "" otherwise, and for an editable install of that checkout (which the
    checkout serves). ``package_file`` defaults to vlmkern's ``__init__.py``,
    ``installed_from`` to the folder of the editable install, if any."""
    from pathlib import Path

    import vlmkern

    root = Path(package_file or vlmkern.__file__).resolve().parent.parent
    if not ((root / "setup.py").is_file() and (root / "csrc").is_dir()):
        return ""
    editable = installed_from if installed_from is not None else _editable_install_folder()
    if editable is not None and Path(editable).resolve() == root:
        return ""
    return (f" (vlmkern was imported from the source checkout {root}, which provides the "
            f"compiled kernels only to an editable install: `pip install --no-build-isolation "
            f"-e .` there, or run from another directory to use the installed package)")


def _editable_install_folder() -> str | None:
    """The folder an editable install of vlmkern points to (PEP 610), or None."""
    import importlib.metadata
    import json
    from urllib.parse import unquote, urlparse

    try:
        info = json.loads(importlib.metadata.distribution("vlmkern").read_text("direct_url.json")
                          or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    url = urlparse(info.get("url", ""))
    if not info.get("dir_info", {}).get("editable") or url.scheme != "file":
        return None
    return unquote(url.path)


def load_extension() -> tuple[ModuleType | None, str]:
    """Import ``vlmkern._C`` once; return ``(module, reason)``.

    ``module`` is None when the extension is unavailable, and ``reason`` then
    says why in words meant for users. The result is cached.
    """
    global _cached
    if _cached is None:
        _cached = _import_extension()
    return _cached


def dequant_groupwise(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
                      bits: int, group_size: int, in_features: int,
                      out_dtype: torch.dtype, fast: bool = False) -> torch.Tensor:
    """Dense [N, in_features] weight of a canonical group-wise packed tensor.

    ``qweight`` int32 [N, ceil(K*bits/32)], ``qzeros`` int32
    [N, ceil(G*bits/32)] or None (symmetric), ``scales`` [N, G] fp16/bf16/fp32
    with G = ceil(K / group_size); all contiguous on one CUDA device.
    ``out_dtype`` is torch.float16 or torch.bfloat16. ``fast=True`` runs the
    fast kernel where it applies (bits 2/3/4/8, K a multiple of 8, group size
    a power of two >= 8 or >= K) and the general one elsewhere; the output bits
    are the same either way.
    """
    _check_dequant_args(qweight, qzeros, scales, bits, group_size, in_features, out_dtype)
    module, reason = load_extension()
    if module is None:
        raise RuntimeError(f"vlmkern.ext.dequant_groupwise needs the CUDA extension: {reason}")
    return torch.ops.vlmkern.dequant_groupwise(qweight, qzeros, scales, int(bits), int(group_size),
                                               int(in_features), out_dtype, bool(fast))


def _check_dequant_args(qweight, qzeros, scales, bits, group_size, in_features, out_dtype) -> None:
    """The op's own checks, made here first: an error raised in Python never
    depends on C++ exceptions crossing the extension, which crashed the process
    instead of raising on one GPU machine's toolchain."""
    op = "vlmkern.ext.dequant_groupwise"
    if not 1 <= bits <= 8:
        raise ValueError(f"{op}: bits must be in 1..8, got {bits}")
    if group_size < 1 or in_features < 0:
        raise ValueError(f"{op}: group_size must be >= 1 and in_features >= 0, "
                         f"got {group_size} and {in_features}")
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be a 2-D int32 tensor, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, groups = qweight.shape[0], -(-in_features // group_size)
    expected = {"qweight": (qweight, (n, -(-in_features * bits // 32))),
                "scales": (scales, (n, groups))}
    if qzeros is not None:
        if qzeros.dtype != torch.int32:
            raise ValueError(f"{op}: qzeros must be int32, got {qzeros.dtype}")
        expected["qzeros"] = (qzeros, (n, -(-groups * bits // 32)))
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
        if t.device != qweight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but qweight is on {qweight.device}")
