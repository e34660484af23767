"""Integer-activation decode on the weight-only kernel's pipeline
(csrc/weight_only_kernel.cu, integer decode; ``cuda.int_act_staged``, opt-in).

Weights stored as int8 (W8A8, W6A6 and other 6/8-bit weights) at decode sizes
(M <= 32): the same per-token quantization pre-kernel as ``cuda.int_act``,
then the weight-only kernel's multi-stage cp.async pipeline and stream-K
split over as many thread blocks as the SMs hold at once (one per SM on an
A100 or H100 at 32 tokens), so that small layers fill the GPU (``cuda.int_act``
gives a 3584 x 4608 layer 36 thread blocks: 0.70x of cuBLAS fp16 at M = 1 on
an H100) and every thread block reads the activations once per unit through
shared memory. int8 MMA (m16n8k32), exact int32 sums per scale slot, each
multiplied by the row's fp32 scale into fp32 sums, then sum * token scale +
bias in one fma. Per weight group (up to 256 codes) the int32 sum is exact,
as in ``cuda.int_act``; with one group per row the fp32 sums are formed per
256 codes and per stream-K part, so results agree with ``cuda.int_act`` to
fp32 rounding, not bit for bit.

Load-time layout (cached beside the weight, never in its state): ``wq`` int32
[NB, C, 8, 1024], per 16-row tile its 16 x 256 codes in m16n8k32 A-fragment
order [8 steps][32 lanes][4 registers][4 bytes] (lane 4g + t, register
r = rh + 2 hh: row g + 8 rh, codes 32 step + 16 hh + 4t + 0..3), from the
padded codes of ``cuda_int_act`` (mode I8); ``sz`` int32 [NB, C, 8, S, 8, 2]:
per slot of 32 << slot_log2 codes the fp32 scales of rows g and g + 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.intact import IntActWeight
from . import cuda_int_act as cia
from .cuda_common import (
    SMEM_RESERVED,
    LayoutCache,
    check_activations,
    dense_rows,
    multiprocessors,
    require_op,
    smem_per_block,
    smem_per_multiprocessor,
)
from .cuda_weight_only import CTAS_PER_SM, _counters

MAX_M = 32
ROWS, CODES = 128, 256        # a unit: 128 rows by 256 codes of K
ACT_DTYPES = (torch.float16, torch.bfloat16)


def smem_bytes(m: int, slot_log2: int) -> int:
    """Dynamic shared memory of a launch, as the kernel's launcher sizes it:
    3 stages, each of 32 KB of weights, 512 bytes per scale slot (8 >> slot_log2
    of them) and 272 bytes per token row of the tile (8, 16 or 32 rows)."""
    rows = 8 if m <= 8 else 16 if m <= 16 else 32
    return 3 * (32768 + 512 * (8 >> slot_log2) + rows * 272)


# At its largest (32 tokens, 8 scale slots) a block needs 137 KB: A100 and
# H100 give a block that much; A10/L4-class GPUs (99 KB) do not.
SMEM_BYTES = smem_bytes(MAX_M, 0)


def launch_ctas(units: int, sms: int, smem_per_sm: int, slot_log2: int) -> int:
    """Thread blocks of one launch: as many as the SMs hold at once (at most
    CTAS_PER_SM each), never more than there are units. A block of this
    kernel leaves room for only one per SM on the A100 and H100; twice that
    many would run as two waves, each paying the pipeline's fill. Sized for
    the largest token tile whatever M is: the split of K over the blocks
    fixes the order of the fp32 sums, so it must not change with M."""
    per_sm = smem_per_sm // (smem_bytes(MAX_M, slot_log2) + SMEM_RESERVED)
    return max(1, min(units, max(1, min(CTAS_PER_SM, per_sm)) * sms))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unsupported_reason(qweight: IntActWeight) -> str | None:
    if qweight.w_bits not in (6, 8):
        return f"{qweight.w_bits}-bit weights are not stored as int8"
    layout = cia.padded_layout(qweight.in_features, qweight.group_size, cia.MODE_I8)
    if layout.groups > 1 and layout.group_pad not in (32, 64, 128, 256):
        return f"group size {qweight.group_size} is not 32, 64, 128 or 256 (or one group per row)"
    return cia.overflow_reason(qweight)


@dataclass(frozen=True)
class StagedWeight:
    wq: torch.Tensor        # int32 [NB, C, 8, 1024]
    sz: torch.Tensor        # int32 [NB, C, 8, S, 8, 2]
    slot_log2: int
    layout: cia.PaddedLayout
    out_features: int


def to_staged_layout(qweight: IntActWeight) -> StagedWeight:
    """Re-lay ``qweight`` out for the kernel (pure torch, any device)."""
    why = unsupported_reason(qweight)
    if why is not None:
        raise ValueError(f"cuda.int_act_staged: {why}")
    kw = cia.to_kernel_weight(qweight, cia.MODE_I8)
    n, lay = qweight.out_features, kw.layout
    nb, c = _cdiv(n, ROWS), _cdiv(lay.k_pad, CODES)
    w = torch.zeros(nb * ROWS, c * CODES, dtype=torch.int8, device=kw.w.device)
    w[:n, :lay.k_pad] = kw.w
    # rows b w rh g, codes c step hh t byte -> b c w step (g t) (hh rh) byte
    w = w.view(nb, 8, 2, 8, c, 8, 2, 4, 4).permute(0, 4, 1, 5, 3, 7, 6, 2, 8)
    wq = w.contiguous().view(nb, c, 8, 4096).view(torch.int32)

    slot_log2 = 3 if lay.groups == 1 else {32: 0, 64: 1, 128: 2, 256: 3}[lay.group_pad]
    slots, width = 8 >> slot_log2, 32 << slot_log2
    first = torch.arange(c, device=w.device).view(c, 1) * CODES + torch.arange(
        slots, device=w.device).view(1, slots) * width
    group = (first // lay.group_pad).clamp(max=lay.groups - 1)        # [C, S]
    scales = torch.zeros(c, slots, nb * ROWS, dtype=torch.float32, device=w.device)
    scales[:, :, :n] = kw.w_scale_t[group]
    scales = scales.view(c, slots, nb, 8, 2, 8).permute(2, 0, 3, 1, 5, 4)   # b c w s g rh
    sz = scales.contiguous().view(torch.int32)
    return StagedWeight(wq, sz, slot_log2, lay, n)


_LAYOUTS = LayoutCache()


def kernel_weight(qweight: IntActWeight) -> StagedWeight:
    """The weight in the kernel's layout, made on first use and cached."""
    return _LAYOUTS.get(qweight, (qweight.device,), lambda: to_staged_layout(qweight))


def int_act_staged(x: torch.Tensor, qweight: IntActWeight,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (dequantized W)^T + bias, per-token quantized activations, on
    the staged pipeline. x [M, K] float16/bfloat16 on a CUDA device,
    M <= 32; bias [N] or None -> [M, N] in x's dtype."""
    require_op("cuda.int_act_staged", "int_act_staged_mma", "csrc/weight_only_kernel.cu")
    check_activations("cuda.int_act_staged", x, qweight, ACT_DTYPES)
    why = unsupported_reason(qweight) or smem_reason(x.device)
    if why:
        raise ValueError(f"cuda.int_act_staged: {why}")
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, qweight.out_features)
    if m > MAX_M:
        raise ValueError(f"cuda.int_act_staged takes M <= {MAX_M}, got {m}")
    if bias is not None:
        bias = (bias if bias.dtype in cia.BIAS_DTYPES else bias.float()).contiguous()
    sw = kernel_weight(qweight)
    lay = sw.layout
    q, sx = torch.ops.vlmkern.int_act_quantize(dense_rows(x), qweight.a_bits, qweight.act_scale,
                                               lay.group, lay.group_pad, lay.k_pad, cia.MODE_I8)
    blocks, chunks = sw.wq.shape[0], sw.wq.shape[1]
    ctas = launch_ctas(blocks * chunks, multiprocessors(x.device),
                       smem_per_multiprocessor(x.device), sw.slot_log2)
    return torch.ops.vlmkern.int_act_staged_mma(q, sx, sw.wq, sw.sz, bias,
                                                _counters(x.device, blocks), sw.out_features,
                                                sw.slot_log2, ctas, x.dtype)


def smem_reason(device: torch.device) -> str | None:
    limit = smem_per_block(device)
    if limit < SMEM_BYTES:
        return f"needs {SMEM_BYTES} bytes of shared memory per thread block, the GPU gives {limit}"
    return None


def check(x: torch.Tensor, qweight) -> str | None:
    why = unsupported_reason(qweight) or (smem_reason(x.device) if x.is_cuda else None)
    return None if why is None else f"cuda.int_act_staged: {why}"
