"""Integer-activation matmul on the CUDA extension (csrc/int_act_kernel.cu):
W8A8, W6A6, W4A4 and every mixed width, fp16/bf16/fp32 activations.

Each call is two launches: ``int_act_quantize`` quantizes all tokens at once
(per-token absmax scale, or the static ``act_scale``) into the kernel's
padded layout, then ``int_act_gemm`` multiplies on the integer tensor cores
with exact int32 sums per weight group and applies w_scale, the token scale
and the bias in its epilogue.

Kernel modes (the MMA each width combination runs on):
  I8    weights stored as int8 (6 or 8 bits, or 4-bit activations with
        8/6-bit weights); int8 MMA.
  I4    W4A4 on sm_80..sm_89: int4 activations and weights, int4 MMA.
  I4W8  4-bit weights otherwise (W4A4 on Hopper, W4A6, W4A8): int8
        activations, int4 weights widened to int8 in registers, int8 MMA.

Load-time layout (cached beside the weight per device and mode, never in its
state or checkpoints): K is padded per group so every group starts on an MMA
k-step (group i covers padded columns [i*gp, i*gp + g), zeros up to
(i+1)*gp) and the row ends on a multiple of two k-steps. For the common
shapes (K a multiple of 64, group 128 or one group per row) the padded layout
is the canonical one and the stored tensor is used as is. Scales are kept as
fp32 [G, N].

Per-channel 8-bit-storage weights at large M can instead take the integer
product from ``torch._int_mm`` (cuBLASLt) followed by the same epilogue:
both routes give the same bits (see ``INT_MM_MIN_M``).

On Hopper, mode I8 (6- and 8-bit weights) can run on the warpgroup-MMA GEMM
(csrc/int_act_sm90_kernel.cu, ``path="wgmma"``): 128-token tiles, operands
read by wgmma straight from 128-byte-swizzled shared memory, the same exact
int32 sums and epilogue, hence the same bits. It is registered as the opt-in
kernel ``cuda.int_act_wgmma`` (``VLMKERN_ENABLE``) until it has passed the
GPU tests, and needs a build with sm_90a code (``TORCH_CUDA_ARCH_LIST``
holding ``9.0a``; ``sm90_available`` probes it).

``path="tma"`` (Hopper, 6/8-bit weights with one group per row) runs the
warp-specialized, persistent GEMM of csrc/int_act_sm90_tma_kernel.cu: TMA
copies, one producer and two consumer warpgroups, the weight tile multicast
to a cluster of two thread blocks, as many clusters as the GPU holds walking
the tiles; same sums and epilogue, same bits. It is the opt-in
kernel ``cuda.int_act_tma`` until it has passed the GPU tests.

``path="spread"`` (M <= 64) runs the mma.sync GEMM with its activation reads
spread: token rows past M are zero-filled instead of re-reading the last
row, and with one weight group per row each thread block starts its K walk
at its own k-tile, so the blocks stop reading the same activation bytes at
once (a suspect for W8A8 measuring 2x slower at M = 1 than at M = 16 with the
same tiles). The int32 sums are exact, so the bits are the same. It is the
kernel ``cuda.int_act_spread``, which ``ops.linear`` picks for M <= 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.intact import IntActWeight, int32_overflow_reason
from ..formats.packing import pack_int4_pairs
from .backends import device_sm
from .cuda_common import (
    LayoutCache,
    aligned16,
    check_activations,
    dense_rows,
    require_op,
)

MODE_I8, MODE_I4, MODE_I4W8 = 0, 1, 2
K_STEP = {MODE_I8: 32, MODE_I4: 64, MODE_I4W8: 32}
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BIAS_DTYPES = ACT_DTYPES
# M from which per-channel int8-storage weights use torch._int_mm + the
# epilogue kernel on sm_90+ (None: never). Which route is faster is a
# benchmark question; both give the same bits.
INT_MM_MIN_M: int | None = 512
# Smallest M the opt-in wgmma kernel takes: its tiles hold 128 tokens.
WGMMA_MIN_M = 64
GEMM_MMA, GEMM_WGMMA, GEMM_MMA_SPREAD, GEMM_TMA = 0, 1, 2, 3   # vlmkern_int_act_gemm_kind
PATHS = ("auto", "mma", "int_mm", "wgmma", "spread", "tma")
# Largest M the spread GEMM runs (its two decode tile shapes); above it the
# plain mma.sync GEMM runs.
SPREAD_MAX_M = 64
# Largest M for which ops.linear picks the spread GEMM: on an H100, W8A8 at
# M = 1 ran 1.78x (3584x37888) and 1.30x (3584x4608) faster than the plain
# GEMM, and 0.93-1.00x at M = 16 and 64 (benchmarks/results/promote_H100.md).
# M <= 8 runs the same tiles as M = 1.
SPREAD_SELECT_MAX_M = 8
# Smallest M from which ops.linear leaves weights stored as int8 (6/8 bits) on
# Hopper to triton.int_act when that kernel can take the call. At M = 4096 on
# an H100, W8A8 ran 1.58x (3584x37888) and 1.76x (3584x4608) faster there than
# here (torch._int_mm + epilogue; benchmarks/results/linear_H100_cuda.md). At
# M = 64 each won on one shape; 1024 is where both shapes are well past the
# int8 compute-bound point. M = 65..4095 is not yet timed.
TRITON_PREFILL_MIN_M = 1024
# Most token rows one GEMM call takes (VLMKERN_INT_ACT_MAX_M in int_act.h: a
# 128-token tile per grid row, at most 65535 rows); larger calls go elsewhere.
GEMM_MAX_M = 128 * 65535
_GEMM_OF_PATH = {"wgmma": GEMM_WGMMA, "spread": GEMM_MMA_SPREAD, "tma": GEMM_TMA}
# Smallest M the opt-in TMA GEMM is selected for: a cluster covers 256 tokens.
TMA_MIN_M = 129


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_mode(w_bits: int, a_bits: int, sm: tuple[int, int]) -> int:
    """The MMA a width combination runs on for a device of capability ``sm``."""
    if w_bits != 4:
        return MODE_I8
    return MODE_I4 if a_bits == 4 and sm[0] < 9 else MODE_I4W8


@dataclass(frozen=True)
class PaddedLayout:
    """Where logical column k sits in the kernel's padded K (see module doc)."""

    in_features: int
    group: int        # logical group size g (in_features for one group per row)
    group_pad: int    # gp: g rounded up to the MMA k-step
    groups: int
    k_pad: int        # padded row length, a multiple of two k-steps

    def positions(self, device=None) -> torch.Tensor:
        """Padded position of every logical column: int64 [K]."""
        k = torch.arange(self.in_features, device=device)
        return (k // self.group) * self.group_pad + k % self.group

    @property
    def is_identity(self) -> bool:
        return self.k_pad == self.in_features and (self.groups == 1 or
                                                    self.group == self.group_pad)


def padded_layout(in_features: int, group_size: int | None, mode: int) -> PaddedLayout:
    step = K_STEP[mode]
    g = in_features if group_size is None or group_size >= in_features else int(group_size)
    gp = _cdiv(g, step) * step
    groups = _cdiv(in_features, g)
    k_pad = _cdiv(groups * gp, 2 * step) * 2 * step
    return PaddedLayout(in_features, g, gp, groups, k_pad)


def pad_columns(codes: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
    """Signed codes [R, K] -> int8 [R, k_pad] in the padded layout (zeros elsewhere)."""
    out = torch.zeros(codes.shape[0], layout.k_pad, dtype=torch.int8, device=codes.device)
    out[:, layout.positions(codes.device)] = codes.to(torch.int8)
    return out


@dataclass(frozen=True)
class KernelWeight:
    layout: PaddedLayout
    mode: int
    w: torch.Tensor          # int8 [N, k_pad] (I8) or int4 pairs [N, k_pad/2]
    w_scale_t: torch.Tensor  # fp32 [G, N]


def to_kernel_weight(qweight: IntActWeight, mode: int) -> KernelWeight:
    """Re-lay ``qweight`` out for ``mode`` (pure torch, any device)."""
    layout = padded_layout(qweight.in_features, qweight.group_size, mode)
    four_bit = mode in (MODE_I4, MODE_I4W8)
    if four_bit != (qweight.w_bits == 4):
        raise ValueError(f"mode {mode} does not match {qweight.w_bits}-bit weights")
    if layout.is_identity and (not four_bit or qweight.in_features % 2 == 0):
        w = aligned16(qweight.qweight.contiguous())     # already the kernel's layout
    else:
        padded = pad_columns(qweight.codes(), layout)
        w = pack_int4_pairs(padded) if four_bit else padded
    w_scale_t = qweight.scales.float().t().contiguous()
    return KernelWeight(layout, mode, w, w_scale_t)


# -- cache: one layout per weight, device and mode -------------------------------------
_LAYOUTS = LayoutCache()


def kernel_weight(qweight: IntActWeight, mode: int) -> KernelWeight:
    """The weight in the layout of ``mode``, made on first use and cached."""
    return _LAYOUTS.get(qweight, (qweight.device, mode), lambda: to_kernel_weight(qweight, mode))


# -- limits -------------------------------------------------------------------------
def overflow_reason(qweight: IntActWeight) -> str | None:
    """int32 accumulators hold one group's sum: refuse what could overflow them."""
    layout = padded_layout(qweight.in_features, qweight.group_size, MODE_I8)
    widen = 16 if qweight.w_bits == 4 else 1     # I4W8 multiplies weights by 16
    return int32_overflow_reason(qweight.a_bits, qweight.w_bits, layout.group, widen)


def _require_ops() -> None:
    require_op("cuda.int_act", "int_act_gemm", "csrc/int_act_kernel.cu")


_SM90: dict[int, bool] = {}


def sm90_available(device: torch.device) -> bool:
    """Whether the wgmma GEMM runs on ``device`` with this build (sm_90 and
    sm_90a code present). One probe launch per device, then cached."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM90:
        if torch.cuda.is_current_stream_capturing():
            # the probe allocates and waits, which would invalidate the capture
            raise RuntimeError("vlmkern: whether this build runs the sm_90a kernels is found out "
                               "by a first call outside CUDA-graph capture; run the model once "
                               "before capturing it")
        _require_ops()
        if not hasattr(torch.ops.vlmkern, "int_act_sm90_available"):
            _SM90[idx] = False
        else:
            with torch.cuda.device(idx):
                _SM90[idx] = bool(torch.ops.vlmkern.int_act_sm90_available())
    return _SM90[idx]


def _use_int_mm(path: str, kw: KernelWeight, m: int, n: int, sm: tuple[int, int]) -> bool:
    if path in ("mma", "wgmma", "spread", "tma") or kw.mode != MODE_I8 or kw.layout.groups != 1:
        return False
    fits = m > 16 and n % 8 == 0 and kw.layout.k_pad % 8 == 0
    if path == "int_mm":
        if not fits:
            raise ValueError(f"path='int_mm' needs one group per row, M > 16 and N % 8 == 0 "
                             f"(got M={m}, N={n}, {kw.layout.groups} groups)")
        return True
    return fits and sm >= (9, 0) and INT_MM_MIN_M is not None and m >= INT_MM_MIN_M


def int_act_matmul(x: torch.Tensor, qweight: IntActWeight, bias: torch.Tensor | None = None,
                   *, path: str = "auto") -> torch.Tensor:
    """y = x @ (dequantized W)^T + bias with per-token quantized activations and
    exact integer accumulation (the semantics of reference.int_act_matmul).

    x [M, K] float16/bfloat16/float32 on a CUDA device; bias [N] (any of those
    dtypes) or None -> [M, N] in x's dtype. ``path``: "auto", "mma" (always the
    mma.sync GEMM), "int_mm" (torch._int_mm + epilogue; per-channel int8 only),
    "wgmma" (the Hopper GEMM; 6/8-bit weights, sm_90a builds), "tma" (the
    warp-specialized Hopper GEMM; 6/8-bit weights with one group per row, sm_90a
    builds) or "spread" (the mma.sync GEMM with spread activation reads; same
    bits; M <= 64).
    """
    _require_ops()
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    check_activations("cuda.int_act", x, qweight, ACT_DTYPES)
    why = overflow_reason(qweight)
    if why:
        raise ValueError(f"cuda.int_act: {why}")
    m, n = x.shape[0], qweight.out_features
    if m == 0:
        return x.new_empty(0, n)
    if bias is not None:
        if bias.dtype not in BIAS_DTYPES:
            bias = bias.float()
        bias = bias.contiguous()
    x = dense_rows(x)
    sm = device_sm(x.device)
    kw = kernel_weight(qweight, kernel_mode(qweight.w_bits, qweight.a_bits, sm))
    if path in ("wgmma", "tma"):
        why = _wgmma_reason(kw.mode, x.device)
        if why is None and path == "tma" and kw.layout.groups != 1:
            why = f"needs one weight group per row, got {kw.layout.groups} groups"
        if why:
            raise ValueError(f"path={path!r}: {why}")
    lay = kw.layout
    q, sx = torch.ops.vlmkern.int_act_quantize(x, qweight.a_bits, qweight.act_scale, lay.group,
                                               lay.group_pad, lay.k_pad, kw.mode)
    if _use_int_mm(path, kw, m, n, sm):
        acc = torch._int_mm(q, kw.w.t())
        return torch.ops.vlmkern.int_act_scale_int32(acc, sx, kw.w_scale_t[0], bias, x.dtype)
    return torch.ops.vlmkern.int_act_gemm(q, sx, kw.w, kw.w_scale_t, bias, lay.group_pad,
                                          kw.mode, x.dtype, _GEMM_OF_PATH.get(path, GEMM_MMA))


def _wgmma_reason(mode: int, device: torch.device) -> str | None:
    if mode != MODE_I8:
        return "needs weights stored as int8 (6 or 8 bits)"
    if not sm90_available(device):
        return ("needs an sm_90 GPU and a build with sm_90a code "
                "(TORCH_CUDA_ARCH_LIST containing 9.0a)")
    return None


def int_act_wgmma(x: torch.Tensor, qweight: IntActWeight,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``int_act_matmul`` on the Hopper warpgroup-MMA GEMM."""
    return int_act_matmul(x, qweight, bias, path="wgmma")


def int_act_tma(x: torch.Tensor, qweight: IntActWeight,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``int_act_matmul`` on the warp-specialized TMA GEMM (Hopper)."""
    return int_act_matmul(x, qweight, bias, path="tma")


def int_act_spread(x: torch.Tensor, qweight: IntActWeight,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``int_act_matmul`` on the mma.sync GEMM with spread activation reads."""
    return int_act_matmul(x, qweight, bias, path="spread")


def _hopper_reason(name: str, x: torch.Tensor, qweight, one_group: bool) -> str | None:
    """Why the Hopper GEMM ``name`` (wgmma; with ``one_group`` the TMA one,
    per-channel weights only) cannot take the call, or None."""
    why = _check(x, qweight)
    if why is None and one_group and qweight.num_groups != 1:
        why = f"{name}: needs one weight group per row, got group size {qweight.group_size}"
    if why is None and x.is_cuda:
        why = _wgmma_reason(kernel_mode(qweight.w_bits, qweight.a_bits, device_sm(x.device)),
                            x.device)
        why = None if why is None else f"{name}: {why}"
    return why


def _check_wgmma(x: torch.Tensor, qweight) -> str | None:
    return _hopper_reason("cuda.int_act_wgmma", x, qweight, one_group=False)


def _check_tma(x: torch.Tensor, qweight) -> str | None:
    return _hopper_reason("cuda.int_act_tma", x, qweight, one_group=True)


def _check(x: torch.Tensor, qweight) -> str | None:
    why = overflow_reason(qweight)
    return None if why is None else f"cuda.int_act: {why}"


def _check_plain(x: torch.Tensor, qweight) -> str | None:
    return _check(x, qweight) or _prefill_on_triton(x, qweight)


def _prefill_on_triton(x: torch.Tensor, qweight) -> str | None:
    """Why cuda.int_act leaves this prefill call to triton.int_act (see
    TRITON_PREFILL_MIN_M), or None. Never when VLMKERN_BACKEND=cuda forces
    this backend or when the Triton kernel cannot run the call."""
    from .backends import BACKENDS, forced_backend

    m = x.shape[0]
    if m < TRITON_PREFILL_MIN_M or device_sm(x.device)[0] != 9:
        return None
    if kernel_mode(qweight.w_bits, qweight.a_bits, (9, 0)) != MODE_I8 or forced_backend() == "cuda":
        return None
    triton = BACKENDS.get("triton")
    if triton is None or not triton.status()[0]:
        return None
    spec, _ = triton.find("int_act", x, qweight)
    if spec is None or spec.name not in ("triton.int_act", "triton.int_act_tma"):
        return None
    return (f"cuda.int_act: M={m} >= {TRITON_PREFILL_MIN_M} on sm_90 with int8-stored weights "
            f"runs on {spec.name} (faster there at prefill)")


def register(backend) -> None:
    """Add the kernels to the CUDA backend (idempotent). The staged decode
    kernel (M <= 32) and the Hopper GEMM come first but are opt-in
    (``VLMKERN_ENABLE``); the spread GEMM runs M <= 8; on Hopper the plain
    GEMM leaves int8-stored weights at M >= 1024 to Triton."""
    from . import cuda_int_act_staged as staged
    from .backends import KernelSpec

    common = dict(dtypes=frozenset(ACT_DTYPES), devices=frozenset({"cuda"}))
    specs = [KernelSpec("cuda.int_act_staged", "int_act", staged.int_act_staged,
                        bits=frozenset({6, 8}), dtypes=frozenset(staged.ACT_DTYPES),
                        devices=frozenset({"cuda"}), max_m=staged.MAX_M, min_sm=(8, 0),
                        opt_in=True, check=staged.check),
             KernelSpec("cuda.int_act_tma", "int_act", int_act_tma, bits=frozenset({6, 8}),
                        min_sm=(9, 0), min_m=TMA_MIN_M, opt_in=True, check=_check_tma, **common),
             KernelSpec("cuda.int_act_wgmma", "int_act", int_act_wgmma, bits=frozenset({6, 8}),
                        min_sm=(9, 0), min_m=WGMMA_MIN_M, opt_in=True, check=_check_wgmma,
                        **common),
             KernelSpec("cuda.int_act_spread", "int_act", int_act_spread,
                        bits=frozenset({4, 6, 8}), min_sm=(8, 0), max_m=SPREAD_SELECT_MAX_M,
                        check=_check, **common),
             KernelSpec("cuda.int_act", "int_act", int_act_matmul, bits=frozenset({4, 6, 8}),
                        min_sm=(8, 0), max_m=GEMM_MAX_M, check=_check_plain, **common)]
    known = {k.name for k in backend.kernels}
    for spec in specs:
        if spec.name not in known:
            backend.register(spec)
