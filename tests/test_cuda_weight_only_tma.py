"""Warp-specialized Hopper weight-only kernel (csrc/weight_only_sm90_tma_kernel.cu,
cuda.weight_only_tma).

On any machine: its registration (opt-in, M >= 17, sm_90); the persistent
clusters' walk (the kernel's index arithmetic in Python: every (row block,
token tile, K slice) is computed by exactly one thread block, and the two
blocks of a cluster share their tokens and hold adjacent row blocks); its K
slices (every chunk in exactly one slice, none empty) and their count; and
its token tiles of 64 and 128 tokens: the two blocks' TMA boxes, placed with
the 128-byte swizzle, read back through the wgmma descriptors as the
activations. On an sm_90 GPU with a build holding 9.0a code: against the
dense fp64 product at awkward and real sizes and every slice count, batch
invariance, determinism, selection, torch.compile and errors.
"""
import os

import pytest
import torch
from test_cuda_weight_only import act, assert_matches_dense, make_weight
from test_cuda_weight_only_sm90 import (AWKWARD, TOKEN_TILE_CASES, check_hopper_op_errors,
                                        descriptor_read, sm90, token_step)

from vlmkern.ops import cuda_weight_only_sm90 as wg


def test_registered_opt_in_for_prefill(monkeypatch):
    from vlmkern.ops.builtin import CUDA
    spec = next(k for k in CUDA.kernels if k.name == "cuda.weight_only_tma")
    assert spec.opt_in and spec.min_m == wg.TMA_MIN_M == 17 and spec.max_m is None
    assert spec.min_sm == (9, 0) and spec.bits == frozenset({2, 3, 4}) and spec.laid_out
    names = [k.name for k in CUDA.kernels]
    assert names.index("cuda.weight_only_tma") < names.index("cuda.dequant_cublas")
    x = torch.zeros(17, 256, dtype=torch.float16)
    qw = make_weight(64, 256, 4, 64, False)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert "opt-in only" in spec.rejects(x, qw)
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.weight_only_tma")
    assert "runs on ['cuda']" in spec.rejects(x, qw)


def tile_tokens(m: int) -> int:
    """The kernel's token tile for a launch of M tokens."""
    return 64 if m <= 64 else 128


def unit_of(u: int, rank: int, m: int, blocks: int, splits: int, group_tiles: int = 16):
    """(row block, first token, K slice) of work unit u for block `rank` of
    its cluster, with the kernel's formulas: slice by slice, groups of token
    tiles walked row pair by row pair."""
    tokens = tile_tokens(m)
    tiles, pairs = -(-m // tokens), (blocks + 1) // 2
    per_slice, per_group = tiles * pairs, group_tiles * pairs
    slice_, cluster = u // per_slice, u % per_slice
    first_tile = cluster // per_group * group_tiles
    in_group = min(group_tiles, tiles - first_tile)
    rest = cluster % per_group
    return 2 * (rest // in_group) + rank, (first_tile + rest % in_group) * tokens, slice_


def walk(m: int, blocks: int, splits: int, resident: int):
    """Per cluster, the units its two blocks compute, in order: cluster i of
    min(units, resident) takes units i, i + clusters, ..."""
    units = -(-m // tile_tokens(m)) * ((blocks + 1) // 2) * splits
    clusters = min(units, resident)
    return [[(unit_of(u, 0, m, blocks, splits), unit_of(u, 1, m, blocks, splits))
             for u in range(i, units, clusters)] for i in range(clusters)]


@pytest.mark.parametrize("m, blocks, splits, resident",
                         [(65, 1, 1, 66), (300, 3, 2, 66), (4096, 296, 1, 66), (2100, 28, 1, 64),
                          (130, 36, 3, 66), (17, 1, 1, 66), (64, 296, 1, 66), (33, 37, 4, 5)])
def test_walk_covers_every_tile_once_and_pairs_row_blocks(m, blocks, splits, resident):
    tokens = tile_tokens(m)
    units = [pair for cluster in walk(m, blocks, splits, resident) for pair in cluster]
    done = [w for pair in units for w in pair if w[0] < blocks]
    want = {(b, t * tokens, y) for b in range(blocks) for t in range(-(-m // tokens))
            for y in range(splits)}
    assert len(done) == len(set(done)) and set(done) == want
    # copy-only blocks past the last row block
    assert 2 * len(units) - len(done) == (blocks % 2) * -(-m // tokens) * splits
    for rank0, rank1 in units:   # one token tile and slice, adjacent row blocks
        assert rank0[1:] == rank1[1:] and rank1[0] == rank0[0] + 1 and rank0[0] % 2 == 0
    # the units running at once share one token group (L2)
    if m >= 16 * 128 and blocks > 8:
        first = [cluster[0][0] for cluster in walk(m, blocks, splits, resident)[:16]]
        assert {m0 for _, m0, _ in first} == {t * 128 for t in range(16)}


def place_token_tile_by_tma(x: torch.Tensor, m0: int, c: int, tokens: int) -> torch.Tensor:
    """The stage bytes of chunk c for tokens m0.. as the two blocks of a
    cluster copy them: block `rank`'s TMA box h (64 columns x tokens / 2 token
    rows from column 128c + 64h, row m0 + rank * tokens / 2) lands at
    h * (half tile) + rank * tokens / 2 * 128 in both blocks, with the 128-byte
    swizzle (16-byte chunk index XOR row % 8) and zeros past M and K; int16
    halves."""
    m, k = x.shape
    half, part = tokens * 128, tokens // 2
    stage = torch.full((half,), -1, dtype=torch.int16)
    xi = x.view(torch.int16)
    for rank in range(2):
        for h in range(2):
            for i in range(part):
                row, dst_row = m0 + part * rank + i, part * rank + i
                for j in range(64):
                    col = 128 * c + 64 * h + j
                    addr = h * half + dst_row * 128 + 2 * j
                    addr ^= ((addr >> 7) & 7) << 4
                    stage[addr // 2] = xi[row, col] if row < m and col < k else 0
    return stage


@pytest.mark.parametrize("m, m0, k, c", TOKEN_TILE_CASES + [(64, 0, 200, 1), (17, 0, 130, 0)])
def test_tma_token_tile_is_read_back_as_the_activations(m, m0, k, c):
    # what the consumers' wgmma descriptors read (the cp.async kernel's
    # descriptors, checked in test_cuda_weight_only_sm90) is the token tile
    tokens = tile_tokens(m)
    x = torch.randn(m, k).half()
    stage = place_token_tile_by_tma(x, m0, c, tokens)
    for kt in range(8):
        assert torch.equal(descriptor_read(stage, kt, tokens), token_step(x, m0, c, kt, tokens)), \
            f"k16 step {kt}"


@pytest.mark.parametrize("chunks", [1, 4, 7, 28, 148])
def test_k_slices_cover_every_chunk_once(chunks):
    # the kernel's slice bounds: chunks [y * C / splits, (y + 1) * C / splits)
    for splits in range(1, chunks + 1):
        bounds = [(y * chunks // splits, (y + 1) * chunks // splits) for y in range(splits)]
        assert all(lo < hi for lo, hi in bounds)
        assert [c for lo, hi in bounds for c in range(lo, hi)] == list(range(chunks))


def test_slice_count_fills_small_layers_and_leaves_large_ones_whole():
    # on 132 SMs: Qwen2-VL-7B qkv (36 row blocks, 28 chunks) and down
    # projection (28 row blocks, 148 chunks) at batch sizes are cut to fill
    # one wave; the gate/up projection (296 row blocks) and a prefill batch
    # are not; a slice keeps at least 4 chunks
    assert wg.tma_splits_for(64, 4608, 28, 132) == 3
    assert wg.tma_splits_for(17, 3584, 148, 132) == 4
    assert wg.tma_splits_for(64, 37888, 28, 132) == 1
    assert wg.tma_splits_for(4096, 4608, 28, 132) == 1
    assert wg.tma_splits_for(64, 128, 8, 132) == 2          # 4 chunks a slice at least
    assert wg.tma_splits_for(64, 128, 3, 132) == 1
    # constant over M within a tile width: batch invariance up to 64 tokens
    assert len({wg.tma_splits_for(m, 4608, 28, 132) for m in range(1, 65)}) == 1


@sm90
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn, ms", [(wg.weight_only_tma, (1, 17, 64, 65, 127, 128, 129, 300)),
                                    (wg.weight_only_tma_decode, (1, 3, 8, 16))])
def test_kernel_awkward_shapes(bits, dtype, fn, ms):
    # odd row-block counts leave a copy-only block in the last cluster; M
    # off the token tile; K off the 128-column chunk; groups of one scale slot
    # a chunk (128) and more; the prefill tiles and the decode path
    for n, k in AWKWARD:
        for group in (16, 32, 64, 128, None):
            for sym in (True, False):
                qw = make_weight(n, k, bits, group, sym, scale_dtype=dtype, seed=n * k + bits,
                                 device="cuda")
                w = qw.dequantize(torch.float32)
                bias = torch.randn(n, device="cuda")
                for m in ms:
                    x = act(m, k, dtype, seed=m)
                    for b in (None, bias):
                        y = fn(x, qw, b)
                        try:
                            assert_matches_dense(y, x, w, b)
                        except AssertionError as e:
                            raise AssertionError(f"n={n} k={k} group={group} sym={sym} m={m} "
                                                 f"bias={b is not None}: {e}") from None


@sm90
@pytest.mark.parametrize("k, n", [(4096, 4096), (3584, 4608)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_real_sizes(k, n, bits):
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, bits, 128, False, scale_dtype=dtype, seed=bits, device="cuda")
        w = qw.dequantize(torch.float32)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        for m in (17, 64, 65, 256, 1000, 2100):
            x = act(m, k, dtype, seed=m)
            assert_matches_dense(wg.weight_only_tma(x, qw, bias), x, w, bias)


@sm90
@pytest.mark.parametrize("m", [5, 64, 200])
def test_every_slice_count_matches_dense(m):
    # K slices of every length from one chunk up, partial sums added by the
    # second kernel (bias there too); 19 chunks, N off the 8-row store
    for bits in (2, 4):
        qw = make_weight(300, 2400, bits, 128, False, seed=m + bits, device="cuda")
        w = qw.dequantize(torch.float32)
        bias = torch.randn(300, device="cuda", dtype=torch.float16)
        x = act(m, 2400, torch.float16, seed=m)
        for splits in (1, 2, 3, 5, 19):
            assert_matches_dense(wg.weight_only_tma(x, qw, bias, splits=splits), x, w, bias)


@sm90
@pytest.mark.parametrize("fn, m", [(wg.weight_only_tma, 70), (wg.weight_only_tma_decode, 7)])
def test_fp32_scales_group256_and_act_order(fn, m):
    # the prefill tiles and the decode path
    for group, perm, sd in ((256, True, torch.float32), (64, True, torch.bfloat16)):
        qw = make_weight(200, 1000, 4, group, False, scale_dtype=sd, perm=perm, device="cuda")
        w = qw.dequantize(torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            x = act(m, 1000, dtype)
            assert_matches_dense(fn(x, qw), x, w, None)


@sm90
@pytest.mark.parametrize("k, n", [(3584, 4608), (200, 33)])
def test_batch_invariance_and_determinism(k, n):
    # A token's sums depend only on its place in its token tile, the tile
    # width and the slice count: at a given slice count, any prefix of a
    # batch, and any part cut at a tile boundary, gives the batch's bits
    # within one tile width (64 tokens up to M = 64, else 128).
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, 4, 128, False, scale_dtype=dtype, device="cuda")
        for total, ms in ((300, (65, 128, 200)), (64, (1, 17, 33))):
            x = act(total, k, dtype)
            full = wg.weight_only_tma(x, qw)
            assert torch.equal(full, wg.weight_only_tma(x, qw))   # run to run
            for m in ms:
                splits = wg.tma_splits_for(m, n, -(-k // 128), 132)
                assert torch.equal(wg.weight_only_tma(x[:m].clone(), qw, splits=splits),
                                   wg.weight_only_tma(x, qw, splits=splits)[:m]), m
        x = act(300, k, dtype)
        assert torch.equal(wg.weight_only_tma(x[128:].clone(), qw, splits=1),
                           wg.weight_only_tma(x, qw, splits=1)[128:])


@sm90
def test_selected_by_linear_when_enabled(monkeypatch):
    from vlmkern import ops
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    qw = make_weight(384, 256, 3, 64, False, device="cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(act(65, 256, torch.float16), qw) == "cuda.dequant_cublas"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.weight_only_tma")
    assert ops.which_kernel(act(16, 256, torch.float16), qw) != "cuda.weight_only_tma"
    assert ops.which_kernel(act(17, 256, torch.float16), qw) == "cuda.weight_only_tma"
    assert ops.which_kernel(act(65, 256, torch.float16), qw) == "cuda.weight_only_tma"
    x = act(300, 256, torch.bfloat16).reshape(3, 100, 256)
    assert_matches_dense(ops.linear(x, qw).reshape(300, 384), x.reshape(300, 256),
                         qw.dequantize(torch.float32), None)


@sm90
def test_traceable_by_torch_compile():
    from vlmkern.ops import cuda_weight_only as cw
    qw = make_weight(96, 384, 3, 64, False, device="cuda")
    mw = cw.kernel_weight(qw, torch.bfloat16)

    def f(x):
        return torch.ops.vlmkern.weight_only_tma(x, mw.wq, mw.sz, None, 3, 96, mw.slot_log2) * 2

    x = act(190, 384, torch.bfloat16)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
    meta = torch.ops.vlmkern.weight_only_tma(x.to("meta"), mw.wq.to("meta"), mw.sz.to("meta"),
                                             None, 3, 96, mw.slot_log2, 2)
    assert meta.shape == (190, 96) and meta.dtype == torch.bfloat16


@sm90
@pytest.mark.cpp_checks
def test_bad_inputs_give_clear_errors():
    check_hopper_op_errors(torch.ops.vlmkern.weight_only_tma, wg.weight_only_tma)
    qw = make_weight(64, 2000, 4, 128, False, device="cuda")       # 16 chunks
    for splits in (0, 17):
        with pytest.raises(RuntimeError, match="splits must be in 1..16"):
            wg.weight_only_tma(act(17, 2000, torch.float16), qw, None, splits)


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @sm90
    def test_sanitizer_smoke():
        for bits in (2, 3, 4):
            qw = make_weight(130, 203, bits, 64, False, device="cuda")
            for m, splits in ((1, 2), (129, 1)):
                for dtype in (torch.float16, torch.bfloat16):
                    wg.weight_only_tma(act(m, 203, dtype), qw, torch.randn(130, device="cuda"),
                                       splits=splits)
        # 17 token tiles x 5 row pairs: more units than resident clusters
        qw = make_weight(1100, 203, 4, 64, False, device="cuda")
        wg.weight_only_tma(act(2100, 203, torch.float16), qw, splits=1)
        torch.cuda.synchronize()
