"""Decode path of the warp-specialized Hopper weight-only kernel
(csrc/weight_only_sm90_tma_kernel.cu with the 16-token tile,
cuda.weight_only_tma_decode).

On any machine: its registration (opt-in, M <= 16, sm_90); the decode walk
(the kernel's stream-K index arithmetic in Python: every (row block, chunk)
is computed exactly once, the two blocks of a cluster walk the same
segments, and the part that sums a split row block finds every other part
in the workspace slot its writer used); the 16-token tile's TMA boxes read
back through the wgmma descriptors. On an sm_90 GPU with a build holding
9.0a code: against the dense fp64 product at awkward and real sizes and with
few to many clusters per row block, the counters left zero, batch
invariance, determinism, selection, torch.compile and errors (awkward sizes,
fp32 scales, groups of 256 and act-order: in test_cuda_weight_only_tma).
"""
import os

import pytest
import torch
from test_cuda_weight_only import act, assert_matches_dense, make_weight
from test_cuda_weight_only_sm90 import descriptor_read, sm90, token_step
from test_cuda_weight_only_tma import place_token_tile_by_tma

from vlmkern.ops import cuda_weight_only_sm90 as wg


def test_registered_opt_in_for_decode(monkeypatch):
    from vlmkern.ops.builtin import CUDA
    names = [k.name for k in CUDA.kernels]
    spec = CUDA.kernels[names.index("cuda.weight_only_tma_decode")]
    assert spec.opt_in and spec.min_m == 1 and spec.max_m == wg.DECODE_MAX_M == 16
    assert spec.min_sm == (9, 0) and spec.bits == frozenset({2, 3, 4}) and spec.laid_out
    assert names.index("cuda.weight_only_tma_decode") < names.index("cuda.weight_only_post_scale")
    x = torch.zeros(16, 256, dtype=torch.float16)
    qw = make_weight(64, 256, 4, 64, False)
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert "opt-in only" in spec.rejects(x, qw)
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.weight_only_tma_decode")
    assert "runs on ['cuda']" in spec.rejects(x, qw)


def range_start(q: int, total: int, clusters: int) -> int:
    return q * total // clusters


def range_owner(u: int, total: int, clusters: int) -> int:
    return ((u + 1) * clusters - 1) // total


def segments(q: int, blocks: int, chunks: int, clusters: int, rank: int):
    """DecodeWalk of cluster q for block `rank`: (row block, c0, c1, opens_range)."""
    total = (blocks + 1) // 2 * chunks
    start = pos = range_start(q, total, clusters)
    end = range_start(q + 1, total, clusters)
    out = []
    while pos < end:
        pair = pos // chunks
        c0 = pos - pair * chunks
        c1 = min(chunks, c0 + end - pos)
        out.append((2 * pair + rank, c0, c1, pos == start))
        pos = pair * chunks + c1
    return out


@pytest.mark.parametrize("blocks, chunks, clusters",
                         [(296, 28, 66), (36, 28, 66), (28, 148, 60), (1, 2, 2), (3, 5, 7),
                          (7, 1, 3), (5, 9, 45), (2, 3, 1)])
def test_decode_walk_covers_every_chunk_once_and_finds_every_part(blocks, chunks, clusters):
    total = (blocks + 1) // 2 * chunks
    clusters = min(clusters, total)          # the launch never starts more
    done, written = [], {}                   # written[b]: [(cluster, slot)] of split row blocks
    for q in range(clusters):
        rank0, rank1 = (segments(q, blocks, chunks, clusters, r) for r in (0, 1))
        assert rank0 and [s[1:] for s in rank0] == [s[1:] for s in rank1]
        slots = []
        for b, c0, c1, opens in rank0 + rank1:
            assert 0 <= c0 < c1 <= chunks
            if b >= blocks:
                continue                     # the copy-only block of an odd last pair
            done += [(b, c) for c in range(c0, c1)]
            if (c0, c1) != (0, chunks):      # finished by finish_part
                slot = 0 if opens else 1
                slots.append((b % 2, slot))
                written.setdefault(b, []).append((q, slot))
        assert len(slots) == len(set(slots))  # a block's two slots hold different pairs
    assert sorted(done) == [(b, c) for b in range(blocks) for c in range(chunks)]
    for b in range(blocks):
        pair = b // 2
        first = range_owner(pair * chunks, total, clusters)
        parts = range_owner(pair * chunks + chunks - 1, total, clusters) - first + 1
        if parts == 1:
            assert b not in written           # stored straight from the sums
            continue
        first_slot = 0 if range_start(first, total, clusters) // chunks == pair else 1
        read = [(first, first_slot)] + [(first + q, 0) for q in range(1, parts)]
        assert read == written[b], b          # in cluster order, each where it was written


def test_decode_walk_balances_the_gate_up_layer():
    # 148 row pairs x 28 chunks on 66 clusters: every range within one chunk
    # of the mean, where whole pairs would run 3 rounds for 2.24 rounds of work
    lengths = [sum(c1 - c0 for _, c0, c1, _ in segments(q, 296, 28, 66, 0)) for q in range(66)]
    assert sum(lengths) == 148 * 28 and max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("m, k, c", [(1, 200, 1), (3, 130, 0), (16, 256, 1), (9, 1000, 7)])
def test_decode_token_tile_is_read_back_as_the_activations(m, k, c):
    x = torch.randn(m, k).half()
    stage = place_token_tile_by_tma(x, 0, c, 16)
    for kt in range(8):
        assert torch.equal(descriptor_read(stage, kt, 16), token_step(x, 0, c, kt, 16)), kt


@sm90
@pytest.mark.parametrize("k, n", [(3584, 4608), (3584, 37888), (18944, 3584)])
def test_kernel_real_sizes(k, n):
    for bits in (2, 3, 4):
        for dtype in (torch.float16, torch.bfloat16):
            qw = make_weight(n, k, bits, 128, False, scale_dtype=dtype, seed=bits, device="cuda")
            w = qw.dequantize(torch.float32)
            bias = torch.randn(n, device="cuda", dtype=dtype)
            for m in (1, 16):
                x = act(m, k, dtype, seed=m)
                assert_matches_dense(wg.weight_only_tma_decode(x, qw, bias), x, w, bias)


@sm90
def test_split_row_blocks_are_summed_and_counters_left_zero():
    # 3 row blocks x 19 chunks: one cluster takes everything; 57 clusters
    # give every pair's chunks to many parts; the counters end at zero
    from vlmkern.ops import cuda_weight_only as cw
    for bits in (2, 4):
        qw = make_weight(300, 2400, bits, 128, False, seed=bits, device="cuda")
        w = qw.dequantize(torch.float32)
        bias = torch.randn(300, device="cuda", dtype=torch.float16)
        for m in (1, 5, 16):
            x = act(m, 2400, torch.float16, seed=m)
            for clusters in (1, 2, 3, 5, 19, 38, 57, 1000):
                y = wg.weight_only_tma_decode(x, qw, bias, max_clusters=clusters)
                assert_matches_dense(y, x, w, bias)
                assert not cw._counters(x.device, 3)[:3].any(), clusters


@sm90
@pytest.mark.parametrize("k, n", [(3584, 4608), (200, 33)])
def test_batch_invariance_and_determinism(k, n):
    # one 16-token tile and a split that does not depend on M: any prefix of
    # a batch of 16 gives the batch's bits, run after run
    for dtype in (torch.float16, torch.bfloat16):
        qw = make_weight(n, k, 4, 128, False, scale_dtype=dtype, device="cuda")
        x = act(16, k, dtype)
        full = wg.weight_only_tma_decode(x, qw)
        assert torch.equal(full, wg.weight_only_tma_decode(x, qw))
        for m in (1, 2, 7, 15):
            assert torch.equal(wg.weight_only_tma_decode(x[:m].clone(), qw), full[:m]), m


@sm90
def test_selected_by_linear_when_enabled(monkeypatch):
    from vlmkern import ops
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    qw = make_weight(384, 256, 3, 64, False, device="cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    assert ops.which_kernel(act(1, 256, torch.float16), qw) != "cuda.weight_only_tma_decode"
    monkeypatch.setenv("VLMKERN_ENABLE", "cuda.weight_only_tma_decode")
    assert ops.which_kernel(act(1, 256, torch.float16), qw) == "cuda.weight_only_tma_decode"
    assert ops.which_kernel(act(16, 256, torch.float16), qw) == "cuda.weight_only_tma_decode"
    assert ops.which_kernel(act(17, 256, torch.float16), qw) != "cuda.weight_only_tma_decode"
    x = act(12, 256, torch.bfloat16).reshape(3, 4, 256)
    assert_matches_dense(ops.linear(x, qw).reshape(12, 384), x.reshape(12, 256),
                         qw.dequantize(torch.float32), None)


@sm90
def test_traceable_by_torch_compile():
    from vlmkern.ops import cuda_weight_only as cw
    qw = make_weight(96, 384, 3, 64, False, device="cuda")
    mw = cw.kernel_weight(qw, torch.bfloat16)
    counters = cw._counters(torch.device("cuda"), mw.blocks)

    def f(x):
        return torch.ops.vlmkern.weight_only_tma_decode(x, mw.wq, mw.sz, None, counters, 3, 96,
                                                        mw.slot_log2, 4) * 2

    x = act(9, 384, torch.bfloat16)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
    meta = torch.ops.vlmkern.weight_only_tma_decode(
        x.to("meta"), mw.wq.to("meta"), mw.sz.to("meta"), None, counters.to("meta"), 3, 96,
        mw.slot_log2, 4)
    assert meta.shape == (9, 96) and meta.dtype == torch.bfloat16


@sm90
def test_wrapper_errors():
    qw = make_weight(64, 256, 4, 64, False, device="cuda")
    with pytest.raises(ValueError, match="M <= 16"):
        wg.weight_only_tma_decode(act(17, 256, torch.float16), qw)
    assert wg.weight_only_tma_decode(act(0, 256, torch.float16), qw).shape == (0, 64)


@sm90
@pytest.mark.cpp_checks
def test_bad_inputs_give_clear_errors():
    from vlmkern.ops import cuda_weight_only as cw
    qw = make_weight(64, 256, 4, 64, False, device="cuda")
    mw = cw.kernel_weight(qw, torch.float16)
    counters = cw._counters(torch.device("cuda"), mw.blocks)
    op = torch.ops.vlmkern.weight_only_tma_decode
    x = act(16, 256, torch.float16)
    with pytest.raises(RuntimeError, match="at most 16 tokens"):
        op(act(17, 256, torch.float16), mw.wq, mw.sz, None, counters, 4, 64, mw.slot_log2, 4)
    for clusters in (0, 32768):
        with pytest.raises(RuntimeError, match="max_clusters must be in 1..32767"):
            op(x, mw.wq, mw.sz, None, counters, 4, 64, mw.slot_log2, clusters)
    with pytest.raises(RuntimeError, match="counters must be a 1-D int32"):
        op(x, mw.wq, mw.sz, None, counters.float(), 4, 64, mw.slot_log2, 4)


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @sm90
    def test_sanitizer_smoke():
        for bits in (2, 3, 4):
            for group in (64, 128):
                qw = make_weight(130, 203, bits, group, False, device="cuda")
                for m, clusters in ((1, 1), (16, 3), (3, 100)):
                    for dtype in (torch.float16, torch.bfloat16):
                        wg.weight_only_tma_decode(act(m, 203, dtype), qw,
                                                  torch.randn(130, device="cuda"), clusters)
        torch.cuda.synchronize()
