"""Binarized (BiLLM-style) weights as a lookup-table GEMM
(csrc/binary_lut_kernel.cu, ``cuda.binary_lut``).

Every weight of a row and 128-column block takes one of 8 values: for an
ordinary column ``mu_t + alpha_t * s`` (t = the aux bit), for a salient one
``mu1 + alpha1 * s + mu2 + alpha2 * a``; in both cases the index is
``i = s + 2a`` of the weight's sign and aux bits (1 = set). So the kernel
decodes a weight with byte permutes from a per-row table, like a 2-bit
weight-only kernel, and runs one MMA per k16 step and 8 tokens, where the
plane GEMM (``cuda.binary``) runs three per 4 tokens.

Load-time layout (block size 128 = one chunk; rows padded to blocks of 128,
columns to chunks of 128; tiles and lanes as in ``cuda_weight_only``: lane
``4g + t`` holds A-fragment register ``r`` of k16 step ``kt``, the pair at
row ``g + 8*(r % 2)``, columns ``16kt + 2t + 8*(r // 2) + (0, 1)``):

* ``codes`` int32 [NB, C, 8, 128]: per tile [32 lanes][4 words]; word
  ``kt // 2`` holds pair ``j = 4*(kt % 2) + r``: index ``i_0`` at bit
  ``2*(j % 4) + 16*(j // 4)``, ``i_1`` 8 bits above. Then
  ``sel = ((word >> shift) & 0x0303) * 0x22 + 0x1010`` is the PRMT selector
  of the pair's two 16-bit table entries.
* ``tables`` int32 [NB, C, 8, 8 g, 2 rh, 4]: for row ``g + 8*rh``: words 0-1
  the ordinary table, entries 0..3 as 16-bit patterns of the activation
  dtype (entry e in bytes 2e, 2e+1), words 2-3 the salient table. Each entry
  is the format's ``dequantize()`` value (fp32, rounded once), so the kernel's
  weights are the reference's bit for bit.
* ``merge`` int32 [C, 32, 8]: per chunk and lane, word ``kt``: the PRMT
  selector that takes each half of the pair from the ordinary (0x3210) or the
  salient (+0x44 per half) result, for columns ``16kt + 2t + (0, 1)`` in the
  low 16 bits and ``16kt + 8 + 2t + (0, 1)`` in the high 16. Salient flags
  are per column, so one ``merge`` serves every row.

The layout is as large as the format's planes and statistics and is cached
beside the weight (not in its state), like the other kernels' layouts.
``emulate_dequantize`` decodes it with the kernel's operations in torch.

``cuda.binary_lut_tma`` (opt-in, M >= 17, Hopper) runs the same layout and
decode on the warp-specialized kernel of csrc/weight_only_sm90_tma_kernel.cu
(TMA token tiles of 64 or 128 tokens shared by a cluster of two thread
blocks, register-operand wgmma, K slices for small layers), instead of
writing the dense weight for a GEMM at prefill or re-reading activations
per warp at batch sizes. ``cuda.binary_lut_tma_decode`` (opt-in, M <= 16)
is the same kernel's decode path: a 16-token tile, as many stages as fit and
a stream-K split whose split row blocks are summed inside the kernel (see
``cuda_weight_only_sm90``).

``cuda.binary_lut_staged`` (opt-in) runs the same layout on the weight-only
kernel's pipeline (csrc/weight_only_kernel.cu, table decode): codes, tables
and merge selectors go through a multi-stage cp.async pipeline and the
activations through shared memory (ldmatrix, read once per thread block and
chunk instead of once per warp from global memory), with the weight-only
kernel's stream-K split. It is for batches (M = 16..64), where the plain
kernel's per-warp activation loads grow with the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.binary import BinaryWeight, block_values
from ..formats.packing import unpack_bits
from . import reference
from .cuda_common import (
    LayoutCache,
    aligned16,
    check_activations,
    multiprocessors,
    require_op,
)
from .cuda_weight_only import (
    _counters,
    _lane_codes,
    aligned_inputs,
    num_ctas_for,
    row_block_slices,
)
from .cuda_weight_only_sm90 import DECODE_MAX_M, decode_clusters_for, tma_splits_for

BLOCK = 128               # the only block size the layout takes: one chunk
MAX_M = 64
TMA_MIN_M = 17            # cuda.binary_lut_tma: batches and prefill
ACT_DTYPES = (torch.float16, torch.bfloat16)
_IDENTITY = 0x3210        # PRMT selector: the first operand as it is
_SALIENT_HALF = (0x0044, 0x4400)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unsupported_reason(qweight: BinaryWeight) -> str | None:
    if qweight.block_size != BLOCK:
        return f"block_size {qweight.block_size} unsupported (the table layout takes {BLOCK})"
    return None


@dataclass(frozen=True, eq=False)
class LutWeight:
    """A binary weight in the lookup-table kernel's layout."""

    codes: torch.Tensor     # int32 [NB, C, 8, 128]
    tables: torch.Tensor    # int32 [NB, C, 8, 8, 2, 4]
    merge: torch.Tensor     # int32 [C, 32, 8]
    out_features: int
    in_features: int
    dtype: torch.dtype      # activation dtype of the table entries


def _bits16(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _index_shifts(device) -> torch.Tensor:
    """Bit position of pair r's index h in its code word, by [kt % 2, r, h]."""
    return (2 * torch.arange(4, device=device).view(1, 4, 1)
            + 16 * torch.arange(2, device=device).view(2, 1, 1)
            + 8 * torch.arange(2, device=device).view(1, 1, 2))


def _lut_codes(sign: torch.Tensor, aux: torch.Tensor, k: int, nb: int, c: int) -> torch.Tensor:
    """Packed sign and aux rows of ``nb`` row blocks (the last may be short)
    -> their ``codes`` int32 [nb, C, 8, 128]."""
    index = unpack_bits(sign, 1, k) + 2 * unpack_bits(aux, 1, k)
    index = torch.nn.functional.pad(index, (0, c * BLOCK - k, 0, nb * BLOCK - index.shape[0]))
    lane = _lane_codes(index, nb, c).reshape(nb, c, 8, 32, 4, 2, 4, 2)   # ... lane v kt%2 r h
    words = (lane << _index_shifts(index.device)).sum(dim=(-1, -2, -3))
    return _as_int32(words).reshape(nb, c, 8, 128)


def lut_codes(qweight: BinaryWeight) -> torch.Tensor:
    """The ``codes`` of a binary weight's sign and aux planes, int32 [NB, C, 8, 128]."""
    n, k = qweight.shape
    nb, c = _cdiv(n, BLOCK), _cdiv(k, BLOCK)
    codes = torch.empty(nb, c, 8, 128, dtype=torch.int32, device=qweight.sign.device)
    for b0, b1 in row_block_slices(nb, c):
        codes[b0:b1] = _lut_codes(qweight.sign[b0 * BLOCK: b1 * BLOCK],
                                  qweight.aux[b0 * BLOCK: b1 * BLOCK], k, b1 - b0, c)
    return codes


def lut_index(codes: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The inverse of ``lut_codes`` for row blocks of ``codes``: each weight's
    table index s + 2a, int64 [rows, K] (padding dropped)."""
    nb, c = codes.shape[0], codes.shape[1]
    # int32 shifts (the mask drops the copies of bit 31 an arithmetic shift
    # brings in), then one byte per index through the permutation
    words = codes.reshape(nb, c, 8, 32, 4, 1, 1, 1)
    lane = ((words >> _index_shifts(codes.device).to(torch.int32)) & 3).to(torch.uint8)
    lane = lane.reshape(nb, c, 8, 8, 4, 8, 2, 2, 2)                         # b c w g t kt ch rh h
    index = lane.permute(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(nb * BLOCK, c * BLOCK)
    return index[:rows, :k].to(torch.int64)


def lut_tables(stats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``tables`` of a binary weight's statistics [N, blocks, 8] for
    activations of ``dtype``, int32 [NB, C, 8, 8, 2, 4]."""
    n, c = stats.shape[0], stats.shape[1]
    nb = _cdiv(n, BLOCK)
    values = _bits16(block_values(stats), dtype)                           # [N, C, 8]
    values = torch.nn.functional.pad(values, (0, 0, 0, 0, 0, nb * BLOCK - n))
    values = values.reshape(nb, 8, 2, 8, c, 8).permute(0, 4, 1, 3, 2, 5)    # b c w g rh e
    return _as_int32(values[..., 0::2] | (values[..., 1::2] << 16)).contiguous()


def lut_merge(salient: torch.Tensor, k: int) -> torch.Tensor:
    """The ``merge`` selectors of a binary weight's packed salient flags, int32 [C, 32, 8]."""
    c = _cdiv(k, BLOCK)
    flags = torch.nn.functional.pad(unpack_bits(salient, 1, k), (0, c * BLOCK - k))
    flags = flags.reshape(c, 8, 2, 4, 2)                                    # c kt ch t h
    half = torch.tensor(_SALIENT_HALF, device=salient.device)
    sel = _IDENTITY + (flags * half).sum(dim=-1)                            # c kt ch t
    word = sel[:, :, 0] | (sel[:, :, 1] << 16)                              # c kt t
    merge = word.permute(0, 2, 1).unsqueeze(1).expand(c, 8, 4, 8).reshape(c, 32, 8)
    return _as_int32(merge).contiguous()


def to_lut_layout(qweight, dtype: torch.dtype) -> LutWeight:
    """Re-lay a binary weight out for the kernel with tables in ``dtype``
    (pure torch, any device). A weight already held in the layout
    (``LaidOutBinaryWeight``) keeps its codes; only tables and selectors are made."""
    why = unsupported_reason(qweight)
    if why is not None:
        raise ValueError(f"cuda.binary_lut: {why}")
    if dtype not in ACT_DTYPES:
        raise ValueError(f"cuda.binary_lut: activations must be float16 or bfloat16, got {dtype}")
    n, k = qweight.shape
    codes = aligned16(qweight.codes) if getattr(qweight, "LAID_OUT", False) else lut_codes(qweight)
    return LutWeight(codes, lut_tables(qweight.stats, dtype), lut_merge(qweight.salient, k),
                     n, k, dtype)


# -- the kernel's decode, emulated in torch ----------------------------------------------
def _prmt(a: torch.Tensor, b: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """PTX prmt.b32 (default mode) on uint32 values held in int64: byte i of
    the result is byte ``nibble_i(sel)`` of the 8 bytes {b:a}."""
    out = torch.zeros_like(a)
    for i in range(4):
        nib = (sel >> (4 * i)) & 0x7
        byte = torch.where(nib < 4, (a >> (8 * (nib & 3))) & 0xFF, (b >> (8 * (nib & 3))) & 0xFF)
        out = out | (byte << (8 * i))
    return out


def emulate_dequantize(lw: LutWeight) -> torch.Tensor:
    """The weight [N, K] in ``lw.dtype`` as the kernel's A fragments hold it,
    decoded with its shifts, masks, multiply-add and byte permutes."""
    nb, c = lw.codes.shape[0], lw.codes.shape[1]
    words = lw.codes.to(torch.int64).reshape(nb, c, 8, 32, 4) & 0xFFFFFFFF     # b c w lane v
    tab = lw.tables.to(torch.int64) & 0xFFFFFFFF                               # b c w g rh 4
    tab = tab[:, :, :, torch.arange(32) // 4]                                 # b c w lane rh 4
    merge = (lw.merge.to(torch.int64) & 0xFFFFFFFF).view(1, c, 1, 32, 8)      # . c . lane kt
    regs = []
    for kt in range(8):
        for r in range(4):
            j = 4 * (kt % 2) + r
            code = (words[..., kt // 2] >> (2 * (j % 4) + 16 * (j // 4))) & 0x0303
            sel = code * 0x22 + 0x1010
            t = tab[..., r % 2, :]
            ordinary = _prmt(t[..., 0], t[..., 1], sel)
            salient = _prmt(t[..., 2], t[..., 3], sel)
            pick = (merge[..., kt] >> (16 * (r // 2))) & 0xFFFF
            regs.append(_prmt(ordinary, salient, pick))
    pairs = torch.stack(regs, dim=-1).reshape(nb, c, 8, 32, 8, 4)             # b c w lane kt r
    halves = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=-1)                # ... r h
    w = torch.where(halves >= 0x8000, halves - 0x10000, halves).to(torch.int16).view(lw.dtype)
    w = w.reshape(nb, c, 8, 8, 4, 8, 2, 2, 2)                                 # b c w g t kt ch rh h
    w = w.permute(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(nb * BLOCK, c * BLOCK)
    return w[:lw.out_features, :lw.in_features]


# -- cached layout and the op ----------------------------------------------------------
_LAYOUTS = LayoutCache()


def kernel_weight(qweight: BinaryWeight, dtype: torch.dtype) -> LutWeight:
    """The weight in the kernel's layout for ``dtype``, made on first use and cached."""
    return _LAYOUTS.get(qweight, (qweight.device, dtype), lambda: to_lut_layout(qweight, dtype))


CTAS_PER_SM = 2           # __launch_bounds__(256, 2) of the kernel up to 32 tokens
MIN_WAVE_USE = 0.9


def choose_ksplit(row_blocks: int, chunks: int, multiprocessors: int) -> int:
    """K parts, from the weight's shape and the device only (never from M,
    so a token's result does not depend on its batch). Every thread block
    streams its whole K part, so a last wave of few blocks leaves most SMs
    idle for a whole block's time (296 row blocks on 264 slots: 56% use):
    take the fewest parts, each at least 2 chunks, whose waves are at least
    90% full, else the best filled."""
    slots = CTAS_PER_SM * multiprocessors
    best, best_use = 1, 0.0
    for parts in range(1, max(1, chunks // 2) + 1):
        blocks = row_blocks * parts
        use = blocks / (_cdiv(blocks, slots) * slots)
        if use >= MIN_WAVE_USE:
            return parts
        if use > best_use:
            best, best_use = parts, use
    return best


def _inputs(kernel: str, op: str, source: str, x: torch.Tensor, qweight: BinaryWeight,
            bias: torch.Tensor | None, max_m: int | None = MAX_M):
    """The checks the table kernels make; (layout, x, bias) as they take them,
    or None for an empty batch."""
    require_op(kernel, op, source)
    check_activations(kernel, x, qweight, ACT_DTYPES)
    why = unsupported_reason(qweight)
    if why:
        raise ValueError(f"{kernel}: {why}")
    if max_m is not None and x.shape[0] > max_m:
        raise ValueError(f"{kernel} takes M <= {max_m}, got {x.shape[0]}")
    if x.shape[0] == 0:
        return None
    return (kernel_weight(qweight, x.dtype), *aligned_inputs(x, bias))


def binary_lut(x: torch.Tensor, qweight: BinaryWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a BinaryWeight of block size 128 on the table
    kernel. x [M, K] float16/bfloat16 on a CUDA device, 1 <= M <= 64; bias [N]
    or None -> [M, N] in x's dtype."""
    ready = _inputs("cuda.binary_lut", "binary_lut_mma", "csrc/binary_lut_kernel.cu", x, qweight,
                    bias)
    if ready is None:
        return x.new_empty(0, qweight.out_features)
    lw, x, bias = ready
    ksplit = choose_ksplit(lw.codes.shape[0], lw.codes.shape[1], multiprocessors(x.device))
    return torch.ops.vlmkern.binary_lut_mma(x, lw.codes, lw.tables, lw.merge, bias,
                                            lw.out_features, ksplit)


def binary_lut_staged(x: torch.Tensor, qweight: BinaryWeight,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product on the staged pipeline (``cuda.binary_lut_staged``):
    same arguments and layout; a token's result depends on the weight's shape
    and the device only (the stream-K split), never on M."""
    ready = _inputs("cuda.binary_lut_staged", "binary_lut_staged_mma", "csrc/weight_only_kernel.cu",
                    x, qweight, bias)
    if ready is None:
        return x.new_empty(0, qweight.out_features)
    lw, x, bias = ready
    blocks, chunks = lw.codes.shape[0], lw.codes.shape[1]
    ctas = num_ctas_for(blocks * chunks, multiprocessors(x.device))
    return torch.ops.vlmkern.binary_lut_staged_mma(x, lw.codes, lw.tables, lw.merge, bias,
                                                   _counters(x.device, blocks), lw.out_features,
                                                   ctas)


def binary_lut_tma(x: torch.Tensor, qweight: BinaryWeight,
                   bias: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """The same product on the warp-specialized Hopper kernel
    (``cuda.binary_lut_tma``, for M > 16): same arguments and layout, any M;
    ``splits``: K slices (default ``tma_splits_for``, as for weight-only
    layers). A token's result depends only on its place in its token tile,
    the tile width and the slice count."""
    why = _tma_reason(x.device)
    if why:
        raise ValueError(f"cuda.binary_lut_tma: {why}")
    ready = _inputs("cuda.binary_lut_tma", "binary_lut_tma", "csrc/weight_only_sm90_tma_kernel.cu",
                    x, qweight, bias, max_m=None)
    if ready is None:
        return x.new_empty(0, qweight.out_features)
    lw, x, bias = ready
    if splits is None:
        splits = tma_splits_for(x.shape[0], lw.out_features, lw.codes.shape[1],
                                multiprocessors(x.device))
    return torch.ops.vlmkern.binary_lut_tma(x, lw.codes, lw.tables, lw.merge, bias,
                                            lw.out_features, int(splits))


def binary_lut_tma_decode(x: torch.Tensor, qweight: BinaryWeight,
                          bias: torch.Tensor | None = None,
                          max_clusters: int | None = None) -> torch.Tensor:
    """The same product on the warp-specialized Hopper kernel's decode path
    (``cuda.binary_lut_tma_decode``): same arguments and layout, M <= 16;
    ``max_clusters`` as for ``weight_only_tma_decode``."""
    why = _tma_reason(x.device, "binary_lut_tma_decode")
    if why:
        raise ValueError(f"cuda.binary_lut_tma_decode: {why}")
    ready = _inputs("cuda.binary_lut_tma_decode", "binary_lut_tma_decode",
                    "csrc/weight_only_sm90_tma_kernel.cu", x, qweight, bias, max_m=DECODE_MAX_M)
    if ready is None:
        return x.new_empty(0, qweight.out_features)
    lw, x, bias = ready
    if max_clusters is None:
        max_clusters = decode_clusters_for(multiprocessors(x.device))
    return torch.ops.vlmkern.binary_lut_tma_decode(
        x, lw.codes, lw.tables, lw.merge, bias, _counters(x.device, lw.codes.shape[0]),
        lw.out_features, int(max_clusters))


def dequantize_layout(qweight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (float16 or bfloat16) from the
    lookup-table layout (csrc/binary_dequant_kernel.cu): ``dequantize(dtype)``
    bit for bit; K a multiple of 8."""
    require_op("cuda.binary_lut_dequant_cublas", "binary_lut_dequant",
               "csrc/binary_dequant_kernel.cu")
    why = unsupported_reason(qweight) or _dequant_reason(qweight)
    if why:
        raise ValueError(f"cuda.binary_lut_dequant_cublas: {why}")
    if dtype not in ACT_DTYPES:
        raise ValueError(f"cuda.binary_lut_dequant_cublas: dtype must be float16 or bfloat16, "
                         f"got {dtype}")
    lw = kernel_weight(qweight, dtype)
    return torch.ops.vlmkern.binary_lut_dequant(lw.codes, lw.tables, qweight.salient.contiguous(),
                                                lw.out_features, lw.in_features, dtype)


def binary_lut_dequant_cublas(x: torch.Tensor, qweight, bias: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """y = x @ W^T + bias at prefill sizes for a weight held in the table
    layout (``LaidOutBinaryWeight``): the dense weight from the layout, then
    one cuBLAS GEMM."""
    check_activations("cuda.binary_lut_dequant_cublas", x, qweight, ACT_DTYPES)
    return reference.stored_order_linear(x, dequantize_layout(qweight, x.dtype), None, bias)


def _dequant_reason(qweight) -> str | None:
    if qweight.in_features % 8:
        return f"in_features must be a multiple of 8, got {qweight.in_features}"
    return None


def _check_lut_dequant(x: torch.Tensor, qweight) -> str | None:
    if not getattr(qweight, "LAID_OUT", False):
        return ("cuda.binary_lut_dequant_cublas: only for binary weights held in the table "
                "layout (to_kernel_layout(binary=True))")
    why = unsupported_reason(qweight) or _dequant_reason(qweight)
    return None if why is None else f"cuda.binary_lut_dequant_cublas: {why}"


def _tma_reason(device: torch.device, op: str = "binary_lut_tma") -> str | None:
    from .cuda_int_act import sm90_available
    if device.type == "cuda" and not (hasattr(torch.ops.vlmkern, op) and sm90_available(device)):
        return "needs an sm_90 GPU and a build with 9.0a code (TORCH_CUDA_ARCH_LIST)"
    return None


def _tma_checker(kernel: str, op: str):
    def check(x: torch.Tensor, qweight) -> str | None:
        why = unsupported_reason(qweight) or _tma_reason(x.device, op)
        return None if why is None else f"{kernel}: {why}"
    return check


def _checker(kernel: str):
    def check(x: torch.Tensor, qweight) -> str | None:
        why = unsupported_reason(qweight)
        return None if why is None else f"{kernel}: {why}"
    return check


def register(backend) -> None:
    """Add the kernels to the CUDA backend ahead of the plane GEMMs. The plain
    one passed its GPU tests and ran 1.7-2.5x faster than the plane GEMM on an
    H100 at M = 1, 16 and 64 (benchmarks/results/promote_H100.md). Its layout
    is a copy beside the planes; ``VLMKERN_DISABLE=cuda.binary_lut`` keeps the
    planes alone. The staged one and the Hopper ones (M >= 17, and the decode
    path at M <= 16), on the same layout, are opt-in
    (``VLMKERN_ENABLE=cuda.binary_lut_staged``, ``cuda.binary_lut_tma``,
    ``cuda.binary_lut_tma_decode``) until their GPU tests pass, as is the
    dense weight from the layout for prefill (``cuda.binary_lut_dequant_cublas``,
    weights held only in the layout)."""
    from .backends import KernelSpec

    if any(k.name == "cuda.binary_lut" for k in backend.kernels):
        return
    common = dict(bits=frozenset({1}), dtypes=frozenset(ACT_DTYPES), devices=frozenset({"cuda"}),
                  min_m=1, max_m=MAX_M, min_sm=(8, 0), laid_out=True)
    specs = [KernelSpec("cuda.binary_lut_tma_decode", "binary", binary_lut_tma_decode, opt_in=True,
                        check=_tma_checker("cuda.binary_lut_tma_decode", "binary_lut_tma_decode"),
                        **dict(common, max_m=DECODE_MAX_M, min_sm=(9, 0))),
             KernelSpec("cuda.binary_lut_tma", "binary", binary_lut_tma, opt_in=True,
                        check=_tma_checker("cuda.binary_lut_tma", "binary_lut_tma"),
                        **dict(common, min_m=TMA_MIN_M, max_m=None, min_sm=(9, 0))),
             KernelSpec("cuda.binary_lut_staged", "binary", binary_lut_staged, opt_in=True,
                        check=_checker("cuda.binary_lut_staged"), **common),
             KernelSpec("cuda.binary_lut", "binary", binary_lut, check=_checker("cuda.binary_lut"),
                        **common),
             KernelSpec("cuda.binary_lut_dequant_cublas", "binary", binary_lut_dequant_cublas,
                        opt_in=True, check=_check_lut_dequant,
                        **dict(common, min_m=MAX_M + 1, max_m=None))]
    for spec in specs:
        backend.register(spec)
    # ahead of the plane GEMMs, in this order
    del backend.kernels[-len(specs):]
    backend.kernels[:0] = specs
