"""Tensor-core weight-only matmul (csrc/weight_only_kernel.cu) for M = 1..64.

Load-time layout. The kernel never reads the canonical bit stream: the first
call for a weight on a device (and activation dtype) re-lays it out once, and
the result is cached beside the weight, never in its state or checkpoints.

* Rows are padded to blocks of 128 (8 tiles of 16, one per warp), columns to
  chunks of 128 (8 k16 MMA steps). Padding rows hold codes 0 and scales 0.
  Padding columns take their row's last group's scale and hold its zero
  point as their code, so every decode makes them 0 (code 0 there would
  decode to -z * s, which can overflow a 16-bit float when every real weight
  fits, and -Inf times the zero activations past K is NaN).
* Within a 16x128 tile, lane ``4g + t`` of a warp holds, for each k16 step
  ``kt`` and A-fragment register ``r`` (PTX m16n8k16 layout), the two codes at
  row ``g + 8*(r % 2)``, columns ``16kt + 2t + 8*(r // 2) + (0, 1)``.
  4 bits: word ``kt`` holds step kt, register r at bits ``4r`` and ``16+4r``.
  2 bits: word ``kt // 2`` holds register r of step kt at bits ``2p``,
  ``16+2p`` with ``p = 4*(kt % 2) + r``.
  3 bits: the 2-bit plane of the low two bits (4 words) plus a 1-bit plane of
  the third bit (2 words): word ``kt // 4`` at bits ``p``, ``16+p`` with
  ``p = 4*(kt % 4) + r``. That is exactly 3 bits per weight, and each plane
  decodes with a shift and a mask.
  Words are stored in planes of 4 per lane (16-byte loads): 4 bits: two
  [32 lanes][4] planes; 2 bits: one; 3 bits: one [32][4] and one [32][2].
* Scales: per chunk, ``8 >> slot_log2`` slots of ``16 << slot_log2`` columns
  (the group size up to 128; one slot per chunk for larger groups or one group
  per row). For the row pair (g, g+8) of a tile, one slot stores the two scales
  and ``-(magic + zero)`` of the two rows as 16-bit patterns of the activation
  type (magic = 1024 for fp16, 128 for bf16: OR-ing a code into the mantissa
  of the magic number gives magic + code), so the kernel spends two fused
  multiply-adds per pair of weights and no int-to-float conversion.

Decode. ``decode="exact"`` (the default) builds each A operand as
``s * (q - z)`` rounded once to the activation dtype, the weight the torch
reference dequantizes to. ``decode="post_scale"`` (M <= 16; M <= 32 when a
scale slot is a whole 128-column chunk, ``post_scale_max_m``) builds ``q - z``
(an exact small integer), sums the products in fp32 per scale slot and
multiplies each slot's sum by the row's scale: one fused multiply-add per pair
of weights instead of two, no PRMT per slot, and no 16-bit rounding of the
weight. A code field is used where it lies in its word when it fits the
mantissa of the magic number (``magic | field`` is ``magic + 2^e q``); one fma
with ``2^-e`` and ``-(magic/2^e + z)`` then gives ``q - z`` exactly, so fields
need fewer shifts (``post_scale_operands`` emulates this bit for bit). Same
layout, same work split; results differ from the exact decode by the
16-bit rounding of the weight only. The post-scale kernel is registered as
``cuda.weight_only_post_scale``, tried before the exact decode.

Act-order weights: the wrapper gathers x's columns with ``perm`` (one
index_select of an [M, K] tensor); the weight layout stays in stored order.

Work split: units of (128 rows, 128 columns) are split evenly and in order
over ``2 * multiprocessors`` thread blocks (stream-K, see the kernel; three
per SM for the opt-in build for three blocks); the count depends on the
weight's shape and the device only, never on M, so a row's result is the same
bit for bit in any batch of 1..64 rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.groupwise import QuantizedWeight
from ..formats.packing import pack_bits, packed_words, unpack_bits
from .cuda_common import (
    SMEM_RESERVED,
    LayoutCache,
    aligned16,
    check_activations,
    multiprocessors,
    outside_graph_pools,
    require_op,
    smem_per_multiprocessor,
)

BLOCK_ROWS = 128          # output rows per unit: 8 warps x 16
CHUNK = 128               # input columns per unit
MAX_M = 64
POST_SCALE_MAX_M = 16      # VLMKERN_WO_POST_SCALE_MAX_M in csrc/weight_only.h
# With slot_log2 = 3 the kernel takes 64 tokens (VLMKERN_WO_POST_SCALE_WIDE_MAX_M);
# the default kernel runs up to 32, the range its GPU tests covered, and the
# opt-in cuda.weight_only_post_scale_m64 the rest.
POST_SCALE_WIDE_MAX_M = 32
POST_SCALE_M64_MAX_M = 64
# vlmkern_wo_decode in csrc/weight_only.h; "post_scale_acq_rel" is "post_scale"
# (the same bits) with a split row block's parts published by one acq_rel
# atomic per part instead of a fence.sc.gpu in every thread (M <= 16, slot_log2 3);
# "post_scale_3cta" is "post_scale" compiled for three thread blocks per SM
# (the same bits for the same num_ctas; M <= 16 with slot_log2 3, M <= 8 with 2)
DECODES = {"exact": 0, "post_scale": 1, "post_scale_acq_rel": 2, "post_scale_3cta": 3}
POST_SCALE_3CTA_MAX_M = {3: 16, 2: 8}   # VLMKERN_WO_POST_SCALE_3CTA_LIMIT, by slot_log2
SUPPORTED_BITS = (2, 3, 4)
ACT_DTYPES = (torch.float16, torch.bfloat16)
_MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
_SIGN = 0x8000
CTAS_PER_SM = 2           # matches __launch_bounds__(256, 2) in the kernel
_RELAYOUT_WEIGHTS = 1 << 24  # weights re-laid out per step


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bits."""
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _as_uint32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def _bits16(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit patterns of ``values`` rounded to dtype, as int64 in [0, 65535]."""
    return values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def unsupported_reason(qweight: QuantizedWeight) -> str | None:
    """Why the kernel layout cannot hold this weight, or None."""
    if qweight.bits not in SUPPORTED_BITS:
        return f"{qweight.bits}-bit weights unsupported (2, 3 or 4)"
    g, k = qweight.group_size, qweight.in_features
    if g is None or g >= k:
        return None
    if g % 16 or (CHUNK % g and g % CHUNK):
        return f"group size {g} unsupported (16, 32, 64, a multiple of 128, or one group per row)"
    return None


def slot_log2_for(group_size: int | None, in_features: int) -> int:
    """log2 of k16 steps per scale slot: 0..3 (slots of 16..128 columns)."""
    if group_size is None or group_size >= in_features or group_size >= CHUNK:
        return 3
    return (group_size // 16).bit_length() - 1


@dataclass(frozen=True, eq=False)
class MmaWeight:
    """A group-wise weight in the kernel's layout (see the module docstring)."""

    wq: torch.Tensor        # int32 [NB, C, 8, 64*bits]
    sz: torch.Tensor        # int32 [NB, C, 8, 8 >> slot_log2, 8, 2]
    bits: int
    out_features: int
    in_features: int
    slot_log2: int
    dtype: torch.dtype      # activation dtype the scales were rounded to

    @property
    def blocks(self) -> int:
        return self.wq.shape[0]

    @property
    def chunks(self) -> int:
        return self.wq.shape[1]

    @property
    def resident_bytes(self) -> int:
        """Device bytes of this layout (codes + scales/zeros), padding included."""
        return self.wq.numel() * 4 + self.sz.numel() * 4


def _lane_codes(codes: torch.Tensor, nb: int, c: int) -> torch.Tensor:
    """Padded codes [NB*128, C*128] -> [NB, C, 8 tiles, 32 lanes, 8 kt, 4 r, 2 h]."""
    # row in tile = 8*rh + g; column in step = 8*ch + 2t + h; register r = 2*ch + rh
    q = codes.reshape(nb, 8, 2, 8, c, 8, 2, 4, 2)           # b w rh g c kt ch t h
    q = q.permute(0, 4, 1, 3, 7, 5, 6, 2, 8)                # b c w g t kt ch rh h
    return q.reshape(nb, c, 8, 32, 8, 4, 2)


def _pack_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Lane codes [..., 32, 8, 4, 2] -> int32 words [..., 64*bits]. In int32:
    the fields of a word never overlap, so their sum is their OR, also where
    one lands in bit 31 (the sign bit)."""
    q = q.to(torch.int32)
    lead = q.shape[:-4]
    r = torch.arange(4, device=q.device, dtype=torch.int32).view(4, 1)
    h = torch.arange(2, device=q.device, dtype=torch.int32).view(1, 2)

    def fields(v, shifts, dims):
        return (v << shifts).sum(dim=dims, dtype=torch.int32)

    if bits == 4:
        words = fields(q, 4 * r + 16 * h, (-1, -2))                        # [..., 32, 8 kt]
        planes = words.reshape(*lead, 32, 2, 4).transpose(-3, -2)         # [..., 2, 32, 4]
        return planes.reshape(*lead, 256)
    low = (q & 3).reshape(*lead, 32, 4, 2, 4, 2)                           # v j r h
    j = torch.arange(2, device=q.device, dtype=torch.int32).view(2, 1, 1)
    words = fields(low, 2 * (4 * j + r) + 16 * h, (-1, -2, -3))           # [..., 32, 4]
    if bits == 2:
        return words.reshape(*lead, 128)
    high = (q >> 2).reshape(*lead, 32, 2, 4, 4, 2)                        # v j r h
    j4 = torch.arange(4, device=q.device, dtype=torch.int32).view(4, 1, 1)
    hwords = fields(high, (4 * j4 + r) + 16 * h, (-1, -2, -3))            # [..., 32, 2]
    return torch.cat([words.reshape(*lead, 128), hwords.reshape(*lead, 64)], dim=-1)


def _pack_scales(qweight: QuantizedWeight, dtype: torch.dtype, nb: int, c: int,
                 slot_log2: int) -> torch.Tensor:
    n, k = qweight.out_features, qweight.in_features
    g = k if qweight.group_size is None else qweight.group_size
    groups = qweight.num_groups
    slots = 8 >> slot_log2
    dev = qweight.scales.device
    # group of every (chunk, slot): the group of the slot's first column
    first_col = (torch.arange(c, device=dev).view(c, 1) * CHUNK
                 + torch.arange(slots, device=dev).view(1, slots) * (16 << slot_log2))
    gi = torch.clamp(first_col // g, max=groups - 1).reshape(-1)
    scale = _bits16(qweight.scales, dtype)
    negz = (_MAGIC[dtype] | qweight.zeros()) | _SIGN               # -(magic + z)
    rows = nb * BLOCK_ROWS
    scale = torch.nn.functional.pad(scale, (0, 0, 0, rows - n))[:, gi]
    negz = torch.nn.functional.pad(negz, (0, 0, 0, rows - n), value=_MAGIC[dtype] | _SIGN)[:, gi]

    def per_lane(v):  # [rows, c*slots] -> [NB, C, 8 w, slots, 8 g, 2 rh]
        return v.reshape(nb, 8, 2, 8, c, slots).permute(0, 4, 1, 5, 3, 2)

    s, z = per_lane(scale), per_lane(negz)
    words = torch.stack([s[..., 0] | (s[..., 1] << 16), z[..., 0] | (z[..., 1] << 16)], dim=-1)
    return _as_int32(words).contiguous()


def row_block_slices(nb: int, c: int):
    """(first, end) row blocks of the slices a layout of nb row blocks and c
    chunks is made or read back in: a slice at a time bounds the temporaries
    (up to ~100 bytes per weight)."""
    step = max(1, _RELAYOUT_WEIGHTS // (BLOCK_ROWS * c * CHUNK))
    for b0 in range(0, nb, step):
        yield b0, min(nb, b0 + step)


def layout_codes(qweight: QuantizedWeight) -> torch.Tensor:
    """The weight's codes in the kernel's fragment order: int32 [NB, C, 8, 64*bits]
    (independent of the activation dtype; pure torch, any device)."""
    n, k = qweight.out_features, qweight.in_features
    nb, c = _cdiv(n, BLOCK_ROWS), _cdiv(k, CHUNK)
    wq = torch.empty(nb, c, 8, 64 * qweight.bits, dtype=torch.int32, device=qweight.qweight.device)
    # padding columns: the zero point of the row's last group (q - z = 0 there)
    last_zero = qweight.zeros()[:, -1:].to(torch.uint8) if c * CHUNK > k else None
    for b0, b1 in row_block_slices(nb, c):
        rows = qweight.qweight[b0 * BLOCK_ROWS: b1 * BLOCK_ROWS]
        codes = unpack_bits(rows, qweight.bits, k, dtype=torch.uint8)
        if last_zero is not None:
            z = last_zero[b0 * BLOCK_ROWS: b1 * BLOCK_ROWS]
            codes = torch.cat([codes, z.expand(-1, c * CHUNK - k)], dim=1)
        codes = torch.nn.functional.pad(codes, (0, 0, 0, (b1 - b0) * BLOCK_ROWS - codes.shape[0]))
        wq[b0:b1] = _pack_planes(_lane_codes(codes, b1 - b0, c), qweight.bits)
    return wq


def codes_from_layout(wq: torch.Tensor, bits: int, out_features: int,
                      in_features: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The inverse of ``layout_codes`` for row blocks of ``wq``: codes [rows, K]
    (int64, or ``dtype``) in stored column order (padding dropped); pure torch."""
    nb, c = wq.shape[0], wq.shape[1]
    lane = _lane_codes_of_words(wq, bits)                                 # b c w lane kt r h
    q = lane.reshape(nb, c, 8, 8, 4, 8, 2, 2, 2)                          # b c w g t kt ch rh h
    q = q.permute(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(nb * BLOCK_ROWS, c * CHUNK)
    return q[:out_features, :in_features].to(dtype)


def _lane_codes_of_words(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """[NB, C, 8, 64*bits] int32 -> codes uint8 [NB, C, 8, 32 lanes, 8 kt, 4 r, 2 h]:
    the fields ``_fragment_magic_codes`` takes with the kernel's shifts and
    masks, each field of a word taken by one broadcast shift (int32 shifts:
    each mask drops the copies of bit 31 an arithmetic shift brings in)."""
    lead = wq.shape[:-1]
    dev = wq.device
    r = torch.arange(4, device=dev, dtype=torch.int32).view(4, 1)
    h = torch.arange(2, device=dev, dtype=torch.int32).view(1, 2)
    if bits == 4:   # word kt: register r at bits 4r and 16 + 4r
        words = wq.reshape(*lead, 2, 32, 4).transpose(-3, -2).reshape(*lead, 32, 8, 1, 1)
        return ((words >> (4 * r + 16 * h)) & 0xF).to(torch.uint8)
    # 2-bit plane: word kt // 2, register r of step kt at bits 2p and 16 + 2p, p = 4 (kt % 2) + r
    j = torch.arange(2, device=dev, dtype=torch.int32).view(2, 1, 1)
    low = wq[..., :128].reshape(*lead, 32, 4, 1, 1, 1) >> (2 * (4 * j + r) + 16 * h)
    q = (low & 3).reshape(*lead, 32, 8, 4, 2)
    if bits == 3:   # 1-bit plane: word kt // 4 at bits p and 16 + p, p = 4 (kt % 4) + r
        j4 = torch.arange(4, device=dev, dtype=torch.int32).view(4, 1, 1)
        high = wq[..., 128:].reshape(*lead, 32, 2, 1, 1, 1) >> ((4 * j4 + r) + 16 * h)
        q = q | ((high & 1) << 2).reshape(*lead, 32, 8, 4, 2)
    return q.to(torch.uint8)


def packed_codes_from_layout(wq: torch.Tensor, bits: int, out_features: int,
                             in_features: int) -> torch.Tensor:
    """The canonical bit stream int32 [N, ceil(K*bits/32)] (formats.packing)
    of a layout, exact; a slice of row blocks at a time."""
    nb, c = wq.shape[0], wq.shape[1]
    out = torch.empty(out_features, packed_words(in_features, bits), dtype=torch.int32,
                      device=wq.device)
    for b0, b1 in row_block_slices(nb, c):
        rows = min(out_features, b1 * BLOCK_ROWS) - b0 * BLOCK_ROWS
        codes = codes_from_layout(wq[b0:b1], bits, rows, in_features)
        out[b0 * BLOCK_ROWS: b0 * BLOCK_ROWS + rows] = pack_bits(codes, bits)
    return out


def to_mma_layout(qweight, dtype: torch.dtype) -> MmaWeight:
    """A group-wise weight in the kernel's layout for activations of ``dtype``
    (any device; pure torch). A weight already held in the layout
    (``LaidOutWeight``) keeps its codes; only the scale words are made."""
    why = unsupported_reason(qweight)
    if why is not None:
        raise ValueError(f"cuda.weight_only_mma: {why}")
    if dtype not in ACT_DTYPES:
        raise ValueError(f"cuda.weight_only_mma: activations must be float16 or bfloat16, got {dtype}")
    n, k = qweight.out_features, qweight.in_features
    nb, c = _cdiv(n, BLOCK_ROWS), _cdiv(k, CHUNK)
    wq = aligned16(qweight.wq) if getattr(qweight, "LAID_OUT", False) else layout_codes(qweight)
    slot_log2 = slot_log2_for(qweight.group_size, k)
    sz = _pack_scales(qweight, dtype, nb, c, slot_log2)
    return MmaWeight(wq, sz, qweight.bits, n, k, slot_log2, dtype)


# -- the kernel's decode, emulated in torch (for tests on machines without a GPU) ---
def _fragment_magic_codes(words: torch.Tensor, bits: int, magic2: int) -> torch.Tensor:
    """Lane words [..., 32, 2*bits] (uint32 in int64) -> magic + code pairs
    [..., 32, 8 kt, 4 r] as 32-bit words, with the kernel's shifts and masks."""
    out = []
    for kt in range(8):
        regs = []
        for r in range(4):
            if bits == 4:
                v = (words[..., kt] >> (4 * r)) & 0x000F000F
            else:
                p = 4 * (kt % 2) + r
                v = (words[..., kt // 2] >> (2 * p)) & 0x00030003
                if bits == 3:
                    ph = 4 * (kt % 4) + r
                    hi = words[..., 4 + kt // 4]
                    hi2 = (hi >> (ph - 2)) if ph >= 2 else ((hi << (2 - ph)) & 0xFFFFFFFF)
                    v = v | (hi2 & 0x00040004)
            regs.append(v | magic2)
        out.append(torch.stack(regs, dim=-1))
    return torch.stack(out, dim=-2)


def _lane_words(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """[NB, C, 8, 64*bits] int32 -> per-lane words [NB, C, 8, 32, 2*bits] as uint32."""
    w = _as_uint32(wq)
    lead = w.shape[:-1]
    if bits == 4:
        return w.reshape(*lead, 2, 32, 4).transpose(-3, -2).reshape(*lead, 32, 8)
    low = w[..., :128].reshape(*lead, 32, 4)
    if bits == 2:
        return low
    return torch.cat([low, w[..., 128:].reshape(*lead, 32, 2)], dim=-1)


def _half_values(bits16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(bits16 >= 0x8000, bits16 - 0x10000, bits16).to(torch.int16).view(dtype)


def emulate_dequantize(mw: MmaWeight) -> torch.Tensor:
    """The weight [N, K] in mw.dtype exactly as the kernel's A fragments hold it:
    the packed words decoded with the kernel's bit operations, then
    (magic + q) - (magic + z) (exact) and * s (one rounding) in mw.dtype."""
    nb, c = mw.blocks, mw.chunks
    dt = mw.dtype
    magic2 = _MAGIC[dt] * 0x10001
    regs = _fragment_magic_codes(_lane_words(mw.wq, mw.bits), mw.bits, magic2)  # b c w lane kt r
    dev = mw.wq.device
    sz = _as_uint32(mw.sz)                                     # b c w slot g word
    slot = torch.arange(8, device=dev) >> mw.slot_log2         # per kt
    sv = sz[:, :, :, slot]                                     # b c w kt g word
    g_of_lane = torch.arange(32, device=dev) // 4
    sv = sv[:, :, :, :, g_of_lane]                             # b c w kt lane word
    sv = sv.permute(0, 1, 2, 4, 3, 5)                          # b c w lane kt word
    rh = torch.arange(4, device=dev) % 2                       # row g (0) or g+8 (1) per r
    s16 = (sv[..., 0:1] >> (16 * rh)) & 0xFFFF                 # b c w lane kt r
    z16 = (sv[..., 1:2] >> (16 * rh)) & 0xFFFF
    halves = torch.stack([regs & 0xFFFF, regs >> 16], dim=-1)  # ... r h
    q = _half_values(halves, dt)
    d = q + _half_values(z16, dt).unsqueeze(-1)                # fma(q, 1, -(magic+z)): exact
    w = d * _half_values(s16, dt).unsqueeze(-1)                # fma(d, s, -0): rounded once
    # [b c w lane kt r h] -> rows (b, w, rh, g), columns (c, kt, ch, t, h)
    w = w.reshape(nb, c, 8, 8, 4, 8, 2, 2, 2)                  # b c w g t kt ch rh h
    w = w.permute(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(nb * BLOCK_ROWS, c * CHUNK)
    return w[:mw.out_features, :mw.in_features]


# -- the post-scale decode's operands, emulated -----------------------------------------
def _low_pos(bits: int, kt: int, r: int) -> int:
    return 4 * r if bits == 4 else 2 * (4 * (kt % 2) + r)


def post_scale_shift(bits: int, mantissa: int, kt: int, r: int) -> int:
    """Right shift of the low-plane word for register r of step kt (the kernel's
    ``low_shift``): none if the field fits the magic number's mantissa where
    it lies, else 8 if it fits after that, else down to bit 0."""
    pos = _low_pos(bits, kt, r)
    if pos + bits <= mantissa:
        return 0
    if pos >= 8 and pos - 8 + bits <= mantissa:
        return 8
    return pos


def post_scale_operands(mw: MmaWeight) -> torch.Tensor:
    """The post-scale decode's A operands, q - z, as an [N, K] tensor in
    mw.dtype, computed with the kernel's shifts, masks and fmas: the field
    ORed into the magic number as magic + 2^e q, times 2^-e, plus
    -(magic/2^e + z) = magic*(1 - 2^-e) + (-(magic + z))."""
    nb, c, dt = mw.blocks, mw.chunks, mw.dtype
    words = _lane_words(mw.wq, mw.bits)                        # b c w lane word
    magic = float(_half_values(torch.tensor(_MAGIC[dt]), dt))
    regs = []
    for kt in range(8):
        for r in range(4):
            shift = post_scale_shift(mw.bits, _MANTISSA[dt], kt, r)
            e = _low_pos(mw.bits, kt, r) - shift
            low = words[..., kt if mw.bits == 4 else kt // 2] >> shift
            v = low & ((0x000F000F if mw.bits == 4 else 0x00030003) << e)
            if mw.bits == 3:
                ph, to = 4 * (kt % 4) + r, e + 2
                hi = words[..., 4 + kt // 4]
                hi = (hi >> (ph - to)) if ph >= to else ((hi << (to - ph)) & 0xFFFFFFFF)
                v = v | (hi & (0x00010001 << to))
            regs.append((v | (_MAGIC[dt] * 0x10001), e))
    sz = _as_uint32(mw.sz)                                     # b c w slot g word
    slot = torch.arange(8, device=mw.wq.device) >> mw.slot_log2
    zm = sz[:, :, :, slot][:, :, :, :, torch.arange(32) // 4, 1]   # b c w kt lane
    out = []
    for i, (v, e) in enumerate(regs):
        kt, rh = i // 4, i % 2
        z16 = _half_values((zm[:, :, :, kt] >> (16 * rh)) & 0xFFFF, dt)
        zmc = z16 + torch.tensor(magic * (1 - 2.0 ** -e), dtype=dt)   # exact, as the fma
        pair = _half_values(torch.stack([v & 0xFFFF, v >> 16], dim=-1), dt)
        out.append(pair * torch.tensor(2.0 ** -e, dtype=dt) + zmc.unsqueeze(-1))
    w = torch.stack(out, dim=-2).reshape(*out[0].shape[:-1], 8, 4, 2)  # b c w lane kt r h
    w = w.reshape(nb, c, 8, 8, 4, 8, 2, 2, 2)                  # b c w g t kt ch rh h
    w = w.permute(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(nb * BLOCK_ROWS, c * CHUNK)
    return w[:mw.out_features, :mw.in_features]


# -- work split ----------------------------------------------------------------
def num_ctas_for(units: int, multiprocessors: int, per_sm: int = CTAS_PER_SM) -> int:
    """Thread blocks of one launch: enough to fill every SM per_sm times, never
    more than there are units. Depends on the weight's shape and the device only."""
    return max(1, min(units, per_sm * multiprocessors))


def stream_k_parts(units: int, ctas: int, chunks: int) -> list[list[tuple[int, int, int]]]:
    """For each row block, its parts as (thread block, first unit, workspace slot),
    in the order the kernel sums them (the kernel's index formulas, in Python)."""
    def first_unit(cta):
        return cta * units // ctas

    def owner(u):
        return ((u + 1) * ctas - 1) // units

    blocks = []
    for b in range(units // chunks):
        lo, hi = owner(b * chunks), owner(b * chunks + chunks - 1)
        blocks.append([(cta, max(first_unit(cta), b * chunks),
                        2 * cta + (0 if first_unit(cta) // chunks == b else 1))
                       for cta in range(lo, hi + 1)])
    return blocks


# -- the cached layout, per weight, device and activation dtype ------------------------
_LAYOUTS = LayoutCache()
_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
_CAPTURE_COUNTERS: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
_CAPTURE_BUFFERS: list[torch.Tensor] = []
_SPARE_COUNTERS: dict[int, torch.Tensor] = {}


def kernel_weight(qweight: QuantizedWeight, dtype: torch.dtype) -> MmaWeight:
    """The weight in the kernel's layout, made on first use and cached."""
    return _LAYOUTS.get(qweight, (qweight.device, dtype), lambda: to_mma_layout(qweight, dtype))


def _counters(device: torch.device, blocks: int) -> torch.Tensor:
    """Zeroed int32 counters for the kernels' last-part detection. The kernels
    leave them zero, and launches ordered on one stream never overlap, so
    eager launches share one buffer per (device, stream). A CUDA graph gets a
    buffer of its own, shared by that capture's launches and zeroed by a
    captured fill at its first, so every replay starts from zero: a graph
    never shares counters with eager work or with another graph, so it may
    replay on any stream.

    Every buffer is made outside CUDA-graph pools (``outside_graph_pools``);
    a capture takes the spare that eager calls keep ready, since nothing can
    be made outside its pool during the capture itself. A capture's buffer is
    kept for good (a few KB): its graph may be replayed at any time."""
    # "cuda" and "cuda:0" are one buffer when device 0 is current
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    key = (index, stream)
    size = max(blocks, 1024)
    if torch.cuda.is_current_stream_capturing():
        capture = _capture_id(stream)
        seen = _CAPTURE_COUNTERS.get(key)
        if seen is None or seen[0] != capture or seen[1].numel() < blocks:
            spare = _SPARE_COUNTERS.pop(index, None)
            buf = spare if spare is not None and spare.numel() >= blocks else \
                torch.empty(size, dtype=torch.int32, device=device)   # no warm-up: the graph's pool
            buf.zero_()                       # captured: runs at the start of every replay
            seen = (capture, buf)
            _CAPTURE_COUNTERS[key] = seen
            _CAPTURE_BUFFERS.append(buf)
        return seen[1]
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < blocks:
        buf = outside_graph_pools(lambda: torch.zeros(size, dtype=torch.int32, device=device),
                                  device)
        _COUNTERS[key] = buf
    spare = _SPARE_COUNTERS.get(index)
    if spare is None or spare.numel() < blocks:
        _SPARE_COUNTERS[index] = outside_graph_pools(
            lambda: torch.empty(size, dtype=torch.int32, device=device), device)
    return buf


def _capture_id(stream: int) -> int:
    """The id of the CUDA-graph capture running on ``stream``."""
    from ..ext import load_extension  # looked up per call: tests replace it
    module, reason = load_extension()
    if module is None:
        raise RuntimeError(f"vlmkern CUDA kernels need the CUDA extension: {reason}")
    if not hasattr(module, "capture_id"):
        raise RuntimeError("the installed vlmkern._C predates CUDA-graph support for the "
                           "stream-K kernels (no capture_id); rebuild the package")
    return module.capture_id(stream)


def kernel_inputs(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None):
    """x and bias as the kernels take them: columns in stored (act-order) order,
    rows padded to a multiple of 8 columns, contiguous and 16-byte aligned;
    bias contiguous in fp16, bf16 or fp32."""
    if qweight.perm is not None:
        x = x.index_select(1, qweight.perm.long())
    return aligned_inputs(x, bias)


def aligned_inputs(x: torch.Tensor, bias: torch.Tensor | None):
    """x with rows padded to a multiple of 8 columns, contiguous and 16-byte
    aligned; bias contiguous in fp16, bf16 or fp32."""
    pad = -x.shape[1] % 8   # 16-byte rows for vector loads; the kernels read the rest as zero
    x = torch.nn.functional.pad(x, (0, pad)) if pad else x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    if bias is not None and (bias.dtype not in (torch.float16, torch.bfloat16, torch.float32)
                             or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    return x, bias


def weight_only_mma(x: torch.Tensor, qweight: QuantizedWeight,
                    bias: torch.Tensor | None = None, decode: str = "exact") -> torch.Tensor:
    """y = x @ W^T + bias on the tensor-core kernel. x [M, K] fp16/bf16 on a
    CUDA device, 1 <= M <= 64 (``post_scale_max_m`` with decode="post_scale"); bias [N] or
    None -> [M, N] in x's dtype."""
    require_op("cuda.weight_only_mma", "weight_only_mma", "csrc/weight_only_kernel.cu")
    check_activations("cuda.weight_only_mma", x, qweight, ACT_DTYPES, same_device=False)
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, qweight.out_features)
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {sorted(DECODES)}, got {decode!r}")
    max_m = MAX_M
    if decode == "post_scale":
        max_m = post_scale_max_m(qweight)
    elif decode == "post_scale_acq_rel":
        max_m = POST_SCALE_MAX_M
        why = _acq_rel_reason(qweight)
        if why:
            raise ValueError(f"cuda.weight_only_mma with decode={decode!r}: {why}")
    elif decode == "post_scale_3cta":
        max_m = post_scale_3cta_max_m(qweight)
        why = _3cta_reason(qweight)
        if why:
            raise ValueError(f"cuda.weight_only_mma with decode={decode!r}: {why}")
    if m > max_m:
        raise ValueError(f"cuda.weight_only_mma with decode={decode!r} takes M <= {max_m}, got {m}")
    return _launch(x, qweight, bias, DECODES[decode])


def _launch(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None,
            decode: int) -> torch.Tensor:
    mw = kernel_weight(qweight, x.dtype)
    x, bias = kernel_inputs(x, qweight, bias)
    per_sm = 3 if decode == DECODES["post_scale_3cta"] else CTAS_PER_SM
    ctas = num_ctas_for(mw.blocks * mw.chunks, multiprocessors(x.device), per_sm)
    return torch.ops.vlmkern.weight_only_mma(x, mw.wq, mw.sz, bias, _counters(x.device, mw.blocks),
                                             mw.bits, mw.out_features, mw.slot_log2, ctas, decode)


def weight_only_post_scale(x: torch.Tensor, qweight: QuantizedWeight,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight_only_mma`` with the post-scale decode (M <= post_scale_max_m)."""
    return weight_only_mma(x, qweight, bias, decode="post_scale")


def weight_only_post_scale_m64(x: torch.Tensor, qweight: QuantizedWeight,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The post-scale decode at up to 64 tokens (``cuda.weight_only_post_scale_m64``,
    opt-in): weights whose scale slots are whole 128-column chunks only."""
    require_op("cuda.weight_only_post_scale_m64", "weight_only_mma", "csrc/weight_only_kernel.cu")
    check_activations("cuda.weight_only_post_scale_m64", x, qweight, ACT_DTYPES, same_device=False)
    why = _m64_reason(qweight)
    if why:
        raise ValueError(f"cuda.weight_only_post_scale_m64: {why}")
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, qweight.out_features)
    if m > POST_SCALE_M64_MAX_M:
        raise ValueError(f"cuda.weight_only_post_scale_m64 takes M <= {POST_SCALE_M64_MAX_M}, got {m}")
    return _launch(x, qweight, bias, DECODES["post_scale"])


def weight_only_post_scale_acq_rel(x: torch.Tensor, qweight: QuantizedWeight,
                                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight_only_post_scale`` with a row block split between thread blocks
    published by one acq_rel atomic per part instead of a fence in every
    thread (``cuda.weight_only_post_scale_acq_rel``, opt-in): the same sums in
    the same order, so the same bits; M <= 16, scale slots of 128 columns."""
    return weight_only_mma(x, qweight, bias, decode="post_scale_acq_rel")


def _acq_rel_reason(qweight) -> str | None:
    if slot_log2_for(qweight.group_size, qweight.in_features) != 3:
        return (f"takes scale slots of 128 columns (groups of 128 * k or one per row), "
                f"not group size {qweight.group_size}")
    return None


def _check_acq_rel(x: torch.Tensor, qweight) -> str | None:
    why = unsupported_reason(qweight) or _acq_rel_reason(qweight)
    if why is not None:
        return f"cuda.weight_only_post_scale_acq_rel: {why}"
    if qweight.bits == 3 and x.shape[0] < POST_SCALE_W3_MIN_M:   # as the post-scale decode
        return (f"cuda.weight_only_post_scale_acq_rel: 3-bit weights at M={x.shape[0]} run "
                f"faster on the exact decode (M < {POST_SCALE_W3_MIN_M})")
    return None


def weight_only_post_scale_3cta(x: torch.Tensor, qweight: QuantizedWeight,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight_only_post_scale`` compiled for three thread blocks per SM and
    launched with three per SM (``cuda.weight_only_post_scale_3cta``, opt-in):
    24 warps an SM instead of 16 to hide the decode's latencies, at most 80
    registers a thread; M <= 16 with scale slots of 128 columns, M <= 8 with 64."""
    return weight_only_mma(x, qweight, bias, decode="post_scale_3cta")


def post_scale_3cta_max_m(qweight) -> int:
    """Largest M the three-blocks build takes (0: its slot width is not built)."""
    return POST_SCALE_3CTA_MAX_M.get(slot_log2_for(qweight.group_size, qweight.in_features), 0)


# the kernel's static shared memory (is_last), in the 128-byte allocation unit
_STATIC_SMEM = 128


def smem_3cta(bits: int, slot_log2: int, m: int) -> int:
    """Shared memory three blocks of the decode-3 kernel take on one SM for M
    tokens: per block 6 stages (5 for a 16-token tile, stages_for in
    csrc/weight_only_kernel.cu), each of the unit's codes (8 warps x 256 x
    bits bytes), its scale slots (8 warps x 64 bytes each) and the token tile
    (272 bytes a row), plus the driver's reserve and the static variables."""
    rows, stages = (8, 6) if m <= 8 else (16, 5)
    stage = 8 * 256 * bits + 8 * 64 * (8 >> slot_log2) + rows * 272
    return 3 * (stages * stage + _STATIC_SMEM + SMEM_RESERVED)


def _3cta_reason(qweight) -> str | None:
    if post_scale_3cta_max_m(qweight) == 0:
        return (f"takes scale slots of 64 or 128 columns (groups of 64 * k or one per row), "
                f"not group size {qweight.group_size}")
    return None


def _check_3cta(x: torch.Tensor, qweight) -> str | None:
    why = unsupported_reason(qweight) or _3cta_reason(qweight)
    m = x.shape[0]
    if why is None and m > post_scale_3cta_max_m(qweight):
        why = (f"M={m} above {post_scale_3cta_max_m(qweight)} for group size "
               f"{qweight.group_size}")
    if why is None and x.is_cuda:
        slot_log2 = slot_log2_for(qweight.group_size, qweight.in_features)
        need = smem_3cta(qweight.bits, slot_log2, m)
        have = smem_per_multiprocessor(x.device)
        if have < need:
            why = (f"three thread blocks need {need} bytes of shared memory per SM, "
                   f"the GPU has {have}")
    return None if why is None else f"cuda.weight_only_post_scale_3cta: {why}"


def _m64_reason(qweight) -> str | None:
    why = unsupported_reason(qweight)
    if why is None and slot_log2_for(qweight.group_size, qweight.in_features) != 3:
        why = (f"needs scale slots of 128 columns (group size a multiple of 128 or one group "
               f"per row), got group size {qweight.group_size}")
    return why


def _check_m64(x: torch.Tensor, qweight) -> str | None:
    why = _m64_reason(qweight)
    return None if why is None else f"cuda.weight_only_post_scale_m64: {why}"


def post_scale_max_m(qweight) -> int:
    """Largest M the post-scale decode takes: 16, or 32 when a scale slot is a
    whole 128-column chunk (fewer fp32 sums live, so 32 tokens fit)."""
    if slot_log2_for(qweight.group_size, qweight.in_features) == 3:
        return POST_SCALE_WIDE_MAX_M
    return POST_SCALE_MAX_M


# 3-bit weights at M <= 8 stay on the exact decode: on an H100 the post-scale
# decode measured 0.72x of it there (3584x37888, 68.5 vs 49.0 us) and 1.15-1.35x
# at M = 16; 2- and 4-bit were faster at every size timed
# (benchmarks/results/promote_H100.md).
POST_SCALE_W3_MIN_M = 9


def _check_post_scale(x: torch.Tensor, qweight) -> str | None:
    why = _check(x, qweight)
    m = x.shape[0]
    if why is None and m > post_scale_max_m(qweight):
        why = (f"cuda.weight_only_post_scale: M={m} above {post_scale_max_m(qweight)} "
               f"for group size {qweight.group_size}")
    if why is None and qweight.bits == 3 and m < POST_SCALE_W3_MIN_M:
        why = (f"cuda.weight_only_post_scale: 3-bit weights at M={m} run faster on the "
               f"exact decode (M < {POST_SCALE_W3_MIN_M})")
    return why


def _check(x: torch.Tensor, qweight) -> str | None:
    why = unsupported_reason(qweight)
    return None if why is None else f"cuda.weight_only_mma: {why}"


def register(backend) -> None:
    """Add the kernels to the CUDA backend, ahead of dequantize + cuBLAS, which
    keeps every M above 64 and everything they decline. The post-scale decode
    comes first: it passed its GPU tests and ran faster on an H100 (see
    ``_check_post_scale`` for the one case it leaves to the exact decode). Its
    64-token tiles (M = 33..64, 128-column scale slots), its variant with
    the acq_rel publish (M <= 16) and its build for three thread blocks per SM
    (M <= 16) are opt-in until their GPU tests pass."""
    from .backends import KernelSpec

    common = dict(bits=frozenset(SUPPORTED_BITS), dtypes=frozenset(ACT_DTYPES),
                  devices=frozenset({"cuda"}), min_m=1, min_sm=(8, 0), laid_out=True)
    specs = [KernelSpec("cuda.weight_only_post_scale_m64", "weight_only",
                        weight_only_post_scale_m64, opt_in=True, check=_check_m64,
                        **dict(common, min_m=POST_SCALE_WIDE_MAX_M + 1, max_m=POST_SCALE_M64_MAX_M)),
             # Hopper only: on sm_80 the 80-register build spills
             KernelSpec("cuda.weight_only_post_scale_3cta", "weight_only",
                        weight_only_post_scale_3cta, opt_in=True, check=_check_3cta,
                        **dict(common, max_m=max(POST_SCALE_3CTA_MAX_M.values()),
                               min_sm=(9, 0))),
             KernelSpec("cuda.weight_only_post_scale_acq_rel", "weight_only",
                        weight_only_post_scale_acq_rel, opt_in=True, check=_check_acq_rel,
                        **dict(common, max_m=POST_SCALE_MAX_M)),
             KernelSpec("cuda.weight_only_post_scale", "weight_only", weight_only_post_scale,
                        max_m=POST_SCALE_WIDE_MAX_M, check=_check_post_scale,
                        **common),
             KernelSpec("cuda.weight_only_mma", "weight_only", weight_only_mma, max_m=MAX_M,
                        check=_check, **common)]
    known = {k.name for k in backend.kernels}
    for spec in reversed(specs):          # each put first: tried in list order
        if spec.name not in known:
            backend.register(spec, first=True)
