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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.distance import cdist, pdist

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


def bootstrap(groups_a: Sequence[Sequence[Any]], groups_b: Sequence[Sequence[Any]],
              stat: Callable[[list, list], float], n: int = 200, seed: int = 0,
              level: float = 0.95) -> tuple[float, float, float]:
    """(value, lo, hi): `stat` on all items, and its percentile interval over `n` resamples of
    the groups (pieces) of each side with replacement. Groups, not items, are resampled because
    windows of one piece are not independent.

    For distance-based stats (OA, KL) a resample repeats pieces, which adds zero distances, so
    the resampled values are biased (OA low) unless the stat leaves out pairs of one original
    item (`mehldau.evaluation.compare` does); compare intervals of systems measured the same
    way (`differ`) rather than reading one as the value's own error bar."""
    return bootstrap_many(groups_a, groups_b, lambda a, b: (stat(a, b),), n, seed, level)[0]


def bootstrap_many(groups_a: Sequence[Sequence[Any]], groups_b: Sequence[Sequence[Any]],
                   stat: Callable[[list, list], Sequence[float]], n: int = 200, seed: int = 0,
                   level: float = 0.95) -> list[tuple[float, float, float]]:
    """`bootstrap` for a stat of several values (one resampling shared by all of them)."""
    rng = np.random.default_rng(seed)

    def flat(groups, idx):
        return [item for i in idx for item in groups[i]]

    value = stat(flat(groups_a, range(len(groups_a))), flat(groups_b, range(len(groups_b))))
    stats = np.array([stat(flat(groups_a, rng.integers(0, len(groups_a), len(groups_a))),
                           flat(groups_b, rng.integers(0, len(groups_b), len(groups_b))))
                      for _ in range(n)], dtype=float).reshape(n, -1)
    tail = 100 * (1 - level) / 2
    out = []
    for k, v in enumerate(value):
        col = stats[:, k][~np.isnan(stats[:, k])]
        lo, hi = np.percentile(col, [tail, 100 - tail]) if len(col) else (np.nan, np.nan)
        out.append((float(v), float(lo), float(hi)))
    return out


def differ(ci1: Sequence[float], ci2: Sequence[float]) -> bool:
    """Whether two intervals do not overlap; each is (lo, hi) or `bootstrap`'s (value, lo, hi)."""
    return ci1[-1] < ci2[-2] or ci2[-1] < ci1[-2]
