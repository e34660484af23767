"""The check that layer-by-layer replay reproduces a model, on toy models
(the transformers models it refuses are in test_engine.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmkern.calib import ReplayMismatchError
from vlmkern.calib.replay_check import check_replay, samples_to_check


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden, scale=None, extra=None):
        out = self.proj(hidden)
        return (out * scale if scale is not None else out,)


class Toy(nn.Module):
    """Three layers; ``between`` changes the hidden state after layer 0
    ("inplace", "copy" or None); ``per_layer`` gives layer 2 another scale."""

    def __init__(self, between=None, per_layer=False):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(3))
        self.between, self.per_layer = between, per_layer

    def forward(self, x, use_cache=False):
        h = x
        for i, layer in enumerate(self.layers):
            scale = torch.full((1,), 2.0 if self.per_layer and i == 2 else 1.0)
            # equal values in a new dict each time: compared by value, not identity
            h = layer(h, scale=scale, extra={"bias": torch.zeros(4)})[0]
            if i == 0 and self.between == "inplace":
                h[:, 1].add_(1.0)
            elif i == 0 and self.between == "copy":
                h = h + 1.0
        return h


@pytest.mark.parametrize("between,per_layer,why", [
    (None, False, None),
    ("copy", False, r"input of decoder layer 1 is not layer 0's output \(3 token positions"),
    ("inplace", False, r"input of decoder layer 1 is not layer 0's output \(3 token positions"),
    (None, True, r"decoder layer 2 receives other keyword arguments than layer 0 \(scale\)")])
def test_check_replay_finds_what_replay_would_miss(between, per_layer, why):
    torch.manual_seed(0)
    model = Toy(between, per_layer)
    sample = {"x": torch.randn(3, 4)}
    if why is None:
        check_replay(model, model.layers, sample, "cpu")
    else:
        with pytest.raises(ReplayMismatchError, match=why):
            check_replay(model, model.layers, sample, "cpu")
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in model.layers)


class Passthrough(nn.Module):
    """No tensors: records every move asked of it."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def _apply(self, fn, recurse=True):
        self.moves.append(fn)
        return super()._apply(fn, recurse)

    def forward(self, hidden, scale=None, extra=None):
        return (hidden,)


def test_a_layer_without_tensors_is_not_moved():
    # (its home cannot be read from a tensor: a guessed one would move a
    # module with buffers off its device)
    model = Toy()
    model.layers[1] = Passthrough()
    check_replay(model, model.layers, {"x": torch.randn(3, 4)}, "cpu")
    assert model.layers[1].moves == []


def test_the_longest_sample_of_each_kind_is_checked():
    ids = [torch.zeros(1, n, dtype=torch.long) for n in (5, 9, 7, 3)]
    samples = [{"input_ids": ids[0]}, {"input_ids": ids[1]},
               {"input_ids": ids[2], "pixel_values": torch.zeros(1)},
               {"input_ids": ids[3], "pixel_values": torch.zeros(1)}]
    assert samples_to_check(samples) == [1, 2]
