"""CUDA integer-activation GEMM (csrc/int_act_kernel.cu, vlmkern.ops.cuda_int_act).

CPU tests check the load-time layout and the data-layout arithmetic the
kernel relies on, by decoding in torch exactly as the kernel does: padded
groups, the I4W8 activation permutation with weights widened to 16x their
value, and the PTX fragment layouts of mma m16n8k32.s8 and m16n8k64.s4 fed by
ldmatrix. GPU tests run the kernels against the torch reference, and the
Hopper warpgroup-MMA GEMM (csrc/int_act_sm90_kernel.cu) against the mma.sync
GEMM bit for bit.
"""
import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
from tiny_models import kernel_op_reason

import vlmkern.ops as ops
from vlmkern.formats import IntActWeight
from vlmkern.formats.groupwise import num_groups
from vlmkern.formats.intact import qmax
from vlmkern.formats.packing import pack_int4_pairs
from vlmkern.ops import cuda_int_act as cia
from vlmkern.ops import reference
from vlmkern.ops.backends import BACKENDS

HAS_GPU = torch.cuda.is_available()


_SKIP = kernel_op_reason("int_act_gemm", "int_act_kernel.cu")
gpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
ALL_WA = [(w, a) for w in (4, 6, 8) for a in (4, 6, 8)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_intact(n, k, w_bits, a_bits, group, act_scale=None, seed=0, device="cpu"):
    g = gen(seed)
    lim = qmax(w_bits)
    codes = torch.randint(-lim, lim + 1, (n, k), generator=g)
    scales = (torch.rand(n, num_groups(k, group), generator=g) * 0.01 + 0.001).half()
    return IntActWeight.from_codes(codes, scales, w_bits, a_bits, group, act_scale).to(device)


# -- CPU: layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("k,group,mode", [(200, 128, cia.MODE_I8), (200, None, cia.MODE_I8),
                                          (200, 64, cia.MODE_I4), (4096, 128, cia.MODE_I4W8),
                                          (96, 40, cia.MODE_I8), (33, 7, cia.MODE_I4)])
def test_padded_layout_invariants(k, group, mode):
    lay = cia.padded_layout(k, group, mode)
    step = cia.K_STEP[mode]
    assert lay.group_pad % step == 0 and lay.k_pad % (2 * step) == 0
    assert lay.groups == num_groups(k, group) and lay.groups * lay.group_pad <= lay.k_pad
    pos = lay.positions()
    assert len(set(pos.tolist())) == k and int(pos.max()) < lay.k_pad
    # every logical column lands in its own group's padded slot range
    grp = torch.arange(k) // lay.group
    assert bool(((pos // lay.group_pad) == grp).all())


def test_identity_layout_reuses_storage():
    qw = make_intact(8, 256, 8, 8, 128)
    kw = cia.to_kernel_weight(qw, cia.MODE_I8)
    assert kw.layout.is_identity and kw.w.data_ptr() == qw.qweight.data_ptr()
    qw4 = make_intact(8, 256, 4, 4, None)
    kw4 = cia.to_kernel_weight(qw4, cia.MODE_I4W8)
    assert kw4.w.data_ptr() == qw4.qweight.data_ptr()
    assert kw4.w_scale_t.shape == (1, 8) and kw4.w_scale_t.dtype == torch.float32
    # a view at an address the kernels' 16-byte loads cannot start from is copied
    for w_bits, mode, width in ((8, cia.MODE_I8, 256), (4, cia.MODE_I4W8, 128),
                                (4, cia.MODE_I4, 128)):
        codes = make_intact(8, 256, w_bits, w_bits, None).qweight
        store = torch.zeros(8 * width + 3, dtype=torch.int8)
        view = store[3:].view(8, width)
        view.copy_(codes)
        qw = dataclasses.replace(make_intact(8, 256, w_bits, w_bits, None), qweight=view)
        kw = cia.to_kernel_weight(qw, mode)
        assert kw.w.data_ptr() % 16 == 0 and torch.equal(kw.w, codes)


@pytest.mark.parametrize("w_bits,group", [(8, 64), (6, None), (4, 32), (4, 128)])
def test_padded_weight_group_sums_equal_reference(w_bits, group):
    """Exact per-group integer dot products of the padded operands equal the
    reference int_dot."""
    n, k, m = 5, 200, 3
    qw = make_intact(n, k, w_bits, 8, group, seed=w_bits)
    mode = cia.MODE_I4W8 if w_bits == 4 else cia.MODE_I8
    kw = cia.to_kernel_weight(qw, mode)
    lay = kw.layout
    qx = torch.randint(-127, 128, (m, k), generator=gen(1)).to(torch.int8)
    xp = cia.pad_columns(qx, lay).long()
    wp = (unpack_nibbles(kw.w, lay.k_pad) if w_bits == 4 else kw.w).long()
    sums = torch.stack([xp[:, i * lay.group_pad:(i + 1) * lay.group_pad]
                        @ wp[:, i * lay.group_pad:(i + 1) * lay.group_pad].T
                        for i in range(lay.groups)], dim=2)
    assert torch.equal(sums, reference.int_dot(qx, qw.codes(), group).long())
    assert bool((wp[:, lay.groups * lay.group_pad:] == 0).all())


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    b = packed.to(torch.int16) & 0xFF
    both = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :length]
    return torch.where(both >= 8, both - 16, both)


# -- CPU: fragment arithmetic, decoded as the kernel does ----------------------------------
def ldmatrix(rows16: torch.Tensor) -> list[torch.Tensor]:
    """One 8x8 b16 matrix (8 rows of 16 bytes): lane t gets row t // 4, bytes
    4*(t % 4) .. +3, as a [32, 4] uint8 tensor (byte 0 = least significant)."""
    return [rows16[t // 4, 4 * (t % 4):4 * (t % 4) + 4] for t in range(32)]


def as_s8(regs):
    return [r.to(torch.int8).long() for r in regs]


def as_s4(regs):
    out = []
    for r in regs:
        b = r.long()
        nib = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1)   # low nibble first
        out.append(torch.where(nib >= 8, nib - 16, nib))
    return out


def mma_k32(a_regs, b_regs):
    """mma.m16n8k32.s8 per the PTX fragment tables: a_regs[lane] = 4 regs of 4
    values, b_regs[lane] = 2 regs of 4 values. Returns D [16, 8]."""
    A = torch.zeros(16, 32, dtype=torch.long)
    B = torch.zeros(32, 8, dtype=torch.long)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            A[g + 8 * (r & 1), 16 * (r >> 1) + 4 * t:16 * (r >> 1) + 4 * t + 4] = a_regs[lane][r]
        for r in range(2):
            B[16 * r + 4 * t:16 * r + 4 * t + 4, g] = b_regs[lane][r]
    return A @ B


def mma_k64(a_regs, b_regs):
    """mma.m16n8k64.s4: a reg holds 8 consecutive k (low nibble first)."""
    A = torch.zeros(16, 64, dtype=torch.long)
    B = torch.zeros(64, 8, dtype=torch.long)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            A[g + 8 * (r & 1), 32 * (r >> 1) + 8 * t:32 * (r >> 1) + 8 * t + 8] = a_regs[lane][r]
        for r in range(2):
            B[32 * r + 8 * t:32 * r + 8 * t + 8, g] = b_regs[lane][r]
    return A @ B


def a_fragments(a_bytes: torch.Tensor):
    """ldmatrix.x4 of a 16-row x 32-byte k-step: (rows 0-7, bytes 0-15),
    (rows 8-15, 0-15), (rows 0-7, 16-31), (rows 8-15, 16-31) -> a0..a3."""
    mats = [ldmatrix(a_bytes[0:8, 0:16]), ldmatrix(a_bytes[8:16, 0:16]),
            ldmatrix(a_bytes[0:8, 16:32]), ldmatrix(a_bytes[8:16, 16:32])]
    return [[mats[r][lane] for r in range(4)] for lane in range(32)]


def i4w8_permute(codes32: torch.Tensor) -> torch.Tensor:
    """The activation layout of I4W8 (int_act.h): stored byte p of a 32-chunk."""
    p = torch.arange(32)
    q = p % 16
    return codes32[..., 8 * (q // 4) + 2 * (q % 4) + p // 16]


def to_bytes(v: torch.Tensor) -> torch.Tensor:
    return (v.long() & 0xFF).to(torch.uint8)


def test_fragments_int8_mode():
    """I8: ldmatrix of row-major int8 tiles feeds m16n8k32 with A[m, k], B[k, n]."""
    x = torch.randint(-127, 128, (16, 32), generator=gen(3))
    w = torch.randint(-127, 128, (8, 32), generator=gen(4))
    a = [as_s8(r) for r in a_fragments(to_bytes(x))]
    bmat0, bmat1 = ldmatrix(to_bytes(w)[:, 0:16]), ldmatrix(to_bytes(w)[:, 16:32])
    b = [as_s8([bmat0[lane], bmat1[lane]]) for lane in range(32)]
    assert torch.equal(mma_k32(a, b), x @ w.T)


def test_fragments_int4_mode():
    """I4: canonical int4 pairs, 32 bytes per row and k-step, m16n8k64."""
    x = torch.randint(-7, 8, (16, 64), generator=gen(5))
    w = torch.randint(-7, 8, (8, 64), generator=gen(6))
    xb, wb = to_bytes(pack_int4_pairs(x)), to_bytes(pack_int4_pairs(w))
    a = [as_s4(r) for r in a_fragments(xb)]
    bmat0, bmat1 = ldmatrix(wb[:, 0:16]), ldmatrix(wb[:, 16:32])
    b = [as_s4([bmat0[lane], bmat1[lane]]) for lane in range(32)]
    assert torch.equal(mma_k64(a, b), x @ w.T)


def test_fragments_int4_weights_on_int8_mma():
    """I4W8: permuted int8 activations, one 16-byte int4 chunk per k-step;
    low nibbles << 4 and high nibbles in place give 16 * w; sum >> 4 is exact."""
    x = torch.randint(-127, 128, (16, 32), generator=gen(7))
    w = torch.randint(-7, 8, (8, 32), generator=gen(8))
    a = [as_s8(r) for r in a_fragments(to_bytes(i4w8_permute(x)))]
    packed = ldmatrix(to_bytes(pack_int4_pairs(w)))        # 8 rows x 16 bytes
    b = []
    for lane in range(32):
        word = sum(int(v) << (8 * i) for i, v in enumerate(packed[lane].tolist()))
        lo, hi = (word << 4) & 0xF0F0F0F0, word & 0xF0F0F0F0
        regs = [torch.tensor([(r >> (8 * i)) & 0xFF for i in range(4)], dtype=torch.uint8)
                for r in (lo, hi)]
        b.append(as_s8(regs))
    d = mma_k32(a, b)
    assert bool((d % 16 == 0).all())
    assert torch.equal(d >> 4, x @ w.T)


def test_kernel_mode_choice():
    assert cia.kernel_mode(8, 8, (9, 0)) == cia.MODE_I8
    assert cia.kernel_mode(6, 4, (8, 0)) == cia.MODE_I8
    assert cia.kernel_mode(4, 4, (8, 9)) == cia.MODE_I4
    assert cia.kernel_mode(4, 4, (9, 0)) == cia.MODE_I4W8   # no int4 MMA on Hopper
    assert cia.kernel_mode(4, 8, (8, 0)) == cia.MODE_I4W8


def test_sm90_probe_refused_during_graph_capture(monkeypatch):
    # the probe allocates and synchronizes, which would break a capture
    monkeypatch.setattr(cia, "_SM90", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="outside CUDA-graph capture"):
        cia.sm90_available(torch.device("cuda", 0))
    monkeypatch.setattr(cia, "_SM90", {0: True})     # probed before: the answer is reused
    assert cia.sm90_available(torch.device("cuda", 0)) is True


def test_overflow_guard_and_registration():
    ok = make_intact(4, 4096, 8, 8, None)
    assert cia.overflow_reason(ok) is None
    big = make_intact(2, 140000, 8, 8, None)
    assert "overflow" in cia.overflow_reason(big)
    from vlmkern.ops import builtin  # noqa: F401
    names = [k.name for k in BACKENDS["cuda"].kernels]
    assert names.count("cuda.int_act") == 1
    assert BACKENDS["cuda"].auto is True                  # first choice on a GPU
    if not HAS_GPU:
        x = torch.randn(2, 4096)
        assert ops.which_kernel(x, ok) == "torch.int_act"


def test_wgmma_and_spread_kernels_registered_ahead_of_mma(monkeypatch):
    from vlmkern.ops import builtin  # noqa: F401
    specs = [k for k in BACKENDS["cuda"].kernels if k.op == "int_act"]
    assert [k.name for k in specs] == ["cuda.int_act_staged", "cuda.int_act_tma",
                                       "cuda.int_act_wgmma", "cuda.int_act_spread", "cuda.int_act"]
    assert specs[0].opt_in and specs[0].max_m == 32 and specs[0].bits == frozenset({6, 8})
    tma = specs[1]
    assert tma.opt_in and tma.min_sm == (9, 0) and tma.min_m == cia.TMA_MIN_M
    assert tma.bits == frozenset({6, 8})
    specs = specs[2:]
    spread = specs[1]
    assert not spread.opt_in and spread.max_m == cia.SPREAD_SELECT_MAX_M == 8
    assert cia.SPREAD_MAX_M == 64 and spread.min_sm == (8, 0)
    assert spread.bits == specs[2].bits
    # the plain GEMM leaves calls past its grid's limit (int_act.h) to other backends
    limit = re.search(r"#define VLMKERN_INT_ACT_MAX_M \((\d+)LL \* (\d+)\)",
                      (Path(__file__).parents[1] / "csrc" / "int_act.h").read_text())
    assert specs[2].max_m == cia.GEMM_MAX_M == int(limit[1]) * int(limit[2])
    wg = specs[0]
    assert wg.opt_in and wg.min_sm == (9, 0) and wg.min_m == cia.WGMMA_MIN_M
    assert wg.bits == frozenset({6, 8})                 # int8-stored weights only
    qw = make_intact(16, 256, 8, 8, None)
    x = torch.randn(128, 256)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert "opt-in only" in wg.rejects(x, qw)
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.int_act_wgmma")
    assert "runs on ['cuda']" in wg.rejects(x, qw)


def test_tma_kernel_takes_one_group_per_row(monkeypatch):
    from vlmkern.ops import builtin  # noqa: F401
    tma = next(k for k in BACKENDS["cuda"].kernels if k.name == "cuda.int_act_tma")
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.int_act_tma")
    monkeypatch.setattr(cia, "device_sm", lambda device: (9, 0))
    x = torch.randn(cia.TMA_MIN_M, 256)
    assert tma.check(x, make_intact(16, 256, 8, 8, None)) is None
    assert tma.check(x, make_intact(16, 256, 6, 6, 256)) is None       # one group spans K
    assert "one weight group per row" in tma.check(x, make_intact(16, 256, 8, 8, 128))
    assert "overflow" in tma.check(torch.randn(2, 140000), make_intact(2, 140000, 8, 8, None))


def tma_box(rows: torch.Tensor, r0: int, c0: int) -> torch.Tensor:
    """The 16 KB a TMA box of 128 rows x 128 bytes from (row r0, byte c0) of
    an int8 matrix writes with the 128-byte swizzle (16-byte chunk index XOR
    row % 8), zeros past its end."""
    n, k = rows.shape
    box = torch.zeros(128 * 128, dtype=torch.int8)
    i = torch.arange(128).unsqueeze(1)
    j = torch.arange(128).unsqueeze(0)
    addr = (i * 128 + j) ^ ((i % 8) << 4)
    src = torch.zeros(128, 128, dtype=torch.int8)
    part = rows[r0:r0 + 128, c0:c0 + 128]
    src[:part.shape[0], :part.shape[1]] = part
    box[addr.flatten()] = src.flatten()
    return box


def descriptor_rows(tile: torch.Tensor, start: int, n: int, step: int) -> torch.Tensor:
    """n rows x 32 bytes of k32 step `step` as a K-major 128-byte-swizzled
    wgmma descriptor starting at byte `start` reads them (8-row groups 1024
    bytes apart)."""
    r = torch.arange(n).unsqueeze(1)
    b = torch.arange(32).unsqueeze(0)
    addr = start + (r // 8) * 1024 + (r % 8) * 128 + 32 * step + b
    return tile[addr ^ (((addr >> 7) & 7) << 4)]


def tma_walk(m: int, n: int, resident: int):
    """(block, token tile start, channel tile start) of every tile each block
    of the persistent TMA GEMM computes, with the kernel's formulas: one
    cluster of two per resident slot (at most one per tile pair), cluster i
    taking tiles i, i + clusters, ..., tile t = channel tile t // pairs and
    token tiles 2 (t % pairs) + rank."""
    pairs, n_tiles = -(-m // 256), -(-n // 256)
    tiles = pairs * n_tiles
    clusters = min(tiles, resident)
    return [(2 * cl + rank, (t % pairs * 2 + rank) * 128, t // pairs * 256)
            for cl in range(clusters) for rank in range(2) for t in range(cl, tiles, clusters)]


@pytest.mark.parametrize("m, n, resident", [(4096, 37888, 66), (4096, 4608, 64), (129, 33, 66),
                                            (300, 600, 1), (1000, 5000, 7)])
def test_tma_persistent_walk_covers_every_tile_once(m, n, resident):
    walk = tma_walk(m, n, resident)
    real = [(m0, n0) for _, m0, n0 in walk if m0 < m]
    want = {(128 * i, 256 * j) for i in range(-(-m // 128)) for j in range(-(-n // 256))}
    assert len(real) == len(set(real)) and set(real) == want
    by_block = {}
    for block, m0, n0 in walk:
        by_block.setdefault(block, []).append((m0, n0))
    for b in range(0, len(by_block), 2):   # the two blocks of a cluster
        mine, peer = by_block[b], by_block[b + 1]
        assert [n0 for _, n0 in mine] == [n0 for _, n0 in peer]       # one weight tile shared
        assert all(p0 == m0 + 128 and m0 % 256 == 0 for (m0, _), (p0, _) in zip(mine, peer))


def test_tma_epilogue_tile_reads_back_what_each_thread_wrote():
    # int_act_sm90_tma_kernel.cu's [128][64] fp32 epilogue tile: consumer
    # thread (warpgroup c, warp w, lane) writes the pairs of columns
    # lc = 8jj + 2 (lane % 4) of rows 64c + 16w + lane / 4 (+ 8), 16-byte
    # piece i of row r at i ^ (r % 8); a reader takes row r's 8 columns from
    # 8g as pieces 2g and 2g + 1, so it must find them in column order.
    tile = torch.full((128 * 64,), -1, dtype=torch.int64)
    for c in range(2):
        for w in range(4):
            for lane in range(32):
                row, col = 64 * c + 16 * w + lane // 4, 2 * (lane % 4)
                for jj in range(8):
                    lc = 8 * jj + col
                    at = ((lc >> 2) ^ (row & 7)) * 4 + (lc & 3)
                    for r in (row, row + 8):
                        for e in range(2):
                            assert tile[r * 64 + at + e] == -1     # each place written once
                            tile[r * 64 + at + e] = r * 64 + lc + e
    for r in range(128):
        for g in range(8):
            got = [int(tile[r * 64 + ((2 * g + half) ^ (r & 7)) * 4 + i])
                   for half in range(2) for i in range(4)]
            assert got == [r * 64 + 8 * g + i for i in range(8)]


@pytest.mark.parametrize("m, n, k_pad, m0, n0, kt", [(300, 600, 320, 128, 256, 2),
                                                    (129, 33, 64, 0, 0, 0)])
def test_tma_tiles_reach_each_consumer_as_its_rows(m, n, k_pad, m0, n0, kt):
    # int_act_sm90_tma_kernel.cu: the stage holds the token box (A) and, at
    # 16 KB + 16 KB * rank, the weight box of cluster block `rank` (channels
    # n0 + 128 rank..); consumer c reads tokens 64c.. at 8 KB * c, and its two
    # m64n128 MMAs channels 128h.. at 16 KB + 16 KB * h.
    q = torch.randint(-127, 128, (m, k_pad), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k_pad), dtype=torch.int8)
    stage = torch.cat([tma_box(q, m0, 128 * kt)] + [tma_box(w, n0 + 128 * rank, 128 * kt)
                                                    for rank in range(2)])
    pad = torch.nn.functional.pad
    qz = pad(q, (0, 128 * (kt + 1) - k_pad if 128 * (kt + 1) > k_pad else 0, 0, 512))
    wz = pad(w, (0, 128 * (kt + 1) - k_pad if 128 * (kt + 1) > k_pad else 0, 0, 512))
    for step in range(4):
        cols = slice(128 * kt + 32 * step, 128 * kt + 32 * step + 32)
        for c in range(2):
            got = descriptor_rows(stage, 8192 * c, 64, step)
            assert torch.equal(got, qz[m0 + 64 * c:m0 + 64 * c + 64, cols]), (c, step)
        for h in range(2):
            got = descriptor_rows(stage, 16384 + 16384 * h, 128, step)
            assert torch.equal(got, wz[n0 + 128 * h:n0 + 128 * h + 128, cols]), (h, step)


def test_hopper_prefill_left_to_triton(monkeypatch):
    """On sm_90 the plain GEMM declines M >= TRITON_PREFILL_MIN_M for int8-stored
    weights when triton.int_act takes the call, and only then."""
    from vlmkern.ops import builtin  # noqa: F401
    plain = next(k for k in BACKENDS["cuda"].kernels if k.name == "cuda.int_act")
    triton = BACKENDS["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")          # Triton usable on this CPU
    monkeypatch.setattr(triton, "_status", None)          # re-probed, restored afterwards
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    monkeypatch.delenv("VLMKERN_DISABLE", raising=False)
    sm = {"value": (9, 0)}
    monkeypatch.setattr(cia, "device_sm", lambda device: sm["value"])
    big = cia.TRITON_PREFILL_MIN_M
    assert big == 1024
    w8 = make_intact(16, 256, 8, 8, None)
    x = torch.randn(big, 256)
    why = plain.check(x, w8)
    assert why is not None and "triton.int_act" in why and f"M={big}" in why
    assert plain.check(x[:big - 1], w8) is None
    assert plain.check(x, make_intact(16, 256, 6, 6, 64)) is not None   # W6A6, grouped
    assert plain.check(x, make_intact(16, 256, 4, 4, 64)) is None       # 4-bit weights stay
    assert plain.check(x, make_intact(16, 256, 8, 8, 48)) is None       # Triton rejects group 48
    sm["value"] = (8, 0)
    assert plain.check(x, w8) is None
    sm["value"] = (9, 0)
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    assert plain.check(x, w8) is None
    monkeypatch.delenv("VLMKERN_BACKEND")
    monkeypatch.setenv("VLMKERN_DISABLE", "triton.int_act")
    assert plain.check(x, w8) is None
    # the opt-in persistent TMA kernel counts too, also with the pointer kernel off
    # (on a Triton that has its host-side descriptors)
    monkeypatch.setattr("vlmkern.triton_kernels.int_act_tma.HAS_TENSOR_DESCRIPTORS", True)
    monkeypatch.setenv("VLMKERN_ENABLE", "triton.int_act_tma")
    assert "runs on triton.int_act_tma" in plain.check(x, w8)
    assert plain.check(x[:big - 1], w8) is None
    monkeypatch.delenv("VLMKERN_DISABLE")
    assert "runs on triton.int_act_tma" in plain.check(x, w8)
    monkeypatch.delenv("VLMKERN_ENABLE")
    monkeypatch.setattr(triton, "_status", (False, "triton is not installed"))
    assert plain.check(x, w8) is None


# -- GPU ------------------------------------------------------------------------------------
def check_close(y, x, qw, bias):
    """Integer sums are exact; only the fp32 epilogue (kernel) vs fp64
    (reference) differs, then one rounding to x's dtype."""
    ref = reference.int_act_matmul(x, qw, bias)
    qx, sx = reference.quantize_activations(x, qw.a_bits, qw.act_scale)
    mag = (qx.abs().double() * sx.double()[:, None]) @ qw.dequantize(torch.float64).abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    eps = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[x.dtype]
    tol = 1e-5 * mag + eps * ref.double().abs() + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref.double()).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}"


def act(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=gen(seed)).to("cuda", dtype)


def quantize_and_gemm(kw, gemm):
    """x -> the two ops for 8-bit activations and int8 weights ``kw`` (mode I8)."""
    lay = kw.layout

    def f(x):
        q, s = torch.ops.vlmkern.int_act_quantize(x, 8, None, lay.group, lay.group_pad,
                                                  lay.k_pad, 0)
        return torch.ops.vlmkern.int_act_gemm(q, s, kw.w, kw.w_scale_t, None, lay.group_pad, 0,
                                              x.dtype, gemm)
    return f


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa", ALL_WA)
@pytest.mark.parametrize("group", [None, 128, 32])
def test_gpu_awkward_shapes(wa, group):
    qw = make_intact(33, 200, *wa, group, seed=wa[0] * 10 + wa[1], device="cuda")
    bias = torch.randn(33, generator=gen(2)).cuda()
    for m, dtype in ((1, torch.float16), (3, torch.bfloat16), (16, torch.float32),
                     (17, torch.float16), (64, torch.bfloat16), (300, torch.float16)):
        x = act(m, 200, dtype, seed=m)
        check_close(cia.int_act_matmul(x, qw, bias), x, qw, bias)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa,group", [((8, 8), None), ((8, 8), 128), ((6, 6), 128),
                                      ((4, 4), 128), ((4, 4), None), ((4, 8), 128)])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_gpu_4096(wa, group, m):
    qw = make_intact(4096, 4096, *wa, group, seed=wa[0], device="cuda")
    bias = torch.randn(4096, generator=gen(3)).cuda().half()
    for dtype in (torch.float16, torch.bfloat16):
        x = act(m, 4096, dtype, seed=m)
        check_close(cia.int_act_matmul(x, qw, bias), x, qw, bias)


@gpu
@pytest.mark.gpu
def test_gpu_static_scale_nan_token_and_linear(monkeypatch):
    qw = make_intact(48, 320, 8, 8, 64, act_scale=0.02, seed=5, device="cuda")
    x = act(5, 320, torch.float16)
    check_close(cia.int_act_matmul(x, qw), x, qw, None)
    x[2, 7] = float("nan")
    x[3, 9] = float("inf")
    y = cia.int_act_matmul(x, qw)
    assert not bool(torch.isfinite(y[2]).any()) and not bool(torch.isfinite(y[3]).all())
    keep = [0, 1, 4]
    check_close(y[keep], x[keep], qw, None)
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    xs = act(4, 320, torch.bfloat16, seed=9)
    assert ops.which_kernel(xs, qw) == "cuda.int_act_spread"
    check_close(ops.linear(xs, qw), xs, qw, None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa", [(8, 8), (4, 4), (6, 4)])
def test_gpu_quantize_op_matches_reference(wa):
    k, group = 200, 64
    qw = make_intact(8, k, *wa, group, device="cuda")
    sm = torch.cuda.get_device_capability()
    mode = cia.kernel_mode(qw.w_bits, qw.a_bits, sm)
    lay = cia.padded_layout(k, group, mode)
    x = act(7, k, torch.float32) * 3
    x[1, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5, 0.0])
    x[2] = 0.0
    for scale in (None, 0.037):
        q, s = torch.ops.vlmkern.int_act_quantize(x, qw.a_bits, scale, lay.group, lay.group_pad,
                                                  lay.k_pad, mode)
        q0, s0 = reference.quantize_activations(x, qw.a_bits, scale)
        assert torch.equal(s.cpu(), s0.cpu())
        q = q.cpu()
        if mode == cia.MODE_I4:
            q = unpack_nibbles(q, lay.k_pad)
        elif mode == cia.MODE_I4W8:       # undo the chunk permutation
            chunks = q.long().reshape(q.shape[0], -1, 32)
            inv = torch.empty_like(chunks)
            p = torch.arange(32)
            inv[..., 8 * (p % 16 // 4) + 2 * (p % 4) + p // 16] = chunks
            q = inv.reshape(q.shape[0], -1)
        assert torch.equal(q[:, lay.positions()].long(), q0.cpu().long())
        assert bool((cia.pad_columns(q0.cpu(), lay).long() == q.long()).all())


@gpu
@pytest.mark.gpu
def test_gpu_batch_invariant_deterministic_and_routes_agree():
    qw = make_intact(512, 1024, 8, 8, None, seed=6, device="cuda")
    qg = make_intact(512, 1024, 4, 4, 128, seed=7, device="cuda")
    # per-channel 4-bit weights: the int4 MMA (W4A4) and the widened int4
    # weights (W4A8)
    q44 = make_intact(512, 1024, 4, 4, None, seed=8, device="cuda")
    q48 = make_intact(512, 1024, 4, 8, None, seed=9, device="cuda")
    x = act(600, 1024, torch.bfloat16)
    for w in (qw, qg, q44, q48):
        full = cia.int_act_matmul(x, w)
        for m in (1, 3, 16, 17, 64, 300):          # every tile configuration
            assert torch.equal(cia.int_act_matmul(x[:m], w), full[:m])
        assert torch.equal(cia.int_act_matmul(x, w), full)
    a = cia.int_act_matmul(x, qw, path="mma")
    b = cia.int_act_matmul(x, qw, path="int_mm")
    assert torch.equal(a, b)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa", ALL_WA)
@pytest.mark.parametrize("group", [None, 128, 32])
def test_gpu_spread_equals_mma_bitwise(wa, group):
    # ragged N and K; K spans many k-tiles so a rotated start wraps around;
    # both spread tile shapes (M <= 16, M <= 64) and the plain GEMM above them
    qw = make_intact(200, 1000, *wa, group, seed=wa[0] + wa[1], device="cuda")
    bias = torch.randn(200, generator=gen(4)).cuda()
    got, x = assert_same_bits_as_mma("spread", qw, (bias,),
                                     ((1, torch.float16), (3, torch.bfloat16), (16, torch.float32),
                                      (17, torch.float16), (64, torch.bfloat16), (65, torch.float16)))
    check_close(got, x, qw, bias)


@gpu
@pytest.mark.gpu
def test_gpu_spread_batch_invariant_and_selected(monkeypatch):
    qw = make_intact(512, 1024, 8, 8, None, seed=6, device="cuda")
    x = act(64, 1024, torch.float16)
    full = assert_batch_invariant("spread", qw, x, (1, 3, 16, 17, 63))
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x[:8], qw) == "cuda.int_act_spread"     # decode sizes
    assert ops.which_kernel(x[:9], qw) == "cuda.int_act"
    assert torch.equal(ops.linear(x[:8], qw), full[:8])


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_input_errors():
    qw = make_intact(16, 64, 8, 8, None, device="cuda")
    with pytest.raises(ValueError, match="must be \\[M, 64\\]"):
        cia.int_act_matmul(torch.randn(2, 63, device="cuda"), qw)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        cia.int_act_matmul(torch.randn(2, 64, device="cuda", dtype=torch.float64), qw)
    with pytest.raises(ValueError, match="same CUDA device"):
        cia.int_act_matmul(torch.randn(2, 64), qw)
    lay = cia.padded_layout(64, None, cia.MODE_I8)
    q, s = torch.ops.vlmkern.int_act_quantize(torch.randn(2, 64, device="cuda"), 8, None,
                                              lay.group, lay.group_pad, lay.k_pad, 0)
    with pytest.raises(RuntimeError, match="w_scale_t must have shape"):
        torch.ops.vlmkern.int_act_gemm(q, s, qw.qweight, torch.ones(1, 15, device="cuda"), None,
                                       lay.group_pad, 0, torch.float16)
    with pytest.raises(RuntimeError, match="a_bits must be 4, 6 or 8"):
        torch.ops.vlmkern.int_act_quantize(torch.randn(2, 64, device="cuda"), 5, None, 64, 64,
                                           64, 0)
    with pytest.raises(RuntimeError, match="group_pad"):
        torch.ops.vlmkern.int_act_quantize(torch.randn(2, 64, device="cuda"), 8, None, 64, 48,
                                           64, 0)


@gpu
@pytest.mark.gpu
def test_gpu_ops_trace_under_torch_compile():
    qw = make_intact(64, 256, 8, 8, 128, device="cuda")
    f = quantize_and_gemm(cia.to_kernel_weight(qw, cia.MODE_I8), cia.GEMM_MMA)
    x = act(5, 256, torch.float16)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


_WGMMA = _SKIP is None and cia.sm90_available(torch.device("cuda"))
wgmma_gpu = pytest.mark.skipif(not _WGMMA, reason=_SKIP or "needs sm_90 and a build with sm_90a code")


def assert_same_bits_as_mma(path, qw, biases, cases):
    """``path``'s output equals the mma.sync GEMM's, bit for bit, for every
    (M, dtype) of ``cases`` and bias of ``biases``; returns the last output
    and its input."""
    k = qw.in_features
    for m, dtype in cases:
        x = act(m, k, dtype, seed=m)
        for b in biases:
            want = cia.int_act_matmul(x, qw, b, path="mma")
            got = cia.int_act_matmul(x, qw, b, path=path)
            assert torch.equal(got, want), (f"{path}: n={qw.out_features} k={k} m={m} {dtype} "
                                            f"bias={b is not None}: {mismatch_pattern(got, want)}")
    return got, x


def assert_batch_invariant(path, qw, x, ms):
    """The first m rows of ``path``'s output for x equal its output for x[:m],
    bit for bit, for every m in ``ms``; returns the output for all of x."""
    full = cia.int_act_matmul(x, qw, path=path)
    for m in ms:
        assert torch.equal(cia.int_act_matmul(x[:m], qw, path=path), full[:m]), (path, m)
    return full


def assert_selected_only_when_enabled(monkeypatch, name, qw, x, x_outside, want):
    """On the CUDA backend the opt-in kernel ``name`` runs x only when named
    in VLMKERN_ENABLE (giving ``want``), and x_outside (an M outside its
    range) falls back to cuda.int_act."""
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(x, qw) == "cuda.int_act"
    monkeypatch.setenv("VLMKERN_ENABLE", name)
    assert ops.which_kernel(x, qw) == name
    assert ops.which_kernel(x_outside, qw) == "cuda.int_act"
    assert torch.equal(ops.linear(x, qw), want)


def mismatch_pattern(got, want) -> str:
    """Where two outputs differ, in terms a tile-layout bug shows up in: the
    count, the first few (row, column) pairs, and which residues of the row
    mod 64 / 8 and column mod 128 / 8 are hit."""
    bad = ~((got == want) | (got.isnan() & want.isnan()))
    rows, cols = bad.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return "no mismatch"
    pairs = list(zip(rows[:6].tolist(), cols[:6].tolist()))
    return (f"{rows.numel()} of {bad.numel()} differ, first {pairs}; rows mod 64 "
            f"{sorted(set((rows % 64).tolist()))[:16]}, rows mod 8 {sorted(set((rows % 8).tolist()))}, "
            f"cols mod 128 {sorted(set((cols % 128).tolist()))[:16]}, "
            f"cols mod 8 {sorted(set((cols % 8).tolist()))}")


@wgmma_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa", [(8, 8), (6, 6), (8, 4), (6, 8)])
@pytest.mark.parametrize("group", [None, 128, 32])
def test_gpu_wgmma_equals_mma_bitwise(wa, group):
    # Exact int32 sums and the same epilogue: both GEMMs give the same bits,
    # at tile-ragged shapes (M, N, K off the 128 tiles; K past one 128-byte tile;
    # k=320: the last 128-byte tile half zero-filled)
    for n, k in ((33, 200), (129, 320), (300, 1000), (256, 4096)):
        qw = make_intact(n, k, *wa, group, seed=n + k, device="cuda")
        bias = torch.randn(n, generator=gen(4)).cuda()
        got, x = assert_same_bits_as_mma("wgmma", qw, (None, bias),
                                         ((64, torch.float16), (65, torch.bfloat16),
                                          (300, torch.float32), (1000, torch.float16)))
        check_close(got, x, qw, bias)


@wgmma_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path, min_m", [("wgmma", cia.WGMMA_MIN_M), ("tma", cia.TMA_MIN_M)])
def test_gpu_hopper_batch_invariant_selected_and_traceable(monkeypatch, path, min_m):
    qw = make_intact(512, 1024, 8, 8, None, seed=6, device="cuda")
    x = act(700, 1024, torch.bfloat16)
    full = assert_batch_invariant(path, qw, x, (64, 128, 129, 256, 300))
    assert torch.equal(cia.int_act_matmul(x, qw, path=path), full)
    assert_selected_only_when_enabled(monkeypatch, f"cuda.int_act_{path}", qw, x, x[:min_m - 1],
                                      full)
    f = quantize_and_gemm(cia.to_kernel_weight(qw, cia.MODE_I8), cia._GEMM_OF_PATH[path])
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_wgmma_bad_input_errors():
    qw = make_intact(16, 64, 8, 8, None, device="cuda")
    q4 = make_intact(16, 64, 4, 8, None, device="cuda")
    x = torch.randn(128, 64, device="cuda")
    with pytest.raises(ValueError, match="int8"):
        cia.int_act_matmul(x, q4, path="wgmma")
    with pytest.raises(ValueError, match="path must be one of"):
        cia.int_act_matmul(x, qw, path="tmaa")
    lay = cia.padded_layout(64, None, cia.MODE_I8)
    q, s = torch.ops.vlmkern.int_act_quantize(x, 8, None, lay.group, lay.group_pad, lay.k_pad, 0)
    w_scale = qw.scales.float().t().contiguous()
    with pytest.raises(RuntimeError, match="gemm must be 0"):
        torch.ops.vlmkern.int_act_gemm(q, s, qw.qweight, w_scale, None, lay.group_pad, 0,
                                       torch.float16, 4)
    with pytest.raises(RuntimeError, match="takes mode 0"):
        torch.ops.vlmkern.int_act_gemm(q, s, qw.qweight, w_scale, None, lay.group_pad, 2,
                                       torch.float16, 1)
    if not _WGMMA:   # off Hopper (or without sm_90a code) the launcher refuses it
        with pytest.raises((RuntimeError, ValueError)):
            cia.int_act_matmul(x, qw, path="wgmma")


@wgmma_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("wa", [(8, 8), (6, 6), (8, 4), (6, 8)])
def test_gpu_tma_equals_mma_bitwise(wa):
    # Token tiles of 128 in clusters of two: M = 300 leaves a padding block in
    # its last cluster, M = 129 a block of one token; N off the 256 tile and
    # off the 128-row half each block copies; K past one 128-byte tile, and
    # k = 320 ends in a half zero-filled tile. A group as long as the row is
    # one group per row.
    for n, k, group in ((33, 200, None), (129, 320, None), (300, 1000, 1000), (600, 4096, None)):
        qw = make_intact(n, k, *wa, group, seed=n + k, device="cuda")
        bias = torch.randn(n, generator=gen(4)).cuda()
        got, x = assert_same_bits_as_mma("tma", qw, (None, bias),
                                         ((129, torch.float16), (256, torch.bfloat16),
                                          (300, torch.float32), (1000, torch.float16)))
        check_close(got, x, qw, bias)


@wgmma_gpu
@pytest.mark.gpu
def test_gpu_tma_clusters_walk_many_tiles():
    # 9 token-tile pairs x 18 channel tiles: more tiles than the clusters a
    # GPU holds, so each cluster walks several, its pipeline running on from
    # one tile into the next; odd token tiles (2100 = 16 x 128 + 52)
    qw = make_intact(4608, 256, 8, 8, None, seed=9, device="cuda")
    bias = torch.randn(4608, generator=gen(5)).cuda()
    got, x = assert_same_bits_as_mma("tma", qw, (bias,), ((2100, torch.bfloat16),))
    check_close(got, x, qw, bias)


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_tma_bad_input_errors():
    grouped = make_intact(16, 256, 8, 8, 128, device="cuda")
    x = torch.randn(256, 256, device="cuda")
    with pytest.raises(ValueError, match="one weight group per row|sm_90"):
        cia.int_act_matmul(x, grouped, path="tma")
    lay = cia.padded_layout(256, 128, cia.MODE_I8)
    kw = cia.to_kernel_weight(grouped, cia.MODE_I8)
    q, s = torch.ops.vlmkern.int_act_quantize(x, 8, None, lay.group, lay.group_pad, lay.k_pad, 0)
    with pytest.raises(RuntimeError, match="one weight group per row"):
        torch.ops.vlmkern.int_act_gemm(q, s, kw.w, kw.w_scale_t, None, lay.group_pad, 0,
                                       torch.float16, cia.GEMM_TMA)


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @gpu
    @pytest.mark.gpu
    def test_sanitizer_smoke():
        # ragged rows, columns and tokens through every mode and tile shape
        for wa, group in (((8, 8), None), ((8, 8), 32), ((6, 6), 128), ((4, 4), None),
                          ((4, 8), 32)):
            qw = make_intact(33, 200, *wa, group, seed=wa[0], device="cuda")
            bias = torch.randn(33, generator=gen(2)).cuda()
            for m in (1, 17, 300):
                cia.int_act_matmul(act(m, 200, torch.float16, seed=m), qw, bias)
            for m in (1, 17, 64):
                cia.int_act_matmul(act(m, 200, torch.bfloat16, seed=m), qw, bias, path="spread")
            if cia.sm90_available(torch.device("cuda")) and wa[0] >= 6:
                cia.int_act_matmul(act(130, 200, torch.bfloat16), qw, bias, path="wgmma")
                if group is None:
                    cia.int_act_matmul(act(300, 200, torch.float16), qw, bias, path="tma")
        if cia.sm90_available(torch.device("cuda")):   # clusters walking several tiles
            qw = make_intact(4608, 200, 8, 8, None, seed=1, device="cuda")
            cia.int_act_matmul(act(2100, 200, torch.float16), qw, path="tma")
        torch.cuda.synchronize()


@pytest.mark.parametrize("make", [
    lambda: torch.randn(1, 5).t(),                  # one column: strides (1, 5)
    lambda: torch.randn(6, 5).t(),                  # transposed
    lambda: torch.randn(5, 1).expand(5, 3),         # broadcast rows
    lambda: torch.randn(20).unfold(0, 4, 2),        # overlapping windows
    lambda: torch.randn(5, 8)[:, ::2],              # column stride 2
])
def test_dense_rows_gives_what_the_launchers_check(make):
    # the bindings take x with unit column stride and rows that do not overlap
    from vlmkern.ops.cuda_common import dense_rows
    x = make()
    d = dense_rows(x)
    assert d.stride(1) == 1 and (d.shape[0] <= 1 or d.stride(0) >= d.shape[1])
    assert torch.equal(d, x)
