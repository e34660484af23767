"""Quantized layers under torch.compile and autograd.

Under torch.compile ``ops.linear`` is one opaque op (``vlmkern::linear``)
whose real implementation runs the eager dispatch when the graph runs: the
compiled model must give exactly the eager outputs, hand the kernels the
layer's own weight object (their layout caches are per object), and keep the
argument checks. Gradients, eager or compiled, are those of x @ W^T + bias
with W the dequantized weight. CPU tests run on the torch reference; the GPU
tests run the CUDA kernels, including a CUDA-graph capture by
``mode="reduce-overhead"``.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_cuda_weight_only import gpu, make_weight
from tiny_models import build_llama
from torch import nn
from torch.autograd import forward_ad

import vlmkern
from vlmkern import BinaryConfig, IntActConfig, QuantConfig, ops
from vlmkern.ops import compiled

K, N = 256, 96

CONFIGS = {
    "w4g64": QuantConfig(4, 64),
    "w3-per-row": QuantConfig(3, None),
    "w2g32": QuantConfig(2, 32),
    "w8a8": IntActConfig(8, 8),
    "w4a4g64": IntActConfig(4, 4, group_size=64),
    "binary": BinaryConfig(),
}


def _layer(config, bias=True, laid_out=False, device="cpu", k=K, n=N):
    torch.manual_seed(0)
    layer = vlmkern.QuantLinear.from_linear(nn.Linear(k, n, bias=bias), config)
    if laid_out:
        layer.to_kernel_layout()
    return layer.to(device)


def _op_targets(model, *args):
    """The call_function targets of the graph Dynamo builds for model(*args)."""
    targets = []

    def backend(gm, inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return targets


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_layer_equals_eager(name):
    layer = _layer(CONFIGS[name])
    torch._dynamo.reset()
    model = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for m, dtype in ((1, torch.float32), (5, torch.float32), (17, torch.bfloat16),
                         (3, torch.float16)):
            x = torch.randn(2, m, K, dtype=dtype)
            assert torch.equal(model(x), layer(x)), (m, dtype)


def test_one_opaque_op_per_layer():
    model = nn.Sequential(_layer(CONFIGS["w4g64"]), nn.GELU(), _layer(CONFIGS["binary"], k=N),
                          nn.GELU(), _layer(CONFIGS["w8a8"], k=N))
    with torch.no_grad():
        targets = _op_targets(model, torch.randn(3, K))
    # the three layers and the two GELUs: nothing of the dispatch was traced
    assert targets.count("vlmkern.linear.default") == 3 and len(targets) == 5, targets


def test_laid_out_and_act_order_weights():
    torch.manual_seed(0)
    qw = make_weight(N, K, 4, 64, False, perm=True)
    layer = vlmkern.QuantLinear.from_linear(nn.Linear(K, N), qw)
    laid = _layer(QuantConfig(4, 64), laid_out=True)
    for module in (layer, laid):
        torch._dynamo.reset()
        x = torch.randn(7, K)
        with torch.no_grad():
            assert torch.equal(torch.compile(module, fullgraph=True)(x), module(x))


def test_op_runs_on_the_layers_own_weight(monkeypatch):
    """The kernels cache their weight layouts per weight object: the op must
    hand them the layer's object, not a new one per call."""
    layer = _layer(CONFIGS["w4g64"])
    got = []
    eager = ops.dispatch_linear

    def spy(x, qweight, bias=None):
        got.append(qweight)
        return eager(x, qweight, bias)

    monkeypatch.setattr(ops, "dispatch_linear", spy)
    torch._dynamo.reset()
    model = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for m in (1, 2, 9):
            model(torch.randn(m, K))
    assert len(got) == 3 and all(w is layer.quantized_weight for w in got)
    for replace in (lambda: setattr(layer, "scales", layer.scales.clone()),
                    lambda: layer._apply(torch.clone)):
        before = layer.quantized_weight
        replace()     # new packed tensors: a new weight object, built and held now
        with torch.no_grad():
            model(torch.randn(4, K))
        assert got[-1] is layer.quantized_weight and got[-1] is not before


def test_weight_no_layer_holds_is_rebuilt_correctly():
    qweight = _layer(CONFIGS["w3-per-row"]).quantized_weight
    copy = dataclasses.replace(qweight)       # the same tensors, an object no layer holds
    x = torch.randn(5, K)
    torch._dynamo.reset()
    compiled_linear = torch.compile(lambda x: ops.linear(x, copy), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled_linear(x), ops.linear(x, qweight))
    rebuilt = compiled._weight(list(copy.tensors().values()), type(copy).__name__,
                               compiled.describe(copy))
    assert rebuilt is not copy and rebuilt.meta() == copy.meta()
    assert all(a is b for a, b in zip(rebuilt.tensors().values(), copy.tensors().values()))


def test_checks_still_raise_under_compile():
    layer = _layer(CONFIGS["w4g64"])
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(ValueError, match="in_features=256"):
        torch.compile(layer)(torch.randn(3, K - 1))
    x = torch.randn(3, K)
    x[1, 5] = float("nan")
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or Inf"):
        torch.compile(layer, fullgraph=True)(x)
    with pytest.raises(TypeError, match="weight types"):
        compiled.call(x, object(), None)


def test_the_op_called_directly_rejects_what_describes_no_weight():
    qweight = _layer(CONFIGS["w4g64"]).quantized_weight
    tensors, name = list(qweight.tensors().values()), type(qweight).__name__
    description = compiled.describe(qweight)
    x = torch.randn(2, K)
    op = torch.ops.vlmkern.linear
    for args, match in [
            ((tensors, "Nope", description, N), "unknown weight type 'Nope'"),
            (([], name, description, N), "no tensors given"),
            ((tensors, name, "((", N), "does not describe 3 tensors"),
            ((tensors, name, "(([1],), (4, 64, 256))", N), "does not describe"),
            ((tensors, name, "((), ())", N), "does not describe 3 tensors"),
            ((tensors[:1], name, description, N), "does not describe 1 tensors"),
            ((tensors, name, description, N + 1), f"out_features={N + 1}, but the weight "
                                                   f"has {N} rows"),
            ((tensors[::-1], name, description, N), "qweight has shape"),       # FormatError
            ((tensors, name, description.replace("(4, 64", "(5, 64"), N), "bits must be")]:
        with pytest.raises(ValueError, match=match):
            op(x, args[0], None, *args[1:])
    assert torch.equal(op(x, tensors, None, name, description, N), ops.linear(x, qweight))


def test_fake_implementation_gives_shape_and_dtype():
    qweight = _layer(CONFIGS["binary"]).quantized_weight
    tensors = [t.to("meta") for t in qweight.tensors().values()]
    y = torch.ops.vlmkern.linear(torch.empty(2, 7, K, dtype=torch.bfloat16, device="meta"),
                                 tensors, None, type(qweight).__name__,
                                 compiled.describe(qweight), N)
    assert y.shape == (2, 7, N) and y.dtype == torch.bfloat16 and y.device.type == "meta"


@pytest.mark.parametrize("name", ["w4g64", "binary", "w8a8"])
def test_opcheck(name):
    """torch's own checks of a custom op: schema, fake tensors, autograd
    registration and AOT dispatch (static and dynamic shapes)."""
    qweight = _layer(CONFIGS[name]).quantized_weight
    x = torch.randn(4, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    args = (x, list(qweight.tensors().values()), bias, type(qweight).__name__,
            compiled.describe(qweight), N)
    torch.library.opcheck(torch.ops.vlmkern.linear.default, args)


def _dense_grads(layer, x, grad_out):
    """x's and bias's gradients of F.linear with the dequantized weight, in fp64."""
    w = layer.quantized_weight.dequantize(torch.float64)
    xd = x.detach().double().requires_grad_(True)
    bd = layer.bias.detach().double().requires_grad_(True)
    F.linear(xd, w, bd).backward(grad_out.double())
    return xd.grad.to(x.dtype), bd.grad.to(layer.bias.dtype)


@pytest.mark.parametrize("name", ["w4g64", "w2g32", "binary", "w8a8"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_gradients_are_those_of_the_dequantized_weight(name, mode):
    layer = _layer(CONFIGS[name])
    layer.bias.requires_grad_(True)
    run = layer
    if mode == "compiled":
        torch._dynamo.reset()
        run = torch.compile(layer, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, K, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(2, 3, N, dtype=dtype)
        layer.bias.grad = None
        run(x).backward(grad_out)
        want_x, want_bias = _dense_grads(layer, x, grad_out)
        assert torch.equal(x.grad, want_x), dtype
        assert torch.equal(layer.bias.grad, want_bias), dtype


def test_forward_with_grad_equals_forward_without():
    """A forward that records the graph computes the same outputs."""
    for name in ("w4g64", "w8a8", "binary"):
        layer = _layer(CONFIGS[name])
        x = torch.randn(6, K)
        with torch.no_grad():
            want = layer(x)
        got = layer(x.clone().requires_grad_(True))
        assert got.requires_grad and torch.equal(got.detach(), want), name


@pytest.mark.parametrize("name", ["w4g64", "w8a8", "binary"])
def test_vmap_over_x_equals_the_batched_call(name):
    layer = _layer(CONFIGS[name])
    x = torch.randn(3, 4, K)
    with torch.no_grad():
        want = layer(x)
        assert torch.equal(torch.func.vmap(layer)(x), want)
        # mapped over a middle dim of a permuted x, the result's map dim placed second
        got = torch.func.vmap(layer, in_dims=2, out_dims=1)(x.permute(1, 2, 0))
        assert torch.equal(got, want.transpose(0, 1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.func.vmap(layer)(xa).pow(2).sum().backward()   # autograd through the vmap
    layer(xb).pow(2).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):   # checked on the unwrapped x
        torch.func.vmap(layer)(x)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp", "jacfwd"])
def test_derivative_transforms_are_refused_not_silently_zero(transform):
    # torch.func.jvp through a custom op without a forward rule returned a zero tangent
    layer = vlmkern.QuantLinear.from_linear(nn.Linear(64, 8), QuantConfig(4, 32))
    x = torch.randn(64)
    calls = {"grad": lambda: torch.func.grad(lambda v: layer(v).sum())(x),
             "jacrev": lambda: torch.func.jacrev(layer)(x),
             "jvp": lambda: torch.func.jvp(layer, (x,), (torch.ones(64),)),
             "jacfwd": lambda: torch.func.jacfwd(layer)(x)}
    with pytest.raises(NotImplementedError, match="use torch.autograd.grad"):
        calls[transform]()
    xa = x.clone().requires_grad_()
    layer(xa).sum().backward()                 # what the message points to works
    w = layer.quantized_weight.dequantize(torch.float32)
    torch.testing.assert_close(xa.grad, w.sum(0))


@pytest.mark.parametrize("config", ["w4g64", "w8a8", "binary"])
@pytest.mark.parametrize("dual", ["x", "bias", "x needing grad"])
def test_forward_ad_is_refused_not_silently_cut(config, dual):
    # the Triton and CUDA kernels returned an output without a tangent, and the
    # reference's tangent of an integer-activation layer ignored the op's
    # straight-through rule: no dual input runs at all
    layer = _layer(CONFIGS[config])
    x, bias = torch.randn(3, K), layer.bias.detach().clone()
    want = layer(x)
    with forward_ad.dual_level():
        x_dual = forward_ad.make_dual(x.clone().requires_grad_(dual == "x needing grad"),
                                      torch.randn(3, K))
        bias_dual = forward_ad.make_dual(bias, torch.randn(N))
        call = (lambda: vlmkern.ops.linear(x, layer.quantized_weight, bias_dual)) \
            if dual == "bias" else (lambda: layer(x_dual))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            call()
        # plain tensors inside the dual level still run
        assert torch.equal(layer(x), want)


def test_vmap_over_the_weight_is_refused():
    qweight = _layer(CONFIGS["w4g64"]).quantized_weight
    codes, scales, zeros = qweight.tensors().values()
    name, description = type(qweight).__name__, compiled.describe(qweight)
    x = torch.randn(2, K)
    with pytest.raises(NotImplementedError, match="maps over x only"):
        torch.func.vmap(lambda c: torch.ops.vlmkern.linear(x, [c, scales, zeros], None, name,
                                                           description, N))(
            torch.stack([codes, codes]))


def _quantized_llama(**overrides):
    """A tiny Llama whose linears are W4, binary and W8A8 layers."""
    model, inputs = build_llama(**overrides)
    vlmkern.replace_linears(model, {"*.mlp.*": BinaryConfig(block_size=64),
                                    "*.self_attn.[qk]_proj": IntActConfig(8, 8),
                                    "*": QuantConfig(4, 32)}, progress=False)
    formats = {m.format for m in model.modules() if isinstance(m, vlmkern.QuantLinear)}
    assert formats == {"groupwise", "binary", "intact"}
    return model, inputs


def test_quantized_hf_model_compiles_without_graph_breaks():
    """The model traces into one graph (aot_eager: Dynamo and AOT autograd
    without code generation) and gives the eager logits exactly."""
    model, inputs = _quantized_llama()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        want = model(**inputs).logits
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs).logits
    assert torch.equal(got, want)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_generate_with_static_cache_and_compiled_forward():
    """transformers' recipe for fast decoding (a static KV cache, the forward
    compiled with fullgraph) runs through the op and picks the eager tokens."""
    model, inputs = _quantized_llama()
    ids = inputs["input_ids"][:1]
    want = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    got = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
    assert not torch._dynamo.utils.counters["graph_break"]


# -- GPU: the CUDA kernels in a compiled model -----------------------------------------
def _gpu_model(dtype):
    # quantized layers only: an activation between them would be code that
    # inductor generates, whose rounding may differ from eager's by an ulp
    torch.manual_seed(0)
    return nn.Sequential(
        _layer(QuantConfig(4, 128), device="cuda", k=1024, n=768),
        _layer(QuantConfig(3, 64), device="cuda", k=768, n=1024),
        _layer(BinaryConfig(), device="cuda", k=1024, n=512),
        _layer(IntActConfig(8, 8), device="cuda", k=512, n=256)).to(dtype)


@gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_model_equals_eager(mode):
    """reduce-overhead captures the kernels in CUDA graphs (stream-K counters
    of the graph's own) and replays them on new inputs."""
    model = _gpu_model(torch.float16)
    torch._dynamo.reset()
    run = torch.compile(model, mode=mode, fullgraph=True)
    with torch.no_grad():
        for step in range(6):           # warm-up, capture, then replays
            for m in (1, 16):
                x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
                assert torch.equal(run(x).clone(), model(x)), (step, m)
    torch.cuda.synchronize()
    assert all(int(buf.abs().sum()) == 0 for buf in vlmkern.ops.cuda_weight_only._COUNTERS.values())


@gpu
def test_gpu_reduce_overhead_leaves_the_graph_pool_to_inductor():
    """CUDA-graph trees send a thread's allocations into their pool during
    warm-up and treat any live block there that they do not track as free
    memory (with slow_path_cudagraph_asserts they check it). Layouts and
    counters made by a first call inside their warm-up must come from the
    ordinary pools. Three token counts make three graphs in one tree."""
    model = _gpu_model(torch.float16)        # no layout made yet: the first call makes them
    torch._dynamo.reset()
    with torch._inductor.config.patch({"triton.slow_path_cudagraph_asserts": True}), \
            torch.no_grad():
        run = torch.compile(model, mode="reduce-overhead", dynamic=False, fullgraph=True)
        for step in range(4):
            for m in (1, 16, 5):
                x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
                got = run(x).clone()
                assert torch.equal(got, model(x)), (step, m)


@gpu
def test_gpu_generate_with_static_cache_and_reduce_overhead():
    """The same recipe on the GPU with CUDA graphs: the layers run on the
    kernels inside captured decode steps. Compared with the same compiled
    forward without graphs (inductor's code for the rest of the model may
    round differently from eager's)."""
    pytest.importorskip("transformers")
    model, inputs = _quantized_llama(hidden_size=512, intermediate_size=1024)
    model = model.half().cuda()
    ids = inputs["input_ids"][:1].cuda()
    eager_forward = model.forward
    runs = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        model.forward = torch.compile(eager_forward, mode=mode, fullgraph=True)
        runs[mode] = [model.generate(ids, max_new_tokens=8, do_sample=False,
                                     cache_implementation="static") for _ in range(2)]
    # the second reduce-overhead run replays the captured steps
    want = runs["default"][0]
    assert all(torch.equal(got, want) for got in runs["default"] + runs["reduce-overhead"])


@gpu
def test_gpu_gradients_flow_through_kernels():
    model = _gpu_model(torch.bfloat16)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    model(x).float().square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert float(x.grad.abs().sum()) > 0
