"""BiLLM: Hessian-aware binarization with GPTQ-style error compensation.

For a linear layer W [N, K] and calibration inputs X [K, T], the layer-output
error of a weight error D is ||D X||^2 = (T/2) tr(D H D^T) with H = (2/T) X X^T.
BiLLM walks the columns in blocks of ``block_size`` (128):

1. saliency of the *current* block, S = W_b^2 / diag(U_bb)^2 with U the upper
   Cholesky factor of H^-1. 1/U_ii^2 is the energy of input i left unexplained
   by the inputs after it (U_ii^2 = [(H_{i:,i:})^-1]_ii), so S is the output
   error of zeroing w_ni when the later columns compensate (OBS saliency);
   column score = sum over rows;
2. ``binarize_block`` with those scores (salient columns residual-binarized
   twice, the rest split into two magnitude groups). Its two searches (salient
   count k*, break point) minimise sum_nj (w_nj - q_nj)^2 / U_jj^2, GPTQ's
   output-error proxy, not the plain squared error: with a few high-energy
   input channels the plain error cannot see that those columns dominate the
   output. (The official code gets the same emphasis by running both searches
   on the saliency matrix S instead of on W.)
3. compensation of the later columns, as GPTQ's lazy block update but without
   the column-by-column update inside the block (the whole block is binarized
   at once): E = (W_b - Q_b) / diag(U_bb), W[:, later] -= E U[block, later].
   For one column, -E_i U[i, i+1:] is the OBS update of the later columns
   that minimises the output error of moving column i by -(W_i - Q_i); the
   later columns absorb the part of the error their inputs can explain.
   Summing the block's columns this way is exact when U_bb is diagonal.

Dead input channels (H_jj = 0: the input is always zero) get H_jj = 1 and
W[:, j] = 0, as in GPTQ: their weights never affect the output. An all-zero
Hessian (no calibration token reached the layer) raises ValueError instead of
zeroing every column.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import BinaryConfig, config_float
from ..formats import BinaryWeight
from .binarize import assemble_blocks, binarize_block, stored_stats
from .hessian import (
    check_calibrated,
    check_square,
    fill_dead_channels,
    inverse_cholesky_upper,
)
from .rtn import check_weight

SALIENCY_METRICS = ("hessian", "magnitude")
_CHOLESKY_ATTEMPTS = 5          # damping tried: damp, 10 damp, ..., 10^4 damp


@dataclass(frozen=True)
class BiLLMConfig:
    """BiLLM calibration settings.

    binary: block structure and searches (see BinaryConfig). damp: relative
    damping lambda, H += lambda * mean(diag H) * I. saliency: "hessian"
    (W^2 / diag(U)^2, the paper's) or "magnitude" (column energy sum_n W^2,
    the official code's argparse default).
    """

    binary: BinaryConfig = field(default_factory=BinaryConfig)
    damp: float = 0.01
    saliency: str = "hessian"

    def __post_init__(self):
        if not isinstance(self.binary, BinaryConfig):
            raise TypeError(f"BiLLMConfig.binary must be a BinaryConfig, "
                            f"got {type(self.binary).__name__}")
        d = config_float("BiLLMConfig", "damp", self.damp)
        if not (d >= 0 and d < float("inf")):
            raise ValueError(f"BiLLMConfig.damp must be a finite number >= 0, got {self.damp!r}")
        object.__setattr__(self, "damp", d)
        if self.saliency not in SALIENCY_METRICS:
            raise ValueError(f"BiLLMConfig.saliency must be one of {SALIENCY_METRICS}, "
                             f"got {self.saliency!r}")


def _dequantize_block(sign, aux, salient, stats, config: BinaryConfig) -> torch.Tensor:
    """The block as stored (stats rounded to stats_dtype), through the format's own decode."""
    stored = stored_stats(stats[:, None, :], config)
    return BinaryWeight.from_planes(sign, aux, salient, stored, config.block_size).dequantize()


def billm_quantize(weight: torch.Tensor, hessian: torch.Tensor,
                   config: BiLLMConfig | None = None) -> tuple[BinaryWeight, dict]:
    """Binarize ``weight`` [N, K] with BiLLM given the layer Hessian ``hessian`` [K, K].

    hessian: H = (2/T) sum_t x_t x_t^T over calibration tokens (any positive
    multiple gives the same result; only its direction matters). Returns the
    BinaryWeight and a stats dict:
      salient_per_block  list[int], salient column count k* of each block
      damp               damping actually used (after retries)
      dead_columns       input channels with H_jj = 0 (weights set to 0)
      loss               1/2 sum (W_b - Q_b)^2 / U_ii^2 over all blocks, GPTQ's
                         proxy of the output error (exact only if U_bb is diagonal)
      error              sum ||W_b - Q_b||^2 on the compensated weights
    Weights are updated in fp32 (like GPTQ); H is factorised in fp64.
    """
    config = BiLLMConfig() if config is None else config
    if not isinstance(config, BiLLMConfig):
        hint = " (wrap it: BiLLMConfig(binary=...))" if isinstance(config, BinaryConfig) else ""
        raise TypeError(f"config must be a BiLLMConfig{hint}, got {type(config).__name__}")
    check_weight(weight)
    n, k = weight.shape
    check_square("hessian", hessian, k)
    check_calibrated(hessian)
    bcfg = config.binary
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    dead = fill_dead_channels(h)
    if bool(dead.any()):
        w[:, dead] = 0.0
    u64, lam, _ = inverse_cholesky_upper(h, config.damp, _CHOLESKY_ATTEMPTS - 1)
    u = u64.float()

    blocks, salient_counts = [], []
    loss = err_total = 0.0
    for start in range(0, k, bcfg.block_size):
        stop = min(start + bcfg.block_size, k)
        wb = w[:, start:stop]
        d = u.diagonal()[start:stop]
        if config.saliency == "hessian":
            scores = (wb.pow(2) / d.pow(2)).sum(dim=0)
        else:
            scores = wb.pow(2).sum(dim=0)
        # Both searches weigh column j's squared error by 1/U_jj^2 (its output
        # cost after compensation), normalised so a uniform weight is exactly 1.
        cw = u64.diagonal()[start:stop].pow(-2)
        cw = (cw / cw.max()).float()
        sign, aux, sal, st, _ = binarize_block(wb, scores, bcfg, col_weight=cw)
        blocks.append((sign, aux, sal, st))
        salient_counts.append(int(sal.sum()))
        diff = wb - _dequantize_block(sign, aux, sal, st, bcfg)
        e = diff / d
        loss += 0.5 * float(e.pow(2).sum())
        err_total += float(diff.pow(2).sum())
        if stop < k:
            w[:, stop:] -= e @ u[start:stop, stop:]
            if not bool(torch.isfinite(w[:, stop:]).all()):
                raise ValueError(f"error compensation after columns {start}:{stop} produced "
                                 f"NaN/Inf weights (ill-conditioned Hessian; raise damp)")
    stats = {"salient_per_block": salient_counts, "damp": lam,
             "dead_columns": int(dead.sum()), "loss": loss, "error": err_total}
    return assemble_blocks(blocks, bcfg), stats


__all__ = ["BiLLMConfig", "billm_quantize", "SALIENCY_METRICS"]
