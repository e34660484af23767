"""Q-VLM's entropy proxy and cross-layer dependency, as pure functions.

A uniform quantizer with M levels q_1 < ... < q_M spaced Delta apart rounds
each activation to its nearest level. To measure the entropy of the rounded
tensor without the zero-gradient, all-or-nothing rounding, Q-VLM (eq. 5)
replaces the hard assignment of an element x by soft probabilities

    p(q_m | x) = exp(-(x - q_m)^2 / T) / sum_m' exp(-(x - q_m')^2 / T)

with temperature T = Delta as printed in the paper. (T = Delta makes the
softness depend on the tensor's scale: the assignment is sharp when Delta >> 1
and spreads over several levels when Delta << 1. ``temperature`` lets a
caller pass Delta^2 for a scale-free variant.)

The elements of a tensor are samples of one random variable: its level
distribution is P(m) = mean_i p(q_m | x_i) and its entropy H = -sum P log P.
The dependency of layer k+1 on layer k (eq. 4) is the conditional entropy of
the quantized activations of layer k+1 given those of layer k, over pairs of
elements at the same position (same token, same channel):

    P(a, b) = mean_i p_k(a | x_i^k) p_{k+1}(b | x_i^{k+1})
    D(k, k+1) = H(B | A) = -sum_ab P(a, b) log (P(a, b) / P(a))

D over a span of layers (eq. 6) sums the consecutive terms, and blocks are
grown while the span's average dependency exceeds a threshold h0 (eq. 7).
Entropies are in nats.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import is_int

_CHUNK = 4096   # rows of the [N, M] soft-assignment matrix held at once


def _check_x(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN/Inf values")
    return x.detach().reshape(-1).double()


def _check_bits(bits: int) -> int:
    if not is_int(bits) or not 2 <= bits <= 8:
        # The joint distribution has (2^b - 1)^2 cells: 8 bits is the useful limit.
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    return bits


def symmetric_levels(bits: int, clip: float) -> tuple[torch.Tensor, float]:
    """Levels m * Delta, m = -(2^(b-1)-1) .. 2^(b-1)-1, Delta = clip / (2^(b-1)-1):
    the grid of the symmetric integer-activation quantizer clipping at ``clip``.
    Returns (levels fp64 [2^b - 1], Delta)."""
    lim = (1 << (_check_bits(bits) - 1)) - 1
    clip = float(clip)
    if not 0.0 < clip < math.inf:
        raise ValueError(f"clip must be positive and finite, got {clip!r}")
    delta = clip / lim
    return torch.arange(-lim, lim + 1, dtype=torch.float64) * delta, delta


def soft_assignment(x: torch.Tensor, levels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5: p(q_m | x_i) for every element. x [...] -> fp64 [N, M] (rows sum to 1)."""
    xs = _check_x(x)
    t = float(temperature)
    if not 0.0 < t < math.inf:
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    lv = levels.double().reshape(1, -1).to(xs.device)
    # softmax subtracts each row's max: an element far outside the grid keeps
    # its nearest level instead of underflowing to 0/0
    return torch.softmax(-(xs[:, None] - lv).pow(2) / t, dim=1)


def _grid(x: torch.Tensor, bits: int, clip: float | None, temperature: float | None):
    if clip is None:
        clip = float(x.abs().max())
    if clip == 0.0:
        return None, None    # an all-zero tensor: every element sits on level 0
    levels, delta = symmetric_levels(bits, clip)
    return levels, (delta if temperature is None else float(temperature))


def level_distribution(x: torch.Tensor, bits: int, clip: float | None = None,
                       temperature: float | None = None) -> torch.Tensor:
    """P(m) = mean over elements of eq. 5; clip None: max |x|. fp64 [2^b - 1]."""
    xs = _check_x(x)
    levels, t = _grid(xs, _check_bits(bits), clip, temperature)
    m = (1 << bits) - 1
    if levels is None:
        p = torch.zeros(m, dtype=torch.float64)
        p[m // 2] = 1.0
        return p
    total = torch.zeros(m, dtype=torch.float64, device=xs.device)
    for chunk in xs.split(_CHUNK):
        total += soft_assignment(chunk, levels, t).sum(dim=0)
    return (total / xs.numel()).cpu()


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def quantized_entropy(x: torch.Tensor, bits: int, clip: float | None = None,
                      temperature: float | None = None) -> float:
    """Entropy (nats) of the soft-quantized activations of x: the per-layer proxy."""
    return _entropy(level_distribution(x, bits, clip, temperature))


def joint_distribution(x_a: torch.Tensor, x_b: torch.Tensor, bits: int,
                       clip_a: float | None = None, clip_b: float | None = None,
                       temperature_a: float | None = None,
                       temperature_b: float | None = None) -> torch.Tensor:
    """P(a, b) = mean_i p_a(a | x_a,i) p_b(b | x_b,i) over paired elements.

    x_a, x_b: the same number of elements (element i of one is element i of
    the other). Each tensor has its own grid (clip None: its max |x|).
    Returns fp64 [M, M], summing to 1."""
    xa, xb = _check_x(x_a, "x_a"), _check_x(x_b, "x_b")
    if xa.numel() != xb.numel():
        raise ValueError(f"x_a and x_b must pair element by element, got {xa.numel()} and "
                         f"{xb.numel()} elements")
    _check_bits(bits)
    m = (1 << bits) - 1
    grid_a = _grid(xa, bits, clip_a, temperature_a)
    grid_b = _grid(xb, bits, clip_b, temperature_b)
    joint = torch.zeros(m, m, dtype=torch.float64, device=xa.device)
    for ca, cb in zip(xa.split(_CHUNK), xb.split(_CHUNK)):
        pa = _assign_or_zero(ca, grid_a, m)
        pb = _assign_or_zero(cb, grid_b, m)
        joint += pa.T @ pb
    return (joint / xa.numel()).cpu()


def _assign_or_zero(x: torch.Tensor, grid, m: int) -> torch.Tensor:
    levels, t = grid
    if levels is None:
        p = torch.zeros(x.numel(), m, dtype=torch.float64, device=x.device)
        p[:, m // 2] = 1.0
        return p
    return soft_assignment(x, levels, t)


def conditional_entropy(joint: torch.Tensor) -> float:
    """H(B | A) = H(A, B) - H(A) (nats) of a joint distribution [M_a, M_b]."""
    if not isinstance(joint, torch.Tensor) or joint.dim() != 2:
        raise ValueError("joint must be a 2-D tensor P(a, b)")
    j = joint.double()
    if bool((j < 0).any()) or not math.isclose(float(j.sum()), 1.0, rel_tol=1e-6):
        raise ValueError("joint must be a probability table (non-negative, summing to 1)")
    return max(0.0, _entropy(j.reshape(-1)) - _entropy(j.sum(dim=1)))


def layer_dependency(x_k: torch.Tensor, x_next: torch.Tensor, bits: int,
                     clip_k: float | None = None, clip_next: float | None = None,
                     temperature: str = "delta") -> float:
    """Eq. 4: D(k, k+1) = H(X_q^(k+1) | X_q^(k)) from paired FP activations.

    temperature: 'delta' (the paper's T = Delta) or 'delta2' (T = Delta^2,
    independent of the tensors' scale)."""
    t_k = temperature_of(x_k, bits, clip_k, temperature)
    t_next = temperature_of(x_next, bits, clip_next, temperature)
    return conditional_entropy(joint_distribution(x_k, x_next, bits, clip_k, clip_next,
                                                  t_k, t_next))


def temperature_of(x: torch.Tensor, bits: int, clip: float | None, mode: str) -> float | None:
    """The soft assignment's temperature for ``mode``: None for 'delta' (the
    grid's own step, the default of the functions above), Delta^2 for 'delta2'."""
    if mode == "delta":
        return None
    if mode != "delta2":
        raise ValueError(f"temperature must be 'delta' or 'delta2', got {mode!r}")
    c = float(clip) if clip is not None else float(_check_x(x).abs().max())
    return None if c == 0 else symmetric_levels(bits, c)[1] ** 2


def soft_dependency(x_k: torch.Tensor, x_next: torch.Tensor, bits: int, clip_k: float,
                    clip_next: float, temperature: str = "delta") -> torch.Tensor:
    """``layer_dependency`` as a differentiable fp64 scalar tensor, for
    training (gradients flow to x_k and x_next). Clips are fixed positive
    numbers; both tensors hold the same number of elements, paired in order."""
    if x_k.numel() != x_next.numel() or x_k.numel() == 0:
        raise ValueError(f"x_k and x_next must pair element by element, got {x_k.numel()} "
                         f"and {x_next.numel()} elements")
    if temperature not in ("delta", "delta2"):
        raise ValueError(f"temperature must be 'delta' or 'delta2', got {temperature!r}")
    probs = []
    for x, clip in ((x_k, clip_k), (x_next, clip_next)):
        levels, delta = symmetric_levels(bits, clip)
        t = delta if temperature == "delta" else delta ** 2
        xs = x.reshape(-1, 1).double()
        probs.append(torch.softmax(-(xs - levels.to(xs.device)).pow(2) / t, dim=1))
    joint = probs[0].T @ probs[1] / x_k.numel()
    marginal = joint.sum(dim=1, keepdim=True)
    # H(B | A) = -sum P(a, b) log(P(a, b) / P(a)); empty cells contribute 0
    ratio = torch.where(joint > 0, joint / marginal.clamp_min(1e-300), torch.ones_like(joint))
    return -(joint * ratio.log()).sum()


def span_dependency(pair_deps: Sequence[float], start: int, end: int) -> float:
    """Eq. 6: D(k_r, k_s) = sum of D(k, k+1) for k_r <= k < k_s (0 when k_r == k_s).

    pair_deps[k] = D(k, k+1) for a model of len(pair_deps) + 1 layers."""
    n_layers = len(pair_deps) + 1
    if not 0 <= start <= end < n_layers:
        raise ValueError(f"need 0 <= start <= end < {n_layers}, got {start}, {end}")
    return float(sum(float(d) for d in pair_deps[start:end]))


def partition_blocks(pair_deps: Sequence[float], h0: float | None = None,
                     max_depth: int = 3) -> list[tuple[int, int]]:
    """Eq. 7: split layers 0 .. len(pair_deps) into consecutive blocks.

    A block starting at layer r grows to layer s + 1 while it stays within
    ``max_depth`` layers and D(r, s + 1) > (s + 1 - r) * h0, i.e. while the
    average dependency of its consecutive pairs exceeds h0. h0 None: the mean
    of pair_deps. Returns inclusive (first, last) layer indices."""
    deps = [float(d) for d in pair_deps]
    if any(not math.isfinite(d) for d in deps):
        raise ValueError("pair dependencies must be finite")
    if not is_int(max_depth) or max_depth < 1:
        raise ValueError(f"max_depth must be a positive int, got {max_depth!r}")
    if h0 is None:
        h0 = sum(deps) / len(deps) if deps else 0.0
    h0 = float(h0)
    if not math.isfinite(h0):
        raise ValueError(f"h0 must be finite, got {h0!r}")
    n_layers = len(deps) + 1
    blocks, start = [], 0
    while start < n_layers:
        end = start
        while (end + 1 < n_layers and end + 2 - start <= max_depth
               and span_dependency(deps, start, end + 1) > (end + 1 - start) * h0):
            end += 1
        blocks.append((start, end))
        start = end + 1
    return blocks


__all__ = ["symmetric_levels", "soft_assignment", "level_distribution", "quantized_entropy",
           "joint_distribution", "conditional_entropy", "layer_dependency", "soft_dependency",
           "span_dependency",
           "partition_blocks"]
