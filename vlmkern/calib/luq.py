"""LUQ: layerwise ultra-low-bit quantization of a VLM's language model.

1. Entropy per decoder layer (paper sec. 3.2): the full-precision output
   activations h_i of the calibration tokens are clustered with K-means and
   H_i = -sum_k P_i(k) log P_i(k) is the Shannon entropy (nats) of the
   cluster occupancy. To keep K-means cheap on a CPU, at most ``max_tokens``
   tokens are used, drawn uniformly (fixed seed) from all real positions of
   all samples, the same tokens for every layer.
2. K (appendix B): layer rankings by entropy at successive K of ``k_grid``
   are compared by the normalised Kendall tau distance (fraction of layer
   pairs ordered differently); the elbow of that curve (Kneedle, Satopaa et
   al. 2011, sensitivity 1) is K. ``k`` fixes K instead (the paper's runs
   used 100).
3. Layers sorted by ascending entropy; the first n are binarized with BiLLM
   (``low``), the rest quantized with 4-bit GPTQ (``high``), in one
   layer-by-layer calibration where every layer sees the outputs of the
   already-quantized earlier layers (eq. 7).
4. n by binary search (sec. 3.3) against a memory budget -- physical bytes
   of the decoder linears computed from their shapes and the packed formats
   (``vlmkern.plan.config_nbytes``), nothing quantized -- or a performance
   threshold: a callable scoring a quantized model on held-out data (each
   probe is a full calibration).
5. Calibration data: mixed image+text samples with ratio alpha are built by
   ``vlmkern.calib.mixed``; this module takes any samples.

The paper's average bits ``(1.08 n + 4 (L - n)) / L`` (``nominal_bits``)
counts neither scales nor bitmaps; ``LUQReport`` gives physical bytes beside it.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import QuantConfig, is_int
from ..plan import Plan, PlanEntry, config_nbytes
from ..quant.billm import BiLLMConfig
from ..quant.gptq import GPTQConfig
from .arch import arch_of, decoder_layers
from .methods import layer_method

DEFAULT_K_GRID = (8, 16, 24, 32, 48, 64, 80, 100, 128)


class BudgetError(ValueError):
    """No number of binarized layers meets the requested budget or threshold."""


@dataclass(frozen=True)
class LUQConfig:
    """high: the 4-bit method of most layers; low: the ultra-low-bit one (any
    per-layer method config of ``quantize_model``). k: fixed number of K-means
    clusters, or None to pick it from ``k_grid`` by rank stability. max_tokens:
    tokens clustered per layer (subsampled with ``seed``). kmeans_iters: Lloyd
    iterations at most."""

    high: GPTQConfig = field(default_factory=lambda: GPTQConfig(QuantConfig(4, 64)))
    low: BiLLMConfig = field(default_factory=BiLLMConfig)
    k: int | None = None
    k_grid: tuple[int, ...] = DEFAULT_K_GRID
    max_tokens: int = 4096
    kmeans_iters: int = 30
    seed: int = 0

    def __post_init__(self):
        for name in ("high", "low"):
            try:
                layer_method(getattr(self, name))
            except TypeError as exc:
                raise TypeError(f"LUQConfig.{name}: {exc}") from None
        if self.k is not None and (not is_int(self.k) or self.k < 2):
            raise ValueError(f"LUQConfig.k must be an int >= 2 or None, got {self.k!r}")
        # checked even when k is set: a bad grid is a typo whichever k picks
        grid = tuple(self.k_grid) if isinstance(self.k_grid, (tuple, list)) else None
        if grid is None or (len(grid) < 3 or any(not is_int(k) or k < 2 for k in grid)
                            or list(grid) != sorted(set(grid))):
            raise ValueError(f"LUQConfig.k_grid must be at least 3 increasing ints >= 2, "
                             f"got {self.k_grid!r}")
        object.__setattr__(self, "k_grid", grid)
        for name in ("max_tokens", "kmeans_iters"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"LUQConfig.{name} must be a positive int, "
                                 f"got {getattr(self, name)!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"LUQConfig.seed must be an int >= 0, got {self.seed!r}")


# ---------------------------------------------------------------------------
# Activations, K-means, entropy
# ---------------------------------------------------------------------------

@torch.no_grad()
def collect_layer_outputs(model: nn.Module, samples, max_tokens: int = 4096, seed: int = 0,
                          device=None) -> list[torch.Tensor]:
    """Full-precision outputs of every decoder layer on the calibration samples:
    one float32 [T, hidden] tensor per layer, the same T tokens (at most
    ``max_tokens``, drawn uniformly from all non-padding positions) in each."""
    from .engine import _layer_out, decoder_inputs
    samples = list(samples)
    if not samples:
        raise ValueError("LUQ needs at least one calibration sample")
    layers_path, layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    hidden, kwargs_list, masks = decoder_inputs(model, layers_path, layers, samples, device)
    picks = _pick_tokens(hidden, masks, max_tokens, seed)
    outputs = []
    for idx in range(len(layers)):
        layer = layers[idx].to(device)
        hidden = [_layer_out(layer, h, kw) for h, kw in zip(hidden, kwargs_list)]
        outputs.append(torch.cat([h.reshape(-1, h.shape[-1])[p].float().cpu()
                                  for h, p in zip(hidden, picks)]))
        layers[idx] = layer.to(home)
    return outputs


def _pick_tokens(hidden, masks, max_tokens, seed) -> list[torch.Tensor]:
    """Per sample, flat indices of the positions to keep (padding never;
    masks: per sample the real-token mask, or None when nothing pads)."""
    real = [torch.arange(h.shape[0] * h.shape[1]) if m is None
            else torch.nonzero(m.reshape(-1).cpu()).flatten() for h, m in zip(hidden, masks)]
    total = sum(len(r) for r in real)
    if total <= max_tokens:
        return real
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[:max_tokens]] = True
    out, start = [], 0
    for r in real:
        out.append(r[keep[start:start + len(r)]])
        start += len(r)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0):
    """Lloyd's K-means with k-means++ seeding (fixed seed).

    x: [T, d]. Returns (labels int64 [T], centers [k', d]) with k' = min(k, T),
    centres relative to the mean of x. Computed in float32 on mean-centred
    data (K-means does not depend on a shift; centring keeps |x|^2 small
    next to the distances). An emptied cluster is moved to the point
    farthest from its centre."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans takes a non-empty [tokens, dim] tensor, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("activations hold NaN or Inf values")
    x = x.float()
    x = x - x.mean(0)
    k = min(int(k), x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    sq = (x * x).sum(1)

    def dist2(c):       # squared distances [T, len(c)], clamped against rounding
        return (sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0)

    centers = x[torch.randint(x.shape[0], (1,), generator=gen)]
    closest = dist2(centers)[:, 0]
    for _ in range(1, k):
        weights = closest if float(closest.sum()) > 0 else torch.ones_like(closest)
        nxt = x[torch.multinomial(weights, 1, generator=gen)]
        centers = torch.cat([centers, nxt])
        closest = torch.minimum(closest, dist2(nxt)[:, 0])
    labels = None
    for _ in range(iters):
        d = dist2(centers)
        new = d.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(d.gather(1, labels[:, None]).argmax())
            centers[empty] = x[far]
            labels[far] = empty
    return dist2(centers).argmin(1), centers


def occupancy_entropy(labels: torch.Tensor, k: int) -> float:
    """Shannon entropy (nats) of the cluster occupancy P(k) = |{t: label_t = k}| / T."""
    p = torch.bincount(labels.flatten(), minlength=k).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def layer_entropies(acts: list[torch.Tensor], k: int, iters: int = 30,
                    seed: int = 0) -> list[float]:
    """H_i of every layer's activations at K = k."""
    return [occupancy_entropy(kmeans(a, k, iters, seed)[0], k) for a in acts]


def entropy_order(entropies) -> list[int]:
    """Layer indices by ascending entropy (ties: lower index first)."""
    return sorted(range(len(entropies)), key=lambda i: (entropies[i], i))


def kendall_tau_distance(order_a, order_b) -> float:
    """Normalised Kendall tau distance of two rankings of the same items: the
    fraction of item pairs the two orders put the other way round (0 same, 1 reversed)."""
    if sorted(order_a) != sorted(order_b):
        raise ValueError("the two rankings must order the same items")
    n = len(order_a)
    if n < 2:
        return 0.0
    pos = {item: i for i, item in enumerate(order_b)}
    b = [pos[item] for item in order_a]
    discordant = sum(1 for i in range(n) for j in range(i + 1, n) if b[i] > b[j])
    return discordant / (n * (n - 1) / 2)


def kneedle(x, y, sensitivity: float = 1.0) -> int | None:
    """Index of the knee of a decreasing convex curve y(x) (Kneedle, offline).

    Both axes are scaled to [0, 1]; the difference curve D = (1 - y) - x is
    the distance below the chord from the first to the last point. A local
    maximum of D is the knee once D later falls below D_max - sensitivity *
    mean step of x, before another local maximum. None if no knee is found
    (e.g. a flat or concave curve)."""
    x = [float(v) for v in x]
    y = [float(v) for v in y]
    if len(x) != len(y) or len(x) < 3:
        raise ValueError("kneedle needs at least 3 points and as many x as y")
    if any(b <= a for a, b in zip(x, x[1:])):
        raise ValueError("kneedle needs strictly increasing x")
    span = max(y) - min(y)
    if span == 0:
        return None
    xn = [(v - x[0]) / (x[-1] - x[0]) for v in x]
    yn = [(v - min(y)) / span for v in y]
    d = [1 - b - a for a, b in zip(xn, yn)]
    step = sum(b - a for a, b in zip(xn, xn[1:])) / (len(xn) - 1)
    candidate, threshold = None, None
    for i in range(1, len(d)):
        if i < len(d) - 1 and d[i - 1] < d[i] >= d[i + 1]:
            candidate, threshold = i, d[i] - sensitivity * step
            continue
        if candidate is not None and d[i] < threshold:
            return candidate
    return None


@dataclass
class KSelection:
    k: int
    grid: tuple[int, ...]
    distances: list[float]            # distance between rankings at grid[j] and grid[j+1]
    entropies: dict[int, list[float]]
    knee_found: bool


def choose_k(acts: list[torch.Tensor], grid=DEFAULT_K_GRID, iters: int = 30,
             seed: int = 0) -> KSelection:
    """K by rank stability: entropies at every K of ``grid``, Kendall tau
    distance between the rankings at successive K (point j of the curve sits
    at grid[j + 1]), K at the curve's knee. With no knee (the ranking never
    settles in a convex way) the largest K is taken."""
    grid = tuple(grid)
    entropies = {k: layer_entropies(acts, k, iters, seed) for k in grid}
    orders = [entropy_order(entropies[k]) for k in grid]
    distances = [kendall_tau_distance(a, b) for a, b in zip(orders, orders[1:])]
    knee = kneedle(grid[1:], distances) if len(distances) >= 3 else None
    k = grid[-1] if knee is None else grid[1:][knee]
    return KSelection(k, grid, distances, entropies, knee is not None)


# ---------------------------------------------------------------------------
# Plans, bytes and the search for n
# ---------------------------------------------------------------------------

def nominal_bits(n_low: int, n_layers: int, low_bits: float = 1.08,
                 high_bits: float = 4.0) -> float:
    """The paper's average bits per weight: (low_bits n + high_bits (L - n)) / L."""
    if not 0 <= n_low <= n_layers or n_layers < 1:
        raise ValueError(f"need 0 <= n_low <= n_layers and n_layers >= 1, got {n_low}, "
                         f"{n_layers}")
    return (low_bits * n_low + high_bits * (n_layers - n_low)) / n_layers


def luq_plan(layers_path: str, n_layers: int, order, n_low: int,
             config: LUQConfig = LUQConfig(), info: dict | None = None) -> Plan:
    """Decoder layers order[:n_low] -> config.low, the rest -> config.high."""
    if sorted(order) != list(range(n_layers)):
        raise ValueError(f"order must be a permutation of range({n_layers})")
    if not 0 <= n_low <= n_layers:
        raise ValueError(f"n_low must be in 0..{n_layers}, got {n_low}")
    low = set(order[:n_low])
    return Plan({f"{layers_path}.{i}.*": config.low if i in low else config.high
                 for i in range(n_layers)}, info=dict(info or {}))


def _layer_linears(model: nn.Module) -> list[list[nn.Module]]:
    """Per decoder layer, the linears the calibration engine quantizes."""
    sequence = arch_of(model).sequence
    _, layers = decoder_layers(model)
    out = []
    for layer in layers:
        found = []
        for name in (n for group in sequence for n in group):
            try:
                found.append(layer.get_submodule(name))
            except AttributeError:
                continue
        out.append(found)
    return out


def layer_bytes(model: nn.Module, config) -> list[int]:
    """Physical bytes of each decoder layer's linears under ``config``, from shapes."""
    return [sum(config_nbytes(m.out_features, m.in_features, config) for m in linears)
            for linears in _layer_linears(model)]


def min_n_within_budget(size_of: Callable[[int], int], n_layers: int, budget: int):
    """Smallest n in 0..n_layers with size_of(n) <= budget, by binary search
    (size_of must not grow with n). Returns (n, probes {n: size}); raises
    BudgetError when even n_layers does not fit."""
    probes = {}

    def size(n):
        if n not in probes:
            probes[n] = int(size_of(n))
        return probes[n]

    if size(n_layers) > budget:
        raise BudgetError(f"budget {budget:,} bytes is unreachable: even with all {n_layers} "
                          f"layers binarized the decoder linears need {size(n_layers):,} bytes")
    if size(0) <= budget:
        return 0, probes
    lo, hi = 0, n_layers            # size(lo) > budget >= size(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi, probes


def max_n_meeting_threshold(passes: Callable[[int], bool], n_layers: int):
    """Largest n in 0..n_layers with passes(n), by binary search (assumes the
    score only worsens with n, as the paper does). Returns (n, probes {n: bool});
    raises BudgetError when n = 0 already fails."""
    probes = {}

    def ok(n):
        if n not in probes:
            probes[n] = bool(passes(n))
        return probes[n]

    if not ok(0):
        raise BudgetError("the threshold is unreachable: with no layer binarized (uniform "
                          "high-bit quantization) the score already misses it")
    if ok(n_layers):
        return n_layers, probes
    lo, hi = 0, n_layers            # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


# ---------------------------------------------------------------------------
# The whole method
# ---------------------------------------------------------------------------

@dataclass
class LUQReport:
    entropies: list[float]
    order: list[int]
    k: int | None                   # None: entropies were given by the caller
    k_selection: KSelection | None
    n_low: int
    n_layers: int
    mode: str                       # "n", "budget" or "threshold"
    target: float | None            # budget bytes or threshold
    probes: dict                    # n -> bytes (budget) or score (threshold)
    layer_bytes: list[int]          # per layer, as planned
    n_weights: int
    entropy_seconds: float
    quantize_seconds: float
    calib: object = None            # the final CalibReport
    method_names: tuple[str, str] = ("billm", "gptq")    # (low, high)
    high_bits: int = 4              # the high method's code bits (the paper's 4)

    @property
    def nbytes(self) -> int:
        return sum(self.layer_bytes)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_weights

    @property
    def nominal_bits(self) -> float:
        return nominal_bits(self.n_low, self.n_layers, high_bits=self.high_bits)

    def __str__(self) -> str:
        low = set(self.order[:self.n_low])
        rank = {layer: r for r, layer in enumerate(self.order)}
        lines = [f"{'layer':>5} {'entropy':>8} {'rank':>4} {'method':<7} {'bytes':>12}"]
        for i, h in enumerate(self.entropies):
            name = self.method_names[0] if i in low else self.method_names[1]
            lines.append(f"{i:>5} {h:>8.4f} {rank[i]:>4} {name:<7} {self.layer_bytes[i]:>12,}")
        if self.k is None:
            k_note = "entropies given by the caller"
        elif self.k_selection is None:
            k_note = f"K = {self.k} (fixed)"
        else:
            k_note = f"K = {self.k} (" + ("rank-stability knee" if self.k_selection.knee_found
                                         else "largest of the grid: no knee in the "
                                              "rank-stability curve") + ")"
        lines.append(f"{k_note}; {self.n_low} of {self.n_layers} layers "
                     f"binarized ({self.mode}"
                     + ("" if self.target is None else f", target {self.target:,}") + ")")
        lines.append(f"decoder linears: {self.nbytes:,} bytes, {self.bits_per_weight:.3f} "
                     f"physical bits/weight; nominal (paper) {self.nominal_bits:.2f} bits")
        lines.append(f"entropy {self.entropy_seconds:.1f} s, quantization "
                     f"{self.quantize_seconds:.1f} s")
        return "\n".join(lines)


def luq_entropies(model, samples, config: LUQConfig = LUQConfig(), device=None):
    """(entropies per layer, K, KSelection or None) on the FP model."""
    acts = collect_layer_outputs(model, samples, config.max_tokens, config.seed, device)
    if config.k is not None:
        return layer_entropies(acts, config.k, config.kmeans_iters, config.seed), config.k, None
    sel = choose_k(acts, config.k_grid, config.kmeans_iters, config.seed)
    return sel.entropies[sel.k], sel.k, sel


def luq_quantize(model: nn.Module, samples, config: LUQConfig = LUQConfig(), *,
                 n_low: int | None = None, budget_bytes: int | None = None,
                 budget_bits: float | None = None, threshold: float | None = None,
                 score: Callable[[nn.Module], float] | None = None,
                 higher_is_better: bool = True, entropies: list[float] | None = None,
                 work_dir=None, device=None, progress: bool = True):
    """Quantize ``model`` with LUQ. Exactly one of: ``n_low`` (binarize that many
    lowest-entropy layers), ``budget_bytes`` / ``budget_bits`` (physical bytes of
    the decoder linears, or average physical bits per weight), ``threshold``
    with ``score`` (a callable scoring a quantized model on held-out data,
    e.g. VQA accuracy, or KL with higher_is_better=False). ``entropies``
    skips the entropy pass (reuse an earlier report's). Returns (quantized
    model, LUQReport). Like ``quantize_model`` the model is quantized in
    place, except in threshold mode: each probe calibrates a copy (in
    ``work_dir``/n_low_NNN when given), the copy at the chosen n is returned
    and ``model`` stays full precision."""
    from .engine import WorkDir, quantize_model
    if work_dir is not None:      # each threshold probe works in a folder of its own inside
        work_dir = WorkDir.check_folder(work_dir)
    chosen = [v is not None for v in (n_low, budget_bytes, budget_bits, threshold)]
    if sum(chosen) != 1:
        raise ValueError("give exactly one of n_low, budget_bytes, budget_bits, threshold")
    if threshold is not None and score is None:
        raise ValueError("a performance threshold needs score=callable(model) -> float")

    layers_path, layers = decoder_layers(model)
    n_layers = len(layers)
    t0 = time.perf_counter()
    sel = None
    if entropies is None:
        entropies, k, sel = luq_entropies(model, samples, config, device)
    else:
        if len(entropies) != n_layers or not all(math.isfinite(h) for h in entropies):
            raise ValueError(f"entropies must be {n_layers} finite numbers")
        k = None                    # the caller's entropies: K is theirs
    order = entropy_order(entropies)
    entropy_seconds = time.perf_counter() - t0

    high, low = layer_bytes(model, config.high), layer_bytes(model, config.low)

    def planned_bytes(n):
        chosen_low = set(order[:n])
        return sum(low[i] if i in chosen_low else high[i] for i in range(n_layers))

    n_weights = sum(m.out_features * m.in_features for linears in _layer_linears(model)
                    for m in linears)
    info = {"method": "luq", "entropy": [float(h) for h in entropies], "order": order,
            "k": k}
    t1 = time.perf_counter()
    probes, target, mode, result = {}, None, "n", None
    if budget_bits is not None:
        budget_bytes = int(math.floor(float(budget_bits) * n_weights / 8))
    if budget_bytes is not None:
        if any(lo > hi for lo, hi in zip(low, high)):
            raise ValueError("the low-bit method stores more bytes than the high-bit one in "
                             "some layer; the budget search assumes binarizing never grows a "
                             "layer (name n_low or a threshold instead)")
        mode, target = "budget", int(budget_bytes)
        n_low, probes = min_n_within_budget(planned_bytes, n_layers, target)
    elif threshold is not None:
        mode, target = "threshold", float(threshold)
        models = {}

        def passes(n):
            plan = luq_plan(layers_path, n_layers, order, n, config, {**info, "n_low": n})
            probe_dir = None if work_dir is None else Path(work_dir) / f"n_low_{n:03d}"
            q, rep = quantize_model(copy.deepcopy(model), samples, plan, work_dir=probe_dir,
                                    device=device, progress=progress)
            s = float(score(q))
            scores[n] = s
            ok = s >= threshold if higher_is_better else s <= threshold
            if ok:
                models.clear()
                models[n] = (q, rep)
            return ok

        scores: dict[int, float] = {}
        n_low, _ = max_n_meeting_threshold(passes, n_layers)
        probes = scores
        result = models[n_low]
    if n_low is None or not 0 <= n_low <= n_layers:
        raise ValueError(f"n_low must be in 0..{n_layers}, got {n_low}")
    info["n_low"] = n_low
    if result is None:
        plan = luq_plan(layers_path, n_layers, order, n_low, config, info)
        result = quantize_model(model, samples, plan, work_dir=work_dir, device=device,
                                progress=progress)
    q, rep = result
    q.vlmkern_plan_info = info
    chosen_low = set(order[:n_low])
    high_entry = PlanEntry.from_config(config.high)
    report = LUQReport(list(entropies), order, k, sel, n_low, n_layers, mode, target, probes,
                       [low[i] if i in chosen_low else high[i] for i in range(n_layers)],
                       n_weights, entropy_seconds, time.perf_counter() - t1, rep,
                       (PlanEntry.from_config(config.low).method, high_entry.method),
                       high_entry.w_bits)
    return q, report
