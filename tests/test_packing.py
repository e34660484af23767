"""Bit-stream packing (vlmkern.formats.packing) against independent packers."""
import pytest
import torch

from vlmkern.formats.packing import (pack_bits, pack_int4_pairs, packed_words, unpack_bits,
                                     unpack_int4_pairs)

LENGTHS = (1, 31, 32, 33, 100, 577)
BITS = tuple(range(1, 9))


# ---------------------------------------------------------------------------
# Independent reference: one Python big integer per row is the bit stream.
# Code j is added at bit j*b; word i is bits [32i, 32i+32) of the integer,
# reinterpreted as a signed 32-bit value.
# ---------------------------------------------------------------------------

def stream_pack_row(codes: list[int], bits: int) -> list[int]:
    stream = 0
    for j, c in enumerate(codes):
        stream |= int(c) << (j * bits)
    n_words = -(-len(codes) * bits // 32)
    words = []
    for i in range(n_words):
        u = (stream >> (32 * i)) & 0xFFFFFFFF
        words.append(u - (1 << 32) if u >= (1 << 31) else u)
    return words


def stream_unpack_row(words: list[int], bits: int, length: int) -> list[int]:
    stream = 0
    for i, w in enumerate(words):
        stream |= (int(w) & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(length)]


def random_codes(shape, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", LENGTHS)
def test_round_trip(bits, length):
    codes = random_codes((5, length), bits, seed=bits * 1000 + length)
    # Make sure the extreme codes appear (all bits set, zero).
    codes[0, 0] = (1 << bits) - 1
    codes[1, -1] = (1 << bits) - 1
    codes[2, 0] = 0
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-length * bits // 32))
    assert packed.shape[-1] == packed_words(length, bits)
    out = unpack_bits(packed, bits, length)
    assert out.dtype == torch.int64
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", (1, 3, 4, 8))
def test_batched_leading_dims(bits):
    codes = random_codes((2, 3, 4, 33), bits, seed=bits)
    packed = pack_bits(codes, bits)
    assert packed.shape == (2, 3, 4, packed_words(33, bits))
    # Each row packs independently: same as packing the flattened rows.
    assert torch.equal(packed.reshape(-1, packed.shape[-1]),
                       pack_bits(codes.reshape(-1, 33), bits))
    assert torch.equal(unpack_bits(packed, bits, 33), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", (1, 7, 31, 32, 33, 45))
def test_bit_order_matches_independent_packer(bits, length):
    codes = random_codes((3, length), bits, seed=17 * bits + length)
    codes[0] = (1 << bits) - 1                  # all ones: sets bit 31 of full words
    expected = torch.tensor([stream_pack_row(r, bits) for r in codes.tolist()], dtype=torch.int32)
    packed = pack_bits(codes, bits)
    assert torch.equal(packed, expected)
    back = [stream_unpack_row(r, bits, length) for r in packed.tolist()]
    assert back == codes.tolist()


def test_three_bit_code_straddles_words():
    # Code 10 occupies stream bits 30, 31 (word 0) and 32 (bit 0 of word 1).
    codes = torch.zeros(1, 11, dtype=torch.int64)
    codes[0, 10] = 7
    packed = pack_bits(codes, 3)
    assert packed.tolist() == [[-(1 << 30), 1]]          # 0xC0000000 as int32, then 0x1
    codes[0, 10] = 0b101                                  # bit 30 and bit 32 only
    assert pack_bits(codes, 3).tolist() == [[1 << 30, 1]]
    codes[0, 10] = 0b010                                  # bit 31 only -> negative int32
    assert pack_bits(codes, 3).tolist() == [[-(1 << 31), 0]]
    assert unpack_bits(pack_bits(codes, 3), 3, 11).tolist() == codes.tolist()


def test_bit31_gives_negative_int32():
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 31] = 1
    packed = pack_bits(codes, 1)
    assert packed.tolist() == [[-(1 << 31)]]
    assert unpack_bits(packed, 1, 32).tolist() == codes.tolist()
    # 8-bit: code 3 is the top byte.
    c8 = torch.tensor([[0x01, 0x02, 0x03, 0xFF]])
    assert pack_bits(c8, 8).tolist() == [[0xFF030201 - (1 << 32)]]


def test_unused_high_bits_are_zero():
    codes = torch.full((1, 5), 7, dtype=torch.int64)    # 15 bits used of 32
    assert pack_bits(codes, 3).tolist() == [[(1 << 15) - 1]]


def test_unpack_reads_words_as_unsigned():
    # Every word all ones (-1 as int32): every code is the maximum.
    words = torch.full((2, packed_words(64, 3)), -1, dtype=torch.int32)
    assert torch.equal(unpack_bits(words, 3, 64), torch.full((2, 64), 7, dtype=torch.int64))


@pytest.mark.parametrize("bits", (1, 3, 4, 8))
def test_out_of_range_codes_raise(bits):
    too_big = torch.zeros(2, 10, dtype=torch.int64)
    too_big[1, 3] = 1 << bits
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(too_big, bits)
    negative = torch.zeros(2, 10, dtype=torch.int64)
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(negative, bits)


@pytest.mark.parametrize("bits", (0, 9, -1))
def test_bad_bit_width_raises(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(1, 4, dtype=torch.int64), bits)


def test_float_codes_raise():
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(1, 4), 4)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(1, 4, dtype=torch.bool), 1)


@pytest.mark.parametrize("bits,length", [(3, 33), (4, 8), (8, 5), (1, 32)])
@pytest.mark.parametrize("delta", (-1, 1))
def test_wrong_word_count_raises(bits, length, delta):
    words = torch.zeros(2, packed_words(length, bits) + delta, dtype=torch.int32)
    with pytest.raises(ValueError, match="words"):
        unpack_bits(words, bits, length)


def test_unpack_requires_int32():
    with pytest.raises(TypeError, match="int32"):
        unpack_bits(torch.zeros(1, 2, dtype=torch.int64), 4, 16)


# ---------------------------------------------------------------------------
# int4 pairs
# ---------------------------------------------------------------------------

def pairs_reference(values: list[int]) -> list[int]:
    """Byte i = (v[2i] & 0xF) | (v[2i+1] & 0xF) << 4, as a signed int8; odd tail padded with 0."""
    vals = list(values) + ([0] if len(values) % 2 else [])
    out = []
    for i in range(0, len(vals), 2):
        u = (vals[i] & 0xF) | ((vals[i + 1] & 0xF) << 4)
        out.append(u - 256 if u >= 128 else u)
    return out


@pytest.mark.parametrize("length", (1, 2, 7, 31, 32, 33, 100, 577))
def test_int4_pairs_round_trip_and_layout(length):
    gen = torch.Generator().manual_seed(length)
    values = torch.randint(-8, 8, (3, length), generator=gen, dtype=torch.int64)
    values[0, 0] = -8
    values[-1, -1] = 7
    packed = pack_int4_pairs(values)
    assert packed.dtype == torch.int8
    assert packed.shape == (3, (length + 1) // 2)
    expected = torch.tensor([pairs_reference(r) for r in values.tolist()], dtype=torch.int8)
    assert torch.equal(packed, expected)
    out = unpack_int4_pairs(packed, length)
    assert out.dtype == torch.int8
    assert torch.equal(out.long(), values)


def test_int4_nibble_order():
    packed = pack_int4_pairs(torch.tensor([1, 2, -1, 7, -8]))
    # low nibble first: 0x21, then 0x7F, then 0x08 (odd tail padded with zero)
    assert packed.tolist() == [0x21, 0x7F, 0x08]
    assert pack_int4_pairs(torch.tensor([0, -8])).tolist() == [-128]    # 0x80
    packed = torch.tensor([0x21, -128], dtype=torch.int8)
    assert unpack_int4_pairs(packed, 4).tolist() == [1, 2, 0, -8]


def test_int4_batched():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-8, 8, (2, 3, 9), generator=gen)
    packed = pack_int4_pairs(values)
    assert packed.shape == (2, 3, 5)
    assert torch.equal(unpack_int4_pairs(packed, 9).long(), values)


@pytest.mark.parametrize("bad", (8, -9, 100))
def test_int4_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_pairs(torch.tensor([0, bad, 1]))


def test_int4_unpack_errors():
    with pytest.raises(ValueError, match="bytes"):
        unpack_int4_pairs(torch.zeros(4, dtype=torch.int8), 9)
    with pytest.raises(TypeError, match="int8"):
        unpack_int4_pairs(torch.zeros(4, dtype=torch.uint8), 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", (1, 10, 11, 31, 32, 33, 95, 96, 97, 577))
def test_unpack_of_any_words_matches_independent_reader(bits, length):
    # random 32-bit words, bit 31 set in about half of them, high bits of the
    # last word not necessarily zero: unpack reads exactly the stream bits
    gen = torch.Generator().manual_seed(bits * 7919 + length)
    words = torch.randint(-(1 << 31), 1 << 31, (4, packed_words(length, bits)), generator=gen,
                          dtype=torch.int64).to(torch.int32)
    want = [stream_unpack_row(r, bits, length) for r in words.tolist()]
    assert unpack_bits(words, bits, length).tolist() == want


@pytest.mark.parametrize("bits", BITS)
def test_unpack_to_a_narrower_dtype(bits):
    codes = random_codes((3, 100), bits, seed=bits)
    packed = pack_bits(codes, bits)
    narrow = unpack_bits(packed, bits, 100, dtype=torch.uint8)
    assert narrow.dtype == torch.uint8 and torch.equal(narrow.long(), codes)
