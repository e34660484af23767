"""Second-order statistics of a linear layer's inputs, accumulated batch by batch.

For a layer y = W x with W [N_out, K] and calibration inputs stacked as the
columns of X [K, T] (T tokens), the layer-wise objective ||(W' - W) X||^2 has
Hessian (w.r.t. each row of W') H = (2/T) X X^T. GPTQ-style methods need only
H, so activations are folded into it as they stream past and never stored:
memory is O(K^2) whatever the number of tokens.

GPTAQ matches the quantized layer, fed the partly quantized model's inputs
X~, to the full-precision layer fed X: ||Q X~ - W X||^2. Besides H = (2/T) X~ X~^T
it needs the cross term D = (2/T) (X - X~) X~^T.
"""
from __future__ import annotations

import torch

from ..config import is_int


def _tokens(x: torch.Tensor, in_features: int, name: str) -> torch.Tensor:
    """[..., K] -> [T, K] (a view when possible), with shape and finiteness checks."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{name} must have shape [..., {in_features}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN/Inf values; refusing to accumulate them")
    return x.reshape(-1, in_features)


def _weights(g: torch.Tensor | None, x: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """Per-token weights g [...] matching x's leading shape -> [T, 1]."""
    if g is None:
        return None
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        raise TypeError("token_weight must be a floating torch.Tensor")
    if tuple(g.shape) != tuple(x.shape[:-1]) and not (g.dim() == 1 and g.numel() == tokens):
        raise ValueError(f"token_weight must have the inputs' leading shape {tuple(x.shape[:-1])} "
                         f"(or be flat with {tokens} entries), got {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("token_weight holds NaN/Inf values")
    return g.reshape(tokens, 1)


class HessianAccumulator:
    """Running H = (2/T) X G^2 X^T (and, for GPTAQ, D = (2/T) (X - X~) G^2 X~^T).

    in_features: K. device: where H lives (None: the device of the first
    batch). dtype: accumulation dtype (float32; float64 for exact tests).

    ``add(x, token_weight=g)``: x [..., K], any leading shape, flattened to
    T_b tokens (rows of x are the columns of X). g (optional, same leading
    shape as x) is the *un-squared* per-token weight: token t contributes
    g_t^2 x_t x_t^T, i.e. each token column of X is multiplied by g_t (VLMQ's
    importance-aware Hessian X G^2 X^T). g == 1 is bitwise the same as no g.

    ``add_pair(x_fp, x_q, token_weight=g)``: x_fp [..., K] are the full-precision
    model's inputs (X), x_q the same tokens through the partly quantized model
    (X~). H accumulates from x_q only; D[a, b] = (2/T) sum_t g_t^2 (x_fp - x_q)[t, a]
    * x_q[t, b], so row a indexes the input channel whose mismatch is being
    compensated and column b the channel compensating it -- D = (2/T) dX X~^T
    with dX, X~ as [K, T] matrices, the convention of ``gptaq_quantize``.

    Normalisation: T counts tokens (not their weights). After each batch
    H_new = (T_old/T_new) H_old + (2/T_new) sum_batch g^2 x x^T, which equals
    (2/T) sum over all tokens so far: the result does not depend on how the
    tokens were split into batches (up to rounding). A single accumulator
    takes either ``add`` or ``add_pair`` calls, not both: mixing them would
    count tokens in H that D never saw.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if not is_int(in_features) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self._device = None if device is None else torch.device(device)
        self._h: torch.Tensor | None = None
        self._d: torch.Tensor | None = None
        self._paired: bool | None = None
        self._tokens = 0

    # -- state -------------------------------------------------------------
    @property
    def tokens(self) -> int:
        """Number of tokens (rows of all inputs) accumulated so far."""
        return self._tokens

    @property
    def hessian(self) -> torch.Tensor:
        """H [K, K] in the accumulation dtype (zeros before any data). The live
        buffer, not a copy: the quantizers never modify it."""
        if self._h is None:
            self._h = self._zeros(self._device or torch.device("cpu"))
        return self._h

    @property
    def delta(self) -> torch.Tensor | None:
        """D [K, K] (rows: mismatch channel a, columns: X~ channel b), or None
        unless the accumulator was fed with ``add_pair``."""
        return self._d if self._paired else None

    def _zeros(self, device) -> torch.Tensor:
        k = self.in_features
        return torch.zeros(k, k, dtype=self.dtype, device=device)

    def _begin(self, paired: bool, device: torch.device) -> None:
        if self._paired is not None and self._paired != paired:
            raise ValueError("HessianAccumulator fed with both add() and add_pair(); use one "
                             "accumulator per kind of statistic")
        self._paired = paired
        if self._h is None:
            self._h = self._zeros(self._device or device)
        if paired and self._d is None:
            self._d = self._zeros(self._h.device)

    def _rescale(self, new_tokens: int) -> float:
        """Shrink the old sums by T_old/T_new so they stay means over all tokens;
        return 2/T_new, the weight of the new batch's raw sum."""
        total = self._tokens + new_tokens
        if self._tokens:
            ratio = self._tokens / total
            self._h.mul_(ratio)
            if self._d is not None:
                self._d.mul_(ratio)
        self._tokens = total
        return 2.0 / total

    # -- accumulation -------------------------------------------------------
    @torch.no_grad()
    def add(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Fold a batch of inputs x [..., K] (and optional g [...]) into H."""
        rows = _tokens(x, self.in_features, "x")
        g = _weights(token_weight, x, rows.shape[0])
        if rows.shape[0] == 0:
            return
        self._begin(False, rows.device)
        rows = rows.to(device=self._h.device, dtype=self.dtype)
        if g is not None:
            rows = rows * g.to(device=rows.device, dtype=self.dtype)
        coef = self._rescale(rows.shape[0])
        self._h.add_(rows.T @ rows, alpha=coef)

    @torch.no_grad()
    def add_pair(self, x_fp: torch.Tensor, x_q: torch.Tensor,
                 token_weight: torch.Tensor | None = None) -> None:
        """Fold matched batches x_fp (X, full-precision model) and x_q (X~, partly
        quantized model), both [..., K], into H (from x_q) and D."""
        xf = _tokens(x_fp, self.in_features, "x_fp")
        xq = _tokens(x_q, self.in_features, "x_q")
        if tuple(x_fp.shape) != tuple(x_q.shape):
            raise ValueError(f"x_fp and x_q must have the same shape (the same tokens through "
                             f"both models), got {tuple(x_fp.shape)} and {tuple(x_q.shape)}")
        g = _weights(token_weight, x_q, xq.shape[0])
        if xq.shape[0] == 0:
            return
        self._begin(True, xq.device)
        dev = self._h.device
        xq = xq.to(device=dev, dtype=self.dtype)
        dx = xf.to(device=dev, dtype=self.dtype) - xq
        if g is not None:
            # Both factors carry one g_t, so each token enters with weight g_t^2.
            g = g.to(device=dev, dtype=self.dtype)
            xq, dx = xq * g, dx * g
        coef = self._rescale(xq.shape[0])
        self._h.add_(xq.T @ xq, alpha=coef)
        self._d.add_(dx.T @ xq, alpha=coef)


__all__ = ["HessianAccumulator"]


def check_square(name: str, m, k: int) -> None:
    """Raise unless ``m`` is a finite float [k, k] tensor (a Hessian-like statistic)."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if not m.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {m.dtype}")
    if tuple(m.shape) != (k, k):
        raise ValueError(f"{name} must be [{k}, {k}] (shape) to match weight [out, {k}], "
                         f"got {tuple(m.shape)}")
    if m.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it holds no values")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} holds {int((~torch.isfinite(m)).sum())} NaN/Inf values")


def check_calibrated(hessian: torch.Tensor) -> None:
    """Raise unless some input channel of ``hessian`` carries energy.

    Each diagonal entry H_jj = (2/T) sum_t x_tj^2 is the energy of input j, and
    a PSD matrix with a zero diagonal is zero: no token reached the layer (or
    all its inputs were zero). The dead-channel rule (H_jj = 0: weight 0)
    would then silently zero the whole weight.
    """
    if not bool(hessian.diagonal().any()):
        raise ValueError("the Hessian is all zero: no calibration tokens reached this layer "
                         "(check attention_mask / the samples)")
    if bool((hessian.diagonal() < 0).any()):
        # damping would go on until it factors, hiding a matrix that is no X^T X
        raise ValueError(f"the Hessian has {int((hessian.diagonal() < 0).sum())} negative "
                         f"diagonal entries; a sum of x x^T over tokens has none")


def fill_dead_channels(h: torch.Tensor) -> torch.Tensor:
    """Give each channel that never fired (H_jj = 0) the mean of the live
    diagonal, in place, and return the dead-channel mask. That keeps H
    invertible there without coupling the channel to others, and scales with
    H: a fixed H_jj = 1 would raise the damping (a fraction of mean(diag H))
    wherever H is small, so results would depend on H's scale. The caller
    zeroes the dead channels' weights (free: they never reach the output)."""
    diag = h.diagonal()
    dead = diag == 0
    if bool(dead.any()):
        diag[dead] = diag[~dead].mean()     # check_calibrated: some channel is live
    return dead


def inverse_cholesky_upper(hessian: torch.Tensor, damp: float, max_retries: int = 3):
    """(U, damping used, retries) with U upper triangular, U^T U = (H + damp * mean(diag H) * I)^-1.

    H is PSD in exact arithmetic but rank-deficient or slightly indefinite in
    practice (fewer tokens than channels, rounding); damping with a fraction of
    its mean eigenvalue (mean diag = tr H / K) makes it safely PD. A failed
    factorisation multiplies the damping by 10 (from 0.01 when it was 0) up to
    ``max_retries`` times, then raises a ValueError (not positive definite,
    Cholesky, damping) naming what was tried. U has H's dtype.
    """
    mean_diag = float(hessian.diagonal().mean())
    lam, tried = float(damp), []
    for attempt in range(max_retries + 1):
        tried.append(lam)
        hd = hessian.clone()
        hd.diagonal().add_(lam * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()) and bool((u.diagonal() > 0).all()):
                return u, lam, attempt
        lam = lam * 10 if lam > 0 else 0.01
    raise ValueError(f"Hessian is not positive definite: its Cholesky factorisation failed for "
                     f"damping {tried} x mean(diag H) = {mean_diag:.3g}; the calibration "
                     f"statistics are broken (a Hessian X X^T has a non-negative spectrum)")
