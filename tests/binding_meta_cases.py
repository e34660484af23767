"""The torch bindings of csrc/, built with stub launchers, run through their
Meta implementations on the CPU. test_binding_checks.py runs this file in a
child process (the library registers torch.ops.vlmkern, which must not leak
into the test process):

    python tests/binding_meta_cases.py LIBRARY   # prints {case: [passed, detail]} as JSON

Two kinds of case:

* wrapper cases run the real Python wrappers (vlmkern.ops.cuda_*) on CPU
  tensors at awkward shapes. Only the device queries are replaced, and every
  op receives its tensors as meta tensors, so the op's C++ checks judge
  exactly what the wrapper built (layouts, padding, split counts), and the
  output's shape and dtype are the op's Meta answer;
* bad-argument cases take the arguments a wrapper case passed to an op,
  change one, and expect the op's error message.
"""
from __future__ import annotations

import json
import re
import sys
import traceback

import torch

import vlmkern
from vlmkern import BinaryConfig, IntActConfig, QuantConfig

RECORDED: dict[str, tuple[list, dict]] = {}   # op -> the meta arguments of its first call
REAL: dict[str, object] = {}                    # op -> the op itself
OPS = ("dequant_groupwise", "weight_only_mma", "weight_only_wgmma", "weight_only_tma",
       "weight_only_tma_decode", "weight_only_dequant", "int_act_quantize", "int_act_gemm",
       "int_act_scale_int32", "int_act_staged_mma", "binary_matmul", "binary_dequant",
       "binary_lut_mma", "binary_lut_staged_mma", "binary_lut_tma", "binary_lut_tma_decode",
       "binary_lut_dequant")
SMS, SMEM_PER_BLOCK, SMEM_PER_SM = 132, 232448, 233472   # an H100's
SM = [(9, 0)]   # the compute capability device_sm reports; cases change it


def _meta(v):
    """A meta tensor of v's shape, strides and dtype (``to("meta")`` would
    make overlapping rows contiguous)."""
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")


def install(library: str) -> None:
    """Load the stub-built library, route every op call through meta tensors
    and replace the wrappers' device queries with an H100's answers."""
    torch.ops.load_library(library)
    for name in OPS:
        real = REAL[name] = getattr(torch.ops.vlmkern, name)

        def call(*args, _real=real, _name=name, **kwargs):
            args, kwargs = [_meta(a) for a in args], {k: _meta(v) for k, v in kwargs.items()}
            RECORDED.setdefault(_name, (args, kwargs))   # the first call: an ordinary case
            return _real(*args, **kwargs)
        setattr(torch.ops.vlmkern, name, call)   # the namespace caches ops as attributes

    from vlmkern import ext
    from vlmkern.ops import (
        cuda_binary,
        cuda_binary_lut,
        cuda_int_act,
        cuda_int_act_staged,
        cuda_weight_only,
        cuda_weight_only_sm90,
    )
    ext.load_extension = lambda: (object(), "stub library")
    real_check = cuda_int_act.check_activations

    def check_activations(*args, **kwargs):   # x stays on the CPU here
        return real_check(*args, **{**kwargs, "same_device": False})

    def zeros(device, blocks):   # the stream-K counters
        return torch.zeros(max(blocks, 1024), dtype=torch.int32)

    for module in (cuda_binary, cuda_binary_lut, cuda_int_act, cuda_int_act_staged,
                   cuda_weight_only, cuda_weight_only_sm90):
        patches = {"require_op": lambda *a: None, "check_activations": check_activations,
                   "multiprocessors": lambda device: SMS, "_counters": zeros,
                   "device_sm": lambda device: SM[0], "smem_per_block": lambda d: SMEM_PER_BLOCK,
                   "smem_per_multiprocessor": lambda d: SMEM_PER_SM}
        for attr, value in patches.items():
            if hasattr(module, attr):
                setattr(module, attr, value)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(n: int, k: int, config, seed: int = 0):
    return vlmkern.quantize_weight(torch.randn(n, k, generator=_gen(seed)), config)


def _x(m: int, k: int, dtype=torch.float16) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(m)).to(dtype)


def _expect_output(y, m: int, n: int, dtype) -> None:
    assert y.device.type == "meta", f"the op was not called (output on {y.device})"
    assert tuple(y.shape) == (m, n) and y.dtype == dtype, \
        f"got {tuple(y.shape)} {y.dtype}, want {(m, n)} {dtype}"


# -- wrapper cases ------------------------------------------------------------------------
def _weight_only_cases():
    from vlmkern.ops import cuda_weight_only as cw
    from vlmkern.ops import cuda_weight_only_sm90 as wg
    from vlmkern.ops.laid_out import LaidOutWeight
    shapes = ((33, 200, 64, 3), (257, 520, 128, 4), (130, 3000, None, 2), (1, 8, 16, 4),
              (300, 136, 32, 3))
    for n, k, g, bits in shapes:
        qw = _weight(n, k, QuantConfig(bits=bits, group_size=g), seed=n)
        bias = torch.randn(n, generator=_gen(1))
        for m in (1, 3, 16, 17, 64):
            dtype = torch.bfloat16 if m == 3 else torch.float16
            yield (f"weight_only_mma W{bits} g{g} {n}x{k} M={m}",
                   lambda qw=qw, m=m, dtype=dtype, n=n, k=k, b=bias:
                   _expect_output(cw.weight_only_mma(_x(m, k, dtype), qw, b), m, n, dtype))
            if m <= cw.post_scale_max_m(qw):
                yield (f"weight_only_post_scale W{bits} g{g} {n}x{k} M={m}",
                       lambda qw=qw, m=m, n=n, k=k:
                       _expect_output(cw.weight_only_post_scale(_x(m, k), qw), m, n,
                                      torch.float16))
        for m in (1, 17, 200):
            yield (f"weight_only_wgmma W{bits} g{g} {n}x{k} M={m}",
                   lambda qw=qw, m=m, n=n, k=k:
                   _expect_output(wg.weight_only_wgmma(_x(m, k), qw), m, n, torch.float16))
            yield (f"weight_only_tma W{bits} g{g} {n}x{k} M={m}",
                   lambda qw=qw, m=m, n=n, k=k, b=bias:
                   _expect_output(wg.weight_only_tma(_x(m, k), qw, b), m, n, torch.float16))
        yield (f"weight_only_tma_decode W{bits} g{g} {n}x{k} M=5",
               lambda qw=qw, n=n, k=k:
               _expect_output(wg.weight_only_tma_decode(_x(5, k), qw), 5, n, torch.float16))
    qw = LaidOutWeight.from_quantized(_weight(200, 264, QuantConfig(bits=4, group_size=64)))
    yield ("weight_only_mma laid-out W4 g64 200x264 M=7",
           lambda: _expect_output(cw.weight_only_mma(_x(7, 264), qw), 7, 200, torch.float16))


def _dequant_cases():
    from vlmkern import ext
    for n, k, bits, g, sym in ((33, 200, 3, 64, False), (64, 256, 4, 128, True),
                               (5, 40, 8, 8, False)):
        qw = _weight(n, k, QuantConfig(bits=bits, group_size=g, sym=sym), seed=k)
        for fast in (False, True):
            yield (f"dequant_groupwise W{bits} g{g} {n}x{k} fast={fast}",
                   lambda qw=qw, n=n, k=k, fast=fast: _expect_output(
                       ext.dequant_groupwise(qw.qweight, qw.qzeros, qw.scales, qw.bits,
                                             qw.group_size, k, torch.bfloat16, fast),
                       n, k, torch.bfloat16))
    from vlmkern.ops import cuda_weight_only as cw

    def layout_dequant():
        mw = cw.to_mma_layout(_weight(200, 264, QuantConfig(bits=3, group_size=32)), torch.half)
        y = torch.ops.vlmkern.weight_only_dequant(mw.wq, mw.sz, mw.bits, mw.out_features,
                                                  mw.in_features, mw.slot_log2, mw.dtype)
        _expect_output(y, 200, 264, torch.float16)
    yield "weight_only_dequant W3 g32 200x264", layout_dequant


def _int_act_cases():
    from vlmkern.ops import cuda_int_act as cia
    from vlmkern.ops import cuda_int_act_staged as staged
    for w_bits, a_bits, g, n, k in ((8, 8, None, 33, 200), (6, 6, 128, 257, 520),
                                    (4, 4, 64, 130, 300), (8, 8, 64, 64, 72)):
        qw = _weight(n, k, IntActConfig(w_bits, a_bits, group_size=g), seed=n)
        bias = torch.randn(n, generator=_gen(2))
        for sm in ((8, 0), (9, 0)):
            for m in (1, 5, 17, 130):
                for path in ("mma", "spread"):
                    if path == "spread" and m > cia.SPREAD_MAX_M:
                        continue

                    def case(qw=qw, m=m, n=n, k=k, sm=sm, path=path, b=bias):
                        SM[0] = sm
                        _expect_output(cia.int_act_matmul(_x(m, k, torch.float32), qw, b,
                                                          path=path), m, n, torch.float32)
                    yield f"int_act_matmul W{w_bits}A{a_bits} g{g} {n}x{k} sm{sm[0]}0 {path} M={m}", case
        if w_bits == 8 and a_bits == 8:
            for m in (1, 9, 32):
                yield (f"int_act_staged W8A8 g{g} {n}x{k} M={m}",
                       lambda qw=qw, m=m, n=n, k=k, b=bias:
                       _expect_output(staged.int_act_staged(_x(m, k), qw, b), m, n, torch.float16))

    def scale_one_row():   # acc [1, N] with stride (1, 1): a transposed column
        acc = torch.zeros(40, 1, dtype=torch.int32).t()
        y = torch.ops.vlmkern.int_act_scale_int32(acc, torch.ones(1), torch.ones(40), None,
                                                  torch.float16)
        _expect_output(y, 1, 40, torch.float16)
    yield "int_act_scale_int32 one row, stride (1, 1)", scale_one_row


def _binary_cases():
    from vlmkern.ops import cuda_binary as cb
    from vlmkern.ops import cuda_binary_lut as lut
    from vlmkern.ops.laid_out_binary import LaidOutBinaryWeight
    for n, k, block in ((33, 200, 96), (257, 520, 128), (130, 3000, 128), (1, 128, 128)):
        qw = _weight(n, k, BinaryConfig(block_size=block), seed=n)
        bias = torch.randn(n, generator=_gen(3))
        for m in (1, 5, 17, 200):
            yield (f"binary_matmul {n}x{k} block {block} M={m}",
                   lambda qw=qw, m=m, n=n, k=k, b=bias:
                   _expect_output(cb.binary_matmul(_x(m, k), qw, b), m, n, torch.float16))
        yield (f"binary dequantize {n}x{k} block {block}",
               lambda qw=qw, n=n, k=k: _expect_output(cb.dequantize(qw, torch.bfloat16), n, k,
                                                      torch.bfloat16))
        if block != 128:
            continue
        for m in (1, 17, 64):
            yield (f"binary_lut {n}x{k} M={m}",
                   lambda qw=qw, m=m, n=n, k=k, b=bias:
                   _expect_output(lut.binary_lut(_x(m, k), qw, b), m, n, torch.float16))
            yield (f"binary_lut_staged {n}x{k} M={m}",
                   lambda qw=qw, m=m, n=n, k=k:
                   _expect_output(lut.binary_lut_staged(_x(m, k), qw), m, n, torch.float16))
            yield (f"binary_lut_tma {n}x{k} M={m}",
                   lambda qw=qw, m=m, n=n, k=k:
                   _expect_output(lut.binary_lut_tma(_x(m, k), qw), m, n, torch.float16))
        yield (f"binary_lut_tma_decode {n}x{k} M=3",
               lambda qw=qw, n=n, k=k:
               _expect_output(lut.binary_lut_tma_decode(_x(3, k), qw), 3, n, torch.float16))
        if k % 8 == 0:
            laid = LaidOutBinaryWeight.from_binary(qw)
            yield (f"binary_lut dequantize_layout {n}x{k}",
                   lambda laid=laid, n=n, k=k:
                   _expect_output(lut.dequantize_layout(laid, torch.float16), n, k,
                                  torch.float16))
    # valid activations whose rows overlap: one row broadcast, sliding windows
    qw = _weight(64, 256, BinaryConfig(block_size=128))
    from vlmkern.ops import cuda_int_act as cia
    qa = _weight(64, 256, IntActConfig(8, 8))
    row, signal = _x(1, 256), torch.randn(259, generator=_gen(4)).half()
    for what, x in (("expand", row.expand(4, 256)), ("unfold", signal.unfold(0, 256, 1))):
        yield (f"binary_matmul x from {what}",
               lambda x=x: _expect_output(cb.binary_matmul(x, qw), 4, 64, torch.float16))
        yield (f"int_act_matmul x from {what}",
               lambda x=x: _expect_output(cia.int_act_matmul(x, qa, path="mma"), 4, 64,
                                          torch.float16))


# -- bad-argument cases ---------------------------------------------------------------------
def _changed(op: str, changes: dict):
    """Call ``op`` with the arguments its first wrapper case passed, positions
    in ``changes`` replaced (a callable gets the old value)."""
    args, kwargs = RECORDED[op]
    args = list(args)
    for i, v in changes.items():
        args[i] = v(args[i]) if callable(v) else v
    return REAL[op](*args, **kwargs)


def _meta_rows(m: int, k: int, dtype=torch.float16, stride=None):
    return torch.empty_strided((m, k), stride or (k, 1), dtype=dtype, device="meta")


BAD = [  # (name, op, changes, expected error pattern)
    ("weight_only_mma bits 5", "weight_only_mma", {5: 5}, "bits must be 2, 3 or 4"),
    ("weight_only_mma x columns not a multiple of 8", "weight_only_mma",
     {0: lambda x: _meta_rows(x.shape[0], x.shape[1] - 4)}, "multiple of 8"),
    ("weight_only_mma out_features off the layout", "weight_only_mma",
     {6: lambda n: n + 128}, "does not match"),
    ("weight_only_mma unknown decode", "weight_only_mma", {9: 7}, "decode must be"),
    ("weight_only_mma decode 3 with 32-column scale slots", "weight_only_mma", {9: 3, 7: 1},
     "decode 3 takes M <= 16 with slot_log2 = 3"),
    ("weight_only_mma bias of the wrong length", "weight_only_mma",
     {3: torch.empty(3, device="meta")}, "bias must have shape"),
    ("weight_only_mma int64 codes", "weight_only_mma", {1: lambda t: t.long()}, "must be int32"),
    ("weight_only_wgmma bits 1", "weight_only_wgmma", {4: 1}, "bits must be 2, 3 or 4"),
    ("weight_only_dequant slot_log2 4", "weight_only_dequant", {5: 4}, "slot_log2"),
    ("binary_matmul block size 48", "binary_matmul", {7: 48}, "multiple of 32"),
    ("binary_matmul stats of one block", "binary_matmul",
     {4: lambda s: s[:, :1]}, "stats must have shape"),
    ("binary_matmul plane rows of 2 words", "binary_matmul",
     {2: lambda s: s[:, :2].contiguous(), 3: lambda a: a[:, :2].contiguous()}, "multiple of 4"),
    ("binary_matmul overlapping rows", "binary_matmul",
     {0: lambda x: _meta_rows(4, x.shape[1], stride=(0, 1))}, "must not overlap"),
    ("binary_matmul more rows than the grid holds", "binary_matmul",
     {0: lambda x: _meta_rows(16 * 65535 + 1, x.shape[1])}, "at most 1048560"),
    ("binary_lut_mma out_features off the layout", "binary_lut_mma", {5: lambda n: n + 128},
     "out_features"),
    ("binary_lut_dequant tables of the wrong shape", "binary_lut_dequant",
     {1: lambda t: t[:, :, :4].contiguous()}, "tables must have shape"),
    ("int_act_quantize a_bits 5", "int_act_quantize", {1: 5}, "a_bits must be 4, 6 or 8"),
    ("int_act_quantize int4 codes from 8-bit activations", "int_act_quantize",
     {1: 8, 4: 256, 5: 256, 6: 1},
     "mode 1 .int4 codes. takes a_bits 4"),
    ("int_act_quantize group_pad 48", "int_act_quantize", {4: 48}, "group_pad"),
    ("int_act_quantize overlapping rows", "int_act_quantize",
     {0: lambda x: _meta_rows(4, x.shape[1], x.dtype, stride=(0, 1))}, "must not overlap"),
    ("int_act_gemm w_scale_t of the wrong width", "int_act_gemm",
     {3: lambda s: s[:, :-1]}, "w_scale_t must have shape"),
    ("int_act_gemm wgmma with int4 weights", "int_act_gemm", {6: 1, 8: 1}, "mode 0"),
    ("int_act_gemm more rows than the grid holds", "int_act_gemm",
     {0: lambda q: torch.empty(128 * 65535 + 1, q.shape[1], dtype=q.dtype, device="meta"),
      1: torch.empty(128 * 65535 + 1, device="meta")}, "at most 8388480"),
    ("int_act_scale_int32 overlapping rows", "int_act_scale_int32",
     {0: lambda a: torch.empty_strided((2, 40), (0, 1), dtype=torch.int32, device="meta"),
      1: torch.empty(2, device="meta")}, "must not overlap"),
    ("int_act_scale_int32 bias elsewhere", "int_act_scale_int32",
     {3: torch.zeros(40)}, "bias is on cpu but acc is on meta"),
    ("dequant_groupwise bits 9", "dequant_groupwise", {3: 9}, "bits"),
    ("int_act_staged_mma more rows than the kernel takes", "int_act_staged_mma",
     {0: lambda q: torch.empty(33, q.shape[1], dtype=q.dtype, device="meta"),
      1: torch.empty(33, device="meta")}, "at most"),
]


def cases():
    yield from _weight_only_cases()
    yield from _dequant_cases()
    yield from _int_act_cases()
    yield from _binary_cases()
    for name, op, changes, pattern in BAD:
        def bad(op=op, changes=changes, pattern=pattern):
            try:
                _changed(op, changes)
            except RuntimeError as e:
                assert re.search(pattern, str(e)), f"wrong error: {str(e).splitlines()[0]}"
                return
            raise AssertionError("no error")
        yield f"bad argument: {name}", bad


def main(library: str) -> None:
    install(library)
    results = {}
    for name, run in cases():
        try:
            run()
            results[name] = [True, ""]
        except (AssertionError, RuntimeError, TypeError, ValueError) as e:   # reported per case
            results[name] = [False, "".join(traceback.format_exception_only(e)).strip()[-2000:]]
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
