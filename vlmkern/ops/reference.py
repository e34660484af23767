"""Torch reference ops: the definition every kernel is tested against, and the
fallback that runs anywhere (CPU or GPU, any shape).

All functions take activations ``x`` [M, K] (already flattened) and return
[M, N] in x's dtype. On the CPU the math runs in fp64 (batch-invariant);
on a GPU the dequantized weight feeds cuBLAS in the activation dtype (fp32
accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import BinaryWeight, IntActWeight, QuantizedWeight
from ..formats.groupwise import num_groups
from ..formats.intact import qmax


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # On the CPU: fp64, rounded once to x's dtype. MKL's fp32 GEMM rounds
    # differently for small and large M, so fp32 would make a row's output
    # depend on the batch it is in.
    if x.dtype == torch.float64 or x.device.type == "cpu":
        return torch.float64
    return x.dtype


def _dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dt = w.dtype
    y = F.linear(x.to(dt), w, None if bias is None else bias.to(dt))
    return y.to(x.dtype)


def stored_order_linear(x: torch.Tensor, w: torch.Tensor, perm: torch.Tensor | None,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T + bias in x's dtype for a dense weight w [N, K] whose columns
    are in stored (act-order) order: x's columns are gathered to match."""
    if perm is not None:
        x = x[:, perm.long()]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def weight_only_matmul(x: torch.Tensor, qweight: QuantizedWeight,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a group-wise weight. x [M, K], bias [N] -> [M, N]."""
    return _dense(x, qweight.dequantize(_compute_dtype(x)), bias)


def binary_matmul(x: torch.Tensor, qweight: BinaryWeight,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a binarized weight. x [M, K], bias [N] -> [M, N]."""
    return _dense(x, qweight.dequantize(_compute_dtype(x)), bias)


def quantize_activations(x: torch.Tensor, bits: int, scale: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric activation quantization.

    x [M, K] float. scale None: one scale per token, absmax / (2^(b-1)-1)
    (an all-zero token gets scale 1); else the static per-tensor scale.
    Returns codes int8 [M, K] in [-(2^(b-1)-1), 2^(b-1)-1] and fp32 scales [M].
    A token holding NaN/Inf gets a NaN/Inf scale, so its output row is
    non-finite rather than silently wrong.
    """
    lim = qmax(bits)
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=1)
        # Tensor / tensor: with a Python-number divisor CUDA multiplies by
        # the reciprocal, which can differ from the exact quotient by an ulp.
        s = amax / torch.full_like(amax, lim)
        s = torch.where(s == 0, torch.ones_like(s), s)
    else:
        s = torch.full((x.shape[0],), float(scale), device=x.device)
    q = torch.round(xf / s[:, None]).clamp(-lim, lim)
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8)
    if scale is not None:      # a static scale would hide a NaN/Inf token: poison its scale
        s = torch.where(torch.isfinite(xf).all(dim=1), s, xf.abs().amax(dim=1))
    return q, s


def fake_quant_activations(x: torch.Tensor, bits: int, scale: float | None = None
                           ) -> torch.Tensor:
    """What the integer kernels compute from x: round(x / s) clamped to
    +-(2^(b-1)-1), times s; s per token (absmax / (2^(b-1)-1), 1 for an
    all-zero token) or the static ``scale``. Same arithmetic as
    ``quantize_activations`` (x rounded to fp32 first, fp32 scales), but for
    any bits (no int8 codes) and any leading shape. x [..., K] -> x's dtype."""
    if not isinstance(bits, int) or not 2 <= bits <= 24:
        raise ValueError(f"bits must be an int in 2..24, got {bits!r}")
    lim = (1 << (bits - 1)) - 1
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        s = amax / torch.full_like(amax, lim)   # exact quotient on CUDA too, as above
        s = torch.where(s == 0, torch.ones_like(s), s)
    else:
        s = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    q = torch.round(xf / s).clamp(-lim, lim)
    return (q.double() * s.double()).to(x.dtype)   # q * s is exact in fp64


def int_dot(qx: torch.Tensor, qw: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Exact integer dot products per weight group.

    qx [M, K] int8, qw [N, K] int8 -> int64 [M, N, G]. Runs in fp64, which is
    exact here: every partial sum is an integer below 2^53 in magnitude. (The
    kernels sum in int32 and decline groups whose sums could overflow it.)
    """
    m, k = qx.shape
    n = qw.shape[0]
    g = k if group_size is None else group_size
    groups = num_groups(k, group_size)
    pad = groups * g - k
    a = F.pad(qx.double(), (0, pad)).reshape(m, groups, g)
    b = F.pad(qw.double(), (0, pad)).reshape(n, groups, g)
    return torch.einsum("mgk,ngk->mng", a, b).to(torch.int64)


def int_act_matmul(x: torch.Tensor, qweight: IntActWeight,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Integer-activation matmul: per-token activation quantization, exact integer
    accumulation per weight group, epilogue y = s_x[m] * sum_g s_w[n, g] * acc.

    x [M, K], bias [N] -> [M, N] in x's dtype. The epilogue runs in fp64 so the
    result equals the fake-quant product (s_x q_x) @ (s_w q_w)^T to fp64
    rounding (bitwise when the scales are powers of two).
    """
    qx, sx = quantize_activations(x, qweight.a_bits, qweight.act_scale)
    acc = int_dot(qx, qweight.codes(), qweight.group_size)
    y = (acc.double() * qweight.scales.double()[None]).sum(dim=2) * sx.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def fake_quant_int_act(x: torch.Tensor, qweight: IntActWeight,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fake-quant formulation of :func:`int_act_matmul`, in fp64."""
    qx, sx = quantize_activations(x, qweight.a_bits, qweight.act_scale)
    xq = qx.double() * sx.double()[:, None]
    y = xq @ qweight.dequantize(torch.float64).T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
