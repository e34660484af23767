"""Hopper weight-only matmul (csrc/weight_only_sm90_kernel.cu) for any M.

The same load-time layout as the mma.sync kernel (``cuda_weight_only``), the
same exact decode (each weight is ``s * (q - z)`` rounded once to the
activation dtype, the weight the torch reference dequantizes to), but the MMA
is Hopper's warpgroup ``wgmma.mma_async m64nNk16``: the decoded weights are
its A operand in registers and N tokens of activations its B operand in
shared memory (N = 64 for M <= 64, else 128). A thread block owns 128 weight
rows and N tokens, so the weight is decoded once per N tokens and never
written back dequantized: it is meant for batches and prefill, where the
other paths re-read activation fragments per warp (M <= 64) or dequantize
the whole weight to memory and call cuBLAS (M > 64).

A warpgroup decodes a chunk only after the previous chunk's MMAs are done:
ptxas serializes every MMA when fragments are written while MMAs are in
flight. Registered as ``cuda.weight_only_wgmma``.

Split-K: a layer with too few (128-row block, token tile) pairs to fill the
GPU is cut into K slices (``splits_for``), whose fp32 partial sums a second
kernel adds in slice order; the slice count depends on M, so batches of
different sizes may round differently.

For batches and prefill, ``weight_only_tma`` runs the warp-specialized
kernel of csrc/weight_only_sm90_tma_kernel.cu (``cuda.weight_only_tma``):
the same layout and exact decode, 128 weight rows x 128 tokens per thread
block (64 tokens for M <= 64), the token tile copied by TMA and multicast to
a cluster of two thread blocks (adjacent row blocks), codes and scales by
bulk copies, one producer and two consumer warpgroups, each consumer warp
decoding a k16 step while the previous step's MMA runs, as many clusters as
the GPU holds walking the tiles (persistent). A layer with too few row
blocks to fill half the GPU is cut into K slices (``tma_splits_for``), added
in slice order by a second kernel. A token's result depends only on its
place in its token tile, the tile width and the slice count, which depend
on M only through the number of token tiles.

For decode (M <= 16), ``weight_only_tma_decode`` runs the same kernel with a
16-token tile, as many pipeline stages as fit (14 for W4) and a stream-K
split (``cuda.weight_only_tma_decode``): the layer's (row pair, chunk)
positions are cut into one equal range per cluster, and a row block whose
chunks span several ranges is finished inside the kernel by the part that
arrives last, adding the parts in cluster order (no second kernel). For a
given GPU and cluster count the result is the same for every M <= 16.

Needs an sm_90 GPU and a build holding ``9.0a`` code (``sm90_available``
probes it). The kernels are opt-in (``VLMKERN_ENABLE``) until they have
passed the GPU tests.
"""
from __future__ import annotations

import torch

from ..formats.groupwise import QuantizedWeight
from .cuda_common import check_activations, multiprocessors, require_op
from .cuda_int_act import sm90_available as build_has_sm90a
from .cuda_weight_only import (
    ACT_DTYPES,
    SUPPORTED_BITS,
    _counters,
    kernel_inputs,
    kernel_weight,
    unsupported_reason,
)

MIN_M = 17                # decode sizes stay with the mma.sync kernel's lean decodes
TMA_MIN_M = MIN_M         # the warp-specialized kernel, batches and prefill
TOKENS_SMALL, TOKENS = 64, 128   # token tile for M <= 64, and above
DECODE_MAX_M = 16         # the warp-specialized kernel's decode tile


def sm90_available(device: torch.device) -> bool:
    """Whether the kernels run on ``device`` with this build (an sm_90 GPU and
    sm_90a code present). Every kernel file is built for the same
    architectures, so the int_act module's cached probe answers for these too."""
    return hasattr(torch.ops.vlmkern, "weight_only_wgmma") and build_has_sm90a(device)


def splits_for(m: int, out_features: int, chunks: int, multiprocessors: int) -> int:
    """K slices for a launch: enough thread blocks to fill every SM once,
    each slice at least 4 chunks (512 columns) long."""
    tile = TOKENS_SMALL if m <= TOKENS_SMALL else TOKENS
    blocks = -(-out_features // 128) * -(-m // tile)
    if blocks >= multiprocessors:
        return 1
    return max(1, min(-(-multiprocessors // blocks), chunks // 4))


def tma_splits_for(m: int, out_features: int, chunks: int, multiprocessors: int) -> int:
    """K slices for the warp-specialized kernel (one thread block per SM):
    none while its thread blocks fill at least half the SMs (the slices'
    partial sums cost memory traffic); else as many as fit in one wave, each
    at least 4 chunks (512 columns) long."""
    tile = TOKENS_SMALL if m <= TOKENS_SMALL else TOKENS
    blocks = -(-out_features // 128) * -(-m // tile)
    if 2 * blocks > multiprocessors:
        return 1
    return max(1, min(multiprocessors // blocks, chunks // 4, 65535))


def _inputs(name: str, op: str, source: str, x: torch.Tensor, qweight: QuantizedWeight,
            bias: torch.Tensor | None):
    """The checks both kernels share; (layout, x, bias) as the op takes them,
    or None for M = 0."""
    require_op(name, op, source)
    check_activations(name, x, qweight, ACT_DTYPES, same_device=False)
    why = _reason(qweight, x.device)
    if why is not None:
        raise ValueError(f"{name}: {why}")
    if x.shape[0] == 0:
        return None
    return (kernel_weight(qweight, x.dtype), *kernel_inputs(x, qweight, bias))


def weight_only_wgmma(x: torch.Tensor, qweight: QuantizedWeight,
                      bias: torch.Tensor | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias on the Hopper kernel. x [M, K] fp16/bf16 on an
    sm_90 device, any M >= 0; bias [N] or None -> [M, N] in x's dtype.
    ``splits``: K slices, 1..chunks (default ``splits_for``)."""
    ready = _inputs("cuda.weight_only_wgmma", "weight_only_wgmma",
                    "csrc/weight_only_sm90_kernel.cu", x, qweight, bias)
    if ready is None:
        return x.new_empty(0, qweight.out_features)
    mw, x2, bias = ready
    if splits is None:
        splits = splits_for(x.shape[0], mw.out_features, mw.chunks, multiprocessors(x.device))
    return torch.ops.vlmkern.weight_only_wgmma(x2, mw.wq, mw.sz, bias, mw.bits, mw.out_features,
                                               mw.slot_log2, int(splits))


def weight_only_tma(x: torch.Tensor, qweight: QuantizedWeight,
                    bias: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias on the warp-specialized Hopper kernel. x [M, K]
    fp16/bf16 on an sm_90 device, any M >= 0 (meant for M > 16); bias [N] or
    None -> [M, N] in x's dtype; ``splits``: K slices, 1..chunks (default
    ``tma_splits_for``)."""
    ready = _inputs("cuda.weight_only_tma", "weight_only_tma",
                    "csrc/weight_only_sm90_tma_kernel.cu", x, qweight, bias)
    if ready is None:
        return x.new_empty(0, qweight.out_features)
    mw, x2, bias = ready
    if splits is None:
        splits = tma_splits_for(x.shape[0], mw.out_features, mw.chunks, multiprocessors(x.device))
    return torch.ops.vlmkern.weight_only_tma(x2, mw.wq, mw.sz, bias, mw.bits, mw.out_features,
                                             mw.slot_log2, int(splits))


def decode_clusters_for(multiprocessors: int) -> int:
    """Clusters of two thread blocks (one per SM) for the decode walk: all
    the GPU holds; the launch takes fewer where fewer fit at once."""
    return max(1, multiprocessors // 2)


def weight_only_tma_decode(x: torch.Tensor, qweight: QuantizedWeight,
                           bias: torch.Tensor | None = None,
                           max_clusters: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias on the warp-specialized Hopper kernel's decode path
    (``cuda.weight_only_tma_decode``). x [M, K] fp16/bf16 on an sm_90 device,
    0 <= M <= 16; bias [N] or None -> [M, N] in x's dtype; ``max_clusters``:
    at most this many clusters split the layer (1..32767, default
    ``decode_clusters_for``): fewer give each more of the layer."""
    if x.dim() == 2 and x.shape[0] > DECODE_MAX_M:
        raise ValueError(f"cuda.weight_only_tma_decode takes M <= {DECODE_MAX_M}, got {x.shape[0]}")
    ready = _inputs("cuda.weight_only_tma_decode", "weight_only_tma_decode",
                    "csrc/weight_only_sm90_tma_kernel.cu", x, qweight, bias)
    if ready is None:
        return x.new_empty(0, qweight.out_features)
    mw, x2, bias = ready
    if max_clusters is None:
        max_clusters = decode_clusters_for(multiprocessors(x.device))
    return torch.ops.vlmkern.weight_only_tma_decode(
        x2, mw.wq, mw.sz, bias, _counters(x.device, mw.blocks), mw.bits, mw.out_features,
        mw.slot_log2, int(max_clusters))


def _reason(qweight, device: torch.device) -> str | None:
    why = unsupported_reason(qweight)
    if why is None and device.type == "cuda" and not sm90_available(device):
        why = "needs an sm_90 GPU and a build with 9.0a code (TORCH_CUDA_ARCH_LIST)"
    return why


def _checker(name: str):
    def check(x: torch.Tensor, qweight) -> str | None:
        why = _reason(qweight, x.device)
        return None if why is None else f"{name}: {why}"
    return check


def register(backend) -> None:
    """Add the kernels to the CUDA backend ahead of the other weight-only
    kernels: the decode path (M <= 16), the prefill kernel, then the
    cp.async one; all opt-in (``VLMKERN_ENABLE=
    cuda.weight_only_tma_decode,cuda.weight_only_tma,cuda.weight_only_wgmma``)."""
    from .backends import KernelSpec

    known = {k.name for k in backend.kernels}
    specs = [spec for spec in (
        ("cuda.weight_only_tma_decode", weight_only_tma_decode, 1, DECODE_MAX_M),
        ("cuda.weight_only_tma", weight_only_tma, TMA_MIN_M, None),
        ("cuda.weight_only_wgmma", weight_only_wgmma, MIN_M, None)) if spec[0] not in known]
    for name, fn, min_m, max_m in reversed(specs):   # each put first: tried in list order
        backend.register(KernelSpec(name, "weight_only", fn, bits=frozenset(SUPPORTED_BITS),
                                    dtypes=frozenset(ACT_DTYPES), devices=frozenset({"cuda"}),
                                    min_m=min_m, max_m=max_m, min_sm=(9, 0), opt_in=True,
                                    check=_checker(name), laid_out=True), first=True)
