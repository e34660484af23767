"""Dense little-endian bit streams in int32 words.

Every packed integer tensor in vlmkern uses this one rule: the codes of a row
form a bit stream, code ``j`` occupies stream bits ``[j*b, j*b + b)``, and
stream bit ``t`` is bit ``t % 32`` (0 = least significant) of word ``t // 32``.
For b = 3 a code may straddle two words; no bits are wasted. Unused high bits
of the last word are zero. This is the same bit order the GPTQ checkpoint
layout uses along K, which makes import/export a transpose.

The arithmetic is done in int64 so that bit 31 never becomes a sign problem;
words are stored as int32 (two's complement view of the unsigned word).
"""
from __future__ import annotations

import torch

_WORD = 32
_MASK32 = (1 << 32) - 1


def packed_words(length: int, bits: int) -> int:
    """Number of int32 words holding ``length`` codes of ``bits`` bits."""
    return (length * bits + _WORD - 1) // _WORD


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32."""
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes along the last dim.

    codes: integer tensor [..., L] with values in [0, 2**bits - 1].
    returns: int32 tensor [..., ceil(L*bits/32)].
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    length = codes.shape[-1]
    lead = codes.shape[:-1]
    q = codes.reshape(-1, length).to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    n_words = packed_words(length, bits)
    out = torch.zeros(q.shape[0], n_words + 1, dtype=torch.int64, device=q.device)
    start = torch.arange(length, device=q.device, dtype=torch.int64) * bits
    word, shift = start // _WORD, start % _WORD
    # Bits never overlap, so summing contributions equals OR-ing them.
    lo = (q << shift) & _MASK32
    out.index_add_(1, word, lo)
    spill = (shift + bits) > _WORD
    if bool(spill.any()):
        hi = q[:, spill] >> (_WORD - shift[spill])
        out.index_add_(1, word[spill] + 1, hi)
    return _to_int32(out[:, :n_words]).reshape(*lead, n_words)


def unpack_bits(words: torch.Tensor, bits: int, length: int,
                dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    words: int32 tensor [..., W] with W == ceil(length*bits/32).
    returns: tensor [..., length] of codes in [0, 2**bits - 1], int64 (or
    ``dtype``, e.g. uint8 to save memory on large weights).
    """
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    n_words = packed_words(length, bits)
    if words.shape[-1] != n_words:
        raise ValueError(
            f"{length} codes of {bits} bits need {n_words} words, got {words.shape[-1]}")
    lead = words.shape[:-1]
    w = words.reshape(-1, n_words)
    mask = (1 << bits) - 1
    if _WORD % bits == 0:
        # whole codes per word: every word shifted by each code's offset at once,
        # in int32 (the mask drops the copies of bit 31 an arithmetic shift brings in)
        shifts = torch.arange(0, _WORD, bits, device=w.device, dtype=torch.int32)
        codes = (w.unsqueeze(-1) >> shifts).bitwise_and_(mask)
        codes = codes.reshape(w.shape[0], -1)[:, :length]
    else:
        # 32 codes fill `bits` words exactly (a period); a code may straddle two
        # words of its period, so each word is read as the 64-bit pair (word,
        # next word) and shifted, per word, by the offsets of the codes that start in it
        pad = -n_words % bits
        w64 = torch.nn.functional.pad(w, (0, pad)).to(torch.int64).bitwise_and_(_MASK32)
        w64 = w64.reshape(w.shape[0], -1, bits)
        pairs = torch.cat([w64[..., 1:], torch.zeros_like(w64[..., :1])], dim=-1)
        pairs.bitwise_left_shift_(_WORD).bitwise_or_(w64)
        parts = []
        for j in range(bits):
            first, end = -(-_WORD * j // bits), -(-_WORD * (j + 1) // bits)
            shifts = torch.arange(first, end, device=w.device, dtype=torch.int64) * bits - _WORD * j
            parts.append(pairs[..., j:j + 1] >> shifts)
        codes = torch.cat(parts, dim=-1).bitwise_and_(mask)
        codes = codes.reshape(w.shape[0], -1)[:, :length]
    return codes.to(dtype).reshape(*lead, length)


def pack_int4_pairs(values: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values (in [-8, 7]) two per byte along the last dim.

    Element ``2i`` goes to the low nibble of byte ``i``, element ``2i+1`` to the
    high nibble (two's complement nibbles). An odd length is padded with 0.
    returns: int8 tensor [..., ceil(L/2)].
    """
    v = values.to(torch.int16)
    if v.numel() and (int(v.min()) < -8 or int(v.max()) > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    if v.shape[-1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    nib = v & 0xF
    byte = nib[..., 0::2] | (nib[..., 1::2] << 4)
    byte = torch.where(byte >= 128, byte - 256, byte)
    return byte.to(torch.int8)


def unpack_int4_pairs(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_pairs`; returns int8 [..., length]."""
    if packed.dtype != torch.int8:
        raise TypeError(f"packed int4 must be int8, got {packed.dtype}")
    if packed.shape[-1] != (length + 1) // 2:
        raise ValueError(f"{length} int4 values need {(length + 1) // 2} bytes, "
                         f"got {packed.shape[-1]}")
    b = packed.to(torch.int16) & 0xFF
    lo, hi = b & 0xF, b >> 4
    both = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1)[..., :length]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)
