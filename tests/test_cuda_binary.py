"""CUDA binarized matmul (csrc/binary_kernel.cu, vlmkern.ops.cuda_binary).

CPU tests replay the kernel in torch, lane by lane: the staged B operand,
the +-1 A fragments built from the bit planes with the kernel's shift-and-mask,
the PTX m16n8k16 fragment layout, and the per-block statistics algebra; the
replay must equal the dense product of the dequantized weight. GPU tests run
the kernel itself against the torch reference.
"""
import os
import struct

import pytest
import torch
from tiny_models import kernel_op_reason

import vlmkern.ops as ops
from vlmkern.formats import BinaryWeight
from vlmkern.ops import cuda_binary as cb
from vlmkern.ops.backends import BACKENDS

HAS_GPU = torch.cuda.is_available()


_SKIP = kernel_op_reason("binary_matmul", "binary_kernel.cu")
gpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_binary(n, k, block, salient=0.1, seed=0, stats_dtype=torch.float16, device="cpu"):
    g = gen(seed)
    nb = -(-k // block)
    return BinaryWeight.from_planes(torch.rand(n, k, generator=g) < 0.5,
                                    torch.rand(n, k, generator=g) < 0.5,
                                    torch.rand(k, generator=g) < salient,
                                    (torch.randn(n, nb, 8, generator=g) * 0.05).to(stats_dtype),
                                    block).to(device)


# -- CPU: replay of the kernel --------------------------------------------------------------
def words_u32(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in t.tolist()]


def half_value(bits16: int) -> float:
    return struct.unpack("<e", bits16.to_bytes(2, "little"))[0]


def pm1_pair(inverted: int, c: int) -> tuple[float, float]:
    """The kernel's pm1_pair for fp16: ((inv << (15 - c)) & 0x80008000) | (+1, +1)."""
    v = (((inverted << (15 - c)) & 0xFFFFFFFF) & 0x80008000) | 0x3C003C00
    return half_value(v & 0xFFFF), half_value(v >> 16)


def stage(x: list, salient_words: list[int], group: int, step: int, lane: int, k: int):
    """stage_kernel: the 4 B values of `lane` for token group `group`, k16 `step`."""
    g, tig = lane // 4, lane % 4
    token, variant = 4 * group + g // 2, g % 2
    word, j = step // 2, step % 2
    sal = salient_words[word] if word < len(salient_words) else 0
    vals = []
    for e in range(4):
        bit = 8 * j + tig + 4 * (e // 2) + 16 * (e % 2)
        col = 32 * word + bit
        ok = token < len(x) and col < k and ((sal >> bit) & 1) == variant
        vals.append(x[token][col] if ok else 0.0)
    return vals


def replay(x: torch.Tensor, qw: BinaryWeight) -> torch.Tensor:
    """The kernel's arithmetic for every 16-row tile and group of 4 tokens (no
    K split), in fp64: exact apart from the final rounding."""
    m, k = x.shape
    n = qw.out_features
    sign_w, aux_w = cb.padded_planes(qw)
    sal = words_u32(qw.salient)
    block = qw.block_size
    nblk = -(-k // block)
    steps = -(-k // 128) * 8
    spb = block // 16
    # block sums of x' and x'' (stage kernel, second part)
    salient_cols = torch.tensor([(sal[c // 32] >> (c % 32)) & 1 for c in range(k)],
                                dtype=torch.bool)
    xd = x.double()
    xl = xd.tolist()
    sums = {}
    for tok in range(m):
        for b in range(nblk):
            xs, sc = xd[tok, b * block:(b + 1) * block], salient_cols[b * block:(b + 1) * block]
            sums[tok, b] = (float(xs[~sc].sum()), float(xs[sc].sum()))
    st = qw.stats.double().tolist()
    y = torch.zeros(m, n, dtype=torch.float64)
    for tile in range(-(-n // 16)):
        rows = [min(tile * 16 + r, n - 1) for r in range(16)]
        sw = [words_u32(sign_w[r]) for r in rows]
        aw = [words_u32(aux_w[r]) for r in rows]
        for group in range(-(-m // 4)):
            acc = {p: torch.zeros(16, 8, dtype=torch.float64) for p in "sax"}
            ytile = [[0.0] * 4 for _ in range(16)]
            blk, left = 0, spb
            for step in range(steps):
                word, j = step // 2, step % 2
                A = {p: [[0.0] * 16 for _ in range(16)] for p in "sax"}
                B = [[0.0] * 8 for _ in range(16)]
                for lane in range(32):
                    g, tig = lane // 4, lane % 4
                    for reg in range(4):          # a0 row g, a1 row g+8, a2/a3 pair tig+4
                        r = g + 8 * (reg & 1)
                        c = 8 * j + tig + 4 * (reg >> 1)
                        s_bits, a_bits = sw[r][word], aw[r][word]
                        inv = {"s": ~s_bits & 0xFFFFFFFF, "a": ~a_bits & 0xFFFFFFFF,
                               "x": s_bits ^ a_bits}
                        slot = 2 * tig + 8 * (reg >> 1)
                        for p in "sax":
                            A[p][r][slot], A[p][r][slot + 1] = pm1_pair(inv[p], c)
                    vals = stage(xl, sal, group, step, lane, k)
                    for e in range(4):            # b0 = slots 2t, 2t+1; b1 = +8
                        B[2 * tig + (e % 2) + 8 * (e // 2)][g] = vals[e]
                Bt = torch.tensor(B, dtype=torch.float64)
                for p in "sax":
                    acc[p] += torch.tensor(A[p], dtype=torch.float64) @ Bt
                left -= 1
                if left == 0 or step == steps - 1:
                    if blk < nblk:
                        for r in range(16):
                            s8 = st[rows[r]][blk]
                            mu12, a1, a2 = s8[0] + s8[2], s8[1], s8[3]
                            mm, dm = (s8[6] + s8[4]) / 2, (s8[6] - s8[4]) / 2
                            al, dal = (s8[7] + s8[5]) / 2, (s8[7] - s8[5]) / 2
                            for t in range(4):
                                tok = 4 * group + t
                                if tok >= m:
                                    continue
                                plain, salsum = sums[tok, blk]
                                c_p, c_s = 2 * t, 2 * t + 1
                                ytile[r][t] += (mm * plain + dm * float(acc["a"][r, c_p])
                                                + al * float(acc["s"][r, c_p])
                                                + dal * float(acc["x"][r, c_p])
                                                + mu12 * salsum + a1 * float(acc["s"][r, c_s])
                                                + a2 * float(acc["a"][r, c_s]))
                    acc = {p: torch.zeros(16, 8, dtype=torch.float64) for p in "sax"}
                    left, blk = spb, blk + 1
            for r in range(16):
                row = tile * 16 + r
                for t in range(4):
                    tok = 4 * group + t
                    if row < n and tok < m:
                        y[tok, row] = ytile[r][t]
    return y


@pytest.mark.parametrize("n,k,block,salient", [(17, 200, 128, 0.1), (9, 96, 32, 0.3),
                                                (5, 160, 96, 0.2)])
def test_replay_equals_dense(n, k, block, salient):
    m = 5          # two token groups, the second partly empty
    qw = make_binary(n, k, block, salient=salient, seed=k)
    x = torch.randn(m, k, generator=gen(1)).half()
    want = x.double() @ qw.dequantize(torch.float64).T
    got = replay(x, qw)
    assert (got - want).abs().max().item() <= 1e-9 * (1 + want.abs().max().item())


def test_ksplit_and_padding():
    for n, k in ((37888, 3584), (3584, 18944), (4096, 4096)):
        split = cb.choose_ksplit(n, k, 128, 132)
        blocks = -(-n // cb.ROWS_PER_BLOCK)
        assert 1 <= split <= -(-k // 128)
        assert split * blocks >= cb.BLOCKS_PER_SM * 132 or split == -(-k // 128)
        assert (split - 1) * blocks < cb.BLOCKS_PER_SM * 132     # no more parts than needed
    assert cb.choose_ksplit(64, 100, 96, 132) == 1          # one unit of lcm(96, 128)
    qw = make_binary(3, 200, 64)                            # 7 words -> padded to 8
    sign, aux = cb.padded_planes(qw)
    assert sign.shape == (3, 8) and bool((sign[:, 7] == 0).all())
    assert torch.equal(sign[:, :7], qw.sign) and torch.equal(aux[:, :7], qw.aux)
    even = make_binary(3, 256, 128)
    assert cb.padded_planes(even)[0].data_ptr() == even.sign.data_ptr()


def test_registration_and_unsupported_block():
    from vlmkern.ops import builtin  # noqa: F401
    specs = [k for k in BACKENDS["cuda"].kernels
             if k.op == "binary" and "lut" not in k.name and "dequant" not in k.name]
    assert [k.name for k in specs] == ["cuda.binary"]
    spec, = specs
    assert spec.max_m == cb.MAX_M and not spec.opt_in
    odd = make_binary(4, 96, 48)
    assert "multiple of 32" in spec.check(torch.zeros(1, 96), odd)
    assert spec.check(torch.zeros(1, 256), make_binary(4, 256, 256)) is None
    if not HAS_GPU:
        assert ops.which_kernel(torch.zeros(1, 96), odd) == "torch.binary"


# -- GPU ------------------------------------------------------------------------------------
def assert_matches_dense(y, x, w, bias):
    """Error vs an fp64 product <= 2x that of torch in x's precision, or
    relative mean error < 1e-3 (DESIGN.md) with no output off by more than 8x."""
    truth = x.double() @ w.double().T + (0 if bias is None else bias.double())
    low = (x.float() @ w.to(x.dtype).float().T + (0 if bias is None else bias.float())).to(x.dtype)
    assert y.dtype == x.dtype and y.shape == truth.shape
    err = (y.double() - truth).abs()
    err_ref = (low.double() - truth).abs().max().item()
    rel_mean = (err.mean() / truth.abs().mean()).item()
    # the mean alone would let a few grossly wrong outputs (a lost column) through
    worst = err.max().item()
    assert worst <= 2 * err_ref + 1e-6 or (rel_mean < 1e-3 and worst <= 8 * err_ref + 1e-6), (
        f"max err {worst:.3g} vs reference {err_ref:.3g}, rel mean {rel_mean:.3g}")


def act(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=gen(seed)).to("cuda", dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block", [128, 64, 32, 96])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_awkward_shapes(block, dtype):
    qw = make_binary(33, 200, block, seed=block, device="cuda")
    w = qw.dequantize()
    bias = torch.randn(33, generator=gen(2)).cuda()
    for m in (1, 3, 5, 16, 17, 64, 200):
        x = act(m, 200, dtype, seed=m)
        assert_matches_dense(cb.binary_matmul(x, qw, bias), x, w, bias)
        assert_matches_dense(cb.binary_matmul(x, qw), x, w, None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (4608, 3584), (3584, 18944)])
def test_gpu_real_sizes(n, k):
    qw = make_binary(n, k, 128, salient=0.05, seed=3, device="cuda")
    w = qw.dequantize()
    for m, dtype in ((1, torch.float16), (16, torch.bfloat16), (64, torch.float16)):
        x = act(m, k, dtype, seed=m)
        assert_matches_dense(cb.binary_matmul(x, qw), x, w, None)


@gpu
@pytest.mark.gpu
def test_gpu_stats_dtypes_and_linear(monkeypatch):
    for sd in (torch.float32, torch.bfloat16):
        qw = make_binary(40, 256, 128, stats_dtype=sd, seed=4, device="cuda")
        x = act(5, 256, torch.float16)
        assert_matches_dense(cb.binary_matmul(x, qw), x, qw.dequantize(), None)
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    monkeypatch.delenv("VLMKERN_ENABLE", raising=False)
    x = act(2, 256, torch.bfloat16)
    assert ops.which_kernel(x, qw) == "cuda.binary_lut"     # blocks of 128: the table GEMM
    assert_matches_dense(ops.linear(x, qw), x, qw.dequantize(), None)
    monkeypatch.setenv("VLMKERN_DISABLE", "cuda.binary_lut")
    assert ops.which_kernel(x, qw) == "cuda.binary"
    assert_matches_dense(ops.linear(x, qw), x, qw.dequantize(), None)


@gpu
@pytest.mark.gpu
def test_gpu_batch_invariant_deterministic_and_split():
    qw = make_binary(3584, 4096, 128, salient=0.2, seed=5, device="cuda")
    kp = cb.kernel_planes(qw)
    assert kp.ksplit > 1                      # this shape exercises the split + reduce path
    x = act(64, 4096, torch.float16)
    full = cb.binary_matmul(x, qw)
    for m in (1, 3, 4, 5, 16, 17, 33):
        assert torch.equal(cb.binary_matmul(x[:m], qw), full[:m])
    assert torch.equal(cb.binary_matmul(x, qw), full)
    one = torch.ops.vlmkern.binary_matmul(x, qw.salient, kp.sign, kp.aux, qw.stats, None,
                                          4096, 128, 1)
    torch.testing.assert_close(one, full, rtol=2e-3, atol=2e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.cpp_checks
def test_gpu_bad_input_errors():
    qw = make_binary(16, 64, 32, device="cuda")
    with pytest.raises(ValueError, match="must be \\[M, 64\\]"):
        cb.binary_matmul(torch.randn(2, 65, device="cuda", dtype=torch.half), qw)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        cb.binary_matmul(torch.randn(2, 64, device="cuda"), qw)
    kp = cb.kernel_planes(qw)
    x = torch.randn(2, 64, device="cuda", dtype=torch.half)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.vlmkern.binary_matmul(x, qw.salient, kp.sign, kp.aux, qw.stats, None, 64, 48, 1)
    with pytest.raises(RuntimeError, match="stats must have shape"):
        torch.ops.vlmkern.binary_matmul(x, qw.salient, kp.sign, kp.aux, qw.stats[:, :1], None,
                                        64, 32, 1)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        torch.ops.vlmkern.binary_matmul(x, qw.salient, kp.sign[:, :2].contiguous(),
                                        kp.aux[:, :2].contiguous(), qw.stats, None, 64, 32, 1)


@gpu
@pytest.mark.gpu
def test_gpu_op_traces_under_torch_compile():
    qw = make_binary(64, 256, 128, device="cuda")
    kp = cb.kernel_planes(qw)

    def f(x):
        return torch.ops.vlmkern.binary_matmul(x, qw.salient, kp.sign, kp.aux, qw.stats, None,
                                               256, 128, kp.ksplit)

    x = act(3, 256, torch.float16)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


if os.environ.get("VLMKERN_SANITIZE"):   # small run under compute-sanitizer memcheck
    @gpu
    @pytest.mark.gpu
    def test_sanitizer_smoke():
        # ragged rows, columns and tokens, with and without the K split
        for n, k, block in ((33, 200, 96), (257, 520, 128), (130, 3000, 128), (33, 128, 128)):
            qw = make_binary(n, k, block, seed=n, device="cuda")
            bias = torch.randn(n, generator=gen(2)).cuda()
            for m in (1, 5, 17, 200):
                x = act(m, k, torch.float16, seed=m)
                cb.binary_matmul(x, qw, bias)
        torch.cuda.synchronize()
