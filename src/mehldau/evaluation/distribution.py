"""mgeval's distribution comparison (Yang & Lerch 2020), with its grid fixed.

For one feature, a generated set A and a reference set B of per-piece feature vectors: the
intra-set distances of B (every pair within B) say how varied the reference is; the inter-set
distances (every A piece to every B piece) say how far the generated pieces sit from it. Both
samples are smoothed with a Gaussian KDE and compared:

- overlap area OA = integral of min(p_intra, p_inter), in [0, 1]; 1 means the generated pieces
  are as far from the reference as its own pieces are from each other, i.e. indistinguishable
  from its own spread (copying the reference also scores high: see `copying`);
- KL(p_intra || p_inter) >= 0, 0 when the two are the same.

Hand-written because mgeval's `kl_dist` evaluates each KDE on its own grid and then compares
the values point by point, which compares densities at different distances; here both are
evaluated on one shared grid. mgeval itself also needs Python 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.distance import cdist, pdist
from scipy.stats import t as student_t

GRID_POINTS = 1000
PAD_BANDWIDTHS = 3.0
EPS = 1e-10  # density floor on q in KL: where the reference spread has mass the generated
# distances lack, KL is large (~ -log EPS = 23 nats per unit of such mass) but finite


def _matrix(items: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.atleast_1d(np.asarray(x, np.float64)) for x in items])


def intra_distances(b: Sequence[np.ndarray]) -> np.ndarray:
    """Euclidean distances of every pair i < j within b."""
    return pdist(_matrix(b)) if len(b) > 1 else np.zeros(0)


def inter_distances(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """Euclidean distances of every item of a to every item of b."""
    return cdist(_matrix(a), _matrix(b)).ravel() if len(a) and len(b) else np.zeros(0)


def _bandwidth(x: np.ndarray, scale: float) -> float:
    """Scott's rule, as scipy.stats.gaussian_kde uses it in 1-D; a fixed small bandwidth where
    gaussian_kde would be singular (under 2 points, or all equal)."""
    if len(x) > 1 and np.ptp(x) > 0:
        return float(len(x) ** -0.2 * x.std(ddof=1))
    return 0.05 * scale if scale > 0 else 1e-3 * max(1.0, float(np.abs(x).max(initial=0.0)))


def _density(x: np.ndarray, h: float, grid: np.ndarray) -> np.ndarray:
    """Gaussian KDE on a uniform grid by linear binning and a Gaussian filter: gaussian_kde's
    estimate up to O(dx**2), but ~100x faster on the 10**4..10**5 distances a bootstrap
    re-smooths hundreds of times."""
    dx = grid[1] - grid[0]
    pos = (x - grid[0]) / dx
    i = np.clip(np.floor(pos).astype(np.int64), 0, len(grid) - 2)
    w = pos - i
    counts = np.bincount(i, 1 - w, len(grid)) + np.bincount(i + 1, w, len(grid))
    p = gaussian_filter1d(counts, h / dx, mode="constant")
    return p / (p.sum() * dx)


def densities(x: np.ndarray, y: np.ndarray, points: int = GRID_POINTS
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KDEs of two distance samples on one shared grid -> (grid, p_x, p_y), each integrating
    to 1. The grid spans both samples, padded by 3 of the wider bandwidth each side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not len(x) or not len(y):
        raise ValueError("need at least one distance on each side")
    both = np.concatenate([x, y])
    scale = float(np.ptp(both))
    hx, hy = _bandwidth(x, scale), _bandwidth(y, scale)
    pad = PAD_BANDWIDTHS * max(hx, hy)
    grid = np.linspace(both.min() - pad, both.max() + pad, points)
    return grid, _density(x, hx, grid), _density(y, hy, grid)


def overlap_area(p: np.ndarray, q: np.ndarray, grid: np.ndarray) -> float:
    """Integral of min(p, q) on a uniform grid."""
    return float(np.minimum(p, q).sum() * (grid[1] - grid[0]))


def kl_divergence(p: np.ndarray, q: np.ndarray, grid: np.ndarray) -> float:
    """KL(p || q) on a uniform grid, q floored at EPS and renormalised (so the result stays a
    true divergence, >= 0)."""
    dx = grid[1] - grid[0]
    q = np.maximum(q, EPS)
    q = q / (q.sum() * dx)
    m = p > 0
    return max(float((p[m] * np.log(p[m] / q[m])).sum() * dx), 0.0)  # max: rounding only


def compare_feature(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> tuple[float, float]:
    """Generated feature vectors a vs reference vectors b -> (OA, KL(intra_b || inter_ab)).
    Needs two items in b at least (one intra distance); a degenerate (all-equal) sample gets
    a fixed small bandwidth instead of a singular KDE."""
    grid, p, q = densities(intra_distances(b), inter_distances(a, b))
    return overlap_area(p, q, grid), kl_divergence(p, q, grid)


def _t_quantile(level: float, df: float) -> float:
    return float(student_t.ppf(0.5 + level / 2, max(df, 1.0)))


def _jackknife_side(groups: Sequence[Sequence[Any]], other: list, stat, first: bool
                    ) -> tuple[np.ndarray, int] | None:
    """Leave-one-group-out values of `stat` on one side (the other side whole): (values
    (g, k), g), or None with fewer than two groups."""
    if len(groups) < 2:
        return None
    rows = []
    for i in range(len(groups)):
        kept = [item for j, g in enumerate(groups) if j != i for item in g]
        rows.append(stat(kept, other) if first else stat(other, kept))
    return np.array(rows, dtype=float).reshape(len(groups), -1), len(groups)


def _jackknife_variance(values: np.ndarray) -> tuple[float, int]:
    """Jackknife variance of one column of leave-one-out values (NaN rows left out) and
    how many rows counted."""
    v = values[~np.isnan(values)]
    g = len(v)
    if g < 2:
        return math.nan, g
    return float((g - 1) / g * ((v - v.mean()) ** 2).sum()), g


# Scales an interval is built on: an overlap in [0, 1] on the logit scale (the leave-one-out
# values of an OA near 1 are skewed, and a symmetric interval there covered 86 % in
# simulation, 95 % on the logit scale), a divergence >= 0 on the log scale; "unit" is the
# linear scale cut to [0, 1], for figures that sit at 0 or 1 exactly (an AUC of 1.000, a
# clipped score), where the logit scale would turn a leave-out of 0.998 into a wide gap.
_EPS = 1e-6
SCALES: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "linear": (lambda x: x, lambda z: z),
    "logit": (lambda x: math.log(min(max(x, _EPS), 1 - _EPS) / (1 - min(max(x, _EPS), 1 - _EPS))),
              lambda z: 1 / (1 + math.exp(-z)) if z > -700 else 0.0),
    "log": (lambda x: math.log(max(x, _EPS)), lambda z: math.exp(min(z, 700))),
    "unit": (lambda x: x, lambda z: min(max(z, 0.0), 1.0)),
}


def jackknife_many(groups_a: Sequence[Sequence[Any]], groups_b: Sequence[Sequence[Any]],
                   stat: Callable[[list, list], Sequence[float]], level: float = 0.95,
                   scale: str | Sequence[str] = "linear"
                   ) -> list[tuple[float, float, float]]:
    """(value, lo, hi) per value of `stat` on all items: the grouped (delete-one-group)
    jackknife t-interval, built on `scale` (`SCALES`: linear; logit or unit for values in
    [0, 1]; log for values >= 0) and mapped back, so it stays inside the value's range.

    Groups are the units that are independent of each other (prompts; reference pieces).
    The variance is the sum of each side's jackknife variance (Quenouille–Tukey), leaving
    out one group of that side at a time; the t quantile takes Welch–Satterthwaite's
    degrees of freedom from the two sides' group counts. Why not a percentile bootstrap:
    a bootstrap resample repeats groups, and the statistics here that are built from
    distances between different pieces (OA, KL, the kernel distance) change when pieces
    repeat (OA falls), so their percentile intervals excluded their own estimates (a human
    row 0.941 [0.847, 0.930]). A leave-one-out set never repeats a group, the interval is
    centred on the estimate so it always holds it, and the jackknife variance errs large
    (Efron & Stein 1981), never small; `tests/test_intervals.py` checks by simulation that a
    95 % interval covers the truth 90–99 % of the time for OA, shares and the kernel
    distance. With one group on a side, that side adds no variance; with one group on both,
    the interval is (value, NaN, NaN): no interval, said as such in the reports."""
    value = np.array(stat([x for g in groups_a for x in g], [x for g in groups_b for x in g]),
                     dtype=float).reshape(-1)
    k = len(value)
    scales = [scale] * k if isinstance(scale, str) else list(scale)
    all_a = [x for g in groups_a for x in g]
    all_b = [x for g in groups_b for x in g]
    sides = [s for s in (_jackknife_side(groups_a, all_b, stat, True),
                         _jackknife_side(groups_b, all_a, stat, False)) if s is not None]
    out = []
    for c in range(k):
        v = float(value[c])
        forward, back = SCALES[scales[c]]
        parts = [_jackknife_variance(np.array([forward(x) if not math.isnan(x) else math.nan
                                               for x in values[:, c]])) for values, _ in sides]
        parts = [(var, g) for var, g in parts if g >= 2 and math.isfinite(var)]
        if math.isnan(v) or not parts:
            out.append((v, math.nan, math.nan))
            continue
        var = sum(p for p, _ in parts)
        denom = sum(p * p / (g - 1) for p, g in parts)
        df = var * var / denom if denom > 0 else min(g for _, g in parts) - 1
        half = _t_quantile(level, df) * math.sqrt(var)
        z = forward(v)
        # min/max: a value at the scale's edge (OA 1.0 on the logit scale) maps back inside
        out.append((v, float(min(back(z - half), v)), float(max(back(z + half), v))))
    return out


def jackknife(groups_a: Sequence[Sequence[Any]], groups_b: Sequence[Sequence[Any]],
              stat: Callable[[list, list], float], level: float = 0.95,
              scale: str = "linear") -> tuple[float, float, float]:
    """`jackknife_many` for a stat of one value."""
    return jackknife_many(groups_a, groups_b, lambda a, b: (stat(a, b),), level, scale)[0]


def group_mean(groups: Sequence[Sequence[float]], level: float = 0.95,
               scale: str = "linear") -> tuple[float, float, float]:
    """The mean of every value, with the grouped jackknife interval (the cluster-robust
    interval of a mean): (NaN, NaN, NaN) without values."""
    groups = [[float(x) for x in g if not math.isnan(float(x))] for g in groups]
    groups = [g for g in groups if g]
    if not groups:
        return (math.nan, math.nan, math.nan)
    return jackknife(groups, [], lambda x, _: float(np.mean(x)), level, scale)


def wilson(successes: float, n: float, z: float = 1.959963984540054
           ) -> tuple[float, float] | None:
    """Wilson's (1927) score interval for a proportion; None without trials. `successes`
    may be fractional (a tie counted as half, an effective count)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_share(groups: Sequence[Sequence[float]], level: float = 0.95
                    ) -> tuple[float, float, float]:
    """A share of 0/1 outcomes that come in groups (clips of one prompt, of one piece): the
    pooled share, with Wilson's interval at the effective sample size of Korn & Graubard
    (1998): p(1 − p) / the grouped jackknife variance, times (z / t with groups − 1 degrees
    of freedom)² for a variance estimated from few groups, and never more than the number
    of clips (clips of one prompt never count as more than independent clips). Wilson's
    rather than the jackknife's own t-interval: a share of 1.00 over 24 clips has a
    jackknife variance of 0, and [1.00, 1.00] would claim a certainty 24 clips do not give;
    Wilson's stays inside [0, 1] and always holds the share."""
    groups = [[float(x) for x in g] for g in groups if len(g)]
    n = sum(len(g) for g in groups)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    p = sum(sum(g) for g in groups) / n
    z = float(student_t.ppf(0.5 + level / 2, 1e9))
    n_eff = float(n)
    if len(groups) >= 2 and 0 < p < 1:
        var = _jackknife_variance(np.array(
            [(sum(sum(h) for j, h in enumerate(groups) if j != i))
             / (n - len(groups[i])) for i in range(len(groups))]))[0]
        if math.isfinite(var) and var > 0:
            t = _t_quantile(level, len(groups) - 1)
            n_eff = min(n_eff, p * (1 - p) / var * (z / t) ** 2)
    lo, hi = wilson(p * n_eff, n_eff, z)
    return (p, min(lo, p), max(hi, p))


def differ(ci1: Sequence[float], ci2: Sequence[float]) -> bool:
    """Whether two intervals do not overlap; each is (lo, hi) or (value, lo, hi)."""
    return ci1[-1] < ci2[-2] or ci2[-1] < ci1[-2]
