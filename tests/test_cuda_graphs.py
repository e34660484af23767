"""The CUDA kernels inside CUDA graphs.

Decoders capture a step once and replay it, because at M = 1 launching the
kernels from Python costs more than running them. A quantized layer
captured in a graph and replayed with new inputs must give exactly what
eager calls give: no host synchronization, no allocation that outlives the
capture, no state (layouts, stream-K counters, split-K scratch) that a replay
would find stale. GPU only.
"""
import pytest
import torch
from test_cuda_weight_only import gpu
from torch import nn

import vlmkern
from vlmkern import BinaryConfig, IntActConfig, QuantConfig

K, N = 1024, 768

# (config, default kernel expected at every M, Ms, kernel layout)
CASES = [
    (QuantConfig(4, 128), "cuda.weight_only_post_scale", (1, 16, 32), False),
    (QuantConfig(4, 128), "cuda.weight_only_mma", (33, 64), False),
    (QuantConfig(3, 64), "cuda.weight_only_mma", (1, 5), False),
    (QuantConfig(2, 32), "cuda.weight_only_post_scale", (1,), False),
    (QuantConfig(4, 128), "cuda.weight_only_post_scale", (1, 16), True),
    (IntActConfig(8, 8), "cuda.int_act", (9, 16, 80), False),
    (IntActConfig(4, 4), "cuda.int_act", (16,), False),
    (IntActConfig(4, 4), "cuda.int_act_spread", (1,), False),
    (IntActConfig(8, 8), "cuda.int_act_spread", (1, 8), False),
    (BinaryConfig(block_size=64), "cuda.binary", (1, 16), False),
    (BinaryConfig(), "cuda.binary_lut", (1, 16, 64), False),
]


def _layer(config, laid_out: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = vlmkern.QuantLinear.from_linear(nn.Linear(K, N), config)
    if laid_out:
        layer.to_kernel_layout()
    return layer.cuda()


def _replayed(layer, inputs):
    """Outputs of one captured call of ``layer`` replayed on each input."""
    static_x = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):         # warm-up outside the capture (layouts, tuning)
        for _ in range(2):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    outs = []
    for x in inputs:
        static_x.copy_(x)
        graph.replay()
        outs.append(static_y.clone())
    torch.cuda.synchronize()
    return outs


@gpu
@pytest.mark.parametrize("config,kernel,ms,laid_out", CASES,
                         ids=[f"{c[1]}-{type(c[0]).__name__}{'-layout' if c[3] else ''}"
                              for c in CASES])
def test_captured_layer_replays_like_eager_calls(monkeypatch, config, kernel, ms, laid_out):
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    _assert_replays_like_eager(_layer(config, laid_out), kernel, ms)


@gpu
def test_captured_binary_lut_staged_replays_like_eager_calls(monkeypatch):
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.binary_lut_staged")   # opt-in
    _assert_replays_like_eager(_layer(BinaryConfig(), False), "cuda.binary_lut_staged", (1, 16, 64))


def _assert_replays_like_eager(layer, kernel, ms):
    gen = torch.Generator(device="cuda").manual_seed(1)
    for m in ms:
        inputs = [torch.randn(m, K, device="cuda", dtype=torch.float16, generator=gen)
                  for _ in range(3)]
        assert vlmkern.ops.which_kernel(inputs[0], layer.quantized_weight) == kernel
        for replayed, x in zip(_replayed(layer, inputs), inputs):
            assert torch.equal(replayed, layer(x)), m


@gpu
def test_two_layers_captured_in_one_graph_share_nothing_stale():
    # Two weight-only layers of different shapes in one graph share the
    # stream-K counters of the capture stream; each launch must leave them zero.
    torch.manual_seed(0)
    model = nn.Sequential(vlmkern.QuantLinear.from_linear(nn.Linear(K, N), QuantConfig(4, 128)),
                          vlmkern.QuantLinear.from_linear(nn.Linear(N, 2 * K), QuantConfig(3, 128))
                          ).cuda()
    inputs = [torch.randn(1, K, device="cuda", dtype=torch.float16) for _ in range(3)]
    for replayed, x in zip(_replayed(model, inputs), inputs):
        assert torch.equal(replayed, model(x))
