"""Whether replaying the decoder layers one after another reproduces the model.

The calibration engines run decoder layer i on the output of layer i - 1,
with the keyword arguments the first layer received. That is the model's own
computation only when nothing touches the hidden state between layers and
every layer gets the same arguments. Qwen3-VL adds its deepstack visual
features after its first layers, and Gemma 3 gives sliding-window and global
layers different attention masks: calibrated by replay, their later layers
would see inputs the model never gives them. ``check_replay`` runs a sample
through the real model and refuses such a model with the reason;
``samples_to_check`` picks the samples that show it.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

# a token whose input differs from the previous layer's output by more than
# this (relative to the output's size) was changed between the layers
TOKEN_TOLERANCE = 1e-3


class ReplayMismatchError(ValueError):
    """The model does not pass one layer's output unchanged to the next, or
    gives its decoder layers different keyword arguments."""


class _Done(Exception):
    """Raised by the last layer's hook: nothing after it is needed."""


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and (a is b or (a.shape == b.shape and a.dtype == b.dtype
                                and a.device == b.device and bool(torch.equal(a, b)))))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _differing(kwargs: dict, first: dict) -> list[str]:
    return sorted(k for k in set(kwargs) | set(first)
                  if k not in kwargs or k not in first or not _same(kwargs[k], first[k]))


def _changed_tokens(given: torch.Tensor, previous: torch.Tensor) -> int:
    """How many token positions of ``given`` differ from ``previous``."""
    if given.shape != previous.shape:
        return given[..., 0].numel()
    a, b = given.float().flatten(0, -2), previous.float().flatten(0, -2)
    size = b.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return int(((a - b).norm(dim=-1) > TOKEN_TOLERANCE * size).sum())


def samples_to_check(samples: list) -> list[int]:
    """Indices of the samples worth a check: for each kind of sample (the
    same input names: text-only, with images, ...) the longest one. A
    difference between layers may show only with images (Qwen3-VL's
    deepstack) or past a sliding window's length."""
    def tokens(sample) -> int:
        ids = sample.get("input_ids")
        return ids.numel() if isinstance(ids, torch.Tensor) else 0

    longest: dict = {}
    for i, sample in enumerate(samples):
        kind = tuple(sorted(sample))
        if kind not in longest or tokens(sample) > tokens(samples[longest[kind]]):
            longest[kind] = i
    return sorted(longest.values())


def check_replay(model: nn.Module, layers: nn.ModuleList, sample: dict, device) -> None:
    """Run ``sample`` (model inputs, already on ``device``) through ``model``
    and raise ReplayMismatchError where layer-by-layer replay would differ
    from it. Everything but ``layers`` must be on ``device``; each layer
    visits it for its own step and goes back."""
    if len(layers) < 2:
        return
    state: dict = {"first": None, "previous": None}
    # where each layer lives (None: it holds no tensors, nothing to move)
    homes = [next((t.device for t in itertools.chain(layer.parameters(), layer.buffers())), None)
             for layer in layers]

    def before(i):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs.pop("use_cache", None)
            if i == 0:
                state["first"] = kwargs
            else:
                names = _differing(kwargs, state["first"])
                if names:
                    raise ReplayMismatchError(
                        f"{type(model).__name__}: decoder layer {i} receives other keyword "
                        f"arguments than layer 0 ({', '.join(names)}), so layer-by-layer "
                        f"calibration, which gives every layer layer 0's, cannot serve it")
                changed = _changed_tokens(hidden, state["previous"])
                if changed:
                    raise ReplayMismatchError(
                        f"{type(model).__name__}: the input of decoder layer {i} is not layer "
                        f"{i - 1}'s output ({changed} token positions differ: the model adds "
                        f"to the hidden state between layers), so layer-by-layer calibration "
                        f"cannot serve it")
            if i == len(layers) - 1:
                raise _Done
            if homes[i] is not None:
                module.to(device)
        return hook

    def after(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            # a copy: a model that adds to the hidden state in place would
            # otherwise change this too and compare it with itself
            state["previous"] = out.detach().clone()
            if homes[i] is not None:
                module.to(homes[i])
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(after(i), with_kwargs=True))
        with torch.no_grad():
            model(**sample, use_cache=False)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
        for layer, home in zip(layers, homes):
            if home is not None:
                layer.to(home)
