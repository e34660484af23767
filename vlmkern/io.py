"""Checkpoints: one safetensors file holding every tensor of the model (packed
quantized buffers and the full-precision rest) and a ``quantization_config``
JSON block in the file's metadata. Nothing is ever unpickled.

quantization_config = {
  "quant_method": "vlmkern", "format_version": 1, "vlmkern_version": "...",
  "modules": {name: {"format", "meta", "in_features", "out_features", "bias", "info"}},
  "skipped": [names of linears left in full precision],
  "aliases": {name: name it shares storage with},
  "checksums": {name: sha256 of the stored tensor's bytes}   (checked on load;
           files written before checksums were recorded load without),
  "plan": {"plan_version", "modules": {name: {"method", "format", "w_bits",
           "a_bits", "group_size", ...}}, "info"}   (vlmkern.plan; one entry
           per quantized module, checked against "modules" on load)
}

Writes go to a temporary file in the same folder, are fsynced, then renamed
over the target, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import is_int
from .formats import FORMAT_VERSION, WEIGHT_TYPES
from .nn import MODULE_TYPES, QuantLinear
from .nn.modules import validated_elsewhere

QUANT_METHOD = "vlmkern"
FILENAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, foreign or mismatched."""


def _file_path(path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / FILENAME


def quantization_config(model: nn.Module) -> dict:
    from . import __version__
    from .plan import Plan
    modules, skipped = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            modules[name] = {"format": module.format, "meta": dict(module._meta),
                             "in_features": module.in_features,
                             "out_features": module.out_features,
                             "bias": module.bias is not None, "info": module.quant_info,
                             "tensors": module.saved_tensor_names()}
        elif isinstance(module, nn.Linear):
            skipped.append(name)
    plan = Plan.from_model(model)
    plan.info = dict(getattr(model, "vlmkern_plan_info", None) or {})
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "vlmkern_version": __version__, "modules": modules, "skipped": skipped,
            "plan": plan.to_dict()}


def save_quantized(model: nn.Module, path) -> Path:
    """Write the model's state and quantization_config atomically; returns the file.

    path: a ``.safetensors`` file, or a folder (``model.safetensors`` inside).
    """
    target = _file_path(path)
    _check_replaceable(target)
    config = quantization_config(model)
    _check_no_foreign_tensors(model)
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        # what load_quantized would refuse is refused here, before the file exists
        if t.device.type == "meta":
            raise ValueError(f"cannot save: {name} is on the meta device, where tensors hold "
                             f"no data (load or compute the weights first)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"cannot save: {name} holds NaN or Inf values "
                             f"(load_quantized refuses such a checkpoint)")
        # Tied weights share storage; safetensors stores each storage once.
        key = _storage_key(t)
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    config["aliases"] = aliases
    config["checksums"] = {name: tensor_checksum(t) for name, t in tensors.items()}
    # one metadata entry: safetensors writes several in no fixed order, and the
    # same model must give the same bytes
    atomic_save(tensors, target, {"quantization_config": json.dumps(config)})
    return target


def _storage_key(t: torch.Tensor):
    """What two state-dict entries that are one tensor (tied weights) have in
    common, or None for an empty tensor. (A transposed view of a square tensor
    has its shape, not its strides.)"""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype, t.device) if t.numel() else None


def _check_no_foreign_tensors(model: nn.Module) -> None:
    """A quantized layer's state is its packed tensors and bias; anything else
    registered on it (transformers' tie_weights puts the embeddings there as
    ``weight`` when a tied lm_head was quantized) is unused by the layer and
    would make the file one that load_quantized refuses."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        own = set(module.saved_tensor_names()) | {"bias"}
        foreign = [k for k in module.state_dict() if k not in own]
        if foreign:
            raise ValueError(f"cannot save: {name} is quantized but also holds {foreign}, which "
                             f"it does not use (tie_weights tied a quantized lm_head to the "
                             f"embeddings?); remove them (`del model.{name}.{foreign[0]}`) or "
                             f"quantize with {name} skipped")


def tensor_checksum(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's bytes: what the file holds for it."""
    data = t.detach().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"").hexdigest()


def checksum_mismatch(sums, tensors: dict) -> str | None:
    """Why the recorded checksums ``sums`` ({name: tensor_checksum}) do not fit
    ``tensors``, or None. Damage inside tensor data (a flipped bit) leaves a
    safetensors file's structure intact; the checksums find it."""
    if not isinstance(sums, dict) or sorted(sums) != sorted(tensors) or \
            not all(isinstance(v, str) for v in sums.values()):
        return "its checksums table does not list the tensors it holds"
    damaged = [name for name, t in tensors.items() if tensor_checksum(t) != sums[name]]
    if damaged:
        return (f"it is damaged: the bytes of {damaged[:4]}{'...' if len(damaged) > 4 else ''} "
                f"differ from what was saved")
    return None


def _check_checksums(config: dict, tensors: dict, file) -> None:
    """A checkpoint's checksums (optional in the format) must fit its tensors."""
    sums = config.get("checksums")
    why = None if sums is None else checksum_mismatch(sums, tensors)
    if why is not None:
        raise CheckpointError(f"{file}: {why}")


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a safetensors file vlmkern wrote (any format
    version); reads the header only."""
    try:
        raw = read_header(path)[1].get("quantization_config")
        config = json.loads(raw) if raw is not None else None
    except (CheckpointError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD


def _check_replaceable(target: Path) -> None:
    """A file already at ``target`` is replaced only when vlmkern wrote it:
    anything else there (a model's own weights, say) is never overwritten."""
    if target.exists() and not is_checkpoint(target):
        raise FileExistsError(f"{target} exists and is not a vlmkern checkpoint (a model's own "
                              f"weights?); it is never overwritten: save to another folder or "
                              f"file")


def atomic_save(tensors: dict, target: Path, metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` to a temporary file in the target's folder,
    fsync, then rename over ``target``: readers see the old file or the new one."""
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(target, write) -> None:
    """``write(path)`` fills a new temporary file next to ``target``; it is then
    fsynced and renamed over ``target``, so readers see the old file or the
    new one. The temporary file never outlives an error; one left by a
    killed process is removed by the next write of the same target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = _new_temp_file(target)
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        # Writers may replace the file (safetensors writes a 0o600 file of its own).
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _remove_stale_temps(target: Path) -> None:
    """Delete the temporary files of earlier writes of ``target`` that a killed
    process left (a checkpoint's size each). Writers of one target take turns:
    a concurrent one would lose its temporary file and fail, never go unseen."""
    name = f"{glob.escape(target.name)}.{'[0-9a-f]' * 12}.tmp"    # as _new_temp_file makes
    for leftover in target.parent.glob(name):
        if leftover.is_file() and not leftover.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _new_temp_file(target: Path) -> str:
    """An empty file of a fresh name in ``target``'s folder, created with mode
    0o666 like any new file, so the umask gives it the permissions the user
    expects (``tempfile.mkstemp`` would make it 0o600, unreadable to others)."""
    while True:
        tmp = str(target.parent / f"{target.name}.{os.urandom(6).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def read_header(path) -> tuple[dict, dict]:
    """Parse and sanity-check a safetensors header without loading tensors.

    Returns (tensor entries, metadata). Raises CheckpointError naming the problem.
    """
    file = _file_path(path)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {file}")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file} is truncated or not a safetensors file "
                                      f"(header claims {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:  # a permission, I/O or network-filesystem error
        raise CheckpointError(f"{file} cannot be read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file} has a corrupt safetensors header: __metadata__ must "
                              f"map names to strings")
    end = 0
    for name, entry in header.items():
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for {name!r}") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{file} is truncated or has trailing bytes: tensors need "
                              f"{8 + n + end} bytes, file has {size}")
    return header, metadata


def _read_config(metadata: dict, file) -> dict:
    raw = metadata.get("quantization_config")
    if raw is None:
        raise CheckpointError(f"{file} is not a vlmkern checkpoint: its metadata has no "
                              f"quantization_config")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: quantization_config is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        method = config.get("quant_method") if isinstance(config, dict) else None
        raise CheckpointError(f"{file} holds a {method!r} quantization_config, not a vlmkern one")
    version = config.get("format_version")
    if is_int(version) and version > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {version!r}; this vlmkern reads up "
                              f"to {FORMAT_VERSION} (upgrade vlmkern)")
    if not is_int(version) or version < 1:
        raise CheckpointError(f"{file} has format_version {version!r}; expected an int from 1 "
                              f"to {FORMAT_VERSION}")
    if not isinstance(config.get("modules"), dict):
        raise CheckpointError(f"{file}: quantization_config has no 'modules' table")
    aliases = config.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise CheckpointError(f"{file}: quantization_config 'aliases' must map tensor names "
                              f"to tensor names")
    return config


def load_quantized(model: nn.Module, path, device=None) -> nn.Module:
    """Fill a freshly built model of the same architecture from a checkpoint.

    The model's nn.Linear modules named in the checkpoint become quantized
    modules holding exactly the saved packed tensors; full-precision tensors
    (finite floats, as the file must hold them) are copied into the model's own
    (in the model's dtype). ``device``: where the quantized layers' tensors
    go (default: where each replaced module's own tensors are); the rest of the
    model stays where it is. Layers come back in the canonical format: call
    ``to_kernel_layout`` after loading (also into a model that had been laid
    out before). Raises CheckpointError for missing, corrupt, truncated,
    foreign or mismatched files, and for a model on the meta device. A refused
    file leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_quantized fills a torch nn.Module built with the checkpoint's "
                        f"architecture, got {type(model).__name__}")
    file = _file_path(path)
    _check_not_meta(model, device, file)
    header, metadata = read_header(file)
    config = _read_config(metadata, file)
    plan = _parse_plan(config, file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: cannot read tensors: {e}") from None
    _check_checksums(config, tensors, file)
    for name, source in config.get("aliases", {}).items():
        if source not in tensors:
            raise CheckpointError(f"{file}: alias {name!r} points at missing tensor {source!r}")
        if name in tensors:
            # An alias stands for a tensor stored once under another name; one
            # that names a stored tensor would silently replace that tensor.
            raise CheckpointError(f"{file}: alias {name!r} names a tensor the file holds")
        tensors[name] = tensors[source]

    from .replace import set_module, shared_names
    modules, aliases = dict(model.named_modules()), shared_names(model)
    first_name = {other: name for name, others in aliases.items() for other in others}
    for name in config["modules"]:
        if name in first_name:
            raise CheckpointError(f"{file}: {name!r} is one module with {first_name[name]!r} in "
                                  f"this model (a layer under two names), but the checkpoint "
                                  f"holds it as a layer of its own")
    # every module a check below may already have replaced, under each of its
    # names, to put back when one fails: a refused file leaves the model as it was
    every_module = dict(model.named_modules(remove_duplicate=False))
    replaced = {place: every_module[place] for name in config["modules"]
                for place in (name, *aliases.get(name, ())) if place in every_module}
    try:
        for name, entry in config["modules"].items():
            _install_module(model, modules, name, entry, tensors, file, device)
            for place in aliases.get(name, ()):     # a layer under several names: one module
                set_module(model, place, model.get_submodule(name))
        if plan is not None:    # after the modules, whose own checks name a corrupt entry best
            _match_plan(plan, config["modules"], file)
        _check_state(model.state_dict(), tensors, file)
    except BaseException:
        for place, module in replaced.items():
            set_module(model, place, module)
        raise
    with validated_elsewhere():     # every quantized module's tensors passed from_state above
        model.load_state_dict(tensors, strict=True)
    if plan is not None and plan.info:
        model.vlmkern_plan_info = plan.info
    return model


def _check_state(state: dict, tensors: dict, file) -> None:
    """The file's tensors are exactly the model's, of its shapes, and its
    floating-point ones finite (also once cast to the model's dtype)."""
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match this model: missing {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected "
                              f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(tensors[k].shape):
            raise CheckpointError(f"{file}: {k} has shape {tuple(tensors[k].shape)}, the model "
                                  f"expects {tuple(t.shape)}")
    # names that are one tensor in the model (tied weights) take one value:
    # else the last one loaded would silently stand for both
    first = {}
    for k, t in state.items():
        key = _storage_key(t)
        if key is None:
            continue
        other = first.setdefault(key, k)
        if other != k and not torch.equal(tensors[k], tensors[other]):
            raise CheckpointError(f"{file}: {other} and {k} are one tensor in this model (tied "
                                  f"weights), but the file holds different values for them; "
                                  f"was it saved from a model without that tie?")
    for k, t in state.items():
        if t.is_floating_point():
            _check_float_tensor(tensors[k], k, file)
            if t.dtype != tensors[k].dtype and not bool(torch.isfinite(tensors[k].to(t.dtype)).all()):
                raise CheckpointError(f"{file}: {k} holds values beyond the range of the "
                                      f"model's {t.dtype}")


def read_plan(path):
    """The ``vlmkern.plan.Plan`` recorded in a checkpoint (header only; checked
    against its modules table). Checkpoints written before plans were recorded
    get the plan their modules table implies, without method configs."""
    from .plan import Plan, PlanEntry, format_fields
    file = _file_path(path)
    _, metadata = read_header(file)
    config = _read_config(metadata, file)
    plan = _parse_plan(config, file)
    if plan is not None:
        _match_plan(plan, config["modules"], file)
    else:
        entries = {}
        for name, entry in config["modules"].items():
            try:
                w, a, g = format_fields(entry["format"], entry["meta"])
                method = str(_module_info(entry).get("method", "external"))
                entries[name] = PlanEntry(method, entry["format"], w, a, g)
            except (TypeError, KeyError, ValueError) as e:
                raise CheckpointError(f"{file}: malformed entry for module {name!r}: {e}") from None
        plan = Plan(entries)
    return plan


def _parse_plan(config: dict, file):
    """quantization_config["plan"] as a Plan; None when the checkpoint predates
    recorded plans."""
    raw = config.get("plan")
    if raw is None:
        return None
    from .plan import Plan, PlanError
    try:
        return Plan.from_dict(raw)
    except (PlanError, TypeError) as e:
        raise CheckpointError(f"{file}: quantization_config plan: {e}") from None


def _match_plan(plan, modules: dict, file) -> None:
    """Raise unless the plan describes exactly the stored quantized modules."""
    from .plan import PlanError, format_fields
    missing = sorted(set(modules) - set(plan.entries))
    extra = sorted(set(plan.entries) - set(modules))
    if missing or extra:
        raise CheckpointError(f"{file}: the plan does not match the stored modules: "
                              f"quantized but not in the plan {missing[:8]}, in the plan but "
                              f"not stored quantized {extra[:8]}")
    for name, entry in plan.entries.items():
        if entry is None:
            raise CheckpointError(f"{file}: the plan keeps {name!r} in full precision, but the "
                                  f"checkpoint stores it quantized")
        module = modules[name]
        try:
            stored = (module["format"],) + tuple(format_fields(module["format"], module["meta"]))
        except (TypeError, KeyError, PlanError):
            raise CheckpointError(f"{file}: malformed entry for module {name!r}") from None
        planned = (entry.format, entry.w_bits, entry.a_bits, entry.group_size)
        if entry.sym is not None and isinstance(module.get("tensors"), list):
            planned += (entry.sym,)
            stored += ("qzeros" not in module["tensors"],)
        if planned != stored:
            raise CheckpointError(f"{file}: plan entry {name!r} says format/w_bits/a_bits/"
                                  f"group_size(/sym) {planned}, the stored module is {stored}")


def _install_module(model, modules, name, entry, tensors, file, device) -> None:
    try:
        fmt, meta = entry["format"], entry["meta"]
        n, k = entry["out_features"], entry["in_features"]
    except (TypeError, KeyError):
        raise CheckpointError(f"{file}: malformed entry for module {name!r}") from None
    if not (is_int(n) and is_int(k)):
        raise CheckpointError(f"{file}: malformed entry for module {name!r}: out_features and "
                              f"in_features must be ints, got {n!r} and {k!r}")
    try:
        info = _module_info(entry)
    except TypeError as e:
        raise CheckpointError(f"{file}: malformed entry for module {name!r}: {e}") from None
    if fmt not in WEIGHT_TYPES:
        raise CheckpointError(f"{file}: module {name!r} has unknown format {fmt!r}")
    target = modules.get(name)
    if target is None:
        raise CheckpointError(f"{file}: the model has no module {name!r}; was it saved from "
                              f"another architecture?")
    if not isinstance(target, (nn.Linear, QuantLinear)):
        raise CheckpointError(f"{file}: {name!r} is a {type(target).__name__} in this model, "
                              f"not a linear layer")
    if (target.out_features, target.in_features) != (n, k):
        raise CheckpointError(f"{file}: {name!r} is {n}x{k} in the checkpoint but "
                              f"{target.out_features}x{target.in_features} in the model")
    cls = WEIGHT_TYPES[fmt]
    prefix = name + "."
    parts = {t: tensors[prefix + t] for t in cls.TENSORS if prefix + t in tensors}
    # Optional tensors (qzeros, perm) change the meaning of the others: a file
    # that lost one must not load as, say, a symmetric weight.
    listed = entry.get("tensors")
    if not isinstance(listed, list) or sorted(parts) != sorted(listed):
        raise CheckpointError(f"{file}: module {name!r} should hold tensors {listed}, the file "
                              f"has {sorted(parts)}")
    try:
        qweight = cls.from_state(parts, meta)
    except (TypeError, ValueError) as e:    # FormatError, or a metadata field of the wrong kind
        raise CheckpointError(f"{file}: module {name!r}: {e}") from None
    if qweight.shape != (n, k):
        raise CheckpointError(f"{file}: module {name!r} tensors describe {qweight.shape}, "
                              f"entry says {(n, k)}")
    bias = tensors.get(prefix + "bias")
    if bool(entry.get("bias")) != (bias is not None):
        raise CheckpointError(f"{file}: module {name!r} bias presence does not match its entry")
    if (target.bias is not None) != (bias is not None):
        has = ("a bias", "no bias") if bias is not None else ("no bias", "a bias")
        raise CheckpointError(f"{file}: module {name!r} has {has[0]} in the checkpoint but "
                              f"{has[1]} in the model; was it saved from another architecture?")
    if bias is not None:    # checked before the cast to the model's dtype hides its kind
        _check_float_tensor(bias, prefix + "bias", file)
        if not bool(torch.isfinite(bias.to(target.bias.dtype)).all()):
            raise CheckpointError(f"{file}: {prefix}bias holds values beyond the range of the "
                                  f"model's {target.bias.dtype}")
    dev = device if device is not None else _module_device(target)
    try:
        module = MODULE_TYPES[fmt](qweight.to(dev),
                                   None if bias is None else bias.to(dev, target.bias.dtype), info)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: module {name!r}: {e}") from None
    from .replace import set_module
    set_module(model, name, module)


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _module_info(entry: dict) -> dict:
    """A module entry's free-form "info" record (the method and its config)."""
    info = entry.get("info")
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise TypeError(f"'info' must be an object, got {type(info).__name__}")
    return info


def _check_float_tensor(t: torch.Tensor, name: str, file) -> None:
    """A full-precision tensor must be finite and floating point: load_state_dict
    would cast bools and ints into a float parameter without a word."""
    if not t.is_floating_point():
        raise CheckpointError(f"{file}: {name} has dtype {t.dtype}, the model expects a "
                              f"floating-point tensor")
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{file}: {name} holds NaN or Inf values")


def _check_not_meta(model: nn.Module, device, file) -> None:
    """Copying into meta tensors is a no-op, so loading would silently load nothing."""
    if device is not None and torch.device(device).type == "meta":
        raise CheckpointError(f"cannot load {file} onto the meta device: meta tensors hold "
                              f"no data")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(
                f"cannot load {file}: the model has parameters or buffers on the meta device "
                f"(e.g. {name}); build it on a real device. Materializing it with "
                f"model.to_empty(device=...) is not enough when it has non-persistent buffers "
                f"(such as rotary inv_freq): checkpoints do not store them.")
