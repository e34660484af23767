"""BiLLM-style binarization of one weight block, and of a whole matrix.

The per-block structure (salient-column residual binarization, two-group
binarization of the rest, searched salient count and break point) lives here
so both the data-free ``binarize`` below and Hessian-aware BiLLM calibration
use one implementation. ``binarize`` ranks columns by the saliency scores it
is given (default: column energy sum_n w^2) and does no error compensation.
"""
from __future__ import annotations

import torch

from ..config import BinaryConfig, dtype_from_name
from ..formats import BinaryWeight
from .rtn import MIN_PRECISE_SCALE, check_weight


def residual_binarize(y: torch.Tensor, mask: torch.Tensor, rounds: int):
    """Binarize the masked entries of each row of ``y`` [..., R, C] ``rounds`` times.

    Each round on the residual r: mu = mean(r), alpha = mean|r - mu|,
    approx += mu + alpha * sign(r - mu), means taken per row over ``mask``
    (broadcastable to y; leading dims batch several masks at once). Returns
    (approx, list of (mu [..., R], alpha [..., R], positive-sign bool) per
    round). Rows with no masked entry give 0.
    """
    y, m = torch.broadcast_tensors(y, mask)
    m = m.to(y.dtype)
    count = m.sum(dim=-1).clamp(min=1)
    approx = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
    rounds_out = []
    for _ in range(rounds):
        r = y - approx
        mu = (r * m).sum(dim=-1) / count
        d = r - mu[..., None]
        alpha = (d.abs() * m).sum(dim=-1) / count
        positive = d >= 0
        approx = approx + (mu[..., None] + alpha[..., None] * (positive.to(y.dtype) * 2 - 1)) * m
        rounds_out.append((mu, alpha, positive))
    return approx, rounds_out


def _best_candidate(w: torch.Tensor, masks, n_cand: int, rounds: int,
                    region: torch.Tensor | None = None,
                    col_weight: torch.Tensor | None = None) -> int:
    """Index of the candidate whose split of ``w`` [N, B] into parts a and b, each
    residual-binarized ``rounds`` times, fits best (squared error, each column's
    error times ``col_weight`` [B] when given). ``masks(lo, hi)`` returns the
    (a, b) masks of candidates lo..hi-1 as [hi-lo, ., B]; candidates are taken in
    chunks so memory stays near 2^24 elements whatever N is."""
    chunk = max(1, (1 << 24) // max(1, w.numel()))
    errs = []
    for i in range(0, n_cand, chunk):
        mask_a, mask_b = masks(i, min(i + chunk, n_cand))
        a, _ = residual_binarize(w, mask_a, rounds)
        b, _ = residual_binarize(w, mask_b, rounds)
        diff = w - a - b
        if region is not None:
            diff = diff * region
        sq = diff.pow(2)
        if col_weight is not None:
            sq = sq * col_weight
        errs.append(sq.sum(dim=(-2, -1)))
    return int(torch.argmin(torch.cat(errs)))


def _quantile_points(values: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    flat = values.flatten().sort().values
    idx = torch.tensor([round(q * (flat.numel() - 1)) for q in quantiles], device=flat.device)
    return flat[idx]


def binarize_block(w: torch.Tensor, scores: torch.Tensor, config: BinaryConfig,
                   col_weight: torch.Tensor | None = None):
    """Binarize one block ``w`` [N, B] given column saliency ``scores`` [B].

    Salient count k in 1..max_salient minimises the block error with both parts
    residual-binarized twice; the break point (quantiles of |non-salient w|)
    minimises the error of the two-group split. col_weight: optional [B]
    non-negative weights of each column's squared error in both searches (e.g.
    the output-error weight 1/U_jj^2 of Hessian-aware calibration); None means
    plain squared error. The fitted (mu, alpha) stay per-row means either way.
    Returns (sign [N, B] bool, aux [N, B] bool, salient [B] bool, stats [N, 8]
    fp32, unweighted squared error).
    """
    w = w.float()
    n, b = w.shape
    cw = None
    if col_weight is not None:
        if tuple(col_weight.shape) != (b,):
            raise ValueError(f"col_weight must have shape ({b},), got {tuple(col_weight.shape)}")
        cw = col_weight.to(device=w.device, dtype=w.dtype)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    salient = torch.zeros(b, dtype=torch.bool, device=w.device)
    n_k = min(config.max_salient, b)
    if n_k > 0:
        # Candidate k salient columns: the top-k by score, k = 1..n_k.
        rank = torch.empty(b, dtype=torch.long, device=w.device)
        rank[order] = torch.arange(b, device=w.device)

        def top_k(lo, hi):                       # candidates k = lo+1 .. hi
            ks = torch.arange(lo + 1, hi + 1, device=w.device)
            cand = (rank[None, :] < ks[:, None])[:, None, :]             # [k, 1, B]
            return cand, ~cand

        salient = rank < _best_candidate(w, top_k, n_k, 2, col_weight=cw) + 1

    a_sal, sal_rounds = residual_binarize(w, salient, 2)
    rest = ~salient
    stats = torch.zeros(n, 8, device=w.device)
    outer = torch.zeros_like(w, dtype=torch.bool)
    resid_rest = torch.zeros_like(w)
    if bool(rest.any()):
        points = _quantile_points(w[:, rest].abs(), config.quantiles)
        mag = w.abs()

        def split(lo, hi):                       # [P, N, B] inner / outer groups
            big = (mag[None] >= points[lo:hi, None, None]) & rest
            return (~big) & rest, big

        p = points[_best_candidate(w, split, len(points), 1, region=rest, col_weight=cw)]
        outer = (mag >= p) & rest
        in_m = (mag < p) & rest
        a_in, (in_round,) = residual_binarize(w, in_m, 1)
        a_out, (out_round,) = residual_binarize(w, outer, 1)
        resid_rest = a_in + a_out
        stats[:, 4], stats[:, 5] = in_round[0], in_round[1]
        stats[:, 6], stats[:, 7] = out_round[0], out_round[1]
        sign_rest = torch.where(outer, out_round[2], in_round[2])
    else:
        sign_rest = torch.zeros_like(outer)
    (mu1, al1, s1), (mu2, al2, s2) = sal_rounds
    stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3] = mu1, al1, mu2, al2
    sign = torch.where(salient, s1, sign_rest)
    aux = torch.where(salient, s2, outer)
    err = float(((w - a_sal - resid_rest) ** 2).sum())
    return sign, aux, salient, stats, err


def binarize(weight: torch.Tensor, config: BinaryConfig | None = None,
             saliency: torch.Tensor | None = None) -> BinaryWeight:
    """Binarize ``weight`` [out_features, in_features] block by block.

    saliency: optional column scores [in_features] (higher = more salient);
    default is the column energy sum_n w[n, k]^2.
    """
    config = BinaryConfig() if config is None else config
    if not isinstance(config, BinaryConfig):
        raise TypeError(f"config must be a BinaryConfig, got {type(config).__name__} "
                        f"(group-wise and integer formats come from vlmkern.quantize_rtn)")
    check_weight(weight)
    n, k = weight.shape
    if saliency is None:
        saliency = weight.float().pow(2).sum(dim=0)
    elif not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be a torch.Tensor, got {type(saliency).__name__}")
    elif tuple(saliency.shape) != (k,):
        raise ValueError(f"saliency must have shape ({k},), got {tuple(saliency.shape)}")
    elif not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency holds NaN or Inf values: it ranks the columns")
    bs = config.block_size
    blocks = []
    for start in range(0, k, bs):
        stop = min(start + bs, k)
        blocks.append(binarize_block(weight[:, start:stop], saliency[start:stop], config)[:4])
    return assemble_blocks(blocks, config)


def assemble_blocks(blocks, config: BinaryConfig) -> BinaryWeight:
    """Pack per-block results (sign [N, B], aux [N, B], salient [B], stats [N, 8]),
    given in column order as ``binarize_block`` returns them, into one BinaryWeight
    with stats stored in ``config.stats_dtype``."""
    signs, auxs, sals, stats = zip(*blocks)
    stats_t = stored_stats(torch.stack(stats, dim=1), config)
    return BinaryWeight.from_planes(torch.cat(signs, 1), torch.cat(auxs, 1), torch.cat(sals),
                                    stats_t, config.block_size)


def stored_stats(stats: torch.Tensor, config: BinaryConfig) -> torch.Tensor:
    """Statistics [N, blocks, 8] (fp32) cast to ``config.stats_dtype``.

    Raises ValueError, suggesting stats_dtype='float32', when finite weights
    give statistics the dtype cannot hold: a row's block whose largest |mu| or
    alpha is nonzero but below ``rtn.MIN_PRECISE_SCALE`` (its statistics would
    round by more than 1/32 of it, and to 0 below half the smallest
    subnormal), or statistics past the dtype's largest value.
    """
    dtype = dtype_from_name(config.stats_dtype)
    advice = "" if dtype == torch.float32 else "; use stats_dtype='float32'"
    low_limit = MIN_PRECISE_SCALE.get(dtype)
    if low_limit is not None:
        # each row's block is as precise as its largest statistic
        largest = stats.abs().amax(dim=-1)
        if bool(((largest > 0) & (largest < low_limit)).any()):
            raise ValueError(f"weights too small for {dtype} binary statistics (below "
                             f"{low_limit:.3g}, where {dtype} keeps too few significant "
                             f"bits){advice}")
    stored = stats.to(dtype)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"weights too large for {dtype} binary statistics{advice}")
    return stored
