"""GPTQ and GPTAQ: Hessian-guided rounding onto the RTN grid, as pure functions.

Both minimise a layer-wise output error one input column at a time. For a row
w of W [N_out, K] and inputs X [K, T], ||(q - w) X||^2 = (T/2) (q - w) H (q - w)^T
with H = (2/T) X X^T. Rounding column i leaves an error that the columns not
yet rounded absorb optimally (Optimal Brain Surgeon): with U the upper
Cholesky factor of H^-1 (H^-1 = U^T U), [H_{>=i}]^-1 = U_{>=i}^T U_{>=i}, so the
update of the remaining columns is -e_i U[i, i:] with e_i = (w_i - q_i) / U_ii,
and the error it leaves is e_i^2 / 2 per row (summed: 1/2 tr(dW H dW^T)).

Every column is rounded with ``quantize_to_grid`` onto parameters from
``group_params`` -- the same grid as RTN, so H = I gives RTN exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import QuantConfig, check_bool, config_float, dtype_from_name, is_int
from ..formats import QuantizedWeight
from ..formats.groupwise import num_groups
from .hessian import (
    check_calibrated,
    check_square,
    fill_dead_channels,
    inverse_cholesky_upper,
)
from .rtn import check_weight, group_params, quantize_to_grid

_COMPUTE = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ/GPTAQ rounds one linear layer.

    quant: target grid (bits, group size, sym, scale dtype). block_size:
    columns per lazy-update block (changes speed, not the result beyond
    rounding: a group's grid is fitted to its columns' fully updated values,
    including updates still pending from the current block). damp: lambda
    in H + lambda * mean(diag H) * I. act_order: process columns by
    descending diag H. static_groups: group parameters
    from the original W, fixed before any update (logical groups, so no
    ``perm`` is stored even with act_order). max_damp_retries: on a failed
    Cholesky, multiply lambda by 10 (from 0.01 when lambda is 0) this many
    times before giving up. compute_dtype: 'float32' or 'float64'.
    """

    quant: QuantConfig = field(default_factory=QuantConfig)
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    max_damp_retries: int = 3
    compute_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"GPTQConfig.quant must be a QuantConfig, "
                            f"got {type(self.quant).__name__}")
        if not is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"GPTQConfig.block_size must be a positive int, "
                             f"got {self.block_size!r}")
        damp = config_float("GPTQConfig", "damp", self.damp)
        if not 0.0 <= damp < float("inf"):
            raise ValueError(f"GPTQConfig.damp must be a finite number >= 0, got {self.damp!r}")
        object.__setattr__(self, "damp", damp)
        for name in ("act_order", "static_groups"):
            check_bool("GPTQConfig", name, getattr(self, name))
        if not is_int(self.max_damp_retries) or self.max_damp_retries < 0:
            raise ValueError(f"GPTQConfig.max_damp_retries must be an int >= 0, "
                             f"got {self.max_damp_retries!r}")
        if self.compute_dtype not in _COMPUTE:
            raise ValueError(f"GPTQConfig.compute_dtype must be one of {sorted(_COMPUTE)}, "
                             f"got {self.compute_dtype!r}")


DEFAULT_GPTAQ_ALPHA = 0.25    # GPTAQ's weight of the asymmetry term


@dataclass(frozen=True)
class GPTAQConfig:
    """GPTAQ: GPTQ's settings plus alpha, the weight of the FP-input asymmetry term."""

    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    alpha: float = DEFAULT_GPTAQ_ALPHA

    def __post_init__(self):
        if not isinstance(self.gptq, GPTQConfig):
            raise TypeError(f"GPTAQConfig.gptq must be a GPTQConfig, got {type(self.gptq).__name__}")
        alpha = config_float("GPTAQConfig", "alpha", self.alpha)
        if not 0.0 <= alpha < float("inf"):
            raise ValueError(f"GPTAQConfig.alpha must be a finite number >= 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)


@dataclass
class GPTQStats:
    """What one GPTQ/GPTAQ call did.

    column_loss: [K] (compute dtype, logical column order): sum over rows of
    e_i^2 / 2, the output error each column's rounding left behind (for GPTQ
    its sum is 1/2 tr(dW H_damped dW^T)). damp: the lambda finally used
    (relative to mean diag H); damp_abs: what was added to diag H. retries:
    failed Cholesky attempts. seconds: wall time. perm: processing order
    (int64 [K], logical index of the i-th processed column) or None.
    """

    column_loss: torch.Tensor
    damp: float
    damp_abs: float
    retries: int
    seconds: float
    perm: torch.Tensor | None = None

    @property
    def loss(self) -> float:
        return float(self.column_loss.double().sum())


# ---------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------

def _prepare(weight, hessian, delta, config: GPTQConfig):
    """Validate, cast, fix dead columns, permute (act_order), damp and factor."""
    if not isinstance(config, GPTQConfig):
        raise TypeError(f"config must be a GPTQConfig, got {type(config).__name__}")
    check_weight(weight)
    k = weight.shape[1]
    check_square("hessian", hessian, k)
    check_calibrated(hessian)
    if delta is not None:
        check_square("delta", delta, k)
    cd = _COMPUTE[config.compute_dtype]
    dev = weight.device
    w = weight.to(device=dev, dtype=cd).clone()
    h = hessian.to(device=dev, dtype=cd)
    # Only the symmetric part enters (q - w) H (q - w)^T; a no-op for symmetric H.
    h = (h + h.T) * 0.5
    d = None if delta is None else delta.to(device=dev, dtype=cd).clone()
    # A channel that never fired (H_jj = 0) has no influence on the output:
    # its weight is free, so set it to 0 (exactly on the grid) and make H
    # invertible there (not every channel: check_calibrated refused an
    # all-zero H above).
    dead = fill_dead_channels(h)
    if bool(dead.any()):
        w[:, dead] = 0.0
        if d is not None:
            d[:, dead] = 0.0
    static = None
    if config.static_groups:
        static = _static_params(w, config.quant)
    perm = None
    if config.act_order:
        # Quantize high-energy channels first, while many columns are left to
        # absorb their error; stable so ties keep the logical order.
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
        if d is not None:
            d = d[perm][:, perm]
    u, lam, retries = inverse_cholesky_upper(h, config.damp, config.max_damp_retries)
    return w, u, d, perm, static, lam, lam * float(h.diagonal().mean()), retries


def _static_params(w: torch.Tensor, q: QuantConfig):
    """Scale/zero [N, G] of every logical group of the original W."""
    n, k = w.shape
    g = k if q.group_size is None else q.group_size
    sdt = dtype_from_name(q.scale_dtype)
    cols = [group_params(w[:, j:j + g], q.bits, q.sym, sdt) for j in range(0, k, g)]
    return torch.stack([c[0] for c in cols], 1), torch.stack([c[1] for c in cols], 1)


# ---------------------------------------------------------------------------
# The column loop
# ---------------------------------------------------------------------------

def _column_loop(w, u, p, perm, static, config: GPTQConfig):
    """Round W [N, K] (processing order) column by column; return codes [N, K]
    (processing order), scales/zeros [N, G], per-column loss [K].

    p (GPTAQ) is None or [K, K]: column i's pre-rounding value w_i adds
    w_i * p[i, i:] to the later columns.
    """
    q = config.quant
    n, k = w.shape
    g = k if q.group_size is None else q.group_size
    sdt = dtype_from_name(q.scale_dtype)
    codes = torch.empty(n, k, dtype=torch.int64, device=w.device)
    n_groups = num_groups(k, q.group_size)
    scales = torch.empty(n, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(n, n_groups, dtype=torch.int64, device=w.device)
    loss = torch.zeros(k, dtype=w.dtype, device=w.device)
    scale = zero = None
    bs = config.block_size
    # Static groups are logical: the group of the c-th processed column.
    order = range(k) if perm is None else perm.tolist()
    static_group = [j // g for j in order] if static is not None else None
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        unrounded = torch.zeros_like(w1) if p is not None else None
        for i in range(i2 - i1):
            c = i1 + i
            if static is not None:
                gi = static_group[c]
                scale, zero = static[0][:, gi], static[1][:, gi]
            elif c % g == 0:
                cols = _group_columns(w, w1, u, p, err, unrounded, i1, i2, c, min(c + g, k))
                scale, zero = group_params(cols, q.bits, q.sym, sdt)
                scales[:, c // g], zeros[:, c // g] = scale, zero
            col = w1[:, i]
            code = quantize_to_grid(col, scale, zero, q.bits)
            codes[:, c] = code
            rounded = (code - zero).to(w.dtype) * scale.to(w.dtype)
            e = (col - rounded) / u1[i, i]
            loss[c] = 0.5 * (e * e).sum()
            err[:, i] = e
            if p is None:
                w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            else:
                unrounded[:, i] = col
                w1[:, i:] -= e[:, None] * u1[i, i:][None, :] - col[:, None] * p[c, c:i2][None, :]
        if i2 < k:
            # Lazy update: the later columns receive the whole block's updates
            # at once, one GEMM instead of one rank-1 update per column.
            if p is None:
                w[:, i2:] -= err @ u[i1:i2, i2:]
            else:
                # The asymmetry term takes the same pre-rounding w_i as the
                # in-block update, so this GEMM is exactly the sum of the
                # per-column updates it postpones and the result does not
                # depend on block_size. The block's quantized values enter
                # through err = (w_i - q_i) / U_ii. Feeding the rounded q_i to
                # P as well (what an in-place loop does, since column i holds
                # q_i after its own update) would weight the one mismatch
                # w_i dX_i of ||(Q - W) X~ - W dX||^2 by w_i for columns inside
                # the block but by q_i for those after it.
                w[:, i2:] -= err @ u[i1:i2, i2:] - unrounded @ p[i1:i2, i2:]
    if static is not None:
        scales, zeros = static
    return codes, scales, zeros, loss


def _group_columns(w, w1, u, p, err, unrounded, i1, i2, c, end):
    """Current values of columns c..end-1 when the group starting at c begins.

    Columns inside the block are up to date in w1; columns past the block
    still lack this block's pending updates from columns i1..c-1, which are
    applied here so the grid is fitted to exactly the weights it will round.
    """
    inside = w1[:, c - i1:min(end, i2) - i1]
    if end <= i2:
        return inside
    done = c - i1
    ahead = w[:, i2:end] - err[:, :done] @ u[i1:c, i2:end]
    if p is not None:
        ahead = ahead + unrounded[:, :done] @ p[i1:c, i2:end]
    return torch.cat([inside, ahead], dim=1)


def _finish(codes, scales, zeros, loss, perm, static, lam, damp_abs, retries, t0, config):
    q = config.quant
    stored_perm = None
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        loss = loss[inv]
        if static is not None:
            # Static groups are logical groups: store codes in logical order.
            codes = codes[:, inv]
        elif not bool((perm == torch.arange(perm.numel(), device=perm.device)).all()):
            # Groups are contiguous in processing order: store that order and
            # let the kernel read x[..., perm] instead of gathering weights.
            stored_perm = perm
    packed = QuantizedWeight.from_codes(codes, scales.to(dtype_from_name(q.scale_dtype)),
                                        None if q.sym else zeros, q.bits, q.group_size,
                                        stored_perm)
    stats = GPTQStats(column_loss=loss, damp=lam, damp_abs=damp_abs, retries=retries,
                      seconds=time.perf_counter() - t0, perm=perm)
    return packed, stats


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor,
                  config: GPTQConfig | None = None) -> tuple[QuantizedWeight, GPTQStats]:
    """GPTQ-quantize ``weight`` [N_out, K] (any float dtype) given the input
    Hessian ``hessian`` [K, K] = (2/T) X X^T (any positive scale: the result
    does not depend on it). Computes in ``config.compute_dtype`` on weight's
    device; never modifies its inputs.

    Returns a canonical QuantizedWeight whose ``dequantize()`` is the GPTQ
    weight in logical column order, and GPTQStats. With act_order and
    non-static groups the codes are stored in processing order (groups are
    contiguous there) with ``perm[j]`` = logical input of stored column j.
    """
    config = GPTQConfig() if config is None else config
    t0 = time.perf_counter()
    w, u, _, perm, static, lam, damp_abs, retries = _prepare(weight, hessian, None, config)
    codes, scales, zeros, loss = _column_loop(w, u, None, perm, static, config)
    return _finish(codes, scales, zeros, loss, perm, static, lam, damp_abs, retries, t0, config)


def gptaq_compensation(delta: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """P = alpha * triu_1(D U^T) U, [K, K], strictly upper triangular.

    Row i is what column i's asymmetry costs the later columns: the FP model
    feeds w_i X_i where the quantized one sees w_i X~_i, a mismatch w_i dX_i
    (dX_i: row i of X - X~) that columns j > i absorb best by the least-squares
    fit w_i dX_i X~_{>i}^T (X~_{>i} X~_{>i}^T)^-1 = w_i D[i, >i] H_{>i,>i}^-1.
    Since H_{>i,>i}^-1 = U_{>i,>i}^T U_{>i,>i} and U is upper triangular,
    (D U^T)[i, m] for m > i equals (D[i, >i] U_{>i,>i}^T)[m], so the strict
    upper triangle of D U^T times U is exactly that row for every i at once.
    """
    return alpha * torch.triu(delta @ u.T, diagonal=1) @ u


@torch.no_grad()
def gptaq_quantize(weight: torch.Tensor, hessian: torch.Tensor, delta: torch.Tensor,
                   config: GPTQConfig | GPTAQConfig | None = None, alpha: float | None = None
                   ) -> tuple[QuantizedWeight, GPTQStats]:
    """GPTAQ (asymmetric calibration): minimise ||Q X~ - W X||^2.

    weight [N_out, K]; hessian [K, K] = (2/T) X~ X~^T from the partly quantized
    model's inputs X~ [K, T]; delta [K, K] = (2/T) (X - X~) X~^T with X the
    full-precision model's inputs (row index: the channel whose mismatch is
    compensated; ``HessianAccumulator.add_pair`` builds both). alpha scales
    the asymmetry term (0.25 by default; 0 gives GPTQ bitwise, as does D = 0).
    ``config`` may also be a GPTAQConfig, which brings its own alpha (giving
    alpha as well is refused).

    Derivation: ||Q X~ - W X||^2 = ||(Q - W) X~ - W dX||^2, dX = X - X~. The
    first term is GPTQ's error, handled by the same U-propagation; the second
    is column i's mismatch w_i dX_i, handed to the columns after i through
    P = ``gptaq_compensation`` (row i of P, scaled by w_i before rounding:
    column i's current value, after the updates from earlier columns). Only
    later columns compensate, so a D that is nearly diagonal (X~ = X + iid
    noise) yields P ~ 0 and little gain; errors correlated across channels
    gain more. The lazy cross-block update is the exact sum of the in-block
    ones (see ``_column_loop``), so the result does not depend on block_size.
    """
    if isinstance(config, GPTAQConfig):
        if alpha is not None:
            raise ValueError("gptaq_quantize: alpha comes from the GPTAQConfig; do not give "
                             "both")
        config, alpha = config.gptq, config.alpha
    config = GPTQConfig() if config is None else config
    alpha = config_float("gptaq_quantize", "alpha",
                         DEFAULT_GPTAQ_ALPHA if alpha is None else alpha)
    if not 0.0 <= alpha < float("inf"):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if delta is None:
        if isinstance(hessian, torch.Tensor) and hessian.dim() == 2:
            # an accumulator that saw no tokens has no delta either: say why
            check_calibrated(hessian)
        raise ValueError("gptaq_quantize needs delta = (2/T)(X - X~) X~^T; use gptq_quantize "
                         "without it")
    t0 = time.perf_counter()
    w, u, d, perm, static, lam, damp_abs, retries = _prepare(weight, hessian, delta, config)
    p = gptaq_compensation(d, u, alpha)
    codes, scales, zeros, loss = _column_loop(w, u, p, perm, static, config)
    return _finish(codes, scales, zeros, loss, perm, static, lam, damp_abs, retries, t0, config)


__all__ = ["GPTQConfig", "GPTQStats", "gptq_quantize", "gptaq_quantize", "gptaq_compensation"]
