"""Shared pieces of the Triton kernels: launch configs as data, the split-K
reduction pass and small launch helpers.

Configs are a table keyed by (family, M bucket), not autotuned: a first call
must not spend seconds benchmarking, and a fixed config per bucket is what
makes outputs batch-invariant (the reduction order of a row never depends on
how many other rows share the launch, only on the bucket).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

# M buckets. "small" is decode (memory-bound, weight streaming dominates),
# "mid" is short prefill / batched decode, "large" is prefill and the vision
# tower, where tensor-core throughput dominates.
SMALL_M = 16
MID_M = 128

# Picked so every kernel variant compiles for sm_80 and sm_90 without (or
# with minimal) register spills and fits the 99 KB shared memory of sm_86/89;
# checked by compiling offline, not yet timed on a GPU.
CONFIGS: dict[tuple[str, str], dict[str, int]] = {
    # Small M: the 16 token rows are the MMA's N operand (swap-AB), so a tile
    # of weight rows is the M operand; split-K fills the SMs when N is short.
    # 8 warps over a 64x128 tile keep the dequantized tile in registers.
    ("weight_only", "small"): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3),
    ("weight_only", "mid"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    # BLOCK_K 32 at 128x128: the dequantized [128, 32] tile plus the fp32
    # accumulator fit the register file (BLOCK_K 64 spills).
    ("weight_only", "large"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    # Integer MMA: int8 k-step is 32, so BLOCK_K is a multiple of 32 that also
    # divides the weight group (the int32 accumulator is flushed per group).
    ("int_act", "small"): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    ("int_act", "mid"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ("int_act", "large"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    # The Hopper TMA kernel (per-channel int8 weights, prefill): 128 x 256
    # int32 tiles over two warpgroups, 128-byte K rows (one TMA swizzle
    # span), 4 stages of 48 KB; 211 registers, no spills on sm_90 (Triton
    # 3.9). FLATTEN (one pipeline across tiles) spills at this tile size.
    ("int_act_tma", "mid"): dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4,
                                 FLATTEN=0),
    ("int_act_tma", "large"): dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8,
                                   num_stages=4, FLATTEN=0),
    # With weight groups an int32 group accumulator lives next to the fp32
    # one: half the tile keeps both in registers.
    ("int_act_grouped", "small"): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4,
                                       num_stages=3),
    ("int_act_grouped", "mid"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    ("int_act_grouped", "large"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                       num_stages=3),
    # Binary decode (3 bit planes + 8 statistics) is register-hungry: short K tiles.
    ("binary", "small"): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    ("binary", "mid"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    ("binary", "large"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
}

# fp32 activations run tl.dot with IEEE fp32 products (FMA units, no TF32),
# whose operands live in registers: smaller tiles, or the kernel spills.
FP32_CAPS: dict[str, dict[str, int]] = {
    "small": dict(BLOCK_N=32, BLOCK_K=64, num_warps=4),
    "mid": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4),
    "large": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4),
}


def m_bucket(m: int) -> str:
    if m <= SMALL_M:
        return "small"
    return "mid" if m <= MID_M else "large"


def heuristic_config(family: str, m: int) -> dict[str, int]:
    """Fallback when the table has no entry: M tiles grow with M (each
    dequantized weight tile is reused by more rows), K tiles stay short so
    the dequantized tile and the accumulator fit the register file."""
    bm = 16 if m <= SMALL_M else (32 if m <= MID_M else 64)
    return dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64 if bm < 64 else 32, num_warps=4,
                num_stages=3)


def get_config(family: str, m: int, override: dict | None = None,
               dtype: torch.dtype | None = None) -> dict[str, int]:
    bucket = m_bucket(m)
    cfg = dict(CONFIGS.get((family, bucket)) or heuristic_config(family, m))
    if dtype == torch.float32 and not family.startswith("int_act"):
        cfg.update(FP32_CAPS[bucket])
    if override:
        cfg.update(override)
    return cfg


def launch_opts(cfg: dict, device: torch.device) -> dict:
    """num_warps/num_stages mean nothing to the interpreter; pass them on a GPU."""
    if device.type != "cuda":
        return {}
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def shrink(block: int, extent: int, floor: int = 16) -> int:
    """Shrink a tile to the problem (a power of two, at least ``floor``): a
    33-row layer should not pay for a 128-row tile. Depends on N or K only,
    never on M, so batch invariance holds."""
    return max(floor, min(block, triton.next_power_of_2(max(extent, 1))))


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (queried once per device at first call, never at import)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_k_plan(n_tiles: int, k_tiles: int, device: torch.device,
                 split: int | None = None) -> tuple[int, int]:
    """(splits, k tiles per split). Enough programs to cover ~2 waves of SMs;
    depends on N, K and the device only, so every M in the bucket reduces
    in the same order."""
    if split is None:
        split = max(1, min(k_tiles, (2 * sm_count(device)) // max(n_tiles, 1)))
    split = max(1, min(split, k_tiles))
    per = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, per), per


def dtype_code(dtype: torch.dtype):
    """Triton dtype of a supported activation dtype; TypeError otherwise."""
    codes = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
    if dtype not in codes:
        raise TypeError(f"Triton kernels take float16/bfloat16/float32 activations, got {dtype}")
    return codes[dtype]


def kernel_entry(fn):
    """The checks and device every public op shares: x must be [M, K] with
    the weight's K and bias [N] or None, and the launches go to x's GPU
    (Triton launches on the current device, not the tensors')."""
    @functools.wraps(fn)
    def run(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, **options):
        k, n = qweight.in_features, qweight.out_features
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{fn.__module__}.{fn.__name__}: x must be [M, {k}] for this "
                             f"weight, got {shape}")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
            raise ValueError(f"{fn.__module__}.{fn.__name__}: bias must be [{n}], "
                             f"got {tuple(bias.shape)}")
        with on_device(x.device):
            return fn(x, qweight, bias, **options)
    return run


def on_device(device: torch.device):
    """A context making ``device`` current for Triton's launches (nothing for the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_one_token(kernel: str, why: str | None, x: torch.Tensor) -> None:
    """ValueError unless a one-token kernel can take x with this weight
    (``why``: the weight's reason against it, or None)."""
    if why is not None:
        raise ValueError(f"{kernel}: {why}")
    if x.shape[0] != 1:
        raise ValueError(f"{kernel} takes one token, got M={x.shape[0]}")
    dtype_code(x.dtype)


def bf16_fixup(t: torch.Tensor) -> bool:
    """Whether fp32 -> bf16 casts must be rounded by hand: the interpreter's
    cast truncates, while the GPU's cvt rounds to nearest even. CPU tensors
    can only run in the interpreter, so the device decides."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


@triton.jit
def round_bf16(v):
    """fp32 -> the nearest-even bf16 value, still held in fp32 (so the later
    cast is exact). Used only under the interpreter, see bf16_fixup."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def swizzled_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SWIZZLE: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``: programs walk bands of SWIZZLE row
    tiles column by column, so consecutive programs share weight columns and
    activation rows while they are still in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_band = SWIZZLE * grid_n
    first_m = (pid // per_band) * SWIZZLE
    rows = tl.minimum(grid_m - first_m, SWIZZLE)
    return first_m + (pid % per_band) % rows, (pid % per_band) // rows


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, SPLITS, stride_om,
                          HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # Second pass of split-K: partials [SPLITS, M, N] fp32 summed in a fixed
    # order (split 0, 1, ...). Unlike fp32 atomics this gives run-to-run
    # identical results; the extra traffic is SPLITS*M*N*4 bytes, small next
    # to the weight stream at decode sizes.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    row = offs // N
    if FIX_BF16:
        acc = round_bf16(acc)
    tl.store(out_ptr + row * stride_om + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


def bias_arg(bias: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The kernels' bias pointer: the bias made contiguous (they read it with
    stride 1, so a strided view would add the wrong elements), or any tensor
    when there is none (HAS_BIAS=False never reads it)."""
    return placeholder if bias is None else bias.contiguous()


def splitk_reduce(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    splits, m, n = ws.shape
    block = 1024
    grid = (triton.cdiv(m * n, block),)
    _splitk_reduce_kernel[grid](ws, bias_arg(bias, ws), out, m, n, splits,
                                out.stride(0), HAS_BIAS=bias is not None,
                                FIX_BF16=bf16_fixup(out), BLOCK=block)
