"""Intervals that hold: every interval the reports print contains its estimate, and a 95 %
interval covers the truth 90–99 % of the time, checked by simulation on known
distributions, with variation between prompts (a prompt's clips are alike), for the three
kinds of figure the comparison reports: OA (`compare.oa_kl_intervals`), shares
(`distribution.clustered_share`: the style shares) and the kernel distance
(`style.kernel_with_interval`). And the distances' own bias at small n."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mehldau.evaluation import distribution as dist
from mehldau.evaluation.compare import _oa_kl, oa_kl_intervals
from mehldau.evaluation.style import (
    frechet_distance,
    kernel_distance,
    kernel_with_interval,
    same_n_baseline,
)


def _coverage_ok(hits: int, reps: int) -> bool:
    return 0.90 <= hits / reps <= 0.99


# --- OA ---------------------------------------------------------------------------------------
def _oa_sets(rng, shift: float, spread: float, dim: int, prompts=12, per=2, pieces=20, segs=3):
    """A comparison's shape: `prompts` x `per` excerpts (each prompt's alike: a prompt effect)
    against `pieces` reference pieces of `segs` segments (a piece effect), one feature."""
    ref = [[(1000 + j, [m + 0.5 * rng.normal(size=dim)]) for _ in range(segs)]
           for j, m in enumerate(rng.normal(size=(pieces, dim)))]
    gen = [[(i, [m + 0.5 * rng.normal(size=dim)]) for _ in range(per)]
           for i, m in enumerate(shift + spread * rng.normal(size=(prompts, dim)))]
    return gen, ref


def _oa(gen, ref) -> float:
    return _oa_kl([(u, v[0]) for g in gen for u, v in g], [(u, v[0]) for g in ref for u, v in g])[0]


@pytest.mark.parametrize("shift,spread,dim", [(0.0, 1.0, 1), (1.0, 1.3, 1), (0.5, 1.0, 4)])
def test_oa_intervals_hold_their_estimate_and_cover_the_protocols_oa(shift, spread, dim):
    """The truth is the OA this protocol gives at this size (its mean over many independent
    comparisons): OA depends on n, and a branch is read against the human row measured at
    the same n. The first setting is the human row's (the same distribution as the
    reference), where the percentile bootstrap held its own estimate 74 % of the time."""
    rng = np.random.default_rng(7)
    truth = float(np.mean([_oa(*_oa_sets(rng, shift, spread, dim)) for _ in range(400)]))
    reps, hits = 250, 0
    for _ in range(reps):
        gen, ref = _oa_sets(rng, shift, spread, dim)
        (v, lo, hi), (k, klo, khi) = oa_kl_intervals(gen, ref, 1)[:2]
        assert lo <= v <= hi and 0 <= lo and hi <= 1 and klo <= k <= khi
        hits += lo <= truth <= hi
    assert _coverage_ok(hits, reps), (hits / reps, truth)


# --- shares ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts,per,a,b", [(12, 2, 7, 3), (12, 2, 2, 0.8), (6, 4, 1, 1),
                                              (24, 2, 0.5, 9.5), (4, 2, 9, 1)])
def test_share_intervals_cover_the_true_share_when_prompts_differ(prompts, per, a, b):
    """Each prompt's clips share a probability drawn from Beta(a, b) (some prompts are easy,
    some hard); the truth is its mean, a / (a + b)."""
    rng = np.random.default_rng(prompts * 100 + per)
    truth, reps, hits = a / (a + b), 1500, 0
    for _ in range(reps):
        groups = [list((rng.random(per) < p).astype(float)) for p in rng.beta(a, b, prompts)]
        v, lo, hi = dist.clustered_share(groups)
        assert 0 <= lo <= v <= hi <= 1
        hits += lo <= truth <= hi
    assert _coverage_ok(hits, reps), hits / reps


def test_a_share_of_one_is_not_certain() -> None:
    v, lo, hi = dist.clustered_share([[1.0, 1.0]] * 12)
    assert v == 1.0 and hi == 1.0 and 0.8 < lo < 0.9  # 24 clips do not prove 1.00


def test_a_clustered_share_is_wider_than_independent_clips() -> None:
    # twelve prompts, each all-or-nothing: 12 pieces of evidence, not 24
    groups = [[1.0, 1.0]] * 6 + [[0.0, 0.0]] * 6
    _, lo, hi = dist.clustered_share(groups)
    _, lo1, hi1 = dist.clustered_share([[x] for g in groups for x in g])
    assert hi - lo > 1.25 * (hi1 - lo1)


# --- the kernel distance ----------------------------------------------------------------------
D = 8


def _emb_sets(rng, shift, between, prompts=12, per=2, pieces=20, clips=3):
    a = [(f"p{i}", m + rng.normal(size=D)) for i, m in
         enumerate(shift + between * rng.normal(size=(prompts, D))) for _ in range(per)]
    b = [(f"v{j}", m + rng.normal(size=D)) for j, m in
         enumerate(0.7 * rng.normal(size=(pieces, D))) for _ in range(clips)]
    return a, b


def _population_mmd(rng, shift, between, n=300_000) -> float:
    """MMD² between independent draws of the two populations (pairs of distinct clips of
    distinct prompts), by Monte Carlo on 300,000 pairs per term."""
    def draw(s, w):
        return s + w * rng.normal(size=(n, D)) + rng.normal(size=(n, D))

    def k(x, y):
        return ((x * y).sum(1) / D + 1) ** 3

    x, x2, y, y2 = draw(shift, between), draw(shift, between), draw(0, 0.7), draw(0, 0.7)
    return float(k(x, x2).mean() + k(y, y2).mean() - 2 * k(x, y).mean())


@pytest.mark.parametrize("shift,between", [(0.0, 0.7), (0.3, 0.7), (0.6, 0.3)])
def test_kernel_distance_intervals_cover_the_population_distance(shift, between):
    rng = np.random.default_rng(11)
    truth = _population_mmd(rng, shift, between)
    reps, hits = 200, 0
    for _ in range(reps):
        a, b = _emb_sets(rng, shift, between)
        v, lo, hi = kernel_with_interval(np.stack([x for _, x in a]), [g for g, _ in a],
                                         np.stack([x for _, x in b]), [g for g, _ in b])
        assert lo <= v <= hi
        hits += lo <= truth <= hi
    assert _coverage_ok(hits, reps), (hits / reps, truth)


def test_pairs_of_one_prompt_would_bias_the_kernel_distance_and_are_left_out() -> None:
    """Clips of one prompt are alike; counted as pairs they inflate a set's own term."""
    rng = np.random.default_rng(3)
    truth = _population_mmd(rng, 0.0, 0.7)
    grouped, plain = [], []
    for _ in range(300):
        a, b = _emb_sets(rng, 0.0, 0.7, per=4)
        ea, eb = np.stack([x for _, x in a]), np.stack([x for _, x in b])
        grouped.append(kernel_distance(ea, eb, [g for g, _ in a], [g for g, _ in b]))
        plain.append(kernel_distance(ea, eb))
    se = np.std(grouped) / math.sqrt(len(grouped))
    assert abs(np.mean(grouped) - truth) < 3 * se
    assert np.mean(plain) - truth > 10 * se


def test_frechet_distance_is_mostly_bias_at_small_n_and_the_kernel_distance_is_not() -> None:
    """Two sets from the same 64-d standard normal: the Fréchet distance is ~120 at six clips,
    ~44 at fifty and ~2 at a thousand (its bias shrinks only as n grows), while the kernel
    distance's mean stays at 0 within its noise at every n."""
    rng = np.random.default_rng(5)
    fd, kid = {}, {}
    for n, reps in ((6, 300), (50, 100), (1000, 5)):
        f, k = [], []
        for _ in range(reps):
            a, b = rng.normal(size=(n, 64)), rng.normal(size=(n, 64))
            f.append(frechet_distance(a, b))
            k.append(kernel_distance(a, b))
        fd[n], kid[n] = float(np.mean(f)), (float(np.mean(k)), float(np.std(k) / math.sqrt(reps)))
    assert fd[6] > 2 * fd[50] and fd[50] > 10 * fd[1000] and fd[1000] < 3
    for mean, se in kid.values():
        assert abs(mean) < 3 * se
    # the formula, where n is large enough for scipy's matrix square root to be stable
    from scipy import linalg

    a, b = rng.normal(size=(800, 64)), rng.normal(0.3, 1.2, size=(700, 64))
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu = a.mean(0) - b.mean(0)
    plain = mu @ mu + np.trace(sa + sb - 2 * np.real(linalg.sqrtm(sa @ sb)))
    assert frechet_distance(a, b) == pytest.approx(plain, rel=1e-6)
    assert frechet_distance(a, b) > 3 * fd[1000]  # a real difference stands above the bias


def test_the_same_n_baseline_is_what_the_pianists_own_clips_score_at_that_n() -> None:
    rng = np.random.default_rng(9)
    own = rng.normal(size=(40, D))
    ref = rng.normal(size=(30, D))
    small = same_n_baseline(own, [f"t{i // 4}" for i in range(40)], ref,
                            [f"v{i // 3}" for i in range(30)], 6, 200, 0)
    large = same_n_baseline(own, [f"t{i // 4}" for i in range(40)], ref,
                            [f"v{i // 3}" for i in range(30)], 30, 200, 0)
    assert small["frechet"][0] > 2 * large["frechet"][0]  # the Fréchet bias at small n
    for b in (small, large):
        for key in ("kernel", "frechet"):
            med, lo, hi = b[key]
            assert lo <= med <= hi
    # fewer own clips than the row's n: drawn with replacement, no clip paired with itself
    few = same_n_baseline(own[:5], ["t0"] * 5, ref, [f"v{i // 3}" for i in range(30)], 12, 50,
                          0)
    assert few["pool"] == 5 and all(math.isfinite(x) for x in few["kernel"])


# --- every interval holds its estimate --------------------------------------------------------
def test_jackknife_intervals_hold_their_estimates_on_every_scale() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        groups = [list(rng.beta(0.3, 0.3, int(rng.integers(1, 4)))) for _ in range(
            int(rng.integers(2, 8)))]
        for scale in ("linear", "logit", "unit"):
            v, lo, hi = dist.group_mean(groups, scale=scale)
            assert lo <= v <= hi
    v, lo, hi = dist.group_mean([[0.3, 0.5]])  # one group: no interval, said so
    assert v == 0.4 and math.isnan(lo) and math.isnan(hi)
    assert dist.differ((0.0, 0.1, 0.2), (0.5, 0.4, 0.6))
    assert not dist.differ((0.0, 1.0), (0.5, 2.0))


def test_a_report_refuses_a_figure_outside_its_interval() -> None:
    from mehldau.evaluation.report import check_intervals

    check_intervals({"a": {"oa": (0.5, 0.4, 0.6)}, "rows": [2, 0, 1], "n/a": (1.0, math.nan,
                                                                           math.nan)})
    with pytest.raises(RuntimeError, match="outside its interval"):
        check_intervals({"a": {"oa": (0.94, 0.85, 0.93)}})


# --- calibration error at small n ---------------------------------------------------------
def _dirichlet_probs(rng, n: int, k: int = 6, sharp: float = 0.4) -> np.ndarray:
    return rng.dirichlet(np.full(k, sharp), n)


def test_the_calibrated_floor_holds_a_calibrated_judges_ece_and_not_an_overconfident_one():
    """ECE at 124 clips is mostly noise: a judge whose probabilities are exactly right reads
    well above zero. The floor (labels drawn from the probabilities themselves) holds such a
    judge's ECE about 95 % of the time; a judge twice as confident as the truth (logits
    doubled) lies above it."""
    from mehldau.evaluation.judge_report import calibrated_ece, calibration_figures

    rng = np.random.default_rng(7)
    inside = above = 0
    reps = 40
    for _ in range(reps):
        truth = _dirichlet_probs(rng, 124)
        labels = np.array([rng.choice(6, p=p) for p in truth])
        floor = calibrated_ece(truth, draws=100, seed=int(rng.integers(1 << 30)))
        ece = calibration_figures(truth, labels)["ece"]
        assert floor[1] <= floor[0] <= floor[2] and floor[1] > 0.01  # noise, not zero
        inside += floor[1] <= ece <= floor[2]
        sharp = np.exp(2 * np.log(truth + 1e-9))
        sharp /= sharp.sum(1, keepdims=True)
        above += calibration_figures(sharp, labels)["ece"] > calibrated_ece(
            sharp, draws=100, seed=1)[2]
    assert 0.85 <= inside / reps <= 1.0
    assert above / reps >= 0.8
