"""The CUDA kernels inside CUDA graphs.

Decoders capture a step once and replay it, because at M = 1 launching the
kernels from Python costs more than running them. A quantized layer
captured in a graph and replayed with new inputs must give exactly what
eager calls give: no host synchronization, no allocation that outlives the
capture, no state (layouts, stream-K counters, split-K scratch) that a replay
would find stale or share with eager work or another graph. GPU only, except
the choice of counters buffer, checked on any machine with the CUDA calls
replaced.
"""
import pytest
import torch
from test_cuda_weight_only import gpu
from torch import nn

import vlmkern
from vlmkern import BinaryConfig, IntActConfig, QuantConfig
from vlmkern.ops import cuda_weight_only as cw

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


class _FakeCuda:
    """The CUDA calls of cw._counters, with a stream and a capture id to set."""

    def __init__(self, monkeypatch):
        self.stream, self.capture = 1, 0
        stream = type("Stream", (), {})
        monkeypatch.setattr(torch.cuda, "current_stream",
                            lambda device=None: type("S", (stream,), {"cuda_stream": self.stream}))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capture != 0)
        module = type("C", (), {"capture_id": staticmethod(lambda s: self.capture)})
        monkeypatch.setattr("vlmkern.ext.load_extension", lambda: (module, "loaded"))
        monkeypatch.setattr(cw, "_COUNTERS", {})
        monkeypatch.setattr(cw, "_CAPTURE_COUNTERS", {})
        monkeypatch.setattr(cw, "_CAPTURE_BUFFERS", [])
        monkeypatch.setattr(cw, "_SPARE_COUNTERS", {})


def test_a_capture_never_shares_counters_with_eager_launches_or_another_capture(monkeypatch):
    fake, cpu = _FakeCuda(monkeypatch), torch.device("cpu")
    eager = cw._counters(cpu, 8)
    assert cw._counters(cpu, 8) is eager and not eager.any()
    fake.capture = 7                       # a capture on the stream eager work used
    first = cw._counters(cpu, 8)
    assert first is not eager and cw._counters(cpu, 100) is first   # one fill per capture
    fake.capture = 9                       # the next graph captured on that stream
    second = cw._counters(cpu, 8)
    assert second is not first and second is not eager
    grown = cw._counters(cpu, 5000)        # a larger layer later in the same capture
    assert grown.numel() >= 5000 and grown is not second and cw._counters(cpu, 8) is grown
    fake.capture = 0
    assert cw._counters(cpu, 8) is eager   # eager launches keep theirs
    fake.stream = 2
    assert cw._counters(cpu, 8) is not eager  # and each stream has its own
    assert cw._CAPTURE_BUFFERS == [first, second, grown]   # a graph may replay at any time


def test_a_capture_takes_the_spare_that_eager_launches_made(monkeypatch):
    """Nothing can be allocated outside a graph's pool during its capture, so
    eager launches (the warm-up) keep a spare buffer made outside it."""
    fake, cpu = _FakeCuda(monkeypatch), torch.device("cpu")
    cw._counters(cpu, 300)
    spare = cw._SPARE_COUNTERS[None]
    spare.fill_(5)
    fake.capture = 4
    taken = cw._counters(cpu, 300)
    assert taken is spare and not taken.any()          # zeroed by the (captured) fill
    assert None not in cw._SPARE_COUNTERS
    fake.capture = 6                                   # a second capture, no warm-up between
    assert cw._counters(cpu, 8) is not spare           # made in place
    fake.capture = 0
    cw._counters(cpu, 8)                               # the next eager launch makes a new spare
    assert cw._SPARE_COUNTERS[None] is not spare and cw._SPARE_COUNTERS[None].numel() >= 300
    cw._counters(cpu, 4000)                            # and grows it with the layers seen
    assert cw._SPARE_COUNTERS[None].numel() >= 4000


def test_capture_without_the_extension_or_with_an_older_build_is_a_clear_error(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    monkeypatch.setattr("vlmkern.ext.load_extension", lambda: (None, "not built"))
    fake.capture = 3
    with pytest.raises(RuntimeError, match="not built"):
        cw._counters(torch.device("cpu"), 8)
    monkeypatch.setattr("vlmkern.ext.load_extension", lambda: (object(), "an older build"))
    with pytest.raises(RuntimeError, match="rebuild the package"):
        cw._counters(torch.device("cpu"), 8)


@gpu
def test_graphs_captured_on_one_stream_replay_concurrently_on_two():
    # The capture stream ran eager launches first, so it has an eager counters
    # buffer; each graph must still count in a buffer of its own, or replays
    # running at once on two streams would count each other's parts. The
    # layer is cut into many stream-K parts per row block (K = 18944, 2 row
    # blocks), so shared counters would pick the wrong last part.
    torch.manual_seed(0)
    layer = vlmkern.QuantLinear.from_linear(nn.Linear(18944, 256), QuantConfig(4, 128)).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graphs, static_x, static_y = [], [], []
    with torch.cuda.stream(side):
        for seed in range(2):
            x = torch.randn(1, 18944, device="cuda", dtype=torch.float16,
                            generator=torch.Generator(device="cuda").manual_seed(seed))
            layer(x)                                    # eager, on the capture stream
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                static_y.append(layer(x))
            graphs.append(graph)
            static_x.append(x)
    torch.cuda.current_stream().wait_stream(side)
    expected = [layer(x) for x in static_x]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    wrong = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in streams]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(200):
        for i, (graph, s) in enumerate(zip(graphs, streams)):
            with torch.cuda.stream(s):               # each replay checked on its own stream
                graph.replay()
                wrong[i] += (static_y[i] != expected[i]).sum()
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert [int(w) for w in wrong] == [0, 0]
    # the eager buffer of the layer's device and this stream: left zero too
    assert not cw._counters(static_x[0].device, 2)[:2].any()


@gpu
def test_capture_id_names_each_capture():
    from vlmkern.ext import load_extension
    module, _ = load_extension()
    side = torch.cuda.Stream()
    assert module.capture_id(side.cuda_stream) == 0
    ids = []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            ids.append(module.capture_id(side.cuda_stream))
            torch.zeros(1, device="cuda")              # a capture needs a node
    assert 0 not in ids and ids[0] != ids[1]
    assert module.capture_id(side.cuda_stream) == 0
    with pytest.raises(TypeError):
        module.capture_id("stream")


def test_long_lived_tensors_are_made_on_a_worker_thread(monkeypatch):
    """torch.compile's CUDA-graph trees send a thread's allocations into their
    pool during warm-up: layouts and counters are made on a thread of their
    own (ordered after the caller's stream), a layout made from another one
    is made in place there (no deadlock), and errors reach the caller."""
    import threading

    from vlmkern.ops import cuda_common

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

        def synchronize(self):
            events.append(("sync", self.name))

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(
        threading.current_thread().name))
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    cuda = torch.device("cuda", 0)
    caller = threading.current_thread().name

    def outer():
        inner = cuda_common.outside_graph_pools(lambda: threading.current_thread().name, cuda)
        return threading.current_thread().name, inner

    worker, inner = cuda_common.outside_graph_pools(outer, cuda)
    assert worker != caller and inner == worker
    assert events == [("wait", worker, caller), ("sync", worker)]
    modes = lambda: (torch.is_grad_enabled(), torch.is_inference_mode_enabled())  # noqa: E731
    with torch.inference_mode():                     # the caller's modes hold there too
        assert cuda_common.outside_graph_pools(modes, cuda) == (False, True)
    with torch.no_grad():
        assert cuda_common.outside_graph_pools(modes, cuda) == (False, False)
    assert cuda_common.outside_graph_pools(modes, cuda) == (True, False)

    def fails():
        raise ValueError("layout cannot hold it")

    with pytest.raises(ValueError, match="cannot hold"):
        cuda_common.outside_graph_pools(fails, cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert cuda_common.outside_graph_pools(lambda: threading.current_thread().name, cuda) == caller
    cpu = torch.device("cpu")
    assert cuda_common.outside_graph_pools(lambda: threading.current_thread().name, cpu) == caller
