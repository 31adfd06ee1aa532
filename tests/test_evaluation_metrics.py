"""Note-level evaluation metrics: features, mgeval-style distribution comparison, copy check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import symusic
from scipy.stats import gaussian_kde
from scipy.stats import t as student_t

from mehldau.evaluation.copying import TrainIndex, copy_report
from mehldau.evaluation.distribution import (
    compare_feature,
    densities,
    differ,
    jackknife,
    kl_divergence,
    overlap_area,
)
from mehldau.evaluation.features import (
    FEATURES,
    Notes,
    cut,
    muspy_metrics,
    random_notes,
    read_notes,
    sliding,
)

C_MAJOR = [60, 62, 64, 65, 67, 69, 71]  # C4 .. B4: seven pitch classes, once each


def scale(step: float = 0.5) -> Notes:
    onset = np.arange(len(C_MAJOR)) * step
    return Notes.from_arrays(onset, onset + step, C_MAJOR, [80] * len(C_MAJOR))


def write_scale(path, step: float = 0.5) -> str:
    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, 120.0))  # 960 ticks per second
    track = symusic.Track(name="piano", program=0)
    for i, p in enumerate(C_MAJOR):
        track.notes.append(symusic.Note(int(i * step * 960), int(step * 960), p, 80))
    score.tracks.append(track)
    score.dump_midi(str(path))
    return str(path)


@pytest.mark.parametrize("source", ["direct", "midi"])
def test_scale_features(tmp_path, source):
    n = scale() if source == "direct" else read_notes(write_scale(tmp_path / "s.mid"))
    assert len(n) == 7 and n.seconds == pytest.approx(3.5)
    m = muspy_metrics(n)
    assert m["pitch_class_entropy"] == pytest.approx(math.log2(7))
    assert m["scale_consistency"] == pytest.approx(1.0)
    assert m["pitch_range"] == 11 and FEATURES["pitch_range"](n)[0] == 11
    assert m["polyphony"] == pytest.approx(1.0)
    assert FEATURES["notes_per_second"](n)[0] == pytest.approx(2.0)
    assert FEATURES["mean_ioi"](n)[0] == pytest.approx(0.5)
    assert FEATURES["mean_interval"](n)[0] == pytest.approx(11 / 6)
    assert FEATURES["pitch_count"](n)[0] == 7
    hist = FEATURES["pitch_class_histogram"](n)
    assert hist.sum() == pytest.approx(1.0) and hist[0] == pytest.approx(1 / 7)
    assert hist[1] == 0.0
    trans = FEATURES["pitch_class_transition"](n).reshape(12, 12)
    assert trans[0, 2] == pytest.approx(1 / 6) and trans[2, 0] == 0.0
    lengths = FEATURES["note_length_histogram"](n)
    assert lengths.sum() == pytest.approx(1.0) and lengths.argmax() == 6  # 0.5 s: 0.44..0.72


def test_read_notes_span(tmp_path):
    n = read_notes(write_scale(tmp_path / "s.mid"), start=1.0, seconds=1.5)
    assert list(n.pitch) == [64, 65, 67] and n.onset[0] == pytest.approx(0.0)
    assert n.seconds == pytest.approx(1.5)
    assert len(cut(n, 0.5, 100.0)) == 2 and cut(n, 0.5, 100.0).seconds == pytest.approx(1.0)


def test_chord_polyphony():
    n = Notes.from_arrays([0, 0, 0], [2, 2, 2], [60, 64, 67])
    assert FEATURES["polyphony"](n)[0] == pytest.approx(3.0)
    assert muspy_metrics(n)["polyphony"] == pytest.approx(3.0)
    assert FEATURES["mean_ioi"](n)[0] == 0.0  # one onset, no gaps


def test_empty_notes_do_not_crash():
    empty = Notes.from_arrays([], [], [], [], seconds=10.0)
    for name, f in FEATURES.items():
        v = f(empty)
        assert v.ndim == 1 and v.dtype == np.float64 and not v.any(), name
    assert math.isnan(muspy_metrics(empty)["pitch_class_entropy"])
    assert sliding(empty) == {"pitch_class_entropy": 0.0, "notes_per_second": 0.0}


def test_sliding():
    short = scale()  # 3.5 s, shorter than the 15 s window: one window, the whole span
    assert sliding(short) == pytest.approx({"pitch_class_entropy": math.log2(7),
                                            "notes_per_second": 2.0})
    # 20 s: C for 10 s then D for 10 s, 4 notes/s; windows at 0..5 s mix both
    onset = np.arange(80) * 0.25
    n = Notes.from_arrays(onset, onset + 0.25, np.where(onset < 10, 60, 62), seconds=20.0)
    s = sliding(n, window=15.0, hop=1.0)
    assert s["notes_per_second"] == pytest.approx(4.0)
    h = [-(p * math.log2(p) + (1 - p) * math.log2(1 - p)) for p in
         [(10 - t) / 15 for t in range(6)]]
    assert s["pitch_class_entropy"] == pytest.approx(np.mean(h))


def test_random_notes():
    n = random_notes(500, 60.0, np.random.default_rng(0))
    assert len(n) == 500 and n.seconds == 60.0 and np.all(np.diff(n.onset) >= 0)
    assert n.pitch.min() >= 21 and n.pitch.max() <= 108
    length = n.end - n.onset
    assert length.min() >= 0.05 and length.max() <= 2.0
    assert n.velocity.min() >= 20 and n.velocity.max() <= 110


def _vectors(rng, n, loc, dim=3):
    return [rng.normal(loc, 1.0, dim) for _ in range(n)]


def test_overlap_and_kl():
    rng = np.random.default_rng(0)
    b = _vectors(rng, 40, 0.0)
    oa_self, kl_self = compare_feature(b, b)
    assert oa_self > 0.95 and kl_self >= 0.0
    oa_same, _ = compare_feature(_vectors(rng, 40, 0.0), b)  # a fresh draw, same distribution
    assert oa_same > 0.85
    oa_far, kl_far = compare_feature(_vectors(rng, 40, 5.0), b)
    assert oa_far < 0.5 and kl_far > 1.0
    # identical samples on the shared grid: densities equal, KL exactly 0, OA 1
    x = rng.gamma(2.0, 1.0, 300)
    grid, p, q = densities(x, x.copy())
    assert abs(kl_divergence(p, q, grid)) < 1e-9 and overlap_area(p, q, grid) == pytest.approx(1)
    grid, p, q = densities(x, x + 0.5)
    assert kl_divergence(p, q, grid) > 0 and 0 < overlap_area(p, q, grid) < 1
    assert np.sum(p) * (grid[1] - grid[0]) == pytest.approx(1.0)
    exact = gaussian_kde(x)(grid)  # the binned KDE is scipy's Scott's-rule KDE, renormalised
    exact /= exact.sum() * (grid[1] - grid[0])
    assert np.abs(p - exact).max() < 1e-3 * exact.max()


def test_degenerate_features():
    same = [np.array([2.0])] * 5
    oa, kl = compare_feature(same, same)  # all distances 0: KDE would be singular
    assert oa == pytest.approx(1.0) and kl == pytest.approx(0.0, abs=1e-9)
    oa, kl = compare_feature([np.array([7.0])] * 3, same)
    assert oa < 0.01 and kl > 1.0
    oa, kl = compare_feature([np.array([1.0])], [np.array([0.0]), np.array([3.0])])
    assert 0.0 <= oa <= 1.0 and np.isfinite(kl)


def test_jackknife_interval_and_differ():
    rng = np.random.default_rng(1)
    a = [list(rng.normal(1.0, 1.0, 5)) for _ in range(20)]
    b = [list(rng.normal(0.0, 1.0, 5)) for _ in range(20)]

    def gap(x, y):
        return float(np.mean(x) - np.mean(y))

    value, lo, hi = jackknife(a, b, gap)
    assert lo < value < hi and lo > 0.5 and hi < 1.5
    # a mean's jackknife variance is the usual one: s² / g for each side's group means
    means = [np.mean(g) for g in a], [np.mean(g) for g in b]
    se = math.sqrt(sum(np.var(m, ddof=1) / len(m) for m in means))
    assert (hi - lo) / 2 == pytest.approx(se * student_t.ppf(0.975, 38), rel=0.02)
    _, lo0, hi0 = jackknife(b, b, gap)
    assert lo0 < 0 < hi0
    assert differ((lo, hi), (lo0, hi0)) and differ((value, lo, hi), (0.0, lo0, hi0))
    assert not differ((0.0, 1.0), (0.5, 2.0))


def _plant(rng, piece: Notes, at: int, length: int = 30) -> tuple[Notes, slice]:
    """A random sample with notes at..at+length of `piece` in its middle, up 5 semitones and
    moved in time, clear of the random notes around it."""
    before, after = random_notes(100, 20.0, rng), random_notes(100, 20.0, rng)
    s = slice(at, at + length)
    phrase_on = piece.onset[s] - piece.onset[at] + 21.0
    phrase_end = phrase_on + (piece.end[s] - piece.onset[s])
    t_after = phrase_on[-1] + 1.0
    n = Notes.from_arrays(
        np.concatenate([before.onset, phrase_on, after.onset + t_after]),
        np.concatenate([before.end, phrase_end, after.end + t_after]),
        np.concatenate([before.pitch, piece.pitch[s] + 5, after.pitch]),
        np.concatenate([before.velocity, piece.velocity[s], after.velocity]))
    return n, s


def test_copy_check():
    rng = np.random.default_rng(0)
    train = [random_notes(1000, 200.0, rng) for _ in range(20)]
    index = TrainIndex(train)
    planted, _ = _plant(rng, train[7], at=400)
    assert index.longest_match(planted) >= 30
    report = copy_report(planted, index)
    assert report["flagged"] and report["longest"] >= 30
    assert report["share"] == pytest.approx(30 / len(planted), abs=2 / len(planted))
    fresh = copy_report(random_notes(300, 60.0, rng), index)
    assert fresh["longest"] < 10 and not fresh["flagged"] and fresh["share"] == 0.0
    # a whole training piece, replayed: matched end to end
    assert index.longest_match(train[3]) == len(train[3])
    assert index.copied_share(train[3]) == 1.0


def _chordal_piece(rng, n_chords: int = 300) -> Notes:
    """Three-note chords, every note struck up to 20 ms late in no particular order."""
    t = np.repeat(np.cumsum(rng.uniform(0.15, 0.6, n_chords)), 3)
    onset = t + rng.uniform(0.0, 0.02, len(t))
    pitch = rng.integers(36, 96, len(t))
    return Notes.from_arrays(onset, onset + 0.3, pitch)


def test_copy_check_survives_chord_jitter():
    rng = np.random.default_rng(2)
    train = [_chordal_piece(rng) for _ in range(10)]
    index = TrainIndex(train)
    piece = train[4]
    # the same chords with their notes struck in another order: (onset, pitch) order changes
    onset = rng.permuted(piece.onset.reshape(-1, 3), axis=1).ravel()
    reordered = Notes.from_arrays(onset + 3.0, piece.end + 3.0, piece.pitch + 5)
    assert not np.array_equal(reordered.pitch - 5, piece.pitch)
    assert index.longest_match(reordered) == len(piece)
    # a replay through a 10 ms grid: IOIs near bin edges flip bins, but runs stay long
    gridded = Notes.from_arrays(np.round(piece.onset, 2), piece.end, piece.pitch)
    assert copy_report(gridded, index)["flagged"]
    assert index.longest_match(_chordal_piece(rng)) < 10


def test_note_stats_of_a_held_chord_and_a_line(tmp_path):
    from mehldau.metrics import note_stats

    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, 120.0))  # 960 ticks per second
    track = symusic.Track(name="piano", program=0)
    for p in (60, 64, 67):  # a chord held 3 s
        track.notes.append(symusic.Note(0, 3 * 960, p, 80))
    for i in range(4):  # then a line of four 0.5 s notes
        track.notes.append(symusic.Note(int((3 + 0.5 * i) * 960), 480, 72 + i, 80))
    score.tracks.append(track)
    score.dump_midi(str(tmp_path / "x.mid"))
    stats = note_stats([tmp_path / "x.mid"])
    assert stats.notes == 7 and stats.seconds == pytest.approx(5.0)
    assert stats.notes_per_second == pytest.approx(7 / 5)
    assert stats.polyphony == pytest.approx((3 * 300 + 1 * 200) / 500, rel=0.01)
    assert stats.median_duration == pytest.approx(0.5)
    assert stats.share_over_2s == pytest.approx(3 / 7)
