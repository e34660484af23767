"""Import/export of the GPTQ checkpoint layout (vlmkern.formats.gptq_layout)."""
import pytest
import torch

import vlmkern
from vlmkern import FormatError, QuantConfig, QuantizedWeight
from vlmkern.formats.gptq_layout import from_gptq, to_gptq

FORMATS = ("gptq", "gptq_v2")


# ---------------------------------------------------------------------------
# Independent packer written the way AutoGPTQ's QuantLinear.pack does it:
# along dim 0, 32/b values per int32 for 2/4/8 bits; for 3 bits, 32 values in
# three words with the 11th and 22nd values split across word boundaries.
# ---------------------------------------------------------------------------

def autogptq_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int values [R, C] along dim 0 into int32 [R*bits/32, C]."""
    v = [[int(x) for x in row] for row in values.tolist()]
    rows, cols = len(v), len(v[0])
    out = [[0] * cols for _ in range(rows * bits // 32)]
    for c in range(cols):
        if bits in (2, 4, 8):
            per = 32 // bits
            for r in range(rows // per):
                for j in range(per):
                    out[r][c] |= v[r * per + j][c] << (bits * j)
        else:
            assert bits == 3
            i = row = 0
            while row < len(out):
                for j in range(i, i + 10):
                    out[row][c] |= v[j][c] << (3 * (j - i))
                i += 10
                out[row][c] |= (v[i][c] << 30) & 0xFFFFFFFF
                row += 1
                out[row][c] |= (v[i][c] >> 2) & 1
                i += 1
                for j in range(i, i + 10):
                    out[row][c] |= v[j][c] << (3 * (j - i) + 1)
                i += 10
                out[row][c] |= (v[i][c] << 31) & 0xFFFFFFFF
                row += 1
                out[row][c] |= (v[i][c] >> 1) & 0x3
                i += 1
                for j in range(i, i + 10):
                    out[row][c] |= v[j][c] << (3 * (j - i) + 2)
                i += 10
                row += 1
    signed = [[w - (1 << 32) if w >= (1 << 31) else w for w in row] for row in out]
    return torch.tensor(signed, dtype=torch.int32)


def hand_checkpoint(k, n, bits, group, fmt, seed, g_idx=None):
    """Random GPTQ tensors built by hand: returns the tensors and the logical
    codes q [K, N], zeros z [G, N], scales [G, N], g_idx [K]."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 2 ** bits, (k, n), generator=gen)
    # v1 stores z - 1, so z = 0 is not representable there
    z = torch.randint(1 if fmt == "gptq" else 0, 2 ** bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.1 + 0.01).half()
    if g_idx is None:
        g_idx = torch.arange(k) // group
    stored_z = z - 1 if fmt == "gptq" else z
    tensors = {"qweight": autogptq_pack(q, bits),
               "qzeros": autogptq_pack(stored_z.t(), bits).t().contiguous(),
               "scales": scales,
               "g_idx": g_idx.to(torch.int32)}
    return tensors, q, z, scales, g_idx


def manual_dequant(q, z, scales, g_idx):
    """W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]), element by element in k."""
    k, n = q.shape
    w = torch.empty(n, k)
    for col in range(k):
        g = int(g_idx[col])
        w[:, col] = scales[g].float() * (q[col] - z[g]).float()
    return w


def shuffled_g_idx(k, group, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(k) // group
    return base[torch.randperm(k, generator=gen)]


# ---------------------------------------------------------------------------
# The convention, on small hand-built checkpoints
# ---------------------------------------------------------------------------

def test_autogptq_packer_agrees_with_plain_bit_stream():
    # Sanity of the test helper itself on a hand example: 4-bit values 1..8 in one word.
    col = torch.arange(1, 9)[:, None]
    assert autogptq_pack(col, 4).tolist() == [[0x87654321 - (1 << 32)]]
    col3 = torch.zeros(32, 1, dtype=torch.int64)
    col3[10] = 7                                        # bits 30..32: straddles words 0 and 1
    assert autogptq_pack(col3, 3).tolist() == [[-(1 << 30)], [1], [0]]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_import_hand_built_checkpoint(bits, fmt):
    k, n, group = 64, 32, 16
    tensors, q, z, scales, g_idx = hand_checkpoint(k, n, bits, group, fmt, seed=bits)
    qw = from_gptq(**tensors, bits=bits, group_size=group, checkpoint_format=fmt)
    assert isinstance(qw, QuantizedWeight)
    assert qw.shape == (n, k) and qw.bits == bits and qw.group_size == group
    assert qw.perm is None and not qw.sym
    assert torch.equal(qw.codes(), q.t())
    assert torch.equal(qw.zeros(), z.t())
    assert torch.equal(qw.dequantize(), manual_dequant(q, z, scales, g_idx))
    # g_idx is optional when it is the trivial one
    no_gidx = {**tensors, "g_idx": None}
    assert torch.equal(from_gptq(**no_gidx, bits=bits, group_size=group,
                                 checkpoint_format=fmt).dequantize(), qw.dequantize())
    # and the export reproduces the hand-built tensors exactly
    out = to_gptq(qw, fmt)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(out[name], tensors[name]), name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_act_order_import(bits, fmt):
    k, n, group = 128, 32, 32
    g_idx = shuffled_g_idx(k, group, seed=bits)
    tensors, q, z, scales, _ = hand_checkpoint(k, n, bits, group, fmt, seed=10 + bits, g_idx=g_idx)
    qw = from_gptq(**tensors, bits=bits, group_size=group, checkpoint_format=fmt)
    assert qw.perm is not None
    perm = qw.perm.long()
    assert sorted(perm.tolist()) == list(range(k))
    # stored column j is logical column perm[j]; groups are contiguous in stored order
    assert torch.equal(g_idx[perm], torch.arange(k) // group)
    assert torch.equal(qw.codes(), q.t()[:, perm])
    assert torch.equal(qw.dequantize(), manual_dequant(q, z, scales, g_idx))
    out = to_gptq(qw, fmt)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(out[name], tensors[name]), name


def test_group_size_minus_one_means_one_group():
    k, n, bits = 64, 32, 4
    tensors, q, z, scales, g_idx = hand_checkpoint(k, n, bits, k, "gptq_v2", seed=3)
    assert tensors["scales"].shape == (1, n)
    for gs in (-1, None):
        qw = from_gptq(**tensors, bits=bits, group_size=gs, checkpoint_format="gptq_v2")
        assert qw.group_size is None and qw.num_groups == 1
        assert torch.equal(qw.dequantize(), manual_dequant(q, z, scales, g_idx))


# ---------------------------------------------------------------------------
# Export -> import round trips
# ---------------------------------------------------------------------------

def random_weight(n, k, bits, group, sym, seed, act_order=False):
    gen = torch.Generator().manual_seed(seed)
    g = k if group is None else group
    groups = -(-k // g)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).half()
    zeros = None if sym else torch.randint(1, 2 ** bits, (n, groups), generator=gen)
    perm = None
    if act_order:
        g_idx = (torch.arange(k) // g)[torch.randperm(k, generator=gen)]
        perm = torch.argsort(g_idx, stable=True)    # the canonical order import produces
    return QuantizedWeight.from_codes(codes, scales, zeros, bits, group, perm)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sym", (False, True), ids=("asym", "sym"))
@pytest.mark.parametrize("group,act_order", [(32, False), (128, False), (None, False),
                                             (32, True), (128, True)],
                         ids=("g32", "g128", "gNone", "g32-act_order", "g128-act_order"))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_export_import_bit_exact(bits, group, act_order, sym, fmt):
    n, k = 64, 256
    qw = random_weight(n, k, bits, group, sym, seed=bits * 100 + (group or 0), act_order=act_order)
    out = to_gptq(qw, fmt)
    groups = 1 if group is None else k // group
    assert out["qweight"].shape == (k * bits // 32, n) and out["qweight"].dtype == torch.int32
    assert out["qzeros"].shape == (groups, n * bits // 32) and out["qzeros"].dtype == torch.int32
    assert out["scales"].shape == (groups, n) and out["scales"].dtype == torch.float16
    assert out["g_idx"].shape == (k,) and out["g_idx"].dtype == torch.int32
    back = from_gptq(**out, bits=bits, group_size=group if group else -1, checkpoint_format=fmt)
    assert back.sym == sym
    assert torch.equal(back.qweight, qw.qweight)
    assert torch.equal(back.scales, qw.scales)
    assert (back.qzeros is None) == (qw.qzeros is None)
    if not sym:
        assert torch.equal(back.qzeros, qw.qzeros)
    assert (back.perm is None) == (qw.perm is None)
    if act_order:
        assert torch.equal(back.perm, qw.perm)
    assert torch.equal(back.dequantize(), qw.dequantize())
    # the exported tensors follow the GPTQ formula
    stored_z = unpack_along_n(out["qzeros"], bits, n)
    z = stored_z + 1 if fmt == "gptq" else stored_z
    q = unpack_along_k(out["qweight"], bits, k)
    if not act_order:      # the per-element loop is the slow part; once per configuration
        assert torch.equal(manual_dequant(q, z, out["scales"], out["g_idx"].long()),
                           qw.dequantize())
    if sym:
        assert bool((z == 2 ** (bits - 1)).all())


def unpack_along_k(qweight, bits, k):
    """[K*b/32, N] int32 -> [K, N]: stream bit t of a column is bit t%32 of word t//32."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    stream = (words.unsqueeze(1) >> torch.arange(32)[None, :, None]) & 1   # [W, 32, N]
    stream = stream.reshape(-1, qweight.shape[1])[: k * bits]
    weights = (1 << torch.arange(bits))[None, :, None]
    return (stream.reshape(k, bits, -1) * weights).sum(1)


def unpack_along_n(qzeros, bits, n):
    """[G, N*b/32] int32 -> [G, N]."""
    return unpack_along_k(qzeros.t().contiguous(), bits, n).t()


def test_random_perm_round_trips_to_same_weight():
    # A perm that is not the stable sort of its g_idx: the columns come back
    # in canonical order, the weight is the same.
    gen = torch.Generator().manual_seed(4)
    k, n, bits, group = 128, 32, 4, 32
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) + 0.1).half()
    zeros = torch.randint(1, 16, (n, k // group), generator=gen)
    qw = QuantizedWeight.from_codes(codes, scales, zeros, bits, group,
                                    torch.randperm(k, generator=gen))
    for fmt in FORMATS:
        out = to_gptq(qw, fmt)
        back = from_gptq(**out, bits=bits, group_size=group, checkpoint_format=fmt)
        assert torch.equal(back.dequantize(), qw.dequantize())
        assert torch.equal(to_gptq(back, fmt)["g_idx"], out["g_idx"])


def test_rtn_weight_round_trips_through_v2():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    w[0, :32] = w[0, :32].abs()                     # a group with z = 0
    qw = vlmkern.quantize_rtn(w, QuantConfig(bits=4, group_size=32))
    assert bool((qw.zeros() == 0).any())
    back = from_gptq(**to_gptq(qw, "gptq_v2"), bits=4, group_size=32, checkpoint_format="gptq_v2")
    assert torch.equal(back.dequantize(), qw.dequantize())
    with pytest.raises(FormatError, match="gptq_v2"):
        to_gptq(qw, "gptq")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

@pytest.fixture
def checkpoint():
    tensors, *_ = hand_checkpoint(128, 32, 4, 32, "gptq", seed=0)
    return tensors


def test_invalid_g_idx(checkpoint):
    bad = (torch.arange(128) // 32).clone()
    bad[0] = 1                                       # group 0 gets 31 columns, group 1 gets 33
    with pytest.raises(FormatError, match="grouping"):
        from_gptq(**{**checkpoint, "g_idx": bad.int()}, bits=4, group_size=32)
    with pytest.raises(FormatError, match="g_idx"):
        from_gptq(**{**checkpoint, "g_idx": torch.zeros(127, dtype=torch.int32)}, bits=4,
                  group_size=32)
    with pytest.raises(FormatError, match="g_idx"):
        from_gptq(**{**checkpoint, "g_idx": (torch.arange(128) // 32).float()}, bits=4,
                  group_size=32)
    # a valid act-order g_idx for group 32 is not valid for group 64
    with pytest.raises(FormatError):
        from_gptq(**{**checkpoint, "g_idx": shuffled_g_idx(128, 32, 0).int()}, bits=4,
                  group_size=64)


@pytest.mark.parametrize("change,match", [
    ({"scales": torch.ones(5, 32, dtype=torch.float16)}, "scales"),
    ({"scales": torch.ones(4, 31, dtype=torch.float16)}, "scales"),
    ({"scales": torch.ones(4 * 32, dtype=torch.float16)}, "scales"),
    ({"qzeros": torch.zeros(4, 5, dtype=torch.int32)}, "qzeros"),
    ({"qzeros": torch.zeros(3, 4, dtype=torch.int32)}, "qzeros"),
    ({"qzeros": torch.zeros(4, 4, dtype=torch.int64)}, "qzeros"),
    ({"qweight": torch.zeros(16, 32, dtype=torch.int64)}, "qweight"),
    ({"qweight": torch.zeros(16 * 32, dtype=torch.int32)}, "qweight"),
])
def test_wrong_shapes(checkpoint, change, match):
    with pytest.raises(FormatError, match=match):
        from_gptq(**{**checkpoint, **change}, bits=4, group_size=32)


def test_v1_zero_point_overflow(checkpoint):
    # stored -1 (all ones) means z = 2^b in v1: not representable
    qz = checkpoint["qzeros"].clone()
    qz[1, 0] = -1
    with pytest.raises(FormatError, match="overflow"):
        from_gptq(**{**checkpoint, "qzeros": qz}, bits=4, group_size=32, checkpoint_format="gptq")
    # the same tensor is fine as v2
    from_gptq(**{**checkpoint, "qzeros": qz}, bits=4, group_size=32, checkpoint_format="gptq_v2")


def test_declared_symmetric_but_not(checkpoint):
    with pytest.raises(FormatError, match="symmetric"):
        from_gptq(**checkpoint, bits=4, group_size=32, sym=True)


def test_bad_bits_and_format(checkpoint):
    with pytest.raises(FormatError, match="bits"):
        from_gptq(**checkpoint, bits=5, group_size=32)
    with pytest.raises(ValueError, match="checkpoint_format"):
        from_gptq(**checkpoint, bits=4, group_size=32, checkpoint_format="awq")
    qw = from_gptq(**checkpoint, bits=4, group_size=32)
    with pytest.raises(ValueError, match="checkpoint_format"):
        to_gptq(qw, "exllama")


def test_v1_export_refuses_zero_point_zero():
    codes = torch.zeros(32, 64, dtype=torch.int64)
    zeros = torch.ones(32, 2, dtype=torch.int64)
    zeros[5, 1] = 0
    qw = QuantizedWeight.from_codes(codes, torch.ones(32, 2, dtype=torch.float16), zeros, 4, 32)
    with pytest.raises(FormatError, match="zero point of 0"):
        to_gptq(qw, "gptq")
    out = to_gptq(qw, "gptq_v2")
    back = from_gptq(**out, bits=4, group_size=32, checkpoint_format="gptq_v2")
    assert torch.equal(back.zeros(), zeros)


@pytest.mark.parametrize("n,k,bits", [(32, 100, 4), (32, 40, 3), (33, 64, 4), (20, 64, 3),
                                      (32, 12, 2)])
def test_export_needs_whole_words(n, k, bits):
    qw = vlmkern.quantize_rtn(torch.randn(n, k), QuantConfig(bits=bits, group_size=None))
    with pytest.raises(FormatError, match="multiples of 32"):
        to_gptq(qw, "gptq_v2")
